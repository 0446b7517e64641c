"""Hugging Face ``CLIPTextModel`` / ``CLIPModel`` safetensors -> diffax CLIP params.

The Flax modules carry transformers' names (``text_model.encoder.layers.3.self_attn.q_proj.weight`` ->
``encoder/layers_3/self_attn/q_proj/kernel`` of :class:`~diffax.models.text.CLIPTextTransformer`), so the
mapping is the generic one of :mod:`~diffax.models.convert.safetensors_io`. Skipped: ``position_ids`` (a buffer
older transformers saved) and ``logit_scale`` (the contrastive temperature, which no score here uses).
Usage::

  encoder, params = load_text_encoder('clip-vit-large-patch14.safetensors', preset='vit_l14')
  context = encoder.apply({'params': params}, tokenizer(['a photo of a cat'])).context  # [1, 77, 768]
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import numpy as np

from diffax.models import text
from diffax.models.convert import safetensors_io

ENV_VAR = 'DIFFAX_CLIP_WEIGHTS'
HOW_TO_GET = f"""Nothing is downloaded at run time. Download CLIP ViT-L/14 (both towers; SD 1.x's text encoder) once:
  curl -L -o clip-vit-large-patch14.safetensors \\
    https://huggingface.co/openai/clip-vit-large-patch14/resolve/main/model.safetensors
then pass the path or export {ENV_VAR}=$PWD/clip-vit-large-patch14.safetensors."""

_SKIPPED = ('logit_scale',)


def _skip(name: str) -> bool:
  return name in _SKIPPED or name.endswith('.position_ids')


def text_params_from_transformers(state_dict: dict[str, np.ndarray], model: text.CLIPTextTransformer) -> dict:
  """The ``text_model.*`` tensors of a ``CLIPTextModel`` or ``CLIPModel`` file -> ``model``'s params.

  Raises:
    ValueError: a missing, unexpected or mis-shaped tensor (all are listed).
  """
  rename = lambda name: (name.removeprefix('text_model.') if name.startswith('text_model.') and not _skip(name)
                         else None)
  return safetensors_io.convert_state_dict(state_dict, safetensors_io.param_shapes(model, *model.example_inputs()),
                                           what='CLIP text', rename=rename)


def clip_params_from_transformers(state_dict: dict[str, np.ndarray], model: nn.Module) -> dict:
  """Every tensor of a ``CLIPModel`` file -> the params of a two-tower ``model`` named like it
  (``text_model``, ``vision_model``, ``text_projection``, ``visual_projection``; see diffax.evaluation.clip_score)."""
  return safetensors_io.convert_state_dict(state_dict, safetensors_io.param_shapes(model, *model.example_inputs()),
                                           what='CLIP', rename=lambda name: None if _skip(name) else name)


def load_text_encoder(path: str | os.PathLike | None = None, *, preset: str | None = 'vit_l14',
                      **overrides: Any) -> tuple[text.CLIPTextTransformer, dict]:
  """The ``preset`` text encoder (fields updated by ``overrides``, e.g. ``hidden_state='penultimate'``) and its
  params from a ``CLIPTextModel`` / ``CLIPModel`` safetensors (defaults to ``$DIFFAX_CLIP_WEIGHTS``).

  Raises:
    FileNotFoundError: no file; the message gives the download command.
    ValueError: the file's names or shapes do not match the preset.
  """
  fields = {}
  if preset:
    if preset not in text.TEXT_PRESETS:
      raise ValueError(f'Unknown text encoder preset {preset!r}; choose one of {sorted(text.TEXT_PRESETS)}.')
    fields.update(text.TEXT_PRESETS[preset])
  model = text.CLIPTextTransformer(**(fields | overrides))
  where = safetensors_io.resolve_path(path, env_var=ENV_VAR, what='CLIP text encoder', how_to_get=HOW_TO_GET)
  return model, text_params_from_transformers(safetensors_io.read_safetensors(where), model)
