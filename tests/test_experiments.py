"""The benchmarks' run commands work: the sampler benchmark prints its tables; the diffax worker of the PyTorch
comparison times its layout."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_sampler_accuracy_benchmark_runs(tmp_path):
  out = tmp_path / 'table.md'
  proc = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'sampler_accuracy.py'), '--nfe', '10',
                         '--samples', '256', '--overhead-batch', '4', '--out', str(out)],
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = out.read_text()
  for sampler in ('ddim', 'ddpm-ancestral', 'pc', 'heun-ode', 'edm-heun', 'dpm-solver++(2m)', 'adaptive ode'):
    assert sampler in table
  assert table.count('| exact samples (floor) |') == 2 and 'Overhead' in table
  # Every accuracy row carries finite numbers.
  assert 'nan' not in table.lower()


def test_bench_vs_torch_diffax_worker_times_the_digits_layout():
  """The diffax side of experiments/bench_vs_torch.py (torch is not installed here): the worker builds the digits
  default's U-Net, reports its parameter count, and answers timing requests with at least two calls each."""
  proc = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'bench_vs_torch.py'), '--worker', 'jax',
                         '--layout', 'digits', '--warmup-s', '0'], input='forward 0.1\ntrain 0.1\n',
                        capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info, forward, train = (json.loads(line) for line in proc.stdout.splitlines())
  from diffax import models  # pylint: disable=g-import-not-at-top
  model = models.get_model('unet', preset='unet_tiny', num_classes=10)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)),
                                               jnp.zeros((1,), jnp.int32)))
  assert info['params'] == sum(leaf.size for leaf in jax.tree.leaves(abstract))
  for reply in (forward, train):
    assert reply['calls'] >= 2 and reply['seconds'] > 0 and reply['cpu_seconds'] > 0


def test_flow_digits_experiment_runs(tmp_path):
  """experiments/flow_digits.py on the configs' runlocal variants: both models train through the real main and every
  sampler row of the table carries finite metrics."""
  out = tmp_path / 'table.md'
  proc = subprocess.run([sys.executable, str(ROOT / 'experiments' / 'flow_digits.py'), '--runlocal', '--steps', '2',
                         '--samples', '16', '--nfe', '2', '--root', str(tmp_path / 'runs'), '--out', str(out)],
                        capture_output=True, text=True, timeout=900, check=False, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [line for line in out.read_text().splitlines() if line.startswith(('| v-prediction', '| flow'))]
  assert len(rows) == 2 + 5  # two training rows, then the default's 2 samplers and the flow model's 3
  assert 'nan' not in out.read_text().lower()
