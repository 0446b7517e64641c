"""The autoencoder run kind: the real main trains configs/autoencoder_digits.py:runlocal (4 steps, the patch
discriminator from update 2), evaluates PSNR / SSIM / digits_rfd on held-out digits, writes grids of originals over
reconstructions and exports the autoencoder that latent diffusion reads; the step's loss is the library loss; a
run resumed from its step-2 checkpoint ends with the uninterrupted run's parameters; bad keys are named errors."""

import functools
import json
import math
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffax.data.digits import load_digits
from diffax.evaluation import reconstruction
from diffax.models import autoencoder_loss
from diffax.trainer import autoencoder, config as config_lib, events, latents
import trainer_runs

CONFIG = f'{trainer_runs.REPO}/configs/autoencoder_digits.py'


def _config(**overrides):
  c = config_lib.load_file(CONFIG, 'runlocal')
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('autoencoder_run')
  trainer_runs.run_main(workdir, config=f'{CONFIG}:runlocal')
  return workdir


def test_held_out_metrics_are_written_and_finite(run):
  record = json.loads(next((run / 'eval').glob('step_00000004_*.json')).read_text())
  assert set(record['metrics']) == {'psnr', 'ssim', 'digits_rfd'}
  assert all(math.isfinite(v) for v in record['metrics'].values())
  assert record['protocol']['num_images'] == 16 and record['protocol']['split'] == 'test'
  scalars = events.read_scalars(run)
  assert [s for s, _ in scalars['eval/psnr']] == [4]
  for tag in ('train/loss', 'train/rec', 'train/kl', 'train/g_loss', 'train/d_loss', 'train/disc_weight'):
    assert [s for s, _ in scalars[tag]] == [1, 2, 3, 4], tag
    assert all(math.isfinite(v) for _, v in scalars[tag])


def test_the_discriminator_joins_the_loss_at_disc_start(run):
  """Updates 0 and 1 (steps 1, 2) minimise rec + w KL only; from update 2 (= disc_start) the GAN terms enter."""
  s = {tag: dict(series) for tag, series in events.read_scalars(run).items()}
  kl_weight, start = _config().autoencoder.kl_weight, _config().autoencoder.disc_start
  for step in (1, 2, 3, 4):
    vae = s['train/rec'][step] + kl_weight * s['train/kl'][step]
    gan = s['train/disc_weight'][step] * s['train/g_loss'][step] + s['train/d_loss'][step]
    assert s['train/loss'][step] == pytest.approx(vae + (gan if step - 1 >= start else 0.0), rel=1e-5), step
    assert s['train/d_loss'][step] > 0.1  # the discriminator's hinge loss is computed (and logged) throughout


def test_the_discriminator_trains_from_disc_start_only(run, tmp_path):
  """Zero GAN factor = zero discriminator gradients: Adam leaves its parameters at their initialisation through
  update 1, and update 2 (step 3) moves them."""
  r = autoencoder.AutoencoderRun(_config(), run)
  init = autoencoder.AutoencoderRun(_config(), tmp_path).restore_or_init()  # no checkpoint there: step 0
  at = {step: r.restore_or_init(step=step).params['discriminator'] for step in (2, 4)}
  leaves = [[np.asarray(x) for x in jax.tree.leaves(t)] for t in (init.params['discriminator'], at[2], at[4])]
  for x, y in zip(leaves[0], leaves[1]):
    np.testing.assert_array_equal(x, y)
  moved = [not np.array_equal(x, z) for x, z in zip(leaves[0], leaves[2])]
  assert sum(moved) >= len(moved) - 1  # all but the output bias (the hinge's two terms cancel on it inside the margin)


@pytest.mark.parametrize('accum', [1, 2])
def test_the_objective_is_the_library_loss_on_resized_digits_at_the_update_count(accum, tmp_path):
  """Train step s is optimizer update s // grad_accum_steps: the GAN terms enter at update disc_start = 2."""
  r = autoencoder.AutoencoderRun(_config(**{'optim.grad_accum_steps': accum}), tmp_path)
  params = nn.meta.unbox(jax.jit(r.init_params)(jax.random.PRNGKey(1)))
  x8 = jnp.asarray(load_digits('train')[0][:4], jnp.float32) / 127.5 - 1.0
  x16 = jax.image.resize(x8, (4, 16, 16, 1), 'bilinear')
  rng = jax.random.PRNGKey(2)
  library = autoencoder_loss.make_autoencoder_loss(r.model, r.discriminator, reconstruction='l1', kl_weight=1e-6,
                                                   disc_weight=0.5, disc_start=2)
  for update in (1, 2):
    ours, aux = r.objective.loss_at(jnp.int32(update * accum + accum - 1), {}, ())(params, {'x': x8}, rng)
    theirs, _ = library(params, {'x': x16}, rng, jnp.int32(update))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    vae = float(aux['rec'] + 1e-6 * aux['kl'])
    gan = float(aux['disc_weight'] * aux['g_loss'] + aux['d_loss'])
    assert gan > 0.1 and float(ours) == pytest.approx(vae + (gan if update >= 2 else 0.0), rel=1e-5)


def test_the_perceptual_term_is_lpips_on_the_frozen_verified_weights(tmp_path):
  """With autoencoder.perceptual_weight the loss is the library's with LPIPS-VGG (seeded weights saved as the
  converter does) on weights held in the state's frozen tree; a file that fails verification is a named error."""
  from diffax.evaluation import lpips, lpips_weights  # pylint: disable=g-import-not-at-top
  rs = np.random.default_rng(0)
  arrays = {k: np.abs(rs.normal(0.0, 0.05, shape)) for k, shape in lpips_weights.EXPECTED_SHAPES.items()}
  path = tmp_path / 'lpips.npz'
  digest = lpips_weights.save_lpips_npz(path, arrays, vgg_sha256=lpips_weights.VGG_SHA256,
                                        lin_sha256=lpips_weights.LIN_SHA256)
  # No discriminator: LPIPS forward only (the adaptive weight would differentiate through it).
  no_disc = {f'autoencoder.{k}': v for k, v in autoencoder.defaults().items() if k.startswith('disc_')}
  c = _config(**no_disc, **{'autoencoder.perceptual_weight': 0.7, 'autoencoder.lpips_weights': str(path),
                            'autoencoder.lpips_sha256': digest})
  r = autoencoder.AutoencoderRun(c, tmp_path / 'run')
  state = r.restore_or_init()
  weights = lpips_weights.load_weights(path)
  np.testing.assert_array_equal(state.frozen['lpips']['lin']['relu1_2']['kernel'], weights.lin['relu1_2']['kernel'])
  x8 = jnp.asarray(load_digits('train')[0][:4], jnp.float32) / 127.5 - 1.0
  x16 = jax.image.resize(x8, (4, 16, 16, 1), 'bilinear')
  rng = jax.random.PRNGKey(2)
  ours, aux = jax.jit(lambda st: r.objective.loss_at(jnp.int32(3), st.frozen, ())(st.params, {'x': x8}, rng))(state)
  library = lambda w, p: autoencoder_loss.make_autoencoder_loss(
      r.model, None, reconstruction='l1', kl_weight=1e-6, perceptual_fn=functools.partial(lpips.distance, w),
      perceptual_weight=0.7)(p, {'x': x16}, rng, jnp.int32(3))
  theirs, their_aux = jax.jit(library)(weights, state.params)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5)
  assert float(aux['perceptual']) == pytest.approx(float(their_aux['perceptual']), rel=1e-5)
  assert float(aux['perceptual']) > 0
  with pytest.raises(config_lib.ConfigError) as error:
    autoencoder.AutoencoderRun(_config(**{'autoencoder.perceptual_weight': 1.0, 'autoencoder.lpips_weights':
                                          str(path), 'autoencoder.lpips_sha256': '0' * 64}), tmp_path / 'pinned')
  assert error.value.key == 'autoencoder.lpips_weights'


def test_grid_shows_originals_above_their_reconstructions(run):
  grid = np.asarray(Image.open(run / 'samples' / 'step_00000004.png'))
  # 8 held-out digits: one row of 8 originals, one of reconstructions, 16x16 tiles with 1-pixel gaps, x4
  assert grid.shape[:2] == (4 * (2 * 17 + 1), 4 * (8 * 17 + 1))
  top = grid[4:4 + 64, 4:4 + 64].astype(np.float64)  # the first original, upscaled
  x = jax.image.resize(jnp.asarray(load_digits('test')[0][:1], jnp.float32) / 127.5 - 1, (1, 16, 16, 1), 'bilinear')
  expected = np.repeat(np.repeat(np.round((np.asarray(x[0, ..., 0]) + 1) * 127.5), 4, 0), 4, 1)
  np.testing.assert_allclose(top if top.ndim == 2 else top[..., 0], expected, atol=1)


def test_exported_autoencoder_is_read_by_latent_diffusion(run):
  """WORKDIR/autoencoder is a saved-autoencoder directory: data.latents encodes digits with it, and the scaling
  factor makes the latents of the training images it was measured on unit-variance (LDM sec. 4.3.2)."""
  record = json.loads((run / 'autoencoder' / latents.META).read_text())
  assert record['input_shape'] == [16, 16, 1] and record['latent_shape'] == [4, 4, 4]
  c = config_lib.load_file(f'{trainer_runs.REPO}/configs/digits_latent.py', 'runlocal')
  c.data.latents.autoencoder = str(run / 'autoencoder')
  space = latents.from_config(c, (8, 8, 1))
  x = jnp.asarray(load_digits('train')[0][:64], jnp.float32) / 127.5 - 1.0  # scaling_examples = 64, in order
  z = space.encode(space.params, x)
  assert z.shape == (64, 4, 4, 4)
  assert float(jnp.std(z)) == pytest.approx(1.0, abs=1e-4)
  assert space.decode(space.params, z).shape == (64, 8, 8, 1)
  c.data.latents.autoencoder = str(run)  # the run's workdir names its export too
  assert latents.from_config(c, (8, 8, 1)).sha256 == record['sha256']


def test_resumed_run_ends_where_the_uninterrupted_one_does(run, tmp_path):
  (tmp_path / 'checkpoints').mkdir()
  shutil.copytree(run / 'checkpoints' / '2', tmp_path / 'checkpoints' / '2')
  trainer_runs.run_main(tmp_path, config=f'{CONFIG}:runlocal')
  a, b = (autoencoder.AutoencoderRun(_config(), w) for w in (run, tmp_path))
  state_a, state_b = a.restore_or_init(step=4), b.restore_or_init(step=4)
  for x, y in zip(jax.tree.leaves((state_a.params, state_a.ema_params)),
                  jax.tree.leaves((state_b.params, state_b.ema_params))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  resumed = json.loads(next((tmp_path / 'eval').glob('step_00000004_*.json')).read_text())['metrics']
  first = json.loads(next((run / 'eval').glob('step_00000004_*.json')).read_text())['metrics']
  assert resumed == pytest.approx(first, rel=1e-6)


def test_psnr_of_the_evaluation_is_the_library_psnr(run):
  """--mode eval recomputes the training-end metrics from the checkpoint (same EMA weights, same images)."""
  trainer_runs.run_main(run, mode='eval', config=f'{CONFIG}:runlocal')
  grid = run / 'samples' / 'step_00000004.png'
  grid.unlink()
  trainer_runs.run_main(run, mode='sample', config=f'{CONFIG}:runlocal')  # --mode sample writes the grid again
  assert grid.exists()
  first = json.loads(next((run / 'eval').glob('step_00000004_*.json')).read_text())
  r = autoencoder.AutoencoderRun(_config(), run)
  params = r.sample_params(r.restore_or_init(step=4))
  x = jnp.asarray(load_digits('test')[0][:16], jnp.float32) / 127.5 - 1.0
  x16, x_hat = r.reconstruct(params, x)
  assert first['metrics']['psnr'] == pytest.approx(float(jnp.mean(reconstruction.psnr(x16, x_hat))), rel=1e-4)
  assert first['metrics']['ssim'] == pytest.approx(float(jnp.mean(reconstruction.ssim(x16, x_hat))), rel=1e-4)


@pytest.mark.parametrize('key, value', [
    ('autoencoder.reconstruction', 'l3'),
    ('autoencoder.kl_weight', -1.0),
    ('autoencoder.disc_groups', 3),
    ('model.overrides.depth', 3),
    ('model.preset', 'sdx'),
    ('eval.metric', 'captions'),
    ('data.latents.autoencoder', 'somewhere'),
    ('autoencoder.lpips_weights', 'lpips.npz'),  # without autoencoder.perceptual_weight
])
def test_bad_autoencoder_keys_are_named(key, value):
  c = _config(**{key: value})
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(c)
  assert error.value.key == key


def test_discriminator_keys_without_a_discriminator_and_autoencoder_keys_on_a_diffusion_run_are_named():
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(_config(**{'autoencoder.disc_weight': 0.0}))  # disc_start etc. are set by runlocal
  assert error.value.key.startswith('autoencoder.disc_')
  c = trainer_runs.load_test_config()
  c.autoencoder.kl_weight = 1e-3
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(c)
  assert error.value.key == 'autoencoder.kl_weight'


def test_two_devices_train_and_evaluate_as_one(run, tmp_path):
  """The same global batches sharded over 2 CPU devices: the held-out metrics of the 1-device run."""
  trainer_runs.run_main(tmp_path, config=f'{CONFIG}:runlocal', devices=2)
  two, one = (json.loads(next((w / 'eval').glob('step_00000004_*.json')).read_text())['metrics']
              for w in (tmp_path, run))
  assert two == pytest.approx(one, rel=1e-4)
  assert json.loads((tmp_path / 'autoencoder' / latents.META).read_text())['scaling_factor'] == pytest.approx(
      json.loads((run / 'autoencoder' / latents.META).read_text())['scaling_factor'], rel=1e-4)


def test_reconstruction_evaluator_streams_the_one_shot_metrics():
  """Two padded batches give the mean PSNR / SSIM of the library over the real rows and the Fréchet distance of
  the features' sample moments (numpy), whatever the padding holds."""
  from diffax.evaluation import evaluators, stats  # pylint: disable=g-import-not-at-top
  rs = np.random.default_rng(0)
  x = rs.uniform(-1, 1, (10, 12, 12, 1)).astype(np.float32)
  y = np.clip(x + rs.normal(0, 0.2, x.shape), -1, 1).astype(np.float32)
  features = jax.jit(lambda a: jnp.reshape(a[:, ::4, ::4], (a.shape[0], -1)))  # [B, 9]
  ev = evaluators.ReconstructionEvaluator(features, dim=9, name='rfd')
  pad = lambda a: np.concatenate([a, np.full((2, *a.shape[1:]), 7.0, np.float32)])
  ev.update(x[:6], y[:6])
  ev.update(pad(x[6:]), pad(y[6:]), count=4)
  got = ev.result()
  assert got['psnr'] == pytest.approx(float(np.mean(reconstruction.psnr(x, y))), rel=1e-6)
  assert got['ssim'] == pytest.approx(float(np.mean(reconstruction.ssim(x, y))), rel=1e-6)
  fx, fy = (np.asarray(features(a), np.float64) for a in (x, y))
  want = stats.frechet_distance(fy.mean(0), np.cov(fy, rowvar=False), fx.mean(0), np.cov(fx, rowvar=False))
  assert got['rfd'] == pytest.approx(want, rel=1e-6) and want > 0.01


def test_rfid_in_fid_inception_features_on_rgb_images(tmp_path):
  """eval.metric='inception': the rFID of an (untrained) autoencoder on mock CIFAR-10 through the FID Inception
  network (seeded weights converted as the real ones are), with the weights' digest in the protocol."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from diffax.evaluation import convert_inception, inception_weights  # pylint: disable=g-import-not-at-top
  from diffax.trainer import autoencoder_train  # pylint: disable=g-import-not-at-top
  import test_inception  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'fid_inception.npz'
  state_dict = test_inception._torch_state_dict()  # pylint: disable=protected-access
  arrays = convert_inception.state_dict_to_arrays(state_dict)
  inception_weights.save_inception_npz(path, arrays, source_sha256=inception_weights.PTH_SHA256)
  c = _config(**{'data.name': 'cifar10', 'autoencoder.resolution': 0, 'eval.metric': 'inception',
                 'eval.inception_weights': str(path), 'eval.num_samples': 8})
  with jax.numpy_dtype_promotion('standard'), tfds.testing.mock_data(num_examples=8):
    r = autoencoder.AutoencoderRun(c, tmp_path / 'run')
    params = r.sample_params(r.restore_or_init())
    metrics, protocol = autoencoder_train.evaluate_params(r, params, autoencoder_train.make_evaluator(r),
                                                         num_examples=8)
  assert r.input_shape == (32, 32, 3) and protocol['num_images'] == 8
  assert set(metrics) == {'psnr', 'ssim', 'rfid'} and all(math.isfinite(v) for v in metrics.values())
  assert metrics['rfid'] > 0
  assert protocol['weights_content_sha256'] == inception_weights.load_inception_variables(path).content_sha256
