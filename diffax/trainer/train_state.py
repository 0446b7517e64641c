"""The one training-state pytree and its sharded creation (the step that advances it: :mod:`train_step`).

``TrainState(step, params, ema_params, opt_state, rng, frozen)`` holds everything a resumed run needs besides
the data position; ``frozen`` holds networks the loss reads but never trains (:mod:`diffax.trainer.objective`). Creation is abstract first (nanodo / big_vision): ``jax.eval_shape`` of the init gives the
logical axis names of every parameter and optimizer moment, :func:`sharding.tree_shardings` turns them into
shardings, and the real init is jitted with those ``out_shardings`` so no device ever holds a full copy of a
sharded model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from diffax.trainer import sharding

Array = jax.Array


class TrainState(flax.struct.PyTreeNode):
  """``step`` [] int32 (train steps = micro-batches); ``ema_params``: one copy per decay; ``rng``: uint32 [2];
  ``frozen``: the objective's frozen networks (``{}`` for a plain diffusion run)."""
  step: Array
  params: Any
  ema_params: tuple[Any, ...]
  opt_state: Any
  rng: Array
  frozen: Any


class StateWithoutFrozen(flax.struct.PyTreeNode):
  """The state as checkpoints written before ``TrainState.frozen`` existed hold it; :meth:`upgrade` reads such a
  checkpoint into a :class:`TrainState` with no frozen networks, so those runs still resume and evaluate."""
  step: Array
  params: Any
  ema_params: tuple[Any, ...]
  opt_state: Any
  rng: Array

  @classmethod
  def like(cls, state: TrainState) -> StateWithoutFrozen:
    return cls(step=state.step, params=state.params, ema_params=state.ema_params, opt_state=state.opt_state,
               rng=state.rng)

  def upgrade(self) -> TrainState:
    return TrainState(step=self.step, params=self.params, ema_params=self.ema_params, opt_state=self.opt_state,
                      rng=self.rng, frozen={})


def _init_fn(init_params: Callable[[Array], Any], optimizer: optax.GradientTransformation, num_ema: int,
             frozen_like: Callable[[Any], Any] | None) -> Callable[[Array], TrainState]:

  def init(seed_key):
    rng_params, rng_train = jax.random.split(seed_key)
    params = init_params(rng_params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=(params,) * num_ema,
                      opt_state=optimizer.init(params), rng=rng_train,
                      frozen={} if frozen_like is None else frozen_like(params))

  return init


def abstract_state(init_params: Callable[[Array], Any], optimizer: optax.GradientTransformation, *, seed: int,
                   num_ema: int, mesh: jax.sharding.Mesh, rules: Sequence[tuple[str, str]],
                   frozen_like: Callable[[Any], Any] | None = None) -> tuple[TrainState, Any]:
  """``(abstract_state, shardings)``: ShapeDtypeStructs carrying their shardings, computed without allocating.

  Args:
    init_params: ``rng -> params`` as returned by a Linen ``init`` (boxed with logical names).
    optimizer: the optax transformation whose state is created for the parameters.
    seed: the run's seed; parameters and the training rng stream are derived from it.
    num_ema: number of EMA copies (one per decay), initialised to the parameters.
    mesh, rules: see :func:`sharding.tree_shardings`.
    frozen_like: ``params -> frozen`` (boxed parameters in, so frozen copies keep their logical axis names);
      ``None`` = no frozen networks (``{}``).
  """
  boxed = jax.eval_shape(_init_fn(init_params, optimizer, num_ema, frozen_like), jax.random.PRNGKey(seed))
  shardings = sharding.tree_shardings(boxed, mesh, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed),
                          shardings)
  return abstract, shardings


def create(init_params: Callable[[Array], Any], optimizer: optax.GradientTransformation, *, seed: int,
           num_ema: int, shardings: Any, frozen_like: Callable[[Any], Any] | None = None,
           initial: Callable[[Any], tuple[Any, Any]] | None = None) -> TrainState:
  """The initial state, initialised directly into ``shardings`` (from :func:`abstract_state`).

  ``initial(abstract_params) -> (params, frozen)`` (host arrays, e.g. read from another run's checkpoint) replaces
  the random parameters and their EMA copies (unless ``params`` is ``None``) and the frozen tree; each process
  places only its own shards.
  """
  init = _init_fn(init_params, optimizer, num_ema, frozen_like)
  state = jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings)(jax.random.PRNGKey(seed))
  if initial is None:
    return state
  params, frozen = initial(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params))
  if params is not None:
    state = state.replace(params=_place(params, state.params),
                          ema_params=tuple(_place(params, ema) for ema in state.ema_params))
  return state.replace(frozen=_place(frozen, state.frozen))


def _place(host_tree: Any, like: Any) -> Any:
  """``host_tree`` (numpy) as new global arrays with the shardings and dtypes of ``like`` (multi-host safe); each
  call makes its own buffers, so copies placed from one host tree can all be donated."""
  return jax.tree.map(lambda h, x: jax.make_array_from_callback(
      x.shape, x.sharding, lambda index: jnp.asarray(h[index], x.dtype)), host_tree, like)
