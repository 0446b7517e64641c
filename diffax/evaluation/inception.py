"""The Inception-v3 network of the standard FID implementations, in Flax Linen (NHWC, inference only).

This is the 2015-12-05 TensorFlow graph (``inception-2015-12-05.tgz``; Szegedy et al. 2016, "Rethinking the
Inception Architecture") that TTUR's FID (Heusel et al. 2017) and the Inception Score (Salimans et al. 2016)
were defined with, as ported to PyTorch by pytorch-fid. It differs from torchvision's ``inception_v3`` in
the ways that port patches (``fid_inception_v3``):

  * ``Mixed_5b..5d`` (A), ``Mixed_6b..6e`` (C) and ``Mixed_7b`` (E_1) average-pool with
    ``count_include_pad=False`` (TensorFlow's ``SAME`` average pooling ignores the padding);
  * ``Mixed_7c`` (E_2) max-pools in its pool branch;
  * the classifier has 1008 outputs (1000 ImageNet classes and 8 unused ones) and no auxiliary head.

Every convolution is ``BasicConv2d``: convolution without bias, BatchNorm (eps 1e-3, running statistics) and
ReLU. Parameter names follow the PyTorch module names (``Mixed_6b/branch7x7_2/conv/kernel``), so
``inception_weights.py`` maps a state_dict onto this tree one to one.

Input: images [B, H, W, 3] in [-1, 1] (pytorch-fid's ``normalize_input`` maps [0, 1] to [-1, 1]; TTUR's graph
computes ``(x - 128) / 128`` from uint8, an affine map that differs by at most 1/128). They are resized to 299x299 with
bilinear interpolation and half-pixel centres without antialiasing, i.e. PyTorch's
``F.interpolate(mode='bilinear', align_corners=False)`` as in pytorch-fid. TTUR instead feeds images to the
graph's own TF1 ``ResizeBilinear`` (no half-pixel offset; torch-fidelity reproduces it), so FIDs of small images
from the two tool chains differ slightly; compare numbers only within one of them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Padding = tuple[tuple[int, int], tuple[int, int]]

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008


def _pad(ph: int, pw: int) -> Padding:
  return ((ph, ph), (pw, pw))


class BasicConv2d(nn.Module):
  """Convolution (no bias) -> BatchNorm(eps=1e-3, running statistics) -> ReLU."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = _pad(0, 0)
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Conv(self.features, self.kernel_size, self.strides, padding=self.padding, use_bias=False,
                precision=self.precision, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x: Array) -> Array:
  """3x3 stride-1 average pool that, like TensorFlow's, averages over the valid pixels only."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1), count_include_pad=False)


class FIDInceptionA(nn.Module):
  """35x35 block (``Mixed_5b..5d``): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1; out 224 + pool_features."""
  pool_features: int
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, precision=self.precision, name=name)
    b1 = conv(64, (1, 1), _pad(0, 0), 'branch1x1')(x)
    b5 = conv(48, (1, 1), _pad(0, 0), 'branch5x5_1')(x)
    b5 = conv(64, (5, 5), _pad(2, 2), 'branch5x5_2')(b5)
    b3 = conv(64, (1, 1), _pad(0, 0), 'branch3x3dbl_1')(x)
    b3 = conv(96, (3, 3), _pad(1, 1), 'branch3x3dbl_2')(b3)
    b3 = conv(96, (3, 3), _pad(1, 1), 'branch3x3dbl_3')(b3)
    bp = conv(self.pool_features, (1, 1), _pad(0, 0), 'branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35 -> 17 reduction (``Mixed_6a``): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2; out 384 + 96 + in."""
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = lambda f, k, s, p, name: BasicConv2d(f, k, s, p, precision=self.precision, name=name)
    b3 = conv(384, (3, 3), (2, 2), _pad(0, 0), 'branch3x3')(x)
    bd = conv(64, (1, 1), (1, 1), _pad(0, 0), 'branch3x3dbl_1')(x)
    bd = conv(96, (3, 3), (1, 1), _pad(1, 1), 'branch3x3dbl_2')(bd)
    bd = conv(96, (3, 3), (2, 2), _pad(0, 0), 'branch3x3dbl_3')(bd)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, bd, bp], axis=-1)


class FIDInceptionC(nn.Module):
  """17x17 block (``Mixed_6b..6e``) with factorised 7x7 convolutions; out 768."""
  channels_7x7: int
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, precision=self.precision, name=name)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), _pad(0, 0), 'branch1x1')(x)
    b7 = conv(c7, (1, 1), _pad(0, 0), 'branch7x7_1')(x)
    b7 = conv(c7, (1, 7), _pad(0, 3), 'branch7x7_2')(b7)
    b7 = conv(192, (7, 1), _pad(3, 0), 'branch7x7_3')(b7)
    bd = conv(c7, (1, 1), _pad(0, 0), 'branch7x7dbl_1')(x)
    bd = conv(c7, (7, 1), _pad(3, 0), 'branch7x7dbl_2')(bd)
    bd = conv(c7, (1, 7), _pad(0, 3), 'branch7x7dbl_3')(bd)
    bd = conv(c7, (7, 1), _pad(3, 0), 'branch7x7dbl_4')(bd)
    bd = conv(192, (1, 7), _pad(0, 3), 'branch7x7dbl_5')(bd)
    bp = conv(192, (1, 1), _pad(0, 0), 'branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """17 -> 8 reduction (``Mixed_7a``): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2; out 320 + 192 + in."""
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = lambda f, k, s, p, name: BasicConv2d(f, k, s, p, precision=self.precision, name=name)
    b3 = conv(192, (1, 1), (1, 1), _pad(0, 0), 'branch3x3_1')(x)
    b3 = conv(320, (3, 3), (2, 2), _pad(0, 0), 'branch3x3_2')(b3)
    b7 = conv(192, (1, 1), (1, 1), _pad(0, 0), 'branch7x7x3_1')(x)
    b7 = conv(192, (1, 7), (1, 1), _pad(0, 3), 'branch7x7x3_2')(b7)
    b7 = conv(192, (7, 1), (1, 1), _pad(3, 0), 'branch7x7x3_3')(b7)
    b7 = conv(192, (3, 3), (2, 2), _pad(0, 0), 'branch7x7x3_4')(b7)
    bp = nn.max_pool(x, (3, 3), strides=(2, 2))
    return jnp.concatenate([b3, b7, bp], axis=-1)


class FIDInceptionE(nn.Module):
  """8x8 block (``Mixed_7b`` = E_1 with average pool, ``Mixed_7c`` = E_2 with max pool); out 2048."""
  pool: str  # 'avg' (E_1, count_include_pad=False) or 'max' (E_2)
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = lambda f, k, p, name: BasicConv2d(f, k, padding=p, precision=self.precision, name=name)
    b1 = conv(320, (1, 1), _pad(0, 0), 'branch1x1')(x)
    b3 = conv(384, (1, 1), _pad(0, 0), 'branch3x3_1')(x)
    b3 = jnp.concatenate([conv(384, (1, 3), _pad(0, 1), 'branch3x3_2a')(b3),
                          conv(384, (3, 1), _pad(1, 0), 'branch3x3_2b')(b3)], axis=-1)
    bd = conv(448, (1, 1), _pad(0, 0), 'branch3x3dbl_1')(x)
    bd = conv(384, (3, 3), _pad(1, 1), 'branch3x3dbl_2')(bd)
    bd = jnp.concatenate([conv(384, (1, 3), _pad(0, 1), 'branch3x3dbl_3a')(bd),
                          conv(384, (3, 1), _pad(1, 0), 'branch3x3dbl_3b')(bd)], axis=-1)
    if self.pool == 'avg':
      pooled = _avg_pool_3x3(x)
    elif self.pool == 'max':
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=_pad(1, 1))
    else:
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}.")
    bp = conv(192, (1, 1), _pad(0, 0), 'branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def resize_bilinear(images: Array, size: int = INPUT_SIZE) -> Array:
  """Bilinear resize of [B, H, W, C] to [B, size, size, C], half-pixel centres, no antialiasing.

  Equals ``torch.nn.functional.interpolate(mode='bilinear', align_corners=False)`` (pytorch-fid): source
  coordinate ``(i + 0.5) H / size - 0.5``, edge pixels repeated.
  """
  if images.shape[1:3] == (size, size):
    return images
  return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), 'bilinear', antialias=False)


class _Classifier(nn.Module):
  """The 2048 -> 1008 ``fc`` layer; returns ``(x @ W, x @ W + b)``."""
  features: int
  precision: jax.lax.Precision

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,), jnp.float32)
    unbiased = jnp.dot(x, kernel, precision=self.precision)
    return unbiased, unbiased + bias[None, :]


class FIDInceptionV3(nn.Module):
  """FID Inception-v3: images [B, H, W, 3] in [-1, 1] -> pool3 features and logits.

  ``__call__`` returns a dict of float32 arrays:
    ``'pool'``: [B, 2048] the final average pool ("pool_3" of the TF graph), used by FID and KID;
    ``'logits_unbiased'``: [B, 1008] ``pool @ W`` without the bias, what the reference Inception Score code
      (openai/improved-gan, torch-fidelity) takes the softmax of;
    ``'logits'``: [B, 1008] ``pool @ W + b``, the graph's ``softmax/logits``.

  Attributes:
    resize_input: resize to 299x299 first (pytorch-fid's default); inputs must be 299x299 when False.
    precision: of the convolutions and the classifier; ``HIGHEST`` keeps float32 accumulation on TPU and
      disables TF32 on GPU, so features match the float32 reference.
  """
  resize_input: bool = True
  precision: jax.lax.Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: Array) -> dict[str, Array]:
    x = jnp.asarray(images, jnp.float32)
    if self.resize_input:
      x = resize_bilinear(x)
    if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(f'Expected images [B, {INPUT_SIZE}, {INPUT_SIZE}, 3] after resizing, got {x.shape}.')
    p = self.precision
    conv = lambda f, k, s, pad, name: BasicConv2d(f, k, s, pad, precision=p, name=name)
    x = conv(32, (3, 3), (2, 2), _pad(0, 0), 'Conv2d_1a_3x3')(x)  # 149x149x32
    x = conv(32, (3, 3), (1, 1), _pad(0, 0), 'Conv2d_2a_3x3')(x)  # 147x147x32
    x = conv(64, (3, 3), (1, 1), _pad(1, 1), 'Conv2d_2b_3x3')(x)  # 147x147x64
    x = nn.max_pool(x, (3, 3), strides=(2, 2))  # 73x73x64
    x = conv(80, (1, 1), (1, 1), _pad(0, 0), 'Conv2d_3b_1x1')(x)  # 73x73x80
    x = conv(192, (3, 3), (1, 1), _pad(0, 0), 'Conv2d_4a_3x3')(x)  # 71x71x192
    x = nn.max_pool(x, (3, 3), strides=(2, 2))  # 35x35x192
    x = FIDInceptionA(32, p, name='Mixed_5b')(x)  # 35x35x256
    x = FIDInceptionA(64, p, name='Mixed_5c')(x)  # 35x35x288
    x = FIDInceptionA(64, p, name='Mixed_5d')(x)  # 35x35x288
    x = InceptionB(p, name='Mixed_6a')(x)  # 17x17x768
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = FIDInceptionC(c7, p, name=name)(x)  # 17x17x768
    x = InceptionD(p, name='Mixed_7a')(x)  # 8x8x1280
    x = FIDInceptionE('avg', p, name='Mixed_7b')(x)  # 8x8x2048
    x = FIDInceptionE('max', p, name='Mixed_7c')(x)  # 8x8x2048
    pool = jnp.mean(x, axis=(1, 2))  # [B, 2048]
    logits_unbiased, logits = _Classifier(NUM_LOGITS, p, name='fc')(pool)
    return {'pool': pool, 'logits': logits, 'logits_unbiased': logits_unbiased}


def make_feature_fn(variables: dict, *, resize_input: bool = True,
                    precision: jax.lax.Precision = jax.lax.Precision.HIGHEST):
  """A jitted ``fn(images [B, H, W, 3] in [-1, 1]) -> {'pool', 'logits', 'logits_unbiased'}`` closing over
  ``variables`` (``{'params': ..., 'batch_stats': ...}``, e.g. ``inception_weights.load_inception_variables``)."""
  variables = jax.device_put(variables)  # once, not on every call
  apply_fn = jax.jit(FIDInceptionV3(resize_input=resize_input, precision=precision).apply)
  return lambda images: apply_fn(variables, images)

