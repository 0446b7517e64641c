"""Shared layers: embeddings against their formulas, attention against plain numpy softmax attention, remat."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from diffax.models import layers


def noisy(params, seed, scale=0.1):
  """Gaussian noise on every parameter (biases start at zero and would otherwise go untested)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(a + scale * rng.standard_normal(a.shape), jnp.float32), params)


@pytest.mark.parametrize('dim,max_period', [(32, 10_000.0), (6, 100.0)])
def test_sinusoidal_embedding_matches_formula(dim, max_period):
  t = np.array([0.0, 1.0, 17.5, 999.0])
  half = dim // 2
  expected = np.array([[math.cos(s * max_period ** (-k / half)) for k in range(half)]
                       + [math.sin(s * max_period ** (-k / half)) for k in range(half)] for s in t])
  out = layers.sinusoidal_embedding(jnp.asarray(t, jnp.float32), dim, max_period=max_period)
  assert out.shape == (4, dim) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, atol=2e-4)  # float32 arguments up to 999


def test_fourier_embedding_is_fixed_with_gaussian_frequencies():
  dim, scale = 2048, 16.0
  t = jnp.array([0.3, -1.2, 2.0])
  a, b = layers.fourier_embedding(t, dim, scale=scale), layers.fourier_embedding(t, dim, scale=scale)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, layers.fourier_embedding(t, dim, scale=scale, seed=1))
  np.testing.assert_allclose(a[:, :dim // 2] ** 2 + a[:, dim // 2:] ** 2, 1.0, atol=1e-5)  # [sin, cos] pairs
  # At a tiny t, sin(2 pi t w) = 2 pi t w to 1e-5 relative: read the frequencies back off the embedding.
  eps = 1e-5
  w = np.asarray(layers.fourier_embedding(jnp.array([eps]), dim, scale=scale)[0, :dim // 2], np.float64)
  w = w / (2 * math.pi * eps)
  np.testing.assert_allclose(layers.fourier_embedding(jnp.array([0.0]), dim)[0, dim // 2:], 1.0)
  assert scipy.stats.kstest(w / scale, 'norm').pvalue > 1e-3  # N(0, scale^2), 1024 draws
  assert abs(np.std(w) / scale - 1.0) < 4 / math.sqrt(2 * 1024)  # 4 standard errors of a sample std


def test_noise_embedding_composes_embedding_and_mlp():
  t = jnp.array([0.1, 0.9])
  module = layers.NoiseEmbedding(8, 16, kind='fourier', t_scale=2.0, fourier_scale=3.0)
  params = noisy(nn.unbox(module.init(jax.random.PRNGKey(0), t))['params'], 0)
  emb = np.asarray(layers.fourier_embedding(2.0 * t, 16, scale=3.0), np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = emb @ p['dense_0']['kernel'] + p['dense_0']['bias']
  expected = (h / (1 + np.exp(-h))) @ p['dense_1']['kernel'] + p['dense_1']['bias']
  np.testing.assert_allclose(module.apply({'params': params}, t), expected, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='sinusoidal'):
    layers.NoiseEmbedding(8, 16, kind='gaussian').init(jax.random.PRNGKey(0), t)


def test_label_embedding_has_a_null_row():
  module = layers.LabelEmbedding(num_classes=5, features=4)
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32))
  boxed = variables['params']['table']['embedding']
  assert boxed.names == ('classes', 'embed')
  table = boxed.value
  assert table.shape == (6, 4)
  out = module.apply(variables, jnp.array([5, 0]))
  np.testing.assert_array_equal(out, table[np.array([5, 0])])


def np_attention(p, x, context):
  """Multi-head softmax attention in float64 numpy: softmax(q k^T / sqrt(d_h)) v, heads concatenated, projected."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  q = np.einsum('bld,dhk->blhk', x, p['query']['kernel']) + p['query']['bias']
  k = np.einsum('bsd,dhk->bshk', context, p['key']['kernel']) + p['key']['bias']
  v = np.einsum('bsd,dhk->bshk', context, p['value']['kernel']) + p['value']['bias']
  logits = np.einsum('blhk,bshk->bhls', q, k) / math.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  o = np.einsum('bhls,bshk->blhk', weights, v)
  return np.einsum('blhk,hkd->bld', o, p['out']['kernel']) + p['out']['bias']


@pytest.mark.parametrize('cross,head_dim', [(False, None), (True, None), (True, 8)])
def test_attention_matches_numpy(cross, head_dim):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 16)).astype(np.float32)
  context = rng.standard_normal((2, 7, 12)).astype(np.float32) if cross else None
  module = layers.Attention(num_heads=4, head_dim=head_dim)
  params = noisy(nn.unbox(module.init(jax.random.PRNGKey(0), x, context))['params'], 1)
  expected = np_attention(params, x, x if context is None else context)
  out = jax.jit(lambda p: module.apply({'params': p}, x, context))(params)
  assert out.shape == (2, 5, 16) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  assert params['query']['kernel'].shape == (16, 4, head_dim or 4)


def test_attention_bfloat16_close():
  """bf16 projections and logits (8-bit mantissa) with a float32 softmax and a bf16 output: 0.6-0.7 % relative L2
  error measured over four weight draws, bounded by 2 %."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 9, 32)).astype(np.float32)
  module16 = layers.Attention(num_heads=4, dtype=jnp.bfloat16)
  params = noisy(nn.unbox(module16.init(jax.random.PRNGKey(0), x))['params'], 2)
  out16 = jax.jit(lambda p: module16.apply({'params': p}, x))(params)
  assert out16.dtype == jnp.bfloat16
  expected = np_attention(params, x, x)
  rel = np.linalg.norm(np.asarray(out16, np.float64) - expected) / np.linalg.norm(expected)
  assert 1e-4 < rel < 0.02, rel


def test_dense_conv_and_group_norm_conventions():
  x = jnp.zeros((1, 4, 4, 4))
  is_box = lambda b: isinstance(b, nn.Partitioned)
  dense = jax.eval_shape(layers.dense((2, 5), ('embed', 'heads', 'kv')).init, jax.random.PRNGKey(0), x)
  names = jax.tree.map(lambda b: b.names, dense['params'], is_leaf=is_box)
  assert names == {'kernel': ('embed', 'heads', 'kv'), 'bias': ('heads', 'kv')}
  out, conv = jax.eval_shape(layers.conv(6, 3).init_with_output, jax.random.PRNGKey(0), x)
  assert conv['params']['kernel'].names == (None, None, 'conv_in', 'conv_out') and out.shape == (1, 4, 4, 6)
  out, norm = jax.eval_shape(layers.group_norm(2).init_with_output, jax.random.PRNGKey(0), x.astype(jnp.bfloat16))
  assert out.dtype == jnp.float32 and norm['params']['scale'].names == ('norm',)


class _Block(nn.Module):
  """Attention, a GELU MLP and dropout behind a Python ``train`` flag (static under remat)."""

  @nn.compact
  def __call__(self, x, train):
    x = x + layers.Attention(num_heads=2)(x)
    h = nn.gelu(layers.dense(32, ('embed', 'mlp'))(x))
    h = nn.Dropout(0.5, deterministic=not train)(h)
    return x + layers.dense(8, ('mlp', 'embed'))(h)


class _Remat(nn.Module):
  policy: str

  @nn.compact
  def __call__(self, x, train):
    return layers.maybe_remat(_Block, self.policy, static_argnums=(2,))(name='block')(x, train)


def test_remat_policies_give_equal_gradients():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 8)), jnp.float32)
  params = nn.unbox(_Remat('none').init(jax.random.PRNGKey(0), x, False))['params']
  rngs = {'dropout': jax.random.PRNGKey(3)}

  def grads(policy):
    loss = lambda p: jnp.sum(_Remat(policy).apply({'params': p}, x, True, rngs=rngs) ** 2)
    return jax.grad(loss)(params)

  policies = sorted(layers.REMAT_POLICIES)
  plain, *remat = jax.jit(lambda: [grads(policy) for policy in ['none', *policies]])()  # one compile
  # The key bias has an exactly zero gradient (the softmax ignores a constant shift of the logits): round-off only.
  assert all(np.any(g) for path, g in jax.tree_util.tree_leaves_with_path(plain)
             if 'key' not in jax.tree_util.keystr(path))
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(plain))
  for policy, g in zip(policies, remat):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale, err_msg=policy),
                 plain, g)
  assert layers.maybe_remat(_Block, 'none') is _Block
  with pytest.raises(ValueError, match='remat policy'):
    layers.maybe_remat(_Block, 'everything')
