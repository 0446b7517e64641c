"""Samples of any rank on the host: image grids, clips as frame grids and animated GIFs, waveforms as WAV files and
spectrogram images; :func:`write_samples` sends them to the CLU writer and ``workdir/samples``.

Clips [N, T, H, W, C] in [-1, 1] become a frame grid (one row per clip, one column per frame) for TensorBoard, and
an animated GIF and an H.264 MP4 whose frame ``f`` tiles frame ``f`` of every clip (the MP4 is encoded by the ffmpeg
binary that the ``imageio-ffmpeg`` wheel ships, so no system ffmpeg is needed). Waveforms [N, L, C] in [-1, 1] go to
TensorBoard as audio summaries (``write_audios``) and log-magnitude spectrograms, and to 16-bit PCM WAV files.
"""

from __future__ import annotations

import math
import tempfile
import wave

import imageio.v3 as iio
import numpy as np
from etils import epath
from PIL import Image

from diffax.trainer import images


def frame_grid(clips: np.ndarray, *, pad: int = 1) -> np.ndarray:
  """uint8 [N, T, H, W, C] -> one uint8 image with clip ``n`` in row ``n`` and frame ``f`` in column ``f``."""
  n, t = clips.shape[:2]
  return images.grid(clips.reshape(n * t, *clips.shape[2:]), columns=t, pad=pad)


def animation_frames(clips: np.ndarray, *, columns: int | None = None, scale: int = 1) -> list[Image.Image]:
  """uint8 [N, T, H, W, C] -> ``T`` images, image ``f`` the grid of the clips' frame ``f`` enlarged ``scale``
  times with nearest-neighbour pixels."""
  frames = []
  for f in range(clips.shape[1]):
    tile = images.grid(clips[:, f], columns=columns)
    pil = Image.fromarray(tile[..., 0] if tile.shape[-1] == 1 else tile)
    frames.append(pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil)
  return frames


def save_gif(path: str | epath.Path, clips: np.ndarray, *, columns: int | None = None, scale: int = 1,
             frame_ms: int = 125) -> None:
  """Writes uint8 [N, T, H, W, C] as an animated GIF (looping) of :func:`animation_frames`, ``frame_ms``
  milliseconds per frame."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  frames = animation_frames(clips, columns=columns, scale=scale)
  with path.open('wb') as f:
    frames[0].save(f, format='GIF', save_all=True, append_images=frames[1:], duration=frame_ms, loop=0)


def save_mp4(path: str | epath.Path, clips: np.ndarray, *, columns: int | None = None, scale: int = 1,
             fps: float = 8.0, quality: int = 10) -> None:
  """Writes uint8 [N, T, H, W, C] as an H.264 MP4 (yuv420p, ``quality`` 0-10 of imageio's ffmpeg writer) of
  :func:`animation_frames` at ``fps`` frames per second.

  yuv420p needs even frame sizes: an odd height or width gets one black row or column at the bottom / right. The
  file is encoded locally and then copied to ``path``, which may be remote.
  """
  frames = np.stack([np.asarray(f.convert('RGB')) for f in animation_frames(clips, columns=columns, scale=scale)])
  _, h, w, _ = frames.shape
  frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    local = epath.Path(tmp) / 'clip.mp4'
    iio.imwrite(str(local), frames, plugin='FFMPEG', fps=fps, codec='libx264', quality=quality, pixelformat='yuv420p',
                macro_block_size=2)
    path.write_bytes(local.read_bytes())


def to_pcm16(audio: np.ndarray) -> np.ndarray:
  """Float waveforms in [-1, 1] -> int16 PCM ``round(32767 x)`` (values outside are clipped)."""
  return np.rint(np.clip(np.asarray(audio, np.float32), -1.0, 1.0) * 32767).astype(np.int16)


def save_wav(path: str | epath.Path, audio: np.ndarray, *, sample_rate: int) -> None:
  """Writes one waveform float [L, C] in [-1, 1] as a 16-bit PCM WAV file of ``C`` channels."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open('wb') as f, wave.open(f, 'wb') as w:
    w.setnchannels(audio.shape[-1])
    w.setsampwidth(2)
    w.setframerate(sample_rate)
    w.writeframes(to_pcm16(audio).tobytes())


def read_wav(path: str | epath.Path) -> tuple[np.ndarray, int]:
  """(float32 [L, C] in [-1, 1], sample rate) of a 16-bit PCM WAV file."""
  with epath.Path(path).open('rb') as f, wave.open(f, 'rb') as w:
    pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, w.getnchannels())
    return pcm.astype(np.float32) / 32767, w.getframerate()


def spectrogram(audio: np.ndarray, *, n_fft: int = 128, hop: int = 32) -> np.ndarray:
  """Magnitude of the short-time Fourier transform of a mono waveform [L]: [n_fft / 2 + 1, frames].

  ``|X[k, m]| = |sum_n w[n] x[m hop + n] exp(-2 pi i k n / n_fft)|`` with a periodic Hann window ``w``
  (frames that would run past the end are dropped; ``L >= n_fft``).
  """
  audio = np.asarray(audio, np.float64)
  if audio.ndim != 1 or len(audio) < n_fft:
    raise ValueError(f'spectrogram needs a mono waveform [L] with L >= n_fft={n_fft}, got {audio.shape}.')
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
  starts = np.arange(0, len(audio) - n_fft + 1, hop)
  frames = audio[starts[:, None] + np.arange(n_fft)[None, :]] * window  # [frames, n_fft]
  return np.abs(np.fft.rfft(frames, axis=-1)).T


def spectrogram_images(audio: np.ndarray, *, n_fft: int = 128, hop: int = 32, floor_db: float = -80.0) -> np.ndarray:
  """uint8 [N, n_fft / 2 + 1, frames, 1] of waveforms [N, L, C] (first channel): log magnitude in dB relative
  to the full-scale sine's peak, ``floor_db`` .. 0 dB mapped to 0 .. 255, low frequencies at the bottom."""
  full_scale = np.sum(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)) / 2  # a unit sine's peak bin
  out = []
  for x in np.asarray(audio)[..., 0]:
    db = 20 * np.log10(np.maximum(spectrogram(x, n_fft=n_fft, hop=hop) / full_scale, 1e-12))
    out.append(np.rint(np.clip(1 - db / floor_db, 0, 1) * 255).astype(np.uint8)[::-1, :, None])
  return np.stack(out)


def write_samples(writer, step: int, samples: np.ndarray, *, directory: epath.Path | None, columns: int | None = None,
                  sample_rate: int = 0) -> None:
  """Sends samples to ``writer`` at ``step`` and, with a ``directory``, to files ``step_<step>.*`` there.

  Images [N, H, W, C]: a grid (``columns`` per row) as ``'samples'`` and a PNG. Clips [N, T, H, W, C]: the
  frame grid as ``'samples'``, a PNG of it, an animated GIF and an MP4. Waveforms [N, L, C]: audio summaries
  ``'samples'`` at ``sample_rate``, their spectrograms as ``'spectrograms'``, a PNG grid of those and one WAV
  per sample (``step_<step>_<i>.wav``).
  """
  stem = f'step_{step:08d}'
  if samples.ndim == 4:
    grid = images.grid(images.to_uint8(samples), columns=columns)
    writer.write_images(step, {'samples': grid[None]})
    if directory is not None:
      images.save_png(directory / f'{stem}.png', grid, scale=4)
  elif samples.ndim == 5:
    clips = images.to_uint8(samples)
    grid = frame_grid(clips)
    writer.write_images(step, {'samples': grid[None]})
    if directory is not None:
      images.save_png(directory / f'{stem}.png', grid, scale=2)
      columns = columns or math.ceil(math.sqrt(len(clips)))
      save_gif(directory / f'{stem}.gif', clips, columns=columns, scale=2)
      save_mp4(directory / f'{stem}.mp4', clips, columns=columns, scale=2)
  elif samples.ndim == 3:
    if sample_rate <= 0:
      raise ValueError(f'Waveform samples need a positive sample_rate, got {sample_rate} (config key '
                       'data.sample_rate).')
    audio = np.clip(samples, -1.0, 1.0)
    spectrograms = spectrogram_images(audio)
    grid = images.grid(spectrograms, columns=columns)
    writer.write_audios(step, {'samples': audio}, sample_rate=sample_rate)
    writer.write_images(step, {'spectrograms': grid[None]})
    if directory is not None:
      images.save_png(directory / f'{stem}_spectrograms.png', grid, scale=2)
      for i, x in enumerate(audio):
        save_wav(directory / f'{stem}_{i:03d}.wav', x, sample_rate=sample_rate)
  else:
    raise ValueError(f'Samples must be images [N, H, W, C], clips [N, T, H, W, C] or waveforms [N, L, C]; got '
                     f'{samples.shape}.')
