"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models",
arXiv:2302.05543): spatial control of a frozen backbone through a trainable copy of its encoder.

  c_f = E(c_i)                                  a small conditioning encoder of the control image (sec. 3.3)
  r_1 .. r_n = Z_k(F_copy(x, t, cond; hint = c_f))      trainable copy, each output through a zero layer Z
  y = F_base(x, t, cond; residuals = s r)               the frozen model, s the conditioning scale (eq. 2)

For the U-Net the copy is its encoder (``conv_in``, the down levels and the middle block) and every skip
feature plus the middle output gets a zero-initialised 1x1 convolution; for the DiT it is the first ``depth``
blocks with a zero-initialised linear after each (PixArt-delta, Chen et al. 2024, sec. 3). The copy is built by
the backbone's own class (:class:`~diffax.models.unet.UNet`, :class:`~diffax.models.dit.DiT` with
``encoder_only``), so its parameters carry the base's names and :func:`init_from_base` starts it from the trained
weights (sec. 3.2). The last layer of the conditioning encoder is zero too (for the DiT it is the patch embedding
of the control features), so at initialisation the controlled model equals the base exactly, as does any
ControlNet at ``scale = 0``.

Call: ``ControlNet(base)(x, t, cond, control, scale=s)`` -> the list of residuals for ``base.apply(...,
residuals=...)``; :func:`controlled_apply` does both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp

from diffax.models import layers
from diffax.models.dit import DiT
from diffax.models.unet import UNet

Array = jax.Array


class ControlShapeError(ValueError):
  """A control image whose shape does not fit the model's input."""


class HintEncoder(nn.Module):
  """The conditioning encoder E (ControlNet's ``input_hint_block``): 3x3 convs with SiLU, then a zero conv.

  ``strides`` per layer bring the control image to the resolution of the first features (SD: 512 -> 64 in
  three stride-2 steps; digits need none). Call: ``c`` [B, H, W, C_c] -> [B, H', W', features].
  """
  features: int
  channels: Sequence[int] = (16, 16)
  strides: Sequence[int] = (1, 1)
  kernel_size: Sequence[int] = (3, 3)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, c: Array) -> Array:
    h = c.astype(self.dtype)
    for i, (width, stride) in enumerate(zip(self.channels, self.strides)):
      h = nn.silu(layers.conv(width, tuple(self.kernel_size), strides=stride, dtype=self.dtype, name=f'conv_{i}')(h))
    return layers.conv(self.features, tuple(self.kernel_size), dtype=self.dtype, kernel_init=layers.zeros,
                       name='zero_out')(h)


class ControlNet(nn.Module):
  """Trainable copy of ``base``'s encoder and its zero layers; returns the residuals for ``base``.

  Attributes:
    base: the backbone to control (a :class:`UNet` or :class:`DiT`; only its fields are used).
    depth: (DiT) blocks copied, N (PixArt-delta: 13 of 28); None for the U-Net.
    hint_channels: widths of the conditioning encoder's convolutions.
    hint_strides: their strides (the control image may be larger than the model input by their product).
  """
  base: nn.Module
  depth: int | None = None
  hint_channels: Sequence[int] = (16, 16)
  hint_strides: Sequence[int] = (1, 1)

  def _check(self, x: Array, control: Array) -> None:
    factor = 1
    for s in self.hint_strides:
      factor *= s
    expected = (x.shape[0], *(n * factor for n in x.shape[1:-1]))
    if control.ndim != x.ndim or tuple(control.shape[:-1]) != expected:
      raise ControlShapeError(f'The control image must be [B, H, W, C_control] = {(*expected, "C_control")} for x '
                              f'{tuple(x.shape)} (hint strides {tuple(self.hint_strides)}); got '
                              f'{tuple(control.shape)}.')

  @nn.compact
  def __call__(self, x: Array, t: Array, cond: Any, control: Array, *, scale: float | Array = 1.0,
               train: bool = False) -> list[Array]:
    """Residuals ``s Z_k(F_copy)``: for a U-Net one per encoder skip plus the middle, for a DiT one per copied
    block ([B, T, D])."""
    self._check(x, control)
    dtype = jnp.dtype(self.base.dtype)
    if isinstance(self.base, UNet):
      hint = HintEncoder(self.base.ch * self.base.ch_mult[0], self.hint_channels, self.hint_strides,
                         kernel_size=(3,) * self.base.spatial_dims, dtype=dtype, name='hint')(control)
      copy = self.base.clone(parent=self, name='encoder')
    elif isinstance(self.base, DiT):
      if not self.depth or self.depth > self.base.depth:
        raise ValueError(f'ControlNet for a DiT needs 1 <= depth <= {self.base.depth} copied blocks, got {self.depth}.')
      features = HintEncoder(self.hint_channels[-1], self.hint_channels[:-1], self.hint_strides[:-1],
                             kernel_size=(3,) * self.base.spatial_dims, dtype=dtype, name='hint')(control)
      patch = self.base._patch()  # pylint: disable=protected-access
      hint = layers.conv(self.base.hidden_size, patch, strides=patch, dtype=dtype, kernel_init=layers.zeros,
                         name='hint_patch_embed')(nn.silu(features))
      hint = hint.reshape(x.shape[0], -1, self.base.hidden_size)  # [B, T, D]
      copy = self.base.clone(parent=self, name='encoder', depth=self.depth)
    else:
      raise TypeError(f'ControlNet controls a UNet or a DiT, got {type(self.base).__name__}.')
    features = copy(x, t, cond, train=train, hint=hint, encoder_only=True)
    residuals = []
    for i, f in enumerate(features):
      if isinstance(self.base, UNet):
        zero = layers.conv(f.shape[-1], (1,) * self.base.spatial_dims, dtype=dtype, kernel_init=layers.zeros,
                           name=f'zero_{i}')
      else:
        zero = layers.dense(f.shape[-1], ('embed', 'mlp'), dtype=dtype, kernel_init=layers.zeros, name=f'zero_{i}')
      residuals.append(scale * zero(f).astype(jnp.float32))
    return residuals


def init_from_base(control_params: Any, base_params: Any) -> Any:
  """``control_params`` with the copy (``'encoder'``) set to the base's weights of the same names (sec. 3.2)."""
  flat = flax.traverse_util.flatten_dict(control_params)
  base = flax.traverse_util.flatten_dict(base_params)
  for key in flat:
    if key[0] == 'encoder':
      if key[1:] not in base or base[key[1:]].shape != flat[key].shape:
        raise ValueError(f'The base parameters have no {"/".join(key[1:])} of shape {flat[key].shape}: the '
                         'ControlNet was built for another backbone.')
      flat[key] = base[key[1:]]
  return flax.traverse_util.unflatten_dict(flat)


def controlled_apply(base: nn.Module, controlnet: ControlNet, base_params: Any, control_params: Any, x: Array,
                     t: Array, cond: Any, control: Array, *, scale: float | Array = 1.0, train: bool = False,
                     rngs: dict | None = None) -> Array:
  """The controlled model's output ``F_base(x, t, cond; residuals = scale * ControlNet(...))`` [B, H, W, C_out]."""
  residuals = controlnet.apply({'params': control_params}, x, t, cond, control, scale=scale, train=train, rngs=rngs)
  return base.apply({'params': base_params}, x, t, cond, train=train, rngs=rngs, residuals=residuals)
