"""Schedules against the papers' numbers, the SDEs' moment equations and numpy/scipy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from diffax.diffusion import schedules

ALL = [
    schedules.LinearSchedule(),
    schedules.CosineSchedule(),
    schedules.VPSDE(),
    schedules.SubVPSDE(),
    schedules.VESDE(),
    schedules.EDM(),
]
IDS = ['linear', 'cosine', 'vp', 'subvp', 've', 'edm']


def _times(schedule, n=17):
  return jnp.asarray(np.linspace(schedule.t_min, schedule.t_max, n), jnp.float32)


def test_ddpm_linear_matches_paper():
  s = schedules.LinearSchedule()
  betas = np.linspace(1e-4, 0.02, 1000)
  abar = np.cumprod(1 - betas)
  np.testing.assert_allclose(s.alphas_cumprod(), abar, rtol=1e-12)
  # Ho et al. 2020: alpha_bar_T = 4.04e-5 (L_T ~ 1e-5 bits/dim).
  assert abar[-1] == pytest.approx(4.04e-5, rel=0.01)
  alpha, sigma = s.alpha_sigma(s.timestep_to_t(jnp.arange(1000)))
  np.testing.assert_allclose(np.square(alpha), abar, rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(np.square(sigma), 1 - abar, rtol=2e-4, atol=1e-7)


def test_cosine_matches_iddpm_formula():
  s = schedules.CosineSchedule()
  t = np.arange(1001) / 1000
  f = np.cos((t + 0.008) / 1.008 * np.pi / 2)**2
  abar_formula = (f / f[0])[1:]
  abar = s.alphas_cumprod()
  # Betas are clipped at 0.999 only at the very end (iDDPM sec. 3.2): elsewhere the formula holds exactly.
  betas = s.betas()
  clipped = betas >= 0.999
  assert clipped[-1] and clipped.sum() < 5
  np.testing.assert_allclose(abar[~clipped], abar_formula[~clipped], rtol=1e-10)
  assert betas.max() == pytest.approx(0.999)


def test_discrete_time_index_round_trip():
  s = schedules.LinearSchedule()
  n = jnp.arange(1000)
  np.testing.assert_array_equal(s.t_to_timestep(s.timestep_to_t(n)), n)


@pytest.mark.parametrize('schedule', ALL, ids=IDS)
def test_log_snr_is_decreasing_and_invertible(schedule):
  t = _times(schedule)
  log_snr = schedule.log_snr(t)
  assert np.all(np.diff(np.asarray(log_snr)) < 0)
  alpha, sigma = schedule.alpha_sigma(t)
  np.testing.assert_allclose(log_snr, 2 * np.log(alpha / sigma), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(schedule.t_from_log_snr(log_snr), t, rtol=1e-4, atol=1e-5 * schedule.t_max)


def _paper_sde(schedule, t):
  """(f(t), g(t)^2) exactly as the papers write them, independent of alpha_sigma."""
  if isinstance(schedule, schedules.SubVPSDE):
    beta = schedule.beta_min + t * (schedule.beta_max - schedule.beta_min)
    b = schedule.beta_min * t + 0.5 * (schedule.beta_max - schedule.beta_min) * t**2
    return -0.5 * beta, beta * (1 - np.exp(-2 * b))  # Song et al. eq. 12
  if isinstance(schedule, schedules.VPSDE):
    beta = schedule.beta_min + t * (schedule.beta_max - schedule.beta_min)
    return -0.5 * beta, beta  # eq. 11
  if isinstance(schedule, schedules.VESDE):
    sigma = schedule.sigma_min * (schedule.sigma_max / schedule.sigma_min)**t
    return 0.0 * t, sigma**2 * 2 * np.log(schedule.sigma_max / schedule.sigma_min)  # eq. 9
  if isinstance(schedule, schedules.EDM):
    return 0.0 * t, 2 * t  # EDM eq. 6 with sigma(t) = t: g^2 = 2 sigma' sigma
  raise TypeError(schedule)


@pytest.mark.parametrize('schedule', ALL[2:], ids=IDS[2:])
def test_sde_coefficients_match_papers(schedule):
  t = np.linspace(max(schedule.t_min, 0.05), schedule.t_max, 9)
  f, g2 = schedule.sde(jnp.asarray(t, jnp.float32))
  f_ref, g2_ref = _paper_sde(schedule, t)
  np.testing.assert_allclose(f, f_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(g2, g2_ref, rtol=1e-3)


@pytest.mark.parametrize('schedule', ALL[2:5], ids=IDS[2:5])
def test_marginal_moments_solve_the_sde(schedule):
  """Mean coefficient m and variance v of x_t | x_0 obey dm/dt = f m, dv/dt = 2 f v + g^2 (Sarkka & Solin eq. 5.51)."""

  def moments(t, y):
    f, g2 = _paper_sde(schedule, t)
    return [f * y[0], 2 * f * y[1] + g2]

  t0 = 0.0
  m0, v0 = 1.0, (schedule.sigma_min**2 if isinstance(schedule, schedules.VESDE) else 0.0)
  t_eval = np.linspace(0.1, 1.0, 10)
  sol = integrate.solve_ivp(moments, (t0, 1.0), [m0, v0], t_eval=t_eval, rtol=1e-10, atol=1e-12)
  alpha, sigma = schedule.alpha_sigma(jnp.asarray(t_eval, jnp.float32))
  np.testing.assert_allclose(alpha, sol.y[0], rtol=1e-5)
  np.testing.assert_allclose(np.square(sigma), sol.y[1], rtol=1e-4)


def test_linear_ddpm_is_the_vp_sde_discretisation():
  """Song et al. app. B: DDPM's betas are beta(t) dt of the VP SDE, so -log alpha_bar ~ int beta within the
  O(beta) discretisation error (-log(1 - beta) = beta + beta^2 / 2 + ..., beta <= 0.02)."""
  ddpm, vp = schedules.LinearSchedule(), schedules.VPSDE()
  t = jnp.linspace(0.1, 1.0, 10)
  np.testing.assert_allclose(-2 * np.log(ddpm.alpha_sigma(t)[0]), vp.integral_beta(t), rtol=0.011)


def test_edm_constants_and_discretisation():
  s = schedules.EDM()
  sigmas = np.asarray(s.sigma_steps(18))
  i = np.arange(18)
  ref = (80**(1 / 7) + i / 17 * (0.002**(1 / 7) - 80**(1 / 7)))**7
  np.testing.assert_allclose(sigmas, ref, rtol=1e-5)
  assert sigmas[0] == pytest.approx(80.0) and sigmas[-1] == pytest.approx(0.002)
  log_sigma = np.log(np.asarray(s.training_sigma(jax.random.PRNGKey(0), (200_000,))))
  assert log_sigma.mean() == pytest.approx(-1.2, abs=0.01)
  assert log_sigma.std() == pytest.approx(1.2, abs=0.01)


def test_posterior_matches_ddpm_eq_7():
  s = schedules.LinearSchedule()
  betas, abar = s.betas(), s.alphas_cumprod()
  n = np.arange(1, 1000)
  c_x0, c_xt, var = s.posterior(s.timestep_to_t(jnp.asarray(n - 1)), s.timestep_to_t(jnp.asarray(n)))
  np.testing.assert_allclose(c_x0, np.sqrt(abar[n - 1]) * betas[n] / (1 - abar[n]), rtol=2e-3)
  np.testing.assert_allclose(c_xt, np.sqrt(1 - betas[n]) * (1 - abar[n - 1]) / (1 - abar[n]), rtol=2e-3)
  np.testing.assert_allclose(var, (1 - abar[n - 1]) / (1 - abar[n]) * betas[n], rtol=2e-3)


@pytest.mark.parametrize('schedule', ALL, ids=IDS)
def test_prior(schedule):
  z = schedule.prior_sample(jax.random.PRNGKey(0), (4, 3, 5))
  ref = stats.norm(scale=schedule.prior_std).logpdf(np.asarray(z, np.float64)).reshape(4, -1).sum(-1)
  np.testing.assert_allclose(schedule.prior_logp(z), ref, rtol=1e-5)
  alpha_T, sigma_T = schedule.alpha_sigma(jnp.float32(schedule.t_max))
  # The prior is the marginal at t_max for data of unit scale, up to the schedule's residual signal.
  assert float(sigma_T) == pytest.approx(schedule.prior_std, rel=1e-3)
  assert float(alpha_T) < 0.01 * schedule.prior_std or float(alpha_T) == 1.0


@pytest.mark.parametrize('schedule', ALL, ids=IDS)
def test_jit_vmap_and_marginal(schedule):
  t = _times(schedule, 4)
  jitted = jax.jit(schedule.alpha_sigma)(t)
  mapped = jax.vmap(schedule.alpha_sigma)(t)
  np.testing.assert_allclose(jitted[0], mapped[0], rtol=1e-6)
  x0, noise = jnp.ones((4, 2, 2)), jnp.full((4, 2, 2), 2.0)
  x_t = jax.jit(schedule.marginal)(x0, t, noise)
  np.testing.assert_allclose(x_t[:, 0, 0], jitted[0] + 2 * jitted[1], rtol=1e-6)


def test_registry_errors_name_the_choices():
  assert isinstance(schedules.get_schedule('ve', sigma_max=80.0), schedules.VESDE)
  with pytest.raises(ValueError, match='linear'):
    schedules.get_schedule('quadratic')


def test_subvp_variance_is_below_vp():
  t = jnp.linspace(0.01, 1.0, 20)
  assert np.all(np.asarray(schedules.SubVPSDE().alpha_sigma(t)[1]) < np.asarray(schedules.VPSDE().alpha_sigma(t)[1]))
  assert math.isclose(float(schedules.VESDE().alpha_sigma(jnp.float32(1.0))[1]), 50.0, rel_tol=1e-5)
