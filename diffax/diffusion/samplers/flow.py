"""Samplers for velocity fields: Euler and Heun on the flow ODE, and SiT's SDE, on uniform or shifted grids.

A path ``x_t = alpha_t x_0 + sigma_t eps`` has the marginal velocity ``u(x, t) = E[alpha_dot_t x_0 + sigma_dot_t
eps | x_t = x]``, and the ODE

  dx / dt = u(x, t)                                                                                   (F)

(Lipman et al. 2023, "Flow Matching", eq. 1; Liu et al. 2023, "Rectified Flow", eq. 1) carries the prior at
``t = 1`` to the data at ``t = 0``. (F) is the probability-flow ODE of the schedule (Song et al. 2021, eq. 13)
written in ``t``: ``u = f(t) x - 1/2 g(t)^2 grad log p_t(x)``. The samplers read ``u`` from any
:class:`~diffax.diffusion.parameterization.Denoiser` as ``u = alpha_dot_t x0_hat + sigma_dot_t eps_hat`` (exact
for a ``'velocity'`` model, eq. (V) of :mod:`~diffax.diffusion.parameterization`), so they sample flow models and
diffusion models alike; the other samplers take a velocity model through the same conversions.

Time grid (:func:`flow_grid`): ``t_i = t_end + (t_start - t_end) shift_times(1 - i / N, shift)``, ``i = 0 .. N``,
from ``t_start`` (default ``schedule.t_max``) to ``t_end``: uniform in ``t`` for ``shift = 1`` (rectified flow),
moved towards noise for ``shift > 1`` (SD3 eq. 23 and sec. 5.3.2: shift 3 at 1024^2; Flux's ``exp(mu)``; see
:func:`diffax.diffusion.time_sampling.resolution_shift` and :func:`~diffax.diffusion.time_sampling.flux_shift`).

* :func:`flow_euler_sample`: ``x_{i+1} = x_i + (t_{i+1} - t_i) u(x_i, t_i)`` to ``t_N = 0``; ``N`` evaluations.
  On the linear path an Euler step is exactly a DDIM step, ``x_s = alpha_s x0_hat + sigma_s eps_hat``, and the
  last one (to ``t = 0``) is the x0-prediction.
* :func:`flow_heun_sample`: Heun's (trapezoidal) predictor-corrector, ``x_{i+1} = x_i + h (u(x_i, t_i) +
  u(x', t_{i+1})) / 2`` with the Euler predictor ``x'``; second order. The step to ``t = 0`` is an Euler step
  (on VP paths ``u`` is singular there), so ``2 N - 1`` evaluations, as EDM's Heun sampler.
* :func:`flow_sde_sample`: SiT's reverse-time SDE (Ma et al. 2024, "SiT", eq. 8)

    dx = [u(x, t) - 1/2 w_t s(x, t)] dt + sqrt(w_t) dW_bar,   s = grad log p_t = -eps_hat / sigma_t,     (S)

  which has the marginals of (F) for every diffusion coefficient ``w_t >= 0`` (Fokker-Planck). For a velocity
  model ``-eps_hat / sigma_t`` is SiT's score from the velocity, ``s = (alpha_t u - alpha_dot_t x) / (sigma_t
  (alpha_dot_t sigma_t - alpha_t sigma_dot_t))``. Euler-Maruyama steps over ``N`` grid times from ``t_start``
  to ``t_end`` (default ``t_min``), then the jump to the x0-prediction at ``t_end``; ``N`` evaluations. SiT ends
  at ``t_end = 0.04`` with a drift step ("Mean"); on data with fine structure either last step from there is
  visible: the jump removes ``Var[x_0 | x_t]`` (modes of std 0.1 come out 10-40% too narrow from 0.04), which at
  ``t_min`` is negligible. Steps must resolve the Langevin part of (S) where the score is stiff: near the data a
  mode of variance ``v`` has score Lipschitz ``L = 1 / v``, and Euler-Maruyama with step ``h`` holds it at
  variance ``v / (1 - h w_t L / 4)``. Forms with ``w_0 = 0`` (``'sigma'``, ``'sbdm'``, ...) are free of this;
  ``'constant'`` (``w = 2``) widens modes of std 0.1 by 25% in variance at 250 uniform steps (measured 26%), 11%
  at 500 and 5% at 1000.

``w_t`` is chosen by the user: a callable ``t -> w_t`` or a name of :data:`DIFFUSIONS`, SiT's
``diffusion_form`` with ``diffusion_norm`` (SiT's code holds ``D_t = w_t / 2`` and writes time from noise to
data; the names below give the same SDE in this module's time):

  ``'sigma'`` ``2 norm sigma_t`` (SiT's default), ``'sbdm'`` ``norm g(t)^2`` (with norm 1 the reverse SDE of the
  diffusion model, score-SDE eq. 6), ``'linear'`` ``2 norm t``, ``'constant'`` ``2 norm``, ``'decreasing'``
  ``(1 - norm cos(pi t))^2 / 2``, ``'increasing_decreasing'`` ``2 norm sin(pi t)^2``, ``'none'`` 0 (Euler on (F)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math

import jax
import jax.numpy as jnp

from diffax.diffusion import parameterization
from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import base
from diffax.diffusion.schedules import Schedule
from diffax.diffusion.time_sampling import shift_times

Array = jax.Array
DIFFUSIONS = ('sigma', 'sbdm', 'linear', 'constant', 'decreasing', 'increasing_decreasing', 'none')


def flow_grid(schedule: Schedule, num_steps: int, *, shift: float = 1.0, t_start: float | None = None,
              t_end: float = 0.0) -> Array:
  """``num_steps + 1`` descending times from ``t_start`` (default ``schedule.t_max``) to ``t_end`` (module
  docstring): [num_steps + 1]. ``shift != 1`` needs a schedule on [0, 1]."""
  if num_steps < 1:
    raise ValueError(f'num_steps must be at least 1, got {num_steps}.')
  if shift <= 0:
    raise ValueError(f'shift must be positive, got {shift}.')
  if shift != 1.0 and schedule.t_max > 1.0:
    raise ValueError(f'shift acts on times in [0, 1]; {type(schedule).__name__} runs to t_max = {schedule.t_max}.')
  t_start = schedule.t_max if t_start is None else t_start
  tau = shift_times(1.0 - jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps, shift)
  return t_end + (t_start - t_end) * tau


def velocity(denoiser: Denoiser, x: Array, t: Array) -> Array:
  """``u = alpha_dot_t x0_hat + sigma_dot_t eps_hat`` [B, ...] at ``x`` [B, ...], ``t`` []; one evaluation."""
  x0, eps = denoiser(x, t)
  alpha_dot_t, sigma_dot_t = denoiser.schedule.alpha_sigma_dot(t)
  return parameterization.velocity_from_x0_eps(x0, eps, alpha_dot_t, sigma_dot_t)


def flow_euler_sample(denoiser: Denoiser, rng: Array, shape: Sequence[int], *, num_steps: int = 50,
                      shift: float = 1.0, t_start: float | None = None, x_T: Array | None = None,
                      inpaint: base.Inpaint | None = None, return_trajectory: bool = False) -> base.SampleOutput:
  """Samples [*shape] with Euler steps on (F) over :func:`flow_grid`; ``num_steps`` model evaluations.

  Args:
    denoiser: the model under its schedule and parameterisation.
    rng: PRNG key for the prior draw.
    shape: [B, ...] of the samples.
    num_steps: Euler steps ``N``.
    shift: the grid's timestep shift (SD3 eq. 23); 1 is uniform in ``t``.
    t_start: start time (SDEdit); ``x_T`` must then be the noised input at ``t_start``.
  """
  schedule = denoiser.schedule
  ts = flow_grid(schedule, num_steps, shift=shift, t_start=t_start)

  def step(x, state, t_cur, t_next, key):
    return x + (t_next - t_cur) * velocity(denoiser, x, t_cur), state

  return base.run(step, rng, shape, ts, schedule=schedule, nfe=num_steps, x_T=x_T, inpaint=inpaint,
                  return_trajectory=return_trajectory)


def flow_heun_sample(denoiser: Denoiser, rng: Array, shape: Sequence[int], *, num_steps: int = 25,
                     shift: float = 1.0, t_start: float | None = None, x_T: Array | None = None,
                     inpaint: base.Inpaint | None = None, return_trajectory: bool = False) -> base.SampleOutput:
  """Samples [*shape] with Heun steps on (F) over :func:`flow_grid`; ``2 num_steps - 1`` model evaluations.

  Args:
    denoiser: the model under its schedule and parameterisation.
    rng: PRNG key for the prior draw.
    shape: [B, ...] of the samples.
    num_steps: steps ``N``; the last one, to ``t = 0``, is an Euler step.
    shift: the grid's timestep shift (SD3 eq. 23); 1 is uniform in ``t``.
    t_start: start time (SDEdit); ``x_T`` must then be the noised input at ``t_start``.
  """
  schedule = denoiser.schedule
  ts = flow_grid(schedule, num_steps, shift=shift, t_start=t_start)

  def step(x, state, t_cur, t_next, key):
    u_cur = velocity(denoiser, x, t_cur)
    x_euler = x + (t_next - t_cur) * u_cur

    def heun(x_euler):
      return x + (t_next - t_cur) * 0.5 * (u_cur + velocity(denoiser, x_euler, t_next))

    return jax.lax.cond(t_next > 0, heun, lambda x_euler: x_euler, x_euler), state

  return base.run(step, rng, shape, ts, schedule=schedule, nfe=2 * num_steps - 1, x_T=x_T, inpaint=inpaint,
                  return_trajectory=return_trajectory)


def diffusion_coefficient(schedule: Schedule, diffusion: str | Callable[[Array], Array],
                          norm: float = 1.0) -> Callable[[Array], Array]:
  """``t [] -> w_t []`` of (S): ``diffusion`` itself if callable, else the named form (module docstring)."""
  if callable(diffusion):
    return diffusion
  if diffusion not in DIFFUSIONS:
    raise ValueError(f'Unknown diffusion {diffusion!r}; choose one of {DIFFUSIONS} or pass a callable t -> w_t.')

  def w(t):
    t = jnp.asarray(t, jnp.float32)
    if diffusion == 'sigma':
      return 2.0 * norm * schedule.alpha_sigma(t)[1]
    if diffusion == 'sbdm':
      return norm * schedule.sde(t)[1]
    if diffusion == 'linear':
      return 2.0 * norm * t
    if diffusion == 'constant':
      return jnp.full_like(t, 2.0 * norm)
    if diffusion == 'decreasing':
      return 0.5 * jnp.square(1.0 - norm * jnp.cos(math.pi * t))
    if diffusion == 'increasing_decreasing':
      return 2.0 * norm * jnp.square(jnp.sin(math.pi * t))
    return jnp.zeros_like(t)

  return w


def flow_sde_sample(denoiser: Denoiser, rng: Array, shape: Sequence[int], *, num_steps: int = 250,
                    diffusion: str | Callable[[Array], Array] = 'sigma', diffusion_norm: float = 1.0,
                    shift: float = 1.0, t_end: float | None = None, t_start: float | None = None,
                    x_T: Array | None = None, inpaint: base.Inpaint | None = None,
                    return_trajectory: bool = False) -> base.SampleOutput:
  """Samples [*shape] with Euler-Maruyama steps of SiT's SDE (S); ``num_steps`` model evaluations.

  Args:
    denoiser: the model under its schedule and parameterisation.
    rng: PRNG key for the prior draw and the step noise.
    shape: [B, ...] of the samples.
    num_steps: ``N`` grid times from ``t_start`` to ``t_end`` (``N - 1`` SDE steps), then the x0-prediction at
      ``t_end``; SiT samples with 250.
    diffusion: ``w_t``: a name of :data:`DIFFUSIONS` or a callable ``t [] -> w_t []`` (module docstring).
    diffusion_norm: SiT's ``diffusion_norm`` for the named forms.
    shift: the grid's timestep shift (SD3 eq. 23); 1 is uniform in ``t``.
    t_end: the last noise level, where the x0-prediction ends the run (default ``schedule.t_min``; SiT: 0.04).
    t_start: start time (SDEdit); ``x_T`` must then be the noised input at ``t_start``.
  """
  schedule = denoiser.schedule
  t_end = schedule.t_min if t_end is None else t_end
  if num_steps < 2:
    raise ValueError(f'flow_sde_sample needs num_steps >= 2 (SDE steps, then the x0-prediction), got {num_steps}.')
  if not schedule.t_min <= t_end < (schedule.t_max if t_start is None else t_start):
    raise ValueError(f't_end={t_end} must lie in [t_min, t_start) = [{schedule.t_min}, '
                     f'{schedule.t_max if t_start is None else t_start}).')
  w = diffusion_coefficient(schedule, diffusion, diffusion_norm)
  ts = jnp.append(flow_grid(schedule, num_steps - 1, shift=shift, t_start=t_start, t_end=t_end), 0.0)

  def step(x, state, t_cur, t_next, key):
    x0, eps = denoiser(x, t_cur)

    def sde_step(_):
      alpha_dot_t, sigma_dot_t = schedule.alpha_sigma_dot(t_cur)
      u = parameterization.velocity_from_x0_eps(x0, eps, alpha_dot_t, sigma_dot_t)
      score = parameterization.score_from_eps(eps, schedule.alpha_sigma(t_cur)[1])
      w_t = w(t_cur)
      noise = jax.random.normal(key, x.shape, jnp.float32)
      return x + (t_next - t_cur) * (u - 0.5 * w_t * score) + jnp.sqrt(w_t * (t_cur - t_next)) * noise

    return jax.lax.cond(t_next > 0, sde_step, lambda _: x0, None), state

  return base.run(step, rng, shape, ts, schedule=schedule, nfe=num_steps, x_T=x_T, inpaint=inpaint,
                  return_trajectory=return_trajectory)
