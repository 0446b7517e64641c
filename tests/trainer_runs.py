"""Running the real ``python -m diffax.main`` in subprocesses, and reading back what a run left in its workdir."""

from __future__ import annotations

import fcntl
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DIGITS_TEST = f'{REPO}/configs/digits.py:runlocal'
# No warm-up: the first update moves the zero-initialised conv_out, the second the resblocks' conv_1, so every
# parameter of the 2-step base (and so the label embedding's path to the output) carries a gradient.
BASE_OVERRIDES = ('train.num_steps=2', 'train.checkpoint_every=2', 'optim.warmup_steps=0', 'sample.num_samples=8',
                  'eval.batch_size=8')


def main_command(workdir, *overrides: str, mode: str = 'train', config: str = DIGITS_TEST) -> list[str]:
  return [sys.executable, '-m', 'diffax.main', f'--config={config}', f'--workdir={workdir}', f'--mode={mode}',
          *(f'--config.{o}' for o in overrides)]


def env_with(devices: int = 1, **extra: str) -> dict[str, str]:
  """The test environment for a trainer subprocess on ``devices`` CPU devices.

  XLA's backend optimisation is turned off: these runs are tiny, so compiling dominates them, and level 0
  compiles several times faster. Runs compared with each other always share the flags.
  """
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0'
  env.update(extra)
  return env


def run_main(workdir, *overrides: str, mode: str = 'train', devices: int = 1, timeout: float = 600,
             check: bool = True, config: str = DIGITS_TEST) -> subprocess.CompletedProcess:
  proc = subprocess.run(main_command(workdir, *overrides, mode=mode, config=config), env=env_with(devices), cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode:
    raise AssertionError(f'main failed ({proc.returncode}):\n{failure_excerpt(proc.stderr)}')
  return proc


def shared_base(tmp_path_factory) -> pathlib.Path:
  """The workdir of one 2-step run of the digits test config (``BASE_OVERRIDES``) per test session, trained by
  whichever test (on any pytest-xdist worker) asks first, under a file lock; the fine-tuning and distillation
  tests start from it and check that it is only read."""
  basetemp = tmp_path_factory.getbasetemp()
  root = basetemp.parent if os.environ.get('PYTEST_XDIST_WORKER') else basetemp  # the session's, for all workers
  workdir, done = root / 'digits_base', root / 'digits_base.done'
  with open(root / 'digits_base.lock', 'w', encoding='utf-8') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(workdir, ignore_errors=True)  # a run that failed part way
      run_main(workdir, *BASE_OVERRIDES)
      done.touch()
  return workdir


def failure_excerpt(log: str, limit: int = 8000) -> str:
  """The end of a failed run's log without the parts a native crash floods it with (loaded-module lists and
  native stack frames), so the Python traceback and the first fatal message stay visible."""
  noise = ('Extension modules:', '    @ ')
  lines = [l for l in log.splitlines() if not any(n in l for n in noise)]
  return '\n'.join(lines)[-limit:]


def final_params(workdir, *overrides: str, step: int | None = None) -> tuple[int, np.ndarray]:
  """``(step, all parameters flattened)`` of a workdir's newest (or ``step``) checkpoint, on this process."""
  import jax  # pylint: disable=g-import-not-at-top
  from diffax.trainer import experiment  # pylint: disable=g-import-not-at-top

  exp = experiment.Experiment(load_test_config(*overrides), workdir)
  state = exp.checkpointer.restore(exp.abstract_state, step=step)
  exp.checkpointer.close()
  return int(state.step), np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.params)])


def load_test_config(*overrides: str, name: str = 'digits'):
  """``configs/<name>.py:runlocal`` (the digits test config by default) with ``key=value`` overrides applied as
  the command line would."""
  import ast  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location(f'{name}_config', REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('runlocal')
  values = {}
  for override in overrides:
    key, value = override.split('=', 1)
    try:
      values[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      values[key] = value
  config.update_from_flattened_dict(values)
  return config
