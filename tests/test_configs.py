"""Every shipped config validates, builds its published model, and (shrunk) trains through the real tfds pipeline
on ``tfds.testing.mock_data``."""

import importlib.util

import jax
import jax.numpy as jnp
import pytest
import tensorflow_datasets as tfds

from diffax.models import autoencoder
from diffax.trainer import components, config as config_lib, events, latents, train
import trainer_runs


def load(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(name, trainer_runs.REPO / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize('name, arg, shape, params_m', [
    ('cifar10_ddpm', None, (32, 32, 3), 35.7),  # Ho et al. 2020, app. B
    ('cifar10_edm', None, (32, 32, 3), 61.8),  # DDPM++ (Karras et al. 2022, table 7)
    ('imagenet64', None, (64, 64, 3), 295.9),  # ADM ImageNet-64 with learned sigma
    ('imagenet64', 'dit', (64, 64, 3), 130.8),  # DiT-B/4, pixel space: wider patch embed/decoder than latents
    ('imagenet64', 'sit', (64, 64, 3), 130.3),  # SiT-B/2 = DiT-B/2 (SiT sec. 3; DiT table 4), no sigma channels
    ('digits', 'flow', (8, 8, 1), None),
    ('imagenet256_latent', None, (32, 32, 4), 674.8),  # DiT-XL/2 on SD-VAE latents (DiT table 4: 675 M)
    ('imagenet256_latent', 'runlocal', (32, 32, 4), None),
    ('digits_latent', None, (4, 4, 4), None),  # unet_tiny on the digits autoencoder's 4x4x4 latents
    ('digits', None, (8, 8, 1), None),
])
def test_configs_validate_and_build_their_models(name, arg, shape, params_m):
  config = load(name, arg)
  config_lib.validate(config)
  model = components.build_model(config)
  x = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  cond = jax.ShapeDtypeStruct((2,), jnp.int32) if config.data.num_classes else None
  params = jax.eval_shape(lambda *a: model.init(jax.random.PRNGKey(0), *a), x, t, cond)['params']
  out = jax.eval_shape(lambda p, *a: model.apply({'params': p}, *a), params, x, t, cond)
  channels = shape[-1] * (2 if config.diffusion.loss == 'hybrid' else 1)
  assert out.shape == (2, *shape[:2], channels)
  count = sum(p.size for p in jax.tree.leaves(params)) / 1e6
  if params_m is not None:
    assert count == pytest.approx(params_m, rel=0.01), count


def test_imagenet256_latent_has_the_dit_settings_and_names_the_missing_vae(tmp_path):
  """SD's VAE maps 256x256x3 to the 32x32x4 latents DiT-XL/2 is built for; without the file the run stops at start
  with the download command."""
  c = load('imagenet256_latent')
  vae = autoencoder.get_autoencoder(c.data.latents.preset)
  assert (256 // vae.downsampling_factor, vae.latent_channels, vae.scaling_factor) == (32, 4, 0.18215)
  assert (c.model.preset, c.diffusion.schedule, c.diffusion.loss, c.sample.sampler, c.sample.num_steps) == (
      'DiT-XL/2', 'linear', 'hybrid', 'ddpm', 250)
  assert (c.optim.learning_rate, c.optim.weight_decay, c.train.batch_size, c.train.num_steps) == (1e-4, 0, 256, 4e5)
  assert (c.train.ema_decays, c.sample.guidance_scale) == ((0.9999,), 1.5)
  c.data.latents.autoencoder = str(tmp_path / 'sd-vae-ft-mse.safetensors')
  with pytest.raises(config_lib.ConfigError, match='curl -L -o sd-vae-ft-mse.safetensors') as error:
    latents.from_config(c, (256, 256, 3))
  assert error.value.key == 'data.latents.autoencoder'


@pytest.mark.parametrize('name, arg', [('cifar10_ddpm', 'runlocal'), ('imagenet64', 'runlocal')])
def test_runlocal_trains_on_mock_tfds_data(name, arg, tmp_path):
  config = load(name, arg)
  mock = tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE)
  with jax.numpy_dtype_promotion('standard'), mock:
    train.train_and_evaluate(config, str(tmp_path))
  losses = dict(events.read_scalars(tmp_path)['train/loss'])
  assert sorted(losses) == [2, 4] and all(0 < v < 10 for v in losses.values())
  assert (tmp_path / 'checkpoints' / '4').is_dir()


@pytest.mark.parametrize('name, arg', [('autoencoder_digits', None), ('autoencoder_digits', 'gan'),
                                       ('autoencoder_digits', 'runlocal'),
                                       ('autoencoder_kl_f8', None), ('autoencoder_kl_f8', 'runlocal')])
def test_autoencoder_configs_validate(name, arg):
  config = load(name, arg)
  config_lib.validate(config)
  assert config.model.name == 'autoencoder'


def test_autoencoder_kl_f8_has_ldm_settings():
  """LDM's autoencoder_kl_32x32x4.yaml: SD's VAE (83.65 M), the 3-layer patch discriminator (pix2pix, 2.77 M),
  KL 1e-6 over per-image pixel sums, GAN from update 50,001 at 0.5, Adam(0.5, 0.9) at 2 x 8 x 12 x 4.5e-6."""
  from diffax.models import autoencoder_loss  # pylint: disable=g-import-not-at-top
  c = load('autoencoder_kl_f8')
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  vae = autoencoder.get_autoencoder(c.model.preset, in_channels=3)
  disc = autoencoder_loss.PatchDiscriminator(ch=c.autoencoder.disc_ch, num_layers=c.autoencoder.disc_layers,
                                             num_groups=c.autoencoder.disc_groups)
  count = lambda m: sum(p.size for p in jax.tree.leaves(jax.eval_shape(m.init, jax.random.PRNGKey(0), x))) / 1e6
  assert count(vae) == pytest.approx(83.65, abs=0.01) and count(disc) == pytest.approx(2.77, abs=0.01)
  assert (vae.downsampling_factor, vae.latent_channels) == (8, 4)
  a = c.autoencoder
  assert (a.reconstruction, a.kl_weight * 256 * 256 * 3, a.disc_start, a.disc_weight) == pytest.approx(
      ('l1', 1e-6, 50_001, 0.5))
  assert c.optim.learning_rate * c.optim.grad_accum_steps == pytest.approx(4.5e-6 * 2 * 8 * 12 * 2)
  assert (c.optim.optimizer, c.optim.b1, c.optim.b2, c.optim.grad_clip) == ('adam', 0.5, 0.9, 0.0)
  assert c.train.batch_size * c.optim.grad_accum_steps == 2 * 8 * 12
