"""ODE log-likelihoods against the exact mixture densities, and bits/dim conversions against numpy/scipy.

For the exact denoiser the probability flow carries p_eps (the data noised to ``t_eps``) exactly onto p_T, so

  ode_log_p(x) = log p_eps(x) - log p_T(z) + prior_logp(z),     z the ODE latent of x,

an identity that leaves only the solver and estimator errors. (``log p_T`` and the prior differ slightly:
the prior ignores the data's trace in ``x_T``.)
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffax.diffusion import likelihood, schedules
from diffax.diffusion.parameterization import Denoiser
from diffax.testing import mixtures

RING = mixtures.ring_mixture()
ANISO = mixtures.anisotropic_mixture()


@functools.partial(jax.jit, static_argnums=1)
def _reference(mixture, schedule, x, z):
  """``log p_eps(x) - log p_T(z) + prior_logp(z)`` [B] at ``t_eps = schedule.t_min`` (module docstring)."""
  alpha_eps, sigma_eps = schedule.alpha_sigma(jnp.float32(schedule.t_min))
  alpha_T, sigma_T = schedule.alpha_sigma(jnp.float32(schedule.t_max))
  return (mixture.log_prob(x, alpha_eps, sigma_eps) - mixture.log_prob(z, alpha_T, sigma_T) +
          schedule.prior_logp(z))


SCHEDULES = {'vp': schedules.VPSDE(), 've': schedules.VESDE()}


@functools.cache
def _ring_points():
  """64 exact ring samples [64, 2], shared by the tests (one compile of the sampler's random draws)."""
  return RING.sample(jax.random.PRNGKey(0), 64)[0]


@functools.cache
def _ring_exact(name):
  """The ring points and their exact-divergence result through ``ode_bits_per_dim`` (continuous)."""
  schedule = SCHEDULES[name]
  x = _ring_points()
  bpd, result = jax.jit(lambda x: likelihood.ode_bits_per_dim(RING.denoiser(schedule), jax.random.PRNGKey(1), x,
                                                              hutchinson='exact', dequantize=False))(x)
  return x, bpd, result


@pytest.mark.parametrize('name', sorted(SCHEDULES))
def test_exact_divergence_matches_the_mixture_density(name):
  """Measured max error 9e-5 (VP) and 7e-5 (VE) nats/dim at rtol = atol = 1e-5; against the clean density
  ``mixture.log_prob(x)`` the mean error is -9e-5 (VP) and -1.6e-4 (VE) nats/dim, the price of t_min and
  the prior mismatch."""
  schedule = SCHEDULES[name]
  x, bpd, result = _ring_exact(name)
  np.testing.assert_allclose(result.log_p / 2, _reference(RING, schedule, x, result.z) / 2, atol=5e-4)
  assert abs(float(jnp.mean(result.log_p - RING.log_prob(x))) / 2) < 2e-3
  np.testing.assert_allclose(result.prior_logp, schedule.prior_logp(result.z), rtol=1e-6)
  np.testing.assert_allclose(bpd, -np.asarray(result.log_p) / (2 * np.log(2)), rtol=1e-6)
  assert result.nfe.dtype == jnp.int32 and 50 < int(result.nfe) < 400  # measured 175 (VP), 151 (VE)


def _probe_mean(mixture, schedule, x, num_probes, hutchinson):
  """Mean and standard error [B] over ``num_probes`` Hutchinson estimates per point (one batched solve), and
  the latents [B]."""
  x_rep = jnp.repeat(x, num_probes, axis=0)
  result = jax.jit(lambda x: likelihood.ode_log_likelihood(mixture.denoiser(schedule), jax.random.PRNGKey(2), x,
                                                           hutchinson=hutchinson))(x_rep)
  log_p = result.log_p.reshape(x.shape[0], num_probes)
  return jnp.mean(log_p, 1), jnp.std(log_p, 1) / math.sqrt(num_probes), result.z[::num_probes]


def test_gaussian_hutchinson_is_unbiased_on_the_ring():
  """1024 Gaussian probes for each of 4 points: each mean within 4 standard errors (plus 1e-3 nats for the
  solver) of the exact value. Measured: standard errors 0.4 nats (one probe: 13 nats), deviations at most
  0.8 of them. Rademacher probes are far tighter on this nearly diagonal Jacobian (one probe: 0.1-0.8 nats)."""
  schedule = schedules.VPSDE()
  x = _ring_points()[:4]
  mean, stderr, z = _probe_mean(RING, schedule, x, 1024, 'gaussian')
  exact = _reference(RING, schedule, x, z)
  assert bool(jnp.all(stderr > 1e-3))  # the estimator does vary between probes
  assert bool(jnp.all(jnp.abs(mean - exact) <= 4 * stderr + 1e-3)), (mean - exact, stderr)


def test_rademacher_hutchinson_is_unbiased_in_64d():
  """Anisotropic 64-D mixture, VP (so the D log(alpha_T / alpha_eps) = -322 nats term matters). 128
  Rademacher probes per point: one probe's standard deviation is 5 nats here (Gaussian probes': 70), and
  each mean lies within 4 standard errors of the exact value (measured: 1.4 and 0.7 standard errors
  of 0.47 nats)."""
  schedule = schedules.VPSDE()
  x, _ = ANISO.sample(jax.random.PRNGKey(4), 2)
  mean, stderr, z = _probe_mean(ANISO, schedule, x, 128, 'rademacher')
  reference = _reference(ANISO, schedule, x, z)
  assert bool(jnp.all(stderr < 1.0))
  assert bool(jnp.all(jnp.abs(mean - reference) <= 4 * stderr + 0.01)), (mean - reference, stderr)


def test_grad_wrt_the_input_is_the_score():
  """d log p / dx through the solve (reverse mode over the forward-mode divergence) equals the exact score
  of p_eps (the gradient of the prior-mismatch term is negligible for VP); measured relative error 6e-4."""
  schedule = schedules.VPSDE()
  x = _ring_points()[:8]
  log_p = lambda x: jnp.sum(likelihood.ode_log_likelihood(RING.denoiser(schedule), jax.random.PRNGKey(0), x,
                                                          hutchinson='exact').log_p)
  grad = jax.jit(jax.grad(log_p))(x)
  alpha, sigma = schedule.alpha_sigma(jnp.float32(schedule.t_min))
  score = jax.grad(lambda x: jnp.sum(RING.log_prob(x, alpha, sigma)))(x)
  assert bool(jnp.all(jnp.isfinite(grad)))
  np.testing.assert_allclose(grad, score, atol=5e-3 * float(jnp.max(jnp.abs(score))))


def test_bf16_model_is_close_to_fp32():
  """bf16 rounding (4e-3 relative, also in the Jacobian-vector products) makes rtol = 1e-5 unreachable
  cheaply (measured nfe 2029 vs 175), so the bf16 model runs at rtol = atol = 1e-4 (nfe 445): measured
  difference from fp32 at 1e-5 of 0.012 nats/dim on average, 0.046 at most over 64 points."""
  schedule = SCHEDULES['vp']
  model_fn = RING.model_fn(schedule)
  bf16 = lambda x, t: model_fn(x.astype(jnp.bfloat16).astype(jnp.float32), t).astype(jnp.bfloat16)
  x, _, full = _ring_exact('vp')
  low = jax.jit(lambda x: likelihood.ode_log_likelihood(Denoiser(bf16, schedule), jax.random.PRNGKey(0), x,
                                                        hutchinson='exact', rtol=1e-4, atol=1e-4))(x)
  diff = jnp.abs(low.log_p - full.log_p) / 2
  assert float(jnp.mean(diff)) < 0.03 and float(jnp.max(diff)) < 0.1, diff


def test_bits_per_dim_and_dequantisation_conventions():
  shape = (4, 4, 3)
  nll = jnp.array([10.0, 48.0 * math.log(2)], jnp.float32)
  np.testing.assert_allclose(likelihood.bits_per_dim(nll, shape), np.array([10.0, 48.0 * math.log(2)]) /
                             (48 * np.log(2)), rtol=1e-6)
  # A uniform density on [-1, 1]^D is the uniform distribution over 256 levels: exactly 8 bits/dim.
  log_p_uniform = jnp.full((2,), -48 * math.log(2.0), jnp.float32)
  np.testing.assert_allclose(likelihood.dequantized_bits_per_dim(log_p_uniform, shape), 8.0, rtol=1e-6)
  # Data in [0, 1] would need 1 bit/dim more for the same pixels: a uniform density on [0, 1]^D
  # (log p = 0) is 8 bits/dim there, and its [-1, 1] image (log p = -D log 2) gives 8 here, so the offset
  # for [-1, 1] data is log2(128) = 7.
  np.testing.assert_allclose(likelihood.dequantized_bits_per_dim(jnp.zeros((1,), jnp.float32), shape), 7.0,
                             rtol=1e-6)

  pixels = jnp.asarray(np.random.RandomState(7).randint(0, 256, (1000, 3)), jnp.int32)
  x = likelihood.uniform_dequantize(jax.random.PRNGKey(8), pixels)
  y = (np.asarray(x, np.float64) + 1) * 128  # pixel units
  assert x.dtype == jnp.float32 and float(jnp.min(x)) >= -1 and float(jnp.max(x)) < 1
  np.testing.assert_array_equal(np.floor(y), np.asarray(pixels))  # every value stays in its own bin
  assert abs(np.mean(y - np.asarray(pixels)) - 0.5) < 0.02  # uniform offset: mean 1/2, std 1/sqrt(12 n)


def test_dequantized_bpd_bounds_the_discrete_gaussian():
  """A Gaussian density in [-1, 1] space: our conversion equals -log2 of the same Gaussian in pixel units
  (scipy, no Jacobian by hand), its mean over u matches the closed form E_u[-log2 N(k + u; m, s^2)], and it
  is an upper bound on the exact discrete -log2 P(k), P(k) = Phi(k + 1) - Phi(k) (Jensen)."""
  m, s = 0.1, 0.3  # in [-1, 1] space; in pixels m_y = (m + 1) 128, s_y = 128 s
  m_y, s_y = (m + 1) * 128, s * 128
  pixels = np.arange(60, 200, 7)
  u = np.random.RandomState(9).uniform(size=(4000, pixels.size)).astype(np.float32)
  x = (jnp.asarray(pixels, jnp.float32)[None] + u) / 128 - 1
  log_p_x = jnp.asarray(stats.norm.logpdf(np.asarray(x, np.float64), m, s), jnp.float32)
  bpd = likelihood.dequantized_bits_per_dim(log_p_x.reshape(-1), (1,)).reshape(x.shape)
  y = (np.asarray(x, np.float64) + 1) * 128
  np.testing.assert_allclose(bpd, -stats.norm.logpdf(y, m_y, s_y) / np.log(2), rtol=1e-5)
  closed = (0.5 * np.log(2 * np.pi * s_y**2) + ((pixels + 0.5 - m_y)**2 + 1 / 12) / (2 * s_y**2)) / np.log(2)
  np.testing.assert_allclose(np.mean(np.asarray(bpd, np.float64), 0), closed, atol=2e-3)
  discrete = -np.log2(stats.norm.cdf(pixels + 1, m_y, s_y) - stats.norm.cdf(pixels, m_y, s_y))
  assert np.all(closed >= discrete) and np.all(closed - discrete < 1e-3)


def test_ode_bits_per_dim_of_a_gaussian():
  """End to end on one Gaussian N(m, s^2 I) in 3-D (an exact model) with dequantised 8-bit pixels, against
  scipy in pixel units. t_eps = 1e-5 (score-SDE's), where p_eps = p_0 to 1e-5. Measured max difference
  1.4e-3 bits/dim, all of it the model's prior mismatch (N(0, I) ignores the mean alpha_T m = 7e-4 of p_T;
  the identity of the module docstring holds to 9e-6 nats/dim)."""
  m, s = 0.1, 0.3
  gaussian = mixtures.GaussianMixture(
      weights=jnp.ones((1,), jnp.float32), means=jnp.full((1, 3), m, jnp.float32),
      eigvecs=jnp.eye(3, dtype=jnp.float32)[None], eigvals=jnp.full((1, 3), s**2, jnp.float32))
  schedule = schedules.VPSDE()
  pixels = jnp.asarray(np.random.RandomState(10).randint(60, 200, (16, 3)), jnp.int32)
  rng = jax.random.PRNGKey(11)
  bpd, result = jax.jit(lambda x: likelihood.ode_bits_per_dim(gaussian.denoiser(schedule), rng, x, hutchinson='exact',
                                                              t_eps=1e-5))(pixels)
  x = likelihood.uniform_dequantize(jax.random.split(rng)[0], pixels)
  y = (np.asarray(x, np.float64) + 1) * 128
  expected = -np.sum(stats.norm.logpdf(y, (m + 1) * 128, s * 128), -1) / (3 * np.log(2))
  np.testing.assert_allclose(bpd, expected, atol=2e-3)
  assert result.z.shape == (16, 3)


def test_unknown_estimator():
  with pytest.raises(ValueError, match='Unknown hutchinson'):
    likelihood.ode_log_likelihood(RING.denoiser(schedules.VPSDE()), jax.random.PRNGKey(0), jnp.zeros((2, 2)),
                                  hutchinson='skilling')
