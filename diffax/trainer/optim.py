"""The optimizer: AdamW (or Adam) with warm-up + constant / cosine learning rate and global-norm clipping.

Built from typed arguments (the trainer passes ``config.optim``'s values). Gradient accumulation wraps the
whole chain in ``optax.MultiSteps``, whose accumulator lives in the optimizer state and so is checkpointed
with it: a run resumed in the middle of an accumulation continues exactly.
"""

from __future__ import annotations

import optax


def learning_rate_schedule(*, learning_rate: float, lr_schedule: str = 'constant', warmup_steps: int = 0,
                           num_steps: int, min_lr_ratio: float = 0.0) -> optax.Schedule:
  """Linear warm-up from 0 over ``warmup_steps`` updates, then constant or cosine decay to ``min_lr_ratio``."""
  if lr_schedule == 'constant':
    after = optax.constant_schedule(learning_rate)
  elif lr_schedule == 'cosine':
    after = optax.cosine_decay_schedule(learning_rate, max(num_steps - warmup_steps, 1), alpha=min_lr_ratio)
  else:
    raise ValueError(f"Unknown lr_schedule {lr_schedule!r}; choose 'constant' or 'cosine'.")
  if not warmup_steps:
    return after
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(*, optimizer: str = 'adamw', learning_rate: float, lr_schedule: str = 'constant',
                   warmup_steps: int = 0, min_lr_ratio: float = 0.0, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, weight_decay: float = 0.0, grad_clip: float = 0.0, grad_accum_steps: int = 1,
                   num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns ``(optimizer, lr_schedule)``; ``num_steps`` counts micro-batches (train steps).

  DDPM's CIFAR-10 recipe is ``adam, lr 2e-4, warmup 5000, grad_clip 1`` (Ho et al. 2020, appendix B).
  """
  num_updates = num_steps // grad_accum_steps
  schedule = learning_rate_schedule(learning_rate=learning_rate, lr_schedule=lr_schedule,
                                    warmup_steps=warmup_steps, num_steps=num_updates, min_lr_ratio=min_lr_ratio)
  if optimizer == 'adamw':
    base = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  elif optimizer == 'adam':
    base = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
  else:
    raise ValueError(f"Unknown optimizer {optimizer!r}; choose 'adamw' or 'adam'.")
  chain = optax.chain(optax.clip_by_global_norm(grad_clip), base) if grad_clip else base
  if grad_accum_steps > 1:
    chain = optax.MultiSteps(chain, every_k_schedule=grad_accum_steps)
  return chain, schedule
