"""Per-process training batches from a random-access source, with a checkpointable position (grain).

The records form one global stream: each epoch is a fresh permutation of the source (grain's index shuffle,
reseeded per epoch), epochs follow each other, and consecutive runs of ``global_batch_size`` records are the
global batches (they may straddle an epoch boundary). Process ``p`` of ``P`` reads the ``p``-th of the ``P``
equal slices of every global batch, so processes read disjoint positions of the stream and together they see
exactly the single-process global batch. Random flips and dequantisation noise are drawn per stream position
(record and epoch) from the seed, so batches do not depend on the process count, the threads or the workers.
The shuffle and augmentation seeds are derived from ``seed`` by ``np.random.SeedSequence``: grain seeds epoch
``e`` of a shuffle with ``seed + e``, so raw consecutive seeds would replay each other's epochs.

Images become ``x`` float32 [b, H, W, C] in [-1, 1]:

  x = u / 127.5 - 1                              (no dequantisation)
  x = 2 (u + n) / 256 - 1,   n ~ U[0, 1)         (uniform dequantisation, Theis et al. 2016, "A note on the
                                                  evaluation of generative models", sec. 3.1)

with ``u`` the uint8 pixels, and labels ``cond`` int32 [b] (captioned records, :mod:`diffax.data.captions`: their
caption's token ids ``cond`` int32 [b, L] instead). Clips (records with ``'video'`` uint8 [T, H, W, C])
are scaled the same way into ``x`` [b, T, H, W, C] (a flip mirrors every frame); waveforms (``'audio'`` float32
[L, C] in [-1, 1]) pass unchanged into ``x`` [b, L, C] (no flips, no dequantisation), and so do latents
(``'latent'`` float32 [h, w, c]).

The iterator is a ``grain.DatasetIterator``:
``get_state()`` / ``set_state()`` give its position, and ``grain.checkpoint.CheckpointSave`` /
``CheckpointRestore`` save it with Orbax next to the train state; a restored iterator yields exactly the batches
the uninterrupted one would have.
"""

from __future__ import annotations

import grain
import jax
import numpy as np

from diffax.data.sources import Source

Batch = dict[str, np.ndarray]
"""``{'x': float32 [b, H, W, C] in [-1, 1], 'cond': int32 [b]}``."""

DATA_KEYS = ('image', 'video', 'audio', 'latent')
"""The record key holding an example's data: uint8 [H, W, C], uint8 [T, H, W, C], float32 [L, C] or an encoded
image's float32 latents [h, w, c] (:mod:`diffax.trainer.latents`)."""


def data_key(record: dict) -> str:
  """Which of :data:`DATA_KEYS` ``record`` holds."""
  keys = [k for k in DATA_KEYS if k in record]
  if len(keys) != 1:
    raise ValueError(f'A record needs exactly one of {DATA_KEYS}; got the keys {sorted(record)}.')
  return keys[0]


def _preprocess(record: dict, rng: np.random.Generator, *, random_flip: bool, dequantize: bool) -> Batch:
  """One record ``{'image': uint8 [H, W, C], 'label'}`` -> ``{'x': float32 [H, W, C], 'cond': int32 []}``
  (clips and waveforms alike, see the module docstring; ``'tokens'`` [L], where a record has them, is ``cond``)."""
  key = data_key(record)
  cond = np.asarray(record['tokens'] if 'tokens' in record else record['label'], np.int32)
  if key in ('audio', 'latent'):
    return {'x': np.asarray(record[key], np.float32), 'cond': cond}
  u = record[key]
  if random_flip and rng.random() < 0.5:
    u = u[..., ::-1, :]  # the width axis of [H, W, C] and [T, H, W, C]
  if dequantize:
    x = (u.astype(np.float32) + rng.random(u.shape, dtype=np.float32)) * np.float32(2 / 256) - 1
  else:
    x = u.astype(np.float32) / np.float32(127.5) - 1
  return {'x': x, 'cond': cond}


def make_iterator(source: Source, *, global_batch_size: int, seed: int, shuffle: bool = True,
                  random_flip: bool = False, dequantize: bool = False, num_epochs: int | None = None,
                  process_index: int | None = None, process_count: int | None = None, worker_count: int = 0,
                  read_threads: int = 4) -> grain.DatasetIterator:
  """Returns an iterator over this process's share of the global batches of ``source``.

  Args:
    source: random-access records ``{'image': uint8 [H, W, C], 'label': int}`` (:mod:`diffax.data.sources`), or
      ``'video'`` / ``'audio'`` records.
    global_batch_size: records per step over all processes.
    seed: non-negative integer fixing the order, the flips and the dequantisation noise.
    shuffle: permute the records afresh every epoch; otherwise read them in order.
    random_flip: mirror each image horizontally with probability 1/2.
    dequantize: add uniform noise U[0, 1) to the integer pixels before scaling.
    num_epochs: passes over the data (the last partial global batch is dropped); ``None`` repeats forever.
    process_index: this process (default ``jax.process_index()``).
    process_count: number of processes sharing each global batch (default ``jax.process_count()``).
    worker_count: worker processes preparing batches (0: none, all in this process). Workers use grain's
      ``mp_prefetch``, which reads absl flags: call from an absl app (or after ``flags.FLAGS.mark_as_parsed()``).
    read_threads: threads reading and preprocessing batches in each process (0: in the consumer's thread).

  Returns:
    A ``grain.DatasetIterator`` of ``{'x': float32 [b, H, W, C] in [-1, 1], 'cond': int32 [b]}`` with
    ``b = global_batch_size // process_count``; it has ``get_state()`` / ``set_state()``.

  Raises:
    ValueError: an argument is out of range, or the batch does not fit the process count or the dataset.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  num_records = len(source)
  if global_batch_size < 1 or process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'Need global_batch_size >= 1 and 0 <= process_index < process_count, got '
                     f'{global_batch_size=}, {process_index=}, {process_count=}.')
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} is not divisible by process_count={process_count}.')
  if global_batch_size > num_records:
    raise ValueError(f'global_batch_size={global_batch_size} is larger than the dataset ({num_records} records).')
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f'num_epochs must be None (forever) or >= 1, got {num_epochs}.')
  if seed < 0 or worker_count < 0 or read_threads < 0:
    raise ValueError(f'seed, worker_count and read_threads must be >= 0, got {seed=}, {worker_count=}, '
                     f'{read_threads=}.')
  record = source[0]
  key = data_key(record)
  data = np.asarray(record[key])
  if key == 'audio' and (data.dtype != np.float32 or data.ndim != 2):
    raise ValueError(f'Source waveforms must be float32 [L, C] in [-1, 1], got {data.dtype} {data.shape}.')
  if key == 'audio' and (random_flip or dequantize):
    raise ValueError('random_flip and dequantize apply to images and clips; waveforms take neither (config keys '
                     'data.random_flip, data.dequantize).')
  if key == 'latent' and (data.dtype != np.float32 or data.ndim != 3 or random_flip or dequantize):
    raise ValueError(f'Source latents must be float32 [h, w, c] (got {data.dtype} {data.shape}) and take no '
                     'random_flip or dequantize (they are of the images as encoded).')
  if key in ('image', 'video') and (data.dtype != np.uint8 or data.ndim != {'image': 3, 'video': 4}[key]):
    expected = '[H, W, C]' if key == 'image' else '[T, H, W, C]'
    raise ValueError(f'Source {key}s must be uint8 {expected}, got {data.dtype} {data.shape}.')

  shuffle_seed, map_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
  local_batch_size = global_batch_size // process_count

  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=shuffle_seed)
  ds = ds.repeat(num_epochs)
  ds = ds.random_map(
      lambda record, rng: _preprocess(record, rng, random_flip=random_flip, dequantize=dequantize), seed=map_seed)
  ds = ds.batch(local_batch_size, drop_remainder=True)  # Global batch g is local batches g P, ..., g P + P - 1.
  if num_epochs is not None:
    ds = ds[:num_records * num_epochs // global_batch_size * process_count]
  ds = ds[process_index::process_count]
  ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * read_threads, 1)))
  if worker_count:
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(ids)
