"""Per-frame and temporal quality of moving-digits clips, in the digits classifier's features.

Every frame [32, 32] is reduced to its digit: the 8x8 window centred on the frame's centre of intensity is cut
out and fed to the embedded digits classifier (:mod:`diffax.evaluation.digits`). Then

  * ``frame_fd``: the Fréchet distance (Heusel et al. 2017, eq. 6) between Gaussians fitted to the classifier's
    penultimate features [128] of all generated frames and of all frames of the real ``'test'`` clips (does each
    frame show a digit?);
  * ``temporal_fd``: the Fréchet distance of per-clip dynamics features [6] (is the clip one digit moving like
    the real ones?): the mean and the standard deviation of the speed ``|p_{f+1} - p_f|`` of the window's corner
    ``p_f``, the mean ``|p_{f+2} - 2 p_{f+1} + p_f|`` (constant velocity but at bounces), the mean cosine
    similarity of consecutive frames' features (the same digit throughout), and the mean and standard deviation
    over frames of the frame's total intensity (no flicker, no fading);
  * ``clip_accuracy`` (class-conditional samples): the fraction of clips whose majority per-frame class is the
    intended label.

Real test clips, like the training ones, come from :class:`diffax.data.moving_digits.MovingDigitsSource`; with
their 359 clips the distances have a sampling floor: 359 real ``'train'`` clips of 8 frames score ``frame_fd`` 11.0
and ``temporal_fd`` 0.0014, uniform noise 216 and 4.8, the same clips with their frames shuffled 11.0 and 67
(``tests/test_media_metrics.py``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from diffax.data import moving_digits
from diffax.evaluation import digits, stats

Array = jax.Array
TEMPORAL_DIM = 6


def locate(frames: Array) -> tuple[Array, Array]:
  """(corners int [N, 2], crops [N, 8, 8, 1]) of the 8x8 windows of ``frames`` [N, H, W, 1] in [-1, 1] centred on
  each frame's centre of intensity (the embedded digits are centred in their 8x8 boxes); jittable."""
  size = moving_digits.DIGIT
  x = (frames[..., 0] + 1.0) / 2.0
  mass = jnp.maximum(jnp.sum(x, axis=(1, 2)), 1e-6)
  i, j = jnp.arange(x.shape[1], dtype=x.dtype), jnp.arange(x.shape[2], dtype=x.dtype)
  centre = jnp.stack([jnp.sum(x * i[None, :, None], axis=(1, 2)),
                      jnp.sum(x * j[None, None, :], axis=(1, 2))], axis=-1) / mass[:, None]
  limit = jnp.asarray(x.shape[1:3], x.dtype)[None] - size
  corners = jnp.clip(jnp.rint(centre - (size - 1) / 2), 0, limit).astype(jnp.int32)  # [N, 2]
  offsets = jnp.arange(size)
  rows = corners[:, :1] + offsets[None]
  cols = corners[:, 1:] + offsets[None]
  crops = frames[jnp.arange(len(x))[:, None, None], rows[:, :, None], cols[:, None, :]]  # [N, 8, 8, 1]
  return corners, crops


def clip_features(classifier: digits.DigitsClassifier, clips: Array) -> tuple[Array, Array, Array]:
  """(frame features [N T, 128], temporal features [N, 6], frame logits [N, T, 10]) of ``clips`` [N, T, H, W, 1]
  in [-1, 1]; jittable."""
  n, t = clips.shape[:2]
  frames = clips.reshape(n * t, *clips.shape[2:])
  corners, crops = locate(frames)
  features, logits = classifier.features(crops), classifier.logits(crops)
  p = corners.reshape(n, t, 2).astype(jnp.float32)
  speed = jnp.linalg.norm(jnp.diff(p, axis=1), axis=-1)  # [N, T - 1]
  accel = jnp.linalg.norm(jnp.diff(p, n=2, axis=1), axis=-1) if t > 2 else jnp.zeros((n, 1))
  f = features.reshape(n, t, -1)
  unit = f / jnp.maximum(jnp.linalg.norm(f, axis=-1, keepdims=True), 1e-6)
  consistency = jnp.sum(unit[:, 1:] * unit[:, :-1], axis=-1)  # [N, T - 1]
  mass = jnp.mean((clips + 1.0) / 2.0, axis=(2, 3, 4))  # [N, T]
  temporal = jnp.stack([speed.mean(1), speed.std(1), accel.mean(1), consistency.mean(1), mass.mean(1),
                        mass.std(1)], axis=-1)
  return features, temporal, logits.reshape(n, t, -1)


class MovingDigitsEvaluator:
  """Streaming ``frame_fd``, ``temporal_fd`` and ``clip_accuracy`` (module docstring) of clips [B, T, 32, 32, 1]."""

  def __init__(self, classifier: digits.DigitsClassifier | None = None, *, num_frames: int,
               cache_dir: str | None = None):
    if num_frames < 2:
      raise ValueError(f'The temporal metric needs clips of 2 frames or more, got num_frames={num_frames} '
                       '(config key data.num_frames).')
    self.classifier = classifier or digits.DigitsClassifier.load_or_train(cache_dir)
    self.num_frames = num_frames
    self._fn = jax.jit(lambda x: clip_features(self.classifier, x))
    real = moving_digits.MovingDigitsSource('test', num_frames=num_frames)
    clips = np.stack([real[i]['video'] for i in range(len(real))]).astype(np.float32) / 127.5 - 1
    self.reference_frames = stats.FeatureStats(dim=digits.FEATURE_DIM)
    self.reference_temporal = stats.FeatureStats(dim=TEMPORAL_DIM)
    for start in range(0, len(clips), 128):
      frames, temporal, _ = self._fn(jnp.asarray(clips[start:start + 128]))
      self.reference_frames.update(np.asarray(frames, np.float64))
      self.reference_temporal.update(np.asarray(temporal, np.float64))
    self.reset()

  def reset(self) -> None:
    self._frames = stats.FeatureStats(dim=digits.FEATURE_DIM)
    self._temporal = stats.FeatureStats(dim=TEMPORAL_DIM)
    self._correct, self._labelled = 0, 0

  def update(self, images: Any, labels: Any | None = None) -> None:
    if images.ndim != 5 or images.shape[1] != self.num_frames:
      raise ValueError(f'Expected clips [B, {self.num_frames}, 32, 32, 1] (config key data.num_frames), got '
                       f'{images.shape}.')
    frames, temporal, logits = multihost_utils.process_allgather(self._fn(images), tiled=True)
    self._frames.update(np.asarray(frames, np.float64))
    self._temporal.update(np.asarray(temporal, np.float64))
    if labels is not None:
      votes = np.argmax(np.asarray(logits), axis=-1)  # [B, T]
      majority = np.array([np.bincount(v, minlength=logits.shape[-1]).argmax() for v in votes])
      self._correct += int(np.sum(majority == np.asarray(multihost_utils.process_allgather(labels, tiled=True))))
      self._labelled += len(majority)

  def result(self) -> dict[str, float]:
    out = {
        'frame_fd': stats.frechet_distance(self._frames.mean, self._frames.cov, self.reference_frames.mean,
                                           self.reference_frames.cov),
        'temporal_fd': stats.frechet_distance(self._temporal.mean, self._temporal.cov,
                                              self.reference_temporal.mean, self.reference_temporal.cov),
    }
    if self._labelled:
      out['clip_accuracy'] = self._correct / self._labelled
    return out

  def protocol(self) -> dict[str, Any]:
    return {'metric': 'moving_digits', 'classifier_recipe': digits.recipe_hash(), 'num_frames': self.num_frames,
            'reference': "MovingDigitsSource('test')"}
