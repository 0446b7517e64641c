"""CLIP: the text encoder, tokenizer, image tower and CLIP score against transformers' CLIP and OpenAI's tokenizer.

tests/reference/make_clip_reference.py made the data once (torch 2.13.0 + transformers, in a throwaway venv): a
byte-level BPE tokenizer in CLIP's format (``clip_tiny_tokenizer.json``) whose ids on the stored prompts equal
those of OpenAI's ``SimpleTokenizer`` algorithm; a transformers ``CLIPModel`` (text: 3 causal layers of width 32;
vision: 2 layers, patch 8 at 32x32; projection 16) with seeded weights (``clip_tiny.safetensors``); and its
float32 outputs on the stored ids and pixels (``clip_tiny.npz``). diffax must reproduce them to round-off.
"""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.evaluation import clip_score
from diffax.models import text
from diffax.models.convert import clip as convert_clip
from diffax.models.convert import safetensors_io

DATA = Path(__file__).parent / 'data'
WEIGHTS = DATA / 'clip_tiny.safetensors'
TOKENIZER = DATA / 'clip_tiny_tokenizer.json'
PROMPTS = ['a photo of a cat', 'A LARGE zero, on the left!', 'an unseen word: zebra 42', '']
TEXT = dict(vocab_size=588, width=32, num_layers=3, num_heads=4, mlp_dim=64, eos_token_id=587)
VISION = dict(width=32, num_layers=2, num_heads=4, mlp_dim=64, patch_size=8, image_size=32)


@pytest.fixture(scope='module')
def ref():
  return dict(np.load(DATA / 'clip_tiny.npz'))


def _close(actual, desired):
  desired = np.asarray(desired)
  np.testing.assert_allclose(np.asarray(actual), desired, rtol=1e-5, atol=1e-5 * np.abs(desired).max())


@pytest.mark.parametrize('preset, expected', [('vit_l14', 123_060_480)])  # transformers' CLIPTextModel count
def test_text_preset_parameter_count(preset, expected):
  model = text.CLIPTextTransformer(**text.TEXT_PRESETS[preset])
  assert sum(math.prod(s) for s in safetensors_io.param_shapes(model, *model.example_inputs()).values()) == expected


def test_clip_preset_parameter_count():
  model = clip_score.get_clip('vit_l14')
  shapes = safetensors_io.param_shapes(model, *model.example_inputs())
  assert sum(math.prod(s) for s in shapes.values()) == 427_616_512  # CLIPModel's 427,616,513 less logit_scale


def test_tokenizer_matches_openai_bpe(ref):
  tokenizer = text.CLIPTokenizer(TOKENIZER)
  np.testing.assert_array_equal(tokenizer(PROMPTS), ref['input_ids'])
  eos = tokenizer.eos_token_id
  assert tokenizer(['a cat'])[0, -1] == eos
  padded_with_zero = text.CLIPTokenizer(TOKENIZER, pad_token='!')(['a cat'])[0]  # SD 2.x / OpenCLIP padding
  assert padded_with_zero[-1] == 0 and list(padded_with_zero).index(eos) == list(tokenizer(['a cat'])[0]).index(eos)


def test_tokenizer_refuses_prompts_longer_than_the_context_unless_told_to_truncate():
  long_prompt = ' '.join(['cat'] * 80)
  with pytest.raises(ValueError, match=r'Prompt 1 .* 82 tokens .*context of 77: shorten it or pass truncate=True'):
    text.CLIPTokenizer(TOKENIZER)(['a cat', long_prompt])
  tokenizer = text.CLIPTokenizer(TOKENIZER, truncate=True)
  ids = tokenizer([long_prompt])[0]
  assert ids[-1] == tokenizer.eos_token_id and np.sum(ids == tokenizer.eos_token_id) == 1


def test_missing_tokenizer_gives_the_download_command(tmp_path, monkeypatch):
  monkeypatch.delenv(text.TOKENIZER_ENV_VAR, raising=False)
  with pytest.raises(FileNotFoundError, match=r'(?s)curl -L -o clip-vit-large-patch14-tokenizer.json .*'
                                              r'openai/clip-vit-large-patch14/resolve/main/tokenizer.json'):
    text.CLIPTokenizer(tmp_path / 'tokenizer.json')


@pytest.mark.parametrize('hidden_state, key', [('final', 'last_hidden_state'), ('penultimate', 'penultimate'),
                                                ('penultimate_norm', 'penultimate_norm')])
def test_text_encoder_reproduces_transformers(ref, hidden_state, key):
  model, params = convert_clip.load_text_encoder(WEIGHTS, preset=None, hidden_state=hidden_state, **TEXT)
  out = jax.jit(model.apply)({'params': params}, ref['input_ids'])
  _close(out.context, ref[key])
  _close(out.pooled, ref['text_pooled'])


def test_text_encoder_is_causal_and_checks_its_input(ref):
  model, params = convert_clip.load_text_encoder(WEIGHTS, preset=None, **TEXT)
  ids = ref['input_ids'][:1]
  edited = ids.copy()
  edited[0, 3] = 400
  context = jax.jit(lambda x: model.apply({'params': params}, x).context)  # jitted: one program, not op by op
  a, b = context(ids), context(edited)
  np.testing.assert_array_equal(a[:, :3], b[:, :3])  # a token changes no earlier position
  assert np.abs(np.asarray(a[:, 3:] - b[:, 3:])).min() > 0
  with pytest.raises(ValueError, match=r'L <= 77; got \(1, 78\)'):
    jax.eval_shape(lambda x: model.apply({'params': params}, x), jnp.zeros((1, 78), jnp.int32))  # while tracing


@pytest.fixture(scope='module')
def clip():
  return clip_score.load_clip(WEIGHTS, preset=None, text_fields=TEXT, vision_fields=VISION, projection_dim=16)


def test_clip_towers_reproduce_transformers(ref, clip):
  model, params = clip
  text_embeds, image_embeds = jax.jit(model.apply)({'params': params}, ref['input_ids'],
                                                   np.tile(ref['pixels'], (2, 1, 1, 1)))
  _close(text_embeds, ref['text_embeds'])
  _close(image_embeds[:2], ref['image_embeds'])
  _close(jax.jit(lambda p, x: model.apply({'params': p}, x, method='encode_image'))(params, ref['pixels']),
         ref['image_embeds'])


def test_clip_score_is_100_times_the_cosine_of_transformers_logits(ref, clip):
  model, params = clip
  logit_scale = np.exp(safetensors_io.read_safetensors(WEIGHTS)['logit_scale'])
  expected = 100.0 * np.diag(ref['logits_per_image'][:, :2]) / logit_scale  # CLIP's logits: scale * cosine
  images = np.asarray(ref['pixels']) * np.asarray(clip_score.CLIP_STD) + np.asarray(clip_score.CLIP_MEAN)
  score_fn = clip_score.make_clip_score_fn(model, params)
  _close(score_fn(jnp.asarray(2.0 * images - 1.0, jnp.float32), ref['input_ids'][:2]), expected)
  embeds_i, embeds_t = ref['image_embeds'], ref['text_embeds'][:2]
  numpy_cosine = np.sum(embeds_i * embeds_t, -1) / np.linalg.norm(embeds_i, axis=-1) / np.linalg.norm(embeds_t, axis=-1)
  _close(clip_score.cosine_score(embeds_i, embeds_t), 100.0 * numpy_cosine)
  assert clip_score.aggregate(np.array([-5.0, 2.0])) == 0.0 and clip_score.aggregate(np.array([30.0, 20.0])) == 25.0


def test_preprocess_resizes_the_shorter_side_and_crops_the_centre():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  mean, std = np.asarray(clip_score.CLIP_MEAN), np.asarray(clip_score.CLIP_STD)
  _close(clip_score.preprocess(jnp.asarray(images), 32), ((images + 1) / 2 - mean) / std)  # no resize at size
  wide = np.zeros((1, 16, 40, 3), np.float32)
  wide[:, :, :4] = wide[:, :, -4:] = 1.0  # bands outside the centre crop of the shorter side
  out = np.asarray(clip_score.preprocess(jnp.asarray(wide), 32))
  assert out.shape == (1, 32, 32, 3)
  _close(out, np.broadcast_to((0.5 - mean) / std, out.shape))
