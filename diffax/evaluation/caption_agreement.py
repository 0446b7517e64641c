"""Does a text-to-digits model draw what its caption says? Agreement of samples with their held-out captions.

For samples drawn from captions ``a [thin|bold] <digit> [leaning left|leaning right]``
(:mod:`diffax.data.captions`), given what each caption says as ``labels`` [B, 3] int (digit, thickness bin, slant
bin in {-1, 0, 1}):

* ``caption_digit_agreement``: the fraction the digits classifier (:mod:`diffax.evaluation.digits`, held-out
  accuracy ~99 %) reads as the caption's digit (chance 0.1);
* ``caption_thickness_agreement`` / ``caption_slant_agreement``: the fraction whose measured ink mass / slant falls
  in the caption's tertile bin of that digit (:func:`diffax.data.captions.attributes`; chance 1/3, real images
  1 by construction of their captions);
* ``digits_fd``: the Fréchet distance of the classifier's features to the real test digits, as the digits metric.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax.experimental import multihost_utils

from diffax.data import captions
from diffax.evaluation import digits, evaluators


class CaptionAgreementEvaluator:
  """Streams samples with what their captions say; see the module docstring for the metrics."""

  def __init__(self, classifier: digits.DigitsClassifier | None = None, *, cache_dir: str | None = None):
    self.digits = evaluators.DigitsEvaluator(classifier, cache_dir=cache_dir)
    self.reset()

  def reset(self) -> None:
    self.digits.reset()
    self._agree, self._count = np.zeros(2), 0

  def update(self, images: Any, labels: Any | None = None) -> None:
    """``images`` [B, 8, 8, 1] in [-1, 1]; ``labels`` [B, 3] int (digit, thickness bin, slant bin)."""
    if labels is None:
      raise ValueError('The caption agreement needs what each sample\'s caption says: labels [B, 3].')
    said = np.asarray(multihost_utils.process_allgather(labels, tiled=True))
    self.digits.update(images, said[:, 0])
    measured = captions.attributes(np.asarray(multihost_utils.process_allgather(images, tiled=True)), said[:, 0])
    self._agree += np.sum(measured == said[:, 1:], axis=0)
    self._count += said.shape[0]

  def result(self) -> dict[str, float]:
    out = self.digits.result()
    return {'caption_digit_agreement': out['digits_accuracy'], 'caption_thickness_agreement':
            float(self._agree[0] / self._count), 'caption_slant_agreement': float(self._agree[1] / self._count),
            'digits_fd': out['digits_fd']}

  def protocol(self) -> dict[str, Any]:
    return {**self.digits.protocol(), 'metric': 'captions',
            'captions': "held-out captions: CaptionedDigitsSource('test') in order, cycled",
            'attribute_bins': 'per-class tertiles of ink mass and slant on the training split'}
