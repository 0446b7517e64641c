"""DPM-Solver++ (1, 2M, 3M, 2S) against exact Gaussian-mixture targets (diffax.testing.mixtures).

Every run is jitted once per configuration and cached, so the file compiles each sampler program once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.diffusion import schedules
from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import ddim, dpm_solver
from diffax.testing import checks, metrics, mixtures

N = 2000  # samples per accuracy run
B = 256  # samples per trajectory-level check
MIXTURES = {'ring': mixtures.ring_mixture(), 'aniso': mixtures.anisotropic_mixture()}
SCHEDULES = {'edm': schedules.EDM(), 'vp': schedules.VPSDE(), 'linear': schedules.LinearSchedule(),
             've': schedules.VESDE()}
SAMPLERS = {'dpm': dpm_solver.dpm_solver_sample, 'ddim': ddim.ddim_sample}
VARIANTS = {'2M': {}, '3M': {'order': 3}, '2S': {'method': 'singlestep'}}
SMALL = {'num_steps': 8, 'return_trajectory': True}  # the small ring / VP run that unit checks share
JUMP = {'denoise_to_zero': True}
"""DPM-Solver++'s final step in these closed-form checks, measured before its default became the stop at t_min."""


@functools.cache
def floor(mix: str):
  return metrics.noise_floor(MIXTURES[mix], N, jax.random.PRNGKey(1))


@functools.cache
def x_T(sched: str, mix: str, n: int) -> jax.Array:
  return SCHEDULES[sched].prior_sample(jax.random.PRNGKey(3), (n, MIXTURES[mix].dim))


@functools.cache
def sample(sampler: str, mix: str, sched: str, n: int, prediction: str = 'eps', precision: str = 'fp32',
           **kwargs):
  """One jitted run of the exact model (in bf16 if asked) from the fixed prior draw ``x_T(sched, mix, n)``;
  checks that the reported ``nfe`` is the number of model calls that really ran."""
  mixture, schedule = MIXTURES[mix], SCHEDULES[sched]
  kwargs = {**JUMP, **kwargs} if sampler == 'dpm' else kwargs
  model_fn = mixture.model_fn(schedule, prediction)
  model_fn = checks.bf16_model(model_fn) if precision == 'bf16' else model_fn
  run = checks.nfe_checked(SAMPLERS[sampler], Denoiser(model_fn, schedule, prediction), shape=(n, mixture.dim),
                           **kwargs)
  return run(jax.random.PRNGKey(0), x_T=x_T(sched, mix, n))


def report(sampler: str, mix: str, sched: str, **kwargs) -> dict[str, float]:
  x = sample(sampler, mix, sched, N, **kwargs).samples
  return metrics.mixture_report(x, MIXTURES[mix], floor(mix)[1], jax.random.PRNGKey(2))


@pytest.mark.slow
@pytest.mark.parametrize('variant, mix, sched, num_steps', [
    ('2M', 'ring', 've', 50), ('2S', 'ring', 'vp', 25), ('2M', 'aniso', 'linear', 50), ('3M', 'aniso', 'edm', 50)])
def test_reaches_noise_floor(variant, mix, sched, num_steps):
  # 50 evaluations (2S: 25 steps, 49 evaluations); every variant, schedule kind and mixture once.
  # Measured |sharpness - 1|: 2M ring ve 0.013, 2S ring vp 0.027, 2M aniso linear 0.015, 3M aniso edm 0.015
  # (2M ring edm 0.029); 0.03 is the allowance of a converged run, on top of 3 standard errors of the
  # sharpness of N exact samples.
  out = sample('dpm', mix, sched, N, num_steps=num_steps, **VARIANTS[variant])
  assert int(out.nfe) == (49 if variant == '2S' else 50)
  checks.assert_at_floor(report('dpm', mix, sched, num_steps=num_steps, **VARIANTS[variant]), floor(mix)[0],
                         MIXTURES[mix], N, sharpness_tol=3 * checks.sharpness_stderr(MIXTURES[mix].dim, N) + 0.03)
  # No clipping of x0: the samples reach as far out as the exact ones (|x| ~ 1.3 on the ring).
  exact_max = float(jnp.max(jnp.abs(floor(mix)[1])))
  assert float(jnp.max(jnp.abs(out.samples))) > min(exact_max - 0.1, 1.2)


# Measured at 10 model evaluations on VP (2S: 5 steps, 9 evaluations), sw / |sharpness - 1|:
#            ring             aniso
#   DDIM     0.081 / 0.83     0.072 / 0.36    (10 log-SNR-uniform steps, DDIM's best grid here;
#                                              its default 'trailing' grid: 0.090 / 1.73 and 0.094 / 0.66)
#   2M       0.059 / 0.37     0.023 / 0.057
#   3M       0.064 / 0.24     0.045 / 0.30
#   2S       0.064 / 0.72     0.059 / 0.31
# The aniso margins of 3M and 2S are small, so only their ring runs are asserted.
@pytest.mark.slow
@pytest.mark.parametrize('variant, mix, num_steps', [
    ('2M', 'ring', 10), ('2M', 'aniso', 10), ('3M', 'ring', 10), ('2S', 'ring', 5)])
def test_beats_ddim_at_ten_evaluations(variant, mix, num_steps):
  assert int(sample('dpm', mix, 'vp', N, num_steps=num_steps, **VARIANTS[variant]).nfe) <= 10
  ddim10 = report('ddim', mix, 'vp', num_steps=10, spacing='log_snr')
  rep = report('dpm', mix, 'vp', num_steps=num_steps, **VARIANTS[variant])
  assert rep['sw'] < ddim10['sw'], (rep, ddim10)
  assert abs(rep['sharpness'] - 1) < abs(ddim10['sharpness'] - 1), (rep, ddim10)


def test_first_order_is_ddim():
  # DPM-Solver++(1): x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x0_hat is DDIM(eta = 0) rewritten
  # (Lu et al. 2022b, sec. 4); same grid, same x_T -> same samples up to float32 rounding.
  first = sample('dpm', 'ring', 'vp', N, num_steps=10, order=1, spacing='log_snr').samples
  np.testing.assert_allclose(first, sample('ddim', 'ring', 'vp', N, num_steps=10, spacing='log_snr').samples,
                             atol=2e-5)


def endpoint_error(reference: jax.Array, **kwargs) -> float:
  """RMS distance [] of the ring endpoints from ``reference`` [B, 2], same x_T."""
  x = sample('dpm', 'ring', 'vp', B, prediction='x0', **kwargs).samples
  return float(jnp.sqrt(jnp.mean(jnp.square(x - reference))))


@pytest.mark.parametrize('variant, low, high', [('2M', 3.5, 4.5), ('3M', 4.5, 8.5), ('2S', 3.3, 4.5)])
def test_order_of_convergence(variant, low, high):
  # The same x_T through 32 and 64 steps converges to a 1000-step 3M endpoint (RMS 1.4e-5 from a 512-level
  # EDM Heun endpoint). Measured errors 32 -> 64 steps: 2M 3.9e-3 -> 9.6e-4 (ratio 4.02), 3M 1.7e-3 -> 3.2e-4
  # (5.26: third order held back by its first-order warm-up step, as in the reference implementation),
  # 2S 2.9e-3 -> 7.7e-4 (3.74); DDIM gives 1.9.
  reference = sample('dpm', 'ring', 'vp', B, prediction='x0', num_steps=1000, order=3).samples
  errors = [endpoint_error(reference, num_steps=n, **VARIANTS[variant]) for n in (32, 64)]
  assert low < errors[0] / errors[1] < high, errors


def test_lower_order_final_table():
  # diffusers' rule: warm-up min(order, i + 1); below 15 steps the last two steps use orders <= 1 and 2;
  # the jump to t = 0 is first order.
  table = functools.partial(dpm_solver.multistep_orders, lower_order_final=True, denoise_to_zero=False)
  np.testing.assert_array_equal(table(6, 3), [1, 2, 3, 3, 2, 1])
  np.testing.assert_array_equal(table(15, 3), [1, 2] + [3] * 13)
  np.testing.assert_array_equal(table(4, 2), [1, 2, 2, 1])
  np.testing.assert_array_equal(
      dpm_solver.multistep_orders(15, 2, lower_order_final=False, denoise_to_zero=True), [1] + [2] * 13 + [1])


def test_jit_unjit_trajectory_and_nfe():
  # (Every jitted run in this file also checks nfe against the model calls that really ran: 2S's final
  # jump to t = 0 makes one call, not two.)
  jitted = sample('dpm', 'ring', 'vp', B, **SMALL)
  x_start = x_T('vp', 'ring', B)
  eager = dpm_solver.dpm_solver_sample(MIXTURES['ring'].denoiser(SCHEDULES['vp']), jax.random.PRNGKey(5), (B, 2),
                                       x_T=x_start, **JUMP, **SMALL)
  assert int(eager.nfe) == int(jitted.nfe) == 8
  np.testing.assert_allclose(eager.trajectory, jitted.trajectory, atol=1e-5)
  assert jitted.trajectory.shape == (9, B, 2)
  np.testing.assert_array_equal(jitted.trajectory[0], x_start)
  np.testing.assert_array_equal(jitted.trajectory[-1], jitted.samples)


AT_T_MIN = {'num_steps': 8, 'denoise_to_zero': False, 'return_trajectory': True}


def test_denoise_to_zero_is_one_final_jump():
  # Without the jump, num_steps log-SNR steps end at x_{t_min}; with it, num_steps + 1 evaluations walk the
  # same grid and then return the x0-prediction at t_min (orders agree with lower_order_final off).
  at_t_min = sample('dpm', 'ring', 'vp', B, lower_order_final=False, **AT_T_MIN)
  jumped = sample('dpm', 'ring', 'vp', B, num_steps=9, lower_order_final=False, return_trajectory=True)
  assert (int(at_t_min.nfe), int(jumped.nfe)) == (8, 9)
  assert at_t_min.trajectory.shape == (9, B, 2) and jumped.trajectory.shape == (10, B, 2)
  np.testing.assert_allclose(jumped.trajectory[:-1], at_t_min.trajectory, atol=1e-5)
  alpha, sigma = SCHEDULES['vp'].alpha_sigma(jnp.float32(SCHEDULES['vp'].t_min))
  x0_hat = MIXTURES['ring'].posterior_mean(at_t_min.samples, alpha, sigma)
  np.testing.assert_allclose(jumped.samples, x0_hat, atol=1e-5)


def test_lower_order_final_changes_short_runs():
  # Without the final jump (first order anyway) the flag makes 2M's last step first order below 15 steps;
  # measured RMS change 1.3e-2 on 8 steps.
  lowered = sample('dpm', 'ring', 'vp', B, **AT_T_MIN).samples
  full = sample('dpm', 'ring', 'vp', B, lower_order_final=False, **AT_T_MIN).samples
  assert float(jnp.sqrt(jnp.mean(jnp.square(lowered - full)))) > 3e-3


def test_rejects_unknown_options():
  with pytest.raises(ValueError, match='method'):
    dpm_solver.dpm_solver_sample(Denoiser(None, SCHEDULES['vp']), jax.random.PRNGKey(0), (1, 2), method='3S')
  with pytest.raises(ValueError, match='order=3'):
    dpm_solver.dpm_solver_sample(Denoiser(None, SCHEDULES['vp']), jax.random.PRNGKey(0), (1, 2), order=3,
                                 method='singlestep')


def test_sde_first_order_is_ddim_with_eta_one():
  # SDE-DPM-Solver++(1): x_t = (sigma_t / sigma_s) e^-h x_s + alpha_t (1 - e^-2h) x0_hat + sigma_t sqrt(1 - e^-2h) z
  # is DDIM's eta = 1 step (the DDPM posterior); with the same step keys both draw the same z.
  first = sample('dpm', 'ring', 'vp', B, num_steps=10, order=1, method='sde', spacing='log_snr').samples
  ddim1 = sample('ddim', 'ring', 'vp', B, num_steps=10, eta=1.0, spacing='log_snr').samples
  np.testing.assert_allclose(first, ddim1, atol=2e-5)


@pytest.mark.slow
def test_sde_2m_reaches_noise_floor_and_beats_first_order():
  # Stochastic: weak convergence only. Measured on the ring (VP): 50 steps sw 0.031, sharpness 1.004; 20 steps
  # 0.033 / 1.067 against 0.076 / 0.897 for the first-order (DDPM) steps.
  checks.assert_at_floor(report('dpm', 'ring', 'vp', num_steps=50, method='sde'), floor('ring')[0],
                         MIXTURES['ring'], N, sharpness_tol=3 * checks.sharpness_stderr(2, N) + 0.03)
  second = report('dpm', 'ring', 'vp', num_steps=20, method='sde')
  first = report('dpm', 'ring', 'vp', num_steps=20, method='sde', order=1)
  assert second['sw'] < first['sw'] and abs(second['sharpness'] - 1) < abs(first['sharpness'] - 1), (second, first)
