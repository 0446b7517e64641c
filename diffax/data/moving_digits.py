"""Embedded clips: the 8x8 digits moving and bouncing on a 32x32 canvas ("moving digits"), made deterministically.

Moving MNIST (Srivastava et al. 2015, "Unsupervised learning of video representations using LSTMs", sec. 3)
at the scale of the embedded digits (:mod:`diffax.data.digits`), so video runs need no download. Clip ``i`` of a
split shows digit ``i`` of that split: it starts at a position uniform on the canvas and moves with a constant
speed in ``[SPEED_MIN, SPEED_MAX]`` pixels per frame in a uniform direction, reflecting off the edges; the
digit is pasted at the integer-rounded position. The position and velocity come from
``np.random.default_rng((SEED, split, i))``, so a clip depends only on its split and index.
"""

from __future__ import annotations

import numpy as np

from diffax.data import digits
from diffax.data.sources import SourceConfigError

SEED = 0
SPEED_MIN, SPEED_MAX = 1.0, 2.5
CANVAS = 32
DIGIT = 8


def trajectory(rng: np.random.Generator, num_frames: int, *, canvas: int = CANVAS) -> np.ndarray:
  """Top-left corners int [num_frames, 2] (row, column) in ``[0, canvas - 8]`` of a bouncing digit."""
  span = canvas - DIGIT
  position = rng.uniform(0, span, size=2)
  angle = rng.uniform(0, 2 * np.pi)
  velocity = rng.uniform(SPEED_MIN, SPEED_MAX) * np.array([np.sin(angle), np.cos(angle)])
  corners = np.empty((num_frames, 2), np.int64)
  for f in range(num_frames):
    corners[f] = np.rint(position)
    position = position + velocity
    for axis in range(2):  # reflect off the edges
      if position[axis] < 0:
        position[axis], velocity[axis] = -position[axis], -velocity[axis]
      elif position[axis] > span:
        position[axis], velocity[axis] = 2 * span - position[axis], -velocity[axis]
  return corners


def render(digit: np.ndarray, corners: np.ndarray, *, canvas: int = CANVAS) -> np.ndarray:
  """uint8 [T, canvas, canvas, 1]: ``digit`` uint8 [8, 8, 1] pasted at each corner [T, 2] on a black canvas."""
  clip = np.zeros((len(corners), canvas, canvas, 1), np.uint8)
  for f, (r, c) in enumerate(corners):
    clip[f, r:r + DIGIT, c:c + DIGIT] = digit
  return clip


class MovingDigitsSource:
  """Clips ``{'video': uint8 [num_frames, 32, 32, 1], 'label': digit class}``, made on demand.

  Args:
    split: ``'train'`` (1,438 clips), ``'test'`` (359) or ``'all'``: the digits of that split.
    num_frames: frames per clip (8-16 is the intended range; any positive number works).
  """

  num_classes = digits.NUM_CLASSES

  def __init__(self, split: str, *, num_frames: int = 16):
    if num_frames < 1:
      raise SourceConfigError('data.num_frames', f'must be positive, got {num_frames}.')
    self._images, self._labels = digits.load_digits(split)
    self._split = digits.SPLITS.index(split)
    self.num_frames = num_frames
    self.image_shape = (num_frames, CANVAS, CANVAS, 1)

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict:
    rng = np.random.default_rng((SEED, self._split, int(index)))
    corners = trajectory(rng, self.num_frames)
    return {'video': render(self._images[index], corners), 'label': int(self._labels[index])}
