"""Embedded waveforms: synthetic tones and chirps in four classes, made deterministically.

Each record is a mono waveform of ``length`` samples at ``sample_rate`` Hz with peak amplitude ``a``:

  class 0, tone:        x(t) = a sin(2 pi f0 t + phi)
  class 1, up-chirp:    x(t) = a sin(2 pi (f0 t + (f1 - f0) t^2 / (2 D)) + phi),   f1 = 2 f0   (linear chirp)
  class 2, down-chirp:  the same with f1 = f0 / 2
  class 3, AM tone:     x(t) = a (1 + sin(2 pi f_m t)) / 2 sin(2 pi f0 t + phi),  f_m = 4 / D   (tremolo)

with D = length / sample_rate the duration, ``f0`` log-uniform in [F_MIN, F_MAX] (scaled by sample_rate / 8000),
``phi`` uniform and ``a`` uniform in [0.5, 0.9], drawn from ``np.random.default_rng((SEED, split, i))``. The
class of record ``i`` is ``i mod 4``; ``'train'`` has ``NUM_TRAIN`` records, ``'test'`` ``NUM_TEST``.
"""

from __future__ import annotations

import numpy as np

from diffax.data.sources import SourceConfigError

SEED = 0
NUM_CLASSES = 4
CLASS_NAMES = ('tone', 'chirp_up', 'chirp_down', 'am_tone')
F_MIN, F_MAX = 200.0, 1000.0
NUM_TRAIN, NUM_TEST = 2048, 512
SPLITS = {'train': (0, NUM_TRAIN), 'test': (1, NUM_TEST)}


def waveform(kind: int, *, f0: float, phase: float, amplitude: float, length: int, sample_rate: int) -> np.ndarray:
  """float32 [length] of class ``kind`` (module docstring)."""
  t = np.arange(length, dtype=np.float64) / sample_rate
  duration = length / sample_rate
  if kind == 0:
    cycles = f0 * t
  elif kind in (1, 2):
    f1 = 2 * f0 if kind == 1 else f0 / 2
    cycles = f0 * t + (f1 - f0) * np.square(t) / (2 * duration)
  elif kind == 3:
    cycles = f0 * t
    amplitude = amplitude * (1 + np.sin(2 * np.pi * 4 / duration * t)) / 2
  else:
    raise ValueError(f'Unknown tone class {kind}; the classes are 0 .. {NUM_CLASSES - 1} ({CLASS_NAMES}).')
  return (amplitude * np.sin(2 * np.pi * cycles + phase)).astype(np.float32)


class TonesSource:
  """Waveforms ``{'audio': float32 [length, 1] in [-1, 1], 'label': class}``, made on demand.

  Args:
    split: ``'train'`` or ``'test'``.
    length: samples per waveform.
    sample_rate: samples per second (frequencies scale with it, so the waveforms in samples do not change).
  """

  num_classes = NUM_CLASSES

  def __init__(self, split: str, *, length: int = 1024, sample_rate: int = 8000):
    if split not in SPLITS:
      raise SourceConfigError('data.split', f'tones has no split {split!r}; choose one of {sorted(SPLITS)}.')
    if length < 1 or sample_rate < 1:
      key = 'data.length' if length < 1 else 'data.sample_rate'
      raise SourceConfigError(key, f'must be positive, got length={length}, sample_rate={sample_rate}.')
    self._split, self._size = SPLITS[split]
    self.length, self.sample_rate = length, sample_rate
    self.image_shape = (length, 1)

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self._size:
      raise IndexError(f'Record {index} is outside [0, {self._size}).')
    rng = np.random.default_rng((SEED, self._split, int(index)))
    scale = self.sample_rate / 8000
    f0 = float(np.exp(rng.uniform(np.log(F_MIN), np.log(F_MAX)))) * scale
    x = waveform(index % NUM_CLASSES, f0=f0, phase=rng.uniform(0, 2 * np.pi), amplitude=rng.uniform(0.5, 0.9),
                 length=self.length, sample_rate=self.sample_rate)
    return {'audio': x[:, None], 'label': index % NUM_CLASSES}
