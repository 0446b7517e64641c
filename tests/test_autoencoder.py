"""KL autoencoder: published parameter counts, downsampling factors, the posterior's KL in closed form, latent
scaling, clear errors on mismatched inputs; its training objective (terms, disc start, adaptive weight) and the
PSNR / SSIM metrics against closed forms and scipy. Equality with diffusers' implementation is in test_convert.py."""

import flax.linen as nn
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

  for path, g in jax.tree_util.tree_leaves_with_path(jax.jit(jax.grad(loss))(variables['params'])):
    assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0), jax.tree_util.keystr(path)


def test_bad_inputs_say_what_is_expected(small):
  model, variables, x = small
  with pytest.raises(ValueError, match='decodes 4-channel latents.*latent_channels'):
    model.apply(variables, jnp.zeros((1, 4, 4, 16)), method='decode')
  with pytest.raises(ValueError, match='divisible by 4'):
    model.apply(variables, x[:, :14, :14], method='encode')
  with pytest.raises(ValueError, match="Unknown autoencoder preset 'sd4'"):
    autoencoder.get_autoencoder('sd4')


def test_psnr_and_ssim_match_closed_forms_and_a_scipy_reference():
  from scipy import signal  # pylint: disable=import-outside-toplevel
  from diffax.evaluation import reconstruction  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 16, 18, 3)).astype(np.float32)
  np.testing.assert_allclose(reconstruction.psnr(x, x + 0.1), 10 * np.log10(4 / 0.01), rtol=1e-5)
  y = np.clip(x + 0.3 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
  w = reconstruction.gaussian_window().astype(np.float64)
  window = np.outer(w, w)
  expected = []
  for b in range(2):
    maps = []
    for c in range(3):
      f = lambda a: signal.correlate2d(a, window, mode='valid')
      xs, ys = x[b, :, :, c].astype(np.float64), y[b, :, :, c].astype(np.float64)
      mx, my = f(xs), f(ys)
      vx, vy, cxy = f(xs * xs) - mx ** 2, f(ys * ys) - my ** 2, f(xs * ys) - mx * my
      c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
      maps.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    expected.append(np.mean(maps))
  np.testing.assert_allclose(reconstruction.ssim(x, y), expected, rtol=1e-4)
  np.testing.assert_allclose(reconstruction.ssim(x, x), [1.0, 1.0], rtol=1e-5)


@pytest.fixture(scope='module')
def objective(small):
  from diffax.models import autoencoder_loss  # pylint: disable=import-outside-toplevel
  model, variables, x = small
  disc = autoencoder_loss.PatchDiscriminator(ch=8, num_layers=2, num_groups=4)
  params = nn.meta.unbox({'autoencoder': variables['params'],
                          'discriminator': disc.init(jax.random.key(3), x)['params']})
  loss_fn = autoencoder_loss.make_autoencoder_loss(model, disc, reconstruction='l1', kl_weight=1e-3,
                                                   disc_weight=0.5, disc_start=10)
  return model, disc, params, x, loss_fn


def test_autoencoder_loss_terms_and_disc_start(objective):
  model, disc, params, x, loss_fn = objective
  rng = jax.random.key(4)
  before, aux = loss_fn(params, {'x': x}, rng, jnp.int32(9))
  posterior = model.apply({'params': params['autoencoder']}, x, method='encode')
  x_hat = model.apply({'params': params['autoencoder']}, posterior.sample(rng), method='decode')
  rec = np.mean(np.abs(np.asarray(x_hat) - np.asarray(x)))
  np.testing.assert_allclose(before, rec + 1e-3 * np.mean(posterior.kl()), rtol=1e-5)
  grads = jax.grad(lambda p: loss_fn(p, {'x': x}, rng, jnp.int32(9))[0])(params)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads['discriminator']))  # before disc_start
  after, aux = loss_fn(params, {'x': x}, rng, jnp.int32(10))
  np.testing.assert_allclose(after, before + aux['disc_weight'] * aux['g_loss'] + aux['d_loss'], rtol=1e-5)


def test_adaptive_weight_is_the_gradient_norm_ratio_on_the_last_layer(objective):
  model, disc, params, x, loss_fn = objective
  rng = jax.random.key(5)
  _, aux = loss_fn(params, {'x': x}, rng, jnp.int32(10))

  def terms(ae):
    z = model.apply({'params': ae}, x, method='encode').sample(rng)
    x_hat = model.apply({'params': ae}, z, method='decode')
    return jnp.mean(jnp.abs(x_hat - x)), -jnp.mean(disc.apply({'params': params['discriminator']}, x_hat))

  last = lambda g: g['decoder']['conv_out']['kernel']
  g_rec = last(jax.grad(lambda p: terms(p)[0])(params['autoencoder']))
  g_gan = last(jax.grad(lambda p: terms(p)[1])(params['autoencoder']))
  np.testing.assert_allclose(aux['disc_weight'], 0.5 * np.linalg.norm(g_rec) / (np.linalg.norm(g_gan) + 1e-4),
                             rtol=1e-4)
  # the discriminator learns from the hinge loss alone (the generator term sees it frozen)
  d_grads = jax.grad(lambda d: loss_fn({**params, 'discriminator': d}, {'x': x}, rng, jnp.int32(10))[0])(
      params['discriminator'])
  d_only = jax.grad(lambda d: loss_fn({**params, 'discriminator': d}, {'x': x}, rng, jnp.int32(10))[1]['d_loss'])(
      params['discriminator'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), d_grads, d_only)


def test_perceptual_term_joins_the_reconstruction_and_the_adaptive_weight(objective):
  from diffax.models import autoencoder_loss  # pylint: disable=import-outside-toplevel
  model, disc, params, x, _ = objective
  colour = lambda a, b: jnp.sum(jnp.square(jnp.mean(a, axis=(1, 2)) - jnp.mean(b, axis=(1, 2))), axis=-1)  # [B]
  loss_fn = autoencoder_loss.make_autoencoder_loss(model, disc, reconstruction='l1', kl_weight=1e-3, disc_weight=0.5,
                                                   disc_start=10, perceptual_fn=colour, perceptual_weight=0.7)
  rng = jax.random.key(6)

  def terms(ae):
    posterior = model.apply({'params': ae}, x, method='encode')
    x_hat = model.apply({'params': ae}, posterior.sample(rng), method='decode')
    rec = jnp.mean(jnp.abs(x_hat - x)) + 0.7 * jnp.mean(colour(x, x_hat))
    return rec, -jnp.mean(disc.apply({'params': params['discriminator']}, x_hat)), posterior, x_hat

  rec, _, posterior, x_hat = terms(params['autoencoder'])
  before, aux = loss_fn(params, {'x': x}, rng, jnp.int32(9))
  np.testing.assert_allclose(aux['perceptual'], np.mean(colour(x, x_hat)), rtol=1e-5)
  assert float(aux['perceptual']) > 0
  np.testing.assert_allclose(before, rec + 1e-3 * np.mean(posterior.kl()), rtol=1e-5)
  _, aux = loss_fn(params, {'x': x}, rng, jnp.int32(10))
  last = lambda g: g['decoder']['conv_out']['kernel']
  g_rec = last(jax.grad(lambda p: terms(p)[0])(params['autoencoder']))
  g_gan = last(jax.grad(lambda p: terms(p)[1])(params['autoencoder']))
  np.testing.assert_allclose(aux['disc_weight'], 0.5 * np.linalg.norm(g_rec) / (np.linalg.norm(g_gan) + 1e-4),
                             rtol=1e-4)
