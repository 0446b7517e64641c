"""Parameterisations: exact round trips, EDM Table 1, Tweedie consistency and guidance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.diffusion import parameterization, schedules
from diffax.testing import checks, mixtures

SCHEDULES = [schedules.LinearSchedule(), schedules.VPSDE(), schedules.VESDE(), schedules.EDM()]
IDS = ['linear', 'vp', 've', 'edm']


def _state(schedule, n=64):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  t = jax.random.uniform(k1, (n,), minval=schedule.t_min, maxval=schedule.t_max)
  x0 = jax.random.normal(k2, (n, 3))
  eps = jax.random.normal(k3, (n, 3))
  alpha, sigma = schedule.alpha_sigma(t)
  return x0, eps, alpha[:, None] * x0 + sigma[:, None] * eps, t, alpha, sigma


@pytest.mark.parametrize('schedule', SCHEDULES, ids=IDS)
@pytest.mark.parametrize('prediction', parameterization.PREDICTIONS)
def test_round_trip(schedule, prediction):
  x0, eps, x_t, _, alpha, sigma = _state(schedule)
  out = parameterization.output_from_x0_eps(prediction, x0, eps, x_t, alpha, sigma)
  x0_back, eps_back = jax.jit(parameterization.x0_eps_from_output, static_argnums=0)(prediction, out, x_t, alpha,
                                                                                     sigma)
  scale = 1.0 / np.asarray(alpha)[:, None]  # x0 from x_t loses precision in proportion to 1 / alpha.
  np.testing.assert_allclose(x0_back, x0, atol=1e-4 * scale.max() + 1e-5, rtol=1e-4)
  np.testing.assert_allclose(eps_back, eps, atol=2e-3, rtol=1e-3)


def test_v_matches_progressive_distillation():
  """Salimans & Ho 2022, sec. 4 (VP): v = alpha eps - sigma x0 and x0 = alpha z - sigma v."""
  schedule = schedules.CosineSchedule()
  x0, eps, x_t, _, alpha, sigma = _state(schedule)
  v = parameterization.output_from_x0_eps('v', x0, eps, x_t, alpha, sigma)
  a, s = np.asarray(alpha)[:, None], np.asarray(sigma)[:, None]
  np.testing.assert_allclose(v, a * np.asarray(eps) - s * np.asarray(x0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(a * np.asarray(x_t) - s * np.asarray(v), x0, rtol=1e-4, atol=1e-4)


def test_edm_preconditioning_table_1():
  sigma = np.geomspace(0.002, 80, 11)
  sd = 0.5
  c_skip, c_out, c_in, c_noise = parameterization.edm_preconditioning(jnp.asarray(sigma, jnp.float32), sd)
  np.testing.assert_allclose(c_skip, sd**2 / (sigma**2 + sd**2), rtol=1e-5)
  np.testing.assert_allclose(c_out, sigma * sd / np.sqrt(sigma**2 + sd**2), rtol=1e-5)
  np.testing.assert_allclose(c_in, 1 / np.sqrt(sigma**2 + sd**2), rtol=1e-5)
  np.testing.assert_allclose(c_noise, np.log(sigma) / 4, rtol=1e-5, atol=1e-6)


def test_edm_targets_have_unit_variance():
  """EDM app. B.6: with Var(x0) = sigma_data^2, both the network input and its training target have unit variance."""
  rng = jax.random.split(jax.random.PRNGKey(1), 2)
  x0 = 0.5 * jax.random.normal(rng[0], (200_000,))
  eps = jax.random.normal(rng[1], (200_000,))
  for s in (0.01, 0.5, 10.0):
    sigma = jnp.full((200_000,), s)
    alpha = jnp.ones_like(sigma)
    x_t = x0 + s * eps
    target = parameterization.output_from_x0_eps('edm', x0[:, None], eps[:, None], x_t[:, None], alpha, sigma)
    x_in, _ = parameterization.model_inputs('edm', x_t[:, None], sigma, alpha, sigma)
    assert float(jnp.var(target)) == pytest.approx(1.0, rel=0.02)
    assert float(jnp.var(x_in)) == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize('schedule', SCHEDULES, ids=IDS)
@pytest.mark.parametrize('prediction', parameterization.PREDICTIONS)
def test_every_prediction_denoises_to_the_exact_posterior_mean(schedule, prediction):
  mixture = mixtures.ring_mixture()
  _, _, x_t, t, alpha, sigma = _state(schedule)
  x_t = x_t[:, :2]
  model_fn = mixture.model_fn(schedule, prediction)
  x0_hat, eps_hat = jax.jit(lambda x, t: parameterization.denoise(
      model_fn, x, t, schedule=schedule, prediction=prediction))(x_t, t)
  expected = mixture.posterior_mean(x_t, alpha, sigma)
  np.testing.assert_allclose(x0_hat, expected, atol=2e-3 / float(alpha.min()), rtol=1e-3)
  np.testing.assert_allclose(alpha[:, None] * x0_hat + sigma[:, None] * eps_hat, x_t, rtol=1e-4, atol=1e-4)


def test_bf16_model_keeps_fp32_schedule_maths():
  """A bf16 network output is cast up before any schedule arithmetic: x0_hat equals the float64 conversion of
  the bf16-rounded eps, so the only error is the network's own rounding, not bf16 schedule maths."""
  schedule = schedules.VPSDE()
  exact = mixtures.ring_mixture().model_fn(schedule, 'eps')
  bf16 = checks.bf16_model(exact)
  _, _, x_t, t, alpha, sigma = _state(schedule)
  x_t = x_t[:, :2]
  x0_16, eps_16 = jax.jit(lambda x, t: parameterization.denoise(bf16, x, t, schedule=schedule))(x_t, t)
  assert x0_16.dtype == eps_16.dtype == jnp.float32
  eps_rounded = np.asarray(bf16(x_t, t).astype(jnp.float32), np.float64)
  a, s = np.asarray(alpha, np.float64)[:, None], np.asarray(sigma, np.float64)[:, None]
  x0_ref = (np.asarray(x_t, np.float64) - s * eps_rounded) / a
  np.testing.assert_allclose(eps_16, eps_rounded, rtol=0, atol=0)
  np.testing.assert_allclose(x0_16, x0_ref, rtol=1e-5, atol=1e-5 / a.min())


def test_classifier_free_guidance_is_linear_and_one_call():
  calls = []

  def model_fn(x, t, cond):
    calls.append(x.shape)
    return x * cond[:, None] + t[:, None]

  x, t = jnp.ones((3, 2)), jnp.arange(3.0)
  cond, null = jnp.full((3,), 2.0), jnp.zeros((3,))
  out = {w: parameterization.classifier_free_guidance(model_fn, cond=cond, null_cond=null, scale=w)(x, t)
         for w in (0.0, 1.0, 3.0)}
  assert calls == [(6, 2)] * 3
  np.testing.assert_allclose(out[0.0], model_fn(x, t, null))
  np.testing.assert_allclose(out[1.0], model_fn(x, t, cond))
  np.testing.assert_allclose(out[3.0], out[0.0] + 3 * (out[1.0] - out[0.0]))


def test_unknown_prediction_is_rejected():
  with pytest.raises(ValueError, match='eps'):
    parameterization.check_prediction('noise')
