"""The CLIP score of generated images against the prompts they were drawn for, as a streaming evaluator.

``score = max(mean_i 100 cos(E_I(x_i), E_T(p_i)), 0)`` over all samples (:mod:`diffax.evaluation.clip_score`:
Hessel et al. 2021 eq. 1 with weight 100, torchmetrics' aggregation). Grey images [B, H, W, 1] are repeated to RGB
before CLIP's preprocessing (the shorter side resized to the image tower's size by antialiased bicubic, centre
crop, CLIP's normalisation). The protocol records the weights' and tokenizer's SHA-256 and that preprocessing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from diffax.evaluation import clip_score, stats
from diffax.models import text


class ClipScoreEvaluator:
  """Streams samples and what they were drawn for; ``result()`` is ``{'clip_score'}``.

  Args:
    model, params: a CLIP (:func:`diffax.evaluation.clip_score.load_clip`).
    tokenizer: CLIP's BPE tokenizer (:class:`diffax.models.text.CLIPTokenizer`) over the text tower's context.
    prompts_of: the labels an evaluation passes to ``update`` ([B, ...] numpy) -> the B prompts.
    files: the weights and tokenizer files, hashed into the protocol.
  """

  def __init__(self, model: clip_score.CLIP, params: dict, tokenizer: text.CLIPTokenizer,
               prompts_of: Callable[[np.ndarray], Sequence[str]], *, files: Sequence[str | os.PathLike] = ()):
    self.model, self.tokenizer, self.prompts_of = model, tokenizer, prompts_of
    self._score = clip_score.make_clip_score_fn(model, params)
    self._files = tuple(files)
    self.reset()

  def reset(self) -> None:
    self._sum, self._count = 0.0, 0

  def update(self, images: Any, labels: Any | None = None) -> None:
    """``images`` [B, H, W, 1 or 3] in [-1, 1]; ``labels`` [B, ...], read by ``prompts_of``."""
    if labels is None:
      raise ValueError('The CLIP score needs the prompt of every sample: pass its labels.')
    images = jnp.asarray(multihost_utils.process_allgather(images, tiled=True), jnp.float32)
    if images.shape[-1] == 1:
      images = jnp.repeat(images, 3, axis=-1)
    prompts = self.prompts_of(np.asarray(multihost_utils.process_allgather(labels, tiled=True)))
    scores = np.asarray(self._score(images, jnp.asarray(self.tokenizer(list(prompts)))), np.float64)  # [B]
    self._sum += float(scores.sum())
    self._count += scores.shape[0]

  def result(self) -> dict[str, float]:
    return {'clip_score': clip_score.aggregate(np.array([self._sum / max(self._count, 1)]))}

  def protocol(self) -> dict[str, Any]:
    return {'metric': 'clip_score', 'clip_score': '100 cos(E_I, E_T) per pair, max(mean, 0) over the set',
            'clip_image_size': self.model.vision_model.image_size,
            'clip_preprocess': 'grey repeated to RGB, shorter side bicubic (antialiased) to the size, centre crop, '
                               'CLIP mean / std',
            'clip_context_length': self.tokenizer.context_length,
            **{f'sha256_{os.path.basename(os.fspath(f))}': stats.file_sha256(f) for f in self._files}}
