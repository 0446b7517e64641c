"""Fine-tuning: a tiny base trained by the real main, LoRA on inverted digits with the base frozen through optax,
adapters saved alone and merged back, subtree freezing, and the errors for bad bases and patterns."""

import hashlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffax.data import load_digits
from diffax.models import lora
from diffax.trainer import components, config as config_lib, finetune, optim, restore, sharding, train_state, train_step
from diffax.trainer.objective import Objective
import trainer_runs


@pytest.fixture(autouse=True)
def _standard_promotion():
  """optax's Adam bias correction computes ``float ** int32`` counts, which strict promotion rejects."""
  with jax.numpy_dtype_promotion('standard'):
    yield


@pytest.fixture(scope='module')
def base_workdir(tmp_path_factory):
  return trainer_runs.shared_base(tmp_path_factory)  # trained once per session (see BASE_OVERRIDES)


def _digest(directory: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob('*')) if p.is_file()}


def _run(config, tuning: finetune.FineTuning, steps: int):
  """``steps`` fine-tuning steps on inverted training digits (the new style) -> (initial, final state)."""
  model = tuning.model
  schedule = components.build_schedule(config)
  loss_fn = components.build_loss(config, tuning.apply_fn(components.apply_fn_of(model)), schedule)
  optimizer = tuning.freeze(optim.make_optimizer(num_steps=steps, learning_rate=1e-2)[0])
  base_init = lambda rng: model.init({'params': rng}, *tuning.example_inputs, train=False)['params']
  mesh = sharding.make_mesh()
  _, shardings = train_state.abstract_state(lambda rng: tuning.init_params(rng, base_init), optimizer, seed=0,
                                            num_ema=1, mesh=mesh, rules=())
  state = train_state.create(lambda rng: tuning.init_params(rng, base_init), optimizer, seed=0, num_ema=1,
                             shardings=shardings)
  state = tuning.start(state)
  step = jax.jit(train_step.make_train_step(Objective.of_loss(loss_fn), optimizer, ema_decays=(0.9,), ema_warmup=False,
                                            edges=train_step.log_snr_edges(schedule, 2)))
  images, labels = load_digits('train')
  x = -(images[:16].astype(np.float32) / 127.5 - 1.0)  # inverted digits: white on black becomes black on white
  initial, current = state, jax.tree.map(jnp.copy, state)
  for _ in range(steps):
    current, metrics = step(current, {'x': jnp.asarray(x), 'cond': jnp.asarray(labels[:16])})
    assert int(metrics['finite'])
  return initial, current, optimizer


def test_lora_finetune_freezes_the_base_and_round_trips_its_adapters(base_workdir, tmp_path):
  before = _digest(base_workdir)
  config = trainer_runs.load_test_config()
  model = components.build_model(config)
  inputs = (jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)), jnp.zeros((1,), jnp.int32))
  lora_config = lora.LoraConfig(rank=2, alpha=2.0, targets=('attention', 'resblock_convs'))
  tuning = finetune.FineTuning(model, inputs, mode='lora', base_workdir=str(base_workdir), lora_config=lora_config)
  initial, state, optimizer = _run(config, tuning, steps=3)

  base = restore.restore_ema_params(str(base_workdir), tuning.abstract_base)
  for restored, kept in zip(jax.tree.leaves(base), jax.tree.leaves(state.params['base'])):
    np.testing.assert_array_equal(kept, restored)  # the frozen base got exact-zero updates
  assert all(np.abs(b).max() > 0 for b in jax.tree.leaves(jax.tree.map(
      lambda p: p, {k: v for k, v in lora.adapter_paths(state.params['lora']).items()})))  # adapters moved
  moments = sum(x.size for x in jax.tree.leaves(state.opt_state))
  assert moments <= 2 * lora.num_params(state.params['lora']) + 8  # Adam's moments for the adapters only

  path = tmp_path / 'inverted.npz'
  finetune.save_adapters(str(path), state.params['lora'], lora_config)
  merged = jax.jit(lambda p: finetune.merge_adapters(p, [(str(path), 1.0)]))(state.params['base'])  # one program
  x, t, c = (jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 1)), jnp.float32),
             jnp.asarray([0.2, 0.7]), jnp.asarray([3, 10]))
  adapted = jax.jit(lambda p: tuning.apply_fn(components.apply_fn_of(model))(p, x, t, c, train=False, rngs={}))(
      state.params)
  np.testing.assert_allclose(jax.jit(lambda p: model.apply({'params': p}, x, t, c))(merged), adapted, atol=1e-5)
  unmerged = jax.jit(lambda p: finetune.merge_adapters(p, [(str(path), -1.0)]))(merged)
  for u, b in zip(jax.tree.leaves(unmerged), jax.tree.leaves(base)):
    np.testing.assert_allclose(u, b, atol=1e-6)
  assert path.stat().st_size < 0.2 * sum(np.asarray(b).nbytes for b in jax.tree.leaves(base))  # small on its own
  assert _digest(base_workdir) == before  # the base checkpoint is never written to


def test_subtree_finetune_trains_only_the_named_parameters(base_workdir):
  config = trainer_runs.load_test_config()
  model = components.build_model(config)
  inputs = (jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)), jnp.zeros((1,), jnp.int32))
  tuning = finetune.FineTuning(model, inputs, mode='subtrees', base_workdir=str(base_workdir),
                               trainable=(r'.*attn.*', r'label_embed'))
  initial, state, _ = _run(config, tuning, steps=2)
  for key in state.params:
    changed = any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(jax.tree.leaves(initial.params[key]),
                                                                          jax.tree.leaves(state.params[key])))
    assert changed == ('attn' in key or key == 'label_embed'), key


def test_bad_bases_and_patterns_are_named_errors(base_workdir, tmp_path):
  config = trainer_runs.load_test_config()
  inputs = (jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)), jnp.zeros((1,), jnp.int32))
  with pytest.raises(config_lib.ConfigError, match='finetune.base_workdir.*has no checkpoint'):
    finetune.FineTuning(components.build_model(config), inputs, mode='full', base_workdir=str(tmp_path)).start(None)
  config.model.name, config.model.preset = 'dit', 'dit_tiny'
  dit = finetune.FineTuning(components.build_model(config), inputs, mode='full', base_workdir=str(base_workdir))
  with pytest.raises(config_lib.ConfigError, match='finetune.base_workdir.*another architecture.*blocks_0'):
    dit.start(None)
  missing_target = r"finetune.lora_targets.*'nothing_\.\*' matches no.*blocks_0/attn/query"
  with pytest.raises(config_lib.ConfigError, match=missing_target):
    finetune.FineTuning(components.build_model(config), inputs, mode='lora', base_workdir=str(base_workdir),
                        lora_config=lora.LoraConfig(targets=(r'.*mlp_in', r'nothing_.*')))
  with pytest.raises(config_lib.ConfigError, match=r"finetune.trainable.*'decoder'"):
    finetune.FineTuning(components.build_model(config), inputs, mode='subtrees', base_workdir=str(base_workdir),
                        trainable=('decoder',))


def test_freeze_gives_frozen_leaves_no_state_and_zero_updates():
  params = {'base': {'w': jnp.ones((3, 3))}, 'lora': {'a': jnp.ones((3, 1))}}
  optimizer = finetune.freeze(optax.adam(0.1), finetune.trainable_labels(params, mode='lora'))
  opt_state = optimizer.init(params)
  assert sum(x.size for x in jax.tree.leaves(opt_state)) == 2 * 3 + 1  # mu, nu of 'a' and the count
  updates, _ = optimizer.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
  np.testing.assert_array_equal(updates['base']['w'], 0.0)
  assert np.all(np.asarray(updates['lora']['a']) < 0)
