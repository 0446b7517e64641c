"""Single-step and multistep consistency sampling (Song et al. 2023, "Consistency Models", Algorithm 1).

A consistency model maps a noisy ``x_t`` straight to the origin of its ODE trajectory, so one evaluation at
``t_max`` is a sample. Multistep sampling alternates denoising and re-noising to decreasing times
``tau_1 > ... > tau_{N-1}``:

  x0 = f(x_T, t_max);   for tau in taus:  x_tau = alpha_tau x0 + sigma_tau z,  x0 = f(x_tau, tau).

(in VE form ``x_tau = x0 + sqrt(tau^2 - sigma_min^2) z``; CM's ``sigma_min`` term is the noise of the boundary
and is negligible.) The denoiser's x0-prediction is the consistency function: wrap a consistency network with
:func:`diffax.diffusion.distillation.consistency_model_fn` and ``prediction='x0'``. On a plain diffusion denoiser
the same loop is a crude few-step sampler. ``num_steps`` model evaluations at ``time_grid(schedule, num_steps,
spacing)`` (the default ``'trailing'`` grid starts at ``t_max``); the last step returns the x0-prediction.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import base

Array = jax.Array


def consistency_sample(denoiser: Denoiser, rng: Array, shape: Sequence[int], *, num_steps: int = 1,
                       spacing: base.Spacing = 'trailing', t_start: float | None = None, x_T: Array | None = None,
                       inpaint: base.Inpaint | None = None, return_trajectory: bool = False) -> base.SampleOutput:
  """Samples [*shape] with ``num_steps`` consistency steps (1 = single-step generation).

  Args:
    denoiser: a consistency model as an x0-predicting denoiser.
    rng: PRNG key for the prior draw and the re-noising.
    shape: [B, ...] of the samples.
    num_steps: model evaluations; ``t_max``, then ``num_steps - 1`` re-noised times of the grid.
    spacing: see :func:`base.time_grid`.
    t_start: start time (SDEdit); ``x_T`` must then be the noised input at ``t_start``.
  """
  schedule = denoiser.schedule
  ts = base.time_grid(schedule, num_steps, spacing, t_start=t_start)

  def step(x, state, t_cur, t_next, key):
    x0, _ = denoiser(x, t_cur)
    alpha_s, sigma_s = base.alpha_sigma_clean(schedule, t_next)
    return alpha_s * x0 + sigma_s * jax.random.normal(key, x.shape, x.dtype), state

  return base.run(step, rng, shape, ts, schedule=schedule, nfe=num_steps, x_T=x_T, inpaint=inpaint,
                  return_trajectory=return_trajectory)
