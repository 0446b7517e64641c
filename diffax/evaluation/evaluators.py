"""Streaming evaluators: feed generated batches as they come, read the metrics at the end.

An evaluator's ``update(images, labels)`` takes a global batch (a ``jax.Array`` sharded over the mesh, or a
host array) of images [B, H, W, C] in [-1, 1] and, for class-conditional samples, their intended labels [B].
The feature network runs jitted on the sharded batch; only the small feature vectors come back to the host
(gathered from every process), where statistics accumulate in float64. No evaluator holds the images.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils

from diffax.evaluation import digits, inception, inception_weights, reconstruction, stats


class Evaluator(Protocol):

  def reset(self) -> None:
    """Forgets every update (the loaded networks and reference statistics are kept)."""
    ...

  def update(self, images: Any, labels: Any | None = None) -> None:
    ...

  def result(self) -> dict[str, float]:
    ...

  def protocol(self) -> dict[str, Any]:
    """What a reader needs to reproduce the numbers (weights, reference statistics and their hashes)."""
    ...


def _to_host(tree: Any) -> Any:
  """Global arrays -> numpy on every process (a no-op gather for one process)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


class DigitsEvaluator:
  """The embedded default's metric: Fréchet distance in a digits classifier's features, and class accuracy."""

  def __init__(self, classifier: digits.DigitsClassifier | None = None, *, cache_dir: str | None = None):
    self.classifier = classifier or digits.DigitsClassifier.load_or_train(cache_dir)
    self._fn = jax.jit(lambda x: (self.classifier.features(x), jax.nn.log_softmax(self.classifier.logits(x))))
    self.reset()

  def reset(self) -> None:
    self._stats = stats.FeatureStats(dim=digits.FEATURE_DIM)
    self._correct, self._confidence, self._labelled = 0.0, 0.0, 0

  def update(self, images: Any, labels: Any | None = None) -> None:
    features, log_p = _to_host(self._fn(images))
    self._stats.update(np.asarray(features, np.float64))
    if labels is not None:
      labels = np.asarray(_to_host(labels))
      log_p = np.asarray(log_p, np.float64)
      self._correct += float(np.sum(np.argmax(log_p, axis=-1) == labels))
      self._confidence += float(np.sum(np.exp(np.take_along_axis(log_p, labels[:, None], axis=-1))))
      self._labelled += labels.shape[0]

  def result(self) -> dict[str, float]:
    c = self.classifier
    out = {'digits_fd': stats.frechet_distance(self._stats.mean, self._stats.cov, c.reference_mu, c.reference_sigma)}
    if self._labelled:
      out['digits_accuracy'] = self._correct / self._labelled
      out['digits_confidence'] = self._confidence / self._labelled
    return out

  def protocol(self) -> dict[str, Any]:
    return {'metric': 'digits', 'classifier_recipe': digits.recipe_hash(),
            'classifier_test_accuracy': self.classifier.test_accuracy, 'reference': "load_digits('test')"}


class InceptionEvaluator:
  """FID (Heusel et al. 2017), Inception Score (Salimans et al. 2016) and KID (Binkowski et al. 2018).

  Args:
    weights_path: converted FID Inception ``.npz`` (default ``$DIFFAX_INCEPTION_WEIGHTS``).
    reference_stats: ``.npz`` with ``mu`` / ``sigma`` of the real images' pool features (pytorch-fid format);
      KID is reported too when the file also holds ``features`` [N, 2048].
    weights_sha256: pin of the weights' content digest (optional).
    keep_features: keep every pool feature vector on the host (KID needs them; default: when the reference
      file has features).
  """

  def __init__(self, *, weights_path: str | None = None, reference_stats: str | None = None,
               weights_sha256: str | None = None, kid_subset_size: int = 1000, keep_features: bool | None = None):
    self.weights = inception_weights.load_inception_variables(weights_path, expected_sha256=weights_sha256)
    self._fn = inception.make_feature_fn(self.weights.variables)
    self.reference_path = reference_stats
    self.reference = stats.load_reference_stats(reference_stats) if reference_stats else None
    self.reference_features = None
    if reference_stats:
      with np.load(reference_stats, allow_pickle=False) as f:
        self.reference_features = f['features'] if 'features' in f.files else None
    self.kid_subset_size = kid_subset_size
    self.keep_features = self.reference_features is not None if keep_features is None else keep_features
    self.reset()

  def reset(self) -> None:
    self._stats = stats.FeatureStats(dim=inception.FEATURE_DIM)
    self._logits, self._features = [], []

  def update(self, images: Any, labels: Any | None = None) -> None:
    del labels
    out = _to_host(self._fn(images))
    pool = np.asarray(out['pool'], np.float64)
    self._stats.update(pool)
    self._logits.append(np.asarray(out['logits_unbiased'], np.float32))
    if self.keep_features:
      self._features.append(pool.astype(np.float32))

  def result(self) -> dict[str, float]:
    is_mean, is_std = stats.inception_score(np.concatenate(self._logits), splits=10)
    out = {'inception_score': is_mean, 'inception_score_std': is_std}
    if self.reference is not None:
      out['fid'] = stats.frechet_distance(self._stats.mean, self._stats.cov, *self.reference)
    if self.reference_features is not None:
      fake = np.concatenate(self._features)
      size = min(self.kid_subset_size, fake.shape[0], self.reference_features.shape[0])
      out['kid'], out['kid_std'] = stats.kernel_inception_distance(fake, self.reference_features, subset_size=size)
    return out

  def features_stats(self) -> stats.FeatureStats:
    """The accumulated pool-feature statistics (to write reference statistics of real data)."""
    return self._stats

  def pool_features(self) -> np.ndarray:
    """Every pool feature vector seen, float32 [N, 2048] (only with ``keep_features``)."""
    return np.concatenate(self._features)

  def protocol(self) -> dict[str, Any]:
    return {'metric': 'inception', 'weights_content_sha256': self.weights.content_sha256,
            'weights_source_sha256': self.weights.source_sha256, 'reference_stats': self.reference_path,
            'reference_stats_sha256': stats.file_sha256(self.reference_path) if self.reference_path else None}


class ReconstructionEvaluator:
  """An autoencoder's held-out reconstructions: mean PSNR and SSIM (:mod:`diffax.evaluation.reconstruction`) and
  the reconstruction Fréchet distance, the FID formula (Heusel et al. 2017, eq. 6) between the feature statistics
  of the reconstructions and those of their originals (LDM table 8's rFID with the FID Inception network).

  Args:
    features: ``images [B, H, W, C] in [-1, 1] -> [B, dim]``, called as given (jit it; a network's weights
      should be an argument of its jitted function, not constants closed over), or None for PSNR / SSIM only.
    dim: the features' size.
    name: the distance's metric name (``'rfid'`` for Inception features).
    protocol: what :meth:`protocol` reports besides the metric (the feature network and its hashes).
  """

  def __init__(self, features=None, *, dim: int = 0, name: str = 'rfid', protocol: dict[str, Any] | None = None):
    self.name, self._protocol = name, dict(protocol or {})
    self._scores = jax.jit(lambda x, y: (reconstruction.psnr(x, y), reconstruction.ssim(x, y)))
    self._features = features
    self.dim = dim
    self.reset()

  def reset(self) -> None:
    self._psnr, self._ssim, self._count = 0.0, 0.0, 0
    self._real, self._fake = stats.FeatureStats(dim=self.dim), stats.FeatureStats(dim=self.dim)

  def update(self, images: Any, reconstructions: Any, *, count: int | None = None) -> None:
    """Originals and reconstructions [B, H, W, C] (global or host arrays); only the first ``count`` rows count."""
    count = images.shape[0] if count is None else count
    psnr, ssim = (np.asarray(a, np.float64)[:count] for a in _to_host(self._scores(images, reconstructions)))
    self._psnr, self._ssim, self._count = self._psnr + psnr.sum(), self._ssim + ssim.sum(), self._count + count
    if self._features is not None:
      for accumulated, x in ((self._real, images), (self._fake, reconstructions)):
        accumulated.update(np.asarray(_to_host(self._features(x)), np.float64)[:count])

  def result(self) -> dict[str, float]:
    out = {'psnr': self._psnr / self._count, 'ssim': self._ssim / self._count}
    if self._features is not None:
      out[self.name] = stats.frechet_distance(self._fake.mean, self._fake.cov, self._real.mean, self._real.cov)
    return out

  def protocol(self) -> dict[str, Any]:
    return {'metric': 'reconstruction', 'num_images': self._count, 'distance': self.name if self._features else None,
            **self._protocol}
