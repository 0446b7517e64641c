"""KL autoencoder: published parameter counts, downsampling factors, the posterior's KL in closed form, latent
scaling, and clear errors on mismatched inputs. Equality with diffusers' implementation is in test_convert.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.models import autoencoder
from diffax.models.convert import safetensors_io


def _num_params(model, size):
  shapes = safetensors_io.param_shapes(model, jnp.zeros((1, size, size, 3), jnp.float32))
  return sum(int(np.prod(s)) for s in shapes.values())


@pytest.mark.parametrize('preset, expected', [
    ('sd', 83_653_863),  # diffusers AutoencoderKL of stabilityai/sd-vae-ft-mse ("83.7 M")
    ('sdxl', 83_653_863),
    ('sd3', 83_821_011),  # the same blocks with 16 latent channels (diffusers' count for SD3 / FLUX's VAE)
])
def test_preset_parameter_counts_match_the_published_networks(preset, expected):
  assert _num_params(autoencoder.get_autoencoder(preset), 16) == expected


@pytest.mark.parametrize('preset, factor, channels', [('f4c4', 4, 4), ('sd', 8, 4), ('sd3', 8, 16),
                                                      ('f16c16', 16, 16), ('small', 4, 4)])
def test_downsampling_factor_and_latent_shape(preset, factor, channels):
  model = autoencoder.get_autoencoder(preset)
  x = jnp.zeros((2, 64, 32, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  latents = jax.eval_shape(lambda v: model.apply(v, x, method='encode_latents'), variables)
  images = jax.eval_shape(lambda v, z: model.apply(v, z, method='decode_latents'), variables, latents)
  assert model.downsampling_factor == factor
  assert latents.shape == (2, 64 // factor, 32 // factor, channels)
  assert images.shape == x.shape and images.dtype == jnp.float32


@pytest.fixture(scope='module')
def small():
  model = autoencoder.get_autoencoder('small', scaling_factor=0.7, shift_factor=0.2)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  return model, model.init(jax.random.key(0), x), x


def test_kl_matches_the_closed_form_and_samples_follow_the_posterior(small):
  model, variables, x = small
  posterior = model.apply(variables, x, method='encode')
  mean, logvar = np.asarray(posterior.mean, np.float64), np.asarray(posterior.logvar, np.float64)
  # KL(N(m, s^2) || N(0, 1)) = log(1 / s) + (s^2 + m^2) / 2 - 1/2 per dimension
  expected = np.sum(-0.5 * logvar + 0.5 * (np.exp(logvar) + mean ** 2) - 0.5, axis=(1, 2, 3))
  np.testing.assert_allclose(posterior.kl(), expected, rtol=1e-5)
  rng = jax.random.key(1)
  eps = np.asarray(jax.random.normal(rng, mean.shape, jnp.float32), np.float64)
  np.testing.assert_allclose(posterior.sample(rng), mean + np.exp(0.5 * logvar) * eps, rtol=1e-5, atol=1e-6)


def test_latent_scaling_is_inverted_by_decode_latents(small):
  model, variables, x = small
  posterior = model.apply(variables, x, method='encode')
  latents = model.apply(variables, x, method='encode_latents')
  np.testing.assert_allclose(latents, 0.7 * (posterior.mean - 0.2), rtol=1e-6, atol=1e-6)
  reconstruction, _ = jax.jit(model.apply)(variables, x)
  np.testing.assert_allclose(model.apply(variables, latents, method='decode_latents'), reconstruction,
                             rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter(small):
  model, variables, x = small

  def loss(params):
    reconstruction, posterior = model.apply({'params': params}, x, jax.random.key(2))
    return jnp.mean(jnp.abs(reconstruction - x)) + 1e-6 * jnp.mean(posterior.kl())

  for path, g in jax.tree_util.tree_leaves_with_path(jax.grad(loss)(variables['params'])):
    assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0), jax.tree_util.keystr(path)


def test_bad_inputs_say_what_is_expected(small):
  model, variables, x = small
  with pytest.raises(ValueError, match='decodes 4-channel latents.*latent_channels'):
    model.apply(variables, jnp.zeros((1, 4, 4, 16)), method='decode')
  with pytest.raises(ValueError, match='divisible by 4'):
    model.apply(variables, x[:, :14, :14], method='encode')
  with pytest.raises(ValueError, match="Unknown autoencoder preset 'sd4'"):
    autoencoder.get_autoencoder('sd4')
