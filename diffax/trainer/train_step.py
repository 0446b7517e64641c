"""The train step: one pure ``train_step(state, batch) -> (state, metrics)`` with the optimizer update, the EMA
(with warm-up) and the non-finite guard inside, and the per-log-SNR loss breakdown it reports.

Jit it once with explicit shardings and ``donate_argnums=0`` (:mod:`diffax.trainer.train`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from diffax.diffusion.schedules import Schedule
from diffax.trainer.objective import Objective
from diffax.trainer.train_state import TrainState

Array = jax.Array


def ema_decay(decay: float, step: Array, *, warmup: bool) -> Array:
  """``min(decay, (1 + n) / (10 + n))`` with warm-up (TF's ExponentialMovingAverage ``num_updates``)."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  n = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def _bucket_stats(per_example: Array, log_snr: Array, edges: Array) -> tuple[Array, Array]:
  """Per-bucket sums and counts of ``per_example`` [B] over log-SNR ``edges`` [K+1] (descending)."""
  index = jnp.clip(jnp.searchsorted(-edges, -log_snr) - 1, 0, edges.shape[0] - 2)  # [B]
  one_hot = jax.nn.one_hot(index, edges.shape[0] - 1, dtype=jnp.float32)  # [B, K]
  return one_hot.T @ per_example.astype(jnp.float32), jnp.sum(one_hot, axis=0)


def log_snr_edges(schedule: Schedule, num_buckets: int) -> Array:
  """[K+1] descending log-SNR edges splitting ``[t_min, t_max]`` into equal-width log-SNR bins."""
  hi, lo = schedule.log_snr(jnp.float32(schedule.t_min)), schedule.log_snr(jnp.float32(schedule.t_max))
  return jnp.linspace(hi, lo, num_buckets + 1)


def make_train_step(objective: Objective, optimizer: optax.GradientTransformation, *, ema_decays: Sequence[float],
                    ema_warmup: bool, edges: Array | None) -> Callable[[TrainState, Any], tuple[TrainState, dict]]:
  """``train_step(state, batch) -> (state, metrics)``; jit it once with shardings and ``donate_argnums=0``.

  The loss is ``objective.loss_at(state.step, state.frozen, state.ema_params)``; the frozen tree is updated
  after the step by ``objective.update_frozen`` (when set). The metrics hold the loss, the gradient norm, every
  scalar of the loss's ``aux`` as ``'aux/<name>'`` and, with log-SNR ``edges``, the per-bucket loss sums and counts
  (``edges=None``: a loss without noise levels, such as an autoencoder's).

  The step's rng is ``fold_in(state.rng, state.step)``, so a resumed run draws exactly the noise an
  uninterrupted one would. A non-finite loss or gradient leaves params, EMA and optimizer state unchanged
  (``metrics['finite'] = 0``); the trainer then stops or skips by policy. EMA follows the parameters after
  every optimizer update (with gradient accumulation, only on the micro-step that applies the update).
  """
  accumulate = isinstance(optimizer, optax.MultiSteps)

  def train_step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, Array]]:
    rng = jax.random.fold_in(state.rng, state.step)
    loss_fn = objective.loss_at(state.step, state.frozen, state.ema_params)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    applied = (opt_state.mini_step == 0) if accumulate else jnp.bool_(True)
    ema_params = tuple(
        jax.tree.map(lambda e, p, d=ema_decay(decay, state.step, warmup=ema_warmup): d * e + (1.0 - d) * p,
                     ema, params) for decay, ema in zip(ema_decays, state.ema_params))
    ema_params = jax.tree.map(lambda new, old: jnp.where(applied, new, old), ema_params, state.ema_params)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    params, ema_params = keep(params, state.params), keep(ema_params, state.ema_params)
    frozen = state.frozen
    if objective.update_frozen is not None:
      frozen = keep(objective.update_frozen(state.step + 1, params, frozen), frozen)
    new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                              opt_state=keep(opt_state, state.opt_state), frozen=frozen)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'finite': finite.astype(jnp.int32),
               **{f'aux/{k}': v for k, v in aux.items() if jnp.ndim(v) == 0}}
    if edges is not None:
      metrics['loss_bucket_sums'], metrics['loss_bucket_counts'] = _bucket_stats(aux['loss'], aux['log_snr'], edges)
    return new_state, metrics

  return train_step
