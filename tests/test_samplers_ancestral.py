"""Ancestral DDPM against closed forms: Ho et al.'s recursion on a Gaussian, and exact Gaussian mixtures.

For Gaussian data ``N(m0, v0)`` the exact denoiser is affine, so the DDPM chain stays Gaussian and its final
mean and variance follow from DDPM eq. 6-7 (respaced: iDDPM sec. 4, ``beta = 1 - alpha_bar_t /
alpha_bar_s``) in float64: an independent reference for the visited timesteps and both variance choices.
The same recursion, applied per mode and eigen-direction, predicts the sharpness of mixture samples:
DDPM with ``beta~`` and the exact x0-model is *not* exact at finite T (each step drops ``Var[x0 | x_t]``),
and the recursion says by how much.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.diffusion import schedules
from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import ancestral, base
from diffax.testing import checks, metrics, mixtures

LINEAR = schedules.LinearSchedule()
SMALL_T = schedules.LinearSchedule(num_timesteps=100, beta_start=1e-3, beta_end=0.2)
MIXTURES = {'ring': mixtures.ring_mixture(), 'aniso': mixtures.anisotropic_mixture()}
N_SAMPLES = {'ring': 4000, 'aniso': 2000}


def gaussian(mean: float, var: float) -> mixtures.GaussianMixture:
  """1-D ``N(mean, var)`` as a one-component mixture (exact affine denoiser)."""
  return mixtures.GaussianMixture(weights=jnp.ones((1,)), means=jnp.full((1, 1), mean), eigvecs=jnp.ones((1, 1, 1)),
                                  eigvals=jnp.full((1, 1), var))


def visited(num_timesteps: int, num_steps: int, spacing: str) -> np.ndarray:
  """0-based timestep indices visited, by the diffusers conventions (independent of ``base.time_grid``)."""
  if spacing == 'trailing':
    return np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)).astype(int) - 1
  return np.round(np.linspace(num_timesteps - 1, 0, num_steps)).astype(int)


def ddpm_moments(alphas_cumprod, steps, variance, m0, v0):
  """Final mean and variance of DDPM Alg. 2 with the exact denoiser of ``N(m0, v0)`` data, from N(0, 1).

  ``v0`` may be an array (one recursion per variance). Each step n -> prev (``alpha_bar_prev = 1`` after
  the last visited step, where no noise is added) applies DDPM eq. 7 with ``beta = 1 - alpha_bar_n /
  alpha_bar_prev``.
  """
  mean, var = 0.0, np.ones_like(np.asarray(v0, np.float64))
  for i, n in enumerate(steps):
    abar = alphas_cumprod[n]
    abar_prev = alphas_cumprod[steps[i + 1]] if i + 1 < len(steps) else 1.0
    beta = 1.0 - abar / abar_prev
    gain = np.sqrt(abar) * v0 / (abar * v0 + 1.0 - abar)  # x0_hat = m0 + gain (x_t - sqrt(abar) m0)
    coef_x0 = np.sqrt(abar_prev) * beta / (1.0 - abar)
    coef_xt = np.sqrt(1.0 - beta) * (1.0 - abar_prev) / (1.0 - abar)
    step_var = beta * (1.0 - abar_prev) / (1.0 - abar) if variance == 'posterior' else beta
    step_var = step_var if i + 1 < len(steps) else 0.0
    mean = coef_x0 * (m0 + gain * (mean - np.sqrt(abar) * m0)) + coef_xt * mean
    var = (coef_xt + coef_x0 * gain)**2 * var + step_var
  return mean, var


@functools.cache
def sampler(variance, num_steps=None, mixture_name='ring', trajectory=False, bf16=False):
  """One compiled ``rng -> SampleOutput`` on ``LINEAR`` per configuration, shared by the tests below."""
  mixture = MIXTURES[mixture_name]
  model_fn = mixture.model_fn(LINEAR)
  if bf16:
    model_fn = checks.bf16_model(model_fn)
  return jax.jit(lambda rng: ancestral.ancestral_sample(
      Denoiser(model_fn, LINEAR), rng, (N_SAMPLES[mixture_name], mixture.dim), variance=variance,
      num_steps=num_steps, return_trajectory=trajectory))


@pytest.mark.parametrize('schedule,num_steps,spacing,variance', [(SMALL_T, None, 'trailing', 'posterior'),
                                                                 (LINEAR, 40, 'linspace', 'large')],
                         ids=['all-knots-posterior', 'respaced-large'])
def test_gaussian_moments_follow_the_ddpm_recursion(schedule, num_steps, spacing, variance):
  """Default: every knot T-1, ..., 0; respaced: iDDPM betas. 20k samples: 4 sigmas of the variance is 4%.

  The data mean 3 lies outside [-1, 1]: it survives because nothing clips unless ``clip_x0`` is given.
  """
  m0, v0, n = 3.0, 0.01, 20_000
  steps = visited(schedule.num_timesteps, num_steps or schedule.num_timesteps, spacing)
  mean, var = ddpm_moments(schedule.alphas_cumprod(), steps, variance, m0, v0)
  model_fn = gaussian(m0, v0).model_fn(schedule)
  out = jax.jit(lambda rng: ancestral.ancestral_sample(Denoiser(model_fn, schedule), rng, (n, 1), variance=variance,
                                                        num_steps=num_steps, spacing=spacing))(jax.random.PRNGKey(0))
  assert out.nfe == len(steps)
  assert float(jnp.mean(out.samples)) == pytest.approx(mean, abs=4 * np.sqrt(var / n))
  assert float(jnp.var(out.samples)) == pytest.approx(var, rel=4 * np.sqrt(2 / n))


def predicted_sharpness(mixture, steps, variance):
  """Weighted mean over modes and eigen-directions of the recursion's variance ratio ``var / v0``."""
  eigvals = np.asarray(mixture.eigvals, np.float64)
  _, var = ddpm_moments(LINEAR.alphas_cumprod(), steps, variance, 0.0, eigvals)
  return float(np.asarray(mixture.weights, np.float64) @ np.mean(var / eigvals, axis=-1))


@pytest.mark.parametrize('mixture_name,variance,num_steps', [
    ('ring', 'posterior', None),
    ('ring', 'large', 250),
    ('aniso', 'large', None),
], ids=['ring-posterior-1000', 'ring-large-250', 'aniso-large-1000'])
def test_mixture_reaches_the_floor_with_the_predicted_sharpness(mixture_name, variance, num_steps):
  """Weights, mean, covariance and SW at the noise floor; sharpness as the per-mode recursion predicts.

  Measured sharpness (predicted): ring posterior/1000 0.931 (0.928), ring large/250 1.085 (1.054), aniso
  large/1000 1.012 (1.008). Tolerance: 4 sigmas of the mean of chi^2_D / D over n samples, plus 0.005 for
  the mixture not being exactly one Gaussian per mode.
  """
  mixture, n = MIXTURES[mixture_name], N_SAMPLES[mixture_name]
  floor, reference = metrics.noise_floor(mixture, n, jax.random.PRNGKey(1))
  out = sampler(variance, num_steps, mixture_name)(jax.random.PRNGKey(0))
  assert out.nfe == (num_steps or 1000)
  report = metrics.mixture_report(out.samples, mixture, reference, jax.random.PRNGKey(2))
  checks.assert_at_floor(report, floor, mixture, n)
  expected = predicted_sharpness(mixture, visited(1000, num_steps or 1000, 'trailing'), variance)
  tol = 4 * expected * checks.sharpness_stderr(mixture.dim, n) + 0.005
  assert report['sharpness'] == pytest.approx(expected, abs=tol)


def test_error_shrinks_as_steps_grow():
  """Respaced 10 / 50 / 200 'posterior' steps on the ring. Measured: sharpness 3.03 / 0.69 / 0.80,
  covariance error 0.264 / 0.048 / 0.019, SW 0.128 / 0.037 / 0.025."""
  mixture, n = MIXTURES['ring'], N_SAMPLES['ring']
  _, reference = metrics.noise_floor(mixture, n, jax.random.PRNGKey(1))
  runs = [sampler('posterior', k, trajectory=True)(jax.random.PRNGKey(0)) for k in (10, 50, 200)]
  reports = [metrics.mixture_report(out.samples, mixture, reference, jax.random.PRNGKey(2)) for out in runs]
  sharpness_err = [abs(r['sharpness'] - 1.0) for r in reports]
  cov_err = [r['cov_err'] for r in reports]
  sw = [r['sw'] for r in reports]
  assert sharpness_err[0] > sharpness_err[1] > sharpness_err[2], sharpness_err
  assert cov_err[0] > cov_err[1] > cov_err[2], cov_err
  assert sw[0] > sw[1] > sw[2], sw


def test_last_step_returns_the_x0_prediction_and_the_trajectory():
  """One model call per visited time; the sample is E[x0 | x_t] at the last one (t = 1/10), noise-free."""
  mixture = MIXTURES['ring']
  out = sampler('posterior', 10, trajectory=True)(jax.random.PRNGKey(0))
  assert out.nfe == 10 and out.trajectory.shape == (11, N_SAMPLES['ring'], 2)
  t_last = base.time_grid(LINEAR, 10, 'trailing')[-2]
  alpha, sigma = LINEAR.alpha_sigma(t_last)
  np.testing.assert_allclose(out.samples, mixture.posterior_mean(out.trajectory[-2], alpha, sigma), atol=1e-5)
  np.testing.assert_array_equal(out.trajectory[-1], out.samples)


def test_given_x_T_jit_equals_eager_and_rng_drives_the_noise():
  model_fn = MIXTURES['ring'].model_fn(LINEAR)
  x_T = jax.random.normal(jax.random.PRNGKey(3), (16, 2))
  run = functools.partial(ancestral.ancestral_sample, Denoiser(model_fn, LINEAR), shape=(16, 2), num_steps=10,
                          x_T=x_T)
  eager = run(jax.random.PRNGKey(0)).samples
  jitted = jax.jit(run)
  np.testing.assert_allclose(jitted(jax.random.PRNGKey(0)).samples, eager, atol=1e-6)
  assert not np.allclose(jitted(jax.random.PRNGKey(1)).samples, eager, atol=1e-3)


def test_bf16_model_is_close_to_fp32():
  """bf16 keeps 8 mantissa bits (rounding 4e-3 relative): with the same noise the median sample moves ~1e-3,
  far below the mode std 0.1; a path near the boundary between two modes may switch, so the tail is bounded
  by counting."""
  exact = sampler('posterior', 10, trajectory=True)(jax.random.PRNGKey(0)).samples
  err = np.abs(np.asarray(sampler('posterior', 10, bf16=True)(jax.random.PRNGKey(0)).samples - exact))
  assert np.median(err) < 5e-3 and np.mean(err > 0.05) < 0.02, (np.median(err), np.mean(err > 0.05))


def test_clip_x0_clips_the_final_prediction():
  """Modes at +-3 come out at +-1: the last step returns the clipped x0-prediction."""
  model_fn = gaussian(3.0, 0.01).model_fn(LINEAR)
  denoiser = Denoiser(model_fn, LINEAR, clip_x0=1.0)
  samples = jax.jit(lambda rng: ancestral.ancestral_sample(denoiser, rng, (512, 1), num_steps=20).samples)(
      jax.random.PRNGKey(0))
  np.testing.assert_array_equal(samples, 1.0)


def test_unknown_variance_is_rejected():
  with pytest.raises(ValueError, match='posterior'):
    ancestral.ancestral_sample(Denoiser(lambda x, t: x, LINEAR), jax.random.PRNGKey(0), (2, 1), variance='learned')
