"""Reading back what the CLU writers wrote: scalar series from a workdir's TensorBoard event files."""

from __future__ import annotations

import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value), ...]}`` in step order for every scalar under ``workdir`` (e.g. ``'train/loss'``).

  All event files of the directory are merged, so a resumed run's series continue the first run's; a step
  written twice (the resumed run repeating steps after its checkpoint) keeps the later value.
  """
  accumulator = event_accumulator.EventAccumulator(str(workdir), size_guidance={event_accumulator.TENSORS: 0})
  accumulator.Reload()
  series = {}
  for tag in accumulator.Tags()['tensors']:
    values = {}
    for event in accumulator.Tensors(tag):
      array = tensor_util.make_ndarray(event.tensor_proto)
      if array.ndim == 0 and np.issubdtype(array.dtype, np.number):
        values[event.step] = float(array)
    if values:
      series[tag] = sorted(values.items())
  return series
