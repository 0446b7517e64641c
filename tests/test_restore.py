"""Restoring another run's EMA weights: the values the trainer saved, the workdir left byte for byte as it was,
and named errors for a missing checkpoint, a missing EMA copy and another architecture."""

import hashlib
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.trainer import components, restore
import trainer_runs

EMA = ('train.ema_decays=(0.9,0.5)', 'train.ema_warmup=False')  # two EMA copies that differ after two steps


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('trained')
  trainer_runs.run_main(workdir, 'train.num_steps=2', 'train.checkpoint_every=2', *EMA, 'sample.num_samples=8',
                        'eval.batch_size=8')
  return workdir


def _digest(directory: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob('*')) if p.is_file()}


def _abstract_params(*overrides: str):
  model = components.build_model(trainer_runs.load_test_config(*overrides))
  inputs = (jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)), jnp.zeros((1,), jnp.int32))
  return jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), *inputs, train=False)['params']))


def test_restores_each_ema_copy_as_saved_and_writes_nothing(trained):
  before = _digest(trained)
  abstract = _abstract_params()
  ema = [restore.restore_ema_params(str(trained), abstract, ema_index=i) for i in (0, 1)]
  exp_state = _trainer_state(trained)
  for index in (0, 1):
    for got, saved in zip(jax.tree.leaves(ema[index]), jax.tree.leaves(exp_state.ema_params[index])):
      assert isinstance(got, np.ndarray)
      np.testing.assert_array_equal(got, np.asarray(saved))
  differ = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema[0]), jax.tree.leaves(ema[1]))]
  assert any(differ)
  assert _digest(trained) == before


def _trainer_state(workdir):
  from diffax.trainer import experiment  # pylint: disable=g-import-not-at-top
  exp = experiment.Experiment(trainer_runs.load_test_config(*EMA), workdir)
  state = exp.checkpointer.restore(exp.abstract_state)
  exp.checkpointer.close()
  return state


def test_missing_checkpoint_step_and_ema_copy_are_named(trained, tmp_path):
  abstract = _abstract_params()
  with pytest.raises(restore.RestoreError, match=r"distill\.teacher_workdir=.*has no checkpoint"):
    restore.restore_ema_params(str(tmp_path), abstract, key='distill.teacher_workdir')
  with pytest.raises(restore.RestoreError, match='at step 7 .*steps \\[2\\]'):
    restore.restore_ema_params(str(trained), abstract, step=7)
  with pytest.raises(restore.RestoreError, match='2 EMA copies, not index 2'):
    restore.restore_ema_params(str(trained), abstract, ema_index=2)


def test_another_architecture_is_named_before_loading(trained):
  abstract = _abstract_params('model.overrides.ch=24')
  with pytest.raises(restore.RestoreError, match=r'finetune\.base_workdir=.*another architecture.*other shapes'):
    restore.restore_ema_params(str(trained), abstract, key='finetune.base_workdir')
