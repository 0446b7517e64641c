"""Samplers follow the precision of ``x_T``: under ``jax.enable_x64`` a float64 start runs the grid, the loop state,
the schedule and the parameterisation in float64, so DPM-Solver++ and UniPC on the exact ring mixture agree with
independent float64 numpy implementations to float64 rounding, where float32 runs stop at float32 rounding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import np_schedules
import test_samplers_unipc
from diffax.diffusion import schedules
from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import base, dpm_solver, unipc

LINEAR = schedules.LinearSchedule()
RING = test_samplers_unipc.MIXTURES['ring']
NUM_STEPS = 5


def dpm_solver_2m_np(x: np.ndarray, alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
  """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) from ``x`` at ``timesteps[0]`` to clean data, float64: with
  ``h = lambda_t - lambda_s`` and ``r = h_prev / h``, ``x_t = sigma_t / sigma_s x_s - alpha_t (e^-h - 1) D``,
  ``D = (1 + 1/(2r)) m_0 - 1/(2r) m_1``; the first step and (lower_order_final, and the jump to x0) the last are
  first order, ``D = m_0``."""
  alpha = lambda n: 1.0 if n < 0 else math.sqrt(alphas_cumprod[n])
  sigma = lambda n: 0.0 if n < 0 else math.sqrt(1.0 - alphas_cumprod[n])
  lam = lambda n: math.inf if n < 0 else math.log(alpha(n) / sigma(n))
  points = list(timesteps) + [-1]
  m_prev, lam_prev = None, None
  for i, n in enumerate(timesteps):
    t = points[i + 1]
    m = test_samplers_unipc.ring_x0_np(x, alpha(n), sigma(n))
    h = lam(t) - lam(n)
    if i in (0, len(timesteps) - 1):
      d = m
    else:
      r = (lam(n) - lam_prev) / h
      d = (1.0 + 0.5 / r) * m - (0.5 / r) * m_prev
    x = (sigma(t) / sigma(n)) * x - alpha(t) * math.expm1(-h) * d
    m_prev, lam_prev = m, lam(n)
  return x


def reference(sampler: str, x: np.ndarray) -> np.ndarray:
  timesteps = np.linspace(0, LINEAR.num_timesteps - 1, NUM_STEPS + 1).round()[::-1][:-1].astype(int)
  if sampler == 'dpm_solver':
    return dpm_solver_2m_np(x, LINEAR.alphas_cumprod(), timesteps)
  return test_samplers_unipc.unipc_np(x, LINEAR.alphas_cumprod(), timesteps, 2, 'bh2')


def run(sampler: str, mixture, x_T: jax.Array):
  """The sampler on diffusers' integer 'linspace' grid with the final jump (as the references), jitted."""
  fn = {'dpm_solver': dpm_solver.dpm_solver_sample, 'unipc': unipc.unipc_sample}[sampler]
  denoiser = Denoiser(mixture.model_fn(LINEAR), LINEAR)
  return jax.jit(lambda x: fn(denoiser, jax.random.PRNGKey(0), x.shape, num_steps=NUM_STEPS, spacing='linspace',
                              denoise_to_zero=True, return_trajectory=True, x_T=x))(x_T)


@pytest.mark.parametrize('sampler', ['dpm_solver', 'unipc'])
def test_float64_start_reaches_float64_rounding(sampler):
  """Measured max |error| of UniPC on 64 ring samples: float32 2e-7, float64 6e-16."""
  x32 = LINEAR.prior_sample(jax.random.PRNGKey(3), (64, 2))
  expected = reference(sampler, np.asarray(x32, np.float64))
  out32 = run(sampler, RING, x32)
  assert out32.samples.dtype == jnp.float32
  err32 = np.abs(np.asarray(out32.samples, np.float64) - expected).max()
  with jax.enable_x64(True):
    out64 = run(sampler, RING.astype(jnp.float64), jnp.asarray(np.asarray(x32, np.float64)))
    assert out64.samples.dtype == jnp.float64 and out64.trajectory.dtype == jnp.float64
    err64 = np.abs(np.asarray(out64.samples) - expected).max()
  assert 1e-8 < err32 < 3e-5, err32
  assert err64 < 1e-12 and err64 < 1e-5 * err32, (err64, err32)


def test_float64_log_snr_grid():
  """The log-SNR grid of VP in float64 is uniform in log-SNR (numpy's closed-form alpha, sigma) to 1e-12; in
  float32 to float32 rounding only."""
  vp = schedules.VPSDE()

  def spread(dtype):
    ts = np.asarray(base.time_grid(vp, 8, 'log_snr', dtype=dtype), np.float64)[:-1]
    alpha, sigma = np_schedules.alpha_sigma(vp, ts)
    return np.abs(np.diff(np.diff(2.0 * np.log(alpha / sigma)))).max()

  assert spread(jnp.float32) > 1e-7
  with jax.enable_x64(True):
    assert spread(jnp.float64) < 1e-12
