"""Clips as MP4: the file decodes (through the same bundled ffmpeg, independently of the writer) to one frame per clip
frame, at the GIF's size padded to even, the configured rate, and the clips' pixels up to H.264's loss."""

import imageio.v3 as iio
import numpy as np
import pytest

from diffax.trainer import media

N, T, H, W = 2, 5, 8, 8


@pytest.fixture(scope='module')
def clips():
  """uint8 [2, 5, 8, 8, 1]: clip n, frame f a flat grey of level 40 + 30 f + 60 n (flat areas code nearly losslessly)."""
  level = 40 + 30 * np.arange(T)[None, :] + 60 * np.arange(N)[:, None]
  return np.broadcast_to(level[:, :, None, None, None], (N, T, H, W, 1)).astype(np.uint8)


@pytest.mark.parametrize('scale', [1, 2])
def test_mp4_decodes_to_the_frames_of_the_gif(tmp_path, clips, scale):
  path = tmp_path / 'clips.mp4'
  media.save_mp4(path, clips, columns=N, scale=scale, fps=5)
  decoded = iio.imread(path, plugin='FFMPEG')  # [T, H', W', 3]
  gif_h, gif_w = (H + 2) * scale, (N * (W + 1) + 1) * scale  # one row of N clips, 1-pixel white borders
  assert decoded.shape == (T, gif_h + gif_h % 2, gif_w + gif_w % 2, 3)  # 19 columns at scale 1 -> padded to 20
  assert iio.immeta(path, plugin='FFMPEG')['fps'] == 5
  expected = np.stack([np.asarray(f) for f in media.animation_frames(clips, columns=N, scale=scale)])
  for f in range(T):
    for n in range(N):  # the inside of each clip's tile, away from the borders' ringing
      r0, c0 = 2 * scale, (1 + n * (W + 1) + 2) * scale
      tile = decoded[f, r0:r0 + 4 * scale, c0:c0 + 4 * scale].astype(np.float64)
      assert np.abs(tile - clips[n, f, 0, 0, 0]).max() <= 4, (f, n)
  assert np.abs(decoded[:, :gif_h, :gif_w, 0].astype(np.float64) - expected).mean() < 3


def test_clip_samples_are_written_as_mp4_too(tmp_path, clips):
  class Writer:
    def write_images(self, step, images):
      self.images = images

  media.write_samples(Writer(), 7, clips.astype(np.float32) / 127.5 - 1, directory=tmp_path, columns=2)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['step_00000007.gif', 'step_00000007.mp4',
                                                        'step_00000007.png']
  assert iio.imread(tmp_path / 'step_00000007.mp4', plugin='FFMPEG').shape[0] == T
