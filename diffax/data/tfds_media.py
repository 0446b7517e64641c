"""TFDS clips and waveforms read by index (``tfds.data_source``): ``moving_mnist``, ``ucf101``, ``speech_commands``.

Records become ``{'video': uint8 [T, H, W, C], 'label'}`` or ``{'audio': float32 [L, C] in [-1, 1], 'label'}``
(see :mod:`diffax.data.sources`), with one length for the whole dataset so examples batch:

* clips keep their first ``num_frames`` frames; a shorter clip is an error (its index is named);
* waveforms keep their first ``length`` samples and are zero-padded at the end when shorter (speech_commands'
  utterances last up to one second); integer PCM is scaled by its full range, ``int16 / 32768``.

A dataset whose ``feature`` is missing, is neither ``Video`` nor ``Audio``, has no fixed frame size, or was
recorded at another sample rate than the model expects fails at construction with the config key to change.
"""

from __future__ import annotations

import numpy as np

from diffax.data.sources import SourceConfigError, open_tfds


class TfdsMediaSource:
  """A TFDS video or audio dataset as a random-access source.

  Args:
    name: TFDS name, e.g. ``'moving_mnist'``, ``'ucf101'``, ``'speech_commands'``.
    split: TFDS split.
    data_dir: TFDS data directory.
    feature: the ``Video`` or ``Audio`` feature ('' = the dataset's only one).
    num_frames: frames per clip (0 = the feature's fixed length).
    length: samples per waveform (0 = the feature's fixed length).
    sample_rate: the rate the model is trained at (0 = accept the dataset's).
    label_key: the class-label feature; a dataset without it has ``num_classes = 0`` and label 0.
  """

  def __init__(self, name: str, *, split: str, data_dir: str | None = None, feature: str = '', num_frames: int = 0,
               length: int = 0, sample_rate: int = 0, label_key: str = 'label'):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    self._source = open_tfds(name, split=split, data_dir=data_dir)
    features = self._source.dataset_info.features
    media = {k: f for k, f in features.items() if isinstance(f, (tfds.features.Video, tfds.features.Audio))}
    if not feature:
      if len(media) != 1:
        raise SourceConfigError('data.feature', f'TFDS dataset {name!r} has {len(media)} video / audio features '
                         f'({sorted(media)}); name the one to read. Its features are {sorted(features)}.')
      feature = next(iter(media))
    if feature not in features:
      raise SourceConfigError('data.feature', f'TFDS dataset {name!r} has no feature {feature!r}; its features are '
                       f'{sorted(features)}.')
    if feature not in media:
      raise SourceConfigError('data.feature', f'{name}/{feature} is a {type(features[feature]).__name__}, not a '
                       'Video or Audio feature (images are read by TfdsSource with feature "image").')
    spec = features[feature]
    shape = tuple(spec.shape)
    self._feature, self._name = feature, name
    if isinstance(spec, tfds.features.Video):
      self.kind = 'video'
      if None in shape[1:]:
        raise SourceConfigError('data.name', f'TFDS dataset {name!r} has frames of varying size {shape[1:]}; batches '
                                'need one size (use a resized builder config, e.g. ucf101/ucf101_1_256).')
      self._length = num_frames or shape[0]
      if self._length is None:
        raise SourceConfigError('data.num_frames', f'{name}/{feature} has clips of varying length; set the number of '
                         'frames per example.')
      self.image_shape = (self._length, *shape[1:])
    else:
      self.kind = 'audio'
      self.sample_rate = spec.sample_rate
      if sample_rate and spec.sample_rate and spec.sample_rate != sample_rate:
        raise SourceConfigError('data.sample_rate', f'the model expects {sample_rate} Hz but {name}/{feature} is '
                         f'recorded at {spec.sample_rate} Hz; set data.sample_rate={spec.sample_rate} (and a '
                         'data.length that fits the model).')
      self._length = length or shape[0]
      if self._length is None:
        raise SourceConfigError('data.length', f'{name}/{feature} has waveforms of varying length; set the number '
                         f'of samples per example (e.g. {spec.sample_rate or 16000} for one second).')
      self._scale = float(np.iinfo(spec.dtype.as_numpy_dtype).max + 1) if spec.dtype.is_integer else 1.0
      self.image_shape = (self._length, shape[1] if len(shape) > 1 else 1)
    self._label_key = label_key if label_key in features else None
    self.num_classes = features[label_key].num_classes if self._label_key else 0

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    record = self._source[index]
    data = np.asarray(record[self._feature])
    label = int(record[self._label_key]) if self._label_key else 0
    if self.kind == 'video':
      if len(data) < self._length:
        raise SourceConfigError('data.num_frames', f'clip {index} of {self._name} has {len(data)} frames, fewer '
                         f'than {self._length}.')
      return {'video': data[:self._length].astype(np.uint8), 'label': label}
    audio = data.reshape(len(data), -1)[:self._length].astype(np.float32) / np.float32(self._scale)
    audio = np.pad(audio, ((0, self._length - len(audio)), (0, 0)))
    return {'audio': audio, 'label': label}
