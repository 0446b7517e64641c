"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, sec. 3 and app. G): Stable Diffusion's VAE.

Encoder and decoder (Esser et al. 2021's VQGAN convolutional stacks, with a Gaussian posterior instead of a
codebook), in the module layout of diffusers' ``AutoencoderKL`` so that its checkpoints convert name by name:

  encoder: conv_in -> per level l (width ch * ch_mult[l]): num_res_blocks x ResnetBlock, then a stride-2 conv except
  at the last level -> mid block (ResnetBlock, single-head self-attention, ResnetBlock) -> GN, SiLU, conv_out to
  2 latent_channels (mean, log variance) -> quant_conv (1x1).
  decoder: post_quant_conv (1x1) -> conv_in -> mid block -> per level in reverse: (num_res_blocks + 1) x
  ResnetBlock, then nearest 2x + conv except at the last level -> GN, SiLU, conv_out.

The downsampling factor is ``2 ** (len(ch_mult) - 1)`` (4, 8 or 16 for 3, 4 or 5 levels). The posterior is
``q(z | x) = N(mean, diag(exp(logvar)))`` with the KL term of LDM's ``DiagonalGaussianDistribution``. A diffusion
model sees ``scaling_factor * (z - shift_factor)`` (LDM sec. 4.3.2: rescaled to about unit variance; 0.18215 for
SD 1.x / 2.x, 0.13025 for SDXL; SD3 and FLUX add a shift), see :meth:`AutoencoderKL.encode_latents`.

Images are NHWC in [-1, 1]. Parameters are float32; convolutions and matmuls run in ``dtype``; group norms and the
attention softmax in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax.models import layers

Array = jax.Array
Dtype = layers.Dtype


def _conv(features: int, kernel_size: int, *, strides: int = 1, dtype: Dtype, name: str) -> nn.Conv:
  # 'SAME' padding: 1 on each side for a 3x3 stride-1 conv; (0, 1) for stride 2 on even sizes, which is the
  # asymmetric padding of diffusers' Downsample2D / LDM's Downsample (F.pad(x, (0, 1, 0, 1)), then padding 0).
  return layers.conv(features, kernel_size, strides=strides, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """``x + conv2(SiLU(GN(conv1(SiLU(GN(x))))))`` with a 1x1 ``conv_shortcut`` when the width changes."""
  out_channels: int
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, C] -> [B, H, W, out_channels]."""
    h = nn.silu(layers.group_norm(self.num_groups, name='norm1')(x)).astype(self.dtype)
    h = _conv(self.out_channels, 3, dtype=self.dtype, name='conv1')(h)
    h = nn.silu(layers.group_norm(self.num_groups, name='norm2')(h)).astype(self.dtype)
    h = _conv(self.out_channels, 3, dtype=self.dtype, name='conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, dtype=self.dtype, name='conv_shortcut')(x.astype(self.dtype))
    return x.astype(self.dtype) + h


class AttentionBlock(nn.Module):
  """Single-head self-attention over the H*W positions with a residual: ``x + to_out(softmax(q k^T / sqrt(C)) v)``."""
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, C] -> [B, H, W, C]."""
    b, h, w, c = x.shape
    y = layers.group_norm(self.num_groups, name='group_norm')(x).astype(self.dtype).reshape(b, h * w, 1, c)
    proj = lambda name, axes: layers.dense(c, axes, dtype=self.dtype, name=name)
    q, k, v = (proj(n, ('embed', 'mlp'))(y) for n in ('to_q', 'to_k', 'to_v'))  # [B, HW, 1, C]
    with jax.numpy_dtype_promotion('standard'):
      y = jax.nn.dot_product_attention(q, k, v)  # [B, HW, 1, C]
    y = proj('to_out_0', ('mlp', 'embed'))(y.reshape(b, h * w, c)).reshape(b, h, w, c)
    return x.astype(self.dtype) + y


class Resample(nn.Module):
  """A 3x3 ``conv`` after nearest 2x upsampling (``'up'``) or with stride 2 (``'down'``)."""
  kind: str
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.kind == 'up':
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, strides=2 if self.kind == 'down' else 1, dtype=self.dtype, name='conv')(x)


class Level(nn.Module):
  """``num_blocks`` ResnetBlocks then an optional resampling (diffusers' ``DownEncoderBlock2D`` /
  ``UpDecoderBlock2D``)."""
  out_channels: int
  num_blocks: int
  resample: str | None
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(self.num_blocks):
      x = ResnetBlock(self.out_channels, self.num_groups, self.dtype, name=f'resnets_{i}')(x)
    if self.resample is not None:
      x = Resample(self.resample, self.dtype, name=f'{self.resample}samplers_0')(x)
    return x


class MidBlock(nn.Module):
  """ResnetBlock, self-attention, ResnetBlock at the lowest resolution (LDM's ``mid``, diffusers'
  ``UNetMidBlock2D``)."""
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.num_groups, self.dtype, name='resnets_0')(x)
    x = AttentionBlock(self.num_groups, self.dtype, name='attentions_0')(x)
    return ResnetBlock(c, self.num_groups, self.dtype, name='resnets_1')(x)


class Encoder(nn.Module):
  """[B, H, W, C_in] -> [B, H/f, W/f, 2 latent_channels] (mean and log variance, before ``quant_conv``)."""
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  latent_channels: int
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = _conv(self.ch * self.ch_mult[0], 3, dtype=self.dtype, name='conv_in')(x.astype(self.dtype))
    for level, mult in enumerate(self.ch_mult):
      resample = 'down' if level != len(self.ch_mult) - 1 else None
      h = Level(self.ch * mult, self.num_res_blocks, resample, self.num_groups, self.dtype,
                name=f'down_blocks_{level}')(h)
    h = MidBlock(self.num_groups, self.dtype, name='mid_block')(h)
    h = nn.silu(layers.group_norm(self.num_groups, name='conv_norm_out')(h)).astype(self.dtype)
    return _conv(2 * self.latent_channels, 3, dtype=self.dtype, name='conv_out')(h)


class Decoder(nn.Module):
  """[B, h, w, latent_channels] -> [B, f h, f w, out_channels]."""
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  out_channels: int
  num_groups: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    h = _conv(self.ch * self.ch_mult[-1], 3, dtype=self.dtype, name='conv_in')(z.astype(self.dtype))
    h = MidBlock(self.num_groups, self.dtype, name='mid_block')(h)
    for i, mult in enumerate(reversed(self.ch_mult)):
      resample = 'up' if i != len(self.ch_mult) - 1 else None
      h = Level(self.ch * mult, self.num_res_blocks + 1, resample, self.num_groups, self.dtype,
                name=f'up_blocks_{i}')(h)
    h = nn.silu(layers.group_norm(self.num_groups, name='conv_norm_out')(h)).astype(self.dtype)
    return _conv(self.out_channels, 3, dtype=self.dtype, name='conv_out')(h).astype(jnp.float32)


@struct.dataclass
class DiagonalGaussian:
  """The posterior ``N(mean, diag(exp(logvar)))`` over latents [B, h, w, c] (LDM's DiagonalGaussianDistribution);
  a pytree, so it crosses ``jit``."""
  mean: Array
  logvar: Array

  @classmethod
  def from_moments(cls, moments: Array) -> DiagonalGaussian:
    """Splits [B, h, w, 2c] into mean and log variance; the log variance is clipped to [-30, 20] as in LDM."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  def sample(self, rng: Array) -> Array:
    """``mean + exp(logvar / 2) * eps``, eps ~ N(0, I): [B, h, w, c]."""
    return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> Array:
    return self.mean

  def kl(self) -> Array:
    """``KL(q(z | x) || N(0, I)) = 1/2 sum(mean^2 + var - 1 - logvar)`` over h, w, c: [B] nats."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar, axis=(1, 2, 3))


class AutoencoderKL(nn.Module):
  """Encoder, Gaussian posterior and decoder; ``apply(variables, x, rng)`` -> (reconstruction, posterior).

  Attributes:
    ch, ch_mult: level widths ``ch * ch_mult[l]`` (diffusers' ``block_out_channels``); ``len(ch_mult) - 1``
      stride-2 stages.
    num_res_blocks: ResnetBlocks per encoder level (diffusers' ``layers_per_block``); the decoder has one more.
    latent_channels: channels of z.
    in_channels: image channels (the decoder outputs as many).
    scaling_factor, shift_factor: the diffusion model's latents are ``scaling_factor * (z - shift_factor)``.
  """
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  latent_channels: int = 4
  in_channels: int = 3
  num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0
  dtype: Dtype = jnp.float32

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def setup(self):
    common = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                  num_groups=self.num_groups, dtype=self.dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.in_channels, **common)
    self.quant_conv = _conv(2 * self.latent_channels, 1, dtype=self.dtype, name='quant_conv')
    self.post_quant_conv = _conv(self.latent_channels, 1, dtype=self.dtype, name='post_quant_conv')

  def encode(self, x: Array) -> DiagonalGaussian:
    """Images [B, H, W, in_channels] in [-1, 1] (H, W divisible by the factor) -> posterior over [B, H/f, W/f, c]."""
    f = self.downsampling_factor
    if x.shape[-1] != self.in_channels or x.shape[1] % f or x.shape[2] % f:
      raise ValueError(f'The autoencoder takes [B, H, W, {self.in_channels}] images with H and W divisible by '
                       f'{f}; got {x.shape}.')
    return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x)))

  def decode(self, z: Array) -> Array:
    """Latents z [B, h, w, latent_channels] (unscaled) -> images [B, f h, f w, in_channels], float32."""
    if z.shape[-1] != self.latent_channels:
      raise ValueError(f'The autoencoder decodes {self.latent_channels}-channel latents; got shape {z.shape} '
                       f'(does the diffusion model\'s channel count match autoencoder latent_channels?).')
    return self.decoder(self.post_quant_conv(z.astype(self.dtype)))

  def encode_latents(self, x: Array, rng: Array | None = None) -> Array:
    """Images -> the diffusion model's latents ``scaling_factor * (z - shift_factor)``, z sampled from the
    posterior with ``rng`` or its mean if ``rng`` is None: [B, H/f, W/f, latent_channels] float32."""
    posterior = self.encode(x)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return self.scaling_factor * (z - self.shift_factor)

  def decode_latents(self, latents: Array) -> Array:
    """Inverse of :meth:`encode_latents`'s scaling, then :meth:`decode`: [B, h, w, c] -> [B, H, W, in_channels]."""
    return self.decode(latents.astype(jnp.float32) / self.scaling_factor + self.shift_factor)

  def __call__(self, x: Array, rng: Array | None = None) -> tuple[Array, DiagonalGaussian]:
    """Reconstruction of ``x`` [B, H, W, C] from a posterior sample (its mean if ``rng`` is None), and the
    posterior."""
    posterior = self.encode(x)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return self.decode(z), posterior


_SD = dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2)
AUTOENCODER_PRESETS: dict[str, dict[str, Any]] = {
    # Stable Diffusion 1.x / 2.x (LDM's kl-f8 with 4 channels; stabilityai/sd-vae-ft-mse, sd-vae-ft-ema): 83.65 M
    # parameters, factor 8, 4 latent channels, scaling 0.18215.
    'sd': dict(**_SD, latent_channels=4, scaling_factor=0.18215),
    # SDXL (stabilityai/sdxl-vae): the same network retrained; scaling 0.13025.
    'sdxl': dict(**_SD, latent_channels=4, scaling_factor=0.13025),
    # SD3 (Esser et al. 2024, sec. 5.2.1): factor 8, 16 channels; scaling 1.5305, shift 0.0609.
    'sd3': dict(**_SD, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
    # FLUX.1 (black-forest-labs): the same layout as SD3's; scaling 0.3611, shift 0.1159.
    'flux': dict(**_SD, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
    # Factor 4 and factor 16 with SD's blocks (LDM's kl-f4 / kl-f16 compression rates; scaling 1 until measured).
    'f4c4': dict(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, latent_channels=4, scaling_factor=1.0),
    'f16c16': dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, latent_channels=16, scaling_factor=1.0),
    # CPU runs and tests: factor 4, 4 channels, 0.95 M parameters.
    'small': dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, latent_channels=4, num_groups=8, scaling_factor=1.0),
}
"""Autoencoder fields by preset name: ``AutoencoderKL(**AUTOENCODER_PRESETS['sd'])``."""


def get_autoencoder(preset: str | None = None, **overrides: Any) -> AutoencoderKL:
  """The autoencoder of ``preset``'s fields (if given) updated by ``overrides``."""
  fields = {}
  if preset:
    if preset not in AUTOENCODER_PRESETS:
      raise ValueError(f'Unknown autoencoder preset {preset!r}; choose one of {sorted(AUTOENCODER_PRESETS)}.')
    fields.update(AUTOENCODER_PRESETS[preset])
  fields.update(overrides)
  return AutoencoderKL(**fields)
