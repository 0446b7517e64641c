"""Predictor-corrector sampling of the reverse SDE (Song et al. 2021, "Score-Based Generative Modeling
through SDEs", sec. 4.2, Alg. 1-3 and app. G).

The reverse-time SDE of ``dx = f(t) x dt + g(t) dw`` is ``dx = [f(t) x - g(t)^2 s(x, t)] dt + g(t) dw_bar``
(eq. 6), with the score ``s = grad log p_t = -eps_hat / sigma_t`` from the denoiser. From ``t_i`` to
``t_{i+1} < t_i`` (``dt = t_{i+1} - t_i < 0``) the predictors are

  * ``'euler_maruyama'``: ``x <- x + [f x - g^2 s] dt + g sqrt(-dt) z`` with ``(f, g)`` of
    ``schedule.drift_diffusion`` at ``t_i``;
  * ``'reverse_diffusion'`` (app. E): ``x <- x - f_i + G_i^2 s + G_i z`` for a forward discretisation
    ``x_i = x_{i+1} + f_i + G_i z``. Here the forward step is the exact transition of the schedule between
    the two grid times (the integral of ``dx = f x dt + g dw`` over ``[t_{i+1}, t_i]``):
    ``f_i = (alpha_{t_i} / alpha_{t_{i+1}} - 1) x`` and ``G_i^2 = sigma_{t_i | t_{i+1}}^2 =
    sigma_{t_i}^2 - (alpha_{t_i} / alpha_{t_{i+1}})^2 sigma_{t_{i+1}}^2``. For VE this is the reference's
    ``G = sqrt(sigma_i^2 - sigma_{i-1}^2)`` (Alg. 2); for VP it is the DDPM form of Alg. 3,
    ``x <- (2 - sqrt(1 - beta_i)) x + beta_i s + sqrt(beta_i) z``, with ``beta_i = 1 - alpha_bar_i /
    alpha_bar_{i+1}`` where the reference code takes ``beta(t_i) / N``; the two agree to first order in
    ``dt``, and for sub-VP the reference's Euler fallback ``f dt, g sqrt(dt)`` is its first-order form too;
  * ``'none'``: no predictor (corrector only: annealed Langevin dynamics, Song & Ermon 2019).

The corrector is Langevin MCMC at the new time (app. G, Alg. 4-5): ``n_corrector_steps`` times
``x <- x + eps s + sqrt(2 eps) z`` with ``eps = 2 alpha_i (snr ||z|| / ||s||)^2``, where the norms are
taken per example over all non-batch axes and averaged over the batch (as the reference code does, so one
step size serves the batch), and ``alpha_i = (alpha_{t_i} / alpha_{t_{i+1}})^2``, the squared forward factor
of the step just taken (the reference's ``1 - beta_i`` for VP and sub-VP, 1 for VE).

Time grid (score-SDE): ``num_steps + 1`` times ``base.time_grid(..., 'linspace')`` from ``t_start`` to
``t_min`` (rounded to knots on a discrete schedule); each of the ``num_steps``
steps is predictor then corrector (the paper's Alg. 1 order; the reference code runs the corrector first,
which moves one corrector round from ``t_min`` to ``t_start``). With ``denoise=True`` (the default, the
reference's ``noise_removal``) one more step returns Tweedie's ``x0_hat`` at ``t_min`` and the grid ends
in the clean sentinel ``t = 0``; with ``denoise=False`` the samples are the noisy ``x`` at ``t_min``.
Model evaluations: ``num_steps (p + n_corrector_steps) + denoise`` with ``p = 0`` for ``'none'``, else 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from diffax.diffusion import parameterization
from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import base

Array = jax.Array
PREDICTORS = ('euler_maruyama', 'reverse_diffusion', 'none')
CORRECTORS = ('langevin', 'none')


def _per_example_norm(a: Array) -> Array:
  """``||a_b||`` over all non-batch axes of ``a`` [B, ...] -> [B]."""
  return jnp.sqrt(jnp.sum(jnp.square(a.reshape(a.shape[0], -1)), axis=-1))


def pc_sample(denoiser: Denoiser, rng: Array, shape: Sequence[int], *, num_steps: int = 1000,
              predictor: str = 'reverse_diffusion', corrector: str = 'langevin', snr: float = 0.16,
              n_corrector_steps: int = 1, denoise: bool = True, t_start: float | None = None,
              x_T: Array | None = None, inpaint: base.Inpaint | None = None,
              return_trajectory: bool = False) -> base.SampleOutput:
  """Samples [*shape] with a predictor-corrector scheme; see the module docstring for the model calls.

  Args:
    denoiser: the model under its schedule and parameterisation.
    rng: PRNG key for the prior draw, the predictor and the corrector noise.
    shape: [B, ...] of the samples.
    num_steps: predictor steps ``N`` between ``t_start`` and ``schedule.t_min``.
    predictor: one of ``PREDICTORS``.
    corrector: ``'langevin'`` or ``'none'``.
    snr: Langevin signal-to-noise ratio ``r`` (Alg. 4-5); the reference uses 0.16 for VE on CIFAR-10.
    n_corrector_steps: Langevin steps ``M`` after each predictor step.
    denoise: end with Tweedie's ``x0_hat`` at ``t_min`` (one more model evaluation).
    t_start: start time (SDEdit); ``x_T`` must then be the noised input at ``t_start``.
    return_trajectory: adds ``x`` at every grid time, ``x_T`` first: [num_steps + 1 + denoise, *shape].
  """
  schedule = denoiser.schedule
  if predictor not in PREDICTORS:
    raise ValueError(f'Unknown predictor {predictor!r}; choose one of {PREDICTORS}.')
  if corrector not in CORRECTORS:
    raise ValueError(f'Unknown corrector {corrector!r}; choose one of {CORRECTORS}.')
  if n_corrector_steps < 0:
    raise ValueError(f'n_corrector_steps must be >= 0, got {n_corrector_steps}.')
  if predictor == 'none' and (corrector == 'none' or n_corrector_steps < 1):
    raise ValueError("predictor='none' needs corrector='langevin' with n_corrector_steps >= 1.")
  # num_steps + 1 times uniform from t_start to t_min, then the clean sentinel (kept only for the denoising step).
  ts = base.time_grid(schedule, num_steps + 1, 'linspace', t_start=t_start)
  if not denoise:
    ts = ts[:-1]

  def score(x, t):
    _, eps = denoiser(x, t)
    _, sigma_t = schedule.alpha_sigma(t)
    return parameterization.score_from_eps(eps, sigma_t)

  def predict(x, t_cur, t_next, key):
    z = jax.random.normal(key, x.shape, jnp.float32)
    if predictor == 'euler_maruyama':
      dt = t_next - t_cur
      drift, g = schedule.drift_diffusion(x, t_cur)
      return x + (drift - jnp.square(g) * score(x, t_cur)) * dt + g * jnp.sqrt(-dt) * z
    alpha_t, sigma_t = schedule.alpha_sigma(t_cur)
    alpha_s, sigma_s = schedule.alpha_sigma(t_next)
    a = alpha_t / alpha_s
    g2 = jnp.maximum(jnp.square(sigma_t) - jnp.square(a) * jnp.square(sigma_s), 0.0)
    return (2.0 - a) * x + g2 * score(x, t_cur) + jnp.sqrt(g2) * z

  def correct(x, t, alpha_i, key):

    def langevin(j, x):
      s = score(x, t)
      z = jax.random.normal(jax.random.fold_in(key, j), x.shape, jnp.float32)
      ratio = jnp.mean(_per_example_norm(z)) / jnp.mean(_per_example_norm(s))
      eps = 2.0 * alpha_i * jnp.square(snr * ratio)
      return x + eps * s + jnp.sqrt(2.0 * eps) * z

    return jax.lax.fori_loop(0, n_corrector_steps, langevin, x)

  def pc_step(x, t_cur, t_next, key):
    key_p, key_c = jax.random.split(key)
    if predictor != 'none':
      x = predict(x, t_cur, t_next, key_p)
    if corrector != 'none' and n_corrector_steps > 0:
      alpha_i = jnp.square(schedule.alpha_sigma(t_cur)[0] / schedule.alpha_sigma(t_next)[0])
      x = correct(x, t_next, alpha_i, key_c)
    return x

  def step(x, state, t_cur, t_next, key):
    if not denoise:
      return pc_step(x, t_cur, t_next, key), state
    x = jax.lax.cond(t_next > 0, lambda x: pc_step(x, t_cur, t_next, key), lambda x: denoiser(x, t_cur)[0], x)
    return x, state

  model_calls = (predictor != 'none') + (n_corrector_steps if corrector != 'none' else 0)
  return base.run(step, rng, shape, ts, schedule=schedule, nfe=num_steps * model_calls + int(denoise), x_T=x_T,
                  inpaint=inpaint, return_trajectory=return_trajectory)
