"""Flow samplers (and the other samplers on flow models) driven by the exact mixture velocity.

Noise-floor tolerances as in tests/test_samplers_ode.py: ``checks.assert_at_floor`` plus a sharpness allowance of
about three standard errors ``sqrt(2 / (D n))`` (0.016 on the ring at n = 4000) plus the sampler's known bias.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.diffusion import samplers, schedules
from diffax.diffusion.samplers import flow
from diffax.testing import checks, metrics, mixtures

RF, GVP = schedules.get_schedule('rectified_flow'), schedules.get_schedule('gvp')
RING = mixtures.ring_mixture()
N = 4000


def _at_floor(x, rng, sharpness_tol):
  floor, reference = metrics.noise_floor(RING, x.shape[0], rng)
  report = metrics.mixture_report(x, RING, reference, jax.random.fold_in(rng, 1))
  checks.assert_at_floor(report, floor, RING, x.shape[0], sharpness_tol=sharpness_tol)


@pytest.mark.parametrize('schedule', [RF, GVP], ids=['rectified_flow', 'gvp'])
@pytest.mark.parametrize('name, kwargs, nfe', [
    ('flow_euler', dict(num_steps=100), 100),
    ('flow_heun', dict(num_steps=40, shift=0.3), 79),
    ('flow_sde', dict(num_steps=250), 250),
    ('dpm_solver', dict(num_steps=40), 40),
])
def test_flow_models_reach_the_floor(schedule, name, kwargs, nfe):
  """Velocity models under both interpolants, with the flow samplers and with DPM-Solver++ through the
  conversions. Measured sharpness 0.96-1.00 (floor 1.003): Euler's O(1 / N) and the final step to t = 0 of the
  uniform grid keep it 2-4 % sharp at 100 steps, hence 0.06."""
  out = checks.nfe_checked(samplers.SAMPLERS[name], RING.denoiser(schedule, 'velocity'), shape=(N, 2),
                           **kwargs)(jax.random.PRNGKey(0))
  assert int(out.nfe) == nfe
  _at_floor(out.samples, jax.random.PRNGKey(1), sharpness_tol=0.06)


@pytest.mark.parametrize('diffusion, num_steps', [('sbdm', 250), ('constant', 1000), ('increasing_decreasing', 250)])
def test_sde_marginals_do_not_depend_on_the_diffusion_coefficient(diffusion, num_steps):
  """(S) has the marginals of the flow ODE for every w_t: each of SiT's forms reaches the floor on GVP, within
  Euler-Maruyama's Langevin bias. Near t = 0 (S) is Langevin dynamics of strength w_t / 2 on a mode of variance
  v = 0.01 (score Lipschitz L = 1 / v); EM's stationary variance there is 1 / (L (1 - h w L / 4)), so the sharpness
  gains ``1 / (1 - h w L / 4) - 1``: negligible for the forms with w_0 = 0, 0.25 for 'constant' (w = 2) at 250 steps
  (measured 1.26), 0.053 at 1000 (measured 1.07 against a floor of 1.02)."""
  h = (GVP.t_max - GVP.t_min) / (num_steps - 2)
  w_0 = float(flow.diffusion_coefficient(GVP, diffusion)(GVP.t_min))
  em_bias = 1 / (1 - h * w_0 / (4 * 0.1**2)) - 1
  out = jax.jit(lambda r: flow.flow_sde_sample(RING.denoiser(GVP, 'velocity'), r, (N, 2), num_steps=num_steps,
                                               diffusion=diffusion))(jax.random.PRNGKey(2))
  _at_floor(out.samples, jax.random.PRNGKey(3), sharpness_tol=0.06 + em_bias)


def test_samplers_agree_sample_by_sample_on_a_flow_model():
  """Same x_T, one probability-flow map: the flow ODE solvers, DDIM, DPM-Solver++ and EDM-Heun through the
  conversions, all against adaptive Tsit5 (rtol 1e-6; 1.4e-5 from rtol 1e-7). On the linear path flow Euler on
  the uniform grid is DDIM on the 'trailing' grid step for step (both give alpha_s x0_hat + sigma_s eps_hat).
  Measured 99% errors: flow Heun 4e-5, EDM-Heun 2.6e-3, DPM-Solver++(2M) 6.0e-3 / 1.4e-3 at 100 / 200 steps
  (second order over the log-SNR range 2 logit(0.999) = 27.6 of t in [t_min, t_max]). DPM-Solver++(2M) is
  second order here: 99% error 0.026 / 0.0060 / 0.0014 at 50 / 100 / 200 steps (measured), hence 200 steps;
  DDIM is first order: 0.025 / 0.010 / 0.0049 at 250 / 500 / 1000, hence 1000."""
  denoiser = RING.denoiser(RF, 'velocity')
  x_T = RF.prior_sample(jax.random.PRNGKey(4), (256, 2))
  run = lambda name, **kw: np.asarray(jax.jit(lambda x: samplers.SAMPLERS[name](
      denoiser, jax.random.PRNGKey(0), x.shape, x_T=x, **kw).samples)(x_T))
  reference = run('adaptive_ode', rtol=1e-6, atol=1e-6)
  t_max = {'t_start': RF.t_max}  # the log-SNR and Karras grids would start later by default (base.default_start)
  for name, kw, tolerance in [('flow_heun', dict(num_steps=200, shift=0.3), 4e-3),
                              ('dpm_solver', dict(num_steps=200, **t_max), 4e-3),
                              ('edm_heun', dict(num_steps=100, **t_max), 4e-3),
                              ('ddim', dict(num_steps=1000, spacing='log_snr', **t_max), 0.01)]:
    err = np.quantile(np.abs(run(name, **kw) - reference), 0.99)
    assert err < tolerance, (name, err)
  np.testing.assert_allclose(run('flow_euler', num_steps=30), run('ddim', num_steps=30, spacing='trailing'),
                             atol=1e-5)


def test_euler_is_first_order_and_heun_second_order():
  """RMS distance to a 640-step Heun solution from the same x_T (8-D mixture, GVP, uniform grid). Doubling the
  steps divides Euler's error by about 2 and Heun's by about 4. Measured: Euler 0.0094 / 0.0051 at 40 / 80 steps
  (ratio 1.86), Heun 0.0028 / 0.0007 at 40 / 80 (ratio 4.0)."""
  mixture = mixtures.anisotropic_mixture(dim=8)
  denoiser = mixture.denoiser(GVP, 'velocity')
  x_T = GVP.prior_sample(jax.random.PRNGKey(5), (400, 8))
  solve = jax.jit(lambda sampler, n: sampler(denoiser, jax.random.PRNGKey(0), x_T.shape, num_steps=n,
                                             x_T=x_T).samples, static_argnums=(0, 1))
  reference = solve(flow.flow_heun_sample, 640)
  rms = lambda sampler, n: float(jnp.sqrt(jnp.mean(jnp.square(solve(sampler, n) - reference))))
  euler = [rms(flow.flow_euler_sample, n) for n in (40, 80)]
  heun = [rms(flow.flow_heun_sample, n) for n in (40, 80)]
  assert 1.6 < euler[0] / euler[1] < 2.6, euler
  assert heun[0] / heun[1] > 3.2, heun


def test_grids_shift_and_diffusion_coefficients():
  ts = flow.flow_grid(RF, 8, shift=3.0)
  uniform = flow.flow_grid(RF, 8)
  assert ts.shape == (9,) and float(ts[0]) == pytest.approx(RF.t_max) and float(ts[-1]) == 0.0
  np.testing.assert_allclose(uniform, RF.t_max * (1 - np.arange(9) / 8), atol=1e-6)
  u = 1 - np.arange(9) / 8  # SD3 eq. 23 on the unit grid, scaled to start at t_max
  np.testing.assert_allclose(ts, RF.t_max * 3 * u / (1 + 2 * u), rtol=1e-5, atol=1e-7)
  t = jnp.float32(0.3)
  w = lambda name: float(flow.diffusion_coefficient(RF, name)(t))
  assert w('sigma') == pytest.approx(0.6) and w('sbdm') == pytest.approx(0.6 / 0.7, rel=1e-5)
  assert w('decreasing') == pytest.approx(0.5 * (1 - np.cos(0.3 * np.pi))**2, rel=1e-5) and w('none') == 0.0
  with pytest.raises(ValueError, match='diffusion'):
    flow.diffusion_coefficient(RF, 'brownian')
  with pytest.raises(ValueError, match='shift'):
    flow.flow_grid(schedules.EDM(), 8, shift=3.0)
  with pytest.raises(ValueError, match='t_end'):
    flow.flow_sde_sample(RING.denoiser(RF, 'velocity'), jax.random.PRNGKey(0), (4, 2), t_end=0.0)
