"""Checkpoints written before ``TrainState.frozen`` existed still resume: they restore into a state with no frozen
networks, value for value, and a run that has frozen networks is not handed one silently."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.trainer import checkpoint, train_state


def _state(frozen) -> train_state.TrainState:
  params = {'w': jnp.arange(6.0).reshape(2, 3), 'b': jnp.ones((3,))}
  return train_state.TrainState(step=jnp.int32(7), params=params, ema_params=(params, {'w': params['w'] * 2,
                                'b': params['b']}), opt_state={'mu': jnp.full((3,), 0.5)},
                                rng=jnp.array([1, 2], jnp.uint32), frozen=frozen)


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_a_checkpoint_without_frozen_restores_into_the_new_state(tmp_path):
  state = _state({})
  saver = checkpoint.Checkpointer(tmp_path / 'checkpoints', async_checkpointing=False)
  saver.save(7, train_state.StateWithoutFrozen.like(state))  # the layout of checkpoints written before `frozen`
  saver.close()
  reader = checkpoint.Checkpointer(tmp_path / 'checkpoints', async_checkpointing=False)
  restored = reader.restore(_abstract(state))
  reader.close()
  assert isinstance(restored, train_state.TrainState) and restored.frozen == {}
  for name in ('step', 'params', 'ema_params', 'opt_state', 'rng'):
    got, want = getattr(restored, name), getattr(state, name)
    np.testing.assert_array_equal(np.concatenate([np.ravel(x) for x in _leaves(got)]),
                                  np.concatenate([np.ravel(x) for x in _leaves(want)]))
  assert (tmp_path / 'checkpoints' / '7').exists()  # read in place, not set aside


def test_a_run_with_frozen_networks_does_not_take_a_checkpoint_without_them(tmp_path):
  saver = checkpoint.Checkpointer(tmp_path / 'checkpoints', async_checkpointing=False)
  saver.save(7, train_state.StateWithoutFrozen.like(_state({})))
  saver.close()
  reader = checkpoint.Checkpointer(tmp_path / 'checkpoints', async_checkpointing=False)
  with pytest.raises(RuntimeError, match='cannot be read'):
    reader.restore(_abstract(_state({'teacher': {'w': jnp.zeros((2, 3))}})), step=7)
  reader.close()


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]
