"""Orbax checkpoints of the train state and the data-iterator position, with fall-back and pre-emption.

A checkpoint at step ``n`` holds the state after ``n`` train steps and the iterator positioned at batch
``n``, so a restored run continues with exactly the batches and rngs an uninterrupted run would have used.
Saves are asynchronous (the device keeps training while Orbax writes); Orbax only lists checkpoints whose
write finished, so a half-written newest checkpoint is never seen. A newest checkpoint that exists but cannot
be read is reported, moved aside to ``<workdir>/checkpoints_unreadable/<step>`` (never deleted), and the
previous one is used.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from etils import epath

from diffax.trainer import train_state


class Checkpointer:
  """Keeps the last ``keep`` checkpoints plus every ``keep_period``-th step under ``directory``."""

  def __init__(self, directory: str | epath.Path, *, keep: int = 3, keep_period: int = 0,
               async_checkpointing: bool = True):
    self.directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_period or None, create=True,
                                           enable_async_checkpointing=async_checkpointing)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any | None = None) -> None:
    """Starts saving ``state`` (and the iterator position) as step ``step``; returns before the write ends."""
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: Any, data_iterator: Any | None = None, *, step: int | None = None) -> Any:
    """The newest readable state (or the one at ``step``), or ``None`` when there is no checkpoint.

    Args:
      abstract_state: ``jax.ShapeDtypeStruct`` tree with shardings; the restored arrays are placed so.
      data_iterator: restored in place to the checkpointed position (when given).
      step: a specific step; its failure is an error instead of a fall-back.
    """
    steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
    for candidate in steps:
      legacy = self._without_frozen(candidate, abstract_state)
      items = {'state': ocp.args.StandardRestore(abstract_state if legacy is None else legacy)}
      if data_iterator is not None:
        items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        state = self._manager.restore(candidate, args=ocp.args.Composite(**items)).state
        return state if legacy is None else state.upgrade()
      except Exception as error:  # noqa: BLE001 -- any read failure means this checkpoint is unusable
        if step is not None:
          raise RuntimeError(f'Checkpoint {self.directory / str(step)} cannot be read: {error}') from error
        logging.error('Checkpoint at step %d in %s cannot be read (%s: %s); falling back to the previous one.',
                      candidate, self.directory, type(error).__name__, error)
        self._set_aside(candidate)
    return None

  def _without_frozen(self, step: int, abstract_state: Any) -> train_state.StateWithoutFrozen | None:
    """The abstract state without ``frozen`` when the checkpoint at ``step`` predates that field and this run has
    no frozen networks (else ``None``: restore as it is; a run with frozen networks cannot use such a checkpoint)."""
    if not isinstance(abstract_state, train_state.TrainState) or jax.tree.leaves(abstract_state.frozen):
      return None
    try:
      metadata = ocp.StandardCheckpointer().metadata(self.directory / str(step) / 'state')
    except Exception:  # noqa: BLE001 -- an unreadable checkpoint is reported by the restore itself
      return None
    tree = metadata.item_metadata.tree if hasattr(metadata, 'item_metadata') and metadata.item_metadata else metadata
    if not isinstance(tree, dict) or 'frozen' in tree:
      return None  # no readable metadata (the restore reports it) or a current checkpoint
    return train_state.StateWithoutFrozen.like(abstract_state)

  def _set_aside(self, step: int) -> None:
    """Moves an unreadable checkpoint out of the manager's way without deleting it."""
    if jax.process_index() == 0:
      target = self.directory.parent / 'checkpoints_unreadable' / str(step)
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), str(target))
      logging.error('Moved the unreadable checkpoint to %s.', target)
    multihost_utils.sync_global_devices(f'diffax_set_aside_{step}')
    self._manager.reload()

  def reached_preemption(self, step: int) -> bool:
    """True on every process once a multi-host pre-emption notice has been synchronised (JAX's service)."""
    return self._manager.reached_preemption(step)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
