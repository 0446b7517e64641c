"""EDM's Heun sampler (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models", Alg. 1 deterministic, Alg. 2 stochastic), for every schedule.

With ``s_churn = 0`` this is Heun's method on the probability-flow ODE in ``sigma_bar = sigma_t / alpha_t``
(:mod:`diffax.diffusion.samplers.ode`, eq. (H)): the fixed-step ODE sampler of diffax, for any grid.

EDM writes the probability-flow ODE in VE-equivalent variables (EDM sec. 2, Table 1 with a scale ``s(t)``):

  x~ = x_t / alpha_t,   sigma~ = sigma_t / alpha_t,   dx~ / dsigma~ = (x~ - D(x~; sigma~)) / sigma~ = eps_hat,

where ``D`` is the x0-prediction; the last equality is ``x_t = alpha_t x0 + sigma_t eps``. Any schedule is
therefore solved in ``(x~, sigma~)``: the model is called at the schedule time ``t`` with
``sigma_t / alpha_t = sigma~`` (found with ``schedule.t_from_log_snr(-2 log sigma~)`` where a noise level
is not a grid time) on the input ``x_t = alpha_t x~``. For the EDM schedule ``alpha_t = 1`` and the
variables coincide.

One step from ``sigma~_i`` to ``sigma~_{i+1}`` (Alg. 2, lines 4-11):

  gamma_i = min(S_churn / N, sqrt(2) - 1) if S_min <= sigma~_i <= S_max else 0,
  sigma^ = sigma~_i (1 + gamma_i),   x^ = x~_i + sqrt(sigma^^2 - sigma~_i^2) S_noise z,   z ~ N(0, I),
  d = eps_hat(x^, sigma^),   x' = x^ + (sigma~_{i+1} - sigma^) d                               (Euler)
  x~_{i+1} = x^ + (sigma~_{i+1} - sigma^) (d + eps_hat(x', sigma~_{i+1})) / 2     (Heun, if sigma~_{i+1} > 0)

``S_churn = 0`` is Alg. 1. A churned level ``sigma^`` is snapped to the schedule time
``t_from_log_snr(-2 log sigma^)``, so the model always sees the noise level the state has. The noise levels
are EDM eq. 5 (``spacing='karras'``, ``rho = 7``) between the schedule's ``t_max`` and ``t_min`` in
``sigma~``, followed by ``sigma~_N = 0``; the last step, to clean data, is a plain Euler step (it returns the
x0-prediction), so ``num_steps = N`` costs ``2 N - 1`` model evaluations. With few levels the corrector can
overshoot: on the sharp mixtures of :mod:`diffax.testing.mixtures` Heun needs ~35 evaluations to beat DDIM
at equal cost, where DPM-Solver++ already does at 10 (tests/test_samplers_edm.py).

Start and end are in the schedule's own variables, like every diffax sampler: ``x_T`` is a draw of the
schedule's prior ``N(0, prior_std^2 I)`` at ``t_max`` (for VP, ``x~_T = x_T / alpha_T`` then has standard
deviation ``1 / alpha_T``, close to ``sigma~_T``; for VE and EDM ``x~_T = x_T``), so the same ``x_T`` can be
given to any sampler. Each step maps ``x_t -> x~`` and back, so trajectories hold ``x_t`` at the grid times;
the final state is at ``sigma~ = 0`` where ``x = x~``.
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import jax
import jax.numpy as jnp

from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import base

Array = jax.Array


def edm_heun_sample(denoiser: Denoiser, rng: Array, shape: Sequence[int], *, num_steps: int = 18,
                    s_churn: float = 0.0, s_min: float = 0.0, s_max: float = math.inf, s_noise: float = 1.0,
                    spacing: base.Spacing = 'karras', t_start: float | None = None, t_end: float | None = None,
                    x_T: Array | None = None, inpaint: base.Inpaint | None = None,
                    return_trajectory: bool = False) -> base.SampleOutput:
  """Samples [*shape] with EDM's Heun solver; ``2 num_steps - 1`` model evaluations.

  Args:
    denoiser: the model under its schedule and parameterisation.
    rng: PRNG key for the prior draw and (if ``s_churn > 0``) the churn noise.
    shape: [B, ...] of the samples.
    num_steps: ``N``, the number of noise levels above zero (EDM's ``N``; 18 for CIFAR-10).
    s_churn: total stochasticity ``S_churn`` (Alg. 2); 0 is the deterministic Alg. 1.
    s_min, s_max: churn only where ``s_min <= sigma_t / alpha_t <= s_max``.
    s_noise: ``S_noise``, the standard deviation of the added noise relative to the exact amount.
    spacing: grid of :func:`base.time_grid`; ``'karras'`` is EDM eq. 5. Use one that ends at ``t_end``
      (``'karras'``, ``'log_snr'``, ``'linspace'``): with ``'trailing'`` the final x0-prediction comes from
      ``t_start / num_steps``, far above ``t_min``.
    t_start: start time (SDEdit); ``x_T`` must then be the noised input at ``t_start``.
    t_end: the last noise level before the final x0-prediction (default ``schedule.t_min``).
  """
  schedule = denoiser.schedule
  ts = base.time_grid(schedule, num_steps, spacing, t_start=t_start, t_end=t_end, dtype=base.float_dtype(x_T))
  gamma_max = min(s_churn / num_steps, math.sqrt(2.0) - 1.0)

  def sigma_ve(t):
    alpha_t, sigma_t = base.alpha_sigma_clean(schedule, t)
    return alpha_t, sigma_t / alpha_t

  def step(x, state, t_cur, t_next, key):
    alpha_cur, sigma_cur = sigma_ve(t_cur)
    alpha_next, sigma_next = sigma_ve(t_next)
    x_ve = x / alpha_cur
    t_hat, alpha_hat, sigma_hat = t_cur, alpha_cur, sigma_cur
    if gamma_max > 0:
      # Alg. 2 lines 5-6, with the raised level snapped to a schedule time (a discrete schedule cannot go
      # above its last knot).
      churn = (sigma_cur >= s_min) & (sigma_cur <= s_max)
      t_hat = jnp.where(churn, schedule.t_from_log_snr(-2.0 * jnp.log((1.0 + gamma_max) * sigma_cur)), t_cur)
      alpha_up, sigma_up = sigma_ve(t_hat)
      alpha_hat, sigma_hat = jnp.where(churn, alpha_up, alpha_cur), jnp.where(churn, sigma_up, sigma_cur)
      # Selected, not computed: two roundings of one level differ by an ulp, whose square root is not small.
      noise_var = jnp.where(churn, jnp.square(sigma_up) - jnp.square(sigma_cur), 0.0)
      x_ve = x_ve + s_noise * jnp.sqrt(jnp.maximum(noise_var, 0.0)) * jax.random.normal(key, x.shape, x.dtype)
    _, d_cur = denoiser(alpha_hat * x_ve, t_hat)
    x_euler = x_ve + (sigma_next - sigma_hat) * d_cur

    def heun(x_euler):
      _, d_next = denoiser(alpha_next * x_euler, t_next)
      return x_ve + (sigma_next - sigma_hat) * 0.5 * (d_cur + d_next)

    x_ve_next = jax.lax.cond(t_next > 0, heun, lambda x_euler: x_euler, x_euler)
    return alpha_next * x_ve_next, state

  return base.run(step, rng, shape, ts, schedule=schedule, nfe=2 * num_steps - 1, x_T=x_T, inpaint=inpaint,
                  return_trajectory=return_trajectory)
