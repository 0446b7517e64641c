"""The same tiny run on 1 device, 8 local devices, and 2 processes x 2 devices gives the same training.

Only the reduction order differs between meshes (the batch mean and the gradient all-reduce), so losses agree
to float32 round-off and parameters after a few Adam steps to a small multiple of the learning rate's effect
on a round-off-sized gradient difference.
"""

import subprocess
import sys

import numpy as np
import pytest

from diffax.trainer import events
import trainer_runs

OVERRIDES = ('train.num_steps=4', 'train.checkpoint_every=4', 'train.log_every=1', 'train.sample_every=0')


@pytest.fixture(scope='module')
def single_device(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('one_device')
  trainer_runs.run_main(workdir, *OVERRIDES, devices=1)
  return workdir


def _assert_same_training(workdir, reference):
  losses = [v for _, v in events.read_scalars(workdir)['train/loss']]
  reference_losses = [v for _, v in events.read_scalars(reference)['train/loss']]
  np.testing.assert_allclose(losses, reference_losses, rtol=2e-5)
  step, params = trainer_runs.final_params(workdir, *OVERRIDES)
  reference_step, reference_params = trainer_runs.final_params(reference, *OVERRIDES)
  assert step == reference_step == 4
  np.testing.assert_allclose(params, reference_params, rtol=0, atol=2e-4)
  assert np.max(np.abs(params - reference_params)) < 0.05 * np.max(np.abs(reference_params))


def test_eight_devices_equal_one(single_device, tmp_path):
  """Data parallel over 8 local devices."""
  trainer_runs.run_main(tmp_path, *OVERRIDES, devices=8)
  _assert_same_training(tmp_path, single_device)


def test_two_processes_with_fsdp_equal_one(single_device, tmp_path):
  """2 processes x 2 devices started by ``launch/local.py`` (jax.distributed from its environment), on a 2-way
  data x 2-way FSDP mesh: parameters and optimizer state are split across processes by the logical-axis rules."""
  command = trainer_runs.main_command(tmp_path, *OVERRIDES, 'mesh.fsdp=2')
  proc = subprocess.run([sys.executable, str(trainer_runs.REPO / 'launch' / 'local.py'), '--num-processes', '2',
                         '--devices-per-process', '2', '--', *command], cwd=trainer_runs.REPO,
                        env=trainer_runs.env_with(1), capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, trainer_runs.failure_excerpt(proc.stdout)
  lines = proc.stdout.splitlines()
  for p in (0, 1):
    assert any(l.startswith(f'[p{p}] ') and f'Process {p} of 2, 2 local / 4 global devices' in l for l in lines)
  assert all(l.startswith(('[p0] ', '[p1] ')) for l in lines)
  _assert_same_training(tmp_path, single_device)


SKEWED_PROGRAM = '''
import os, time
import jax, numpy as np
jax.distributed.initialize(os.environ['JAX_COORDINATOR_ADDRESS'], 2, int(os.environ['JAX_PROCESS_ID']))
from diffax.trainer import sharding
mesh = sharding.make_mesh(fsdp=2)
x = sharding.global_batch(np.full((2,), 1.0 + jax.process_index(), np.float32), mesh)
if jax.process_index() == 1:
  time.sleep(40)  # a compile that takes 40 s longer than process 0's
total = sharding.compile_on_all_processes(jax.jit(lambda x: x.sum()), x, name='skewed')(x)
print('total', float(total))
'''


def test_compile_on_all_processes_survives_compile_skew(tmp_path):
  """CPU (gloo) collectives give up after 30 s when one process starts a new program later than the others;
  compiling through ``sharding.compile_on_all_processes`` lines the processes up before the first run."""
  script = tmp_path / 'skewed.py'
  script.write_text(SKEWED_PROGRAM)
  proc = subprocess.run([sys.executable, str(trainer_runs.REPO / 'launch' / 'local.py'), '--num-processes', '2',
                         '--devices-per-process', '2', '--', sys.executable, str(script)], cwd=trainer_runs.REPO,
                        env=trainer_runs.env_with(1), capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, trainer_runs.failure_excerpt(proc.stdout)
  assert sorted(l for l in proc.stdout.splitlines() if 'total' in l) == ['[p0] total 6.0', '[p1] total 6.0']
