"""The mixture test utilities are themselves checked against scipy and autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from diffax.diffusion import parameterization, schedules
from diffax.testing import metrics, mixtures


def _scipy_log_prob(mixture, x, alpha, sigma):
  w, mu = np.asarray(mixture.weights, np.float64), np.asarray(mixture.means, np.float64)
  u, lam = np.asarray(mixture.eigvecs, np.float64), np.asarray(mixture.eigvals, np.float64)
  comps = []
  for k in range(len(w)):
    cov = alpha**2 * (u[k] * lam[k]) @ u[k].T + sigma**2 * np.eye(mixture.dim)
    comps.append(np.log(w[k]) + stats.multivariate_normal(alpha * mu[k], cov).logpdf(np.asarray(x, np.float64)))
  return special.logsumexp(np.stack(comps, -1), axis=-1)


@pytest.mark.parametrize('mixture', [mixtures.ring_mixture(), mixtures.anisotropic_mixture(dim=8)],
                         ids=['ring', 'aniso8'])
@pytest.mark.parametrize('alpha,sigma', [(1.0, 0.0), (0.8, 0.6), (1.0, 3.0)])
def test_log_prob_matches_scipy(mixture, alpha, sigma):
  x, _ = mixture.sample(jax.random.PRNGKey(0), 50)
  x = alpha * x + sigma * jax.random.normal(jax.random.PRNGKey(1), x.shape)
  np.testing.assert_allclose(mixture.log_prob(x, alpha, sigma), _scipy_log_prob(mixture, x, alpha, sigma),
                             rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('mixture', [mixtures.ring_mixture(), mixtures.anisotropic_mixture(dim=8)],
                         ids=['ring', 'aniso8'])
def test_tweedie_posterior_mean_equals_autodiff_score(mixture):
  """E[x0 | x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha (Tweedie's formula)."""
  alpha, sigma = 0.7, 0.5
  x_t = jax.random.normal(jax.random.PRNGKey(2), (32, mixture.dim))
  score = jax.jit(jax.vmap(jax.grad(lambda x: mixture.log_prob(x[None], alpha, sigma)[0])))(x_t)
  np.testing.assert_allclose(mixture.posterior_mean(x_t, alpha, sigma), (x_t + sigma**2 * score) / alpha,
                             rtol=1e-4, atol=1e-4)


def test_samples_have_the_exact_moments_and_weights():
  mixture = mixtures.anisotropic_mixture(dim=16)
  x, labels = mixture.sample(jax.random.PRNGKey(3), 100_000)
  mean, cov = mixture.mean_and_cov()
  np.testing.assert_allclose(jnp.mean(x, 0), mean, atol=0.01)
  np.testing.assert_allclose(jnp.cov(x, rowvar=False), cov, atol=0.01)
  np.testing.assert_allclose(jnp.bincount(labels, length=4) / 100_000, mixture.weights, atol=0.005)
  assert float(jnp.mean(mixture.mahalanobis(x, labels))) / 16 == pytest.approx(1.0, abs=0.01)


def test_sliced_wasserstein_of_a_shift():
  """Sorted projections of x + delta differ by theta . delta, so SW_2^2 = E(theta . delta)^2 = |delta|^2 / D."""
  x = jax.random.normal(jax.random.PRNGKey(4), (1000, 8))
  delta = jnp.arange(8.0) / 10
  sw = metrics.sliced_wasserstein(x, x + delta[None], jax.random.PRNGKey(5), num_projections=5_000)
  assert float(sw) == pytest.approx(float(jnp.linalg.norm(delta)) / np.sqrt(8), rel=0.02)
  assert float(metrics.sliced_wasserstein(x, x, jax.random.PRNGKey(5))) == 0.0


def test_noise_floor_of_exact_samples():
  mixture = mixtures.ring_mixture()
  floor, reference = metrics.noise_floor(mixture, 4000, jax.random.PRNGKey(6))
  assert reference.shape == (4000, 2)
  assert floor['sharpness'] == pytest.approx(1.0, abs=0.05)
  assert floor['mode_weight_err'] < 0.03 and floor['cov_err'] < 0.05
  # Too-sharp samples (all at the modes) are caught by sharpness even though their nll looks better.
  labels = jnp.argmax(mixture.responsibilities(reference), -1)
  collapsed = metrics.mixture_report(mixture.means[labels], mixture, reference, jax.random.PRNGKey(7))
  assert collapsed['sharpness'] < 0.01 and collapsed['nll'] < floor['nll']


@pytest.mark.parametrize('prediction', ['eps', 'x0', 'v', 'score', 'edm'])
def test_exact_model_fn_round_trips_through_every_prediction(prediction):
  mixture = mixtures.ring_mixture()
  schedule = schedules.CosineSchedule()
  t = jnp.full((16,), 0.3)
  x_t = jax.random.normal(jax.random.PRNGKey(8), (16, 2))
  x0, _ = parameterization.denoise(mixture.model_fn(schedule, prediction), x_t, t, schedule=schedule,
                                   prediction=prediction)
  alpha, sigma = schedule.alpha_sigma(t)
  np.testing.assert_allclose(x0, mixture.posterior_mean(x_t, alpha, sigma), rtol=1e-4, atol=1e-4)
