"""Trainer pieces in-process: config checks, optimizer schedule, EMA, loss buckets, sharding rules, NaN policy,
checkpoint fall-back, and that the digits default actually learns."""

import shutil
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from diffax.diffusion import samplers, schedules
from diffax.diffusion.parameterization import Denoiser
from diffax.trainer import components, config as config_lib, events, experiment, optim, sharding, train
from diffax.trainer import train_step
import trainer_runs


@pytest.fixture(autouse=True)
def _standard_promotion():
  """optax's Adam bias correction mixes a Python float with an int32 count, which strict promotion rejects."""
  with jax.numpy_dtype_promotion('standard'):
    yield


def test_default_config_is_locked_and_typed():
  c = config_lib.default_config()
  with pytest.raises(AttributeError, match='learning_rat'):
    c.optim.learning_rat = 1e-3
  with pytest.raises(TypeError):
    c.train.num_steps = 'many'
  c.model.overrides.ch = 64  # the keyword sections stay open
  c.sample.kwargs.order = 3


@pytest.mark.parametrize('key, value, match', [
    ('model.name', 'resnet', 'model.name'),
    ('diffusion.schedule', 'quadratic', 'diffusion.schedule'),
    ('train.ema_decays', (1.5,), 'train.ema_decays'),
    ('sample.ema_decay', 0.5, 'sample.ema_decay'),
    ('optim.min_lr_ratio', 2.0, 'optim.min_lr_ratio'),
    ('train.batch_size', 0, 'train.batch_size'),
    ('mesh.data', 0, 'mesh.data'),
])
def test_validate_names_the_key(key, value, match):
  c = trainer_runs.load_test_config()
  section, leaf = key.split('.')
  c[section][leaf] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c)


def test_impossible_combinations_and_keyword_sections_are_rejected():
  c = trainer_runs.load_test_config('sample.guidance_scale=3.0', 'diffusion.p_uncond=0.0')
  with pytest.raises(config_lib.ConfigError, match='diffusion.p_uncond'):
    config_lib.validate(c)
  c = trainer_runs.load_test_config()
  c.model.overrides.chanels = 64
  with pytest.raises(config_lib.ConfigError, match='model.overrides.chanels'):
    components.build_model(c)
  c = trainer_runs.load_test_config()
  c.diffusion.schedule_kwargs.beta_maximum = 20.0
  with pytest.raises(config_lib.ConfigError, match='diffusion.schedule_kwargs'):
    components.build_schedule(c)
  c = trainer_runs.load_test_config()
  c.sample.kwargs.ordr = 2
  with pytest.raises(config_lib.ConfigError, match='sample.kwargs.ordr'):
    components.build_generate(c, components.build_model(c), components.build_schedule(c), channels=1)
  c = trainer_runs.load_test_config()
  c.model.overrides.learn_sigma = True
  with pytest.raises(config_lib.ConfigError, match='learn_sigma'):
    components.build_model(c)


def test_sampler_settings_are_the_ones_that_run():
  """0 / '' mean the sampler's default, a setting the sampler has no use for is an error naming the key, and
  ``sampler_kwargs`` (what the results JSON records) holds exactly the keywords the sampler runs with."""
  c = trainer_runs.load_test_config('sample.num_steps=0', 'sample.sampler=ddim')
  used = components.sampler_kwargs(c)
  assert used['num_steps'] == 50 and used['spacing'] == 'trailing' and used['eta'] == 0.0  # ddim's defaults
  c = trainer_runs.load_test_config('sample.num_steps=7', 'sample.spacing=log_snr', 'sample.sampler=ddim')
  c.sample.kwargs.eta = 1.0
  assert components.sampler_kwargs(c) == {**used, 'num_steps': 7, 'spacing': 'log_snr', 'eta': 1.0}
  c = trainer_runs.load_test_config('sample.num_steps=10', 'sample.sampler=adaptive_ode')
  with pytest.raises(config_lib.ConfigError, match="sample.num_steps: sampler 'adaptive_ode' takes no 'num_steps'"):
    components.sampler_kwargs(c)
  c = trainer_runs.load_test_config('sample.num_steps=0', 'sample.sampler=adaptive_ode')
  assert components.sampler_kwargs(c)['rtol'] == 1e-5 and 'num_steps' not in components.sampler_kwargs(c)
  c = trainer_runs.load_test_config('sample.spacing=karras', 'sample.sampler=pc')
  with pytest.raises(config_lib.ConfigError, match='sample.spacing'):
    components.sampler_kwargs(c)


def test_deprecated_sampler_names_warn_and_resolve():
  c = trainer_runs.load_test_config('sample.sampler=edm', 'sample.num_steps=3')
  with pytest.warns(DeprecationWarning, match="'edm_heun'"):
    config_lib.validate(c)
  with pytest.warns(DeprecationWarning):
    assert components.sampler_kwargs(c)['s_churn'] == 0.0


def test_edm_sigma_data_has_one_source():
  """Training and sampling use one sigma_data: the EDM schedule's own, and a different diffusion.sigma_data is
  an error naming the key (it used to train with the schedule's and sample with diffusion.sigma_data)."""
  edm = ('diffusion.schedule=edm', 'diffusion.loss=edm', 'diffusion.prediction=edm', 'diffusion.weighting=edm')
  c = trainer_runs.load_test_config(*edm)
  c.diffusion.schedule_kwargs.sigma_data = 1.0
  with pytest.raises(config_lib.ConfigError, match='diffusion.sigma_data: 0.5 differs'):
    components.build_loss(c, None, components.build_schedule(c))
  c = trainer_runs.load_test_config(*edm, 'diffusion.sigma_data=1.0')
  c.diffusion.schedule_kwargs.sigma_data = 1.0
  schedule = components.build_schedule(c)
  assert components.sigma_data(c, schedule) == 1.0 == schedule.sigma_data
  # The sampler reads the network's output F with that sigma_data too: with F = 0 every x0-prediction is
  # c_skip(sigma) x / alpha, so the samples depend on sigma_data through c_skip.
  model = types.SimpleNamespace(apply=lambda variables, x, t, cond, train: jnp.zeros_like(x))
  shape, rng = (2, 8, 8, 1), jax.random.PRNGKey(0)
  got = components.build_generate(c, model, schedule, channels=1)(None, rng, None, shape).samples
  library = lambda sigma_data: samplers.dpm_solver_sample(
      Denoiser(lambda x, t: jnp.zeros_like(x), schedule, 'edm', sigma_data=sigma_data), rng, shape,
      **components.sampler_kwargs(c)).samples
  np.testing.assert_allclose(got, library(1.0), rtol=1e-6)
  assert float(jnp.max(jnp.abs(library(0.5) - got))) > 1e-2


def test_learning_rate_schedule_matches_closed_form():
  tx, lr = optim.make_optimizer(learning_rate=1e-3, lr_schedule='cosine', warmup_steps=10, min_lr_ratio=0.1,
                                num_steps=110)
  steps = np.arange(0, 110)
  expected = np.where(steps < 10, 1e-3 * steps / 10,
                      1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * np.clip(steps - 10, 0, 100) / 100))))
  np.testing.assert_allclose([float(lr(s)) for s in steps], expected, rtol=1e-5, atol=1e-9)
  assert isinstance(tx, optax.GradientTransformation)


def test_gradient_accumulation_equals_the_big_batch():
  """Two micro-batches through MultiSteps give the update of their mean gradient in one step."""
  params = {'w': jnp.arange(4.0)}
  g1, g2 = {'w': jnp.array([1.0, -2.0, 0.5, 3.0])}, {'w': jnp.array([0.0, 1.0, 1.5, -1.0])}
  big, _ = optim.make_optimizer(learning_rate=0.1, grad_clip=0.0, num_steps=10)
  acc, _ = optim.make_optimizer(learning_rate=0.1, grad_clip=0.0, num_steps=20, grad_accum_steps=2)
  update_big, _ = big.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), big.init(params), params)
  state = acc.init(params)
  _, state = acc.update(g1, state, params)
  update_acc, _ = acc.update(g2, state, params)
  np.testing.assert_allclose(update_acc['w'], update_big['w'], rtol=1e-6)


def test_ema_warmup_follows_the_formula():
  decays = [float(train_step.ema_decay(0.9999, jnp.int32(n), warmup=True)) for n in (0, 1, 10, 10**6)]
  np.testing.assert_allclose(decays, [1 / 10, 2 / 11, 11 / 20, 0.9999], rtol=1e-6)
  assert float(train_step.ema_decay(0.99, jnp.int32(0), warmup=False)) == pytest.approx(0.99)


def test_loss_buckets_match_numpy_histogram():
  schedule = schedules.CosineSchedule()
  edges = train_step.log_snr_edges(schedule, 4)
  rng = np.random.default_rng(0)
  t = rng.uniform(schedule.t_min, schedule.t_max, 256).astype(np.float32)
  loss = rng.uniform(0, 1, 256).astype(np.float32)
  log_snr = np.asarray(schedule.log_snr(jnp.asarray(t)))
  sums, counts = train_step._bucket_stats(jnp.asarray(loss), jnp.asarray(log_snr), edges)
  index = np.clip(np.digitize(log_snr, np.asarray(edges)[::-1]), 1, 4)  # ascending bins of log-SNR
  expected_counts = np.array([np.sum(index == 4 - k) for k in range(4)])  # bucket 0 = highest log-SNR
  expected_sums = np.array([np.sum(loss[index == 4 - k]) for k in range(4)])
  np.testing.assert_array_equal(counts, expected_counts)
  np.testing.assert_allclose(sums, expected_sums, rtol=1e-5)
  assert counts.sum() == 256


def test_fsdp_rules_shard_divisible_dimensions_only():
  mesh = AbstractMesh((2, 4), ('data', 'fsdp'))
  boxed = {
      'conv': nn.LogicallyPartitioned(jax.ShapeDtypeStruct((3, 3, 6, 32), jnp.float32),
                                      (None, None, 'conv_in', 'conv_out')),
      'odd': nn.LogicallyPartitioned(jax.ShapeDtypeStruct((3, 3, 32, 3), jnp.float32),
                                     (None, None, 'conv_in', 'conv_out')),
      'dense': nn.LogicallyPartitioned(jax.ShapeDtypeStruct((64, 256), jnp.float32), ('embed', 'mlp')),
      'count': jax.ShapeDtypeStruct((), jnp.int32),
  }
  shardings = sharding.tree_shardings(boxed, mesh, (('embed', 'fsdp'), ('conv_out', 'fsdp')))
  assert shardings['conv'].spec == P(None, None, None, 'fsdp')
  assert shardings['odd'].spec == P(None, None, None, None)  # 3 output channels do not split 4 ways
  assert shardings['dense'].spec == P('fsdp', None)
  assert shardings['count'].spec == P()


def _mock_nan_loss(monkeypatch):
  build_loss = components.build_loss

  def nan_loss(config, apply_fn, schedule):
    loss_fn = build_loss(config, apply_fn, schedule)

    def poisoned(params, batch, rng):
      loss, aux = loss_fn(params, batch, rng)
      return loss * jnp.nan, aux

    return poisoned

  monkeypatch.setattr(components, 'build_loss', nan_loss)


@pytest.fixture(scope='module')
def two_step_run(tmp_path_factory):
  """A finished run of 4 steps with checkpoints at 2 and 4; tests copy it before changing it."""
  workdir = tmp_path_factory.mktemp('two_step')
  with jax.numpy_dtype_promotion('standard'):
    train.train_and_evaluate(trainer_runs.load_test_config('train.num_steps=4', 'train.checkpoint_every=2',
                                                           'train.sample_every=0'), str(workdir))
  return workdir


def test_nan_stops_with_the_step_named_and_keeps_checkpoints(tmp_path, monkeypatch, two_step_run):
  shutil.copytree(two_step_run, tmp_path, dirs_exist_ok=True)
  _mock_nan_loss(monkeypatch)
  config = trainer_runs.load_test_config('train.num_steps=8', 'train.checkpoint_every=2')
  with pytest.raises(FloatingPointError, match='step 5') as error:
    train.train_and_evaluate(config, str(tmp_path))
  assert 'nan_policy' in str(error.value)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['2', '4']


def test_nan_skip_policy_leaves_the_parameters_unchanged(tmp_path, monkeypatch):
  _mock_nan_loss(monkeypatch)
  config = trainer_runs.load_test_config('train.num_steps=2', 'train.nan_policy=skip', 'train.log_every=2',
                                         'train.checkpoint_every=2')
  state = train.train_and_evaluate(config, str(tmp_path))
  initial = experiment.Experiment(config, str(tmp_path / 'fresh')).restore_or_init()
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(initial.params)):
    np.testing.assert_array_equal(a, b)
  assert dict(events.read_scalars(tmp_path)['train/skipped_updates'])[2] == 2.0


def test_corrupt_newest_checkpoint_falls_back_and_is_kept(tmp_path, two_step_run):
  shutil.copytree(two_step_run, tmp_path, dirs_exist_ok=True)
  config = trainer_runs.load_test_config('train.num_steps=4', 'train.checkpoint_every=2', 'train.sample_every=0')
  for f in (tmp_path / 'checkpoints' / '4' / 'state').rglob('*'):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b'corrupt')
  exp = experiment.Experiment(config, str(tmp_path))
  state = exp.restore_or_init()
  assert int(state.step) == 2
  assert (tmp_path / 'checkpoints_unreadable' / '4').is_dir()  # moved aside, not deleted
  assert exp.checkpointer.all_steps() == [2]


def test_digits_default_learns(tmp_path):
  """200 steps of the test model on digits: the loss falls well below its start (eps-MSE starts near 1)."""
  config = trainer_runs.load_test_config('train.num_steps=200', 'train.log_every=20', 'train.checkpoint_every=200',
                                         'train.batch_size=64', 'optim.learning_rate=2e-3', 'optim.warmup_steps=20')
  train.train_and_evaluate(config, str(tmp_path))
  losses = [v for _, v in events.read_scalars(tmp_path)['train/loss']]
  assert losses[0] > 0.5 and losses[-1] < 0.6 * losses[0], losses
