"""Captioned digits: the embedded 8x8 digits with a caption computed from each image, and its word-level tokenizer.

Every image of :mod:`diffax.data.digits` gets one deterministic caption from its label and two measured
properties of its ink ``u / 255`` in [0, 1] (pixel (i, j) at row i, column j):

  ink mass   m = sum_ij u_ij                                         (stroke thickness)
  slant      s = -mu_11 / mu_02,   mu_pq = sum_ij u_ij (j - j_bar)^p (i - i_bar)^q / m
                                                                     (the shear of the strokes; s > 0: the top leans
                                                                     right, image rows counted downwards)

Each property is binned by the tertiles of its class in the training split: the lower third is ``thin`` /
``leaning left``, the upper third ``bold`` / ``leaning right``, the middle third gets no word. The caption is
``a [thin|bold] <digit> [leaning left|leaning right]``, e.g. ``a thin seven``, ``a bold zero leaning right``,
``a four``: 3 x 3 x 10 = 90 captions over 16 words.

The tokenizer is Hugging Face ``tokenizers``' ``WordLevel`` model over that vocabulary (lower-cased, split on
whitespace): ``<start> words <end>`` padded with ``<pad>`` to :data:`CONTEXT_LENGTH` ids, so the empty caption
``''`` is ``<start> <end> <pad> ...`` (the null condition of classifier-free guidance). A word outside the
vocabulary or a prompt longer than the context is an error, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools

import numpy as np
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, processors

from diffax.data import digits

DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
THICKNESS_WORDS = ('thin', '', 'bold')  # bins -1, 0, +1 of the ink mass
SLANT_WORDS = ('leaning left', '', 'leaning right')  # bins -1, 0, +1 of the slant
SPECIAL_TOKENS = ('<pad>', '<unk>', '<start>', '<end>')
VOCABULARY = (*SPECIAL_TOKENS, 'a', *DIGIT_WORDS, 'thin', 'bold', 'leaning', 'left', 'right')
CONTEXT_LENGTH = 8
"""Ids per caption: the longest caption (``a bold seven leaning right``, 5 words) with its start and end tokens,
plus one pad."""


def measure(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Ink mass m [N] and slant s [N] (module docstring) of images [N, 8, 8, 1]: uint8 in 0..255 or float in [-1, 1]."""
  images = np.asarray(images)
  u = images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else (images.astype(np.float64) + 1.0) / 2.0
  u = np.clip(u[..., 0], 0.0, 1.0)  # [N, H, W]
  rows, cols = np.mgrid[0:u.shape[1], 0:u.shape[2]].astype(np.float64)
  mass = u.sum(axis=(1, 2))
  safe = np.maximum(mass, 1e-6)
  i_bar = (u * rows).sum(axis=(1, 2)) / safe
  j_bar = (u * cols).sum(axis=(1, 2)) / safe
  di, dj = rows - i_bar[:, None, None], cols - j_bar[:, None, None]
  mu_11 = (u * di * dj).sum(axis=(1, 2)) / safe
  mu_02 = (u * di * di).sum(axis=(1, 2)) / safe
  return mass, -mu_11 / np.maximum(mu_02, 1e-6)


@functools.cache
def tertiles() -> np.ndarray:
  """Per-class tertiles of the training split, [10, 2 properties (mass, slant), 2 (1/3, 2/3 quantiles)]."""
  images, labels = digits.load_digits('train')
  properties = np.stack(measure(images), axis=-1)  # [N, 2]
  out = np.stack([np.quantile(properties[labels == c], [1 / 3, 2 / 3], axis=0).T for c in range(digits.NUM_CLASSES)])
  out.flags.writeable = False
  return out


def attributes(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Bins [N, 2] int32 in {-1, 0, 1} (thickness, slant) of images [N, 8, 8, 1] read as digits ``labels`` [N]."""
  properties = np.stack(measure(images), axis=-1)  # [N, 2]
  edges = tertiles()[np.asarray(labels)]  # [N, 2, 2]
  return ((properties > edges[..., 1]).astype(np.int32) - (properties < edges[..., 0]).astype(np.int32))


def caption(label: int, thickness: int, slant: int) -> str:
  """``a [thin|bold] <digit> [leaning left|leaning right]`` for bins in {-1, 0, 1}."""
  words = ['a', THICKNESS_WORDS[thickness + 1], DIGIT_WORDS[label], SLANT_WORDS[slant + 1]]
  return ' '.join(w for w in words if w)


def parse(text: str) -> tuple[int, int, int]:
  """(label, thickness, slant) of a caption made by :func:`caption` (the inverse); ValueError for any other text."""
  for label in range(len(DIGIT_WORDS)):
    for thickness in (-1, 0, 1):
      for slant in (-1, 0, 1):
        if caption(label, thickness, slant) == ' '.join(text.lower().split()):
          return label, thickness, slant
  raise ValueError(f'{text!r} is not a digits caption (a [thin|bold] <digit> [leaning left|leaning right]).')


class CaptionTokenizer:
  """Captions -> token ids [N, CONTEXT_LENGTH] int32 (``tokenizers.models.WordLevel``; module docstring)."""

  context_length = CONTEXT_LENGTH
  vocab_size = len(VOCABULARY)

  def __init__(self):
    tokenizer = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCABULARY)}, unk_token='<unk>'))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single='<start> $A <end>', special_tokens=[(t, VOCABULARY.index(t)) for t in ('<start>', '<end>')])
    tokenizer.enable_padding(pad_id=VOCABULARY.index('<pad>'), pad_token='<pad>', length=CONTEXT_LENGTH)
    self.tokenizer = tokenizer
    self.pad_token_id = VOCABULARY.index('<pad>')
    self.unk_token_id = VOCABULARY.index('<unk>')
    self.eos_token_id = VOCABULARY.index('<end>')

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """Token ids [N, CONTEXT_LENGTH] int32; ValueError naming the text for an unknown word or a long text."""
    ids = np.full((len(texts), CONTEXT_LENGTH), self.pad_token_id, np.int32)
    for i, (text, encoding) in enumerate(zip(texts, self.tokenizer.encode_batch(list(texts)))):
      if self.unk_token_id in encoding.ids:
        unknown = [w for w in text.lower().split() if w not in VOCABULARY[len(SPECIAL_TOKENS):]]
        raise ValueError(f'{text!r} has words outside the captions\' vocabulary: {unknown}; the words are '
                         f'{list(VOCABULARY[len(SPECIAL_TOKENS):])}.')
      if len(encoding.ids) > CONTEXT_LENGTH:
        raise ValueError(f'{text!r} is {len(encoding.ids)} tokens with its start and end tokens, longer than the '
                         f'text encoder\'s context of {CONTEXT_LENGTH}.')
      ids[i] = encoding.ids
    return ids

  @functools.cached_property
  def empty_ids(self) -> np.ndarray:
    """The empty caption's ids [CONTEXT_LENGTH] int32: the null condition."""
    return self([''])[0]


@functools.cache
def tokenizer() -> CaptionTokenizer:
  return CaptionTokenizer()


class CaptionedDigitsSource:
  """The embedded digits with captions: ``source[i] -> {'image': uint8 [8, 8, 1], 'label': int, 'caption': str,
  'tokens': int32 [CONTEXT_LENGTH]}`` (the pipeline makes ``tokens`` the condition).

  Args:
    split: ``'train'``, ``'test'`` or ``'all'`` (:func:`diffax.data.digits.load_digits`).
  """

  num_classes = digits.NUM_CLASSES

  def __init__(self, split: str):
    self._images, self.labels = digits.load_digits(split)  # [N, 8, 8, 1] uint8, [N] int32
    self.image_shape = tuple(self._images.shape[1:])
    self.attributes = attributes(self._images, self.labels)  # [N, 2] thickness and slant bins
    self.captions = tuple(caption(int(y), int(a), int(b)) for y, (a, b) in zip(self.labels, self.attributes))
    self.tokens = tokenizer()(self.captions)  # [N, L] int32

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict:
    return {'image': self._images[index], 'label': int(self.labels[index]), 'caption': self.captions[index],
            'tokens': self.tokens[index]}
