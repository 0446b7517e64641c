"""The embedded default's metric: a small digits classifier standing in for Inception.

The 8x8 digits (:mod:`diffax.data.digits`) have no Inception network, so we train one: an MLP
(64 -> 256 -> 128 -> 10) whose 128-wide penultimate layer gives the features, fitted with AdamW on the
``'train'`` split (random shifts of up to one pixel as augmentation; no flips, digits are not mirror-symmetric)
on the CPU in seconds, reproducibly. Its held-out accuracy on ``'test'`` is reported (98.9 %; at least 95 % is
required), and it gives

  * ``digits_fd``: the Fréchet distance (Heusel et al. 2017, eq. 6) between Gaussians fitted to the
    penultimate features of the samples and of the real ``'test'`` digits. The reference is the test split
    because the classifier never saw it: real digits it has not seen are what a perfect generator produces
    (training digits sit deeper in the classifier's decision regions than unseen ones). With only 359
    reference images the distance has a floor from sampling noise: the 1,438 real training digits score 3.6,
    a random half of the test digits 3.6, uniform noise 258 and the 179 sevens 352.
  * ``digits_accuracy``: the fraction of class-conditional samples the classifier assigns to their intended
    label (does a "7" look like a 7?), and ``digits_confidence``: the mean probability it gives that label.

The trained parameters are cached as ``.npz`` (no pickle) in ``cache_dir`` (``$DIFFAX_CACHE_DIR`` or
``~/.cache/diffax``) under a hash of the training recipe; a cached file is reused, a corrupt one is retrained
with a warning.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import tempfile
from typing import Any
import warnings
import zipfile

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffax.data import digits
from diffax.evaluation import stats

Array = jax.Array

_RECIPE = {
    'format': 1,
    'init': 'lecun_normal/zero_bias',
    'rng': 'numpy.RandomState',
    'model': 'dense-256/relu/dense-128/relu/dense-10',
    'optimizer': 'adamw',
    'learning_rate': 3e-3,
    'schedule': 'cosine',
    'weight_decay': 1e-4,
    'steps': 1500,
    'batch_size': 128,
    'max_shift': 1,
    'seed': 0,
    'split': {'test_fraction': digits.TEST_FRACTION, 'split_seed': digits.SPLIT_SEED},
}
"""Everything the trained parameters depend on; its hash names the cache file (bump ``format`` when the training
code changes in a way these entries do not describe)."""
FEATURE_DIM = 128


class DigitsMLP(nn.Module):
  """``x`` [B, 8, 8, 1] in [-1, 1] -> (penultimate features [B, 128], logits [B, 10])."""

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    h = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
    features = nn.relu(nn.Dense(FEATURE_DIM)(h))
    return features, nn.Dense(digits.NUM_CLASSES)(features)


@jax.jit
def _forward(params: Any, x: Array) -> tuple[Array, Array]:
  return DigitsMLP().apply({'params': params}, x)


def _to_unit_range(images_u8: np.ndarray) -> np.ndarray:
  return images_u8.astype(np.float32) / np.float32(127.5) - 1


def _init_params(rng: np.random.RandomState) -> dict[str, dict[str, np.ndarray]]:
  """LeCun-normal kernels ``N(0, 1 / fan_in)`` (LeCun et al. 1998) and zero biases, in :class:`DigitsMLP`'s tree."""
  widths = (64, 256, FEATURE_DIM, digits.NUM_CLASSES)
  return {f'Dense_{i}': {'kernel': (rng.standard_normal((m, n)) / np.sqrt(m)).astype(np.float32),
                         'bias': np.zeros((n,), np.float32)} for i, (m, n) in enumerate(zip(widths[:-1], widths[1:]))}


def _shifted_crops(padded: Array, idx: Array, offsets: Array) -> Array:
  """Images ``idx`` [B] cut at ``offsets`` [B, 2] from ``padded`` [N, 10, 10, 1]: the digits [B, 8, 8, 1]
  translated by ``offset - pad``."""
  size = padded.shape[1] - 2 * _RECIPE['max_shift']
  rows = offsets[:, :1] + jnp.arange(size)[None, :]
  cols = offsets[:, 1:] + jnp.arange(size)[None, :]
  return padded[idx[:, None, None], rows[:, :, None], cols[:, None, :]]


@functools.partial(jax.jit, static_argnames=('learning_rate', 'weight_decay'))
def _train(params: Any, padded: Array, y: Array, idx_steps: Array, offsets_steps: Array, *,
           learning_rate: float, weight_decay: float) -> Any:
  """AdamW with cosine decay over the ``T`` given minibatches (indices ``idx_steps`` [T, B], shift offsets
  ``offsets_steps`` [T, B, 2]) of ``padded`` [N, 10, 10, 1] with labels ``y`` [N]; one compiled program."""
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, idx_steps.shape[0]), weight_decay=weight_decay)

  def loss_fn(params, x, y):
    _, logits = DigitsMLP().apply({'params': params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, batch):
    params, opt_state = carry
    idx, offsets = batch
    grads = jax.grad(loss_fn)(params, _shifted_crops(padded, idx, offsets), y[idx])
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), (idx_steps, offsets_steps))
  return params


def recipe_hash() -> str:
  """Hex digest (16 chars) of the training recipe: the cache key."""
  return hashlib.sha256(json.dumps(_RECIPE, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir() -> str:
  """``$DIFFAX_CACHE_DIR`` if set, else ``~/.cache/diffax``."""
  return os.environ.get('DIFFAX_CACHE_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'diffax')


def train_params() -> Any:
  """Trains the classifier from scratch on the CPU (deterministic); returns its params as numpy arrays.

  All randomness (initialisation, minibatches, shifts) comes from NumPy's frozen legacy ``RandomState`` stream,
  so the compiled program holds no random-number generator (threefry is slow to compile on the CPU).
  """
  images, labels = digits.load_digits('train')
  r = _RECIPE
  rng = np.random.RandomState(r['seed'])
  params = _init_params(rng)
  idx_steps = rng.randint(0, len(labels), (r['steps'], r['batch_size'])).astype(np.int32)
  offsets_steps = rng.randint(0, 2 * r['max_shift'] + 1, (r['steps'], r['batch_size'], 2)).astype(np.int32)
  pad = ((0, 0), (r['max_shift'], r['max_shift']), (r['max_shift'], r['max_shift']), (0, 0))
  padded = np.pad(_to_unit_range(images), pad, constant_values=-1.0)  # background is -1
  # optax's Adam bias correction computes ``float ** int32``, which strict dtype promotion rejects.
  with jax.default_device(jax.devices('cpu')[0]), jax.numpy_dtype_promotion('standard'):
    params = _train(params, padded, labels, idx_steps, offsets_steps, learning_rate=r['learning_rate'],
                    weight_decay=r['weight_decay'])
  return jax.tree.map(np.asarray, params)


def _flatten(params: Any) -> dict[str, np.ndarray]:
  return {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}


def _save_params(path: str, params: Any) -> None:
  """Writes ``params`` flattened to ``'<module>/<name>'`` keys, atomically (a temporary file, then a rename)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=os.path.dirname(path), suffix='.npz', delete=False) as f:
    np.savez(f, **_flatten(params))
  os.chmod(f.name, 0o644)  # NamedTemporaryFile creates 0600; a shared cache must be readable by all
  os.replace(f.name, path)


def _load_params(path: str) -> Any:
  """Reads params written by :func:`_save_params`, checked against the model's parameter shapes."""
  with np.load(path, allow_pickle=False) as f:
    flat = {k: f[k] for k in f.files}
  expected = {k: (v.shape, v.dtype) for k, v in _flatten(_init_params(np.random.RandomState(0))).items()}
  if {k: (v.shape, v.dtype) for k, v in flat.items()} != expected:
    raise ValueError(f'{path} does not hold the parameters of {_RECIPE["model"]}.')
  return flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in flat.items()})


@dataclasses.dataclass(frozen=True)
class DigitsClassifier:
  """A trained digits classifier with the feature statistics of the real test digits.

  Attributes:
    params: the :class:`DigitsMLP` parameters (numpy arrays).
    test_accuracy: held-out accuracy on ``load_digits('test')``.
    reference_mu: mean [128] of the test digits' penultimate features (float64).
    reference_sigma: their unbiased covariance [128, 128] (float64).
  """
  params: Any
  test_accuracy: float
  reference_mu: np.ndarray
  reference_sigma: np.ndarray

  @classmethod
  def from_params(cls, params: Any) -> DigitsClassifier:
    """Evaluates ``params`` on the test split: held-out accuracy and reference feature statistics."""
    images, labels = digits.load_digits('test')
    features, logits = _forward(params, jnp.asarray(_to_unit_range(images)))
    reference = stats.FeatureStats(dim=FEATURE_DIM)
    reference.update(np.asarray(features))
    accuracy = float(np.mean(np.argmax(np.asarray(logits), axis=-1) == labels))
    return cls(params=params, test_accuracy=accuracy, reference_mu=reference.mean, reference_sigma=reference.cov)

  @classmethod
  def load_or_train(cls, cache_dir: str | None = None) -> DigitsClassifier:
    """Loads the cached classifier for the current recipe, training (and caching) it if absent or corrupt.

    Args:
      cache_dir: directory of the cache (default :func:`default_cache_dir`).
    """
    path = os.path.join(cache_dir or default_cache_dir(), f'digits_classifier_{recipe_hash()}.npz')
    if os.path.exists(path):
      try:
        return cls.from_params(_load_params(path))
      except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        warnings.warn(f'Retraining the digits classifier: the cached {path} is unreadable ({e}).', stacklevel=2)
    params = train_params()
    _save_params(path, params)
    return cls.from_params(params)

  def features(self, images: Array) -> Array:
    """Penultimate features [B, 128] of ``images`` [B, 8, 8, 1] float in [-1, 1]; jittable."""
    return _forward(self.params, images)[0]

  def logits(self, images: Array) -> Array:
    """Class logits [B, 10] of ``images`` [B, 8, 8, 1] float in [-1, 1]; jittable."""
    return _forward(self.params, images)[1]
