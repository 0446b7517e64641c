"""The U-Net's building blocks (:mod:`diffax.models.unet` assembles them): resampling over the spatial axes of
1-D, 2-D or 3-D inputs, the ResBlock (with AdaGN and BigGAN up / down sampling), self-attention, the temporal
convolution of video U-Nets and Stable Diffusion's cross-attention transformer.

Mixed precision and initialisation follow :mod:`diffax.models.unet`: float32 parameters, compute in ``dtype``,
norms and softmax in float32, zero-initialised last layers of every residual branch.
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax.models import layers

Array = jax.Array
Dtype = layers.Dtype

default_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform')
"""DDPM / score-SDE kernel initializer (``default_init(scale=1.)`` in both code bases)."""


def resampled_axes(spatial_dims: int) -> tuple[int, ...]:
  """Axes of [B, *S, C] that the U-Net halves per level: all of them for sequences and images, H and W for clips
  [B, T, H, W, C] (Video Diffusion Models keep the frame count at every level, Ho et al. 2022, sec. 3)."""
  if spatial_dims not in (1, 2, 3):
    raise ValueError(f'spatial_dims must be 1 (sequences), 2 (images) or 3 (clips), got {spatial_dims}.')
  return (2, 3) if spatial_dims == 3 else tuple(range(1, spatial_dims + 1))


def upsample_nearest(x: Array, axes: Sequence[int] = (1, 2)) -> Array:
  """Nearest-neighbour repetition by 2 along ``axes``: [B, H, W, C] -> [B, 2H, 2W, C] by default."""
  for axis in axes:
    x = jnp.repeat(x, 2, axis=axis)
  return x


def downsample_avg(x: Array, axes: Sequence[int] = (1, 2)) -> Array:
  """Average pooling by 2 along ``axes``: [B, H, W, C] -> [B, H/2, W/2, C] by default (ADM's ``avg_pool_nd``,
  score-SDE's naive filter)."""
  shape = []
  for axis, size in enumerate(x.shape):
    shape += [size // 2, 2] if axis in axes else [size]
  pooled = tuple(axis + i + 1 for i, axis in enumerate(sorted(axes)))  # the new length-2 axes
  return x.reshape(shape).mean(axis=pooled)


def resample_2x(x: Array, kind: str, axes: Sequence[int] = (1, 2)) -> Array:
  """Parameter-free resampling by 2 along ``axes``: ``kind`` is ``'up'``, ``'down'`` or ``'none'`` (identity)."""
  if kind == 'up':
    return upsample_nearest(x, axes)
  if kind == 'down':
    return downsample_avg(x, axes)
  return x


def conv_kernel(spatial_dims: int, k: int) -> tuple[int, ...]:
  """Kernel of a U-Net convolution: ``(k,)``, ``(k, k)``, or space-only ``(1, k, k)`` for clips (VDM, sec. 3:
  "each 3x3 convolution becomes a 1x3x3 convolution")."""
  return (1, k, k) if spatial_dims == 3 else (k,) * spatial_dims


class TemporalConv(nn.Module):
  """Residual temporal convolution of a clip: ``x + conv_t(x)`` with a zero-initialised (3, 1, 1) kernel.

  The factorised (2+1)-D convolution of Imagen Video (Ho et al. 2022b, sec. 2.3) and Make-A-Video (Singer et
  al. 2022, sec. 3.2): a space-only convolution followed by one over frames, which starts as the identity.

  Call: ``x`` [B, T, H, W, C] -> [B, T, H, W, C].
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return x + layers.conv(x.shape[-1], (3, 1, 1), dtype=self.dtype, kernel_init=layers.zeros, name='conv')(x)


def layer_norm(x: Array, *, name: str) -> Array:
  """LayerNorm over the last axis in float32 (scale and bias named ``('norm',)``) -> float32."""
  return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                      scale_init=layers.partitioned(nn.initializers.ones, ('norm',)),
                      bias_init=layers.partitioned(layers.zeros, ('norm',)), name=name)(x.astype(jnp.float32))


class ResBlock(nn.Module):
  """Residual block conditioned on the embedding ``emb`` (DDPM's ``resnet_block``, ADM's ``ResBlock``).

  ``h = conv_0(SiLU(GN(x)))``, ``h = conv_1(dropout(SiLU(GN(h + proj(emb)))))``, ``out = skip(x) + h``, with:

  * ``scale_shift_norm`` (ADM, "AdaGN"): ``GN(h) (1 + s) + b`` with ``(s, b) = proj(emb)`` instead of adding
    ``proj(emb)`` before the norm (Dhariwal & Nichol 2021, sec. 3).
  * ``resample`` ``'up'`` / ``'down'`` (BigGAN-style, Brock et al. 2019): both paths are resampled without
    parameters after the first norm (nearest / 2x2 average).
  * ``skip``: identity when channels match, else a 1x1 conv; ``resample_skip_conv`` also projects whenever the
    block resamples (score-SDE's ``ResnetBlockBigGANpp``; ADM keeps the identity).
  * ``skip_rescale``: ``out / sqrt(2)`` (DDPM++ / NCSN++, Song et al. 2021, app. H).

  ``spatial_dims`` 1 / 2 / 3 takes sequences [B, L, C], images or clips [B, T, H, W, C] (space-only 1x3x3
  convolutions, frames never resampled; ``temporal_conv`` follows each with a :class:`TemporalConv`).

  Call: ``x`` [B, H, W, C_in], ``emb`` [B, E], ``train`` (dropout) -> [B, H', W', out_ch] in ``dtype``.
  """
  out_ch: int
  dropout: float = 0.0
  num_groups: int = 32
  scale_shift_norm: bool = False
  skip_rescale: bool = False
  resample: str = 'none'
  resample_skip_conv: bool = False
  spatial_dims: int = 2
  temporal_conv: bool = False
  dtype: Dtype = jnp.float32

  def _conv(self, h: Array, kernel_init, name: str) -> Array:
    h = layers.conv(self.out_ch, conv_kernel(self.spatial_dims, 3), dtype=self.dtype, kernel_init=kernel_init,
                    name=name)(h)
    return TemporalConv(self.dtype, name=f'{name}_temporal')(h) if self.temporal_conv else h

  @nn.compact
  def __call__(self, x: Array, emb: Array, train: bool = False) -> Array:
    axes = resampled_axes(self.spatial_dims)
    h = nn.silu(layers.group_norm(self.num_groups, name='norm_0')(x))
    h, x = resample_2x(h, self.resample, axes), resample_2x(x, self.resample, axes)
    h = self._conv(h, default_init, 'conv_0')
    emb_width = 2 * self.out_ch if self.scale_shift_norm else self.out_ch
    emb_out = layers.dense(emb_width, ('embed', 'conv_out'), dtype=self.dtype, kernel_init=default_init,
                           name='emb_proj')(nn.silu(emb))
    emb_out = emb_out.reshape(emb_out.shape[:1] + (1,) * self.spatial_dims + emb_out.shape[1:])  # [B, 1.., emb]
    if self.scale_shift_norm:
      scale, shift = jnp.split(emb_out.astype(jnp.float32), 2, axis=-1)
      h = layers.group_norm(self.num_groups, name='norm_1')(h) * (1.0 + scale) + shift
    else:
      h = layers.group_norm(self.num_groups, name='norm_1')(h + emb_out)
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=not train)
    h = self._conv(h, layers.zeros, 'conv_1')
    if x.shape[-1] != self.out_ch or (self.resample != 'none' and self.resample_skip_conv):
      x = layers.conv(self.out_ch, (1,) * self.spatial_dims, dtype=self.dtype, kernel_init=default_init,
                      name='skip')(x)
    out = x + h
    return out * (1.0 / math.sqrt(2.0)) if self.skip_rescale else out


class AttnBlock(nn.Module):
  """Multi-head self-attention over all pixels (DDPM's ``attn_block``, ADM's ``AttentionBlock``).

  ``out = x + proj_out(attention(GN(x)))`` with ``proj_out`` zero-initialised; ``num_heads=1`` is DDPM's
  single-head attention with scale ``C^-1/2``. ``skip_rescale`` divides by sqrt(2) (score-SDE's ``AttnBlockpp``).

  ``axis`` picks the tokens of a clip [B, T, H, W, C], as in Video Diffusion Models' factorised space-time
  attention (Ho et al. 2022, sec. 3): ``'space'`` attends over the H*W pixels of each frame, ``'time'`` over the T
  frames at each pixel, with a learned :class:`~diffax.models.layers.RelativePositionBias` between frames.
  Sequences [B, L, C] and images attend over all positions (``'space'``).

  Call: ``x`` [B, H, W, C] (or [B, L, C], [B, T, H, W, C]) -> the same shape.
  """
  num_heads: int = 1
  num_groups: int = 32
  skip_rescale: bool = False
  axis: str = 'space'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    h = layers.group_norm(self.num_groups, name='norm')(x)  # statistics over the whole example (clip)
    bias = None
    if self.axis == 'time':
      h = jnp.moveaxis(h, 1, -2)  # [B, T, H, W, C] -> [B, H, W, T, C]
      bias = layers.RelativePositionBias(self.num_heads, name='relative_position')(x.shape[1])
    elif self.axis != 'space':
      raise ValueError(f"Unknown attention axis {self.axis!r}; choose 'space' or 'time'.")
    moved = h.shape
    tokens = moved[-2] if self.axis == 'time' else math.prod(moved[2:-1] if x.ndim == 5 else moved[1:-1])
    h = layers.Attention(self.num_heads, c // self.num_heads, dtype=self.dtype, out_kernel_init=layers.zeros,
                         name='attn')(h.reshape(-1, tokens, c), bias=bias).reshape(moved)
    out = x + (jnp.moveaxis(h, -2, 1) if self.axis == 'time' else h)
    return out * (1.0 / math.sqrt(2.0)) if self.skip_rescale else out


class TransformerBlock(nn.Module):
  """Pre-norm transformer layer with cross-attention (Stable Diffusion's ``BasicTransformerBlock``).

  ``x += self_attn(LN(x))``; ``x += cross_attn(LN(x), context)``; ``x += W_2 (a * GELU(g))`` with
  ``[a, g] = W_1 LN(x)`` (GEGLU, Shazeer 2020; hidden width 4 D).

  Call: ``x`` [B, L, D], ``context`` [B, S, D_c] -> [B, L, D].
  """
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array) -> Array:
    d = x.shape[-1]
    head_dim = d // self.num_heads
    x = x + layers.Attention(self.num_heads, head_dim, dtype=self.dtype, name='self_attn')(layer_norm(x, name='norm_0'))
    x = x + layers.Attention(self.num_heads, head_dim, dtype=self.dtype, name='cross_attn')(
        layer_norm(x, name='norm_1'), context)
    h = layers.dense(8 * d, ('embed', 'mlp'), dtype=self.dtype, kernel_init=default_init,
                     name='ff_in')(layer_norm(x, name='norm_2'))  # [B, L, 2 * 4D]
    a, gate = jnp.split(h, 2, axis=-1)
    h = a * nn.gelu(gate, approximate=False)
    return x + layers.dense(d, ('mlp', 'embed'), dtype=self.dtype, kernel_init=default_init, name='ff_out')(h)


class SpatialTransformer(nn.Module):
  """Image-to-context cross-attention block (Rombach et al. 2022, Stable Diffusion's ``SpatialTransformer``).

  ``out = x + proj_out(blocks(proj_in(GN(x)), context))``: 1x1 projections around ``depth``
  :class:`TransformerBlock` layers over the H*W pixels; ``proj_out`` is zero-initialised.

  Sequences [B, L, C] attend over their L positions; clips [B, T, H, W, C] over the H*W pixels of each frame
  (the context repeated per frame).

  Call: ``x`` [B, H, W, C], ``context`` [B, S, D_c] -> [B, H, W, C].
  """
  num_heads: int = 8
  depth: int = 1
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array) -> Array:
    c, ones = x.shape[-1], (1,) * (x.ndim - 2)
    h = layers.group_norm(self.num_groups, name='norm')(x)
    h = layers.conv(c, ones, dtype=self.dtype, kernel_init=default_init, name='proj_in')(h)
    if x.ndim == 5:  # one sequence per frame
      context = jnp.repeat(context, x.shape[1], axis=0)
    h = h.reshape(context.shape[0], -1, c)
    for i in range(self.depth):
      h = TransformerBlock(self.num_heads, dtype=self.dtype, name=f'block_{i}')(h, context)
    h = layers.conv(c, ones, dtype=self.dtype, kernel_init=layers.zeros, name='proj_out')(h.reshape(x.shape))
    return x + h
