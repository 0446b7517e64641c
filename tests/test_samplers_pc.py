"""Predictor-corrector sampling against closed forms: Gaussian recursions, the Langevin step-size rule, mixtures.

For Gaussian data ``N(m0, v0)`` the score is affine, so every predictor step maps a Gaussian to a Gaussian:
the final mean and variance follow in float64 from the closed-form ``alpha_t``, ``sigma_t``, ``f`` and ``g^2``
of each SDE (Song et al. 2021, eq. 9-12, 29-31), independent of the library's autodiff SDE coefficients.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.diffusion import schedules
from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import pc
from diffax.testing import checks, metrics, mixtures

VP, SUBVP, VE = schedules.VPSDE(), schedules.SubVPSDE(), schedules.VESDE()
RING, ANISO = mixtures.ring_mixture(), mixtures.anisotropic_mixture()
MIXTURES = {'ring': RING, 'aniso': ANISO}
N_SAMPLES = {'ring': 2000, 'aniso': 2000}


def gaussian(mean: float, var: float) -> mixtures.GaussianMixture:
  """1-D ``N(mean, var)`` as a one-component mixture (exact affine score)."""
  return mixtures.GaussianMixture(weights=jnp.ones((1,)), means=jnp.full((1, 1), mean), eigvecs=jnp.ones((1, 1, 1)),
                                  eigvals=jnp.full((1, 1), var))


def sde_closed_form(schedule, t):
  """``(alpha_t, sigma_t, f(t), g(t)^2)`` in float64 from the paper's formulas."""
  if isinstance(schedule, schedules.VESDE):
    log_ratio = np.log(schedule.sigma_max / schedule.sigma_min)
    sigma = schedule.sigma_min * np.exp(t * log_ratio)
    return 1.0, sigma, 0.0, 2.0 * sigma**2 * log_ratio
  beta = schedule.beta_min + t * (schedule.beta_max - schedule.beta_min)
  integral = schedule.beta_min * t + 0.5 * (schedule.beta_max - schedule.beta_min) * t**2
  alpha = np.exp(-0.5 * integral)
  if isinstance(schedule, schedules.SubVPSDE):
    return alpha, 1.0 - alpha**2, -0.5 * beta, beta * (1.0 - alpha**4)
  return alpha, np.sqrt(1.0 - alpha**2), -0.5 * beta, beta


def pc_moments(schedule, predictor, num_steps, m0, v0):
  """Mean and variance after ``num_steps`` predictor steps (no corrector) and Tweedie's denoising step."""
  ts = np.linspace(schedule.t_max, schedule.t_min, num_steps + 1)
  mean, var = 0.0, schedule.prior_std**2
  for t, s in zip(ts[:-1], ts[1:]):
    alpha_t, sigma_t, f, g2 = sde_closed_form(schedule, t)
    marginal_var = alpha_t**2 * v0 + sigma_t**2  # score(x) = -(x - alpha_t m0) / marginal_var
    if predictor == 'euler_maruyama':  # x + (f x - g^2 score) dt + g sqrt(-dt) z
      dt = s - t
      gain, shift, noise_var = 1.0 + (f + g2 / marginal_var) * dt, -g2 * alpha_t * m0 / marginal_var * dt, -g2 * dt
    else:  # (2 - a) x + G^2 score + G z, forward step x_t = a x_s + G z (Alg. 2 for VE, Alg. 3 for VP)
      alpha_s, sigma_s, _, _ = sde_closed_form(schedule, s)
      a = alpha_t / alpha_s
      big_g2 = sigma_t**2 - a**2 * sigma_s**2
      gain, shift, noise_var = 2.0 - a - big_g2 / marginal_var, big_g2 * alpha_t * m0 / marginal_var, big_g2
    mean, var = gain * mean + shift, gain**2 * var + noise_var
  alpha, sigma, _, _ = sde_closed_form(schedule, ts[-1])
  k = alpha * v0 / (alpha**2 * v0 + sigma**2)  # x0_hat = m0 + k (x - alpha m0)
  return m0 + k * (mean - alpha * m0), k**2 * var


@pytest.mark.parametrize('schedule,predictor', [(VP, 'euler_maruyama'), (SUBVP, 'reverse_diffusion'),
                                                (VE, 'reverse_diffusion')], ids=['vp-em', 'subvp-rd', 've-rd'])
def test_predictor_moments_follow_the_closed_form_recursion(schedule, predictor):
  """20 coarse steps, so the discretisation shows; 20k samples: 4 sigmas of the variance is 4%.

  The data mean 3 lies outside [-1, 1]: it survives because nothing clips unless ``clip_x0`` is given.
  """
  m0, v0, n, num_steps = 3.0, 0.04, 20_000, 20
  mean, var = pc_moments(schedule, predictor, num_steps, m0, v0)
  model_fn = gaussian(m0, v0).model_fn(schedule)
  out = jax.jit(lambda rng: pc.pc_sample(Denoiser(model_fn, schedule), rng, (n, 1), num_steps=num_steps,
                                         predictor=predictor, corrector='none'))(jax.random.PRNGKey(0))
  assert out.nfe == num_steps + 1
  assert float(jnp.mean(out.samples)) == pytest.approx(mean, abs=4 * np.sqrt(var / n))
  assert float(jnp.var(out.samples)) == pytest.approx(var, rel=4 * np.sqrt(2 / n))


def test_langevin_step_size_rule_has_the_predicted_fixed_point():
  """Langevin at one level of a Gaussian ``N(0, v)`` with ``eps = 2 (snr ||z|| / ||s||)^2`` (batch means).

  With the batch's ``mean |s| = sqrt(2 V / pi) / v`` when the samples have variance V, ``eps = 2 snr^2 v^2 / V``
  and one step maps ``V -> (1 - eps / v)^2 V + 2 eps``, whose fixed point is ``V = v (1 + snr^2)``: 1.25 v for
  snr = 0.5, reached from V = v in one step (per-example step sizes would give heavy tails instead).
  """
  snr, n = 0.5, 20_000
  _, sigma = VE.alpha_sigma(VE.t_min)
  v = 1.0 + float(sigma)**2
  x_T = jnp.sqrt(v) * jax.random.normal(jax.random.PRNGKey(3), (n, 1))
  out = jax.jit(lambda rng: pc.pc_sample(Denoiser(gaussian(0.0, 1.0).model_fn(VE), VE), rng, (n, 1), num_steps=1,
                                         predictor='none', snr=snr, n_corrector_steps=10, denoise=False,
                                         t_start=VE.t_min, x_T=x_T, return_trajectory=True))(jax.random.PRNGKey(0))
  assert out.nfe == 10 and out.trajectory.shape == (2, n, 1)
  assert float(jnp.var(out.samples)) == pytest.approx(v * (1 + snr**2), rel=4 * np.sqrt(2 / n))


def sampler(schedule, num_steps, mixture_name='ring', predictor='reverse_diffusion', corrector='langevin',
            bf16=False):
  """``rng -> SampleOutput`` with trajectory (Langevin at snr 0.16), compiled once per configuration."""
  return _compiled(schedule, num_steps, mixture_name, predictor, corrector, bf16)


@functools.cache
def _compiled(schedule, num_steps, mixture_name, predictor, corrector, bf16):
  mixture = MIXTURES[mixture_name]
  model_fn = mixture.model_fn(schedule)
  if bf16:
    model_fn = checks.bf16_model(model_fn)
  return jax.jit(lambda rng: pc.pc_sample(Denoiser(model_fn, schedule), rng, (N_SAMPLES[mixture_name], mixture.dim),
                                          num_steps=num_steps, predictor=predictor, corrector=corrector,
                                          return_trajectory=True))


@functools.cache
def noise_floor(mixture_name):
  """``(floor, reference)`` of exact samples, computed once per mixture."""
  return metrics.noise_floor(MIXTURES[mixture_name], N_SAMPLES[mixture_name], jax.random.PRNGKey(1))


@pytest.mark.parametrize('schedule,num_steps,predictor,corrector,mixture_name', [
    (VP, 1000, 'reverse_diffusion', 'langevin', 'ring'),
    (SUBVP, 1000, 'euler_maruyama', 'none', 'ring'),
    (VE, 300, 'reverse_diffusion', 'langevin', 'ring'),
    (VE, 300, 'reverse_diffusion', 'langevin', 'aniso'),
], ids=['vp-ring', 'subvp-em-ring', 've-ring', 've-aniso'])
def test_mixture_reaches_the_floor(schedule, num_steps, predictor, corrector, mixture_name):
  """Weights, mean, covariance and SW at the floor; sharpness between exact and the Langevin bias.

  Unadjusted Langevin with step ``eps = 2 snr^2 v`` keeps a Gaussian of variance v at ``v / (1 - snr^2)``
  (1.026 for snr = 0.16), so PC with a fixed snr converges to slightly wide modes rather than to the data;
  the sharpness may lie anywhere from 1 to that bound, plus 4 sampling sigmas and 0.005. A linear-in-t grid
  puts few VP / sub-VP steps at low noise, so those need ~1000 steps (VP, 300 steps: 1.05). sub-VP runs the
  reference's configuration for it (Euler-Maruyama, no corrector). Measured sharpness: VP 1.00, sub-VP EM
  1.02, VE ring 1.01, VE aniso 1.022 (1.023 at 1000 steps: the Langevin bias, not discretisation).
  """
  mixture, n = MIXTURES[mixture_name], N_SAMPLES[mixture_name]
  floor, reference = noise_floor(mixture_name)
  out = sampler(schedule, num_steps, mixture_name, predictor, corrector)(jax.random.PRNGKey(0))
  assert out.nfe == num_steps * (2 if corrector == 'langevin' else 1) + 1
  report = metrics.mixture_report(out.samples, mixture, reference, jax.random.PRNGKey(2))
  checks.assert_at_floor(report, floor, mixture, n)
  tol = 4 * checks.sharpness_stderr(mixture.dim, n) + 0.005
  assert 1.0 - tol <= report['sharpness'] <= 1.0 / (1.0 - 0.16**2) + tol, report


def test_error_shrinks_as_steps_grow_and_the_corrector_helps():
  """VE on the ring, 30 / 100 / 300 steps. Measured: sharpness 1.15 / 1.037 / 1.011, covariance error
  0.053 / 0.033 / 0.010; predictor only at 100 steps: sharpness 1.076, covariance error 0.048."""
  _, reference = noise_floor('ring')
  report = lambda run: metrics.mixture_report(run(jax.random.PRNGKey(0)).samples, RING, reference,
                                              jax.random.PRNGKey(2))
  reports = [report(sampler(VE, k)) for k in (30, 100, 300)]
  sharpness_err = [abs(r['sharpness'] - 1.0) for r in reports]
  cov_err = [r['cov_err'] for r in reports]
  assert sharpness_err[0] > sharpness_err[1] > sharpness_err[2], sharpness_err
  assert cov_err[0] > cov_err[1] > cov_err[2], cov_err
  predictor_only = report(sampler(VE, 100, corrector='none'))
  assert abs(predictor_only['sharpness'] - 1.0) > sharpness_err[1], (predictor_only, reports[1])


def test_denoising_step_is_tweedie_at_t_min():
  out = sampler(VE, 30)(jax.random.PRNGKey(0))
  assert out.nfe == 61 and out.trajectory.shape == (32, N_SAMPLES['ring'], 2)
  alpha, sigma = VE.alpha_sigma(VE.t_min)
  np.testing.assert_allclose(out.samples, RING.posterior_mean(out.trajectory[-2], alpha, sigma), atol=1e-5)
  assert sampler(VE, 100, corrector='none')(jax.random.PRNGKey(0)).nfe == 101


def test_given_x_T_jit_equals_eager_and_rng_drives_the_noise():
  x_T = jax.random.normal(jax.random.PRNGKey(3), (16, 2))
  run = functools.partial(pc.pc_sample, RING.denoiser(VP), shape=(16, 2), num_steps=5,
                          predictor='euler_maruyama', n_corrector_steps=2, x_T=x_T)
  eager = run(jax.random.PRNGKey(0))
  jitted = jax.jit(run)
  np.testing.assert_allclose(jitted(jax.random.PRNGKey(0)).samples, eager.samples, atol=1e-5)
  assert eager.nfe == 5 * 3 + 1
  assert not np.allclose(jitted(jax.random.PRNGKey(1)).samples, eager.samples, atol=1e-3)


def test_bf16_model_is_close_to_fp32():
  """bf16 keeps 8 mantissa bits (rounding 4e-3 relative): with the same noise the median sample moves ~1e-3,
  far below the mode std 0.1; a path near the boundary between two modes may switch, so the tail is bounded
  by counting."""
  exact = sampler(VE, 30)(jax.random.PRNGKey(0)).samples
  err = np.abs(np.asarray(sampler(VE, 30, bf16=True)(jax.random.PRNGKey(0)).samples - exact))
  assert np.median(err) < 5e-3 and np.mean(err > 0.05) < 0.02, (np.median(err), np.mean(err > 0.05))


def test_clip_x0_clips_the_denoised_samples():
  """Data at 3: every x0-prediction is clipped to 1, so the chain ends near 1 and Tweedie's step stays <= 1."""
  samples = jax.jit(lambda rng: pc.pc_sample(Denoiser(gaussian(3.0, 0.01).model_fn(VP), VP, clip_x0=1.0), rng, (256, 1),
                                             num_steps=20).samples)(jax.random.PRNGKey(0))
  assert float(jnp.max(samples)) <= 1.0 and float(jnp.median(samples)) > 0.9


@pytest.mark.parametrize('kwargs,match', [({'predictor': 'ode'}, 'predictor'), ({'corrector': 'ald'}, 'corrector'),
                                          ({'predictor': 'none', 'corrector': 'none'}, 'needs')])
def test_invalid_choices_are_rejected(kwargs, match):
  with pytest.raises(ValueError, match=match):
    pc.pc_sample(Denoiser(lambda x, t: x, VE), jax.random.PRNGKey(0), (2, 1), **kwargs)
