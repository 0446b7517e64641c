"""A text-conditioned denoiser: a text encoder and a backbone trained as one model (Stable Diffusion's conditioning
path with the encoder learnt jointly, as Imagen's ablations and small text-to-image demos do).

``TextConditioned(backbone, text_encoder)`` maps token ids [B, L] to the encoder's context [B, L, D_text]
(:class:`diffax.models.text.CLIPTextTransformer`, ``hidden_state`` chooses which) and calls the backbone with it
as its cross-attention context (the U-Net's ``context_dim`` or the DiT's ``context_dim`` = D_text). Its
parameters are ``{'text_encoder': ..., 'backbone': ...}``, so one optimizer, one EMA and one checkpoint hold both.
Classifier-free guidance drops whole captions to the empty caption's ids (``losses.CondDropout(null_tokens=...)``),
so the null condition goes through the same encoder.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from diffax.models import text

Array = jax.Array

TEXT_ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    **text.TEXT_PRESETS,
    # A CPU-sized CLIP text tower for the captioned-digits demo: 2 layers of width 64, 4 heads (vocabulary and
    # context come from the tokenizer).
    'clip_tiny': dict(width=64, num_layers=2, num_heads=4, mlp_dim=256),
}
""":class:`~diffax.models.text.CLIPTextTransformer` fields by name: the published towers and ``clip_tiny``."""


class TextConditioned(nn.Module):
  """``apply({'params': p}, x [B, ...], t [B], token_ids [B, L] int, train=...) -> backbone(x, t, context)``.

  Attributes:
    backbone: a U-Net or DiT whose ``context_dim`` is the text encoder's width.
    text_encoder: the text tower (trained with the backbone).
  """
  backbone: nn.Module
  text_encoder: text.CLIPTextTransformer

  @property
  def spatial_dims(self) -> int:
    return getattr(self.backbone, 'spatial_dims', 2)

  @nn.compact
  def __call__(self, x: Array, t: Array, cond: Array, *, train: bool = False, **hooks: Any) -> Array:
    """``cond``: token ids [B, L] int32 (the empty caption's ids for the null condition); ``hooks`` (ControlNet's
    ``hint`` / ``residuals`` / ``encoder_only``) pass to the backbone."""
    if cond is None or cond.ndim != 2 or cond.shape[0] != x.shape[0]:
      raise ValueError(f'A text-conditioned model takes token ids [B, L] as its condition; got '
                       f'{None if cond is None else cond.shape} for x {x.shape}.')
    context = self.text_encoder(cond).context  # [B, L, D_text] float32
    return self.backbone(x, t, context, train=train, **hooks)


def text_encoder(preset: str, *, vocab_size: int, context_length: int, eos_token_id: int,
                 **overrides: Any) -> text.CLIPTextTransformer:
  """The text tower ``preset`` (:data:`TEXT_ENCODER_PRESETS`) over a tokenizer's vocabulary and context."""
  if preset not in TEXT_ENCODER_PRESETS:
    raise ValueError(f'Unknown text encoder {preset!r}; choose one of {sorted(TEXT_ENCODER_PRESETS)}.')
  fields = {**TEXT_ENCODER_PRESETS[preset], 'vocab_size': vocab_size, 'context_length': context_length,
            'eos_token_id': eos_token_id, **overrides}
  return text.CLIPTextTransformer(**fields)
