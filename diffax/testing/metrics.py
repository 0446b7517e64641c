"""How close a set of samples is to a Gaussian mixture, and the floor that exact samples reach.

Each statistic is compared against the same statistic of ``n`` exact samples (``noise_floor``), so a
sampler "reaches the floor" when its error is no larger than the sampling noise of a perfect sampler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffax.testing.mixtures import GaussianMixture

Array = jax.Array


def sliced_wasserstein(x: Array, y: Array, rng: Array, num_projections: int = 256) -> Array:
  """Sliced 2-Wasserstein distance between equal-size samples ``x``, ``y`` [N, D].

  ``SW_2 = (E_theta W_2^2(theta^T x, theta^T y))^(1/2)`` over uniform directions ``theta``; each 1-D
  ``W_2`` between empirical measures of equal size pairs the sorted projections.
  """
  theta = jax.random.normal(rng, (x.shape[-1], num_projections), jnp.float32)
  theta = theta / jnp.linalg.norm(theta, axis=0, keepdims=True)
  px, py = jnp.sort(x @ theta, axis=0), jnp.sort(y @ theta, axis=0)
  return jnp.sqrt(jnp.mean(jnp.square(px - py)))


def mixture_report(x: Array, mixture: GaussianMixture, reference: Array, rng: Array) -> dict[str, float]:
  """Error statistics of samples ``x`` [N, D] against ``mixture``.

  Args:
    x: [N, D] samples to judge.
    mixture: the target distribution.
    reference: [N, D] exact samples from ``mixture`` (independent of ``x``) for the sliced Wasserstein.
    rng: projections for the sliced Wasserstein distance.

  Returns:
    ``mode_weight_err``: max |fraction assigned to mode k - w_k| (assignment by responsibility);
    ``mean_err``: ||mean(x) - mu|| / sqrt(D) (RMS per coordinate);
    ``cov_err``: ||cov(x) - Sigma||_F / ||Sigma||_F;
    ``sw``: sliced Wasserstein distance to ``reference``;
    ``nll``: mean negative log-likelihood of ``x`` under the mixture (nats / dim; can look *better*
    than exact when samples collapse onto the modes, hence ``sharpness``);
    ``sharpness``: mean squared Mahalanobis distance to the assigned mode divided by D: 1 for exact
    samples, below 1 when modes come out too sharp, above 1 when too wide.
  """
  return {k: float(v) for k, v in _report(x, mixture, reference, rng).items()}


@jax.jit
def _report(x: Array, mixture: GaussianMixture, reference: Array, rng: Array) -> dict[str, Array]:
  d = mixture.dim
  labels = jnp.argmax(mixture.responsibilities(x), axis=-1)
  freq = jnp.bincount(labels, length=mixture.weights.shape[0]) / x.shape[0]
  mean, cov = mixture.mean_and_cov()
  x_mean = jnp.mean(x, axis=0)
  x_cov = jnp.cov(x, rowvar=False)
  return {
      'mode_weight_err': jnp.max(jnp.abs(freq - mixture.weights)),
      'mean_err': jnp.linalg.norm(x_mean - mean) / jnp.sqrt(float(d)),
      'cov_err': jnp.linalg.norm(x_cov - cov) / jnp.linalg.norm(cov),
      'sw': sliced_wasserstein(x, reference, rng),
      'nll': -jnp.mean(mixture.log_prob(x)) / d,
      'sharpness': jnp.mean(mixture.mahalanobis(x, labels)) / d,
  }


def noise_floor(mixture: GaussianMixture, n: int, rng: Array) -> tuple[dict[str, float], Array]:
  """The report of ``n`` exact samples, and an independent exact reference set [n, D] for :func:`mixture_report`.

  Returns ``(floor, reference)``: judge a sampler with ``mixture_report(x, mixture, reference, rng)`` and
  compare entry by entry with ``floor``.
  """
  rng_ref, rng_exact, rng_sw = jax.random.split(rng, 3)
  sample = jax.jit(type(mixture).sample, static_argnums=2)
  reference, _ = sample(mixture, rng_ref, n)
  exact, _ = sample(mixture, rng_exact, n)
  return mixture_report(exact, mixture, reference, rng_sw), reference
