"""An encoded split on disk: shards written once (resumably, shared among processes) and read lazily by index.

A cache directory holds

  manifest.json                     ``encoding`` (what was encoded, and how: the caller's record, e.g. the
                                    autoencoder's sha256, the data, the preprocessing, the sampling rule),
                                    ``num_records``, ``records_per_shard``, ``shards`` [{file, start, stop}] and
                                    ``complete``
  shard-00000-of-00128.npy          records [start, stop) as one structured numpy array (fields such as
                                    ``'latent'`` float32 [h, w, c] and ``'label'`` int64), its own dtype header

:func:`write` is deterministic and resumable: the manifest is written first (by whichever process comes first;
all would write the same), process ``p`` of ``P`` encodes the shards ``i`` with ``i % P == p`` that are not yet
on disk, and each shard is written atomically (a temporary file, then a rename), so an interrupted run leaves
only whole shards and the next one encodes the rest. A shard's content depends on its records only, not on which
process or which run encoded it (given the same platform and XLA: GPU convolutions are autotuned per compilation
and may round differently, so there run with ``XLA_FLAGS=--xla_gpu_deterministic_ops=true``). Process 0 marks
the manifest ``complete`` once every shard exists (and removes the temporary files interrupted runs left); the
others wait for that. A directory whose manifest records another ``encoding`` or shard size is refused
(:class:`CacheMismatchError`), complete or not.

:class:`ShardedSource` reads one record at a time (a seek and a read of ``itemsize`` bytes in its shard), so a
split larger than memory is read by grain's random access like any other source.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
import json
import os
import threading
import time
from typing import Any
import uuid

from absl import logging
from etils import epath
import numpy as np

MANIFEST = 'manifest.json'


class CacheMismatchError(ValueError):
  """A cache directory written for another encoding or shard layout; ``diff`` maps each differing manifest key
  to ``(cached, wanted)``."""

  def __init__(self, directory: epath.Path, diff: dict[str, tuple[Any, Any]]):
    super().__init__(f'{directory} was written with {diff} (cached, wanted)')
    self.directory, self.diff = directory, diff


def shard_ranges(num_records: int, records_per_shard: int) -> list[tuple[int, int]]:
  """``[(start, stop), ...]``: consecutive records, ``records_per_shard`` each (the last one may have fewer)."""
  return [(start, min(start + records_per_shard, num_records)) for start in range(0, num_records, records_per_shard)]


def assigned_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
  """The shards process ``process_index`` of ``process_count`` encodes: ``i % process_count == process_index``."""
  return list(range(process_index, num_shards, process_count))


def shard_name(i: int, num_shards: int) -> str:
  return f'shard-{i:05d}-of-{num_shards:05d}.npy'


def plan(encoding: dict[str, Any], num_records: int, records_per_shard: int) -> dict[str, Any]:
  """The manifest of an incomplete cache: every key but ``complete`` is fixed before the first shard."""
  ranges = shard_ranges(num_records, records_per_shard)
  return {'encoding': encoding, 'num_records': num_records, 'records_per_shard': records_per_shard,
          'shards': [{'file': shard_name(i, len(ranges)), 'start': a, 'stop': b} for i, (a, b) in enumerate(ranges)],
          'complete': False}


def read_manifest(directory: str | epath.Path) -> dict[str, Any] | None:
  path = epath.Path(directory) / MANIFEST
  return json.loads(path.read_text()) if path.exists() else None


def _write_atomically(path: epath.Path, write: Callable[[Any], None]) -> None:
  temporary = path.parent / f'.{path.name}.tmp-{uuid.uuid4().hex}'
  with temporary.open('wb') as f:
    write(f)
  temporary.replace(path)  # atomic: readers see the old file or the whole new one


def _check(directory: epath.Path, got: dict[str, Any], want: dict[str, Any]) -> None:
  diff = {k: (got.get(k), v) for k, v in want.items() if k not in ('shards', 'complete') and got.get(k) != v}
  if diff:
    raise CacheMismatchError(directory, diff)


def write(directory: str | epath.Path, *, encoding: dict[str, Any], num_records: int, records_per_shard: int,
          encode: Callable[[int, int], dict[str, np.ndarray]], process_index: int = 0, process_count: int = 1,
          poll_seconds: float = 2.0) -> dict[str, Any]:
  """Encodes this process's missing shards of ``directory`` and returns the complete manifest.

  Args:
    directory: the cache directory (created).
    encoding: JSON record of what is encoded and how; a directory recording another one is refused.
    num_records: records of the split.
    records_per_shard: the shard size.
    encode: ``encode(start, stop) -> {field: [stop - start, ...] array}`` for records [start, stop); it must
      depend on the records only (e.g. a sample drawn from ``fold_in(key, record index)``).
    process_index, process_count: this process and how many share the shards.
    poll_seconds: how often a process waiting for the others looks again.

  Raises:
    CacheMismatchError: the directory holds a cache of another ``encoding`` or ``records_per_shard``.
  """
  directory = epath.Path(directory)
  want = plan(encoding, num_records, records_per_shard)
  got = read_manifest(directory)
  if got is not None:
    _check(directory, got, want)
    if got['complete']:
      return got
  else:
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomically(directory / MANIFEST, lambda f: f.write(json.dumps(want, indent=1).encode()))
  shards = want['shards']
  for i in assigned_shards(len(shards), process_index, process_count):
    path = directory / shards[i]['file']
    if not path.exists():
      arrays = encode(shards[i]['start'], shards[i]['stop'])
      _write_atomically(path, lambda f, a=arrays: np.save(f, _structured(a)))
  if process_index == 0:
    _wait(lambda: all((directory / s['file']).exists() for s in shards), poll_seconds, f'the shards of {directory}')
    complete = json.dumps({**want, 'complete': True}, indent=1).encode()
    _write_atomically(directory / MANIFEST, lambda f: f.write(complete))
    for stale in directory.glob('.shard-*.tmp-*'):  # of interrupted runs: every process is done
      stale.unlink()
  else:
    _wait(lambda: read_manifest(directory)['complete'], poll_seconds, f'process 0 to complete {directory}')
  return {**want, 'complete': True}


def _structured(arrays: dict[str, np.ndarray]) -> np.ndarray:
  """``{field: [n, ...]}`` -> one structured array [n] with those fields (a shard's records)."""
  n = len(next(iter(arrays.values())))
  out = np.empty(n, np.dtype([(k, v.dtype, v.shape[1:]) for k, v in arrays.items()]))
  for k, v in arrays.items():
    out[k] = v
  return out


def _wait(done: Callable[[], bool], poll_seconds: float, what: str) -> None:
  if done():
    return
  logging.info('Waiting for %s.', what)
  while not done():
    time.sleep(poll_seconds)


class ShardedSource:
  """A complete cache directory as a random-access source: ``source[i] -> {field: value}`` of record ``i``,
  read from its shard on demand (one open file per shard and thread; picklable for grain's workers).

  Raises:
    FileNotFoundError: no complete manifest, or a shard it lists is missing.
  """

  def __init__(self, directory: str | epath.Path):
    self.directory = epath.Path(directory)
    manifest = read_manifest(self.directory)
    if manifest is None or not manifest['complete']:
      raise FileNotFoundError(f'{self.directory} holds no complete latent cache ({MANIFEST}).')
    self.manifest = manifest
    self._starts = [s['start'] for s in manifest['shards']]
    self._layout = [self._header(s['file']) for s in manifest['shards']]  # (dtype, data offset) per shard
    self._files = threading.local()

  def _header(self, name: str) -> tuple[np.dtype, int]:
    path = self.directory / name
    if not path.exists():
      raise FileNotFoundError(f'{path} (listed in {self.directory / MANIFEST}) is missing; delete the directory to '
                              'encode the split again.')
    with path.open('rb') as f:
      version = np.lib.format.read_magic(f)
      read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
      _, _, dtype = read_header[version](f)
      return dtype, f.tell()

  def __len__(self) -> int:
    return self.manifest['num_records']

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(f'record {index} of a cache of {len(self)}')
    shard = bisect.bisect_right(self._starts, index) - 1
    dtype, offset = self._layout[shard]
    files = self._files.__dict__
    if shard not in files:
      files[shard] = (self.directory / self.manifest['shards'][shard]['file']).open('rb')
    f = files[shard]
    f.seek(offset + (index - self._starts[shard]) * dtype.itemsize)
    record = np.frombuffer(f.read(dtype.itemsize), dtype)[0]
    return {k: np.array(record[k]) for k in dtype.names}

  def __getstate__(self) -> dict[str, Any]:
    return {k: v for k, v in self.__dict__.items() if k != '_files'}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state, _files=threading.local())
