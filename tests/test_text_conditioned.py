"""The text-conditioned denoiser (text encoder + backbone as one model) and caption dropout to the empty caption."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.data import captions
from diffax.diffusion import losses
from diffax.models import DIT_PRESETS, UNET_PRESETS, DiT, UNet, text_conditioned

TOKENIZER = captions.tokenizer()
IDS = jnp.asarray(TOKENIZER(['a thin seven', 'a bold zero leaning right']))  # [2, 8]


def model(backbone_cls, preset):
  encoder = text_conditioned.text_encoder('clip_tiny', vocab_size=TOKENIZER.vocab_size,
                                          context_length=TOKENIZER.context_length,
                                          eos_token_id=TOKENIZER.eos_token_id)
  fields = {**preset, 'context_dim': encoder.width}
  if backbone_cls is DiT:
    fields.update(num_classes=None, learn_sigma=False)
  return text_conditioned.TextConditioned(backbone_cls(**fields), encoder)


def perturb(params, seed, scale=0.05):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(a + scale * rng.standard_normal(a.shape), jnp.float32), params)


@pytest.mark.parametrize('backbone_cls,preset', [(UNet, UNET_PRESETS['unet_tiny']), (DiT, DIT_PRESETS['dit_tiny'])])
def test_tokens_condition_the_backbone_and_train_the_encoder(backbone_cls, preset):
  m = model(backbone_cls, preset)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
  t = jnp.array([0.2, 0.6])
  params = nn.unbox(jax.jit(m.init)(jax.random.PRNGKey(1), x, t, IDS))['params']
  assert set(params) == {'text_encoder', 'backbone'} and m.spatial_dims == 2
  params = perturb(params, 2)
  apply = jax.jit(lambda p, ids: m.apply({'params': p}, x, t, ids))
  out = apply(params, IDS)
  assert out.shape == x.shape and np.all(np.isfinite(out))
  assert np.abs(apply(params, IDS[::-1]) - out).max() > 1e-4  # swapping the captions changes the outputs
  # The backbone sees exactly the encoder's final hidden state as its context.
  direct = jax.jit(lambda p: m.backbone.apply({'params': p['backbone']}, x, t, m.text_encoder.apply(
      {'params': p['text_encoder']}, IDS).context))(params)  # jitted: one program, not one per primitive
  np.testing.assert_allclose(out, direct, rtol=1e-6, atol=1e-6)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(m.apply({'params': p}, x, t, IDS) ** 2)))(params)
  assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads['text_encoder']['encoder']))  # trained jointly
  with pytest.raises(ValueError, match=r'token ids \[B, L\]'):
    jax.eval_shape(lambda p: m.apply({'params': p}, x, t, IDS[0]), params)  # raised while tracing


def test_caption_dropout_swaps_whole_captions_for_the_empty_one():
  null = tuple(int(i) for i in TOKENIZER.empty_ids)
  ids = jnp.asarray(TOKENIZER(['a thin seven'] * 64))
  dropout = losses.CondDropout(p_uncond=0.5, null_tokens=null)
  new, dropped = jax.jit(lambda c, r: losses.drop_condition(c, r, dropout, batch_size=64))(ids, jax.random.key(3))
  dropped = np.asarray(dropped)
  assert 10 < dropped.sum() < 54  # Binomial(64, 1/2)
  np.testing.assert_array_equal(np.asarray(new)[dropped], np.broadcast_to(np.array(null), (dropped.sum(), 8)))
  np.testing.assert_array_equal(np.asarray(new)[~dropped], np.asarray(ids)[~dropped])
  assert new.dtype == jnp.int32
  with pytest.raises(ValueError, match='null_tokens has 3 ids'):
    losses.drop_condition(ids, jax.random.key(0), losses.CondDropout(0.5, null_tokens=(1, 2, 3)), batch_size=64)
  with pytest.raises(ValueError, match='null_tokens'):  # token ids without a null caption
    losses.drop_condition(ids, jax.random.key(0), losses.CondDropout(0.5), batch_size=64)
