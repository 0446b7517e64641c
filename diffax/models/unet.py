"""The diffusion U-Net family: DDPM, DDPM++ (score-SDE), ADM and Stable Diffusion's cross-attention U-Net.

One encoder-decoder (Ronneberger et al. 2015; PixelCNN++ / Wide-ResNet blocks as in Ho et al. 2020, app. B):

  conv_in -> per level l (resolution H / 2^l, width ch * ch_mult[l]): num_res_blocks x [ResBlock, attention at
  attn_resolutions], then downsample -> middle: ResBlock, attention, ResBlock -> per level in reverse:
  (num_res_blocks + 1) x [ResBlock on concat(h, skip), attention], then upsample -> GN, SiLU, conv_out.

The noise input ``t`` is embedded (sinusoidal or Fourier, :class:`~diffax.models.layers.NoiseEmbedding`) and
mapped by a two-layer MLP to width 4 ch; class labels add a learned embedding with a null row for classifier-free
guidance (Ho & Salimans 2022); every ResBlock receives the sum. How each paper maps to the flags:

* DDPM (Ho et al. 2020): the defaults; strided-conv down / nearest + conv up sampling, single-head attention.
* DDPM++ (Song et al. 2021, app. H): ``resblock_updown`` with ``resample_skip_conv`` (BigGAN blocks whose skip
  path is a 1x1 conv), ``skip_rescale`` (1/sqrt(2)), ``up_attn_last_only`` (one attention per decoder level).
  NCSN++ adds FIR resampling and progressive input/output pyramids, which are not implemented here; its
  ``noise_embedding='fourier'`` (2 ch Gaussian Fourier features, e.g. of log sigma) is.
* ADM (Dhariwal & Nichol 2021): ``num_head_channels``, ``resblock_updown``, ``scale_shift_norm`` (AdaGN),
  ``learn_sigma`` (output [..., 2C]: mean prediction then the variance interpolation ``v``), ``num_classes``.
* Stable Diffusion (Rombach et al. 2022): ``context_dim`` swaps every attention block for a
  :class:`~diffax.models.unet_blocks.SpatialTransformer` of ``transformer_depth`` layers with ``context_heads``
  heads that also cross-attend to the context [B, L, context_dim] (e.g. CLIP's 768-d text tokens, 8 heads).

Mixed precision: parameters float32, convolutions and matmuls in ``dtype``, norms and the attention softmax in
float32, output float32. Every parameter carries logical axis names (:data:`diffax.models.layers.AXES`).

All blocks are NHWC and keep the residual stream in ``dtype``. The last layer of every residual branch and the
output conv are zero-initialised, so a fresh block is the identity on its skip path and a fresh network outputs
zero (ADM's ``zero_module``; DDPM / score-SDE's ``init_scale=0.``, i.e. variance scale 1e-10). Other kernels use
DDPM / score-SDE's ``default_init``: variance scaling 1, fan-average, uniform (ADM keeps PyTorch's default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax.models import layers
from diffax.models.unet_blocks import (AttnBlock, ResBlock, SpatialTransformer, conv_kernel, default_init,
                                       resampled_axes, upsample_nearest)

Array = jax.Array


UNET_PRESETS: dict[str, dict[str, Any]] = {
    # Ho et al. 2020, app. B: "Our CIFAR10 model has 35.7 million parameters". 32x32 input.
    'ddpm_cifar10': dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1),
    # Song et al. 2021, "DDPM++ cont. (VP)", configs/vp/cifar10_ddpmpp_continuous.py of yang-song/score_sde
    # (nf 128, ch_mult (1, 2, 2, 2), 4 res blocks, attention at 16, biggan blocks, skip_rescale, positional
    # embedding of 999 t). Published size: 61.8 M in Karras et al. 2022 (EDM), table 7, config A (VP, CIFAR-10);
    # EDM app. F.4 counts its 6 self-attention layers (ADM: 22). 32x32 input.
    'ddpmpp_cifar10': dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,), dropout=0.1,
                           resblock_updown=True, resample_skip_conv=True, up_attn_last_only=True, skip_rescale=True,
                           t_scale=999.0),
    # Dhariwal & Nichol 2021, class-conditional ImageNet 64x64 (openai/guided-diffusion flags: num_channels 192,
    # channel_mult (1, 2, 3, 4), num_res_blocks 3, attention_resolutions 32,16,8, num_head_channels 64,
    # resblock_updown, use_scale_shift_norm, learn_sigma, dropout 0.1). Published size: 295.9 M in Karras et al.
    # 2024 (EDM2), fig. 16, config A (also "~296 M trainable parameters", EDM app. F.4), with 22 attention
    # blocks. 64x64 input.
    'adm_imagenet64': dict(ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3, attn_resolutions=(32, 16, 8),
                           num_head_channels=64, dropout=0.1, resblock_updown=True, scale_shift_norm=True,
                           num_classes=1000, learn_sigma=True),
    # CPU test model for 8x8 (or 16x16) inputs: 0.18 M parameters, attention at 4x4.
    'unet_tiny': dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_heads=2, num_groups=4),
    # CPU-trainable default for 8x8 to 32x32 inputs (e.g. digits) in the ADM style: 1.9 M parameters.
    'unet_small': dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,), num_head_channels=32,
                       dropout=0.1, num_groups=8, resblock_updown=True, scale_shift_norm=True),
    # CPU test / training models for waveforms [B, L, C] (L = 64 .. 1024; attention at length 16): 0.13 M ...
    'unet1d_tiny': dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,), num_heads=2,
                        num_groups=4, spatial_dims=1),
    # ... and for clips [B, T, H, W, C] (e.g. 8-16 frames of 16x16 or 32x32; factorised attention at 8x8, temporal
    # convolutions): 0.23 M.
    'unet3d_tiny': dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_heads=2, num_groups=4,
                        spatial_dims=3, temporal_conv=True),
}
"""Named :class:`UNet` keyword arguments; each comment gives the published parameter count and its source."""


class UNet(nn.Module):
  """Diffusion U-Net (module docstring); ``apply({'params': p}, x, t, cond, train=...)``.

  Attributes:
    ch: base width; level ``l`` has ``ch * ch_mult[l]`` channels, the embedding ``4 ch``.
    ch_mult: width multiplier per resolution level (one downsampling between consecutive levels).
    num_res_blocks: ResBlocks per encoder level (the decoder has one more per level).
    attn_resolutions: resolutions in pixels (e.g. ``(16,)``) whose blocks are followed by attention.
    num_heads: attention heads, unless ``num_head_channels`` fixes the width per head instead (ADM).
    num_head_channels: channels per attention head (heads = width // num_head_channels).
    dropout: dropout rate inside ResBlocks (active only with ``train=True``; rng stream ``'dropout'``).
    num_groups: GroupNorm groups (must divide every width).
    resblock_updown: resample with BigGAN-style ResBlocks instead of strided conv / nearest + conv.
    resample_skip_conv: give resampling ResBlocks a 1x1 conv skip even at equal widths (score-SDE).
    up_attn_last_only: one attention per decoder level after its last ResBlock (score-SDE's NCSN++ / DDPM++).
    scale_shift_norm: AdaGN conditioning in ResBlocks (ADM).
    skip_rescale: divide residual sums by sqrt(2) (DDPM++ / NCSN++).
    noise_embedding: ``'sinusoidal'`` (discrete / scaled t) or ``'fourier'`` (continuous sigma / log-SNR).
    t_scale: the embedding sees ``t_scale * t`` (1000 maps t in [0, 1] to DDPM's step range; 1 for EDM).
    fourier_scale: standard deviation of the Fourier frequencies (NCSN++: 16).
    num_classes: class-conditional with labels in ``[0, num_classes]``; ``num_classes`` is the null label.
    context_dim: width of a cross-attention context [B, L, context_dim] (Stable Diffusion's text path).
    context_heads: heads of the spatial transformers (SD v1: 8).
    transformer_depth: transformer layers per spatial transformer.
    learn_sigma: double the output channels (ADM / improved DDPM's learned variance), channels-last.
    out_channels: output channels before ``learn_sigma`` doubling (default: input channels).
    spatial_dims: rank of the data: 1 for sequences [B, L, C] (audio), 2 for images [B, H, W, C], 3 for clips
      [B, T, H, W, C] (Video Diffusion Models, Ho et al. 2022: space-only 1x3x3 convolutions, H and W resampled
      and T kept, every attention a spatial one followed by a temporal one). ``attn_resolutions`` count L, or H.
    temporal_conv: (clips) a zero-initialised temporal (3, 1, 1) convolution after every space-only convolution
      of the ResBlocks ((2+1)-D convolutions of Imagen Video, sec. 2.3).
    frame_conditioning: (clips) ``cond`` is ``{'frames': [B, T, H, W, C], 'mask': [B, T]}`` (plus ``'labels'``
      [B] with ``num_classes``): the known frames (mask 1) and the mask enter as extra input channels, so one
      model predicts future frames, interpolates between given ones, or generates from none (mask 0; the
      condition dropout of the losses zeroes both) - the masked conditioning of MCVD (Voleti et al. 2022).
    dtype: compute dtype of convolutions and matmuls (``jnp.float32``, ``jnp.bfloat16`` or its name).
    remat: rematerialisation policy per ResBlock / attention block (``'none'`` or a key of
      :data:`diffax.models.layers.REMAT_POLICIES`).
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  num_heads: int = 1
  num_head_channels: int | None = None
  dropout: float = 0.0
  num_groups: int = 32
  resblock_updown: bool = False
  resample_skip_conv: bool = False
  up_attn_last_only: bool = False
  scale_shift_norm: bool = False
  skip_rescale: bool = False
  noise_embedding: str = 'sinusoidal'
  t_scale: float = 1000.0
  fourier_scale: float = 16.0
  num_classes: int | None = None
  context_dim: int | None = None
  context_heads: int = 8
  transformer_depth: int = 1
  learn_sigma: bool = False
  out_channels: int | None = None
  spatial_dims: int = 2
  temporal_conv: bool = False
  frame_conditioning: bool = False
  dtype: Any = jnp.float32
  remat: str = 'none'

  def _heads(self, width: int) -> int:
    if self.num_head_channels is None:
      heads = self.num_heads
    elif width % self.num_head_channels:
      raise ValueError(f'num_head_channels={self.num_head_channels} does not divide the width {width}.')
    else:
      heads = width // self.num_head_channels
    if width % heads:
      raise ValueError(f'num_heads={heads} does not divide the width {width}.')
    return heads

  def _split_cond(self, x: Array, cond: Any) -> tuple[Array | None, Array | None]:
    """(labels or context, frames and mask as [B, T, H, W, C + 1] input channels or None) of ``cond``."""
    if not self.frame_conditioning:
      return cond, None
    if self.spatial_dims != 3:
      raise ValueError(f'frame_conditioning needs clips (spatial_dims=3), got spatial_dims={self.spatial_dims}.')
    if not isinstance(cond, dict) or 'frames' not in cond or 'mask' not in cond:
      keys = sorted(cond) if isinstance(cond, dict) else type(cond).__name__
      raise ValueError("frame_conditioning is set: pass cond={'frames': [B, T, H, W, C], 'mask': [B, T]} (and "
                       f"'labels' with num_classes); got {keys}.")
    frames, mask = cond['frames'], cond['mask']
    if frames.shape != x.shape or mask.shape != x.shape[:2]:
      raise ValueError(f"cond['frames'] must be {x.shape} and cond['mask'] {x.shape[:2]} (x's [B, T, H, W, C]); "
                       f'got {frames.shape} and {mask.shape}.')
    mask = jnp.asarray(mask, jnp.float32)[:, :, None, None, None] * jnp.ones_like(x[..., :1])  # [B, T, H, W, 1]
    return cond.get('labels'), jnp.concatenate([frames * mask, mask], axis=-1).astype(x.dtype)

  def _check_inputs(self, x: Array, t: Array, cond: Array | None) -> None:
    axes = resampled_axes(self.spatial_dims)
    if x.ndim != self.spatial_dims + 2 or t.shape != x.shape[:1]:
      expected = {1: '[B, L, C]', 2: '[B, H, W, C]', 3: '[B, T, H, W, C]'}[self.spatial_dims]
      raise ValueError(f'Expected x {expected} (spatial_dims={self.spatial_dims}) and t [B]; got x {x.shape} and '
                       f't {t.shape}.')
    factor = 2 ** (len(self.ch_mult) - 1)
    if any(x.shape[a] % factor for a in axes):
      raise ValueError(f'The resampled sizes {tuple(x.shape[a] for a in axes)} must be divisible by '
                       f'2^(len(ch_mult) - 1) = {factor}.')
    if self.temporal_conv and self.spatial_dims != 3:
      raise ValueError(f'temporal_conv needs clips (spatial_dims=3), got spatial_dims={self.spatial_dims}.')
    if self.num_classes is not None and self.context_dim is not None:
      raise ValueError('Set num_classes (labels) or context_dim (cross-attention), not both.')
    if self.num_classes is not None and (cond is None or cond.shape != x.shape[:1]):
      raise ValueError(f'num_classes is set: pass labels [B] in [0, {self.num_classes}] ({self.num_classes} is the '
                       f'null label); got {None if cond is None else cond.shape}.')
    if self.context_dim is not None and (cond is None or cond.ndim != 3 or cond.shape[-1] != self.context_dim
                                         or cond.shape[0] != x.shape[0]):
      raise ValueError(f'context_dim is set: pass a context [B, L, {self.context_dim}]; '
                       f'got {None if cond is None else cond.shape}.')
    if self.num_classes is None and self.context_dim is None and cond is not None:
      raise ValueError('cond was given but neither num_classes nor context_dim is set.')

  @nn.compact
  def __call__(self, x: Array, t: Array, cond: Array | None = None, *, train: bool = False, hint: Array | None = None,
               residuals: Sequence[Array] | None = None, encoder_only: bool = False) -> Array | list[Array]:
    """Network output for ``x`` [B, H, W, C] at noise input ``t`` [B] -> [B, H, W, C_out] float32.

    ``cond``: labels [B] int (``num_classes`` set), a context [B, L, context_dim] (``context_dim`` set), or None;
    with ``frame_conditioning`` a dict of ``'frames'``, ``'mask'`` and those. ``C_out`` is ``out_channels``
    (default C), doubled by ``learn_sigma``. Sequences [B, L, C] and clips [B, T, H, W, C] with ``spatial_dims``.

    ControlNet hooks (:mod:`diffax.models.controlnet`; Zhang et al. 2023): ``hint`` [B, H, W, ch * ch_mult[0]]
    is added after ``conv_in``; ``encoder_only`` returns the encoder's skip features and the middle block's
    output (a list, nothing of the decoder is built); ``residuals`` (as many, same shapes) are added to them
    before the decoder reads them (diffusers' down / mid block additional residuals).
    """
    t = jnp.asarray(t, jnp.float32)
    cond, frame_inputs = self._split_cond(x, cond)
    self._check_inputs(x, t, cond)
    dtype = jnp.dtype(self.dtype)
    axes = resampled_axes(self.spatial_dims)
    res_block = layers.maybe_remat(ResBlock, self.remat, static_argnums=(3,))
    attn_block = layers.maybe_remat(AttnBlock, self.remat)
    transformer = layers.maybe_remat(SpatialTransformer, self.remat)
    emb_dim = 4 * self.ch

    features = self.ch * (2 if self.noise_embedding == 'fourier' else 1)  # NCSN++ / DDPM (score-SDE, EDM alike)
    emb = layers.NoiseEmbedding(emb_dim, features, kind=self.noise_embedding, t_scale=self.t_scale,
                                fourier_scale=self.fourier_scale, dtype=dtype, name='time_embed')(t)  # [B, 4ch]
    if self.num_classes is not None:
      emb = emb + layers.LabelEmbedding(self.num_classes, emb_dim, name='label_embed')(cond).astype(emb.dtype)
    context = cond if self.context_dim is not None else None

    def block(name: str, h: Array, width: int, kind: str = 'none') -> Array:
      return res_block(width, dropout=self.dropout, num_groups=self.num_groups,
                       scale_shift_norm=self.scale_shift_norm, skip_rescale=self.skip_rescale, resample=kind,
                       resample_skip_conv=self.resample_skip_conv, spatial_dims=self.spatial_dims,
                       temporal_conv=self.temporal_conv, dtype=dtype, name=name)(h, emb, train)

    def attention(name: str, h: Array) -> Array:
      if context is None:
        h = attn_block(self._heads(h.shape[-1]), num_groups=self.num_groups, skip_rescale=self.skip_rescale,
                       dtype=dtype, name=name)(h)
      elif h.shape[-1] % self.context_heads:
        raise ValueError(f'context_heads={self.context_heads} does not divide the width {h.shape[-1]}.')
      else:
        h = transformer(self.context_heads, depth=self.transformer_depth, num_groups=self.num_groups, dtype=dtype,
                        name=name)(h, context)
      if self.spatial_dims == 3:  # factorised space-time attention (VDM): then over the frames at each pixel
        h = attn_block(self._heads(h.shape[-1]), num_groups=self.num_groups, skip_rescale=self.skip_rescale,
                       axis='time', dtype=dtype, name=f'{name}_temporal')(h)
      return h

    def conv(name: str, h: Array, width: int, *, strides: Sequence[int] | int = 1, kernel_init=default_init):
      return layers.conv(width, conv_kernel(self.spatial_dims, 3), strides=strides, dtype=dtype,
                         kernel_init=kernel_init, name=name)(h)

    levels = len(self.ch_mult)
    x_in = x if frame_inputs is None else jnp.concatenate([x, frame_inputs], axis=-1)
    h = conv('conv_in', x_in, self.ch * self.ch_mult[0])
    if hint is not None:
      h = h + hint.astype(h.dtype)
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for i in range(self.num_res_blocks):
        h = block(f'down_{level}_block_{i}', h, self.ch * mult)
        if h.shape[axes[0]] in self.attn_resolutions:
          h = attention(f'down_{level}_attn_{i}', h)
        skips.append(h)
      if level != levels - 1:
        if self.resblock_updown:
          h = block(f'down_{level}_resample', h, h.shape[-1], 'down')
        else:
          strides = tuple(2 if a in axes else 1 for a in range(1, self.spatial_dims + 1))
          h = conv(f'down_{level}_resample', h, h.shape[-1], strides=strides)
        skips.append(h)

    h = block('mid_block_0', h, h.shape[-1])
    h = attention('mid_attn', h)
    h = block('mid_block_1', h, h.shape[-1])
    if encoder_only:
      return skips + [h]
    if residuals is not None:
      if len(residuals) != len(skips) + 1:
        raise ValueError(f'residuals: expected {len(skips) + 1} (one per encoder skip and the middle block), got '
                         f'{len(residuals)}.')
      skips = [s + r.astype(s.dtype) for s, r in zip(skips, residuals)]
      h = h + residuals[-1].astype(h.dtype)

    for level in reversed(range(levels)):
      width = self.ch * self.ch_mult[level]
      at_attn = h.shape[axes[0]] in self.attn_resolutions
      for i in range(self.num_res_blocks + 1):
        h = block(f'up_{level}_block_{i}', jnp.concatenate([h, skips.pop()], axis=-1), width)
        if at_attn and (not self.up_attn_last_only or i == self.num_res_blocks):
          h = attention(f'up_{level}_attn_{i}', h)
      if level != 0:
        if self.resblock_updown:
          h = block(f'up_{level}_resample', h, width, 'up')
        else:
          h = conv(f'up_{level}_resample', upsample_nearest(h, axes), width)

    h = nn.silu(layers.group_norm(self.num_groups, name='norm_out')(h))
    out_channels = (self.out_channels or x.shape[-1]) * (2 if self.learn_sigma else 1)
    h = conv('conv_out', h, out_channels, kernel_init=layers.zeros)
    return h.astype(jnp.float32)
