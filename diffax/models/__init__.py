"""Backbones by name: ``get_model('unet', preset='ddpm_cifar10', dtype='bfloat16')``.

Every backbone is a Linen module called as ``model.apply({'params': p}, x [B,H,W,C], t [B], cond, train=...)``
(see :mod:`diffax.models.layers` for the shared conventions: NHWC, null label, mixed precision, logical axes).
``spatial_dims=1`` / ``3`` makes the same U-Net and DiT take sequences [B, L, C] and clips [B, T, H, W, C].
Latent diffusion's autoencoder is :class:`AutoencoderKL` (``get_autoencoder('sd')``), its text encoder
:class:`~diffax.models.text.CLIPTextTransformer`; published weights load through :mod:`diffax.models.convert`.
"""

from typing import Any

import flax.linen as nn

from diffax.models import layers
from diffax.models import text
from diffax.models.autoencoder import AUTOENCODER_PRESETS, AutoencoderKL, get_autoencoder
from diffax.models.dit import DIT_PRESETS, DiT
from diffax.models.unet import UNET_PRESETS, UNet

MODELS: dict[str, type[nn.Module]] = {'unet': UNet, 'dit': DiT}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {'unet': UNET_PRESETS, 'dit': DIT_PRESETS}


def get_model(name: str, *, preset: str | None = None, **overrides: Any) -> nn.Module:
  """The backbone ``name`` built from ``preset``'s fields (if given) updated by ``overrides``."""
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; choose one of {sorted(MODELS)}.')
  fields = {}
  if preset:
    if preset not in PRESETS[name]:
      raise ValueError(f'Unknown {name} preset {preset!r}; choose one of {sorted(PRESETS[name])}.')
    fields.update(PRESETS[name][preset])
  fields.update(overrides)
  return MODELS[name](**fields)


__all__ = ['AUTOENCODER_PRESETS', 'AutoencoderKL', 'DIT_PRESETS', 'DiT', 'MODELS', 'PRESETS', 'UNET_PRESETS', 'UNet',
           'get_autoencoder', 'get_model', 'layers', 'text']
