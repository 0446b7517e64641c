"""The README's run command: the sampler benchmark runs end to end and prints its tables."""

import pathlib
import subprocess
import sys

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
