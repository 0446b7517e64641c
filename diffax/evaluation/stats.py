"""Sample-quality statistics on Inception features: FID, Inception Score, KID, precision/recall.

All functions here are host-side numpy in float64: the features are produced batch by batch on the
accelerator, streamed to the host and reduced here, so a 50k-sample evaluation never holds a [N, 2048]
array on device.

  * FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule...", eq. 6): the Fréchet
    distance between Gaussians fitted to the features, ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))``
    (Dowson & Landau 1982). ``mu``, ``S`` come from a streaming :class:`FeatureStats`.
  * Inception Score (Salimans et al. 2016, sec. 4): ``exp(E_x KL(p(y|x) || p(y)))`` over 10 splits.
  * KID (Binkowski et al. 2018, "Demystifying MMD GANs", sec. 3): unbiased MMD^2 with the kernel
    ``k(x, y) = (x.y / d + 1)^3`` averaged over random subsets.
  * Improved precision / recall (Kynkäänniemi et al. 2019): k-NN balls around each sample, k = 3.

Reference statistics are ``.npz`` files with float64 ``mu`` [D] and ``sigma`` [D, D], the format of
pytorch-fid, TTUR and clean-fid (and of guided-diffusion's reference batches, which add other keys).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import scipy.linalg


@dataclasses.dataclass(eq=False)
class FeatureStats:
  """Streaming mean and covariance of features, float64, merged with Chan et al.'s pairwise update.

  Keeps ``count``, ``mean`` [D] and the centred scatter ``m2 = sum_i (x_i - mean)(x_i - mean)^T`` [D, D];
  each batch is centred on its own mean before its scatter is formed, then combined with
  ``m2 = m2_a + m2_b + delta delta^T n_a n_b / n`` (Chan, Golub & LeVeque 1979), so no large raw
  second moment is ever subtracted from another (the cancellation that ``E[x x^T] - mu mu^T`` suffers).
  """
  dim: int
  count: int = 0
  mean: np.ndarray | None = None  # [D] float64; zeros when None
  m2: np.ndarray | None = None  # [D, D] float64; zeros when None

  def __post_init__(self):
    if self.mean is None:
      self.mean = np.zeros((self.dim,), np.float64)
    if self.m2 is None:
      self.m2 = np.zeros((self.dim, self.dim), np.float64)

  def update(self, features: np.ndarray) -> None:
    """Adds a batch ``features`` [B, D] (any float dtype; accumulated in float64)."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f'features must be [B, {self.dim}], got shape {x.shape}.')
    if x.shape[0] == 0:
      return
    mean_b = x.mean(axis=0)
    xc = x - mean_b
    self._combine(x.shape[0], mean_b, xc.T @ xc)

  def merge(self, other: FeatureStats) -> None:
    """Folds ``other`` (statistics of a disjoint set of samples) into this one."""
    if other.dim != self.dim:
      raise ValueError(f'Cannot merge FeatureStats of dim {other.dim} into dim {self.dim}.')
    if other.count:
      self._combine(other.count, other.mean, other.m2)

  def _combine(self, n_b: int, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
    n_a, n = self.count, self.count + n_b
    delta = mean_b - self.mean
    self.mean = self.mean + delta * (n_b / n)
    self.m2 = self.m2 + m2_b + np.outer(delta, delta) * (n_a * n_b / n)
    self.count = n

  @property
  def cov(self) -> np.ndarray:
    """Unbiased covariance [D, D] (divides by ``count - 1``, like ``np.cov(x, rowvar=False)``)."""
    if self.count < 2:
      raise ValueError(f'Covariance needs at least 2 samples, have {self.count}.')
    return self.m2 / (self.count - 1)

  def to_arrays(self) -> dict[str, np.ndarray]:
    """``{'count': [], 'mean': [D], 'm2': [D, D]}``; float64, for gathering across processes.

    These are not additive: gather them (e.g. ``multihost_utils.process_allgather``, which stacks a
    leading process axis) and rebuild with :meth:`from_arrays`, which merges the stack; do not ``psum``.
    """
    return {'count': np.asarray(self.count, np.int64), 'mean': self.mean, 'm2': self.m2}

  @classmethod
  def from_arrays(cls, arrays: dict[str, np.ndarray]) -> FeatureStats:
    """Inverse of :meth:`to_arrays`; a leading axis ([P], [P, D], [P, D, D]) is merged in order."""
    count, mean, m2 = (np.asarray(arrays[k]) for k in ('count', 'mean', 'm2'))
    if count.ndim == 0:
      return cls(dim=mean.shape[-1], count=int(count), mean=mean.astype(np.float64), m2=m2.astype(np.float64))
    stats = cls(dim=mean.shape[-1])
    for c, mu, s in zip(count, mean, m2):
      stats.merge(cls(dim=mean.shape[-1], count=int(c), mean=mu.astype(np.float64), m2=s.astype(np.float64)))
    return stats


def _sqrtm_psd(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a PSD matrix [D, D] by ``eigh``; round-off negative eigenvalues -> 0."""
  w, v = np.linalg.eigh(sigma)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray, *, method: str = 'eigh', eps: float = 1e-6) -> float:
  """``tr((S1 S2)^(1/2))`` for PSD ``S1``, ``S2`` [D, D].

  ``'eigh'``: ``S1 S2`` is similar to a symmetric PSD ``A``, so the trace is ``sum_i sqrt(lambda_i(A))``
  from one symmetric eigenvalue problem: ``A = L^T S2 L`` with the Cholesky factor ``S1 = L L^T``, or, when
  ``S1`` is singular (fewer samples than feature dimensions), ``A = S1^(1/2) S2 S1^(1/2)`` with ``S1^(1/2)``
  from ``eigh``. Backward stable, always real (round-off negative eigenvalues are clipped to 0), exact for
  singular covariances, and ~10x faster than ``'sqrtm'`` at D = 2048 (``experiments/bench_eval.py``).

  ``'sqrtm'``: pytorch-fid / clean-fid / TTUR: ``scipy.linalg.sqrtm(S1 S2)`` (Schur method on the
  non-symmetric product); if the result is not finite, retry with ``S + eps I`` for both; imaginary parts
  from round-off are dropped if their largest diagonal entry is below 1e-3 and an error otherwise.
  Kept to reproduce published numbers to the last digit.
  """
  if method == 'eigh':
    try:
      chol = np.linalg.cholesky(sigma1)
      a = chol.T @ sigma2 @ chol
    except np.linalg.LinAlgError:
      root1 = _sqrtm_psd(sigma1)
      a = root1 @ sigma2 @ root1
    w = np.linalg.eigvalsh(0.5 * (a + a.T))
    return float(np.sum(np.sqrt(np.clip(w, 0.0, None))))
  if method == 'sqrtm':
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
      offset = np.eye(sigma1.shape[0]) * eps
      covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
      if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
        raise ValueError(f'sqrtm(S1 S2) has imaginary component {np.max(np.abs(covmean.imag))}.')
      covmean = covmean.real
    return float(np.trace(covmean))
  raise ValueError(f"Unknown method {method!r}; choose 'eigh' or 'sqrtm'.")


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     method: str = 'eigh', eps: float = 1e-6) -> float:
  """Fréchet (2-Wasserstein squared) distance between ``N(mu1, S1)`` and ``N(mu2, S2)``.

  ``d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` (Heusel et al. 2017 eq. 6; Dowson &
  Landau 1982). ``mu``: [D]; ``sigma``: [D, D], computed in float64. ``method`` and ``eps``: see
  :func:`trace_sqrt_product`; the two methods agree to ~1e-8 relative on full-rank covariances.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f'Shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}.')
  diff = mu1 - mu2
  tr_covmean = trace_sqrt_product(sigma1, sigma2, method=method, eps=eps)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score(logits: np.ndarray, *, splits: int = 10) -> tuple[float, float]:
  """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` (Salimans et al. 2016), mean and std over splits.

  As in the reference (openai/improved-gan ``inception_score.py``): the N samples are cut into ``splits``
  contiguous parts ``[i N // splits, (i + 1) N // splits)``; in each, ``p(y)`` is the mean of the
  softmax over the part, the score ``exp(mean_x sum_y p(y|x) (log p(y|x) - log p(y)))``.

  Args:
    logits: [N, K] classifier logits; for the reference numbers the FID Inception's ``'logits_unbiased'``
      ([N, 1008], the fc layer without its bias, as openai/improved-gan and torch-fidelity).
    splits: number of parts.

  Returns:
    ``(mean, std)`` of the per-split scores (``np.std``, ddof 0, as the reference).
  """
  n = logits.shape[0]
  if n < splits:
    raise ValueError(f'Need at least {splits} samples for {splits} splits, have {n}.')
  scores = []
  for i in range(splits):
    part = np.asarray(logits[i * n // splits:(i + 1) * n // splits], np.float64)
    shifted = part - part.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))  # log-softmax [n_i, K]
    p = np.exp(log_p)
    kl = np.sum(p * (log_p - np.log(np.mean(p, axis=0))), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


def polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 between samples ``x`` [m, d] and ``y`` [n, d] for ``k(a, b) = (a.b / d + 1)^3``.

  ``sum_{i!=j} k(x_i, x_j) / (m (m-1)) + sum_{i!=j} k(y_i, y_j) / (n (n-1)) - 2 sum_ij k(x_i, y_j) / (m n)``
  (Gretton et al. 2012 eq. 3; Binkowski et al. 2018 sec. 3).
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  m, n, d = x.shape[0], y.shape[0], x.shape[1]
  k_xx = (x @ x.T / d + 1.0)**3
  k_yy = (y @ y.T / d + 1.0)**3
  k_xy = (x @ y.T / d + 1.0)**3
  return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
               - 2.0 * k_xy.mean())


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray, *, num_subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
  """KID (Binkowski et al. 2018): unbiased polynomial-kernel MMD^2 averaged over random subsets.

  As in the reference implementations (Binkowski's ``polynomial_mmd_averages``, StyleGAN2-ADA,
  torch-fidelity): each of ``num_subsets`` rounds draws ``m = min(subset_size, N1, N2)`` rows of each set
  without replacement, independently per round, and evaluates :func:`polynomial_mmd2_unbiased`.

  Args:
    features1: [N1, D] features (e.g. of real images).
    features2: [N2, D] features (e.g. of samples).
    num_subsets: number of subsets.
    subset_size: rows per subset (capped at the smaller set).
    seed: seed of the ``np.random.default_rng`` that picks subsets; round ``s`` draws ``features1``'s rows,
      then ``features2``'s.

  Returns:
    ``(mean, std)`` of the per-subset MMD^2 estimates (``np.std``, ddof 0, as torch-fidelity).
  """
  f1, f2 = np.asarray(features1), np.asarray(features2)
  m = min(subset_size, f1.shape[0], f2.shape[0])
  if m < 2:
    raise ValueError(f'KID needs at least 2 samples per set, have {f1.shape[0]} and {f2.shape[0]}.')
  rng = np.random.default_rng(seed)
  mmds = []
  for _ in range(num_subsets):
    idx1 = rng.choice(f1.shape[0], m, replace=False)
    idx2 = rng.choice(f2.shape[0], m, replace=False)
    mmds.append(polynomial_mmd2_unbiased(f1[idx1], f2[idx2]))
  return float(np.mean(mmds)), float(np.std(mmds))


def _kth_neighbour_radii(x: np.ndarray, k: int, batch_size: int) -> np.ndarray:
  """Distance [N] from each row of ``x`` [N, D] to its k-th nearest other row."""
  radii = []
  for start in range(0, x.shape[0], batch_size):
    d = _pairwise_distances(x[start:start + batch_size], x)
    radii.append(np.partition(d, k, axis=1)[:, k])  # index 0 is the point itself (distance 0)
  return np.concatenate(radii)


def _pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  sq = np.sum(a * a, axis=1)[:, None] - 2.0 * (a @ b.T) + np.sum(b * b, axis=1)[None, :]
  return np.sqrt(np.clip(sq, 0.0, None))


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, batch_size: int) -> float:
  """Fraction of ``points`` inside at least one ball ``(centres_j, radii_j)``."""
  inside = [np.any(_pairwise_distances(points[s:s + batch_size], centres) <= radii[None, :], axis=1)
            for s in range(0, points.shape[0], batch_size)]
  return float(np.mean(np.concatenate(inside)))


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3, batch_size: int = 1024) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019, eq. 1-3) with k-NN manifolds.

  The real manifold is the union of balls around each real feature with radius the distance to its k-th
  nearest real neighbour; precision is the fraction of ``fake`` [M, D] inside it, recall the fraction of
  ``real`` [N, D] inside the fake manifold built the same way. Distances in float64, in row batches.
  """
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  precision = _coverage(fake, real, _kth_neighbour_radii(real, k, batch_size), batch_size)
  recall = _coverage(real, fake, _kth_neighbour_radii(fake, k, batch_size), batch_size)
  return precision, recall


def save_reference_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, *,
                         features: np.ndarray | None = None, meta: dict[str, str] | None = None) -> None:
  """Writes ``mu`` [D] and ``sigma`` [D, D] (float64) to an ``.npz`` as pytorch-fid / clean-fid do.

  ``features`` [N, D] (stored float32 under ``'features'``, which those tools ignore) keeps the raw
  features that KID needs; ``meta`` strings are stored as ``'meta/<key>'`` (how the statistics were made).
  """
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != mu.shape * 2:
    raise ValueError(f'Expected mu [D] and sigma [D, D], got {mu.shape} and {sigma.shape}.')
  extra = {}
  if features is not None:
    extra['features'] = np.asarray(features, np.float32)
    if extra['features'].ndim != 2 or extra['features'].shape[1] != mu.shape[0]:
      raise ValueError(f'Expected features [N, {mu.shape[0]}], got {extra["features"].shape}.')
  extra.update({f'meta/{k}': np.asarray(str(v)) for k, v in (meta or {}).items()})
  with open(path, 'wb') as f:
    np.savez(f, mu=mu, sigma=sigma, **extra)


def load_reference_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads ``(mu [D], sigma [D, D])`` float64 from a reference-statistics ``.npz`` (never a pickle).

  Accepts ``mu`` / ``sigma`` keys (pytorch-fid, TTUR, clean-fid, guided-diffusion reference batches) or
  raw ``pool_3`` features [N, D] (score_sde's ``*_stats.npz``), from which the unbiased mean and
  covariance are computed.
  """
  with np.load(path, allow_pickle=False) as f:
    keys = set(f.files)
    if {'mu', 'sigma'} <= keys:
      return np.asarray(f['mu'], np.float64), np.asarray(f['sigma'], np.float64)
    if 'pool_3' in keys:
      stats = FeatureStats(dim=f['pool_3'].shape[-1])
      stats.update(f['pool_3'].reshape(-1, stats.dim))
      return stats.mean, stats.cov
  raise KeyError(f"{path} holds keys {sorted(keys)}; expected 'mu' and 'sigma' (pytorch-fid / clean-fid / TTUR) "
                 "or 'pool_3' features (score_sde).")


def file_sha256(path: str | os.PathLike) -> str:
  """Hex SHA-256 of a file's bytes, read in 1 MiB chunks (recorded with every evaluation)."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()
