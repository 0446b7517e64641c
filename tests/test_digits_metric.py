"""The digits classifier and its metric: held-out accuracy, Fréchet distance and conditional accuracy against an
independent numpy/scipy computation, real vs. bad samples, the parameter cache and reproducible training."""

import os

import jax
import numpy as np
import pytest
import scipy.linalg

from diffax.data import digits
from diffax.evaluation import digits as digits_metric
from diffax.evaluation import evaluators


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('diffax_cache'))


@pytest.fixture(scope='module')
def classifier(cache_dir):
  return digits_metric.DigitsClassifier.load_or_train(cache_dir)


def score(classifier, images, labels=None):
  """The trainer's streaming digits metric on ``images``, fed in two uneven batches."""
  evaluator = evaluators.DigitsEvaluator(classifier)
  cut = len(images) // 3
  evaluator.update(images[:cut], None if labels is None else labels[:cut])
  evaluator.update(images[cut:], None if labels is None else labels[cut:])
  return evaluator.result()


def unit(images_u8):
  return images_u8.astype(np.float32) / 127.5 - 1


def numpy_forward(params, x):
  """The MLP in float64 numpy: relu(relu(x W0 + b0) W1 + b1) -> features, features W2 + b2 -> logits."""
  h = x.reshape(len(x), -1).astype(np.float64)
  for name in ('Dense_0', 'Dense_1'):
    h = np.maximum(h @ params[name]['kernel'] + params[name]['bias'], 0)
  return h, h @ params['Dense_2']['kernel'] + params['Dense_2']['bias']


def numpy_fd(f1, f2):
  """Fréchet distance of Gaussians fitted to two feature sets, the pytorch-fid way (scipy sqrtm).

  Units that are zero on both sets (dead ReLUs) add nothing to the distance and are dropped, so the covariances
  are not singular.
  """
  alive = np.any(f1 != 0, axis=0) | np.any(f2 != 0, axis=0)
  f1, f2 = f1[:, alive], f2[:, alive]
  mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
  return float(np.sum((mu1 - mu2)**2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


def test_held_out_accuracy_is_at_least_95_percent(classifier):
  images, labels = digits.load_digits('test')
  _, logits = numpy_forward(classifier.params, unit(images))
  accuracy = np.mean(np.argmax(logits, -1) == labels)
  assert classifier.test_accuracy == pytest.approx(accuracy, abs=1e-12)
  assert accuracy >= 0.95


def test_features_and_logits_match_numpy_and_jit(classifier):
  x = unit(digits.load_digits('train')[0][:50])
  features, logits = numpy_forward(classifier.params, x)
  assert classifier.features(x).shape == (50, digits_metric.FEATURE_DIM)
  np.testing.assert_allclose(classifier.features(x), features, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(jax.jit(classifier.logits)(x), logits, rtol=1e-4, atol=1e-4)


def test_real_digits_score_high_accuracy_and_the_fd_of_numpy(classifier):
  x_train, y_train = digits.load_digits('train')
  x_test, _ = digits.load_digits('test')
  metrics = score(classifier, unit(x_train), y_train)
  expected = numpy_fd(numpy_forward(classifier.params, unit(x_train))[0],
                      numpy_forward(classifier.params, unit(x_test))[0])
  assert metrics['digits_fd'] == pytest.approx(expected, rel=1e-3)
  assert metrics['digits_fd'] < 10
  assert metrics['digits_accuracy'] >= 0.95 and metrics['digits_confidence'] >= 0.9


def test_the_reference_set_scores_zero(classifier):
  x_test, y_test = digits.load_digits('test')
  metrics = score(classifier, unit(x_test), y_test)
  # Only float32 rounding separates the streamed features from the reference's (other real digits score ~3.6).
  assert abs(metrics['digits_fd']) < 1e-5
  assert metrics['digits_accuracy'] == pytest.approx(classifier.test_accuracy)


def test_noise_scores_low_accuracy_and_large_fd(classifier):
  rng = np.random.default_rng(0)
  noise = rng.uniform(-1, 1, (400, 8, 8, 1)).astype(np.float32)
  metrics = score(classifier, noise, rng.integers(0, 10, 400))
  assert metrics['digits_accuracy'] < 0.3
  assert metrics['digits_fd'] > 100


def test_wrong_labels_and_a_single_class_are_caught(classifier):
  x_test, y_test = digits.load_digits('test')
  wrong = score(classifier, unit(x_test), (y_test + 1) % 10)
  assert wrong['digits_accuracy'] < 0.05 and wrong['digits_confidence'] < 0.05
  sevens = digits.load_digits('all')[0][digits.load_digits('all')[1] == 7]
  collapsed = score(classifier, unit(sevens))
  assert collapsed['digits_fd'] > 100 and set(collapsed) == {'digits_fd'}


def test_cached_params_are_reused_without_training(classifier, cache_dir, monkeypatch):
  files = os.listdir(cache_dir)
  assert files == [f'digits_classifier_{digits_metric.recipe_hash()}.npz']
  monkeypatch.setattr(digits_metric, 'train_params', lambda: pytest.fail('retrained despite a valid cache'))
  again = digits_metric.DigitsClassifier.load_or_train(cache_dir)
  jax.tree.map(np.testing.assert_array_equal, again.params, classifier.params)
  assert again.test_accuracy == classifier.test_accuracy


@pytest.mark.parametrize('content', [b'not a zip file', b'PK\x03\x04truncated', 'valid npz, wrong keys'])
def test_corrupt_cache_is_retrained_with_a_warning(classifier, tmp_path, monkeypatch, content):
  path = tmp_path / f'digits_classifier_{digits_metric.recipe_hash()}.npz'
  if isinstance(content, bytes):
    path.write_bytes(content)
  else:
    np.savez(path, w=np.zeros(3))
  calls = []
  monkeypatch.setattr(digits_metric, 'train_params', lambda: calls.append(1) or classifier.params)
  with pytest.warns(UserWarning, match='Retraining'):
    retrained = digits_metric.DigitsClassifier.load_or_train(str(tmp_path))
  assert calls == [1]
  assert retrained.test_accuracy == classifier.test_accuracy
  monkeypatch.setattr(digits_metric, 'train_params', lambda: pytest.fail('the rewritten cache was not used'))
  digits_metric.DigitsClassifier.load_or_train(str(tmp_path))


def test_default_cache_dir_follows_the_environment(monkeypatch):
  monkeypatch.setenv('DIFFAX_CACHE_DIR', '/some/cache')
  assert digits_metric.default_cache_dir() == '/some/cache'
  monkeypatch.delenv('DIFFAX_CACHE_DIR')
  assert digits_metric.default_cache_dir() == os.path.join(os.path.expanduser('~'), '.cache', 'diffax')


def test_training_is_reproducible(classifier):
  """A second training from scratch gives bit-identical parameters to the cached ones."""
  jax.tree.map(np.testing.assert_array_equal, digits_metric.train_params(), classifier.params)
