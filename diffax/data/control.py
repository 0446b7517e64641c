"""Control images computed from images, for ControlNet (Zhang et al. 2023, sec. 4: Canny edges, depth, ...).

Both kinds map images ``x`` float [..., H, W, C] in [-1, 1] to control images of the same shape in [0, 1], in
numpy (on the host, beside the data pipeline) or in jax.numpy (on samples, to measure how well they follow a
control), with edge padding at the borders:

* ``'edges'``: the Sobel gradient magnitude of ``u = (x + 1) / 2`` per channel,
  ``sqrt(G_x^2 + G_y^2) / (4 sqrt 2)`` with ``G_x = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] * u`` and ``G_y`` its
  transpose (``4 sqrt 2`` is the largest magnitude a [0, 1] image can have, so the map lies in [0, 1]);
* ``'lowres'``: ``u`` averaged over ``factor x factor`` blocks and repeated back to H x W (a low-resolution
  version; H and W must be multiples of ``factor``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

KINDS = ('edges', 'lowres')

_SOBEL = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def _pad_edge(u, xp):
  pad = [(0, 0)] * (u.ndim - 3) + [(1, 1), (1, 1), (0, 0)]
  return xp.pad(u, pad, mode='edge')


def sobel_edges(x: Any, xp=np) -> Any:
  """Sobel gradient magnitude in [0, 1]: [..., H, W, C] in [-1, 1] -> [..., H, W, C] (module docstring)."""
  u = (x + 1.0) / 2.0
  p = _pad_edge(u, xp)
  h, w = u.shape[-3], u.shape[-2]
  window = lambda i, j: p[..., i:i + h, j:j + w, :]
  g_x = sum(_SOBEL[i][j] * window(i, j) for i in range(3) for j in range(3) if _SOBEL[i][j])
  g_y = sum(_SOBEL[j][i] * window(i, j) for i in range(3) for j in range(3) if _SOBEL[j][i])
  return xp.sqrt(g_x ** 2 + g_y ** 2) / (4.0 * np.sqrt(2.0))


def low_resolution(x: Any, factor: int, xp=np) -> Any:
  """Block means of ``(x + 1) / 2`` over ``factor x factor`` repeated back to H x W: [..., H, W, C] -> same."""
  *lead, h, w, c = x.shape
  if factor < 1 or h % factor or w % factor:
    raise ValueError(f'lowres control: factor {factor} must divide the image size {h} x {w}.')
  u = (x + 1.0) / 2.0
  blocks = u.reshape(*lead, h // factor, factor, w // factor, factor, c).mean(axis=(-4, -2))
  return xp.repeat(xp.repeat(blocks, factor, axis=-3), factor, axis=-2)


def control_image(x: Any, kind: str, *, factor: int = 2, xp=np) -> Any:
  """The control image of kind ``kind`` (one of :data:`KINDS`) of images ``x`` [..., H, W, C] in [-1, 1]."""
  if kind == 'edges':
    return sobel_edges(x, xp)
  if kind == 'lowres':
    return low_resolution(x, factor, xp)
  raise ValueError(f'Unknown control kind {kind!r}; expected one of {KINDS}.')


def read_control_file(path: str) -> np.ndarray:
  """Control images from a file: ``.npy`` (float in [0, 1], or uint8 scaled by 1/255) or an image (``.png``,
  grey or RGB, scaled by 1/255) -> float32 [N, H, W, C] (a single [H, W, C] / [H, W] image gets N = 1)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'No control image file {path}.')
  with path.open('rb') as f:
    array = np.load(f) if path.suffix == '.npy' else np.asarray(Image.open(f))
  if array.dtype == np.uint8:
    array = array.astype(np.float32) / 255.0
  array = np.asarray(array, np.float32)
  if array.ndim == 2:
    array = array[..., None]
  return array[None] if array.ndim == 3 else array
