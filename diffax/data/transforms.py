"""Per-record image transforms that give a dataset of varying image sizes one size (``data.resize``).

``'center_crop'`` is ADM's ``center_crop_arr`` (Dhariwal & Nichol 2021, guided-diffusion ``image_datasets.py``),
which DiT's ``train.py`` uses unchanged for ImageNet 256x256 (followed by a random horizontal flip, which the
pipeline draws: ``data.random_flip``):

  1. while min(H, W) >= 2 size:  (H, W) <- (H // 2, W // 2)     PIL BOX filter (the anti-aliased halvings that
                                                                  PIL's ``reducing_gap`` would do)
  2. (H, W) <- (round(H s), round(W s)),  s = size / min(H, W)    PIL BICUBIC
  3. the central size x size window: rows from (H - size) // 2, columns from (W - size) // 2.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

RESIZES = ('center_crop',)
"""Values of ``data.resize`` besides ``''`` (images as stored)."""


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """ADM's center crop (steps 1-3 of the module docstring): uint8 [H, W, C] (C = 1 or 3) -> uint8 [size, size, C]."""
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f'center_crop takes uint8 [H, W, 1 or 3] images, got {image.dtype} {image.shape}.')
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  while min(pil.size) >= 2 * size:  # PIL sizes are (W, H)
    pil = pil.resize(tuple(n // 2 for n in pil.size), resample=Image.Resampling.BOX)
  scale = size / min(pil.size)
  pil = pil.resize(tuple(round(n * scale) for n in pil.size), resample=Image.Resampling.BICUBIC)
  out = np.asarray(pil).reshape(pil.size[1], pil.size[0], image.shape[-1])
  top, left = (out.shape[0] - size) // 2, (out.shape[1] - size) // 2
  return np.ascontiguousarray(out[top:top + size, left:left + size])
