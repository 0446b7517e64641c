"""Reconstruction metrics of an autoencoder: PSNR and SSIM (Wang et al. 2004), per image.

Images are [B, H, W, C] in [-1, 1] (``data_range`` 2); both metrics are computed in float32 per image and
averaged over channels by the caller's reduction (SSIM: mean over the valid window positions and channels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def psnr(x: Array, y: Array, *, data_range: float = 2.0) -> Array:
  """``10 log10(L^2 / MSE(x, y))`` per image: [B, H, W, C] x2 -> [B] dB."""
  mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range ** 2 / mse)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  """The normalised 1-D Gaussian of SSIM's reference implementation (11 taps, sigma 1.5): [size]."""
  r = np.arange(size, dtype=np.float64) - (size - 1) / 2
  w = np.exp(-r ** 2 / (2 * sigma ** 2))
  return (w / w.sum()).astype(np.float32)


def ssim(x: Array, y: Array, *, data_range: float = 2.0, size: int = 11, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> Array:
  """Mean structural similarity per image (Wang et al. 2004, eq. 13 with the Gaussian window of sec. III-C):

  ``SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))`` with
  ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2`` and local moments under the window, over the 'valid' positions.

  Args:
    x, y: [B, H, W, C] with H, W >= ``size``.

  Returns:
    [B] mean SSIM over positions and channels.
  """
  w = jnp.asarray(gaussian_window(size, sigma))
  c = x.shape[-1]

  def blur(a):  # separable 'valid' Gaussian filter per channel: [B, H, W, C] -> [B, H-size+1, W-size+1, C]
    a = jax.lax.conv_general_dilated(a, jnp.tile(w.reshape(size, 1, 1, 1), (1, 1, 1, c)), (1, 1), 'VALID',
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)
    return jax.lax.conv_general_dilated(a, jnp.tile(w.reshape(1, size, 1, 1), (1, 1, 1, c)), (1, 1), 'VALID',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)

  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  mu_x, mu_y = blur(x), blur(y)
  var_x = blur(x * x) - mu_x * mu_x
  var_y = blur(y * y) - mu_y * mu_y
  cov = blur(x * y) - mu_x * mu_y
  c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
  s = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
  return jnp.mean(s, axis=(1, 2, 3))
