"""The CLIP-score evaluator on the seeded tiny CLIP of tests/data (see tests/test_clip.py for how it was made):
the streamed score equals a numpy cosine of the towers' embeddings, grey images count as their RGB repeat, and
the protocol hashes the files."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.evaluation import clip_evaluator, clip_score
from diffax.models import text
from diffax.trainer import config as config_lib, evaluate

DATA = Path(__file__).parent / 'data'
WEIGHTS, TOKENIZER = DATA / 'clip_tiny.safetensors', DATA / 'clip_tiny_tokenizer.json'
TEXT = dict(vocab_size=588, width=32, num_layers=3, num_heads=4, mlp_dim=64, eos_token_id=587)
VISION = dict(width=32, num_layers=2, num_heads=4, mlp_dim=64, patch_size=8, image_size=32)
PROMPTS = ('a thin seven', 'a bold zero leaning right', 'a one')


def text_config():
  return config_lib.load_file(Path(__file__).parents[1] / 'configs' / 'digits_text.py', 'runlocal')


@pytest.fixture(scope='module')
def evaluator():
  model, params = clip_score.load_clip(WEIGHTS, preset=None, text_fields=TEXT, vision_fields=VISION,
                                       projection_dim=16)
  return clip_evaluator.ClipScoreEvaluator(model, params, text.CLIPTokenizer(TOKENIZER),
                                           lambda labels: [PROMPTS[int(i)] for i in labels],
                                           files=(WEIGHTS, TOKENIZER)), params


def numpy_cosines(ev, params, grey, labels):
  """100 cos of the towers' embeddings in float64 numpy, grey images repeated to RGB: [B]."""
  rgb = jnp.asarray(np.repeat(grey, 3, axis=-1))
  ids = jnp.asarray(ev.tokenizer([PROMPTS[i] for i in labels]))
  towers = jax.jit(lambda p, i, x: ev.model.apply({'params': p}, i, clip_score.preprocess(x, VISION['image_size'])))
  text_embeds, image_embeds = (np.asarray(e, np.float64) for e in towers(params, ids, rgb))  # jitted: one program
  return 100.0 * np.sum(text_embeds * image_embeds, -1) / np.linalg.norm(text_embeds, axis=-1) / np.linalg.norm(
      image_embeds, axis=-1)


def test_streamed_score_is_the_mean_numpy_cosine(evaluator):
  """Seeded weights give cosines around 0; the five best-aligned of 30 random images make a positive set (so the
  max(mean, 0) of the aggregate does not hide the mean), streamed in two updates."""
  ev, params = evaluator
  rng = np.random.default_rng(0)
  grey = rng.uniform(-1, 1, (30, 8, 8, 1)).astype(np.float32)
  labels = np.arange(30, dtype=np.int32) % 3
  best = np.argsort(numpy_cosines(ev, params, grey, labels))[-5:]
  grey, labels = grey[best], labels[best]
  cosines = numpy_cosines(ev, params, grey, labels)
  assert np.all(cosines > 0) and np.ptp(cosines) > 1e-3
  ev.reset()
  ev.update(grey[:3], labels[:3])
  ev.update(grey[3:], labels[3:])
  np.testing.assert_allclose(ev.result()['clip_score'], cosines.mean(), rtol=1e-5)
  ev.reset()
  ev.update(grey, (labels + 1) % 3)  # other prompts: another score
  assert abs(ev.result()['clip_score'] - cosines.mean()) > 1e-3
  protocol = ev.protocol()
  assert protocol['metric'] == 'clip_score' and protocol['clip_image_size'] == 32
  assert len(protocol['sha256_clip_tiny.safetensors']) == 64
  with pytest.raises(ValueError, match='prompt'):
    ev.update(grey[:1])


def test_the_trainer_metric_needs_a_text_model_and_the_weights(monkeypatch):
  config = text_config()
  config.eval.metric = 'clip_score'
  config_lib.validate(config)
  monkeypatch.delenv('DIFFAX_CLIP_WEIGHTS', raising=False)
  with pytest.raises(FileNotFoundError, match='curl'):  # the message says how to get the weights
    evaluate.make_evaluator(config)
  config.model.text_encoder, config.data.name, config.data.num_classes = '', 'digits', 10
  with pytest.raises(config_lib.ConfigError, match='model.text_encoder') as error:
    evaluate.make_evaluator(config)
  assert error.value.key == 'eval.metric'
  assert evaluate.caption_texts(np.array([[7, -1, 0], [0, 1, 1]])) == ['a thin seven', 'a bold zero leaning right']
