"""Probability-flow ODE samplers driven by the exact mixture denoiser.

Exact samples of the same size set the noise floor (``metrics.noise_floor``); tolerances are stated next to
each check. Standard errors used below, for ``n`` samples: a mode weight ``w`` has ``sqrt(w (1 - w) / n)``
(< 0.011 for n = 2000, < 0.008 for n = 4000); ``sharpness`` is a mean of chi^2_D / D, with standard error
``sqrt(2 / (D n))`` (0.016 for the ring at n = 4000, 0.004 in 64-D at n = 2000).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.diffusion import parameterization, schedules
from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import base, edm, ode
from diffax.testing import checks, metrics, mixtures

RING = mixtures.ring_mixture()
N_RING = 4000
SCHEDULES = {'vp': schedules.VPSDE(), 've': schedules.VESDE(), 'edm': schedules.EDM()}


def assert_samples_at_floor(x, mixture, rng, *, sharpness_tol):
  """``checks.assert_at_floor`` of samples ``x`` [n, D] against a floor of n exact samples drawn from ``rng``."""
  floor, reference = metrics.noise_floor(mixture, x.shape[0], rng)
  report = metrics.mixture_report(x, mixture, reference, jax.random.fold_in(rng, 1))
  checks.assert_at_floor(report, floor, mixture, x.shape[0], sharpness_tol=sharpness_tol)


@pytest.mark.parametrize('name', sorted(SCHEDULES))
def test_heun_reaches_the_floor_on_the_ring(name):
  """64 steps (127 evaluations). Measured sharpness: VP 0.989, VE 0.986, EDM 0.998 (floor 1.003); the
  tolerance 0.05 is 3 standard errors (0.016). At 20 steps the modes come out 4-7% too wide."""
  schedule = SCHEDULES[name]
  out = jax.jit(lambda rng: edm.edm_heun_sample(RING.denoiser(schedule), rng, (N_RING, 2),
                                                num_steps=64))(jax.random.PRNGKey(0))
  assert out.nfe == 127
  assert_samples_at_floor(out.samples, RING, jax.random.PRNGKey(1), sharpness_tol=0.05)
  # No clipping: the ring's modes on the axes (radius 1, std 0.1) put about a fifth of the samples outside
  # [-1, 1].
  assert float(jnp.mean(jnp.any(jnp.abs(out.samples) > 1, axis=-1))) > 0.15


def test_heun_reaches_the_floor_in_64d():
  """Anisotropic 64-D mixture, EDM, 64 steps. Measured sharpness 1.011 (floor 1.006; 48 steps: 1.019,
  32 steps: 1.042); the tolerance 0.025 is about 6 standard errors and fails an under-resolved solve."""
  mixture, schedule = mixtures.anisotropic_mixture(), schedules.EDM()
  out = jax.jit(lambda rng: edm.edm_heun_sample(mixture.denoiser(schedule, 'edm'), rng, (2000, 64), num_steps=64))(
                                                    jax.random.PRNGKey(2))
  assert_samples_at_floor(out.samples, mixture, jax.random.PRNGKey(3), sharpness_tol=0.025)


def test_heun_is_second_order():
  """RMS distance to a 160-step solution from the same x_T (VP, 8-D). Measured: 0.018 at 20 steps, 0.0038 at
  40, a ratio of 4.7 (order 2 gives 4, Euler/DDIM 2)."""
  mixture, schedule = mixtures.anisotropic_mixture(dim=8), schedules.VPSDE()
  model_fn = mixture.model_fn(schedule)
  x_T = schedule.prior_sample(jax.random.PRNGKey(4), (400, 8))
  heun = jax.jit(lambda num_steps: edm.edm_heun_sample(Denoiser(model_fn, schedule), jax.random.PRNGKey(0), x_T.shape,
                                                       num_steps=num_steps, x_T=x_T).samples, static_argnums=0)
  reference = heun(160)
  e20, e40 = [float(jnp.sqrt(jnp.mean(jnp.square(heun(n) - reference)))) for n in (20, 40)]
  assert e20 / e40 > 3.2, (e20, e40)
  assert e40 < 6e-3, e40


def test_adaptive_reaches_the_floor_counts_nfe_and_inverts():
  """Tsit5 at rtol = atol = 1e-5 on VP; nfe from diffrax stats equals the evaluations actually made
  (counted by a host callback); encoding the samples' ODE end points with Dopri5 returns their latents."""
  schedule = SCHEDULES['vp']
  x_T = schedule.prior_sample(jax.random.PRNGKey(5), (N_RING, 2))
  out = checks.nfe_checked(ode.adaptive_ode_sample, RING.denoiser(schedule), shape=(N_RING, 2),
                           return_trajectory=True, num_save_points=6)(jax.random.PRNGKey(0), x_T=x_T)
  assert out.nfe.dtype == jnp.int32
  assert 50 < int(out.nfe) < 400  # measured 134 (22 steps and the final x0-prediction)
  assert out.trajectory.shape == (6, N_RING, 2)
  np.testing.assert_allclose(out.trajectory[0], x_T, rtol=1e-6)
  # Measured: sharpness 1.003, sw 0.033 (floor 0.046).
  assert_samples_at_floor(out.samples, RING, jax.random.PRNGKey(6), sharpness_tol=0.05)
  # The last trajectory point is x at t_min; its x0-prediction is the sample.
  x0, _ = parameterization.denoise(RING.model_fn(schedule), out.trajectory[-1], jnp.float32(schedule.t_min),
                                   schedule=schedule)
  np.testing.assert_allclose(out.samples, x0, atol=1e-6)

  # encode(decode(z)) = z for latents of std 1. Measured error median 4e-5, 99th percentile 1.3e-4, max 4e-4
  # (trajectories ending between two modes are the sensitive ones).
  z, nfe = jax.jit(lambda x: ode.ode_encode(RING.denoiser(schedule), x, solver='dopri5'))(out.trajectory[-1])
  err = jnp.max(jnp.abs(z - x_T), axis=-1)
  assert float(jnp.quantile(err, 0.99)) < 5e-4 and float(jnp.median(err)) < 2e-4, err
  assert 50 < int(nfe) < 400


def test_heun_jit_equals_eager_and_a_hand_computed_step():
  """Given x_T the sampler is deterministic, jitted or not, and equals one Heun step in sigma_bar followed by
  the Tweedie jump, written out with the exact denoiser."""
  schedule = SCHEDULES['vp']
  model_fn = RING.model_fn(schedule)
  x_T = schedule.prior_sample(jax.random.PRNGKey(7), (256, 2))
  sample = lambda rng: edm.edm_heun_sample(Denoiser(model_fn, schedule), rng, (256, 2), num_steps=2,
                                           spacing='linspace', t_start=0.5, t_end=0.2, x_T=x_T,
                                           return_trajectory=True)
  eager, jitted = sample(jax.random.PRNGKey(0)), jax.jit(sample)(jax.random.PRNGKey(1))
  np.testing.assert_allclose(eager.samples, jitted.samples, atol=1e-6)
  assert eager.nfe == 3 and eager.trajectory.shape == (3, 256, 2)
  np.testing.assert_array_equal(eager.trajectory[0], x_T)
  np.testing.assert_array_equal(eager.trajectory[-1], eager.samples)

  (a_t, s_t), (a_s, s_s) = schedule.alpha_sigma(jnp.float32(0.5)), schedule.alpha_sigma(jnp.float32(0.2))
  eps = lambda x, t: parameterization.denoise(model_fn, x, jnp.float32(t), schedule=schedule)[1]
  h = s_s / a_s - s_t / a_t
  x_euler = a_s * (x_T / a_t + h * eps(x_T, 0.5))
  x_s = a_s * (x_T / a_t + 0.5 * h * (eps(x_T, 0.5) + eps(x_euler, 0.2)))
  np.testing.assert_allclose(eager.trajectory[1], x_s, rtol=1e-5, atol=1e-5)
  x0, _ = parameterization.denoise(model_fn, x_s, jnp.float32(0.2), schedule=schedule)
  np.testing.assert_allclose(eager.samples, x0, rtol=1e-5, atol=1e-5)


def test_every_prediction_and_a_bf16_model_give_the_same_samples():
  """Predictions are exact conversions of each other: measured max difference 4e-6 after 23 model
  evaluations. A bf16 model (8 mantissa bits, relative error 4e-3 per evaluation, also in the output)
  moves the samples by 1e-3 (measured median; 95th percentile 3e-3, max 0.03 for points between modes)."""
  schedule = SCHEDULES['edm']
  x_T = schedule.prior_sample(jax.random.PRNGKey(9), (256, 2))
  sample = jax.jit(lambda model_fn, pred: edm.edm_heun_sample(Denoiser(model_fn, schedule, pred), jax.random.PRNGKey(0),
                                                              (256, 2), num_steps=12, x_T=x_T).samples,
                   static_argnums=(0, 1))
  eps_model = RING.model_fn(schedule, 'eps')
  reference = sample(eps_model, 'eps')
  for prediction in parameterization.PREDICTIONS:
    if prediction != 'eps':
      np.testing.assert_allclose(sample(RING.model_fn(schedule, prediction), prediction), reference,
                                 atol=1e-4, err_msg=prediction)
  low = sample(checks.bf16_model(eps_model), 'eps')
  assert low.dtype == jnp.float32
  diff = jnp.max(jnp.abs(low - reference), axis=-1)
  assert float(jnp.median(diff)) < 0.005 and float(jnp.quantile(diff, 0.95)) < 0.02, diff


def test_inpainting_heun_keeps_known_pixels_and_adaptive_refuses():
  schedule = SCHEDULES['vp']
  model_fn = RING.model_fn(schedule)
  x_known = schedule.prior_sample(jax.random.PRNGKey(11), (256, 2))
  inpaint = base.Inpaint(x_known=x_known, mask=jnp.array([1.0, 0.0], jnp.float32)[None])
  out = jax.jit(lambda rng: edm.edm_heun_sample(Denoiser(model_fn, schedule), rng, (256, 2), num_steps=8,
                                                inpaint=inpaint))(jax.random.PRNGKey(0))
  np.testing.assert_array_equal(out.samples[:, 0], x_known[:, 0])
  assert bool(jnp.all(jnp.isfinite(out.samples)))
  with pytest.raises(ValueError, match='cannot inpaint'):
    ode.adaptive_ode_sample(Denoiser(model_fn, schedule), jax.random.PRNGKey(0), (256, 2), inpaint=inpaint)
  with pytest.raises(ValueError, match='Unknown solver'):
    ode.adaptive_ode_sample(Denoiser(model_fn, schedule), jax.random.PRNGKey(0), (256, 2), solver='rk4')


def test_loose_tolerance_warns():
  # rtol = atol = 0.1 wrecks samples silently otherwise (sharpness 836 on the 64-D mixture, ode.LOOSE_TOLERANCE).
  denoiser = mixtures.ring_mixture().denoiser(schedules.VPSDE())
  with pytest.warns(UserWarning, match='rtol=0.1'):
    ode.adaptive_ode_sample(denoiser, jax.random.PRNGKey(0), (4, 2), rtol=0.1, atol=0.1)
