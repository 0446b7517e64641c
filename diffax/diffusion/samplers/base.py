"""What every sampler shares: the output type, time grids and the ``lax.scan`` loop.

Every sampler takes a :class:`diffax.diffusion.parameterization.Denoiser` (the model, its schedule and
parameterisation, optional clipping), an rng and a shape, and otherwise only its own algorithm's knobs plus
``t_start, x_T, inpaint, return_trajectory``. Conventions (all samplers):
  * Time runs backwards over a grid ``ts`` [num_steps + 1] from ``t_start`` (default ``schedule.t_max``; for
    the log-SNR and Karras grids no noisier than :data:`LOG_SNR_START`, :func:`default_start`) down to the
    sentinel ``t = 0``, which means *clean data* (``alpha = 1, sigma = 0``) for every schedule
    (:func:`alpha_sigma_clean`). A step whose target is ``t = 0`` jumps to the x0-prediction unless a
    sampler says otherwise.
  * No clipping of the x0-prediction happens unless the denoiser's ``clip_x0`` is set; data outside [-1, 1]
    survives.
  * ``x_T`` replaces the prior draw (same start for two samplers or two libraries); ``return_trajectory``
    adds ``x`` at every grid time, ``x_T`` first: [num_steps + 1, *shape].
  * ``inpaint`` keeps known pixels: after every step they are replaced by a fresh draw of the forward
    marginal of the known image at the new time (Lugmayr et al. 2022, "RePaint", eq. 8 without
    resampling jumps), and by the known image itself at the end.
  * The whole loop is one ``jax.lax.scan``; ``nfe`` counts model evaluations (a classifier-free guided call
    counts once).
  * Precision follows ``x_T``: a float64 ``x_T`` (under ``jax_enable_x64``) runs the grid, the loop state, the
    schedule and the parameterisation in float64 (:func:`diffax.diffusion.schedules.float_dtype`), so closed-form
    checks can go below float32 rounding; everything else (no ``x_T``, float32, bfloat16) runs in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.diffusion.samplers import grid_file
from diffax.diffusion.schedules import EDM, DiscreteSchedule, Schedule, expand_like, float_dtype

Array = jax.Array
SPACINGS = ('trailing', 'leading', 'linspace', 'log_snr', 'karras')
CONVENTIONS = ('ddim', 'multistep')
Spacing = str | os.PathLike | Sequence[float] | np.ndarray | Array
"""A named spacing of ``SPACINGS``, the path of a grid file (``*.json``, :mod:`grid_file`) or the times
[num_steps + 1] themselves (:func:`given_grid`)."""
LOG_SNR_START = -2.0 * math.log(80.0)
"""The noisiest log-SNR (-8.76) the ``'log_snr'`` and ``'karras'`` grids start from by default: EDM's
``sigma_max = 80`` (Karras et al. 2022, sec. 5 and Table 1), where ``x_t`` keeps 1.2 % of the data's scale (the
prior is drawn at that noise level, :func:`initial_x`).
Schedules that reach far lower log-SNRs at ``t_max`` would otherwise spend a few-step grid's first steps on pure
noise: the cosine schedule's log-SNR is -19.8 at ``t = 1`` and -8.76 at ``t = 0.986``, and starting there cuts the
digits default's 5-NFE digits_fd from 23.0 to 9.7 (DPM-Solver++), 22.6 to 9.5 (UniPC), 18.4 to 9.6 (DEIS) and
15.2 to 9.0 (iPNDM), with 10-NFE scores 7.4-7.7 against 7.5-8.5 (``experiments/results/few_step_digits.md``).
On LinearSchedule (-10.1 at ``t_max``) the exact-mixture errors change little (within the noise at 10-100 NFE,
``experiments/results/sampler_accuracy_few_step.md``). DPM-Solver's own cosine setting, ``T = 0.9946``
(Lu et al. 2022, app. D.1), starts near -9.5 for the same reason. An explicit ``t_start`` is used as given."""


@flax.struct.dataclass
class SampleOutput:
  """``samples`` [*shape] float32 (float64 for a float64 ``x_T``); ``nfe`` model evaluations; ``trajectory``
  [num_steps + 1, *shape] or None."""

  samples: Array
  nfe: Array | int
  trajectory: Array | None = None


@flax.struct.dataclass
class Inpaint:
  """Known pixels ``x_known`` [*shape] where ``mask`` (broadcastable to ``x_known``) is 1."""

  x_known: Array
  mask: Array

  def project(self, schedule: Schedule, x: Array, t: Array, rng: Array) -> Array:
    """Replaces known pixels of ``x`` (at time ``t``) by ``alpha_t x_known + sigma_t z``."""
    alpha_t, sigma_t = alpha_sigma_clean(schedule, t)
    noised = alpha_t * self.x_known + sigma_t * jax.random.normal(rng, x.shape, x.dtype)
    return jnp.where(self.mask > 0, noised, x)


def alpha_sigma_clean(schedule: Schedule, t: Array) -> tuple[Array, Array]:
  """``schedule.alpha_sigma(t)``, except that ``t <= 0`` means clean data: ``(1, 0)``; in ``t``'s precision."""
  t = jnp.asarray(t, float_dtype(t))
  alpha_t, sigma_t = schedule.alpha_sigma(jnp.maximum(t, schedule.t_min))
  clean = t <= 0
  return jnp.where(clean, 1.0, alpha_t), jnp.where(clean, 0.0, sigma_t)


def is_given(spacing: Spacing) -> bool:
  """Whether ``spacing`` is a grid given as data (a grid file's path or the times) rather than a name."""
  return not isinstance(spacing, str) or grid_file.is_grid_path(spacing)


def check_grid(times, num_steps: int, *, ends_at_zero: bool, t_start: float | None = None) -> np.ndarray:
  """``times`` (float64 [num_steps + 1]) if they are a grid (:func:`grid_file.check_times`) for a sampler of
  ``num_steps`` steps whose last step goes to ``t = 0`` (``ends_at_zero``) or stops at a time ``> 0``
  (``denoise_to_zero=False``), starting at ``t_start`` where one is given; else a ``ValueError`` saying what to set.
  """
  ts = grid_file.check_times(times)
  if ts.shape[0] != num_steps + 1:
    raise ValueError(f'the grid holds {ts.shape[0]} times, i.e. {ts.shape[0] - 1} steps, but num_steps={num_steps}; '
                     f'set num_steps={ts.shape[0] - 1}.')
  if ends_at_zero and ts[-1] != 0:
    raise ValueError(f'the grid ends {grid_file.describe_end(ts[-1])} but the sampler\'s last step goes to t = 0 '
                     '(denoise_to_zero=True where the sampler has it); set denoise_to_zero=False or end the grid '
                     'with 0.')
  if not ends_at_zero and ts[-1] == 0:
    raise ValueError('the grid ends at t = 0 (the jump to the x0-prediction) but the sampler runs with '
                     'denoise_to_zero=False; set denoise_to_zero=True or end the grid at t_min.')
  if t_start is not None and not np.isclose(t_start, ts[0], rtol=1e-6, atol=0.0):
    raise ValueError(f't_start={t_start} differs from the grid\'s first time {ts[0]}; a grid given as data '
                     'sets its own start (leave t_start unset or make it the first time).')
  return ts


def given_grid(schedule: Schedule, spacing: Spacing, num_steps: int, *, ends_at_zero: bool,
               t_start: float | None = None, dtype: jnp.dtype = jnp.float32) -> Array:
  """The grid [num_steps + 1] given as data: the times of a grid file (``spacing`` a ``*.json`` path,
  :func:`grid_file.load_grid`) or ``spacing`` itself, checked by :func:`check_grid` and against the schedule's
  ``[t_min, t_max]`` (a final 0 aside). Traced times (a grid being optimised, :mod:`grid_search`) are checked
  for their shape only. Returned as ``dtype``.
  """
  times = grid_file.load_grid(spacing) if grid_file.is_grid_path(spacing) else spacing
  if isinstance(times, jax.core.Tracer):
    if times.shape != (num_steps + 1,):
      raise ValueError(f'a grid of {num_steps} steps has shape ({num_steps + 1},), got {times.shape}.')
    return jnp.asarray(times, dtype)
  ts = check_grid(times, num_steps, ends_at_zero=ends_at_zero, t_start=t_start)
  inner = ts[:-1] if ts[-1] == 0 else ts
  lo, hi = np.float32(schedule.t_min), np.float32(schedule.t_max)
  if np.any(inner < lo * (1 - 1e-6)) or np.any(inner > hi * (1 + 1e-6)):
    raise ValueError(f'grid times {ts.tolist()} leave the schedule\'s [t_min, t_max] = [{schedule.t_min}, '
                     f'{schedule.t_max}] (only a final 0, the clean sentinel, may lie below t_min).')
  return jnp.asarray(ts, dtype)


def time_grid(schedule: Schedule, num_steps: int, spacing: Spacing = 'trailing', *, t_start: float | None = None,
              t_end: float | None = None, rho: float | None = None, convention: str = 'ddim',
              dtype: jnp.dtype = jnp.float32) -> Array:
  """Descending model-evaluation times [num_steps] followed by the clean sentinel 0: [num_steps + 1], ``dtype``.

  ``convention`` says which diffusers schedulers the names ``'linspace'`` and ``'leading'`` follow; the two
  families of diffusers disagree:
    * ``'ddim'`` (DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler): ``N`` points of the spacing.
    * ``'multistep'`` (DPMSolverMultistepScheduler, UniPCMultistepScheduler, DEISMultistepScheduler): ``N + 1``
      points of the spacing with the last one dropped, so that the final step, to the clean sentinel, starts
      from the second-to-last point instead of ``t_min``. On a discrete schedule the integer timesteps are
      computed as diffusers computes them (float64 ``numpy``, ``linspace(0, T - 1, N + 1).round()[::-1][:-1]``
      and ``arange(N + 1) * (T // (N + 1))`` reversed, less its last), so a diffusers DPM-Solver++ or UniPC
      config carries over literally. ``'trailing'`` and the log-SNR / Karras spacings are the same in both.

  Spacings (``t_start`` defaults to ``schedule.t_max``, for ``'log_snr'`` and ``'karras'`` to
  :func:`default_start`; ``t_end`` to ``schedule.t_min``):
    * ``'trailing'``: ``t_start (1 - i / N)``; starts at ``t_start`` and ends at ``t_start / N``. For a
      discrete schedule with ``t_start = 1`` these are the knots ``T - 1, T - 1 - T/N, ...`` (diffusers'
      "trailing", Lin et al. 2024 "Common Diffusion Noise Schedules ... are Flawed", Table 2).
    * ``'leading'``: discrete schedules only; indices ``(N - 1 - i) * (T // N)``, never visiting ``T - 1``
      (DDIM's and Stable Diffusion's original choice).
    * ``'linspace'``: uniform from ``t_start`` to ``t_end`` inclusive (score-SDE samplers, iDDPM
      respacing); on a discrete schedule rounded to knots.
    * ``'log_snr'``: uniform in log-SNR between ``t_start`` and ``t_end`` (DPM-Solver, Lu et al. 2022).
    * ``'karras'``: EDM eq. 5 in ``sigma_t / alpha_t`` between the two ends, with ``rho`` defaulting to the
      EDM schedule's own ``rho`` (7 for every other schedule).
    * a grid given as data (a grid file's path or the times [num_steps + 1], e.g. one optimised for a model by
      :func:`grid_search.optimize_grid`): :func:`given_grid`; it must end with the clean sentinel 0.
  """
  if is_given(spacing):
    if t_end is not None:
      raise ValueError('t_end does not apply to a grid given as data: its times are the grid.')
    return given_grid(schedule, spacing, num_steps, ends_at_zero=True, t_start=t_start, dtype=dtype)
  if spacing not in SPACINGS:
    raise ValueError(f'Unknown spacing {spacing!r}; choose one of {SPACINGS}, a grid file (*.json) or the times.')
  if convention not in CONVENTIONS:
    raise ValueError(f'Unknown grid convention {convention!r}; choose one of {CONVENTIONS}.')
  if convention == 'multistep' and spacing in ('linspace', 'leading'):
    if isinstance(schedule, DiscreteSchedule):
      return _diffusers_multistep_grid(schedule, num_steps, spacing, t_start, dtype)
    return time_grid(schedule, num_steps + 1, spacing, t_start=t_start, t_end=t_end,
                     dtype=dtype).at[-2].set(0.0)[:-1]
  if t_end is not None and t_end < schedule.t_min:
    raise ValueError(f't_end={t_end} lies below the schedule\'s t_min={schedule.t_min}; the model is only '
                     'defined from t_min on (the final step to t = 0 is the jump to the x0-prediction).')
  if t_start is None:
    t_start = default_start(schedule, dtype) if spacing in ('log_snr', 'karras') else schedule.t_max
  t_end = schedule.t_min if t_end is None else t_end
  i = jnp.arange(num_steps, dtype=dtype)
  discrete = isinstance(schedule, DiscreteSchedule)
  if discrete and spacing in ('trailing', 'leading', 'linspace'):
    knots = round(t_start * schedule.num_timesteps)
    if num_steps > knots:
      raise ValueError(f'{num_steps} steps from t_start={t_start} would repeat timesteps of a discrete schedule: '
                       f'at most {knots} knots lie at or below it; use num_steps <= {knots}.')
  if spacing == 'trailing':
    ts = t_start * (1.0 - i / num_steps)
  elif spacing == 'leading':
    if not discrete:
      raise ValueError("spacing='leading' is defined for discrete schedules only; use 'linspace'.")
    big_t = round(t_start * schedule.num_timesteps)
    ts = ((num_steps - 1 - i) * (big_t // num_steps) + 1) / schedule.num_timesteps
  elif spacing == 'linspace':
    ts = jnp.linspace(t_start, t_end, num_steps, dtype=dtype)
  else:
    lam_start = schedule.log_snr(jnp.asarray(t_start, dtype))
    lam_end = schedule.log_snr(jnp.asarray(t_end, dtype))
    if spacing == 'log_snr':
      lam = lam_start + (lam_end - lam_start) * i / max(num_steps - 1, 1)
    else:
      if rho is None:
        rho = schedule.rho if isinstance(schedule, EDM) else 7.0
      s_hi, s_lo = jnp.exp(-0.5 * lam_start), jnp.exp(-0.5 * lam_end)
      frac = i / max(num_steps - 1, 1)
      lam = -2.0 * rho * jnp.log(s_hi**(1 / rho) + frac * (s_lo**(1 / rho) - s_hi**(1 / rho)))
    ts = schedule.t_from_log_snr(lam).at[0].set(t_start).at[-1].set(t_end)
  if discrete and spacing in ('trailing', 'linspace'):
    ts = jnp.round(ts * schedule.num_timesteps) / schedule.num_timesteps
  return jnp.append(ts, jnp.zeros((1,), dtype))


def default_start(schedule: Schedule, dtype: jnp.dtype = jnp.float32) -> Array:
  """The start [] of the ``'log_snr'`` and ``'karras'`` grids: ``schedule.t_max``, or the time where the log-SNR
  is :data:`LOG_SNR_START` if ``t_max`` is noisier than that (the cosine schedule, not VP, VE or EDM)."""
  t_max = jnp.asarray(schedule.t_max, dtype)
  noisier = schedule.log_snr(t_max) < LOG_SNR_START - 1e-3  # EDM's own t_max is LOG_SNR_START up to rounding
  return jnp.where(noisier, schedule.t_from_log_snr(jnp.asarray(LOG_SNR_START, dtype)), t_max)


def _diffusers_multistep_grid(schedule: DiscreteSchedule, num_steps: int, spacing: str, t_start: float | None,
                              dtype: jnp.dtype) -> Array:
  """``set_timesteps`` of diffusers' multistep schedulers for ``'linspace'`` / ``'leading'`` (``steps_offset = 0``),
  as times ``(n + 1) / T`` of the integer timesteps ``n``, then the clean sentinel: [num_steps + 1]."""
  big_t = round((schedule.t_max if t_start is None else t_start) * schedule.num_timesteps)
  if num_steps > big_t:
    raise ValueError(f'{num_steps} steps would repeat timesteps of a discrete schedule: at most {big_t} knots '
                     f'lie at or below t_start; use num_steps <= {big_t}.')
  if spacing == 'linspace':
    n = np.linspace(0, big_t - 1, num_steps + 1).round()[::-1][:-1]
  else:
    n = (np.arange(0, num_steps + 1) * (big_t // (num_steps + 1))).round()[::-1][:-1]
  ts = (n.astype(np.int64) + 1) / schedule.num_timesteps
  return jnp.asarray(np.append(ts, 0.0), dtype)


def solver_grid(schedule: Schedule, num_steps: int, spacing: Spacing, *, denoise_to_zero: bool,
                t_start: float | None = None, convention: str = 'multistep', dtype: jnp.dtype = jnp.float32) -> Array:
  """The grid [num_steps + 1] of a solver that makes ``num_steps`` steps, the last to ``0`` or to ``t_min``.

  ``denoise_to_zero=True``: :func:`time_grid` itself; the last step, to the clean sentinel, is the jump to the
  x0-prediction (diffusers' ``final_sigmas_type='zero'``). ``False``: the last step ends at ``t_min`` instead.
  For spacings whose points end at ``t_min`` (``'log_snr'``, ``'karras'`` and DDIM's ``'linspace'``) that is the
  spacing's grid of ``num_steps + 1`` points; for the others (``'trailing'``, ``'leading'`` and the multistep
  ``'linspace'``) it is their ``num_steps`` points followed by ``t_min`` (diffusers' ``final_sigmas_type=
  'sigma_min'``). A grid given as data (:func:`given_grid`) must end at 0 for ``denoise_to_zero=True`` and above 0
  otherwise.
  """
  if is_given(spacing):
    return given_grid(schedule, spacing, num_steps, ends_at_zero=denoise_to_zero, t_start=t_start, dtype=dtype)
  if denoise_to_zero:
    return time_grid(schedule, num_steps, spacing, t_start=t_start, convention=convention, dtype=dtype)
  ends_at_t_min = spacing in ('log_snr', 'karras') or (spacing == 'linspace' and convention == 'ddim')
  if ends_at_t_min:
    return time_grid(schedule, num_steps + 1, spacing, t_start=t_start, convention=convention, dtype=dtype)[:-1]
  ts = time_grid(schedule, num_steps, spacing, t_start=t_start, convention=convention, dtype=dtype)
  return ts.at[-1].set(schedule.t_min)


Step = Callable[[Array, object, Array, Array, Array], tuple[Array, object]]
"""``step(x, state, t_cur, t_next, rng) -> (x_next, state)``; ``state`` is any sampler-specific pytree."""


def initial_x(schedule: Schedule, rng: Array, shape: tuple[int, ...], x_T: Array | None,
              t_start: Array | float | None = None) -> tuple[Array, Array]:
  """The start ``x`` (``x_T`` if given, shape-checked, in ``float_dtype(x_T)``, else a float32 prior
  draw) and the rng left for the sampler's loop.

  A grid that starts at ``t_start`` before ``t_max`` (:func:`default_start`) draws the prior at its own noise
  level, scaled by ``sigma(t_start) / sigma(t_max)``: the same draw for VP schedules (both sigmas are 1 to 1e-4),
  ``N(0, 80^2)`` instead of ``N(0, sigma_max^2)`` for a VE schedule of larger ``sigma_max``.
  """
  rng_init, rng_loop = jax.random.split(rng)
  if x_T is None:
    x = schedule.prior_sample(rng_init, tuple(shape))
    if t_start is None:
      return x, rng_loop
    sigma_start = schedule.alpha_sigma(jnp.asarray(t_start, jnp.float32))[1]
    sigma_max = schedule.alpha_sigma(jnp.asarray(schedule.t_max, jnp.float32))[1]
    return x * (sigma_start / sigma_max), rng_loop
  if tuple(x_T.shape) != tuple(shape):
    raise ValueError(f'x_T has shape {x_T.shape}, expected {tuple(shape)}.')
  return jnp.asarray(x_T, float_dtype(x_T)), rng_loop


def run(step: Step, rng: Array, shape: Sequence[int], ts: Array, *, schedule: Schedule, nfe: Array | int,
        state: object = None, x_T: Array | None = None, inpaint: Inpaint | None = None,
        return_trajectory: bool = False) -> SampleOutput:
  """Draws (or takes) the start ``x`` [*shape] and runs ``step`` over consecutive pairs of ``ts`` [N + 1] in
  one ``lax.scan``: the loop every grid sampler shares.

  ``state`` is the sampler's initial loop state; ``nfe`` the model evaluations the sampler makes. The
  trajectory, if asked, is [N + 1, *shape] (``x`` first).
  """
  x, rng = initial_x(schedule, rng, tuple(shape), x_T, t_start=ts[0])

  def body(carry, inputs):
    x, state = carry
    t_cur, t_next, key = inputs
    key_step, key_inpaint = jax.random.split(key)
    x, state = step(x, state, t_cur, t_next, key_step)
    if inpaint is not None:
      x = inpaint.project(schedule, x, t_next, key_inpaint)
    return (x, state), (x if return_trajectory else None)

  if inpaint is not None:
    x = inpaint.project(schedule, x, ts[0], jax.random.fold_in(rng, ts.shape[0]))
  x0 = x
  keys = jax.random.split(rng, ts.shape[0] - 1)
  (x, _), trajectory = jax.lax.scan(body, (x, state), (ts[:-1], ts[1:], keys))
  if inpaint is not None:
    x = jnp.where(inpaint.mask > 0, inpaint.x_known, x)
  if return_trajectory:  # its last entry is the returned x (the known pixels themselves, not their noised draw)
    trajectory = jnp.concatenate([x0[None], trajectory[:-1], x[None]], axis=0)
  return SampleOutput(samples=x, nfe=nfe, trajectory=trajectory)
