"""Reading the EMA weights of another trained run (a fine-tuning base, a distillation teacher), never writing them.

The other run's workdir is only read: its checkpoint metadata is checked against the parameter shapes this run's
model expects before any array is loaded, so a base or teacher of another architecture is a named error before a
step runs, and nothing under that workdir is created, moved or deleted.
"""

from __future__ import annotations

from typing import Any

import flax.traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

Params = Any


class RestoreError(FileNotFoundError):
  """The workdir has no readable checkpoint (or not that step), or one of another architecture."""


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of ``workdir/checkpoints/<step>`` in increasing order (empty when there are none)."""
  directory = epath.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def _ema(tree: Any, ema_index: int) -> Any:
  ema = tree['ema_params']
  return ema[str(ema_index)] if isinstance(ema, dict) else ema[ema_index]


def restore_ema_params(workdir: str, abstract_params: Params, *, ema_index: int = 0, step: int = -1,
                       key: str = 'workdir') -> Params:
  """The EMA parameters ``ema_params[ema_index]`` of a trained run's checkpoint, as numpy arrays.

  Args:
    workdir: the trained run's workdir (its ``checkpoints/<step>/state``); read only.
    abstract_params: the (unboxed) parameter shapes this run's model expects; names and shapes must match.
    ema_index: which EMA copy (the order of the trained run's ``train.ema_decays``).
    step: the checkpoint step; -1 = the newest.
    key: the config key that named ``workdir``, for the error messages (e.g. ``'distill.teacher_workdir'``).

  Raises:
    RestoreError: no checkpoint (or not that step), no such EMA copy, or parameters of another architecture
      (the message lists the first missing, unexpected and differently shaped parameters).
  """
  steps = checkpoint_steps(workdir)
  if not steps or (step != -1 and step not in steps):
    raise RestoreError(f'{key}={workdir!r} has no checkpoint {"" if step == -1 else f"at step {step} "}in '
                       f'{epath.Path(workdir) / "checkpoints"} (steps {steps}); train that model first '
                       '(python -m diffax.main --config ... --workdir DIR).')
  path = epath.Path(workdir) / 'checkpoints' / str(steps[-1] if step == -1 else step) / 'state'
  metadata = ocp.StandardCheckpointer().metadata(path)
  tree = metadata.item_metadata.tree if hasattr(metadata, 'item_metadata') else metadata
  num_ema = len(tree['ema_params'])
  if not 0 <= ema_index < num_ema:
    raise RestoreError(f'{key}={workdir!r}: its checkpoint {path} holds {num_ema} EMA copies, not index {ema_index}.')
  expected = {'/'.join(k): tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(abstract_params).items()}
  found = {'/'.join(k): tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(_ema(tree, ema_index)).items()}
  if expected != found:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    shapes = [(k, found[k], expected[k]) for k in sorted(set(expected) & set(found)) if expected[k] != found[k]]
    raise RestoreError(
        f'{key}={workdir!r}: the checkpoint {path} holds a model of another architecture than model.* describes: '
        f'missing {missing[:5]}, unexpected {extra[:5]}, other shapes (name, found, expected) {shapes[:5]} '
        '(set model.name / preset / overrides and data.* as in that run).')
  restored = ocp.PyTreeCheckpointer().restore(path, restore_args=jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  return _ema(restored, ema_index)
