"""Latent diffusion in the trainer: the real main trains configs/digits_latent.py:runlocal on the latents of a tiny
autoencoder saved by the test (encoded in the step from the run's frozen copy), samples decoded images of the
data's shape and evaluates them; the step's loss is the pixel loss on encoded latents; cached latents are the
encoder's and are refused for another autoencoder; bad latent configs are named errors."""

import importlib.util
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from diffax.data.digits import load_digits
from diffax.data.sources import get_source
from diffax.models import autoencoder
from diffax.trainer import config as config_lib, experiment, latents
import trainer_runs

LATENT = f'{trainer_runs.REPO}/configs/digits_latent.py'
FIELDS = {'in_channels': 1, 'ch': 8, 'num_groups': 4, 'scaling_factor': 0.5}  # small preset, narrower


def _save_tiny(directory, fields=None, input_shape=(16, 16, 1), seed=3):
  fields = fields or FIELDS
  model = autoencoder.get_autoencoder('small', **fields)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, *input_shape)))['params'])
  return latents.save_autoencoder(directory, params, preset='small', fields=fields, input_shape=input_shape)


def _config(ae_dir, **overrides):
  spec = importlib.util.spec_from_file_location('digits_latent', LATENT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config('runlocal')
  c.data.latents.autoencoder = str(ae_dir)
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A tiny saved autoencoder and a 6-step on-the-fly latent run of the real main on it, then --mode sample."""
  ae_dir = tmp_path_factory.mktemp('autoencoder')
  record = _save_tiny(ae_dir)
  workdir = tmp_path_factory.mktemp('latent_run')
  overrides = (f'data.latents.autoencoder={ae_dir}', 'data.latents.mode=on_the_fly', 'train.eval_every=6')
  trainer_runs.run_main(workdir, *overrides, config=f'{LATENT}:runlocal')
  trainer_runs.run_main(workdir, *overrides, mode='sample', config=f'{LATENT}:runlocal')
  return ae_dir, record, workdir


def test_the_model_trains_on_latents_and_samples_are_decoded_digits(run):
  _, record, workdir = run
  assert record['latent_shape'] == [4, 4, 4]
  assert json.loads((workdir / 'config.json').read_text())['example_shape'] == [4, 4, 4]
  with (workdir / 'samples' / 'samples_step_00000006.npz').open('rb') as f:
    images = np.load(f)['images']
  assert images.shape == (16, 8, 8, 1) and images.dtype == np.uint8  # decoded and resized to the data's 8x8
  assert (workdir / 'samples' / 'step_00000006.png').exists()


def test_eval_json_scores_decoded_samples_and_records_the_autoencoder(run):
  _, record, workdir = run
  (path,) = (workdir / 'eval').glob('step_00000006_*.json')
  result = json.loads(path.read_text())
  assert {'digits_fd', 'digits_accuracy'} <= set(result['metrics'])
  assert np.isfinite(result['metrics']['digits_fd'])
  protocol = result['protocol']
  assert protocol['latents_autoencoder_sha256'] == record['sha256'] and protocol['latent_shape'] == [4, 4, 4]
  assert protocol['latents_mode'] == 'on_the_fly' and protocol['scaling_factor'] == 0.5


def test_the_checkpointed_frozen_autoencoder_is_the_saved_one(run, tmp_path):
  ae_dir, _, workdir = run
  exp = experiment.Experiment(_config(ae_dir, **{'data.latents.mode': 'on_the_fly'}), workdir)
  state = exp.checkpointer.restore(exp.abstract_state, step=6)
  exp.checkpointer.close()
  with (ae_dir / 'params.npz').open('rb') as f:
    saved = dict(np.load(f))
  frozen = {'/'.join(k.key for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(state.frozen['autoencoder'])[0]}
  assert sorted(frozen) == sorted(saved)
  for name, value in saved.items():
    np.testing.assert_array_equal(frozen[name], value)


def test_the_step_loss_is_the_pixel_loss_on_encoded_latents(run, tmp_path):
  """Objective on the fly: loss(params, images) = diffusion loss(params, s * E(resize(images))) with the rng's
  second half; E is computed here by the autoencoder module directly."""
  ae_dir, _, _ = run
  exp = experiment.Experiment(_config(ae_dir, **{'data.latents.mode': 'on_the_fly'}), tmp_path / 'w')
  params = jax.jit(exp.init_backbone)(jax.random.PRNGKey(1))  # each call jitted: op by op, a cold cache compiles
  images = jnp.asarray(load_digits('train')[0][:8], jnp.float32) / 127.5 - 1  # every primitive separately
  batch = {'x': images, 'cond': jnp.arange(8, dtype=jnp.int32)}
  rng = jax.random.PRNGKey(5)
  frozen = {'autoencoder': exp.latent.params}
  got, _ = jax.jit(lambda p, f, b, r: exp.objective.loss_at(jnp.int32(0), f, (p,))(p, b, r))(params, frozen, batch,
                                                                                                rng)
  model = autoencoder.get_autoencoder('small', **FIELDS)
  up = jax.image.resize(images, (8, 16, 16, 1), 'bilinear')
  z = 0.5 * jax.jit(lambda p, x: model.apply({'params': p}, x, method='encode').mean)(exp.latent.params, up)
  want, _ = jax.jit(exp.loss_fn)(params, {**batch, 'x': z}, jax.random.split(rng)[1])
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


def test_cached_latents_are_the_encoder_means_and_refuse_another_autoencoder(run, tmp_path):
  ae_dir, record, _ = run
  c = _config(ae_dir, **{'data.latents.cache': str(tmp_path / 'cache')})
  exp = experiment.Experiment(c, tmp_path / 'w')
  assert exp.batch_shape == (4, 4, 4) and len(exp.source) == len(load_digits('train')[0])
  images = jnp.asarray(load_digits('train')[0][:4], jnp.float32) / 127.5 - 1
  model = autoencoder.get_autoencoder('small', **FIELDS)
  want = 0.5 * jax.jit(lambda p, x: model.apply({'params': p}, x, method='encode').mean)(
      exp.latent.params, jax.image.resize(images, (4, 16, 16, 1), 'bilinear'))
  got = np.stack([exp.source[i]['latent'] for i in range(4)])
  np.testing.assert_allclose(got, want, atol=1e-5)
  manifest = json.loads((tmp_path / 'cache' / 'manifest.json').read_text())
  assert manifest['encoding']['autoencoder_sha256'] == record['sha256'] and manifest['complete']
  assert manifest['encoding']['sampling'] == 'posterior_mean'
  batch = next(iter(exp.data_iterator()))
  cached = np.stack([exp.source[i]['latent'] for i in range(len(exp.source))])
  assert batch['x'].shape == (16, 4, 4, 4)
  assert all(np.min(np.max(np.abs(cached - x), axis=(1, 2, 3))) == 0 for x in batch['x'])  # rows of the cache
  again = experiment.Experiment(c, tmp_path / 'w2')  # read back, not re-encoded
  np.testing.assert_array_equal(np.stack([again.source[i]['latent'] for i in range(4)]), got)
  other = tmp_path / 'other_ae'
  _save_tiny(other, seed=4)
  with pytest.raises(config_lib.ConfigError, match='autoencoder_sha256') as error:
    experiment.Experiment(_config(other, **{'data.latents.cache': str(tmp_path / 'cache')}), tmp_path / 'w3')
  assert error.value.key == 'data.latents.cache'


@pytest.mark.parametrize('overrides, key, match', [
    ({'data.latents.autoencoder': ''}, 'data.latents.autoencoder', 'no autoencoder'),
    ({'data.latents.autoencoder': '/nonexistent/ae'}, 'data.latents.autoencoder', 'autoencoder_digits.py --save'),
    ({'data.latents.autoencoder': '/nonexistent/vae.safetensors', 'data.latents.preset': 'sd'},
     'data.latents.autoencoder', 'curl'),
    ({'data.latents.autoencoder': '/nonexistent/vae.safetensors'}, 'data.latents.preset', 'architecture'),
    ({'data.latents.mode': 'offline'}, 'data.latents.mode', 'one of'),
    ({'data.random_flip': True}, 'data.random_flip', 'on_the_fly'),
    ({'model.overrides.out_channels': 2}, 'data.latents.autoencoder', '4 latent channels'),
])
def test_bad_latent_configs_name_the_key(run, tmp_path, overrides, key, match):
  ae_dir, _, _ = run
  c = _config(ae_dir, **overrides)
  with pytest.raises(config_lib.ConfigError, match=match) as error:
    experiment.Experiment(c, tmp_path / 'w')
  assert error.value.key == key


def test_an_autoencoder_of_other_channels_or_an_altered_file_is_refused(tmp_path):
  rgb = tmp_path / 'rgb'
  _save_tiny(rgb, {**FIELDS, 'in_channels': 3}, input_shape=(16, 16, 3))
  with pytest.raises(config_lib.ConfigError, match='3-channel') as error:
    experiment.Experiment(_config(rgb), tmp_path / 'w')
  assert error.value.key == 'data.latents.autoencoder'
  altered = tmp_path / 'altered'
  _save_tiny(altered)
  data = bytearray((altered / 'params.npz').read_bytes())
  data[len(data) // 2] ^= 1  # one bit of the weights
  (altered / 'params.npz').write_bytes(bytes(data))
  with pytest.raises(config_lib.ConfigError, match='sha256'):
    experiment.Experiment(_config(altered), tmp_path / 'w2')


@pytest.fixture(scope='module')
def tiny_ae(tmp_path_factory):
  ae_dir = tmp_path_factory.mktemp('tiny_autoencoder')
  _save_tiny(ae_dir)
  return ae_dir


def test_a_resumed_cache_of_posterior_samples_is_bit_identical(tiny_ae, tmp_path, monkeypatch):
  """Sampled latents in 3 shards (500 records each): killed after the first shard and resumed, the shards equal
  those encoded in one go, and record i's latent is E(x_i) sampled with fold_in(PRNGKey(seed), i)."""
  overrides = {'data.latents.sample': True, 'data.latents.shard_size': 500, 'seed': 7}
  space = latents.from_config(_config(tiny_ae, **overrides), (8, 8, 1))
  source = get_source('digits', split='train')
  whole = latents.cached_source(_config(tiny_ae, **overrides, **{'data.latents.cache': str(tmp_path / 'a')}),
                                space, source, tmp_path)
  encoder = latents._shard_encoder  # pylint: disable=protected-access

  def killed_after_one(*args):
    encode, calls = encoder(*args), []

    def run(start, stop):
      if calls:
        raise KeyboardInterrupt
      calls.append(start)
      return encode(start, stop)
    return run

  resumed_config = _config(tiny_ae, **overrides, **{'data.latents.cache': str(tmp_path / 'b')})
  monkeypatch.setattr(latents, '_shard_encoder', killed_after_one)
  with pytest.raises(KeyboardInterrupt):
    latents.cached_source(resumed_config, space, source, tmp_path)
  assert [p.name for p in (tmp_path / 'b').glob('shard-*')] == ['shard-00000-of-00003.npy']
  monkeypatch.setattr(latents, '_shard_encoder', encoder)
  resumed = latents.cached_source(resumed_config, space, source, tmp_path)
  for name in ('shard-00000-of-00003.npy', 'shard-00001-of-00003.npy', 'shard-00002-of-00003.npy'):
    assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()
  images = jnp.asarray(load_digits('train')[0], jnp.float32) / 127.5 - 1
  encode = jax.jit(space.encode)
  for i in (0, 499, 500, len(source) - 1):
    want = encode(space.params, images[i:i + 1], jax.random.fold_in(jax.random.PRNGKey(7), i))[0]
    np.testing.assert_allclose(resumed[i]['latent'], want, atol=1e-5)
    assert resumed[i]['label'] == whole[i]['label'] == source[i]['label']
  mean = encode(space.params, images[:1])[0]
  assert np.max(np.abs(resumed[0]['latent'] - mean)) > 1e-3  # a sample, not the mean


def test_a_cache_of_another_encoding_shard_size_or_format_is_refused(tiny_ae, tmp_path):
  cache = {'data.latents.cache': str(tmp_path / 'c')}
  config = _config(tiny_ae, **cache)
  space, source = latents.from_config(config, (8, 8, 1)), get_source('digits', split='test')
  latents.cached_source(config, space, source, tmp_path)
  manifest = json.loads((tmp_path / 'c' / 'manifest.json').read_text())
  assert manifest['encoding']['preprocessing'] == {'resize': '', 'image_size': 0, 'pixels': 'u / 127.5 - 1',
                                                   'bilinear_to': [16, 16, 1]}
  assert manifest['num_records'] == len(source) and manifest['complete']
  sampled = _config(tiny_ae, **cache, **{'data.latents.sample': True})
  for other, key, match in [(sampled, 'data.latents.cache', 'posterior_sample'),
                            (_config(tiny_ae, **cache, **{'data.latents.shard_size': 100}), 'data.latents.shard_size',
                             'records_per_shard')]:
    with pytest.raises(config_lib.ConfigError, match=match) as error:
      latents.cached_source(other, latents.from_config(other, (8, 8, 1)), source, tmp_path)
    assert error.value.key == key
  (tmp_path / 'test.npz').write_bytes(b'a cache of an earlier diffax')
  old = _config(tiny_ae, **{'data.latents.cache': str(tmp_path / 'test.npz')})
  with pytest.raises(config_lib.ConfigError, match='directories of shards') as error:
    latents.cached_source(old, space, source, tmp_path)
  assert error.value.key == 'data.latents.cache'


def test_imagenet256_latent_runlocal_trains_on_mock_imagenet_records_of_varying_size(tmp_path):
  """configs/imagenet256_latent.py:runlocal in-process on tfds.testing.mock_data imagenet2012 (records of varying
  size), the crop shrunk to 16x16 and SD-VAE replaced by a tiny RGB autoencoder: 2 steps, decoded samples."""
  from diffax.trainer import train  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  ae_dir = tmp_path / 'rgb_autoencoder'
  _save_tiny(ae_dir, {**FIELDS, 'in_channels': 3}, input_shape=(16, 16, 3))
  c = config_lib.load_file(f'{trainer_runs.REPO}/configs/imagenet256_latent.py', 'runlocal')
  c.data.image_size = 16
  c.data.latents.update(autoencoder=str(ae_dir), preset='')
  c.train.update(num_steps=2, compilation_cache='')
  # optax's bias correction mixes Python floats and int32 counts
  with tfds.testing.mock_data(num_examples=16), jax.numpy_dtype_promotion('standard'):
    state = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert int(state.step) == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['example_shape'] == [4, 4, 4]
  with Image.open(tmp_path / 'run' / 'samples' / 'step_00000002.png') as grid:  # decoded RGB 16x16 samples
    assert grid.mode == 'RGB'
    n = c.sample.num_samples  # < 1,000 classes: one row of n columns, not 1,000 mostly empty ones
    assert grid.width * 18 == grid.height * (n * 17 + 1), (grid.size, n)
