"""CLIP score: how well images follow their prompts, ``100 * cos(E_I(image), E_T(prompt))`` (Hessel et al. 2021,
eq. 1 with weight 100 instead of 2.5, as torchmetrics' ``CLIPScore`` and the text-to-image literature report it).

The dual encoder is CLIP (Radford et al. 2021): the text tower of :mod:`diffax.models.text` and a ViT image
tower (Dosovitskiy et al. 2021): non-overlapping patches by a strided conv, a class token, learned positions,
pre-LN, a bidirectional transformer, LN of the class token; each tower ends in a linear projection to the joint
space. Module names follow transformers' ``CLIPModel`` (``vision_model.pre_layrnorm`` included), so its
safetensors convert name by name (:func:`diffax.models.convert.clip.clip_params_from_transformers`).

Protocol (record it with the score, as FID records its network): images in [-1, 1] -> [0, 1] -> the shorter side
resized to ``image_size`` (antialiased bicubic, ``jax.image.resize``; OpenAI and transformers resize with PIL's
bicubic, so a score differs from theirs by the resampling only) -> centre crop -> normalised with CLIP's mean and
std -> image embedding; the prompt through CLIP's tokenizer (77 tokens, no truncation) -> text embedding; the
per-pair score ``100 * cos``; a set's score is ``max(mean, 0)`` (torchmetrics). Weights: openai/clip-vit-large-patch14
(``HOW_TO_GET``), the model used by most text-to-image papers' CLIP scores.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffax.models import layers
from diffax.models import text
from diffax.models.convert import clip as convert_clip
from diffax.models.convert import safetensors_io

Array = jax.Array

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel RGB normalisation of CLIP's image preprocessing (openai/CLIP ``_transform``)."""


class VisionEmbeddings(nn.Module):
  """Images [B, S, S, 3] -> [class token, patch embeddings] + positions: [B, 1 + (S/p)^2, D]."""
  width: int
  patch_size: int
  image_size: int

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    b = pixels.shape[0]
    patches = nn.Conv(self.width, (self.patch_size,) * 2, strides=(self.patch_size,) * 2, padding='VALID',
                      use_bias=False, param_dtype=jnp.float32, name='patch_embedding')(pixels)
    patches = patches.reshape(b, -1, self.width)  # [B, N, D]
    cls = self.param('class_embedding', nn.initializers.normal(self.width ** -0.5), (self.width,))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)), patches], axis=1)
    num_positions = (self.image_size // self.patch_size) ** 2 + 1
    positions = nn.Embed(num_positions, self.width, param_dtype=jnp.float32, name='position_embedding')
    return x + positions(jnp.arange(num_positions))[None]


class CLIPVisionTransformer(nn.Module):
  """CLIP's ViT image tower: ``apply(v, pixels [B, S, S, 3] normalised) -> pooled [B, D]`` (LN of the class token)."""
  width: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  mlp_dim: int = 4096
  patch_size: int = 14
  image_size: int = 224
  activation: str = 'quick_gelu'

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    if pixels.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f'The CLIP image tower takes [B, {self.image_size}, {self.image_size}, 3] images; got '
                       f'{pixels.shape} (see preprocess).')
    x = VisionEmbeddings(self.width, self.patch_size, self.image_size, name='embeddings')(pixels)
    x = text.layer_norm('pre_layrnorm')(x)
    _, x = text.Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.activation, name='encoder')(x)
    return text.layer_norm('post_layernorm')(x[:, 0])


class CLIP(nn.Module):
  """Both towers and their projections to the joint space: ``apply(v, input_ids, pixels)`` -> (text embeddings
  [B, P], image embeddings [B, P]), not normalised (HF ``get_text_features`` / ``get_image_features``)."""
  text_model: text.CLIPTextTransformer
  vision_model: CLIPVisionTransformer
  projection_dim: int = 768

  def example_inputs(self) -> tuple[Array, Array]:
    size = self.vision_model.image_size
    return self.text_model.example_inputs() + (jnp.zeros((1, size, size, 3), jnp.float32),)

  def setup(self):
    project = lambda name: layers.dense(self.projection_dim, ('embed', 'mlp'), use_bias=False, name=name)
    self.text_projection = project('text_projection')
    self.visual_projection = project('visual_projection')

  def encode_text(self, input_ids: Array) -> Array:
    return self.text_projection(self.text_model(input_ids).pooled)

  def encode_image(self, pixels: Array) -> Array:
    return self.visual_projection(self.vision_model(pixels))

  def __call__(self, input_ids: Array, pixels: Array) -> tuple[Array, Array]:
    return self.encode_text(input_ids), self.encode_image(pixels)


CLIP_PRESETS: dict[str, dict[str, Any]] = {
    # openai/clip-vit-large-patch14: 427,616,512 parameters (transformers' 427,616,513 with logit_scale).
    'vit_l14': dict(text=text.TEXT_PRESETS['vit_l14'], vision=dict(width=1024, num_layers=24, num_heads=16,
                                                                    mlp_dim=4096, patch_size=14, image_size=224),
                    projection_dim=768),
}
"""CLIP fields by preset: ``get_clip('vit_l14')``."""


def get_clip(preset: str | None = 'vit_l14', *, text_fields: dict | None = None, vision_fields: dict | None = None,
             projection_dim: int | None = None) -> CLIP:
  """The ``preset`` CLIP with its tower fields updated by ``text_fields`` / ``vision_fields``."""
  fields = {'text': {}, 'vision': {}, 'projection_dim': 768}
  if preset:
    if preset not in CLIP_PRESETS:
      raise ValueError(f'Unknown CLIP preset {preset!r}; choose one of {sorted(CLIP_PRESETS)}.')
    fields = CLIP_PRESETS[preset]
  return CLIP(text.CLIPTextTransformer(**(fields['text'] | (text_fields or {}))),
              CLIPVisionTransformer(**(fields['vision'] | (vision_fields or {}))),
              projection_dim or fields['projection_dim'])


def load_clip(path: str | os.PathLike | None = None, *, preset: str | None = 'vit_l14',
              **fields: Any) -> tuple[CLIP, dict]:
  """The ``preset`` CLIP (``fields`` as for :func:`get_clip`) and its params from a transformers ``CLIPModel``
  safetensors (defaults to ``$DIFFAX_CLIP_WEIGHTS``).

  Raises:
    FileNotFoundError: no file; the message gives the download command.
    ValueError: the file's names or shapes do not match the preset.
  """
  model = get_clip(preset, **fields)
  where = safetensors_io.resolve_path(path, env_var=convert_clip.ENV_VAR, what='CLIP',
                                      how_to_get=convert_clip.HOW_TO_GET)
  return model, convert_clip.clip_params_from_transformers(safetensors_io.read_safetensors(where), model)


def preprocess(images: Array, image_size: int) -> Array:
  """Images [B, H, W, 3] in [-1, 1] -> CLIP's input [B, image_size, image_size, 3]: shorter side resized to
  ``image_size`` (antialiased bicubic), centre crop, ``(x - CLIP_MEAN) / CLIP_STD`` on [0, 1] values."""
  b, h, w, _ = images.shape
  scale = image_size / min(h, w)
  rh, rw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
  x = (images.astype(jnp.float32) + 1.0) / 2.0
  if (rh, rw) != (h, w):
    x = jnp.clip(jax.image.resize(x, (b, rh, rw, 3), 'bicubic', antialias=True), 0.0, 1.0)
  top, left = (rh - image_size) // 2, (rw - image_size) // 2
  x = x[:, top:top + image_size, left:left + image_size]
  mean, std = (jnp.asarray(v, jnp.float32).reshape(1, 1, 1, 3) for v in (CLIP_MEAN, CLIP_STD))
  return (x - mean) / std


def cosine_score(image_embeds: Array, text_embeds: Array) -> Array:
  """``100 * <e_I, e_T> / (|e_I| |e_T|)`` per pair: [B, P], [B, P] -> [B]."""
  unit = lambda e: e / jnp.linalg.norm(e, axis=-1, keepdims=True)
  return 100.0 * jnp.sum(unit(image_embeds.astype(jnp.float32)) * unit(text_embeds.astype(jnp.float32)), axis=-1)


def make_clip_score_fn(model: CLIP, params: dict):
  """A jitted ``(images [B, H, W, 3] in [-1, 1], input_ids [B, 77]) -> [B]`` per-pair CLIP score; tokenize the
  prompts with :class:`diffax.models.text.CLIPTokenizer`."""

  @jax.jit
  def score(images: Array, input_ids: Array) -> Array:
    text_embeds, image_embeds = model.apply({'params': params}, input_ids,
                                            preprocess(images, model.vision_model.image_size))
    return cosine_score(image_embeds, text_embeds)

  return score


def aggregate(scores: np.ndarray) -> float:
  """A set's CLIP score: ``max(mean of the per-pair scores, 0)`` (torchmetrics' ``CLIPScore.compute``)."""
  return float(max(np.mean(scores), 0.0))
