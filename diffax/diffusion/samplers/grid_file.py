"""Time grids stored as data: a small JSON file of descending times that any grid sampler takes as ``spacing``.

A file holds the whole grid [num_steps + 1], model-evaluation times first, then where the last step ends: ``0``
(the clean sentinel, the jump to the x0-prediction) or a time ``> 0`` (``t_min`` for a sampler run with
``denoise_to_zero=False``). Times are written as Python writes float64 (shortest round-trip repr), so a grid
reads back exactly::

  {"format": "diffax.time_grid", "version": 1, "num_steps": 5,
   "times": [1.0, 0.61, 0.33, 0.15, 0.04, 0.0], "metadata": {"sampler": "unipc", ...}}

``metadata`` is free JSON (how the grid was made: sampler, schedule, objective, errors); loading ignores it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

FORMAT = 'diffax.time_grid'
VERSION = 1
SUFFIX = '.json'


class GridFileError(ValueError):
  """A grid file that cannot be read as a time grid; the message names the file and what is wrong."""

  def __init__(self, path: str | os.PathLike, message: str):
    super().__init__(f'time grid file {os.fspath(path)!r}: {message}')
    self.path = os.fspath(path)


def check_times(times: Any) -> np.ndarray:
  """``times`` as float64 [num_steps + 1] if they form a grid (finite, strictly descending, ``>= 0``, at least
  two); otherwise a ``ValueError`` saying which condition fails."""
  try:
    ts = np.asarray(times, np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f'times must be numbers, got {times!r}') from e
  if ts.ndim != 1 or ts.shape[0] < 2:
    raise ValueError(f'times must be a flat list of at least two numbers (one step), got shape {ts.shape}')
  if not np.all(np.isfinite(ts)):
    raise ValueError(f'times must be finite, got {ts.tolist()}')
  if not np.all(np.diff(ts) < 0):
    raise ValueError(f'times must strictly decrease (sampling runs from noise to data), got {ts.tolist()}')
  if ts[-1] < 0:
    raise ValueError(f'times must be >= 0 (0 is clean data), got a last time of {ts[-1]}')
  return ts


def save_grid(path: str | os.PathLike, times: Any, **metadata: Any) -> None:
  """Writes ``times`` [num_steps + 1] (checked by :func:`check_times`) and JSON ``metadata`` to ``path``."""
  if not os.fspath(path).endswith(SUFFIX):
    raise ValueError(f'a time grid file name ends in {SUFFIX!r} (that is how spacing= tells it from a name), '
                     f'got {os.fspath(path)!r}')
  ts = check_times(times)
  record = {'format': FORMAT, 'version': VERSION, 'num_steps': int(ts.shape[0] - 1),
            'times': [float(t) for t in ts], 'metadata': metadata}
  with open(path, 'w') as f:
    json.dump(record, f, indent=1)
    f.write('\n')


def load_grid(path: str | os.PathLike) -> np.ndarray:
  """The times [num_steps + 1] (float64) of the grid file ``path``; :class:`GridFileError` if it is not one."""
  try:
    with open(path) as f:
      record = json.load(f)
  except FileNotFoundError as e:
    raise GridFileError(path, 'no such file (write one with diffax.samplers.save_grid)') from e
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise GridFileError(path, f'not readable as JSON ({e})') from e
  if not isinstance(record, dict) or record.get('format') != FORMAT:
    raise GridFileError(path, f'not a time grid: expected a JSON object with "format": "{FORMAT}"')
  if record.get('version') != VERSION:
    raise GridFileError(path, f'version {record.get("version")!r} is not supported (this diffax reads {VERSION})')
  times = record.get('times')
  if not isinstance(times, list) or not all(isinstance(t, (int, float)) and not isinstance(t, bool)
                                            for t in times):
    raise GridFileError(path, f'"times" must be a list of numbers, got {times!r}')
  try:
    ts = check_times(times)
  except ValueError as e:
    raise GridFileError(path, str(e)) from e
  if record.get('num_steps') != ts.shape[0] - 1:
    raise GridFileError(path, f'"num_steps" is {record.get("num_steps")!r} but "times" holds {ts.shape[0]} '
                        f'times, i.e. {ts.shape[0] - 1} steps')
  return ts


def describe_end(last_time: float) -> str:
  """How a grid ending at ``last_time`` ends, in words (for error messages)."""
  return 'at t = 0 (the jump to the x0-prediction)' if last_time == 0 else f'at t = {last_time:.6g} > 0'


def is_grid_path(spacing: Any) -> bool:
  """Whether ``spacing`` names a grid file (a path ending in ``.json``) rather than a spacing."""
  return isinstance(spacing, (str, os.PathLike)) and os.fspath(spacing).endswith(SUFFIX)

