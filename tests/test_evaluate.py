"""The Inception evaluation path end to end: ``--mode reference`` on a TFDS split (mock data), then the streaming
InceptionEvaluator scoring the same images against those statistics (FID = KID = 0 up to round-off).

The real FID weights cannot be fetched here: synthetic weights in pytorch-fid's layout go through the real
converter and verified loader (as in test_inception).
"""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffax.trainer import evaluate
from diffax.data import pipeline, sources
from diffax.evaluation import convert_inception, evaluators, inception, inception_weights, stats
import test_inception
import trainer_runs


@pytest.fixture(scope='module')
def weights_path(tmp_path_factory):
  path = tmp_path_factory.mktemp('inception') / 'fid_inception.npz'
  state_dict = test_inception._torch_state_dict()  # pylint: disable=protected-access
  arrays = convert_inception.state_dict_to_arrays(state_dict)
  inception_weights.save_inception_npz(path, arrays, source_sha256=inception_weights.PTH_SHA256)
  return str(path)


def test_reference_stats_then_evaluator_on_the_same_images(tmp_path, weights_path):
  config = trainer_runs.load_test_config()
  config.data.name = 'cifar10'
  config.data.num_classes = 0
  config.eval.metric = 'inception'
  config.eval.inception_weights = weights_path
  config.eval.reference_stats = str(tmp_path / 'cifar10_train.npz')
  config.eval.batch_size = 8
  with jax.numpy_dtype_promotion('standard'), tfds.testing.mock_data(num_examples=16):
    evaluate.reference_stats(config, str(tmp_path))
    source = sources.get_source('cifar10', split='train')
    images = np.concatenate([b['x'] for b in pipeline.make_iterator(source, global_batch_size=8, seed=0,
                                                                    shuffle=False, num_epochs=1)])
  assert images.shape == (16, 32, 32, 3)

  # Independent path: the feature function on all images at once.
  direct = inception.make_feature_fn(inception_weights.load_inception_variables(weights_path).variables)(images)
  with np.load(config.eval.reference_stats) as f:
    np.testing.assert_allclose(f['mu'], np.mean(np.asarray(direct['pool'], np.float64), axis=0), rtol=1e-4,
                               atol=1e-6)
    assert f['sigma'].shape == (2048, 2048) and f['features'].shape == (16, 2048)

  evaluator = evaluators.InceptionEvaluator(weights_path=weights_path, reference_stats=config.eval.reference_stats,
                                            kid_subset_size=8)
  evaluator.update(images[:5])
  evaluator.update(images[5:])
  metrics = evaluator.result()
  scale = float(np.trace(stats.load_reference_stats(config.eval.reference_stats)[1]))
  assert abs(metrics['fid']) < 1e-5 * scale  # batch splits differ in float32 round-off; 16 points in 2048-D
  # The unbiased MMD^2 of a set with itself is not 0 but -2 (mean diagonal - mean off-diagonal kernel) / m at
  # most in size: bound it by 2 / m times the mean k(x, x) (cubic kernel, Binkowski et al. 2018).
  pool = np.asarray(direct['pool'], np.float64)
  k_diag = (np.sum(pool * pool, axis=1) / 2048 + 1) ** 3
  assert abs(metrics['kid']) <= 2 / 8 * np.mean(k_diag)
  expected_is, _ = stats.inception_score(np.asarray(direct['logits_unbiased'], np.float64), splits=10)
  assert metrics['inception_score'] == pytest.approx(expected_is, rel=1e-4)
  protocol = evaluator.protocol()
  assert protocol['reference_stats_sha256'] == stats.file_sha256(config.eval.reference_stats)
  assert len(protocol['weights_content_sha256']) == 64


def test_missing_weights_fail_before_any_sampling(tmp_path, monkeypatch):
  monkeypatch.delenv(inception_weights.ENV_VAR, raising=False)
  config = trainer_runs.load_test_config('eval.metric=inception')
  with pytest.raises(FileNotFoundError, match='convert_inception'):
    evaluate.make_evaluator(config)
