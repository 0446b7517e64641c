"""Text conditioning in the trainer: ``model.text_encoder`` and ``sample.prompts`` -> tokenizer, model, conditions.

With ``model.text_encoder`` set (a preset of :data:`diffax.models.text_conditioned.TEXT_ENCODER_PRESETS`), the
data must carry captions (``data.name='digits_captions'``, :mod:`diffax.data.captions`) and no class labels
(``data.num_classes=0``): the condition of every example is its caption's token ids [L], the backbone gets
``context_dim`` = the encoder's width, and the model is :class:`~diffax.models.text_conditioned.TextConditioned`
(text encoder and backbone trained together). Captions are dropped to the empty caption with probability
``diffusion.p_uncond``, and guidance (``sample.guidance_scale``) contrasts a prompt with the empty caption.

Sample grids show ``sample.prompts`` (``'a thin seven;a bold zero'``: prompts separated by ``;``, cycled over the
grid) or, without prompts, the held-out (test split) captions in order; evaluation cycles through the held-out
captions. A prompt with a word outside the vocabulary or longer than the context is a ConfigError naming
``sample.prompts``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import ml_collections
import numpy as np

from diffax.data import captions
from diffax.models import text_conditioned
from diffax.trainer.config import ConfigError

CAPTIONED_DATA = ('digits_captions',)
"""``data.name`` values whose records carry caption token ids."""


def prompts_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """``sample.prompts`` split at ``;`` (surrounding spaces removed); () when unset."""
  return tuple(p.strip() for p in config.sample.prompts.split(';')) if config.sample.prompts.strip() else ()


@dataclasses.dataclass(frozen=True)
class TextConditioning:
  """The caption tokenizer and the conditions a text run samples and evaluates with.

  Attributes:
    tokenizer: captions -> ids [N, L] int32.
    prompts: ``sample.prompts`` (or () for the held-out captions).
  """
  tokenizer: captions.CaptionTokenizer
  prompts: tuple[str, ...]

  @property
  def cond_shape(self) -> tuple[int]:
    return (self.tokenizer.context_length,)

  @property
  def null_tokens(self) -> tuple[int, ...]:
    """The empty caption's ids: the null condition of caption dropout and guidance."""
    return tuple(int(i) for i in self.tokenizer.empty_ids)

  def grid_tokens(self, n: int) -> np.ndarray:
    """Ids [n, L] int32 of a sample grid: the prompts cycled, or the first n held-out captions (cycled)."""
    texts = self.prompts or held_out().captions
    return self.tokenizer([texts[i % len(texts)] for i in range(n)])

  def held_out(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation conditions of sample numbers ``index`` [B]: held-out caption ids [B, L] int32 and what the captions
    say, [B, 3] int32 (digit, thickness bin, slant bin; :mod:`diffax.data.captions`)."""
    source = held_out()
    i = np.asarray(index) % len(source)
    said = np.concatenate([source.labels[i, None], source.attributes[i]], axis=1).astype(np.int32)
    return source.tokens[i], said


def held_out() -> captions.CaptionedDigitsSource:
  return captions.CaptionedDigitsSource('test')


def from_config(config: ml_collections.ConfigDict) -> TextConditioning | None:
  """The run's :class:`TextConditioning`, or None without ``model.text_encoder``; ConfigErrors name the key."""
  prompts = prompts_of(config)
  if not config.model.text_encoder:
    if prompts:
      raise ConfigError('sample.prompts', 'prompts condition a text model: set model.text_encoder (e.g. '
                        "'clip_tiny') and data.name='digits_captions'.")
    return None
  if config.model.text_encoder not in text_conditioned.TEXT_ENCODER_PRESETS:
    raise ConfigError('model.text_encoder', f'{config.model.text_encoder!r} is not one of '
                      f'{sorted(text_conditioned.TEXT_ENCODER_PRESETS)}.')
  if config.data.name not in CAPTIONED_DATA:
    raise ConfigError('data.name', f'a text model trains on captioned data ({list(CAPTIONED_DATA)}), not '
                      f'{config.data.name!r}.')
  if config.data.num_classes:
    raise ConfigError('data.num_classes', 'a text model is conditioned on captions, not labels: set 0.')
  tokenizer = captions.tokenizer()
  if any(not p for p in prompts):
    raise ConfigError('sample.prompts', f'{config.sample.prompts!r} has an empty prompt; separate prompts by ";".')
  try:
    tokenizer(list(prompts))
  except ValueError as e:
    raise ConfigError('sample.prompts', str(e)) from e
  return TextConditioning(tokenizer, prompts)


def backbone_fields(config: ml_collections.ConfigDict) -> dict[str, int]:
  """``{'context_dim': D_text}`` for a text model's backbone, {} otherwise."""
  if not config.model.text_encoder:
    return {}
  return {'context_dim': text_conditioned.TEXT_ENCODER_PRESETS[config.model.text_encoder]['width']}


def conditioned(config: ml_collections.ConfigDict, backbone: nn.Module) -> nn.Module:
  """``backbone`` itself, or wrapped with the configured text encoder over the captions' tokenizer."""
  if not config.model.text_encoder:
    return backbone
  tokenizer = captions.tokenizer()
  encoder = text_conditioned.text_encoder(config.model.text_encoder, vocab_size=tokenizer.vocab_size,
                                          context_length=tokenizer.context_length,
                                          eos_token_id=tokenizer.eos_token_id, dtype=backbone.dtype)
  return text_conditioned.TextConditioned(backbone, encoder)
