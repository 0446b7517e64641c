"""Clips and waveforms through the data pipeline, TFDS video / audio under mock data, media outputs and metrics."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffax.data import SourceConfigError, get_source, make_iterator, moving_digits, tones
from diffax.data import digits as digits_data
from diffax.trainer import media


def test_moving_digits_are_the_digits_bouncing_deterministically():
  source = get_source('moving_digits', split='test', num_frames=12)
  images, labels = digits_data.load_digits('test')
  record = source[5]
  assert record['video'].shape == (12, 32, 32, 1) and record['label'] == labels[5] and len(source) == 359
  np.testing.assert_array_equal(source[5]['video'], record['video'])  # a function of (split, index) only
  for frame in record['video']:  # every frame holds the digit, unchanged, somewhere on the canvas
    assert frame.sum() == images[5].astype(np.int64).sum()
  corners = moving_digits.trajectory(np.random.default_rng(0), 200)
  assert corners.min() >= 0 and corners.max() <= 24
  speed = np.linalg.norm(np.diff(corners, axis=0), axis=-1)
  assert speed.max() <= moving_digits.SPEED_MAX + 2 and speed.mean() >= moving_digits.SPEED_MIN - 0.5


def test_tones_match_their_closed_forms():
  source = get_source('tones', split='train', length=256, sample_rate=8000)
  assert len(source) == tones.NUM_TRAIN and source.image_shape == (256, 1)
  for i in range(4):
    x = source[i]['audio'][:, 0]
    assert source[i]['label'] == i and x.dtype == np.float32 and 0.3 < np.abs(x).max() <= 0.9
  spectrum = np.abs(np.fft.rfft(source[0]['audio'][:, 0] * np.hanning(256)))
  rng = np.random.default_rng((tones.SEED, 0, 0))
  f0 = np.exp(rng.uniform(np.log(tones.F_MIN), np.log(tones.F_MAX)))
  assert abs(np.argmax(spectrum) * 8000 / 256 - f0) <= 8000 / 256  # a tone's peak at f0
  up, down = source[1]['audio'][:, 0], source[2]['audio'][:, 0]
  crossings = lambda a: np.count_nonzero(np.diff(np.signbit(a)))
  assert crossings(up[128:]) > crossings(up[:128]) and crossings(down[128:]) < crossings(down[:128])


def test_pipeline_batches_clips_and_waveforms_with_a_checkpointable_position():
  clips = get_source('moving_digits', split='train', num_frames=8)
  it = make_iterator(clips, global_batch_size=4, seed=0, random_flip=True, process_index=0, process_count=1,
                     read_threads=0)
  first = next(it)
  assert first['x'].shape == (4, 8, 32, 32, 1) and first['x'].min() >= -1 and first['x'].max() <= 1
  state = it.get_state()
  expected = next(it)
  it.set_state(state)
  np.testing.assert_array_equal(next(it)['x'], expected['x'])
  audio = get_source('tones', split='test', length=64)
  batch = next(make_iterator(audio, global_batch_size=4, seed=0, shuffle=False, process_index=0, process_count=1))
  np.testing.assert_array_equal(batch['x'][1], audio[1]['audio'])
  with pytest.raises(ValueError, match='data.random_flip'):
    make_iterator(audio, global_batch_size=4, seed=0, random_flip=True, process_index=0, process_count=1)


def test_tfds_video_and_audio_read_the_real_way_under_mock_data():
  with tfds.testing.mock_data(num_examples=8):
    video = get_source('moving_mnist', split='test', data_dir='/nonexistent', num_frames=10)
    raw = tfds.data_source('moving_mnist', split='test')
    assert video.image_shape == (10, 64, 64, 1) and video.num_classes == 0
    batches = list(make_iterator(video, global_batch_size=4, seed=0, shuffle=False, num_epochs=1,
                                 process_index=0, process_count=1))
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[1]['x'][0], raw[4]['image_sequence'][:10] / np.float32(127.5) - 1)
    ucf = get_source('ucf101', split='test', data_dir='/nonexistent', num_frames=4)  # frames of varying count
    assert ucf.image_shape == (4, 256, 256, 3) and ucf.num_classes == 101
    np.testing.assert_array_equal(ucf[1]['video'], tfds.data_source('ucf101', split='test')[1]['video'][:4])
    audio = get_source('speech_commands', split='test', data_dir='/nonexistent', length=100, sample_rate=16000)
    raw = tfds.data_source('speech_commands', split='test')
    assert audio.image_shape == (100, 1) and audio.num_classes == 12 and audio.sample_rate == 16000
    pcm = np.asarray(raw[3]['audio'])[:100]
    expected = np.pad(pcm.astype(np.float32) / 32768, (0, 100 - len(pcm)))
    np.testing.assert_array_equal(audio[3]['audio'][:, 0], expected)
    assert audio[3]['label'] == raw[3]['label']
    with pytest.raises(SourceConfigError, match='data.sample_rate'):
      get_source('speech_commands', split='test', data_dir='/nonexistent', length=100, sample_rate=8000)
    with pytest.raises(SourceConfigError, match="data.feature.*no feature 'waveform'"):
      get_source('speech_commands', split='test', data_dir='/nonexistent', feature='waveform', length=100)
    with pytest.raises(SourceConfigError, match='data.length'):
      get_source('speech_commands', split='test', data_dir='/nonexistent')
    with pytest.raises(SourceConfigError, match='data.num_frames'):
      get_source('moving_mnist', split='test', data_dir='/nonexistent', num_frames=21)[0]
    with pytest.raises(SourceConfigError, match='data.feature.*no feature'):  # an image set read for clips
      get_source('mnist', split='test', data_dir='/nonexistent', feature='video')
    with pytest.raises(SourceConfigError, match='data.feature.*0 video / audio features'):
      get_source('mnist', split='test', data_dir='/nonexistent', num_frames=8)


@pytest.mark.parametrize('name, key, value', [('digits', 'num_frames', 8), ('moving_digits', 'length', 512),
                                              ('tones', 'num_frames', 8), ('tones', 'feature', 'audio'),
                                              ('moving_digits', 'num_frames', -1), ('tones', 'length', -4)])
def test_embedded_sets_name_the_key_they_cannot_take(name, key, value):
  with pytest.raises(SourceConfigError, match=f'config.data.{key}') as info:
    get_source(name, split='train', **{key: value})
  assert info.value.key == f'data.{key}'


def test_media_files_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  clips = rng.integers(0, 256, (3, 4, 8, 8, 1), dtype=np.uint8)
  grid = media.frame_grid(clips)
  assert grid.shape == (3 * 9 + 1, 4 * 9 + 1, 1)
  np.testing.assert_array_equal(grid[1 + 9:1 + 9 + 8, 1 + 2 * 9:1 + 2 * 9 + 8], clips[1, 2])  # clip 1, frame 2
  media.save_gif(tmp_path / 'c.gif', clips, columns=3)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(tmp_path / 'c.gif') as gif:
    assert gif.n_frames == 4
  audio = np.sin(2 * np.pi * 20 * np.arange(400) / 400)[:, None] * 0.5
  media.save_wav(tmp_path / 'a.wav', audio, sample_rate=8000)
  back, rate = media.read_wav(tmp_path / 'a.wav')
  assert rate == 8000 and np.abs(back - audio).max() <= 1 / 32767
  spectrum = media.spectrogram(audio[:, 0], n_fft=128, hop=32)  # 20 cycles in 400 samples: bin 128 * 20 / 400
  assert spectrum.shape == (65, 9) and np.all(np.argmax(spectrum, axis=0) == round(128 * 20 / 400))
  image = media.spectrogram_images(audio[None])
  assert image.dtype == np.uint8 and image.shape == (1, 65, 9, 1)
