"""LPIPS v0.1 with the VGG-16 trunk (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", eq. 1), as computed by the ``lpips`` package (richzhang/PerceptualSimilarity):

  d(x, y) = sum_l  1/(H_l W_l) sum_{h,w,c}  w_{l,c} (f^l_hwc(x) - f^l_hwc(y))^2,    f = F / (||F||_channels + eps)

with ``F^l`` the VGG-16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the input after lpips'
ScalingLayer ``(x - shift) / scale``, ``eps = 1e-10``, and ``w_l >= 0`` the learned 1x1 "lin" layers (no bias;
their training dropout is off, as in lpips' eval mode). The paper writes ``||w_l * (f(x) - f(y))||_2^2``; the
released code and weights apply ``w_l`` to the squared difference, as here. The weights come from
``lpips_weights.load_weights``.

:func:`distance` is a pure function of ``(weights, x, y)``: jit it, and differentiate it in ``x`` and ``y`` to use
it as a training loss (LDM's autoencoder adds it to the reconstruction term). Pass the weights (a pytree) into
the jitted function as an argument, or close over them only inside it (as tracers): a jitted function that closes
over the loaded arrays embeds all 14.7 M parameters in its program as constants (~118 MB of HLO text).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffax.evaluation.lpips_weights import LpipsWeights
from diffax.evaluation.lpips_weights import TAPS
from diffax.evaluation.lpips_weights import VGG16_CONVS

Array = jax.Array

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
"""lpips' ScalingLayer: ImageNet's mean and std per RGB channel, mapped from [0, 1] to [-1, 1] inputs."""
EPS = 1e-10
MIN_SIZE = 16
"""The smallest height / width with a non-empty relu5_3 (four 2x2 max-pools)."""

_POOL_BEFORE = frozenset({'conv2_1', 'conv3_1', 'conv4_1', 'conv5_1'})
_TAP_AFTER = {'conv1_2': 'relu1_2', 'conv2_2': 'relu2_2', 'conv3_3': 'relu3_3', 'conv4_3': 'relu4_3',
              'conv5_3': 'relu5_3'}


def vgg16_features(vgg: dict, x: Array) -> dict[str, Array]:
  """VGG-16 (configuration D) up to relu5_3: [B, H, W, 3] -> ``{tap: [B, H / 2^l, W / 2^l, C_l]}`` for the five
  taps, with 3x3 convolutions zero-padded by 1 and 2x2 max-pools of stride 2 that drop an odd last row / column
  (torch's ``MaxPool2d(2, 2)``)."""
  taps, h = {}, x
  for name, _, _, _ in VGG16_CONVS:
    if name in _POOL_BEFORE:
      h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
    h = jax.lax.conv_general_dilated(h, vgg[name]['kernel'], (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    h = jax.nn.relu(h + vgg[name]['bias'].reshape(1, 1, 1, -1))
    if name in _TAP_AFTER:
      taps[_TAP_AFTER[name]] = h
  return taps


def normalize_channels(f: Array, eps: float = EPS) -> Array:
  """``f / (||f||_2 + eps)`` over the last (channel) axis: [..., C] -> [..., C] (lpips' ``normalize_tensor``).

  The norm is written so that its gradient is 0, not NaN, where a whole feature vector is 0 (all channels of a
  ReLU output dead at one position); the value is unchanged everywhere."""
  sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
  safe = sq > 0
  norm = jnp.where(safe, jnp.sqrt(jnp.where(safe, sq, 1.0)), 0.0)
  return f / (norm + eps)


def _as_rgb(images: Array, name: str) -> Array:
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'LPIPS takes {name} as [B, H, W, 3] (or [B, H, W, 1] grayscale) in [-1, 1]; got shape '
                     f'{images.shape}.')
  if min(images.shape[1:3]) < MIN_SIZE:
    raise ValueError(f'LPIPS-VGG needs images of at least {MIN_SIZE}x{MIN_SIZE} (relu5_3 is 1/16 of the input); '
                     f'{name} is {images.shape[1]}x{images.shape[2]}.')
  images = images.astype(jnp.float32)
  return jnp.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def layer_distances(weights: LpipsWeights, x: Array, y: Array) -> Array:
  """The five per-layer terms of LPIPS (lpips' ``retPerLayer``): [B, H, W, C] x2 -> [B, 5] in the order of
  ``lpips_weights.TAPS``. See :func:`distance`."""
  x, y = _as_rgb(x, 'x'), _as_rgb(y, 'y')
  if x.shape != y.shape:
    raise ValueError(f'LPIPS compares images of one shape; got x {x.shape} and y {y.shape}.')
  shift, scale = (jnp.asarray(v, jnp.float32).reshape(1, 1, 1, 3) for v in (SHIFT, SCALE))
  features = vgg16_features(weights.vgg, (jnp.concatenate([x, y]) - shift) / scale)  # one trunk pass over [2B]
  b = x.shape[0]
  terms = []
  for tap, _ in TAPS:
    f = normalize_channels(features[tap])
    diff_sq = jnp.square(f[:b] - f[b:])  # [B, H_l, W_l, C_l]
    terms.append(jnp.mean(diff_sq @ weights.lin[tap]['kernel'], axis=(1, 2)))  # 1x1 lin layer, spatial mean: [B]
  return jnp.stack(terms, axis=1)


def distance(weights: LpipsWeights, x: Array, y: Array) -> Array:
  """LPIPS v0.1 (VGG) per image pair: [B, H, W, 3] x2 in [-1, 1] -> [B] (Zhang et al. 2018, eq. 1).

  Grayscale images [B, H, W, 1] are repeated to 3 channels first (as a grayscale picture shown in RGB), so they
  are compared with the RGB network's weights. Any dtype is computed in float32. H and W must be at least 16.
  """
  return jnp.sum(layer_distances(weights, x, y), axis=1)
