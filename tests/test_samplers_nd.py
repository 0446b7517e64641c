"""Every sampler on sequences [N, L, C] and clips [N, T, H, W, C]: the samplers are rank-agnostic.

The exact 64-D mixture is laid out as [N, 16, 4] (a 16-sample, 4-channel waveform) and [N, 4, 4, 4, 1] (a
4-frame 4x4 clip). Every per-example reduction of a sampler (norms, error estimates, Langevin step sizes) must run
over all the example's axes, and JAX draws the same noise for the same number of elements whatever the shape,
so each sampler must map the same rng to the same samples in every layout, and there reach the mixture's floor.
"""

import functools

import jax
import numpy as np
import pytest

from diffax.diffusion import samplers, schedules
from diffax.testing import checks, metrics, mixtures

MIXTURE = mixtures.anisotropic_mixture(dim=64)
N = 512
LAYOUTS = {'vector': (64,), 'sequence': (16, 4), 'clip': (4, 4, 4, 1)}
SETTINGS = {'adaptive_ode': dict(rtol=1e-3, atol=1e-3), 'dpm_solver': dict(num_steps=10, denoise_to_zero=True)}
"""Few steps (10 unless set here): the comparison across layouts is exact at any step count."""


@functools.cache
def _samples(name: str, layout: str) -> np.ndarray:
  schedule = schedules.VPSDE()
  denoiser = MIXTURE.denoiser(schedule, 'eps')
  kwargs = SETTINGS.get(name, dict(num_steps=10))
  run = jax.jit(lambda rng: samplers.SAMPLERS[name](denoiser, rng, (N, *LAYOUTS[layout]), **kwargs))
  out = run(jax.random.PRNGKey(0))
  assert out.samples.shape == (N, *LAYOUTS[layout])
  return np.asarray(out.samples).reshape(N, -1)


@pytest.mark.parametrize('layout', ['sequence', 'clip'])
@pytest.mark.parametrize('name', sorted(samplers.SAMPLERS))
def test_same_samples_in_every_layout(name, layout):
  np.testing.assert_allclose(_samples(name, layout), _samples(name, 'vector'), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('layout', ['sequence', 'clip'])
def test_dpm_solver_reaches_the_floor_on_clips_and_sequences(layout):
  """Mode weights, mean, covariance and SW of 512 samples as close as 512 exact ones (DPM-Solver++(2M), 10 steps)."""
  floor, reference = metrics.noise_floor(MIXTURE, N, jax.random.PRNGKey(1))
  report = metrics.mixture_report(_samples('dpm_solver', layout), MIXTURE, reference, jax.random.PRNGKey(2))
  checks.assert_at_floor(report, floor, MIXTURE, N)
