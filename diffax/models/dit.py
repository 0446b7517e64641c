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

Mixed precision: parameters are float32, matmuls (and the patch convolution) run in ``dtype``; the residual
stream, the LayerNorms, the modulation arithmetic and the attention softmax stay in float32; the output is float32.
"""

from __future__ import annotations

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
patch_embed_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2), out_axis=3)
"""Xavier-uniform over the kernel [p, p, C, D] seen as the linear map [p p C, D] it is (the reference's init)."""


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


def layer_norm(x: Array) -> Array:
  """LayerNorm over the last axis without scale or bias (eps 1e-6), in float32."""
  return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=jnp.float32)(x.astype(jnp.float32))


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  """``x * (1 + scale) + shift`` with x [B, T, D] and per-example shift, scale [B, D]."""
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class DiTBlock(nn.Module):
  """One adaLN-Zero transformer block: x [B, T, D] float32, c [B, D] float32 -> [B, T, D] float32."""
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, c: Array) -> Array:
    width = x.shape[-1]
    modulation = layers.dense(6 * width, ('embed', 'mlp'), dtype=self.dtype, kernel_init=layers.zeros,
                              name='adaLN_modulation')(nn.silu(c)).astype(jnp.float32)  # [B, 6D]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=-1)

    h = modulate(layer_norm(x), shift_msa, scale_msa)
    h = layers.Attention(self.num_heads, dtype=self.dtype, kernel_init=qkv_init, out_kernel_init=xavier_uniform,
                         name='attn')(h)
    x = x + gate_msa[:, None, :] * h.astype(jnp.float32)

    h = modulate(layer_norm(x), shift_mlp, scale_mlp)
    h = layers.dense(int(width * self.mlp_ratio), ('embed', 'mlp'), dtype=self.dtype, kernel_init=xavier_uniform,
                     name='mlp_in')(h)
    h = nn.gelu(h, approximate=True)
    h = layers.dense(width, ('mlp', 'embed'), dtype=self.dtype, kernel_init=xavier_uniform, name='mlp_out')(h)
    return x + gate_mlp[:, None, :] * h.astype(jnp.float32)


class DiT(nn.Module):
  """Diffusion Transformer backbone: x [B, H, W, C], t [B], labels [B] or None -> [B, H, W, C_out] float32.

  Attributes:
    patch_size: p; H and W must be multiples of it (T = HW / p^2 tokens).
    hidden_size: token width D (divisible by 4 for the 2-D position embedding and by ``num_heads``).
    depth: number of adaLN-Zero blocks.
    num_heads: attention heads.
    mlp_ratio: MLP hidden width / D.
    num_classes: class-conditional with labels 0 .. num_classes - 1 and the null label ``num_classes``
      (classifier-free guidance; the loss drops labels, the model only holds the extra row); None: unconditional.
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
  learn_sigma: bool = False
  out_channels: int | None = None
  noise_embedding: str = 'sinusoidal'
  t_scale: float = 1000.0
  fourier_scale: float = 16.0
  dtype: Any = jnp.float32
  remat: str = 'none'

  @nn.compact
  def __call__(self, x: Array, t: Array, cond: Array | None = None, *, train: bool = False) -> Array:
    """Denoiser output for ``x`` [B, H, W, C] at noise input ``t`` [B]; ``train`` is unused (DiT has no dropout)."""
    del train
    dtype = jnp.dtype(self.dtype)
    if x.ndim != 4 or t.shape != x.shape[:1]:
      raise ValueError(f'Expected x [B, H, W, C] and t [B]; got x {x.shape} and t {t.shape}.')
    batch, height, width, channels = x.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f'Input {height}x{width} is not a multiple of the patch size {p}.')
    if (cond is None) != (self.num_classes is None):
      raise ValueError(f'num_classes={self.num_classes} needs labels [B] (the null label is num_classes), an '
                       f"unconditional model cond=None; got {'None' if cond is None else 'labels'}.")
    out_channels = (self.out_channels or channels) * (2 if self.learn_sigma else 1)
    h, w = height // p, width // p

    tokens = layers.conv(self.hidden_size, p, strides=p, dtype=dtype, kernel_init=patch_embed_init,
                         name='patch_embed')(x)  # [B, h, w, D]
    tokens = tokens.astype(jnp.float32).reshape(batch, h * w, self.hidden_size)
    tokens = tokens + sincos_pos_embed_2d(h, w, self.hidden_size)[None]  # [B, T, D]

    c = layers.NoiseEmbedding(self.hidden_size, 256, kind=self.noise_embedding, t_scale=self.t_scale,
                              fourier_scale=self.fourier_scale, dtype=dtype,
                              kernel_init=nn.initializers.normal(0.02), name='t_embed')(t)
    c = c.astype(jnp.float32)  # [B, D]
    if self.num_classes is not None:
      c = c + layers.LabelEmbedding(self.num_classes, self.hidden_size, name='y_embed')(cond).astype(jnp.float32)

    block = layers.maybe_remat(DiTBlock, self.remat)
    for i in range(self.depth):
      tokens = block(self.num_heads, self.mlp_ratio, dtype, name=f'blocks_{i}')(tokens, c)

    shift, scale = jnp.split(layers.dense(2 * self.hidden_size, ('embed', 'mlp'), dtype=dtype,
                                          kernel_init=layers.zeros, name='final_adaLN_modulation')(nn.silu(c)),
                             2, axis=-1)
    tokens = modulate(layer_norm(tokens), shift.astype(jnp.float32), scale.astype(jnp.float32))
    patches = layers.dense(p * p * out_channels, ('embed', 'patch'), dtype=dtype, kernel_init=layers.zeros,
                           name='final_linear')(tokens)  # [B, T, p p C_out]
    patches = patches.astype(jnp.float32).reshape(batch, h, w, p, p, out_channels)
    return patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, out_channels)


def _paper_preset(hidden_size: int, depth: int, num_heads: int, patch_size: int) -> dict[str, Any]:
  return dict(patch_size=patch_size, hidden_size=hidden_size, depth=depth, num_heads=num_heads, num_classes=1000,
              learn_sigma=True)


_SIZES = {'S': (384, 12, 6), 'B': (768, 12, 12), 'L': (1024, 24, 16), 'XL': (1152, 28, 16)}

DIT_PRESETS: dict[str, dict[str, Any]] = {
    **{f'DiT-{size}/{p}': _paper_preset(*dims, p) for size, dims in _SIZES.items() for p in (2, 4, 8)},
    'dit_tiny': dict(patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10, learn_sigma=True),
}
"""``DiT`` keyword arguments by name. ``DiT-{S,B,L,XL}/{2,4,8}``: the paper's models (Table 1: width D, depth,
heads) for 256x256 ImageNet latents, input [32, 32, 4], 1000 classes, learned sigma (Table 4 gives their
parameter counts: 33 M, 130 M, 458 M, 675 M). ``dit_tiny``: a CPU-sized model for tests (e.g. [16, 16, 1])."""
