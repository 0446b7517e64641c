"""Gaussian mixtures: data distributions whose every noised marginal, score and denoiser is exact.

If ``x_0 ~ sum_k w_k N(mu_k, Sigma_k)`` then ``x_t = alpha x_0 + sigma eps`` is again a mixture,
``sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)``, and the ideal denoiser (Tweedie's formula) is

  E[x_0 | x_t] = sum_k r_k(x_t) (mu_k + alpha Sigma_k (alpha^2 Sigma_k + sigma^2 I)^-1 (x_t - alpha mu_k)),

with ``r_k`` the posterior responsibilities under the noised mixture. The marginal velocity of the path
(flow matching's regression target, Lipman et al. 2023 eq. 8; SiT eq. 4) follows from it,

  u(x_t, t) = E[alpha_dot_t x_0 + sigma_dot_t eps | x_t] = alpha_dot_t E[x_0 | x_t] + sigma_dot_t E[eps | x_t],

with ``E[eps | x_t] = (x_t - alpha_t E[x_0 | x_t]) / sigma_t``. Covariances are stored by their
eigendecomposition ``Sigma_k = U_k diag(lambda_k) U_k^T``, so every solve is a diagonal rescaling.
This module drives the closed-form tests of schedules, losses, samplers and likelihoods, and the
``experiments/sampler_accuracy.py`` benchmark; it is public so users can test their own samplers.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffax.diffusion import parameterization
from diffax.diffusion.schedules import Schedule, float_dtype

Array = jax.Array


@flax.struct.dataclass
class GaussianMixture:
  """``sum_k weights[k] N(means[k], eigvecs[k] diag(eigvals[k]) eigvecs[k]^T)`` in ``D`` dimensions.

  Attributes:
    weights: [K] mixture weights, summing to one.
    means: [K, D].
    eigvecs: [K, D, D] orthonormal columns.
    eigvals: [K, D] positive variances along those columns.
  """

  weights: Array
  means: Array
  eigvecs: Array
  eigvals: Array

  @property
  def dim(self) -> int:
    return self.means.shape[-1]

  def _component_log_probs(self, x: Array, alpha: Array, sigma: Array) -> tuple[Array, Array]:
    """Log ``w_k N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I)`` [N, K] and the variances [N, K, D]."""
    alpha, sigma = alpha[:, None, None], sigma[:, None, None]
    var = jnp.square(alpha) * self.eigvals[None] + jnp.square(sigma)  # [N, K, D]
    z = jnp.einsum('kdj,nkd->nkj', self.eigvecs, x[:, None, :] - alpha * self.means[None])
    maha = jnp.sum(jnp.square(z) / var, axis=-1)
    log_det = jnp.sum(jnp.log(var), axis=-1)
    log_n = -0.5 * (maha + log_det + self.dim * math.log(2 * math.pi))
    return jnp.log(self.weights)[None] + log_n, var

  def log_prob(self, x: Array, alpha: Array | float = 1.0, sigma: Array | float = 0.0) -> Array:
    """Log-density [N] of ``x`` [N, D] under the mixture noised to ``(alpha, sigma)`` ([N] or scalars)."""
    alpha, sigma = self._per_example(x, alpha, sigma)
    log_p, _ = self._component_log_probs(x, alpha, sigma)
    return jax.nn.logsumexp(log_p, axis=-1)

  def responsibilities(self, x: Array, alpha: Array | float = 1.0, sigma: Array | float = 0.0) -> Array:
    """Posterior component probabilities [N, K] of ``x`` [N, D] under the noised mixture."""
    alpha, sigma = self._per_example(x, alpha, sigma)
    log_p, _ = self._component_log_probs(x, alpha, sigma)
    return jax.nn.softmax(log_p, axis=-1)

  def posterior_mean(self, x_t: Array, alpha: Array | float, sigma: Array | float) -> Array:
    """The exact denoiser ``E[x_0 | x_t]`` [N, D] (Tweedie's formula, module docstring)."""
    alpha, sigma = self._per_example(x_t, alpha, sigma)
    log_p, var = self._component_log_probs(x_t, alpha, sigma)
    resp = jax.nn.softmax(log_p, axis=-1)  # [N, K]
    a = alpha[:, None, None]
    resid = jnp.einsum('kdj,nkd->nkj', self.eigvecs, x_t[:, None, :] - a * self.means[None])
    gain = a * self.eigvals[None] / var  # [N, K, D]
    m_k = self.means[None] + jnp.einsum('kdj,nkj->nkd', self.eigvecs, gain * resid)
    return jnp.einsum('nk,nkd->nd', resp, m_k)

  def velocity(self, x_t: Array, t: Array | float, schedule: Schedule) -> Array:
    """The exact marginal velocity ``u(x_t, t)`` [N, D] of ``schedule``'s path (module docstring); ``t`` [N] or []."""
    t = jnp.broadcast_to(jnp.asarray(t, float_dtype(x_t)), x_t.shape[:1])
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    alpha_dot_t, sigma_dot_t = schedule.alpha_sigma_dot(t)
    x0 = self.posterior_mean(x_t, alpha_t, sigma_t)
    eps = (x_t - alpha_t[:, None] * x0) / sigma_t[:, None]
    return parameterization.velocity_from_x0_eps(x0, eps, alpha_dot_t, sigma_dot_t)

  def sample(self, rng: Array, n: int) -> tuple[Array, Array]:
    """``n`` exact samples [n, D] and their component labels [n]."""
    rng_k, rng_z = jax.random.split(rng)
    labels = jax.random.categorical(rng_k, jnp.log(self.weights), shape=(n,))
    z = jax.random.normal(rng_z, (n, self.dim), jnp.float32) * jnp.sqrt(self.eigvals[labels])
    return self.means[labels] + jnp.einsum('ndj,nj->nd', self.eigvecs[labels], z), labels

  def mahalanobis(self, x: Array, labels: Array) -> Array:
    """Squared Mahalanobis distance [N] of each ``x`` [N, D] to the component ``labels`` [N]."""
    z = jnp.einsum('ndj,nd->nj', self.eigvecs[labels], x - self.means[labels])
    return jnp.sum(jnp.square(z) / self.eigvals[labels], axis=-1)

  def mean_and_cov(self) -> tuple[Array, Array]:
    """Exact mean [D] and covariance [D, D] of the mixture."""
    mean = self.weights @ self.means
    covs = jnp.einsum('kdj,kj,kej->kde', self.eigvecs, self.eigvals, self.eigvecs)
    centred = self.means - mean[None]
    cov = jnp.einsum('k,kde->de', self.weights, covs + centred[:, :, None] * centred[:, None, :])
    return mean, cov

  def model_fn(self, schedule: Schedule, prediction: str = 'eps', *,
               sigma_data: float = 0.5) -> parameterization.ModelFn:
    """The exact model ``(x_t [N, D], t [N]) -> output`` in parameterisation ``prediction``.

    ``x_t`` may also be [N, *S] with ``prod(S) = D`` (sequences [N, L, C], clips [N, T, H, W, C]): the mixture
    is then over the flattened examples and the output has ``x_t``'s shape, so samplers can be tested on data
    of any rank. For ``'edm'`` the inputs are the preconditioned ``(c_in x_t / alpha_t, c_noise)``; the noise
    level is recovered from ``c_noise`` and the schedule's time from its log-SNR, so the model is exact there too.
    """
    parameterization.check_prediction(prediction)

    def exact(x_in, t_in):
      if x_in.ndim != 2:
        return exact(x_in.reshape(x_in.shape[0], -1), t_in).reshape(x_in.shape)
      if prediction == 'edm':
        sigma_ve = jnp.exp(4.0 * t_in)
        t = schedule.t_from_log_snr(-2.0 * jnp.log(sigma_ve))
        alpha_t, sigma_t = schedule.alpha_sigma(t)
        _, _, c_in, _ = parameterization.edm_preconditioning(sigma_ve, sigma_data)
        x_t = x_in * (alpha_t / c_in)[:, None]
      else:
        x_t, t = x_in, t_in
        alpha_t, sigma_t = schedule.alpha_sigma(t)
      if prediction in parameterization.RATE_PREDICTIONS:
        return self.velocity(x_t, t, schedule)
      x0 = self.posterior_mean(x_t, alpha_t, sigma_t)
      eps = (x_t - alpha_t[:, None] * x0) / sigma_t[:, None]
      return parameterization.output_from_x0_eps(prediction, x0, eps, x_t, alpha_t, sigma_t,
                                                 sigma_data=sigma_data)

    return exact

  def denoiser(self, schedule: Schedule, prediction: str = 'eps', *, sigma_data: float = 0.5,
               clip_x0: float | None = None) -> parameterization.Denoiser:
    """The exact :meth:`model_fn` as the :class:`~diffax.diffusion.parameterization.Denoiser` samplers take."""
    return parameterization.Denoiser(self.model_fn(schedule, prediction, sigma_data=sigma_data), schedule,
                                     prediction, sigma_data=sigma_data, clip_x0=clip_x0)

  def astype(self, dtype) -> GaussianMixture:
    """The same mixture with parameters in ``dtype`` (float64 to run it on float64 inputs under x64)."""
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), self)

  def _per_example(self, x: Array, alpha, sigma) -> tuple[Array, Array]:
    shape, dtype = x.shape[:1], float_dtype(x)
    return (jnp.broadcast_to(jnp.asarray(alpha, dtype), shape), jnp.broadcast_to(jnp.asarray(sigma, dtype), shape))


def _mixture(weights, means, eigvecs, eigvals) -> GaussianMixture:
  weights = np.asarray(weights, np.float64)
  return GaussianMixture(weights=jnp.asarray(weights / weights.sum(), jnp.float32),
                         means=jnp.asarray(means, jnp.float32), eigvecs=jnp.asarray(eigvecs, jnp.float32),
                         eigvals=jnp.asarray(eigvals, jnp.float32))


def ring_mixture(num_modes: int = 8, radius: float = 1.0, std: float = 0.1) -> GaussianMixture:
  """2-D ring of isotropic modes with unequal weights ``w_k proportional to k + 1``."""
  angles = 2 * np.pi * np.arange(num_modes) / num_modes
  means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
  eigvecs = np.broadcast_to(np.eye(2), (num_modes, 2, 2))
  eigvals = np.full((num_modes, 2), std**2)
  return _mixture(np.arange(1, num_modes + 1), means, eigvecs, eigvals)


def anisotropic_mixture(dim: int = 64, num_modes: int = 4, seed: int = 0) -> GaussianMixture:
  """``dim``-D mixture of randomly rotated, strongly anisotropic components (variances 0.01 ... 0.25).

  Means are random directions of norm 1.5 (well separated relative to the component spread); weights
  are ``0.4, 0.3, 0.2, 0.1`` for four modes (``k + 1`` reversed in general).
  """
  rs = np.random.RandomState(seed)
  means = rs.randn(num_modes, dim)
  means *= 1.5 / np.linalg.norm(means, axis=-1, keepdims=True)
  eigvecs = np.stack([np.linalg.qr(rs.randn(dim, dim))[0] for _ in range(num_modes)])
  eigvals = np.stack([np.exp(rs.uniform(np.log(1e-2), np.log(0.25), size=dim)) for _ in range(num_modes)])
  return _mixture(np.arange(num_modes, 0, -1), means, eigvecs, eigvals)
