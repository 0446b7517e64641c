"""Random-access sources: the embedded digits and TFDS datasets read through ``tfds.data_source``.

A source has ``len(source)`` records and ``source[i] -> {'image': uint8 [H, W, C], 'label': int}``, plus
``image_shape`` (H, W, C) and ``num_classes``, so grain (:mod:`diffax.data.pipeline`) can shuffle, shard and
checkpoint by index. Clips hold ``'video'`` uint8 [T, H, W, C] and waveforms ``'audio'`` float32 [L, C] in
[-1, 1] instead of ``'image'`` (``image_shape`` is then the clip's or the waveform's shape): the embedded
:mod:`~diffax.data.moving_digits` and :mod:`~diffax.data.tones`, and :mod:`~diffax.data.tfds_media`.

TFDS datasets are read from their ArrayRecord files with ``tfds.data_source``: random access
without TensorFlow in the input path, and ``tfds.testing.mock_data`` replaces them with fake records offline.
Images of varying size (``imagenet2012``) are given one size per record by ADM's center crop
(``resize='center_crop'``, ``image_size``: :mod:`diffax.data.transforms`).

A dataset that is not prepared raises :class:`DatasetNotPreparedError` with the command that prepares it. Note
that ``tfds.data_source`` reads only the ``array_record`` (or ``parquet``) file format, while ``tfds build``
writes ``tfrecord`` unless told otherwise: the commands below pass ``--file_format=array_record``.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import numpy as np

from diffax.data import digits, transforms

Record = dict[str, Any]
"""``{'image': uint8 [H, W, C], 'label': int}``."""

# Extra preparation steps for datasets whose files TFDS cannot fetch by itself (or only with an account).
_MANUAL_DOWNLOADS = {
    'imagenet2012': (
        'ImageNet needs a manual download: register at https://image-net.org/download-images, download '
        'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar and place them in {manual_dir}.'),
    'imagenet_resized': (
        'The downsampled ImageNet files come from https://image-net.org/download-images (an ImageNet account '
        'is needed); if TFDS cannot fetch them, download the Imagenet<size>_*_npz.zip files of that page '
        '(for 64x64: Imagenet64_train_part1_npz.zip, Imagenet64_train_part2_npz.zip, Imagenet64_val_npz.zip) '
        'and place them in {manual_dir}.'),
}


class Source(Protocol):
  """A random-access dataset of images, clips or waveforms."""

  image_shape: tuple[int, ...]
  num_classes: int

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Record:
    ...


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset is not prepared in ``data_dir`` (or not in a random-access file format)."""


class SourceConfigError(ValueError):
  """A source argument that cannot work with the dataset; ``key`` is the trainer's config key for it
  (``'data.feature'``, ``'data.num_frames'``, ``'data.length'``, ``'data.sample_rate'``)."""

  def __init__(self, key: str, message: str):
    super().__init__(f'config.{key}: {message}')
    self.key, self.detail = key, message


class DigitsSource:
  """The embedded 8x8 digits (:func:`diffax.data.digits.load_digits`), held in memory.

  Args:
    split: ``'train'``, ``'test'`` or ``'all'``.
    style: one of :data:`diffax.data.digits.STYLES` (``'bold'``, ``'inverted'``; ``''``: as scanned).
  """

  num_classes = digits.NUM_CLASSES

  def __init__(self, split: str, style: str = ''):
    self._images, self._labels = digits.load_digits(split, style)
    self.image_shape = tuple(self._images.shape[1:])

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> Record:
    return {'image': self._images[index], 'label': int(self._labels[index])}


class TfdsSource:
  """A TFDS image-classification dataset read by index with ``tfds.data_source`` (ArrayRecord files).

  Args:
    name: TFDS name, e.g. ``'cifar10'`` or ``'imagenet_resized/64x64'``.
    split: TFDS split, e.g. ``'train'``, ``'test'`` or ``'train[:90%]'``.
    data_dir: TFDS data directory (default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    image_key: feature holding the uint8 image [H, W, C].
    label_key: feature holding the integer class label.
    image_size: 0 (images as stored), or the size of ADM's center crop (:func:`diffax.data.transforms.
      center_crop`) applied to every record: ``'image'`` uint8 [image_size, image_size, C].

  Raises:
    DatasetNotPreparedError: the dataset is not prepared in ``data_dir`` as ``array_record``.
    SourceConfigError: images of varying size without ``image_size`` (key ``data.resize``).
  """

  def __init__(self, name: str, *, split: str, data_dir: str | None = None, image_key: str = 'image',
               label_key: str = 'label', image_size: int = 0):
    self._source = open_tfds(name, split=split, data_dir=data_dir)
    features = self._source.dataset_info.features
    self.image_shape = tuple(features[image_key].shape)
    if image_size:
      self.image_shape = (image_size, image_size, self.image_shape[-1])
    if None in self.image_shape:
      raise SourceConfigError('data.resize', f'TFDS dataset {name!r} has images of varying size '
                              f'{self.image_shape}; batches need one size: set data.resize=\'center_crop\' and '
                              'data.image_size (ADM\'s center crop, e.g. 256), or use a resized variant such as '
                              'imagenet_resized/64x64.')
    self.num_classes = features[label_key].num_classes
    self._image_key = image_key
    self._label_key = label_key
    self._image_size = image_size

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Record:
    record = self._source[index]
    image = np.asarray(record[self._image_key], dtype=np.uint8)
    if self._image_size:
      image = transforms.center_crop(image, self._image_size)
    return {'image': image, 'label': int(record[self._label_key])}


def open_tfds(name: str, *, split: str, data_dir: str | None):
  """``tfds.data_source(name, split=split)`` read from ``data_dir``, or :class:`DatasetNotPreparedError` saying how
  to prepare it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; digits runs need none)

  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise
  except Exception as e:  # tfds reports a missing dataset as a NotImplementedError about the file format.
    if error := _not_prepared_error(name, data_dir):
      raise error from e
    raise


def _not_prepared_error(name: str, data_dir: str | None) -> DatasetNotPreparedError | None:
  """Explains how to prepare ``name`` in ``data_dir`` for ``tfds.data_source``; None if it is prepared."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  root = data_dir or tfds.core.constants.get_default_data_dir()
  builder = tfds.builder(name, data_dir=root)
  readable = (tfds.core.FileFormat.ARRAY_RECORD, tfds.core.FileFormat.PARQUET)
  if builder.is_prepared() and builder.info.file_format in readable:
    return None
  if builder.is_prepared():
    problem = (f'is prepared in {builder.data_dir} as {builder.info.file_format.value}, which '
               'tfds.data_source cannot read by index (it needs array_record)')
  else:
    problem = f'is not prepared in data_dir={root!r}'
  steps = _MANUAL_DOWNLOADS.get(re.split('[/:]', name)[0], '').format(manual_dir=f'{root}/downloads/manual')
  return DatasetNotPreparedError(
      f'TFDS dataset {name!r} {problem}. Prepare it with\n'
      f'  tfds build {name} --data_dir={root} --file_format=array_record\n'
      f'or, in Python,\n'
      f'  tfds.builder({name!r}, data_dir={root!r}, file_format=\'array_record\').download_and_prepare()'
      + (f'\n{steps}' if steps else ''))


def get_source(name: str, *, split: str, data_dir: str | None = None, feature: str = '', num_frames: int = 0,
               length: int = 0, sample_rate: int = 0, style: str = '', resize: str = '', image_size: int = 0) -> Source:
  """Returns the source named ``name``: embedded (``'digits'``, ``'digits_captions'``, ``'moving_digits'``,
  ``'tones'``) or TFDS.

  A TFDS dataset is read as images, clips or waveforms by the type of its ``feature``
  (:class:`TfdsSource` for an ``Image``; :class:`diffax.data.tfds_media.TfdsMediaSource` for a ``Video`` or an
  ``Audio`` feature, e.g. ``moving_mnist``'s ``'image_sequence'``, ``ucf101``'s ``'video'``, ``speech_commands``'
  ``'audio'``).

  Args:
    name: ``'digits'``, ``'moving_digits'``, ``'tones'`` or a TFDS name such as ``'cifar10'``, ``'moving_mnist'``.
    split: split of that dataset (``'train'`` / ``'test'`` / ``'all'`` for digits and moving digits).
    data_dir: TFDS data directory; ignored for the embedded sets.
    feature: the TFDS feature holding the data ('' = ``'image'``, or the dataset's one video / audio feature).
    num_frames: frames per clip (0 = the dataset's; moving digits: 16).
    length: samples per waveform (0 = the dataset's; tones: 1024).
    sample_rate: the sample rate the model expects (0 = the dataset's; tones: 8000); a TFDS dataset recorded at
      another rate is an error.
    style: (digits) a new look of the digits, one of :data:`diffax.data.digits.STYLES`.
    resize: (TFDS images) ``''`` (as stored) or ``'center_crop'``: ADM's center crop to ``image_size``
      (:mod:`diffax.data.transforms`), which gives ``imagenet2012``'s images of varying size one size.
    image_size: the crop's size (set with ``resize`` only).
  """
  from diffax.data import captions, moving_digits, tfds_media, tones  # pylint: disable=g-import-not-at-top

  given = {'data.feature': feature, 'data.num_frames': num_frames, 'data.length': length,
           'data.sample_rate': sample_rate, 'data.style': style, 'data.resize': resize, 'data.image_size': image_size}
  takes = {'digits': ('data.style',), 'digits_captions': (), 'moving_digits': ('data.num_frames',), 'tones': ('data.length', 'data.sample_rate')}
  for key, value in given.items():
    if name in takes and value and key not in takes[name]:
      raise SourceConfigError(key, f'the embedded {name!r} set takes no {key.split(".")[1]} (it takes '
                              f'{list(takes[name])}); '
                              'leave it at its default.')
  if resize not in ('', *transforms.RESIZES):
    raise SourceConfigError('data.resize', f'{resize!r} is not one of {("", *transforms.RESIZES)}.')
  if bool(resize) != (image_size > 0):
    key = 'data.image_size' if resize else 'data.resize'
    raise SourceConfigError(key, f'data.resize={resize!r} and data.image_size={image_size} go together: set both '
                            "(e.g. 'center_crop' and 256) or neither.")
  if name not in takes and style:
    raise SourceConfigError('data.style', f'styles are made from the embedded digits only, not {name!r}.')
  if name == 'digits':
    if style not in digits.STYLES:
      raise SourceConfigError('data.style', f'{style!r} is not one of {digits.STYLES}.')
    return DigitsSource(split, style)
  if name == 'digits_captions':
    return captions.CaptionedDigitsSource(split)
  if name == 'moving_digits':
    return moving_digits.MovingDigitsSource(split, num_frames=num_frames or 16)
  if name == 'tones':
    return tones.TonesSource(split, length=length or 1024, sample_rate=sample_rate or 8000)
  media_args = num_frames or length or sample_rate
  if feature == 'image' or (not feature and not media_args
                            and 'image' in open_tfds(name, split=split, data_dir=data_dir).dataset_info.features):
    return TfdsSource(name, split=split, data_dir=data_dir, image_size=image_size)
  if resize:
    raise SourceConfigError('data.resize', f'crops images; {name!r} is read as clips or waveforms.')
  return tfds_media.TfdsMediaSource(name, split=split, data_dir=data_dir, feature=feature, num_frames=num_frames,
                                    length=length, sample_rate=sample_rate)
