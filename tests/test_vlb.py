"""Closed-form tests of the discrete-time VLB: Gaussian KLs, the discretised decoder, the prior term, the
per-level terms for Gaussian data, and the bound on the exact NLL of 8-bit mixture data."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from diffax.diffusion import schedules, vlb
from diffax.testing import mixtures

import np_schedules

_LN2 = math.log(2.0)


def _gaussian(dim: int, std: float) -> mixtures.GaussianMixture:
  """``N(0, std^2 I_dim)`` as a one-component mixture (so its model_fn is the exact denoiser)."""
  return mixtures.GaussianMixture(weights=jnp.ones((1,), jnp.float32), means=jnp.zeros((1, dim), jnp.float32),
                                  eigvecs=jnp.eye(dim, dtype=jnp.float32)[None],
                                  eigvals=jnp.full((1, dim), std**2, jnp.float32))


def _np_kl(m1, v1, m2, v2):
  return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2)**2) / v2 - 1.0)


def test_normal_kl_matches_numpy_and_quadrature():
  m1 = np.array([0.0, 0.3, -1.0, 2.0]); v1 = np.array([1.0, 0.01, 2.5, 1e-4])
  m2 = np.array([0.0, -0.2, 0.5, 2.0]); v2 = np.array([1.0, 0.04, 0.3, 2e-4])
  got = np.asarray(jax.jit(vlb.normal_kl)(*(jnp.asarray(a, jnp.float32) for a in (m1, np.log(v1), m2, np.log(v2)))))
  np.testing.assert_allclose(got, _np_kl(m1, v1, m2, v2), rtol=2e-5, atol=1e-6)
  assert got[0] == 0.0  # equal Gaussians: exactly zero (the expm1 form)
  for i in (1, 2):  # KL as the integral of p log(p / q)
    p, q = stats.norm(m1[i], math.sqrt(v1[i])), stats.norm(m2[i], math.sqrt(v2[i]))
    lo, hi = m1[i] - 12 * math.sqrt(v1[i]), m1[i] + 12 * math.sqrt(v1[i])
    ref = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), lo, hi)[0]
    np.testing.assert_allclose(got[i], ref, rtol=1e-5)


@pytest.mark.parametrize('mean,scale', [(0.0, 0.1), (0.9, 0.01), (-1.2, 0.3), (0.3, 1e-3), (0.0, 5.0),
                                        (0.5, 0.004)])
def test_discretized_gaussian_is_a_distribution_over_256_bins(mean, scale):
  x = np.arange(256) / 127.5 - 1.0
  logp = np.asarray(jax.jit(vlb.discretized_gaussian_log_likelihood)(
      jnp.asarray(x, jnp.float32), mean=jnp.float32(mean), log_scale=jnp.float32(math.log(scale))), np.float64)
  assert np.all(np.isfinite(logp))
  np.testing.assert_allclose(np.sum(np.exp(logp)), 1.0, atol=2e-5)
  # Reference from scipy in float64 (cdf below the mean, survival function above, to avoid cancellation).
  dist = stats.norm(mean, scale)
  lo, hi = x - 1 / 255, x + 1 / 255
  below = hi <= mean
  p = np.where(below, dist.cdf(hi) - dist.cdf(lo), dist.sf(lo) - dist.sf(hi))
  p[0], p[-1] = dist.cdf(hi[0]), dist.sf(lo[-1])
  ok = p > 1e-250
  np.testing.assert_allclose(logp[ok], np.log(p[ok]), rtol=1e-4, atol=2e-4)


def test_prior_kl_closed_form():
  rng = np.random.RandomState(0)
  x0 = rng.uniform(-1, 1, size=(5, 3, 2)).astype(np.float32)
  for schedule in (schedules.LinearSchedule(), schedules.VESDE(), schedules.CosineSchedule()):
    a, s = np_schedules.alpha_sigma(schedule, schedule.t_max)
    p2 = schedule.prior_std**2
    ref = _np_kl(a * x0.astype(np.float64), s**2, 0.0, p2).reshape(5, -1).sum(-1)
    got = jax.jit(lambda x: vlb.prior_kl(x, schedule=schedule))(jnp.asarray(x0))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-8)


_DIM, _STD = 4, 0.5


@pytest.mark.parametrize('schedule,variance', [
    (schedules.LinearSchedule(num_timesteps=100, beta_start=1e-3, beta_end=0.2), 'posterior'),
    (schedules.VPSDE(), 'large'),
])
def test_vlb_terms_match_closed_form_for_gaussian_data(schedule, variance):
  """Data ``N(0, s^2 I_D)`` and its exact denoiser ``x0_hat = k x_t``, ``k = alpha s^2 / (alpha^2 s^2 + sigma^2)``.

  Given ``x_0``, ``x_0 - x0_hat = (1 - k alpha) x_0 - k sigma eps``, so for ``n >= 1``

    E[L_n | x_0] = D/2 (log(v_p / beta_tilde) + beta_tilde / v_p - 1)
                   + c_x0^2 / (2 v_p) ((1 - k alpha)^2 ||x_0||^2 + D k^2 sigma^2),

  from a float64 numpy schedule; the prior term is checked per example. Conditioning on ``x_0`` leaves
  only the noise draws as MC error (measured: max |z| = 3.2 over the 99 levels, 0.7 for their sum).
  """
  num = 100
  batch = 1000
  gauss = _gaussian(_DIM, _STD)
  x0 = jnp.asarray(_STD * np.random.RandomState(0).randn(batch, _DIM), jnp.float32)
  run = jax.jit(lambda x, r: vlb.vlb_bpd(gauss.model_fn(schedule, 'eps'), x, r, schedule=schedule,
                                         variance=variance, num_timesteps=num, chunk_size=32))
  out = run(x0, jax.random.key(1))  # 100 levels in chunks of 32: the last chunk is padded
  terms = np.asarray(out['terms_bpd'], np.float64) * _DIM * _LN2  # [B, N] nats
  if isinstance(schedule, schedules.DiscreteSchedule):
    t = (np.arange(num) + 1.0) / num  # the knots
  else:
    t = np.linspace(schedule.t_min, schedule.t_max, num)
  a, s = np_schedules.alpha_sigma(schedule, t)
  a_s, s_s, a_t, s_t = a[:-1], s[:-1], a[1:], s[1:]
  beta = s_t**2 - (a_t / a_s)**2 * s_s**2
  beta_tilde = beta * s_s**2 / s_t**2
  c_x0 = a_s * beta / s_t**2
  v_p = beta_tilde if variance == 'posterior' else beta
  k = a_t * _STD**2 / (a_t**2 * _STD**2 + s_t**2)
  x0_sq = np.sum(np.asarray(x0, np.float64)**2, axis=1)[:, None]  # [B, 1]
  expected = (0.5 * _DIM * (np.log(v_p / beta_tilde) + beta_tilde / v_p - 1.0)
              + 0.5 * c_x0**2 / v_p * ((1 - k * a_t)**2 * x0_sq + _DIM * k**2 * s_t**2))  # [B, N - 1]
  resid = terms[:, 1:] - expected
  se = resid.std(0) / math.sqrt(batch)
  # 4.5 standard errors per level (99 levels; the largest of 99 normals rarely passes 3.5), plus slack
  # for float32 rounding of the tiny late terms.
  np.testing.assert_array_less(np.abs(resid.mean(0)), 4.5 * se + 1e-6 + 1e-3 * expected.mean(0))
  total = resid.sum(1)
  assert abs(total.mean()) < 4 * total.std() / math.sqrt(batch)
  prior = _np_kl(a[-1] * np.asarray(x0, np.float64), s[-1]**2, 0.0, 1.0).sum(-1)
  np.testing.assert_allclose(np.asarray(out['prior_bpd']) * _DIM * _LN2, prior, rtol=1e-3, atol=1e-9)
  bpd = (terms.sum(1) + prior) / (_DIM * _LN2)
  np.testing.assert_allclose(np.asarray(out['bpd']), bpd, rtol=1e-4)


def test_learned_range_endpoints_are_the_fixed_variances():
  """iDDPM eq. 15: v = -1 gives the (clipped) posterior variance, v = +1 the forward beta (n >= 1)."""
  schedule = schedules.CosineSchedule(num_timesteps=100)
  rng = np.random.RandomState(1)
  n = jnp.asarray([0, 1, 5, 50, 99, 3])
  x0 = jnp.asarray(np.round(rng.uniform(-1, 1, (6, 3, 2)) * 127.5) / 127.5, jnp.float32)
  x_t = jnp.asarray(rng.randn(6, 3, 2), jnp.float32)
  eps_hat = jnp.asarray(rng.randn(6, 3, 2), jnp.float32)

  @jax.jit
  def terms(v):
    out = {var: vlb.vlb_term(eps_hat, x0, x_t, n, schedule=schedule, variance=var) for var in ('posterior', 'large')}
    learned = vlb.vlb_term(jnp.concatenate([eps_hat, jnp.full_like(eps_hat, v)], axis=-1), x0, x_t, n,
                           schedule=schedule, variance='learned_range')
    return out, learned

  fixed, lo = terms(-1.0)
  _, hi = terms(1.0)
  np.testing.assert_allclose(lo, fixed['posterior'], rtol=1e-5)
  np.testing.assert_allclose(hi[1:], fixed['large'][1:], rtol=1e-5)
  assert np.all(np.asarray(fixed['large'][1:]) != np.asarray(fixed['posterior'][1:]))


def test_vlb_bounds_exact_nll_of_8bit_mixture_data():
  """1-D mixture data quantised to 8 bits; the continuous mixture's exact denoiser on DDPM's schedule.

  The VLB bounds the model's NLL, which bounds the data's exact discrete NLL (cross-entropy >= entropy),
  so E[VLB - NLL] >= 0 up to MC error. The measured gap is 0.29 +- 0.09 bits (variance 'large'; most of
  it from the smallest noise levels, where the continuous denoiser ignores the 8-bit grid); the upper
  limit of 0.6 bits catches a lost factor on any group of terms (the KL terms sum to about 4 bits).
  """
  w, mu, sd = np.array([0.3, 0.7]), np.array([-0.4, 0.35]), np.array([0.15, 0.08])
  mix = mixtures.GaussianMixture(weights=jnp.asarray(w, jnp.float32), means=jnp.asarray(mu[:, None], jnp.float32),
                                 eigvecs=jnp.ones((2, 1, 1), jnp.float32),
                                 eigvals=jnp.asarray(sd[:, None]**2, jnp.float32))
  rs = np.random.RandomState(0)
  labels = (rs.uniform(size=500) < w[1]).astype(int)
  x = mu[labels] + sd[labels] * rs.randn(500)
  k = np.clip(np.round((x + 1) * 127.5), 0, 255)
  x0 = k / 127.5 - 1
  lo = np.where(k == 0, -np.inf, x0 - 1 / 255)
  hi = np.where(k == 255, np.inf, x0 + 1 / 255)
  prob = (w * (stats.norm.cdf((hi[:, None] - mu) / sd) - stats.norm.cdf((lo[:, None] - mu) / sd))).sum(-1)
  nll_bits = -np.log(prob) / _LN2
  schedule = schedules.LinearSchedule()
  out = jax.jit(lambda x, r: vlb.vlb_bpd(mix.model_fn(schedule, 'eps'), x, r, schedule=schedule, variance='large',
                                         chunk_size=100))(jnp.asarray(x0[:, None], jnp.float32), jax.random.key(1))
  gap = np.asarray(out['bpd'], np.float64) - nll_bits
  se = gap.std() / math.sqrt(gap.size)
  assert gap.mean() > -3 * se
  assert gap.mean() < 0.6
