"""The embedded default dataset: scikit-learn's 8x8 handwritten digits, with a fixed stratified split.

The UCI "Optical Recognition of Handwritten Digits" set (Alpaydin & Kaynak 1998) ships inside scikit-learn
(``sklearn.datasets.load_digits``): 1,797 grey images of 8x8 pixels with 17 levels (0..16) and 10 classes. It
needs no download, so the default config trains and evaluates anywhere.

Pixels are scaled to uint8 as ``round(v * 255 / 16)`` (0 -> 0, 16 -> 255). The split is stratified: in every
class a fixed permutation (NumPy's frozen legacy ``RandomState(SPLIT_SEED)`` stream, identical across NumPy
versions, NEP 19) puts ``round(TEST_FRACTION * n_class)`` images into ``'test'`` and the rest into ``'train'``
(1,438 / 359 images). Each split keeps scikit-learn's original order.

Styles (:data:`STYLES`, a new look of the same digits for fine-tuning a trained model): ``'bold'`` dilates the
strokes (grey dilation by a plus-shaped element: each pixel becomes the maximum of itself and its four
neighbours), ``'inverted'`` maps ``u -> 255 - u`` (dark digits on a light ground).
"""

from __future__ import annotations

import functools

import numpy as np

NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0
SPLITS = ('train', 'test', 'all')
STYLES = ('', 'bold', 'inverted')


@functools.cache
def _all_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Returns (images uint8 [1797, 8, 8, 1], labels int32 [1797], is_test bool [1797]), read-only."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top  (scikit-learn is slow to import)

  bunch = datasets.load_digits()
  images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = bunch.target.astype(np.int32)
  is_test = np.zeros(labels.shape, dtype=bool)
  rng = np.random.RandomState(SPLIT_SEED)
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    n_test = int(round(TEST_FRACTION * len(members)))
    is_test[rng.permutation(members)[:n_test]] = True
  for a in (images, labels, is_test):
    a.flags.writeable = False
  return images, labels, is_test


def stylise(images: np.ndarray, style: str) -> np.ndarray:
  """uint8 [N, H, W, C] drawn in ``style`` (one of :data:`STYLES`; ``''`` returns them unchanged)."""
  if style not in STYLES:
    raise ValueError(f'Unknown digits style {style!r}; expected one of {STYLES}.')
  if style == 'inverted':
    return 255 - images
  if style == 'bold':
    p = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return np.max([images, p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]], axis=0)
  return images


def load_digits(split: str, style: str = '') -> tuple[np.ndarray, np.ndarray]:
  """Loads a split of the 8x8 digits.

  Args:
    split: ``'train'`` (1,438 images), ``'test'`` (359 images, 20 % of each class) or ``'all'`` (1,797).
    style: one of :data:`STYLES` (``''``: as scanned).

  Returns:
    ``(images, labels)``: images uint8 [N, 8, 8, 1] in 0..255, labels int32 [N] in 0..9 (fresh arrays).
  """
  if split not in SPLITS:
    raise ValueError(f'Unknown digits split {split!r}; expected one of {SPLITS}.')
  images, labels, is_test = _all_digits()
  keep = {'train': ~is_test, 'test': is_test, 'all': np.ones_like(is_test)}[split]
  return stylise(images[keep], style), labels[keep]
