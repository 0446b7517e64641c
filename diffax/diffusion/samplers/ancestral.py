"""Ancestral DDPM sampling (Ho et al. 2020, "Denoising Diffusion Probabilistic Models", Alg. 2).

One step from ``t`` to ``s < t`` draws from the forward posterior with ``x_0`` replaced by the model's
``x0_hat`` (DDPM eq. 6-7, written for any ``(alpha, sigma)`` schedule, VDM eq. 28-31):

  x_s = c_x0 x0_hat + c_xt x_t + sqrt(var) z,
  c_x0 = alpha_s sigma_{t|s}^2 / sigma_t^2,   c_xt = alpha_{t|s} sigma_s^2 / sigma_t^2,

with ``alpha_{t|s} = alpha_t / alpha_s`` and ``sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2``. For an
eps-model this mean is Alg. 2's ``(x_t - beta_t / sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_t)``. The two
variances of DDPM sec. 3.2:

  * ``'posterior'``: ``sigma_s^2 sigma_{t|s}^2 / sigma_t^2`` (``beta~_t``, DDPM eq. 7);
  * ``'large'``: ``sigma_{t|s}^2`` (``beta_t``; for a VP schedule ``1 - alpha_bar_t / alpha_bar_s``).

Respacing (Nichol & Dhariwal 2021, "Improved DDPM", sec. 4) is the same rule between non-consecutive
times: any subset of timesteps from :func:`base.time_grid` gives the respaced betas
``1 - alpha_bar_t / alpha_bar_s`` and their posterior variances, so no separate code path exists.

Even with the exact denoiser neither variance is exact at finite ``T``: ``'posterior'`` leaves out
``c_x0^2 Var[x0 | x_t]`` in every step and makes narrow modes too sharp (variance x0.93 for modes of std 0.1
under the linear schedule with T = 1000), ``'large'`` errs the other way (x1.015).

Visited times: ``time_grid(schedule, num_steps, spacing, t_start=t_start)``. By default a discrete schedule
of ``T`` steps visits every knot at or below ``t_start``: all ``T`` knots ``T - 1, T - 2, ..., 0`` from the
prior ('trailing' from ``t = 1``); fewer steps respace. The final step targets the clean sentinel ``t = 0``,
where ``c_x0 = 1``, ``c_xt = 0`` and no noise is added: the sample is the x0-prediction at the last visited
time (Alg. 2 with ``z = 0`` at ``t = 1``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import base
from diffax.diffusion.schedules import DiscreteSchedule, posterior_from

Array = jax.Array
VARIANCES = ('posterior', 'large')
DEFAULT_CONTINUOUS_STEPS = 1000


def ancestral_sample(denoiser: Denoiser, rng: Array, shape: Sequence[int], *, num_steps: int | None = None,
                     variance: str = 'posterior', spacing: base.Spacing = 'trailing', t_start: float | None = None,
                     x_T: Array | None = None, inpaint: base.Inpaint | None = None,
                     return_trajectory: bool = False) -> base.SampleOutput:
  """Samples [*shape] with ancestral DDPM; ``num_steps`` model evaluations.

  Args:
    denoiser: the model under its schedule and parameterisation.
    rng: PRNG key for the prior draw and the step noise.
    shape: [B, ...] of the samples.
    num_steps: model evaluations; ``None`` visits every knot of a discrete schedule up to ``t_start``
      (``T`` from the prior) and takes 1000 steps on a continuous one. Fewer steps respace (iDDPM sec. 4).
    variance: ``'posterior'`` (``beta~_t``) or ``'large'`` (``beta_t``), see the module docstring.
    spacing: see :func:`base.time_grid`.
    t_start: start time (SDEdit); ``x_T`` must then be the noised input at ``t_start``.
  """
  schedule = denoiser.schedule
  if variance not in VARIANCES:
    raise ValueError(f'Unknown variance {variance!r}; choose one of {VARIANCES}.')
  if num_steps is None and isinstance(schedule, DiscreteSchedule):
    num_steps = round(schedule.num_timesteps * (schedule.t_max if t_start is None else t_start))
  elif num_steps is None:
    num_steps = DEFAULT_CONTINUOUS_STEPS
  ts = base.time_grid(schedule, num_steps, spacing, t_start=t_start)

  def step(x, state, t_cur, t_next, key):
    x0, _ = denoiser(x, t_cur)
    alpha_t, sigma_t = base.alpha_sigma_clean(schedule, t_cur)
    alpha_s, sigma_s = base.alpha_sigma_clean(schedule, t_next)
    c_x0, c_xt, var = posterior_from(alpha_s, sigma_s, alpha_t, sigma_t)
    if variance == 'large':
      var = jnp.square(sigma_t) - jnp.square(alpha_t / alpha_s) * jnp.square(sigma_s)
    std = jnp.where(t_next > 0, jnp.sqrt(jnp.maximum(var, 0.0)), 0.0)
    x_next = c_x0 * x0 + c_xt * x + std * jax.random.normal(key, x.shape, x.dtype)
    return x_next, state

  return base.run(step, rng, shape, ts, schedule=schedule, nfe=num_steps, x_T=x_T, inpaint=inpaint,
                  return_trajectory=return_trajectory)
