"""Quality of generated tones and chirps, in the features of a small spectrogram classifier.

The waveforms of :mod:`diffax.data.tones` have no pretrained audio network, so, as for the digits
(:mod:`diffax.evaluation.digits`), we train one: log-magnitude spectrograms (Hann window of 64 samples, hop 32,
``log(1e-3 + |X|)``, flattened) go through an MLP (-> 128 -> 64 -> 4) whose 64-wide penultimate layer gives the
features, fitted with Adam (full batch, 300 steps, lr 3e-3) on the ``'train'`` split from a fixed seed at the
length of the waveforms to judge, in about a second. Its held-out accuracy on ``'test'`` is reported. Then

  * ``tones_fd``: the Fréchet distance (Heusel et al. 2017, eq. 6) between Gaussians fitted to the penultimate
    features of the samples and of the real ``'test'`` waveforms (512 of them);
  * ``tones_accuracy`` (class-conditional samples): the fraction the classifier assigns to their intended class.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from diffax.data import tones
from diffax.evaluation import stats

Array = jax.Array
N_FFT, HOP, FEATURE_DIM = 64, 32, 64
STEPS, LEARNING_RATE, SEED = 300, 3e-3, 0


def log_spectrogram(audio: Array) -> Array:
  """``log(1e-3 + |STFT|)`` [B, frames, N_FFT / 2 + 1] of waveforms [B, L, 1] (periodic Hann window); jittable."""
  x = audio[..., 0]
  starts = np.arange(0, x.shape[1] - N_FFT + 1, HOP)
  window = 0.5 - 0.5 * jnp.cos(2 * jnp.pi * jnp.arange(N_FFT, dtype=x.dtype) / N_FFT)
  frames = x[:, starts[:, None] + np.arange(N_FFT)[None, :]] * window[None, None]  # [B, frames, N_FFT]
  return jnp.log(1e-3 + jnp.abs(jnp.fft.rfft(frames, axis=-1)))


class TonesMLP(nn.Module):
  """Waveforms [B, L, 1] -> (penultimate features [B, 64], logits [B, 4])."""

  @nn.compact
  def __call__(self, audio: Array) -> tuple[Array, Array]:
    h = log_spectrogram(audio)
    h = nn.relu(nn.Dense(128)(h.reshape(h.shape[0], -1)))
    features = nn.relu(nn.Dense(FEATURE_DIM)(h))
    return features, nn.Dense(tones.NUM_CLASSES)(features)


def _waveforms(split: str, length: int) -> tuple[np.ndarray, np.ndarray]:
  source = tones.TonesSource(split, length=length)
  return (np.stack([source[i]['audio'] for i in range(len(source))]),
          np.array([source[i]['label'] for i in range(len(source))]))


@functools.partial(jax.jit, static_argnames='steps')
def _train(params: Any, x: Array, y: Array, *, steps: int) -> Any:
  tx = optax.adam(LEARNING_RATE)

  def step(carry, _):
    params, opt_state = carry
    grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        TonesMLP().apply({'params': p}, x)[1], y).mean())(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
  return params


class TonesEvaluator:
  """Streaming ``tones_fd`` and ``tones_accuracy`` (module docstring) of waveforms [B, length, 1] in [-1, 1].

  Args:
    length: samples per waveform (config key data.length); at least ``N_FFT``.
  """

  def __init__(self, *, length: int):
    if length < N_FFT:
      raise ValueError(f'The tones metric needs waveforms of {N_FFT} samples or more, got {length} (config key '
                       'data.length).')
    self.length = length
    x, y = _waveforms('train', length)
    params = TonesMLP().init(jax.random.PRNGKey(SEED), x[:1])['params']
    with jax.numpy_dtype_promotion('standard'):  # optax's Adam bias correction computes ``float ** int32``
      self.params = _train(params, jnp.asarray(x), jnp.asarray(y), steps=STEPS)
    self._fn = jax.jit(lambda a: TonesMLP().apply({'params': self.params}, a))
    x_test, y_test = _waveforms('test', length)
    features, logits = self._fn(jnp.asarray(x_test))
    self.test_accuracy = float(np.mean(np.argmax(np.asarray(logits), -1) == y_test))
    self.reference = stats.FeatureStats(dim=FEATURE_DIM)
    self.reference.update(np.asarray(features, np.float64))
    self.reset()

  def reset(self) -> None:
    self._stats = stats.FeatureStats(dim=FEATURE_DIM)
    self._correct, self._labelled = 0, 0

  def update(self, images: Any, labels: Any | None = None) -> None:
    if images.ndim != 3 or images.shape[1:] != (self.length, 1):
      raise ValueError(f'Expected waveforms [B, {self.length}, 1] (config key data.length), got {images.shape}.')
    features, logits = multihost_utils.process_allgather(self._fn(images), tiled=True)
    self._stats.update(np.asarray(features, np.float64))
    if labels is not None:
      labels = np.asarray(multihost_utils.process_allgather(labels, tiled=True))
      self._correct += int(np.sum(np.argmax(np.asarray(logits), -1) == labels))
      self._labelled += len(labels)

  def result(self) -> dict[str, float]:
    out = {'tones_fd': stats.frechet_distance(self._stats.mean, self._stats.cov, self.reference.mean,
                                              self.reference.cov)}
    if self._labelled:
      out['tones_accuracy'] = self._correct / self._labelled
    return out

  def protocol(self) -> dict[str, Any]:
    return {'metric': 'tones', 'length': self.length, 'classifier_test_accuracy': self.test_accuracy,
            'classifier': f'log-spectrogram MLP, Adam {STEPS} steps, seed {SEED}', 'reference': "TonesSource('test')"}
