"""What a run minimises, and the frozen networks its loss reads (a distillation teacher, a frozen encoder).

The trainer stays generic: a plain diffusion run, a distillation run and a consistency-training run differ only
in their :class:`Objective`. Frozen networks live in ``TrainState.frozen``, so they are sharded by the same rules
as the parameters, checkpointed with the run (a resumed run needs no other workdir) and passed to the jitted step
as arguments, never baked into the program as constants.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import jax

from diffax.diffusion.losses import LossFn

Array = jax.Array
Params = Any


@dataclasses.dataclass(frozen=True)
class Objective:
  """The loss of a train step and the frozen extras it reads.

  Attributes:
    loss_at: ``loss_at(step [] int32, frozen, ema_params) -> loss_fn(params, batch, rng) -> (loss, aux)``, called
      inside the jitted step with the state's step (before the update), frozen tree and EMA copies (read only:
      e.g. a consistency model's EMA target network).
    frozen_like: ``params -> frozen``: the frozen tree built from freshly initialised parameters (traced in the
      abstract init for shapes and shardings); ``None`` for none (``{}``).
    initial: ``abstract_params -> (params, frozen)`` as host arrays for step 0, e.g. a student and its frozen
      teacher both read from the teacher's checkpoint (``params=None`` keeps the random parameters, e.g. beside a
      frozen autoencoder read from a file); ``None`` keeps the random initialisation and ``frozen_like``'s tree.
    update_frozen: ``(step after the update [] int32, params, frozen) -> frozen`` run after each update (e.g.
      progressive distillation's teacher replaced by the student at the end of a round); ``None`` = never.
  """

  loss_at: Callable[[Array, Any, tuple[Params, ...]], LossFn]
  frozen_like: Callable[[Params], Any] | None = None
  initial: Callable[[Params], tuple[Params, Any]] | None = None
  update_frozen: Callable[[Array, Params, Any], Any] | None = None

  @classmethod
  def of_loss(cls, loss_fn: LossFn) -> Objective:
    """A plain loss with no frozen extras."""
    return cls(loss_at=lambda step, frozen, ema_params: loss_fn)
