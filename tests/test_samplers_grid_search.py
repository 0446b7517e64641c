"""Optimised time grids (``grid_search.optimize_grid``) on the exact ring mixture, and grids stored as data: the
JSON file format, the samplers' ``spacing=`` for times and files, and ``sample.spacing`` in a trainer config."""

import functools
import json

import jax
import numpy as np
import pytest

from diffax.diffusion import schedules
from diffax.diffusion.samplers import base, ddim, dpm_solver, grid_file, grid_search, unipc
from diffax.testing import mixtures
from diffax.trainer import components
from diffax.trainer import config as config_lib

RING = mixtures.ring_mixture()
LINEAR = schedules.LinearSchedule()
DENOISER = RING.denoiser(LINEAR)
SAMPLERS = {'unipc': unipc.unipc_sample,
            'dpm_solver': functools.partial(dpm_solver.dpm_solver_sample, denoise_to_zero=True)}


@functools.cache
def optimised(sampler: str, num_steps: int) -> np.ndarray:
  """A short search (calibration batch 128, 40 Adam steps) for the sampler's defaults."""
  ts = grid_search.optimize_grid(DENOISER, SAMPLERS[sampler], jax.random.PRNGKey(5), (128, 2), num_steps=num_steps,
                                 iterations=40, learning_rate=0.1)
  return np.asarray(ts)


@functools.cache
def held_out(to_zero: bool) -> tuple[jax.Array, jax.Array]:
  """Starts [512, 2] unseen by the search and their reference endpoints."""
  x_T = LINEAR.prior_sample(jax.random.PRNGKey(9), (512, 2))
  return x_T, grid_search.reference_solve(DENOISER, x_T, to_zero=to_zero)


@pytest.mark.parametrize('sampler', ['unipc', 'dpm_solver'])
def test_optimised_grid_beats_time_uniform_and_log_snr_grids(sampler):
  """5 steps, UniPC's defaults (it stops at t_min) and DPM-Solver++ with the jump to x0: on starts the search never
  saw, the mean squared error against the reference solve is well below that of the log-SNR grid (the search's
  start), the Karras grid and diffusers' time-uniform grids, all from the same start. Measured: UniPC 1.9e-3
  against 9.9e-3 (log-SNR), 1.2e-2 (Karras), 4.9e-2 (linspace); DPM-Solver++(2M) 3.5e-3 against 1.1e-2, 6.0e-2,
  5.3e-2."""
  fn = SAMPLERS[sampler]
  to_zero = grid_search.ends_at_zero(fn)
  ts = optimised(sampler, 5)
  start = float(base.default_start(LINEAR))  # where the log-SNR grid, the search's start, begins
  assert ts.shape == (6,) and ts[0] == start and (ts[-1] == 0) == to_zero and np.all(np.diff(ts) < 0)
  x_T, reference = held_out(to_zero)
  error = lambda spacing: float(grid_search.grid_error(DENOISER, fn, spacing, x_T, reference, num_steps=5,
                                                       sampler_kwargs={'t_start': start}))
  e_opt = error(ts)
  for spacing in ('log_snr', 'linspace', 'trailing', 'karras'):
    assert e_opt < 0.5 * error(spacing), (spacing, e_opt, error(spacing))


def test_zero_logits_are_the_log_snr_grid():
  """The search starts at the log-SNR-uniform grid: theta = 0 is ``time_grid(..., 'log_snr')`` ending at t_min."""
  ts = grid_search.grid_from_logits(DENOISER, np.zeros(6, np.float32), to_zero=False)
  expected = base.solver_grid(LINEAR, 6, 'log_snr', denoise_to_zero=False)
  np.testing.assert_allclose(ts, expected, rtol=1e-5)


def test_grid_file_round_trips_and_samples_as_the_times(tmp_path):
  ts = optimised('unipc', 5)
  path = tmp_path / 'unipc_5.json'
  grid_file.save_grid(path, ts, sampler='unipc', schedule='LinearSchedule')
  loaded = grid_file.load_grid(path)
  np.testing.assert_array_equal(loaded, ts.astype(np.float64))  # exact: JSON holds the float64 repr
  assert json.loads(path.read_text())['metadata'] == {'sampler': 'unipc', 'schedule': 'LinearSchedule'}
  x_T, _ = held_out(False)
  run = lambda spacing: unipc.unipc_sample(DENOISER, jax.random.PRNGKey(0), x_T.shape, num_steps=5, spacing=spacing,
                                           x_T=x_T).samples
  np.testing.assert_array_equal(run(str(path)), run(ts))


def _write(path, **record):
  path.write_text(json.dumps({'format': grid_file.FORMAT, 'version': 1, 'num_steps': 2,
                              'times': [1.0, 0.5, 0.0], **record}))
  return str(path)


@pytest.mark.parametrize('record, message', [
    ({'format': 'other'}, 'not a time grid'),
    ({'version': 7}, 'version 7 is not supported'),
    ({'times': [1.0, 'a', 0.0]}, 'list of numbers'),
    ({'times': [1.0, 0.5, 0.7]}, 'strictly decrease'),
    ({'times': [1.0, 0.5, -0.1]}, '>= 0'),
    ({'num_steps': 3}, '"num_steps" is 3 but "times" holds 3 times'),
])
def test_a_bad_grid_file_names_itself_and_the_fault(tmp_path, record, message):
  path = _write(tmp_path / 'bad.json', **record)
  with pytest.raises(grid_file.GridFileError, match=message) as info:
    grid_file.load_grid(path)
  assert path in str(info.value)


def test_unreadable_grid_files(tmp_path):
  with pytest.raises(grid_file.GridFileError, match='no such file'):
    grid_file.load_grid(tmp_path / 'missing.json')
  (tmp_path / 'broken.json').write_text('{"format": ')
  with pytest.raises(grid_file.GridFileError, match='not readable as JSON'):
    grid_file.load_grid(tmp_path / 'broken.json')
  with pytest.raises(ValueError, match="ends in '.json'"):
    grid_file.save_grid(tmp_path / 'grid.npz', [1.0, 0.0])


def test_a_given_grid_must_fit_the_sampler(tmp_path):
  """Steps, final step, start and the schedule's range are checked, each error saying what to set."""
  shape = (4, 2)
  path = _write(tmp_path / 'two.json')  # [1, 0.5, 0]: two steps ending with the jump to x0
  with pytest.raises(ValueError, match='set num_steps=2'):
    dpm_solver.dpm_solver_sample(DENOISER, jax.random.PRNGKey(0), shape, num_steps=3, spacing=path)
  with pytest.raises(ValueError, match='set denoise_to_zero=True'):
    unipc.unipc_sample(DENOISER, jax.random.PRNGKey(0), shape, num_steps=2, spacing=path)
  with pytest.raises(ValueError, match='set denoise_to_zero=False'):
    dpm_solver.dpm_solver_sample(DENOISER, jax.random.PRNGKey(0), shape, num_steps=2, spacing=[1.0, 0.5, 0.001],
                                 denoise_to_zero=True)
  with pytest.raises(ValueError, match="t_start=0.8 differs from the grid's first time"):
    ddim.ddim_sample(DENOISER, jax.random.PRNGKey(0), shape, num_steps=2, spacing=path, t_start=0.8)
  with pytest.raises(ValueError, match=r"leave the schedule's \[t_min, t_max\]"):
    ddim.ddim_sample(DENOISER, jax.random.PRNGKey(0), shape, num_steps=2, spacing=[1.0, 0.0005, 0.0])
  with pytest.raises(ValueError, match=r"a grid file \(\*.json\) or the times"):
    ddim.ddim_sample(DENOISER, jax.random.PRNGKey(0), shape, num_steps=2, spacing='log-snr')
  out = ddim.ddim_sample(DENOISER, jax.random.PRNGKey(0), shape, num_steps=2, spacing=path)
  ref = ddim.ddim_sample(DENOISER, jax.random.PRNGKey(0), shape, num_steps=2, spacing=np.array([1.0, 0.5, 0.0]))
  np.testing.assert_array_equal(out.samples, ref.samples)


def test_trainer_config_takes_a_grid_file(tmp_path):
  """``sample.spacing`` names the file; the kwargs that run (and are recorded) hold its path, and a file that is
  unreadable or does not fit ``sample.num_steps`` is a ConfigError naming the key."""
  path = _write(tmp_path / 'two.json')
  c = config_lib.default_config()
  c.sample.sampler, c.sample.num_steps, c.sample.spacing = 'dpm_solver', 2, path
  c.sample.kwargs.denoise_to_zero = True
  assert components.sampler_kwargs(c)['spacing'] == path
  c.sample.num_steps = 3
  with pytest.raises(config_lib.ConfigError, match='sample.spacing: .*set num_steps=2'):
    components.sampler_kwargs(c)
  c.sample.num_steps, c.sample.spacing = 2, str(tmp_path / 'missing.json')
  with pytest.raises(config_lib.ConfigError, match='sample.spacing: .*no such file'):
    components.sampler_kwargs(c)
  c.sample.spacing, c.sample.sampler, c.sample.kwargs = path, 'unipc', {}  # UniPC stops at t_min by default
  with pytest.raises(config_lib.ConfigError, match='set denoise_to_zero=True'):
    components.sampler_kwargs(c)
  c.sample.kwargs.denoise_to_zero = True
  assert components.sampler_kwargs(c)['denoise_to_zero'] is True
