"""DDIM (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models").

One step from ``t`` to ``s < t`` (DDIM eq. 12, written for any ``(alpha, sigma)`` schedule):

  x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,
  c = eta * sqrt(sigma_s^2 sigma_{t|s}^2 / sigma_t^2)          (DDIM eq. 16; the DDPM posterior std)

``eta = 0`` is the deterministic DDIM (a first-order solver of the probability-flow ODE in log-SNR);
``eta = 1`` with consecutive steps is ancestral DDPM with the posterior variance.

Conventions: ``num_steps`` model evaluations at ``time_grid(schedule, num_steps, spacing)``; the final step
targets ``t = 0`` and so returns the x0-prediction of the last evaluation. The default ``'trailing'`` grid
starts at ``t_max`` (pure noise, as Lin et al. 2024 recommend) but its last evaluation is at ``t_max / N``
(knot 19 of 1000 for N = 50), so few-step runs jump to x0 from a visible noise level and come out slightly
too sharp; ``'log_snr'`` (or ``'karras'``) spacing ends at ``t_min`` and converges to the data as N grows.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import base
from diffax.diffusion.schedules import posterior_from

Array = jax.Array


def ddim_sample(denoiser: Denoiser, rng: Array, shape: Sequence[int], *, num_steps: int = 50, eta: float = 0.0,
                spacing: base.Spacing = 'trailing', t_start: float | None = None, x_T: Array | None = None,
                inpaint: base.Inpaint | None = None, return_trajectory: bool = False) -> base.SampleOutput:
  """Samples [*shape] with DDIM; ``num_steps`` model evaluations.

  Args:
    denoiser: the model under its schedule and parameterisation.
    rng: PRNG key for the prior draw and (if ``eta > 0``) the step noise.
    shape: [B, ...] of the samples.
    eta: 0 for deterministic DDIM, 1 for DDPM-like stochasticity.
    spacing: see :func:`base.time_grid`.
    t_start: start time (SDEdit); ``x_T`` must then be the noised input at ``t_start``.
  """
  schedule = denoiser.schedule
  ts = base.time_grid(schedule, num_steps, spacing, t_start=t_start, dtype=base.float_dtype(x_T))

  def step(x, state, t_cur, t_next, key):
    x0, eps = denoiser(x, t_cur)
    alpha_t, sigma_t = base.alpha_sigma_clean(schedule, t_cur)
    alpha_s, sigma_s = base.alpha_sigma_clean(schedule, t_next)
    _, _, var = posterior_from(alpha_s, sigma_s, alpha_t, sigma_t)
    c = eta * jnp.sqrt(jnp.maximum(var, 0.0))
    direction = jnp.sqrt(jnp.maximum(jnp.square(sigma_s) - jnp.square(c), 0.0))
    x_next = alpha_s * x0 + direction * eps
    if eta > 0:
      x_next = x_next + c * jax.random.normal(key, x.shape, x.dtype)
    return x_next, state

  return base.run(step, rng, shape, ts, schedule=schedule, nfe=num_steps, x_T=x_T, inpaint=inpaint,
                  return_trajectory=return_trajectory)
