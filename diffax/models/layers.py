"""Building blocks shared by the U-Net and DiT: noise-level embeddings, labels, attention, remat.

Conventions every backbone follows:

* Images are NHWC. A backbone is a Linen module called as ``model.apply({'params': p}, x, t, cond, train=...)``
  with ``x`` [B, H, W, C], ``t`` [B] the network's noise-level input (schedule time, a DDPM timestep scale or
  EDM's ``c_noise``; see :class:`NoiseEmbedding`) and ``cond`` class labels [B] int (``num_classes`` is the
  null label used for classifier-free guidance), a context [B, L, D], or ``None``.
* Mixed precision: parameters are float32 (``param_dtype``), matmuls and convolutions run in ``dtype``
  (bf16 or fp32), normalisations and the attention softmax run in float32.
* Every parameter carries logical axis names (:data:`AXES`) through ``nn.with_logical_partitioning``; the
  trainer maps them to mesh axes by rules (e.g. ``('embed', 'fsdp')``) to shard large models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any

AXES = ('embed', 'mlp', 'heads', 'kv', 'conv_in', 'conv_out', 'classes', 'norm', 'patch')
"""Logical axis names used on parameters. ``embed``: model width; ``mlp``: hidden width of MLPs and time
embeddings; ``heads`` / ``kv``: attention heads and per-head width; ``conv_in`` / ``conv_out``: convolution
channels; ``classes``: label-embedding rows; ``norm``: scales and biases of normalisations; ``patch``: DiT
patch pixels."""

default_kernel_init = nn.initializers.lecun_normal()
zeros = nn.initializers.zeros


def partitioned(init: Callable, names: Sequence[str | None]) -> Callable:
  """An initializer whose parameters carry the logical axis ``names`` (one per parameter dimension)."""
  return nn.with_logical_partitioning(init, tuple(names))


def dense(features: int | Sequence[int], names: Sequence[str | None], *, axis: int | Sequence[int] = -1,
          dtype: Dtype = jnp.float32, kernel_init: Callable = default_kernel_init, use_bias: bool = True,
          name: str | None = None) -> nn.DenseGeneral:
  """``nn.DenseGeneral`` with logical names on kernel (``names``) and bias (the output part of ``names``)."""
  num_out = 1 if isinstance(features, int) else len(features)
  return nn.DenseGeneral(features, axis=axis, dtype=dtype, param_dtype=jnp.float32, use_bias=use_bias,
                         kernel_init=partitioned(kernel_init, names),
                         bias_init=partitioned(zeros, tuple(names)[-num_out:]), name=name)


def conv(features: int, kernel_size: int | Sequence[int] = 3, *, strides: int | Sequence[int] = 1,
         dtype: Dtype = jnp.float32, kernel_init: Callable = default_kernel_init, name: str | None = None) -> nn.Conv:
  """A 'SAME'-padded ``nn.Conv`` whose kernel is named ``(None, ..., None, 'conv_in', 'conv_out')``.

  An int ``kernel_size`` / ``strides`` means a square 2-D kernel (images); a sequence gives one entry per spatial
  axis: ``(k,)`` for sequences [B, L, C], ``(k, k)`` for images, ``(k_t, k, k)`` for clips [B, T, H, W, C].
  """
  kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
  strides = (strides,) * len(kernel) if isinstance(strides, int) else tuple(strides)
  return nn.Conv(features, kernel, strides=strides, padding='SAME', dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=partitioned(kernel_init, (None,) * len(kernel) + ('conv_in', 'conv_out')),
                 bias_init=partitioned(zeros, ('conv_out',)), name=name)


def group_norm(num_groups: int = 32, *, epsilon: float = 1e-6, name: str | None = None) -> nn.GroupNorm:
  """GroupNorm computed in float32 (its output is float32 whatever the input dtype)."""
  return Float32GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32,
                          scale_init=partitioned(nn.initializers.ones, ('norm',)),
                          bias_init=partitioned(zeros, ('norm',)), name=name)


class Float32GroupNorm(nn.GroupNorm):
  """``nn.GroupNorm`` applied to the float32 cast of its input (flax subtracts a float32 mean from ``x``, which
  strict dtype promotion rejects for a bf16 ``x``)."""

  def __call__(self, x: Array, *args, **kwargs) -> Array:
    return super().__call__(x.astype(jnp.float32), *args, **kwargs)


def sinusoidal_embedding(t: Array, dim: int, *, max_period: float = 10_000.0) -> Array:
  """Transformer positional embedding of a scalar per example (Vaswani et al. 2017, sec. 3.5; DDPM, ADM, DiT).

  ``emb = [cos(t w_k), sin(t w_k)]`` with ``w_k = max_period^(-k / (dim / 2))``, k = 0 .. dim/2 - 1.

  Args:
    t: [B] values (DDPM timesteps 0..999, or any scaled noise level).
    dim: even embedding width.

  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)  # [dim/2]
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, dim/2]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def fourier_embedding(t: Array, dim: int, *, scale: float = 16.0, seed: int = 0) -> Array:
  """Gaussian random Fourier features (Tancik et al. 2020; NCSN++'s noise-level embedding, Song et al. 2021).

  ``emb = [sin(2 pi t w), cos(2 pi t w)]`` with fixed ``w ~ N(0, scale^2)`` [dim/2] drawn from ``seed``. The
  frequencies are host constants (not parameters, no rng in the compiled program): no optimiser or weight decay
  can move them.

  Args:
    t: [B] values, typically ``log(sigma)`` or EDM's ``c_noise``.
    dim: even embedding width.

  Returns:
    [B, dim] float32.
  """
  w = jnp.asarray(scale * np.random.default_rng(seed).standard_normal(dim // 2), jnp.float32)  # [dim/2]
  args = 2.0 * math.pi * t.astype(jnp.float32)[:, None] * w[None, :]  # [B, dim/2]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class NoiseEmbedding(nn.Module):
  """Noise level -> [B, features] through an embedding and a two-layer SiLU MLP (DDPM, ADM, DiT, NCSN++).

  ``kind='sinusoidal'`` embeds ``t_scale * t`` (``t_scale = 1000`` turns continuous schedule time in (0, 1]
  into DDPM's timestep range; use 1 for EDM's ``c_noise``); ``kind='fourier'`` embeds ``t_scale * t`` with
  Gaussian Fourier features of ``fourier_scale``.
  """
  features: int
  embed_dim: int
  kind: str = 'sinusoidal'
  t_scale: float = 1000.0
  fourier_scale: float = 16.0
  dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init

  @nn.compact
  def __call__(self, t: Array) -> Array:
    if self.kind == 'sinusoidal':
      emb = sinusoidal_embedding(self.t_scale * t, self.embed_dim)
    elif self.kind == 'fourier':
      emb = fourier_embedding(self.t_scale * t, self.embed_dim, scale=self.fourier_scale)
    else:
      raise ValueError(f"Unknown noise embedding {self.kind!r}; choose 'sinusoidal' or 'fourier'.")
    emb = dense(self.features, ('embed', 'mlp'), dtype=self.dtype, kernel_init=self.kernel_init, name='dense_0')(emb)
    return dense(self.features, ('mlp', 'embed'), dtype=self.dtype, kernel_init=self.kernel_init,
                 name='dense_1')(nn.silu(emb))


class LabelEmbedding(nn.Module):
  """Class label [B] -> [B, features], with row ``num_classes`` for the null label of classifier-free guidance."""
  num_classes: int
  features: int

  @nn.compact
  def __call__(self, labels: Array) -> Array:
    table = nn.Embed(self.num_classes + 1, self.features, param_dtype=jnp.float32,
                     embedding_init=partitioned(nn.initializers.normal(0.02), ('classes', 'embed')), name='table')
    return table(labels.astype(jnp.int32))


class Attention(nn.Module):
  """Multi-head (self or cross) attention through ``jax.nn.dot_product_attention``.

  Queries come from ``x`` [B, L, D]; keys and values from ``context`` [B, S, D_c] (defaults to ``x``). The
  softmax runs in float32; fused kernels are used where the platform has them (``implementation=None``).
  """
  num_heads: int
  head_dim: int | None = None
  out_features: int | None = None
  dtype: Dtype = jnp.float32
  kernel_init: Callable = default_kernel_init
  out_kernel_init: Callable = default_kernel_init

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None, bias: Array | None = None) -> Array:
    """``x`` [B, L, D], ``context`` [B, S, D_c] or None, ``bias`` added to the logits ([B or 1, H, L, S]) or None."""
    context = x if context is None else context
    width = self.out_features or x.shape[-1]
    head_dim = self.head_dim or width // self.num_heads
    qkv_shape = (self.num_heads, head_dim)
    q = dense(qkv_shape, ('embed', 'heads', 'kv'), dtype=self.dtype, kernel_init=self.kernel_init,
              name='query')(x)  # [B, L, H, Dh]
    k = dense(qkv_shape, ('embed', 'heads', 'kv'), dtype=self.dtype, kernel_init=self.kernel_init,
              name='key')(context)  # [B, S, H, Dh]
    v = dense(qkv_shape, ('embed', 'heads', 'kv'), dtype=self.dtype, kernel_init=self.kernel_init,
              name='value')(context)  # [B, S, H, Dh]
    with jax.numpy_dtype_promotion('standard'):  # its XLA path promotes bf16 logits with float32 internally
      out = jax.nn.dot_product_attention(q, k, v, bias=bias)  # [B, L, H, Dh]
    return dense(width, ('heads', 'kv', 'embed'), axis=(-2, -1), dtype=self.dtype,
                 kernel_init=self.out_kernel_init, name='out')(out)


def relative_position_bucket(relative_position: np.ndarray, *, num_buckets: int = 32,
                             max_distance: int = 128) -> np.ndarray:
  """T5's bidirectional buckets of ``key - query`` offsets (Raffel et al. 2020, sec. 2.1; ``mesh_tensorflow``).

  Half of the buckets hold the sign; within each half, offsets below ``num_buckets / 4`` get a bucket each and
  larger ones share logarithmically wider buckets up to ``max_distance`` (beyond it, the last bucket).

  Args:
    relative_position: int offsets of any shape.

  Returns:
    int32 buckets in ``[0, num_buckets)`` of the same shape (host constants).
  """
  half = num_buckets // 2
  n = np.abs(relative_position)
  exact = half // 2
  log_bucket = exact + (np.log(np.maximum(n, 1) / exact) / math.log(max_distance / exact) * (half - exact))
  bucket = np.where(n < exact, n, np.minimum(log_bucket.astype(np.int64), half - 1))
  return (bucket + half * (relative_position > 0)).astype(np.int32)


class RelativePositionBias(nn.Module):
  """Learned per-head bias of the attention logits from T5-bucketed offsets (Shaw et al. 2018; Raffel et al. 2020).

  Video Diffusion Models' temporal attention (Ho et al. 2022, sec. 3) uses relative position embeddings so the
  frames need no absolute position and clips of any length share one table [num_buckets, heads].

  Call: ``length`` (static int) -> bias [1, heads, length, length] float32 for :class:`Attention`.
  """
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128

  @nn.compact
  def __call__(self, length: int) -> Array:
    positions = np.arange(length)
    buckets = relative_position_bucket(positions[None, :] - positions[:, None], num_buckets=self.num_buckets,
                                       max_distance=self.max_distance)  # [L, L]
    table = self.param('table', partitioned(nn.initializers.zeros, (None, 'heads')), (self.num_buckets,
                                                                                       self.num_heads))
    return jnp.asarray(table)[buckets].transpose(2, 0, 1)[None]  # [1, heads, L, L]


REMAT_POLICIES: dict[str, Callable | None] = {
    'full': None,  # save nothing: recompute the whole block in the backward pass
    'dots': jax.checkpoint_policies.dots_saveable,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
"""Rematerialisation policies by name (``'none'`` disables remat); see ``jax.checkpoint_policies``."""


def maybe_remat(block: type[nn.Module], policy: str, *, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
  """``nn.remat(block)`` with the named policy, or ``block`` itself for ``policy='none'``.

  ``static_argnums`` counts ``self`` as 0 (e.g. a ``train`` flag passed positionally as the 3rd argument is 3).
  """
  if policy == 'none':
    return block
  if policy not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat policy {policy!r}; choose 'none' or one of {sorted(REMAT_POLICIES)}.")
  return nn.remat(block, policy=REMAT_POLICIES[policy], static_argnums=static_argnums)
