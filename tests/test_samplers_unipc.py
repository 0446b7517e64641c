"""UniPC (bh1 / bh2, orders 1-3, corrector on / off) against exact Gaussian-mixture targets and an independent
float64 implementation of the paper's equations on diffusers' integer grid."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.diffusion import schedules
from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import base, ddim, dpm_solver, unipc
from diffax.testing import checks, metrics, mixtures

N = 2000  # samples per accuracy run
B = 256  # samples per trajectory-level check
MIXTURES = {'ring': mixtures.ring_mixture(), 'aniso': mixtures.anisotropic_mixture()}
SCHEDULES = {'vp': schedules.VPSDE(), 'linear': schedules.LinearSchedule(), 'edm': schedules.EDM()}
SAMPLERS = {'unipc': unipc.unipc_sample, 'ddim': ddim.ddim_sample,
            'dpm': functools.partial(dpm_solver.dpm_solver_sample, denoise_to_zero=True)}


@functools.cache
def floor(mix: str):
  return metrics.noise_floor(MIXTURES[mix], N, jax.random.PRNGKey(1))


@functools.cache
def x_T(sched: str, mix: str, n: int) -> jax.Array:
  return SCHEDULES[sched].prior_sample(jax.random.PRNGKey(3), (n, MIXTURES[mix].dim))


@functools.cache
def sample(sampler: str, mix: str, sched: str, n: int, prediction: str = 'eps', **kwargs):
  """One jitted run of the exact model from the fixed prior draw; checks nfe against the real model calls."""
  mixture, schedule = MIXTURES[mix], SCHEDULES[sched]
  denoiser = Denoiser(mixture.model_fn(schedule, prediction), schedule, prediction)
  run = checks.nfe_checked(SAMPLERS[sampler], denoiser, shape=(n, mixture.dim), **kwargs)
  return run(jax.random.PRNGKey(0), x_T=x_T(sched, mix, n))


def report(sampler: str, mix: str, sched: str, **kwargs) -> dict[str, float]:
  x = sample(sampler, mix, sched, N, **kwargs).samples
  return metrics.mixture_report(x, MIXTURES[mix], floor(mix)[1], jax.random.PRNGKey(2))


# --- An independent float64 UniPC, written from Zhao et al. 2023 (sec. 3.1-3.2 and Theorem 3.1). ---


def ring_x0_np(x: np.ndarray, alpha: float, sigma: float) -> np.ndarray:
  """Tweedie's E[x0 | x_t] [n, 2] of the ring mixture (isotropic modes), float64."""
  ring = MIXTURES['ring']
  mu, w, var0 = np.asarray(ring.means, np.float64), np.asarray(ring.weights, np.float64), float(ring.eigvals[0, 0])
  var = alpha**2 * var0 + sigma**2
  logits = np.log(w)[None] - 0.5 * np.sum((x[:, None] - alpha * mu[None])**2, axis=-1) / var
  resp = np.exp(logits - logits.max(axis=1, keepdims=True))
  resp /= resp.sum(axis=1, keepdims=True)
  means = mu[None] + (alpha * var0 / var) * (x[:, None] - alpha * mu[None])
  return np.einsum('nk,nkd->nd', resp, means)


def unipc_np(x: np.ndarray, alphas_cumprod: np.ndarray, timesteps: np.ndarray, order: int, variant: str) -> np.ndarray:
  """UniPC in the data prediction from ``x`` at ``timesteps[0]`` to the clean sentinel, float64.

  With ``h = lambda_t - lambda_s`` and ``hh = -h``, ``B(h) = hh`` (bh1) or ``e^hh - 1`` (bh2); UniP-p and UniC-p
  solve ``R a = g / B(h)`` with ``R[i, k] = r_k^i`` and ``g_i = i! (e^hh - sum_{j<=i} hh^j / j!) / hh^i``
  (``hh phi_{i+1}(hh) i!``); UniP-2 and UniC-1 use ``a = 1/2``. Orders ``min(order, i + 1, N - i)``; the
  corrector of each step uses the model call at its end, so the last step is uncorrected.
  """
  alpha = lambda n: 1.0 if n < 0 else math.sqrt(alphas_cumprod[n])
  sigma = lambda n: 0.0 if n < 0 else math.sqrt(1.0 - alphas_cumprod[n])
  lam = lambda n: math.inf if n < 0 else math.log(alpha(n) / sigma(n))
  points = list(timesteps) + [-1]  # -1: clean data

  def g_vector(h, num):
    hh = -h
    b_h = hh if variant == 'bh1' else math.expm1(hh)
    taylor = lambda i: math.exp(hh) - sum(hh**j / math.factorial(j) for j in range(i + 1))
    return np.array([math.factorial(i) * taylor(i) / hh**(i + 1) * hh for i in range(1, num + 1)]) / b_h, b_h

  def update(x_s, s, t, history, m_t, p):
    """history: x0-predictions at s, then earlier points (n, m)."""
    h = lam(t) - lam(s)
    m0 = history[0][1]
    base_x = sigma(t) / sigma(s) * x_s - alpha(t) * math.expm1(-h) * m0
    num = p - 1 if m_t is None else p
    if num == 0:
      return base_x
    rks = [(lam(n) - lam(s)) / h for n, _ in history[1:p]]
    diffs = [(m - m0) / r for (_, m), r in zip(history[1:p], rks)]
    if m_t is not None:
      rks, diffs = rks + [1.0], diffs + [m_t - m0]
    g, b_h = g_vector(h, num)
    a = np.array([0.5]) if num == 1 else np.linalg.solve(np.array([[r**i for r in rks] for i in range(num)]), g)
    return base_x - alpha(t) * b_h * sum(a_k * d for a_k, d in zip(a, diffs))

  history, prev = [], None
  num = len(timesteps)
  for i, n in enumerate(timesteps):
    m = ring_x0_np(x, alpha(n), sigma(n))
    if prev is not None:
      x = update(prev[0], prev[1], n, history, m, prev[2])
    history.insert(0, (n, m))
    p = min(order, i + 1, num - i)
    prev = (x, n, p)
    x = update(x, n, points[i + 1], history, None, p)
  return x


@pytest.mark.parametrize('num_steps, order, variant', [(5, 2, 'bh2'), (10, 3, 'bh1'), (8, 3, 'bh2')])
def test_matches_float64_reference_on_the_diffusers_grid(num_steps, order, variant):
  """diffusers' UniPC ``timestep_spacing='linspace'`` grid, ``final_sigmas_type='zero'``, ``lower_order_final``:
  ``linspace(0, 999, N + 1).round()[::-1][:-1]``; the float32 sampler agrees with the float64 reference to
  float32 rounding (measured max |diff| 2e-6 to 5e-6 on samples of scale 1)."""
  linear = SCHEDULES['linear']
  timesteps = np.linspace(0, linear.num_timesteps - 1, num_steps + 1).round()[::-1][:-1].astype(int)
  ts = base.solver_grid(linear, num_steps, 'linspace', denoise_to_zero=True)
  np.testing.assert_array_equal(linear.t_to_timestep(ts[:-1]), timesteps)
  x_start = x_T('linear', 'ring', B)
  expected = unipc_np(np.asarray(x_start, np.float64), linear.alphas_cumprod(), timesteps, order, variant)
  got = sample('unipc', 'ring', 'linear', B, num_steps=num_steps, order=order, variant=variant, spacing='linspace',
               denoise_to_zero=True)
  np.testing.assert_allclose(got.samples, expected, atol=3e-5)


def test_first_order_predictor_is_ddim():
  # UniP-1 is x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x0_hat, DDIM(eta = 0) rewritten.
  first = sample('unipc', 'ring', 'vp', N, num_steps=10, order=1, corrector=False, denoise_to_zero=True).samples
  np.testing.assert_allclose(first, sample('ddim', 'ring', 'vp', N, num_steps=10, spacing='log_snr').samples,
                             atol=2e-5)


def endpoint_error(reference: jax.Array, **kwargs) -> float:
  """RMS distance [] of the ring endpoints from ``reference`` [B, 2], same x_T (x0-prediction model)."""
  x = sample('unipc', 'ring', 'vp', B, prediction='x0', denoise_to_zero=True, **kwargs).samples
  return float(jnp.sqrt(jnp.mean(jnp.square(x - reference))))


@pytest.mark.parametrize('variant, order, corrector, low, high', [
    ('bh1', 1, False, 1.7, 2.3), ('bh1', 1, True, 3.5, 5.5), ('bh2', 2, False, 3.5, 5.0), ('bh1', 2, True, 5.0, 7.5),
    ('bh2', 3, False, 6.0, 8.5), ('bh2', 3, True, 11.0, 20.0)])
def test_order_of_convergence(variant, order, corrector, low, high):
  # Error ratio from 32 to 64 log-SNR steps against a 1000-step DPM-Solver++(3M) endpoint from the same x_T.
  # UniP-p has order p, UniPC-p order p + 1. Measured ratios (bh1 / bh2): UniP-1 1.88 / 1.88, UniPC-1 4.37 / 6.50,
  # UniP-2 4.68 / 4.02, UniPC-2 5.97 / 5.83 (third order, slowed by the first-order warm-up and final steps),
  # UniP-3 7.06 / 7.05, UniPC-3 14.4 / 14.4.
  reference = sample('dpm', 'ring', 'vp', B, prediction='x0', num_steps=1000, order=3).samples
  errors = [endpoint_error(reference, num_steps=n, order=order, variant=variant, corrector=corrector)
            for n in (32, 64)]
  assert low < errors[0] / errors[1] < high, errors


@pytest.mark.slow
@pytest.mark.parametrize('mix, sched', [('ring', 'vp'), ('aniso', 'linear')])
def test_reaches_noise_floor(mix, sched):
  # 50 evaluations; measured |sharpness - 1|: ring vp 0.012, aniso linear 0.004.
  out = sample('unipc', mix, sched, N, num_steps=50)
  assert int(out.nfe) == 50
  checks.assert_at_floor(report('unipc', mix, sched, num_steps=50), floor(mix)[0], MIXTURES[mix], N,
                         sharpness_tol=3 * checks.sharpness_stderr(MIXTURES[mix].dim, N) + 0.03)


@pytest.mark.slow
def test_defaults_beat_dpm_solver_defaults_at_ten_evaluations():
  # Measured on the ring at 10 evaluations (LinearSchedule): UniPC's defaults (UniPC-2, bh2, log-SNR, no jump)
  # sw 0.045 / sharpness 1.055 against DPM-Solver++(2M)'s defaults (log-SNR with the jump) 0.056 / 1.36.
  dpm = report('dpm', 'ring', 'linear', num_steps=10)
  rep = report('unipc', 'ring', 'linear', num_steps=10)
  assert rep['sw'] < dpm['sw'], (rep, dpm)
  assert abs(rep['sharpness'] - 1) < abs(dpm['sharpness'] - 1), (rep, dpm)


@pytest.mark.parametrize('denoise_to_zero', [True, False])
def test_final_corrector_costs_one_evaluation_and_helps(denoise_to_zero):
  # The last step's corrector needs the model at the step's end: one more call. Without the jump the corrected
  # endpoint is appended to the trajectory; with it the x0-prediction is taken at the corrected point.
  reference = sample('dpm', 'ring', 'vp', B, prediction='x0', num_steps=1000, order=3,
                     denoise_to_zero=denoise_to_zero).samples
  kwargs = dict(num_steps=8, denoise_to_zero=denoise_to_zero, return_trajectory=True)
  plain = sample('unipc', 'ring', 'vp', B, prediction='x0', **kwargs)
  final = sample('unipc', 'ring', 'vp', B, prediction='x0', final_corrector=True, **kwargs)
  assert (int(plain.nfe), int(final.nfe)) == (8, 9)
  assert plain.trajectory.shape == (9, B, 2)
  assert final.trajectory.shape == ((9 if denoise_to_zero else 10), B, 2)
  np.testing.assert_allclose(final.trajectory[:8], plain.trajectory[:8], atol=1e-6)
  err = lambda out: float(jnp.sqrt(jnp.mean(jnp.square(out.samples - reference))))
  assert err(final) < err(plain), (err(final), err(plain))


def test_plan_of_orders():
  plan = functools.partial(unipc.unipc_plan, corrector=True, lower_order_final=True)
  p, c = plan(6, 3, final_corrector=False, denoise_to_zero=True)
  np.testing.assert_array_equal(p, [1, 2, 3, 3, 2, 1])
  np.testing.assert_array_equal(c, [0, 1, 2, 3, 3, 2])
  p, c = plan(4, 2, final_corrector=True, denoise_to_zero=False)
  np.testing.assert_array_equal(p, [1, 2, 2, 1, 0])
  np.testing.assert_array_equal(c, [0, 1, 2, 2, 1])


def test_phi_functions_are_accurate_near_zero():
  z = np.array([-1e-3, -0.3, -0.999, -1.0, -4.0], np.float64)
  for k in (1, 2, 3, 4):
    exact = np.array([sum(v**j / math.factorial(j + k) for j in range(40)) for v in z])
    np.testing.assert_allclose(unipc.phi(jnp.asarray(z, jnp.float32), k), exact, rtol=2e-6)


def test_rejects_unknown_options():
  denoiser = Denoiser(None, SCHEDULES['vp'])
  with pytest.raises(ValueError, match='variant'):
    unipc.unipc_sample(denoiser, jax.random.PRNGKey(0), (1, 2), variant='bh3')
  with pytest.raises(ValueError, match='order=4'):
    unipc.unipc_sample(denoiser, jax.random.PRNGKey(0), (1, 2), order=4)
  with pytest.raises(ValueError, match='final_corrector'):
    unipc.unipc_sample(denoiser, jax.random.PRNGKey(0), (1, 2), corrector=False, final_corrector=True)
