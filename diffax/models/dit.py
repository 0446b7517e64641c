"""Diffusion Transformer (DiT; Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", arXiv:2212.09748).

The image [B, H, W, C] is cut into p x p patches (a convolution with kernel = stride = p), each patch becomes a token
of width D, a fixed 2-D sin-cos position embedding is added, ``depth`` adaLN-Zero blocks (sec. 3.2, Fig. 3)
process the T = HW / p^2 tokens, and a final adaLN layer maps every token back to p x p x C_out pixels:

  c = t_emb + y_emb                                                  (noise-level and class embeddings)
  shift_1, scale_1, gate_1, shift_2, scale_2, gate_2 = Linear(SiLU(c))          (adaLN-Zero modulation)
  x = x + gate_1 * Attention(LN(x) * (1 + scale_1) + shift_1)
  x = x + gate_2 * MLP(LN(x) * (1 + scale_2) + shift_2)

with LN a LayerNorm without affine parameters. The modulation and the final layer start at zero, so every block
starts as the identity and the freshly initialised model outputs exactly zero; the other initialisers follow the
reference code (facebookresearch/DiT, ``models.py``): Xavier-uniform linears, the patch embedding initialised like
the linear map it is, label table and noise-level MLP N(0, 0.02^2).

The same definition takes sequences and clips (``spatial_dims``): a waveform [B, L, C] becomes L / p tokens of
p samples with a 1-D sin-cos embedding; a clip [B, T, H, W, C] becomes (T / p_t)(H / p)(W / p) space-time
patches ("tubelets" of p_t x p x p, ViViT, Arnab et al. 2021, sec. 3.2) whose embedding is the 2-D one of their
pixel position plus a 1-D one of their frame (Latte, Ma et al. 2024, sec. 3). Clips attend jointly over all
tokens (space-time patches as in Sora's technical report) or, with ``attention='factorized'``, alternately
within each frame and across frames at each position (Latte's interleaved variant 1; same parameters).

Text (``context_dim``; PixArt-alpha, Chen et al. 2024, sec. 2.3 and Fig. 4): every block gains a cross-attention
from the tokens to a context [B, S, D_c] (text-encoder states) between its self-attention and its MLP,

  x = x + CrossAttention(x, y),      y = MLP(context) [B, S, D]     (PixArt's caption projection: Linear-GELU-Linear)

without modulation or gate, while adaLN still takes the noise level (and the label, if any). The cross-attention
output projection starts at zero (PixArt's ``initialize_weights``), so a freshly initialised text DiT computes
exactly what the same weights compute without the cross-attention: the context starts to matter as it learns.
A padding mask (``cond = {'context': [B, S, D_c], 'mask': [B, S] bool}``) removes masked tokens from the keys;
an example whose mask is all False gets no cross-attention update.

Mixed precision: parameters are float32, matmuls (and the patch convolution) run in ``dtype``; the residual
stream, the LayerNorms, the modulation arithmetic and the attention softmax stay in float32; the output is float32.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffax.models import layers

Array = jax.Array

xavier_uniform = nn.initializers.xavier_uniform()
qkv_init = nn.initializers.variance_scaling(0.5, 'fan_avg', 'uniform')
"""The reference's Xavier-uniform over its fused [D, 3D] qkv matrix, U(+-sqrt(6 / 4D)), on each [D, D] part."""


def patch_embed_init(spatial_dims: int = 2):
  """Xavier-uniform over the kernel [p, p, C, D] seen as the linear map [p p C, D] it is (the reference's init);
  [p, C, D] for sequences, [p_t, p, p, C, D] for clips."""
  return nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=tuple(range(spatial_dims + 1)),
                                          out_axis=spatial_dims + 1)


def sincos_pos_embed_1d(n: int, dim: int, *, max_period: float = 10_000.0) -> np.ndarray:
  """Fixed 1-D sin-cos embedding of positions 0 .. n-1 (MAE's ``get_1d_sincos_pos_embed_from_grid``).

  ``e(pos) = [sin(pos w_k), cos(pos w_k)]``, ``w_k = max_period^(-k / (dim / 2))``, k = 0 .. dim/2 - 1.

  Returns:
    [n, dim] float32 constant.
  """
  if dim % 2:
    raise ValueError(f'The 1-D sin-cos embedding needs an even width, got {dim}.')
  omega = max_period ** (-np.arange(dim // 2, dtype=np.float64) / (dim / 2))  # [dim/2]
  args = np.arange(n, dtype=np.float64)[:, None] * omega[None, :]
  return np.concatenate([np.sin(args), np.cos(args)], axis=1).astype(np.float32)


def sincos_pos_embed_2d(h: int, w: int, dim: int, *, max_period: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding of an h x w token grid (MAE / DiT ``get_2d_sincos_pos_embed``).

  Token ``(i, j)`` (row i, column j; row-major order) gets ``[e(j), e(i)]``, with the 1-D embedding
  ``e(pos) = [sin(pos w_k), cos(pos w_k)]``, ``w_k = max_period^(-k / (dim / 4))``, k = 0 .. dim/4 - 1: the first
  half of the channels encodes the column, the second half the row.

  Returns:
    [h * w, dim] float32 constant (not a parameter).
  """
  if dim % 4:
    raise ValueError(f'The 2-D sin-cos embedding needs a width divisible by 4, got {dim}.')
  omega = max_period ** (-np.arange(dim // 4, dtype=np.float64) / (dim / 4))  # [dim/4]
  rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing='ij')

  def embed_1d(pos):  # [h, w] -> [h * w, dim/2]
    args = pos.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)

  return np.concatenate([embed_1d(cols), embed_1d(rows)], axis=1).astype(np.float32)


def sincos_pos_embed(grid: tuple[int, ...], dim: int) -> np.ndarray:
  """Position embedding [prod(grid), dim] of a token grid in row-major order: 1-D for ``(n,)``, 2-D for
  ``(h, w)``, and for ``(t, h, w)`` the 2-D embedding of the pixel position plus the 1-D one of the frame."""
  if len(grid) == 1:
    return sincos_pos_embed_1d(grid[0], dim)
  if len(grid) == 2:
    return sincos_pos_embed_2d(*grid, dim)
  t, h, w = grid
  return (sincos_pos_embed_1d(t, dim)[:, None, :] + sincos_pos_embed_2d(h, w, dim)[None]).reshape(t * h * w, dim)


def layer_norm(x: Array) -> Array:
  """LayerNorm over the last axis without scale or bias (eps 1e-6), in float32."""
  return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=jnp.float32)(x.astype(jnp.float32))


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """``x * (1 + scale) + shift`` with x [B, T, D] and per-example shift, scale [B, D]."""
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


def context_bias(mask: Array | None) -> Array | None:
  """Attention logit bias [B, 1, 1, S] float32 from a key mask [B, S] bool (0 kept, -1e9 masked), or None."""
  if mask is None:
    return None
  return jnp.where(mask[:, None, None, :], 0.0, -1e9).astype(jnp.float32)


class DiTBlock(nn.Module):
  """One adaLN-Zero transformer block: x [B, T, D] float32, c [B, D] float32 -> [B, T, D] float32.

  With ``context`` [B, S, D] (already projected to D) it cross-attends to it after the self-attention (PixArt-alpha;
  ``context_mask`` [B, S] bool or None drops padding keys; examples with no kept key get no update).
  """
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, c: Array, context: Array | None = None, context_mask: Array | None = None) -> Array:
    width = x.shape[-1]
    modulation = layers.dense(6 * width, ('embed', 'mlp'), dtype=self.dtype, kernel_init=layers.zeros,
                              name='adaLN_modulation')(nn.silu(c)).astype(jnp.float32)  # [B, 6D]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=-1)

    h = modulate(layer_norm(x), shift_msa, scale_msa)
    h = layers.Attention(self.num_heads, dtype=self.dtype, kernel_init=qkv_init, out_kernel_init=xavier_uniform,
                         name='attn')(h)
    x = x + gate_msa[:, None, :] * h.astype(jnp.float32)

    if context is not None:
      h = layers.Attention(self.num_heads, dtype=self.dtype, kernel_init=xavier_uniform,
                           out_kernel_init=layers.zeros, name='cross_attn')(x, context, bias=context_bias(context_mask))
      if context_mask is not None:  # no key kept: the softmax is uniform over masked keys; drop that update
        h = h * jnp.any(context_mask, axis=-1)[:, None, None].astype(h.dtype)
      x = x + h.astype(jnp.float32)

    h = modulate(layer_norm(x), shift_mlp, scale_mlp)
    h = layers.dense(int(width * self.mlp_ratio), ('embed', 'mlp'), dtype=self.dtype, kernel_init=xavier_uniform,
                     name='mlp_in')(h)
    h = nn.gelu(h, approximate=True)
    h = layers.dense(width, ('mlp', 'embed'), dtype=self.dtype, kernel_init=xavier_uniform, name='mlp_out')(h)
    return x + gate_mlp[:, None, :] * h.astype(jnp.float32)


class DiT(nn.Module):
  """Diffusion Transformer backbone: x [B, H, W, C], t [B], cond (labels [B], a context, or None) -> [B, H, W, C_out].

  Attributes:
    patch_size: p; H and W must be multiples of it (T = HW / p^2 tokens); L for sequences.
    spatial_dims: 1 for sequences [B, L, C], 2 for images, 3 for clips [B, T, H, W, C] (module docstring).
    tubelet_size: (clips) frames per token, p_t; T must be a multiple of it.
    attention: (clips) ``'joint'`` over all space-time tokens or ``'factorized'`` (even blocks within a frame,
      odd blocks across frames).
    hidden_size: token width D (divisible by 4 for the 2-D position embedding and by ``num_heads``).
    depth: number of adaLN-Zero blocks.
    num_heads: attention heads.
    mlp_ratio: MLP hidden width / D.
    num_classes: class-conditional with labels 0 .. num_classes - 1 and the null label ``num_classes``
      (classifier-free guidance; the loss drops labels, the model only holds the extra row); None: unconditional.
    context_dim: width D_c of a cross-attention context (module docstring; PixArt-alpha): ``cond`` is then a
      context [B, S, D_c], or ``{'context': [B, S, D_c], 'mask': [B, S] bool}`` (with ``num_classes`` also
      ``'labels'`` [B]); None: no cross-attention (and no parameters for it).
    learn_sigma: also output the variance interpolation v (Nichol & Dhariwal 2021): C_out = 2 * out_channels,
      the first half the mean prediction.
    out_channels: channels of the prediction (default: the input's C).
    noise_embedding, t_scale, fourier_scale: the noise-level embedding (:class:`layers.NoiseEmbedding`), a 256-d
      frequency embedding of ``t_scale * t`` followed by a SiLU MLP to D.
    dtype: compute dtype of the matmuls (a jnp dtype or its name).
    remat: rematerialisation policy of every block (:data:`layers.REMAT_POLICIES`, or 'none').
  """
  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int | None = None
  context_dim: int | None = None
  learn_sigma: bool = False
  out_channels: int | None = None
  noise_embedding: str = 'sinusoidal'
  t_scale: float = 1000.0
  fourier_scale: float = 16.0
  spatial_dims: int = 2
  tubelet_size: int = 1
  attention: str = 'joint'
  dtype: Any = jnp.float32
  remat: str = 'none'

  def _split_cond(self, cond: Any) -> tuple[Array | None, Array | None, Array | None]:
    """(labels [B] or None, context [B, S, D_c] or None, mask [B, S] or None) of ``cond``."""
    if self.context_dim is None:
      if cond is not None and jnp.ndim(cond) != 1:
        raise ValueError(f'cond of shape {jnp.shape(cond)} needs context_dim (a context [B, S, D_c]); labels are [B].')
      return cond, None, None
    if isinstance(cond, dict):
      unknown = set(cond) - {'context', 'mask', 'labels'}
      if unknown or 'context' not in cond:
        raise ValueError(f"A context dict holds 'context' [B, S, D_c] and optionally 'mask' [B, S] and 'labels' [B]; "
                         f'got the keys {sorted(cond)}.')
      labels, context, mask = cond.get('labels'), cond['context'], cond.get('mask')
    else:
      labels, context, mask = None, cond, None
    if context is None or context.ndim != 3 or context.shape[-1] != self.context_dim:
      raise ValueError(f'context_dim={self.context_dim}: pass a context [B, S, {self.context_dim}]; got '
                       f'{None if context is None else context.shape}.')
    if mask is not None and mask.shape != context.shape[:2]:
      raise ValueError(f'The context mask must be [B, S] = {context.shape[:2]}, got {mask.shape}.')
    return labels, context, None if mask is None else mask.astype(bool)

  def _patch(self) -> tuple[int, ...]:
    p = self.patch_size
    if self.spatial_dims not in (1, 2, 3):
      raise ValueError(f'spatial_dims must be 1 (sequences), 2 (images) or 3 (clips), got {self.spatial_dims}.')
    return {1: (p,), 2: (p, p), 3: (self.tubelet_size, p, p)}[self.spatial_dims]

  @nn.compact
  def __call__(self, x: Array, t: Array, cond: Array | None = None, *, train: bool = False, hint: Array | None = None,
               residuals: Sequence[Array] | None = None, encoder_only: bool = False) -> Array | list[Array]:
    """Denoiser output for ``x`` [B, H, W, C] at noise input ``t`` [B]; ``train`` is unused (DiT has no dropout).

    ControlNet hooks (:mod:`diffax.models.controlnet`; PixArt-delta's copy of the first N blocks): ``hint``
    [B, T, D] is added to the tokens after the position embedding; ``encoder_only`` returns the output tokens of
    every block (a list of [B, T, D]) without the final layer; ``residuals`` (N <= depth of them) are added to the
    outputs of the first N blocks.
    """
    del train
    dtype = jnp.dtype(self.dtype)
    patch = self._patch()
    if x.ndim != self.spatial_dims + 2 or t.shape != x.shape[:1]:
      expected = {1: '[B, L, C]', 2: '[B, H, W, C]', 3: '[B, T, H, W, C]'}[self.spatial_dims]
      raise ValueError(f'Expected x {expected} (spatial_dims={self.spatial_dims}) and t [B]; got x {x.shape} and '
                       f't {t.shape}.')
    if self.attention not in ('joint', 'factorized') or (self.attention == 'factorized' and self.spatial_dims != 3):
      raise ValueError(f"attention={self.attention!r}: choose 'joint', or 'factorized' for clips (spatial_dims=3).")
    batch, *sizes, channels = x.shape
    if any(size % q for size, q in zip(sizes, patch)):
      raise ValueError(f'Input {"x".join(map(str, sizes))} is not a multiple of the patch size '
                       f'{"x".join(map(str, patch))} (model.patch_size, tubelet_size for frames).')
    labels, context, context_mask = self._split_cond(cond)
    if (labels is None) != (self.num_classes is None):
      raise ValueError(f'num_classes={self.num_classes} needs labels [B] (the null label is num_classes), an '
                       f"unconditional model no labels; got {'None' if labels is None else 'labels'}.")
    out_channels = (self.out_channels or channels) * (2 if self.learn_sigma else 1)
    grid = tuple(size // q for size, q in zip(sizes, patch))

    tokens = layers.conv(self.hidden_size, patch, strides=patch, dtype=dtype,
                         kernel_init=patch_embed_init(self.spatial_dims), name='patch_embed')(x)  # [B, *grid, D]
    tokens = tokens.astype(jnp.float32).reshape(batch, -1, self.hidden_size)
    tokens = tokens + sincos_pos_embed(grid, self.hidden_size)[None]  # [B, T, D]
    if hint is not None:
      tokens = tokens + hint.astype(jnp.float32)
    if residuals is not None and len(residuals) > self.depth:
      raise ValueError(f'residuals: at most depth={self.depth} (one per block), got {len(residuals)}.')
    block_outputs = []

    c = layers.NoiseEmbedding(self.hidden_size, 256, kind=self.noise_embedding, t_scale=self.t_scale,
                              fourier_scale=self.fourier_scale, dtype=dtype,
                              kernel_init=nn.initializers.normal(0.02), name='t_embed')(t)
    c = c.astype(jnp.float32)  # [B, D]
    if self.num_classes is not None:
      c = c + layers.LabelEmbedding(self.num_classes, self.hidden_size, name='y_embed')(labels).astype(jnp.float32)
    if context is not None:  # PixArt's caption projection to the token width
      context = layers.dense(self.hidden_size, ('embed', 'mlp'), dtype=dtype, kernel_init=xavier_uniform,
                             name='context_embed_in')(context.astype(dtype))
      context = layers.dense(self.hidden_size, ('mlp', 'embed'), dtype=dtype, kernel_init=xavier_uniform,
                             name='context_embed_out')(nn.gelu(context, approximate=True))  # [B, S, D]

    block = layers.maybe_remat(DiTBlock, self.remat)
    for i in range(self.depth):
      if self.attention == 'factorized':  # [B, t, hw, D] -> one sequence per frame, or per position across frames
        frames = tokens.reshape(batch, grid[0], -1, self.hidden_size)
        frames = frames if i % 2 == 0 else frames.transpose(0, 2, 1, 3)
        groups = frames.shape[1]
        repeat = lambda a: None if a is None else jnp.repeat(a, groups, axis=0)
        out = block(self.num_heads, self.mlp_ratio, dtype, name=f'blocks_{i}')(
            frames.reshape(batch * groups, -1, self.hidden_size), repeat(c), repeat(context), repeat(context_mask))
        out = out.reshape(frames.shape)
        tokens = (out if i % 2 == 0 else out.transpose(0, 2, 1, 3)).reshape(batch, -1, self.hidden_size)
      else:
        tokens = block(self.num_heads, self.mlp_ratio, dtype, name=f'blocks_{i}')(tokens, c, context, context_mask)
      if residuals is not None and i < len(residuals):
        tokens = tokens + residuals[i].astype(jnp.float32)
      block_outputs.append(tokens)
    if encoder_only:
      return block_outputs

    shift, scale = jnp.split(layers.dense(2 * self.hidden_size, ('embed', 'mlp'), dtype=dtype,
                                          kernel_init=layers.zeros, name='final_adaLN_modulation')(nn.silu(c)),
                             2, axis=-1)
    tokens = modulate(layer_norm(tokens), shift.astype(jnp.float32), scale.astype(jnp.float32))
    patches = layers.dense(math.prod(patch) * out_channels, ('embed', 'patch'), dtype=dtype,
                           kernel_init=layers.zeros, name='final_linear')(tokens)  # [B, T, p p C_out]
    patches = patches.astype(jnp.float32).reshape(batch, *grid, *patch, out_channels)
    n = len(grid)  # [B, g_1 .. g_n, p_1 .. p_n, C] -> [B, g_1, p_1, .., g_n, p_n, C]
    order = (0, *(a for i in range(n) for a in (1 + i, 1 + n + i)), 1 + 2 * n)
    return patches.transpose(order).reshape(batch, *sizes, out_channels)


def _paper_preset(hidden_size: int, depth: int, num_heads: int, patch_size: int) -> dict[str, Any]:
  return dict(patch_size=patch_size, hidden_size=hidden_size, depth=depth, num_heads=num_heads, num_classes=1000,
              learn_sigma=True)


_SIZES = {'S': (384, 12, 6), 'B': (768, 12, 12), 'L': (1024, 24, 16), 'XL': (1152, 28, 16)}

DIT_PRESETS: dict[str, dict[str, Any]] = {
    **{f'DiT-{size}/{p}': _paper_preset(*dims, p) for size, dims in _SIZES.items() for p in (2, 4, 8)},
    'dit_tiny': dict(patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10, learn_sigma=True),
    # Latte (Ma et al. 2024, sec. 3): DiT-XL's width, depth and heads on tubelets of 1 x 2 x 2 latent pixels,
    # blocks alternating within and across frames (variant 1), 16 frames of 32x32x4 latents.
    'Latte-XL/2': dict(patch_size=2, hidden_size=1152, depth=28, num_heads=16, spatial_dims=3, tubelet_size=1,
                       attention='factorized'),
    'dit1d_tiny': dict(patch_size=4, hidden_size=64, depth=2, num_heads=4, spatial_dims=1),
    'dit3d_tiny': dict(patch_size=4, hidden_size=64, depth=2, num_heads=4, spatial_dims=3, tubelet_size=2,
                       attention='factorized'),
}
"""``DiT`` keyword arguments by name. ``DiT-{S,B,L,XL}/{2,4,8}``: the paper's models (Table 1: width D, depth,
heads) for 256x256 ImageNet latents, input [32, 32, 4], 1000 classes, learned sigma (Table 4 gives their
parameter counts: 33 M, 130 M, 458 M, 675 M). ``dit_tiny``: a CPU-sized model for tests (e.g. [16, 16, 1]).
``Latte-XL/2``: the video DiT of Latte; ``dit1d_tiny`` / ``dit3d_tiny``: CPU models for waveforms [L, C] (L a
multiple of 4) and clips [T, H, W, C] (tubelets 2 x 4 x 4)."""
