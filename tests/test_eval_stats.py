"""FID / IS / KID / precision-recall statistics against closed forms and straightforward numpy references."""

import numpy as np
import pytest
import scipy.linalg

from diffax.evaluation import stats

METHODS = ('eigh', 'sqrtm')


def _random_spd(rng, d, rank=None):
  a = rng.normal(size=(d, rank or d))
  return a @ a.T / d + (0.0 if rank else 0.1) * np.eye(d)


def _scipy_frechet(mu1, s1, mu2, s2):
  """Independent reference: the textbook formula with scipy's matrix square root of the product."""
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  return float(np.sum((mu1 - mu2)**2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('d', [1, 5, 32])
def test_frechet_matches_scipy_on_random_spd(method, d):
  rng = np.random.default_rng(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  ref = _scipy_frechet(mu1, s1, mu2, s2)
  assert stats.frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(ref, rel=1e-9, abs=1e-10)


@pytest.mark.parametrize('method', METHODS)
def test_frechet_closed_form_for_commuting_covariances(method):
  # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute, so d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
  rng = np.random.default_rng(0)
  d = 16
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  expected = np.sum((mu1 - mu2)**2) + np.sum((np.sqrt(a) - np.sqrt(b))**2)
  got = stats.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T, method=method)
  assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_is_zero_for_identical_and_exact_for_singular_covariances():
  rng = np.random.default_rng(1)
  mu, s = rng.normal(size=8), _random_spd(rng, 8)
  for method in METHODS:
    assert abs(stats.frechet_distance(mu, s, mu, s, method=method)) < 1e-9
  # Rank-deficient (fewer samples than dimensions): diag(a, 0) vs diag(b, 0), exact with 'eigh'.
  a, b = np.array([1.0, 4.0, 0.0, 0.0]), np.array([9.0, 1.0, 0.0, 0.0])
  got = stats.frechet_distance(np.zeros(4), np.diag(a), np.ones(4), np.diag(b))
  assert got == pytest.approx(4.0 + np.sum((np.sqrt(a) - np.sqrt(b))**2), rel=1e-12)


def test_frechet_rejects_bad_input():
  with pytest.raises(ValueError, match='Shape mismatch'):
    stats.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ValueError, match='Unknown method'):
    stats.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method='svd')


def _features(rng, n=257, d=12, offset=1e6):
  # A large common offset: a sum-of-squares accumulator (E[xx^T] - mu mu^T) loses ~12 digits here.
  return offset + rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, d)


def test_feature_stats_match_numpy_despite_large_offset():
  x = _features(np.random.default_rng(0))
  fs = stats.FeatureStats(dim=x.shape[1])
  for batch in np.array_split(x, 7):
    fs.update(batch.astype(np.float64))
  assert fs.count == x.shape[0]
  np.testing.assert_allclose(fs.mean, x.mean(axis=0), rtol=1e-14)
  np.testing.assert_allclose(fs.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)


def test_feature_stats_batch_split_invariance_and_merge():
  rng = np.random.default_rng(1)
  x = _features(rng, offset=3.0)
  whole = stats.FeatureStats(dim=x.shape[1])
  whole.update(x)
  cuts = np.sort(rng.choice(np.arange(1, x.shape[0]), size=20, replace=False))
  split = stats.FeatureStats(dim=x.shape[1])
  for batch in np.split(x, cuts):  # includes size-1 batches
    split.update(batch)
  split.update(x[:0])  # an empty batch is a no-op
  np.testing.assert_allclose(split.mean, whole.mean, rtol=1e-13)
  np.testing.assert_allclose(split.cov, whole.cov, rtol=1e-11)

  a, b = stats.FeatureStats(dim=x.shape[1]), stats.FeatureStats(dim=x.shape[1])
  a.update(x[:100])
  b.update(x[100:])
  a.merge(b)
  a.merge(stats.FeatureStats(dim=x.shape[1]))  # merging an empty accumulator is a no-op
  np.testing.assert_allclose(a.cov, np.cov(x, rowvar=False), rtol=1e-11)


def test_feature_stats_arrays_round_trip_and_stacked_merge():
  x = _features(np.random.default_rng(2), offset=0.0)
  parts = [stats.FeatureStats(dim=x.shape[1]) for _ in range(3)]
  for part, batch in zip(parts, np.array_split(x, 3)):
    part.update(batch)
  single = stats.FeatureStats.from_arrays(parts[0].to_arrays())
  np.testing.assert_array_equal(single.m2, parts[0].m2)
  assert single.count == parts[0].count
  # What process_allgather returns: a leading process axis.
  stacked = {k: np.stack([p.to_arrays()[k] for p in parts]) for k in ('count', 'mean', 'm2')}
  merged = stats.FeatureStats.from_arrays(stacked)
  assert merged.count == x.shape[0]
  np.testing.assert_allclose(merged.cov, np.cov(x, rowvar=False), rtol=1e-11)


def test_feature_stats_errors():
  fs = stats.FeatureStats(dim=3)
  with pytest.raises(ValueError, match=r'\[B, 3\]'):
    fs.update(np.zeros((2, 4)))
  fs.update(np.zeros((1, 3)))
  with pytest.raises(ValueError, match='at least 2'):
    _ = fs.cov
  with pytest.raises(ValueError, match='dim'):
    fs.merge(stats.FeatureStats(dim=4))


def _naive_inception_score(logits, splits):
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  scores = []
  for part in np.split(p, splits):
    py = part.mean(axis=0)
    kl = [sum(pi[k] * np.log(pi[k] / py[k]) for k in range(len(py)) if pi[k] > 0) for pi in part]
    scores.append(np.exp(np.mean(kl)))
  return np.mean(scores), np.std(scores)


def test_inception_score_matches_naive_numpy():
  logits = np.random.default_rng(0).normal(scale=3.0, size=(60, 7))
  got = stats.inception_score(logits, splits=6)
  np.testing.assert_allclose(got, _naive_inception_score(logits, 6), rtol=1e-12)


def test_inception_score_closed_forms():
  k, n = 10, 100
  # Identical predictions: p(y|x) = p(y), KL = 0, IS = 1 in every split.
  assert stats.inception_score(np.zeros((n, k))) == pytest.approx((1.0, 0.0), abs=1e-12)
  # Confident and balanced: one-hot over K classes, each split holds every class once: IS = K.
  one_hot = 1e4 * np.eye(k)[np.arange(n) % k]
  assert stats.inception_score(one_hot) == pytest.approx((k, 0.0), abs=1e-9)
  with pytest.raises(ValueError, match='at least 10'):
    stats.inception_score(np.zeros((5, k)))


def _naive_kid(f1, f2, num_subsets, subset_size, seed):
  rng = np.random.default_rng(seed)
  d, m = f1.shape[1], subset_size
  kern = lambda a, b: (np.dot(a, b) / d + 1.0)**3
  mmds = []
  for _ in range(num_subsets):
    x = f1[rng.choice(len(f1), m, replace=False)]
    y = f2[rng.choice(len(f2), m, replace=False)]
    xx = sum(kern(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(kern(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(kern(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    mmds.append(xx + yy - 2 * xy)
  return np.mean(mmds), np.std(mmds)


def test_kid_matches_naive_numpy_on_same_subsets():
  rng = np.random.default_rng(0)
  f1, f2 = rng.normal(size=(40, 6)), rng.normal(loc=0.3, size=(35, 6))
  got = stats.kernel_inception_distance(f1, f2, num_subsets=4, subset_size=15, seed=3)
  np.testing.assert_allclose(got, _naive_kid(f1, f2, 4, 15, 3), rtol=1e-10)


def test_kid_is_unbiased_zero_for_one_distribution_and_positive_for_two():
  rng = np.random.default_rng(1)
  d = 16
  f1, f2 = rng.normal(size=(2000, d)), rng.normal(size=(2000, d))
  mean, std = stats.kernel_inception_distance(f1, f2, num_subsets=50, subset_size=200)
  assert abs(mean) < 3 * std / np.sqrt(50)  # unbiased: no positive floor, unlike FID
  shifted, _ = stats.kernel_inception_distance(f1, f2 + 0.5, num_subsets=50, subset_size=200)
  assert shifted > 20 * std


def _naive_precision_recall(real, fake, k):
  def covered(points, centres):
    dist = lambda a, b: np.sqrt(np.sum((a - b)**2))
    radii = [sorted(dist(c, o) for o in centres)[k] for c in centres]  # [0] is the point itself
    return np.mean([any(dist(p, c) <= r for c, r in zip(centres, radii)) for p in points])
  return covered(fake, real), covered(real, fake)


def test_precision_recall_matches_naive_and_limits():
  rng = np.random.default_rng(0)
  real, fake = rng.normal(size=(40, 3)), rng.normal(loc=0.7, scale=0.6, size=(30, 3))
  got = stats.precision_recall(real, fake, k=3, batch_size=7)
  np.testing.assert_allclose(got, _naive_precision_recall(real, fake, 3))
  assert stats.precision_recall(real, real) == (1.0, 1.0)
  assert stats.precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_reference_stats_round_trip_and_formats(tmp_path):
  rng = np.random.default_rng(0)
  mu, sigma = rng.normal(size=5), _random_spd(rng, 5)
  stats.save_reference_stats(tmp_path / 'ref.npz', mu, sigma)
  loaded_mu, loaded_sigma = stats.load_reference_stats(tmp_path / 'ref.npz')
  np.testing.assert_array_equal(loaded_mu, mu)
  np.testing.assert_array_equal(loaded_sigma, sigma)
  with np.load(tmp_path / 'ref.npz') as f:  # the pytorch-fid / clean-fid layout
    assert sorted(f.files) == ['mu', 'sigma'] and f['sigma'].dtype == np.float64
  features = rng.normal(size=(7, 5))
  stats.save_reference_stats(tmp_path / 'with_features.npz', mu, sigma, features=features)
  np.testing.assert_array_equal(stats.load_reference_stats(tmp_path / 'with_features.npz')[1], sigma)
  with np.load(tmp_path / 'with_features.npz') as f:
    np.testing.assert_array_equal(f['features'], features.astype(np.float32))
  # score_sde's stats files hold the raw pool_3 features.
  pool = rng.normal(size=(50, 5)).astype(np.float32)
  np.savez(tmp_path / 'score_sde.npz', pool_3=pool)
  loaded_mu, loaded_sigma = stats.load_reference_stats(tmp_path / 'score_sde.npz')
  np.testing.assert_allclose(loaded_mu, pool.astype(np.float64).mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(loaded_sigma, np.cov(pool.astype(np.float64), rowvar=False), rtol=1e-10)


def test_reference_stats_errors(tmp_path):
  np.savez(tmp_path / 'bad.npz', mean=np.zeros(3))
  with pytest.raises(KeyError, match=r"holds keys \['mean'\]"):
    stats.load_reference_stats(tmp_path / 'bad.npz')
  with pytest.raises(ValueError, match='Expected mu'):
    stats.save_reference_stats(tmp_path / 'x.npz', np.zeros(3), np.eye(4))
  with pytest.raises(ValueError, match=r'Expected features \[N, 3\]'):
    stats.save_reference_stats(tmp_path / 'x.npz', np.zeros(3), np.eye(3), features=np.zeros((5, 4)))


def test_file_sha256_known_vector(tmp_path):
  (tmp_path / 'abc').write_bytes(b'abc')  # FIPS 180-2 test vector
  assert stats.file_sha256(tmp_path / 'abc') == 'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'
