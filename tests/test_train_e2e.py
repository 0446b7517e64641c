"""The real ``python -m diffax.main`` on the digits test config: outputs, exact resume, pre-emption, errors."""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from diffax.trainer import events
import trainer_runs


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """One finished 6-step run (checkpoints every 2 steps), shared by the tests that only read it."""
  workdir = tmp_path_factory.mktemp('digits')
  proc = trainer_runs.run_main(os.path.relpath(workdir, trainer_runs.REPO), 'train.log_every=1')  # as users type
  (workdir / 'console.txt').write_text(proc.stdout + '\n=== stderr\n' + proc.stderr)
  return workdir


def test_console_shows_progress_and_a_summary_and_the_log_file_the_rest(trained):
  """Not a terminal: one plain progress line per logged step, then where the results are; INFO records (CLU's
  metric lines, Orbax, the trainer's own) are in WORKDIR/diffax.log and not on the console."""
  stdout, stderr = (trained / 'console.txt').read_text().split('\n=== stderr\n')
  progress = [l for l in stdout.splitlines() if l.startswith('step ')]
  assert [l.split()[1] for l in progress] == [f'{n}/6' for n in range(1, 7)]
  assert all(' loss ' in l for l in progress) and 'img/s' in progress[-1] and 'ETA' in progress[-1]
  assert 'Stopped at step 6 of 6' in stdout and f'{trained / "checkpoints"} (steps [2, 4, 6])' in stdout
  assert str(trained / 'samples' / 'step_00000006.png') in stdout
  log = (trained / 'diffax.log').read_text()
  assert 'Process 0 of 1' in log and 'train/loss' in log  # CLU's console writer logs the scalars at INFO
  assert 'train/loss' not in stdout + stderr and 'Process 0 of 1' not in stderr


def test_train_writes_checkpoints_metrics_and_samples(trained):
  steps = sorted(int(p.name) for p in (trained / 'checkpoints').iterdir())
  assert steps == [2, 4, 6]  # keep_checkpoints = 3 of every 2 steps
  scalars = events.read_scalars(trained)
  assert [s for s, _ in scalars['train/loss']] == list(range(1, 7))
  for tag in ('train/grad_norm', 'train/learning_rate', 'perf/images_per_second', 'perf/steps_per_second',
              'perf/host_ms_per_step', 'train/loss_bucket_0'):
    assert tag in scalars and all(np.isfinite(v) for _, v in scalars[tag]), tag
  lr = dict(scalars['train/learning_rate'])
  assert lr[1] == pytest.approx(0.0) and lr[2] == pytest.approx(5e-4)  # linear warm-up over 2 updates to 1e-3
  assert (trained / 'samples' / 'step_00000006.png').exists()


def test_sample_and_eval_modes(trained):
  trainer_runs.run_main(trained, mode='sample')
  with np.load(trained / 'samples' / 'samples_step_00000006.npz') as f:
    assert f['images'].shape == (16, 8, 8, 1) and f['images'].dtype == np.uint8
    np.testing.assert_array_equal(f['labels'], np.arange(16) % 10)
  trainer_runs.run_main(trained, mode='eval')
  result = json.loads((trained / 'eval' / 'step_00000006_dpm_solver-4_w1.json').read_text())
  assert result['step'] == 6
  assert set(result['metrics']) == {'digits_fd', 'digits_accuracy', 'digits_confidence'}
  protocol = result['protocol']
  assert protocol['num_samples'] == 32 and protocol['sampler'] == 'dpm_solver' and protocol['nfe'] == 4
  assert protocol['classifier_test_accuracy'] >= 0.95
  assert protocol['ema_decay'] == 0.999 and protocol['guidance_scale'] == 1.0


def _losses(workdir):
  return dict(events.read_scalars(workdir)['train/loss'])


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
  """Killed (SIGKILL) mid-run and resumed, the run continues exactly as one that was never interrupted."""
  overrides = ('train.num_steps=24', 'train.checkpoint_every=4', 'train.log_every=1', 'train.keep_checkpoints=10')
  straight = tmp_path / 'straight'
  trainer_runs.run_main(straight, *overrides)

  killed = tmp_path / 'killed'
  proc = subprocess.Popen(trainer_runs.main_command(killed, *(f'{o}' for o in overrides)),
                          env=trainer_runs.env_with(1), cwd=trainer_runs.REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while not (killed / 'checkpoints' / '8').exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  finished = sorted(int(p.name) for p in (killed / 'checkpoints').iterdir() if p.name.isdigit())
  assert 24 not in finished, 'the run finished before it was killed; the test proves nothing'
  trainer_runs.run_main(killed, *overrides)

  step_a, params_a = trainer_runs.final_params(straight, *overrides)
  step_b, params_b = trainer_runs.final_params(killed, *overrides)
  assert step_a == step_b == 24
  np.testing.assert_array_equal(params_a, params_b)  # bit for bit
  assert _losses(killed) == _losses(straight)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  overrides = ('train.num_steps=100000', 'train.checkpoint_every=1000', 'train.log_every=1')
  proc = subprocess.Popen(trainer_runs.main_command(tmp_path, *overrides), env=trainer_runs.env_with(1),
                          cwd=trainer_runs.REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not list(tmp_path.glob('events.out.tfevents.*')) and time.time() < deadline:  # written at the first log
    time.sleep(0.05)
  time.sleep(1.0)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, trainer_runs.failure_excerpt(stderr)
  steps = [int(p.name) for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and 0 < steps[0] < 1000  # saved at the step it was stopped, not on the schedule
  assert 'SIGTERM' in stderr


def test_config_errors_name_the_key(tmp_path):
  proc = trainer_runs.run_main(tmp_path, 'optim.learning_rat=1e-3', check=False)
  assert proc.returncode != 0 and 'learning_rat' in proc.stderr
  proc = trainer_runs.run_main(tmp_path, 'sample.guidance_scale=2.0', 'data.num_classes=0', check=False)
  assert proc.returncode != 0 and 'config.sample.guidance_scale' in proc.stderr
  assert not (tmp_path / 'checkpoints').exists() or not any((tmp_path / 'checkpoints').iterdir())
