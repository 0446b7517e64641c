"""The discrete-time variational bound (VLB) of DDPM, in nats per example and bits per dimension.

On the ``N`` noise levels ``t_0 < ... < t_{N-1}`` of :func:`time_sampling.discrete_grid` (the knots of a
discrete schedule), writing ``z_n`` for the noised ``x_{t_n}``, ``x_0`` for the data and ``s`` for ``t_{n-1}``
(the clean data itself when ``n = 0``):

  -log p(x_0) <= L_prior + sum_{n=1}^{N-1} L_n + L_0                              (DDPM, Ho et al. 2020, eq. 5)
  L_prior = KL(q(z_{N-1} | x_0) || N(0, prior_std^2 I))
  L_n     = KL(q(z_{n-1} | z_n, x_0) || p(z_{n-1} | z_n))                                         (n >= 1)
  L_0     = -log p(x_0 | z_0), a Gaussian discretised into 256 bins of width 2/255               (DDPM eq. 13)

The posterior ``q(x_s | x_t, x_0) = N(c_x0 x_0 + c_xt x_t, beta_tilde I)`` comes from
:func:`schedules.posterior_from`; the model step ``p(x_s | x_t) = N(c_x0 x0_hat + c_xt x_t, sigma_p^2 I)``
uses the same mean coefficients with the model's ``x0_hat`` (DDPM eq. 11, in x0 form) and a variance
(with ``beta_n = sigma_{t|s}^2`` the forward step's variance):

  * ``'posterior'``: ``beta_tilde_n`` (DDPM's ``sigma_t^2 = beta_tilde_t``);
  * ``'large'``: ``beta_n`` (DDPM's ``sigma_t^2 = beta_t``);
  * ``'learned_range'``: ``exp(f log beta_n + (1 - f) log beta_tilde_n)``, ``f = (v + 1) / 2``, where the
    model outputs ``v`` as extra channels: output [..., 2C] = (prediction [..., C], v [..., C])
    (Nichol & Dhariwal 2021, "Improved DDPM", eq. 15).

``beta_tilde_0 = 0``, so at ``n = 0`` ``beta_tilde_1`` stands in for it, and ``'large'`` uses it too, as in
the DDPM and iDDPM reference code. Data must lie on the 8-bit grid ``k / 127.5 - 1`` for the decoder term
to be a probability, which makes the bound one on the discrete negative log-likelihood.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffax.diffusion import parameterization, time_sampling
from diffax.diffusion.schedules import Schedule, expand_like, posterior_from

Array = jax.Array
VARIANCES = ('posterior', 'large', 'learned_range')
BIN_HALF_WIDTH = 1.0 / 255.0


def normal_kl(mean1: Array, logvar1: Array, mean2: Array, logvar2: Array) -> Array:
  """Elementwise ``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` in nats (broadcasting inputs).

  ``0.5 (e^d - 1 - d + (mean1 - mean2)^2 e^(-logvar2))`` with ``d = logvar1 - logvar2``, the variance part
  written as ``expm1(d) - d`` so that it is exactly zero for equal variances.
  """
  d = logvar1 - logvar2
  return 0.5 * (jnp.expm1(d) - d + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Array, *, mean: Array, log_scale: Array) -> Array:
  """Elementwise log-probability of 8-bit data ``x`` in [-1, 1] under a discretised ``N(mean, e^(2 log_scale))``.

  Bin ``k`` covers ``x_k +- 1/255``; the first and last bins extend to ``-inf`` and ``+inf`` (DDPM sec. 3.3,
  eq. 13), so the 256 probabilities sum to one. Computed with ``log_ndtr`` instead of DDPM's clamped
  ``log(max(cdf, 1e-12))``, so far-off bins keep finite, exact log-probabilities.
  """
  x, mean, log_scale = jnp.broadcast_arrays(x, mean, log_scale)
  inv_scale = jnp.exp(-log_scale)
  lo = (x - mean - BIN_HALF_WIDTH) * inv_scale
  hi = (x - mean + BIN_HALF_WIDTH) * inv_scale
  # Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi): bins above the mean are reflected into the lower tail, where
  # log_ndtr is accurate. Edge bins need one cdf: Phi(hi) at the bottom, Phi(-lo) at the top.
  flip = lo > 0.0
  a, b = jnp.where(flip, -hi, lo), jnp.where(flip, -lo, hi)
  lower_edge, upper_edge = x < -0.999, x > 0.999
  edge = jnp.where(lower_edge, hi, -lo)
  log_a, log_b, log_edge = jax.scipy.special.log_ndtr(jnp.stack([a, b, edge]))
  interior = log_b + jnp.log(-jnp.expm1(jnp.minimum(log_a - log_b, -1e-30)))
  return jnp.where(lower_edge | upper_edge, log_edge, interior)


def _sum_dims(x: Array) -> Array:
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def prior_kl(x0: Array, *, schedule: Schedule, t: Array | float | None = None) -> Array:
  """``L_prior`` [B] in nats: ``KL(N(alpha_T x0, sigma_T^2 I) || N(0, prior_std^2 I))`` at ``t`` (default t_max)."""
  t = schedule.t_max if t is None else t
  alpha_t, sigma_t = schedule.alpha_sigma(jnp.full(x0.shape[:1], t, jnp.float32))
  kl = normal_kl(expand_like(alpha_t, x0) * x0, expand_like(2.0 * jnp.log(sigma_t), x0),
                 0.0, jnp.float32(2.0 * math.log(schedule.prior_std)))
  return _sum_dims(kl)


def vlb_term(output: Array, x0: Array, x_t: Array, n: Array, *, schedule: Schedule, prediction: str = 'eps',
             variance: str = 'posterior', num_timesteps: int | None = None, sigma_data: float = 0.5) -> Array:
  """``L_n`` [B] in nats for one model evaluation at level ``n`` (the decoder term ``L_0`` where ``n = 0``).

  Args:
    output: [B, ..., C] model output at ``x_t`` (or [B, ..., 2C] for ``'learned_range'``), float32.
    x0: [B, ..., C] clean data; 8-bit grid in [-1, 1] wherever ``n = 0``.
    x_t: [B, ..., C] the noised data at ``t = discrete_grid(schedule, N)[n]``.
    n: [B] int timestep indices in ``0 .. N - 1``.
    schedule: the forward process.
    prediction: the parameterisation of ``output``.
    variance: one of :data:`VARIANCES` (module docstring).
    num_timesteps: N (:func:`time_sampling.resolve_num_timesteps`).
    sigma_data: for ``prediction='edm'``.
  """
  if variance not in VARIANCES:
    raise ValueError(f'Unknown variance {variance!r}; choose one of {VARIANCES}.')
  grid = time_sampling.discrete_grid(schedule, time_sampling.resolve_num_timesteps(schedule, num_timesteps))
  first = n == 0
  alpha_t, sigma_t = schedule.alpha_sigma(grid[n])
  alpha_prev, sigma_prev = schedule.alpha_sigma(grid[jnp.maximum(n - 1, 0)])
  alpha_s, sigma_s = jnp.where(first, 1.0, alpha_prev), jnp.where(first, 0.0, sigma_prev)
  c_x0, c_xt, beta_tilde = posterior_from(alpha_s, sigma_s, alpha_t, sigma_t)
  beta = jnp.square(sigma_t) - jnp.square(alpha_t / alpha_s) * jnp.square(sigma_s)
  a1, s1 = schedule.alpha_sigma(grid[1])
  a0, s0 = schedule.alpha_sigma(grid[0])
  beta_tilde_1 = posterior_from(a0, s0, a1, s1)[2]
  log_beta_tilde = jnp.log(jnp.where(first, beta_tilde_1, beta_tilde))
  if variance == 'learned_range':
    output, v = jnp.split(output, 2, axis=-1)
    frac = (v + 1.0) / 2.0
    logvar = frac * expand_like(jnp.log(beta), x0) + (1.0 - frac) * expand_like(log_beta_tilde, x0)
  elif variance == 'large':
    logvar = expand_like(jnp.where(first, log_beta_tilde, jnp.log(beta)), x0)
  else:
    logvar = expand_like(log_beta_tilde, x0)
  x0_hat, _ = parameterization.x0_eps_from_output(prediction, output, x_t, alpha_t, sigma_t,
                                                  sigma_data=sigma_data)
  c_x0, c_xt = expand_like(c_x0, x0), expand_like(c_xt, x0)
  # The posterior and model means differ by c_x0 (x0 - x0_hat): no cancellation between two large means.
  kl = _sum_dims(normal_kl(c_x0 * (x0 - x0_hat), expand_like(log_beta_tilde, x0), 0.0, logvar))
  mean = c_x0 * x0_hat + c_xt * x_t
  decoder_nll = -_sum_dims(discretized_gaussian_log_likelihood(x0, mean=mean, log_scale=0.5 * logvar))
  return jnp.where(first, decoder_nll, kl)


def vlb_bpd(model_fn: parameterization.ModelFn, x0: Array, rng: Array, *, schedule: Schedule,
            prediction: str = 'eps', variance: str = 'posterior', num_timesteps: int | None = None,
            sigma_data: float = 0.5, chunk_size: int = 50) -> dict[str, Array]:
  """The full VLB of a batch by summing all ``N`` terms, each with its own noise draw (for evaluation).

  The levels run through ``jax.lax.map`` in chunks of ``chunk_size`` (one chunk of ``chunk_size * B``
  examples is vmapped at a time), so memory stays bounded while one call is one compiled program.

  Args:
    model_fn: ``(x [B, ...], t [B]) -> output`` in parameterisation ``prediction`` (with 2C channels for
      ``variance='learned_range'``); it sees ``model_inputs`` (the preconditioned inputs for ``'edm'``).
    x0: [B, ...] data on the 8-bit grid in [-1, 1].
    rng: PRNG key; level ``n`` uses ``fold_in(rng, n)``.
    schedule, prediction, variance, num_timesteps, sigma_data: as in :func:`vlb_term`.
    chunk_size: levels evaluated together.

  Returns:
    ``'bpd'`` [B] the bound in bits/dim; ``'prior_bpd'`` [B] its ``L_prior`` part; ``'terms_bpd'`` [B, N]
    the ``L_n`` (``L_0`` the decoder), all divided by ``D ln 2`` with ``D`` the dimensions per example.
  """
  x0 = jnp.asarray(x0, jnp.float32)
  num_timesteps = time_sampling.resolve_num_timesteps(schedule, num_timesteps)
  grid = time_sampling.discrete_grid(schedule, num_timesteps)
  batch = x0.shape[0]

  def level(n):
    noise = jax.random.normal(jax.random.fold_in(rng, n), x0.shape, jnp.float32)
    t = jnp.full((batch,), grid[n])
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    x_t = schedule.marginal(x0, t, noise)
    x_in, t_in = parameterization.model_inputs(prediction, x_t, t, alpha_t, sigma_t, sigma_data=sigma_data)
    output = model_fn(x_in, t_in).astype(jnp.float32)
    return vlb_term(output, x0, x_t, jnp.full((batch,), n), schedule=schedule, prediction=prediction,
                    variance=variance, num_timesteps=num_timesteps, sigma_data=sigma_data)

  # Pad the levels to whole chunks (repeating the last one) so lax.map compiles a single chunk body.
  chunk_size = min(chunk_size, num_timesteps)
  padded = -(-num_timesteps // chunk_size) * chunk_size
  levels = jnp.minimum(jnp.arange(padded), num_timesteps - 1)
  terms = jax.lax.map(level, levels, batch_size=chunk_size)[:num_timesteps]
  prior = prior_kl(x0, schedule=schedule, t=grid[-1])
  to_bpd = 1.0 / (math.prod(x0.shape[1:]) * math.log(2.0))
  return {'bpd': (jnp.sum(terms, axis=0) + prior) * to_bpd, 'prior_bpd': prior * to_bpd,
          'terms_bpd': terms.T * to_bpd}
