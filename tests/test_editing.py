"""SDEdit and inpainting against closed forms of the 2-D ring mixture (8 modes of std 0.1 on the unit circle)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.diffusion import schedules
from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import ancestral, editing
from diffax.testing import metrics, mixtures

LINEAR = schedules.LinearSchedule()
RING = mixtures.ring_mixture()
N = 4000
MODE_VAR = 0.01  # ring_mixture(std=0.1)


def sdedit(t_start, x_input):
  """SDEdit with ancestral DDPM ('large' variance, every knot below t_start)."""
  run = jax.jit(lambda rng, x: editing.sdedit(ancestral.ancestral_sample, RING.denoiser(LINEAR), rng, x,
                                              t_start=t_start, variance='large'))
  return run(jax.random.PRNGKey(0), x_input)


def test_sdedit_at_small_t_resamples_within_the_mode():
  """From t = 0.02 (sigma 0.076) the output is a fresh draw of p(x0 | x_t), as the input itself is.

  For a mode N(mu, v I) well apart from the others, input and output are then independent given x_t, so
  E|out - in|^2 = 2 D v sigma^2 / (alpha^2 v + sigma^2) (0.121 RMS here; measured 0.122), and both stay in
  the same mode (measured 99.7%; unconditional sampling keeps 15% at RMS distance 1.37).
  """
  x_input, _ = RING.sample(jax.random.PRNGKey(5), N)
  out = sdedit(0.02, x_input)
  assert out.nfe == 20
  alpha, sigma = (float(a) for a in LINEAR.alpha_sigma(jnp.float32(0.02)))
  expected_rms = np.sqrt(2 * 2 * MODE_VAR * sigma**2 / (alpha**2 * MODE_VAR + sigma**2))
  rms = float(jnp.sqrt(jnp.mean(jnp.sum(jnp.square(out.samples - x_input), axis=-1))))
  assert rms == pytest.approx(expected_rms, rel=0.05)
  mode = lambda x: jnp.argmax(RING.responsibilities(x), axis=-1)
  assert float(jnp.mean(mode(out.samples) == mode(x_input))) > 0.98


def test_sdedit_from_t_max_forgets_the_input():
  """Inputs far off the data (all at (3, 3)) noised to t = 1 (alpha 0.006) give unconditional samples.

  Tolerances as in the sampler tests; DDPM 'large' at 1000 knots has sharpness 1.015 by Ho et al.'s
  recursion (measured 0.994), 4 sampling sigmas are 0.063.
  """
  floor, reference = metrics.noise_floor(RING, N, jax.random.PRNGKey(1))
  out = sdedit(LINEAR.t_max, jnp.full((N, 2), 3.0))
  assert out.nfe == 1000
  report = metrics.mixture_report(out.samples, RING, reference, jax.random.PRNGKey(2))
  w = np.asarray(RING.weights, np.float64)
  assert report['mode_weight_err'] <= 4 * np.sqrt(np.max(w * (1 - w)) / N), report
  _, cov = RING.mean_and_cov()
  assert report['mean_err'] <= 4 * np.sqrt(float(jnp.trace(cov)) / 2 / N), report
  assert report['cov_err'] <= 1.5 * floor['cov_err'] + 0.01, (report, floor)
  assert report['sw'] <= 1.5 * floor['sw'] + 0.005, (report, floor)
  assert report['sharpness'] == pytest.approx(1.015, abs=4 * np.sqrt(1 / N) + 0.005)


def exact_conditional(x_known):
  """p(y | x = x_known) of the ring: a 1-D mixture with weights w_k N(x_known; mu_kx, v), means mu_ky, var v."""
  w, mu = np.asarray(RING.weights, np.float64), np.asarray(RING.means, np.float64)
  log_w = np.log(w) - 0.5 * (x_known - mu[:, 0])**2 / MODE_VAR
  weights = np.exp(log_w - log_w.max())
  return weights / weights.sum(), mu[:, 1]


def test_inpainting_keeps_known_pixels_and_samples_the_conditional():
  """x known at 0: p(y | x = 0) puts 0.3 on the mode at y = +1 and 0.7 on y = -1 (std 0.1 each).

  Replacement (RePaint without resampling) is an approximation: the unknown coordinate sees the known one
  only through its freshly noised copy. At x = 0 it is good, measured with ancestral DDPM over 1000 knots:
  weight 0.309 (exact 0.300), mode centres +-0.966 (pulled inwards by a third of the mode std), mode std
  0.103, var(y) 0.808 (exact 0.850). Elsewhere it can fail outright: at x = 1 the mode at (1, 0) holds 88%
  of p(y | x) but gets 16% of the samples, because y commits to a mode while x is still drowned in noise.
  The tolerances below are ~3x the measured errors (4 binomial sigmas of the weight is 0.03).
  """
  weights, centres = exact_conditional(0.0)
  active = weights > 1e-6
  np.testing.assert_allclose(weights[active], [0.3, 0.7], atol=1e-6)
  np.testing.assert_allclose(centres[active], [1.0, -1.0], atol=1e-6)
  x_known = jnp.zeros((N, 2), jnp.float32)
  mask = jnp.asarray([[1.0, 0.0]])
  run = jax.jit(lambda rng: editing.inpaint(ancestral.ancestral_sample, RING.denoiser(LINEAR), rng, x_known, mask))
  out = run(jax.random.PRNGKey(0))
  assert out.nfe == 1000
  np.testing.assert_array_equal(out.samples[:, 0], 0.0)
  y = np.asarray(out.samples[:, 1], np.float64)
  up = y > 0
  assert np.mean(up) == pytest.approx(0.3, abs=0.03)
  assert np.mean(y[up]) == pytest.approx(1.0, abs=0.1) and np.mean(y[~up]) == pytest.approx(-1.0, abs=0.1)
  assert np.std(y[up]) == pytest.approx(0.1, rel=0.25) and np.std(y[~up]) == pytest.approx(0.1, rel=0.25)
  exact_mean = float(weights @ centres)
  exact_var = float(weights @ (MODE_VAR + centres**2)) - exact_mean**2
  assert np.mean(y) == pytest.approx(exact_mean, abs=0.08)
  assert np.var(y) == pytest.approx(exact_var, abs=0.12)
