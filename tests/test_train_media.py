"""The real ``python -m diffax.main`` on the video and audio test configs: samples as GIF / MP4 / WAV and an eval
JSON."""

import json

import imageio.v3 as iio
import numpy as np
from PIL import Image, ImageSequence

from diffax.trainer import media
import trainer_runs


def test_moving_digits_trains_writes_a_gif_and_evaluates(tmp_path):
  trainer_runs.run_main(tmp_path, config=f'{trainer_runs.REPO}/configs/moving_digits.py:runlocal')
  with Image.open(tmp_path / 'samples' / 'step_00000004.gif') as gif:
    frames = [np.asarray(f.convert('L')) for f in ImageSequence.Iterator(gif)]
  assert len(frames) == 4  # data.num_frames of runlocal
  assert frames[0].shape == (2 * (33 + 1), 2 * (8 * 33 + 1))  # 8 clips (of 10 classes) in one row, x2
  video = iio.imread(tmp_path / 'samples' / 'step_00000004.mp4', plugin='FFMPEG')
  assert video.shape == (4, *frames[0].shape, 3)  # the GIF's frames (even sizes) as RGB
  result = json.loads((tmp_path / 'eval' / 'step_00000004_dpm_solver-3_w1.json').read_text())
  assert {'frame_fd', 'temporal_fd', 'clip_accuracy'} <= set(result['metrics'])
  assert all(np.isfinite(v) and v >= 0 for v in result['metrics'].values())
  assert result['protocol']['metric'] == 'moving_digits' and result['protocol']['num_frames'] == 4


def test_audio_tones_trains_writes_wavs_and_evaluates(tmp_path):
  trainer_runs.run_main(tmp_path, config=f'{trainer_runs.REPO}/configs/audio_tones.py:runlocal')
  wavs = sorted((tmp_path / 'samples').glob('step_00000004_*.wav'))
  assert len(wavs) == 8
  audio, rate = media.read_wav(wavs[0])
  assert audio.shape == (128, 1) and rate == 8000 and np.all(np.abs(audio) <= 1.0)
  result = json.loads((tmp_path / 'eval' / 'step_00000004_dpm_solver-3_w1.json').read_text())
  assert {'tones_fd', 'tones_accuracy'} <= set(result['metrics'])
  assert np.isfinite(result['metrics']['tones_fd']) and result['protocol']['length'] == 128
