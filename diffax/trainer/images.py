"""Sample images on the host: [-1, 1] floats -> uint8, tiled grids, PNG files."""

from __future__ import annotations

import math

import numpy as np
from etils import epath
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[N, H, W, C] in [-1, 1] -> uint8 [N, H, W, C] (values outside are clipped), ``round((x + 1) 127.5)``."""
  return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def grid(images: np.ndarray, *, columns: int | None = None, pad: int = 1) -> np.ndarray:
  """Tiles uint8 [N, H, W, C] into one [rows (H + pad) + pad, columns (W + pad) + pad, C] image (pad white)."""
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
  return canvas


def save_png(path: str | epath.Path, image: np.ndarray, *, scale: int = 1) -> None:
  """Writes uint8 [H, W, C] (C = 1 or 3) as PNG, enlarged ``scale`` times with nearest-neighbour pixels."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  if scale > 1:
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
  with path.open('wb') as f:
    pil.save(f, format='PNG')
