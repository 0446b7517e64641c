"""Captioned digits: the measured properties against closed forms, the tertile bins, the captions' grammar and its
inverse, the WordLevel tokenizer's ids and errors, and the pipeline's token condition."""

import numpy as np
import pytest

from diffax.data import captions, digits
from diffax.data.pipeline import make_iterator
from diffax.data.sources import SourceConfigError, get_source


def test_measure_matches_closed_forms():
  """A full-ink vertical bar has mass 8 and no slant; the main diagonal (top left to bottom right: the top leans
  left) has mu_11 = mu_02, so s = -1; the anti-diagonal s = +1. Float inputs in [-1, 1] read like uint8."""
  bar, diagonal = np.zeros((8, 8, 1), np.uint8), np.zeros((8, 8, 1), np.uint8)
  bar[:, 3] = 255
  diagonal[np.arange(8), np.arange(8)] = 255
  images = np.stack([bar, diagonal, diagonal[:, ::-1]])
  mass, slant = captions.measure(images)
  np.testing.assert_allclose(mass, [8.0, 8.0, 8.0])
  np.testing.assert_allclose(slant, [0.0, -1.0, 1.0], atol=1e-12)
  half = images.copy()
  half[0, :4, 3] = 0  # half the bar: mass 4, still upright
  float_mass, float_slant = captions.measure(half.astype(np.float32) / 127.5 - 1)
  np.testing.assert_allclose(float_mass, [4.0, 8.0, 8.0], rtol=1e-6)
  np.testing.assert_allclose(float_slant, [0.0, -1.0, 1.0], atol=1e-6)


def test_bins_split_every_class_into_thirds():
  images, labels = digits.load_digits('train')
  bins = captions.attributes(images, labels)
  assert bins.shape == (len(labels), 2) and set(np.unique(bins)) == {-1, 0, 1}
  for c in range(10):
    for p in range(2):
      fractions = np.array([np.mean(bins[labels == c, p] == b) for b in (-1, 0, 1)])
      np.testing.assert_allclose(fractions, 1 / 3, atol=0.03)
  heavier = captions.attributes(digits.stylise(images, 'bold'), labels)[:, 0]  # dilated strokes: more ink
  assert np.mean(heavier == 1) > 0.9


def test_captions_grammar_and_inverse():
  texts = {captions.caption(y, a, b) for y in range(10) for a in (-1, 0, 1) for b in (-1, 0, 1)}
  assert len(texts) == 90
  assert captions.caption(7, -1, 0) == 'a thin seven' and captions.caption(0, 1, 1) == 'a bold zero leaning right'
  assert captions.caption(4, 0, 0) == 'a four'
  words = {w for t in texts for w in t.split()}
  assert words == set(captions.VOCABULARY) - set(captions.SPECIAL_TOKENS)
  for y, a, b in [(3, -1, 1), (9, 0, -1), (1, 1, 0)]:
    assert captions.parse(captions.caption(y, a, b).upper()) == (y, a, b)
  with pytest.raises(ValueError, match='not a digits caption'):
    captions.parse('a seven thin')
  source = captions.CaptionedDigitsSource('test')
  assert len(source) == 359 and len(set(source.captions)) > 60
  parsed = np.array([captions.parse(t) for t in source.captions])
  np.testing.assert_array_equal(parsed[:, 0], source.labels)
  np.testing.assert_array_equal(parsed[:, 1:], source.attributes)
  record = source[5]
  assert record['tokens'].dtype == np.int32 and record['tokens'].shape == (captions.CONTEXT_LENGTH,)
  np.testing.assert_array_equal(record['tokens'], captions.tokenizer()([record['caption']])[0])


def test_tokenizer_ids_padding_and_errors():
  tok = captions.tokenizer()
  v = {w: i for i, w in enumerate(captions.VOCABULARY)}
  ids = tok(['a thin seven', '  A  Bold zero LEANING right', ''])
  assert ids.dtype == np.int32 and ids.shape == (3, captions.CONTEXT_LENGTH) == (3, tok.context_length)
  pad = v['<pad>']
  np.testing.assert_array_equal(ids[0], [v['<start>'], v['a'], v['thin'], v['seven'], v['<end>'], pad, pad, pad])
  np.testing.assert_array_equal(
      ids[1], [v['<start>'], v['a'], v['bold'], v['zero'], v['leaning'], v['right'], v['<end>'], pad])
  np.testing.assert_array_equal(ids[2], tok.empty_ids)
  np.testing.assert_array_equal(tok.empty_ids, [v['<start>'], v['<end>']] + [pad] * 6)
  assert tok.vocab_size == 20 and tok.eos_token_id == v['<end>']
  with pytest.raises(ValueError, match=r"\['purple'\]"):
    tok(['a purple seven'])
  with pytest.raises(ValueError, match='longer than the text encoder'):
    tok(['a bold seven leaning right bold seven'])


def test_pipeline_gives_the_caption_ids_as_the_condition():
  source = get_source('digits_captions', split='train')
  batch = next(make_iterator(source, global_batch_size=16, seed=0, shuffle=False, process_index=0, process_count=1))
  assert batch['x'].shape == (16, 8, 8, 1) and batch['cond'].dtype == np.int32
  np.testing.assert_array_equal(batch['cond'], source.tokens[:16])
  with pytest.raises(SourceConfigError, match='data.style'):
    get_source('digits_captions', split='train', style='bold')
