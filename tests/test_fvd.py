"""FVD through the trainer's path: ``--mode reference`` on TFDS clips (moving_mnist under mock data), then the
evaluator ``eval.metric='fvd'`` builds scoring those clips (FVD 0 up to round-off) and brighter ones (FVD > 0), with
KVD checked against the closed form of the unbiased MMD^2 of two sets of 2.

The real I3D weights cannot be fetched here: the numpy-seeded weights of test_i3d (those the reference network of
pytorch-i3d was checked with) go through the real converter and verified loader. 2 clips of 9 frames (I3D's
minimum) keep the three forward passes at 224x224 affordable on a CPU.
"""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffax.data import pipeline, sources
from diffax.evaluation import convert_i3d, fvd, i3d_weights, stats
from diffax.trainer import config as config_lib
from diffax.trainer import evaluate
import test_i3d
import trainer_runs

NUM_FRAMES = 9


@pytest.fixture(scope='module')
def weights_path(tmp_path_factory):
  path = tmp_path_factory.mktemp('i3d') / 'i3d.npz'
  arrays = convert_i3d.state_dict_to_arrays(test_i3d.reference.seeded_state_dict(test_i3d.torch_shapes()))
  i3d_weights.save_i3d_npz(path, arrays, source_git_sha1=i3d_weights.PT_GIT_SHA1, source_sha256='0' * 64)
  return str(path)


def _config(tmp_path, weights_path, **data):
  config = trainer_runs.load_test_config()
  config.data.update({'name': 'moving_mnist', 'split': 'test', 'data_dir': '/nonexistent', 'num_frames': NUM_FRAMES,
                      'num_classes': 0, **data})
  config.eval.update(metric='fvd', i3d_weights=weights_path, reference_stats=str(tmp_path / 'real_clips.npz'),
                     batch_size=2)
  return config


@pytest.fixture(scope='module')
def run(tmp_path_factory, weights_path):
  """``--mode reference``, then the configured evaluator on the same clips and on brighter ones."""
  tmp_path = tmp_path_factory.mktemp('fvd')
  config = _config(tmp_path, weights_path)
  with jax.numpy_dtype_promotion('standard'), tfds.testing.mock_data(num_examples=2):
    written = evaluate.reference_stats(config, str(tmp_path))
    source = sources.get_source('moving_mnist', split='test', data_dir='/nonexistent', num_frames=NUM_FRAMES)
    (batch,) = list(pipeline.make_iterator(source, global_batch_size=2, seed=0, shuffle=False, num_epochs=1))
    evaluator = evaluate.make_evaluator(config)
  clips = batch['x']
  evaluator.update(clips)
  same, same_embeddings = evaluator.result(), evaluator.embeddings()
  evaluator.reset()
  evaluator.update(np.clip(clips + 0.5, -1.0, 1.0))
  return {'config': config, 'written': written, 'clips': clips, 'evaluator': evaluator, 'same': same,
          'same_embeddings': same_embeddings, 'brighter': evaluator.result(),
          'brighter_embeddings': evaluator.embeddings()}


def test_reference_records_its_protocol(run, weights_path):
  assert run['written'] == run['config'].eval.reference_stats and run['clips'].shape == (2, NUM_FRAMES, 64, 64, 1)
  with np.load(run['written']) as f:
    meta = {k: str(f[k]) for k in f.files if k.startswith('meta/')}
    assert f['mu'].shape == (400,) and f['sigma'].shape == (400, 400)
    np.testing.assert_allclose(f['features'], run['same_embeddings'], rtol=1e-5, atol=1e-5)  # the same clips
  assert meta == {'meta/embedding': 'i3d_kinetics400_logits',
                  'meta/i3d_content_sha256': i3d_weights.load_i3d_variables(weights_path).content_sha256,
                  'meta/num_frames': str(NUM_FRAMES), 'meta/resolution': '224', 'meta/num_clips': '2'}


def test_fvd_of_the_reference_clips_is_zero_and_of_other_clips_not(run):
  scale = float(np.trace(stats.load_reference_stats(run['written'])[1]))
  assert scale > 0
  assert abs(run['same']['fvd']) < 1e-5 * scale  # the square root of rank-1 covariances in 400-D: round-off
  assert run['brighter']['fvd'] > scale  # measured: 26 times the reference's total variance


def _mmd2_of_pairs(x, y):
  """Unbiased MMD^2 of 2 points against 2 for the cubic kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018):
  sum_{i != j} k(x_i, x_j) / 2 + the same for y - 2 sum_ij k(x_i, y_j) / 4."""
  k = lambda a, b: (np.dot(a, b) / a.shape[-1] + 1.0) ** 3
  return k(x[0], x[1]) + k(y[0], y[1]) - sum(k(a, b) for a in x for b in y) / 2


def test_kvd_is_the_mmd_of_the_embeddings(run):
  with np.load(run['written']) as f:
    real = np.asarray(f['features'], np.float64)
  for result, embeddings in ((run['same'], run['same_embeddings']), (run['brighter'], run['brighter_embeddings'])):
    # Every subset of 2 out of 2 is the whole set: the mean is the closed form, the spread 0.
    want = _mmd2_of_pairs(real, np.asarray(embeddings, np.float64))
    assert result['kvd'] == pytest.approx(want, rel=1e-6) and result['kvd_std'] < 1e-9 * abs(want)
  assert run['same']['kvd'] < 0 < run['brighter']['kvd']  # a set against itself: -(k11 + k22 - 2 k12) / 2


def test_protocol_names_weights_clips_and_reference(run, weights_path):
  protocol = run['evaluator'].protocol()
  weights = i3d_weights.load_i3d_variables(weights_path)
  assert protocol == {'metric': 'fvd', 'embedding': 'i3d_kinetics400_logits',
                      'i3d_content_sha256': weights.content_sha256, 'num_frames': str(NUM_FRAMES), 'resolution': '224',
                      'i3d_source_git_sha1': i3d_weights.PT_GIT_SHA1, 'reference_stats': run['written'],
                      'reference_stats_sha256': stats.file_sha256(run['written']), 'reference_num_clips': 2}


def test_reference_of_another_protocol_and_wrong_clips_are_refused(run, weights_path):
  with pytest.raises(ValueError, match=r"num_frames '9' \(this evaluation: '10'\).*--mode reference"):
    fvd.FVDEvaluator(num_frames=10, weights_path=weights_path, reference_stats=run['written'])
  with pytest.raises(ValueError, match=r'\[B, 9, H, W, C\]'):
    run['evaluator'].update(run['clips'][:, :8])
  with pytest.raises(ValueError, match='9 frames or more'):
    fvd.FVDEvaluator(num_frames=8, weights_path=weights_path)
  with pytest.raises(ValueError, match='reference statistics'):
    fvd.FVDEvaluator(num_frames=9, weights_path=weights_path).result()


def _config_error(config, key):
  with pytest.raises(config_lib.ConfigError) as e:
    evaluate.make_evaluator(config)
  assert e.value.key == key
  return str(e.value)


def test_config_errors_name_the_key(tmp_path, weights_path, monkeypatch):
  monkeypatch.delenv(i3d_weights.ENV_VAR, raising=False)
  with tfds.testing.mock_data(num_examples=2):
    message = _config_error(_config(tmp_path, ''), 'eval.i3d_weights')
    assert 'python -m diffax.evaluation.convert_i3d --pt rgb_imagenet.pt --out i3d.npz' in message
    assert 'real_clips.npz' in _config_error(_config(tmp_path, weights_path), 'eval.reference_stats')
    assert '9 frames or more' in _config_error(_config(tmp_path, weights_path, num_frames=8), 'data.num_frames')
  digits = _config(tmp_path, weights_path, name='digits', split='train', data_dir='', num_frames=0)
  assert "'fvd' judges clips" in _config_error(digits, 'eval.metric')
  config_lib.validate(_config(tmp_path, weights_path))  # 'fvd' is a metric the validator knows
