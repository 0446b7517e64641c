"""The moving-digits and tones metrics: real held-out data scores far below noise and below sets broken in time or
in their frames, and the per-frame and temporal parts of the clip metric each see what they claim to.

"Real" is the ``'train'`` split scored against the evaluators' ``'test'`` reference (a different set of digits /
waveforms), so its distances are the sampling floor the metrics' docstrings speak of.
"""

import numpy as np
import pytest

from diffax.data import moving_digits, tones
from diffax.evaluation import moving_digits as moving_digits_metric
from diffax.evaluation import tones as tones_metric

NUM_FRAMES, LENGTH = 8, 128


def score(evaluator, x, labels=None):
  """The streaming result of ``x`` fed in two uneven batches."""
  evaluator.reset()
  cut = len(x) // 3
  evaluator.update(x[:cut], None if labels is None else labels[:cut])
  evaluator.update(x[cut:], None if labels is None else labels[cut:])
  return evaluator.result()


@pytest.fixture(scope='module')
def clips():
  source = moving_digits.MovingDigitsSource('train', num_frames=NUM_FRAMES)
  n = 359  # as many as the reference
  return (np.stack([source[i]['video'] for i in range(n)]).astype(np.float32) / 127.5 - 1,
          np.array([source[i]['label'] for i in range(n)]))


@pytest.fixture(scope='module')
def clip_scores(clips):
  x, labels = clips
  evaluator = moving_digits_metric.MovingDigitsEvaluator(num_frames=NUM_FRAMES)
  rng = np.random.default_rng(0)
  n = len(x)
  order = np.stack([rng.permutation(NUM_FRAMES) for _ in range(n)])
  sets = {
      'real': x,
      'noise': rng.uniform(-1, 1, x.shape).astype(np.float32),
      'shuffled': np.take_along_axis(x, order[:, :, None, None, None], axis=1),  # the same frames, out of order
      'frozen': np.repeat(x[:, :1], NUM_FRAMES, axis=1),  # a real still frame held
      'spliced': x[rng.integers(0, n, (n, NUM_FRAMES)), np.arange(NUM_FRAMES)[None]],  # each frame another clip's
      'noisy': np.clip(x + rng.normal(0, 0.5, x.shape), -1, 1).astype(np.float32),  # the motion kept, frames spoilt
  }
  out = {name: score(evaluator, v, labels if name in ('real', 'shuffled', 'noisy') else None)
         for name, v in sets.items()}
  evaluator.reset()
  evaluator.update(x, labels)
  out['real_one_batch'] = evaluator.result()
  return out


def test_real_clips_score_far_below_noise(clip_scores):
  real, noise = clip_scores['real'], clip_scores['noise']
  assert real['frame_fd'] < noise['frame_fd'] / 10 and real['temporal_fd'] < noise['temporal_fd'] / 100
  assert real['clip_accuracy'] >= 0.95
  for key, value in clip_scores['real_one_batch'].items():  # streaming in batches = one batch
    assert real[key] == pytest.approx(value, rel=1e-5, abs=1e-9)  # float32 features of other batch shapes


def test_broken_motion_is_seen_by_the_temporal_part_only(clip_scores):
  real = clip_scores['real']
  for name in ('shuffled', 'frozen', 'spliced'):
    assert clip_scores[name]['temporal_fd'] > 100 * real['temporal_fd'], name
    assert clip_scores[name]['frame_fd'] < 1.1 * real['frame_fd'], name  # every frame is a real frame
  # Shuffling the frames within each clip leaves the set of frames, so the frame statistics, unchanged.
  assert clip_scores['shuffled']['frame_fd'] == pytest.approx(real['frame_fd'], rel=1e-6)
  assert clip_scores['shuffled']['clip_accuracy'] == real['clip_accuracy']


def test_spoilt_frames_are_seen_by_the_per_frame_part(clip_scores):
  real, noisy = clip_scores['real'], clip_scores['noisy']
  assert noisy['frame_fd'] > 10 * real['frame_fd']
  assert noisy['clip_accuracy'] < 0.5 * real['clip_accuracy']


def test_located_windows_follow_the_rendered_trajectory(clips):
  """The centre-of-intensity window recovers the corners the clips were rendered at, to a pixel."""
  digit = moving_digits.digits.load_digits('test')[0][3]
  corners = moving_digits.trajectory(np.random.default_rng(1), 32)
  frames = moving_digits.render(digit, corners).astype(np.float32) / 127.5 - 1
  located, crops = moving_digits_metric.locate(frames)
  assert np.max(np.abs(np.asarray(located) - corners)) <= 1
  exact = np.all(np.asarray(located) == corners, axis=-1)
  np.testing.assert_array_equal(np.asarray(crops)[exact], np.broadcast_to(digit / np.float32(127.5) - 1,
                                                                           (int(exact.sum()), 8, 8, 1)))


def test_clip_metric_names_the_key_it_cannot_take():
  with pytest.raises(ValueError, match='data.num_frames'):
    moving_digits_metric.MovingDigitsEvaluator(num_frames=1)


@pytest.fixture(scope='module')
def tone_scores():
  evaluator = tones_metric.TonesEvaluator(length=LENGTH)
  source = tones.TonesSource('train', length=LENGTH)
  x = np.stack([source[i]['audio'] for i in range(tones.NUM_TEST)])
  labels = np.arange(len(x)) % tones.NUM_CLASSES
  rng = np.random.default_rng(0)
  chunks = x.reshape(len(x), LENGTH // 16, 16, 1)
  order = np.stack([rng.permutation(LENGTH // 16) for _ in range(len(x))])
  sets = {
      'real': x,
      'noise': (rng.normal(0, 1, x.shape) * np.std(x)).astype(np.float32),  # white noise of the same power
      'shuffled': np.take_along_axis(chunks, order[:, :, None, None], axis=1).reshape(x.shape),  # 16-sample pieces
      'reversed': x[:, ::-1].copy(),  # time reversed: up-chirps become down-chirps with the wrong envelope
      'noisy': np.clip(x + rng.normal(0, 0.1, x.shape), -1, 1).astype(np.float32),
  }
  out = {name: score(evaluator, v, labels) for name, v in sets.items()}
  evaluator.reset()
  evaluator.update(x, labels)
  out['real_one_batch'] = evaluator.result()
  return evaluator, out


def test_real_waveforms_score_far_below_noise_and_broken_ones(tone_scores):
  evaluator, scores = tone_scores
  assert evaluator.test_accuracy >= 0.95
  real = scores['real']
  assert real['tones_accuracy'] >= 0.95
  assert real['tones_fd'] < scores['noise']['tones_fd'] / 100
  assert real['tones_fd'] < scores['shuffled']['tones_fd'] / 30 and real['tones_fd'] < scores['noisy']['tones_fd'] / 30
  assert real['tones_fd'] < scores['reversed']['tones_fd'] / 5
  for key, value in scores['real_one_batch'].items():
    assert real[key] == pytest.approx(value, rel=1e-5, abs=1e-9)  # float32 features of other batch shapes


def test_tones_metric_names_the_key_it_cannot_take():
  with pytest.raises(ValueError, match='data.length'):
    tones_metric.TonesEvaluator(length=tones_metric.N_FFT - 1)
