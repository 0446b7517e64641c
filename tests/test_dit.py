"""DiT: the paper's parameter counts, adaLN-Zero initialisation, an independent numpy forward pass, mixed precision,
remat, logical axis names and the 2-D sin-cos position embedding."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.models import layers
from diffax.models.dit import DIT_PRESETS, DiT, sincos_pos_embed_2d

TINY = DIT_PRESETS['dit_tiny']  # D 64, depth 2, 4 heads, 10 classes, learned sigma
SHAPE = (2, 16, 16, 1)

# Peebles & Xie 2023 (arXiv:2212.09748v2), Table 4: parameters (M) of the 256x256 models (32x32x4 latents).
PAPER_PARAMS_M = {
    'DiT-S/2': 33, 'DiT-S/4': 33, 'DiT-S/8': 33,
    'DiT-B/2': 130, 'DiT-B/4': 130, 'DiT-B/8': 131,
    'DiT-L/2': 458, 'DiT-L/4': 458, 'DiT-L/8': 459,
    'DiT-XL/2': 675, 'DiT-XL/4': 675, 'DiT-XL/8': 676,
}


def reference_param_count(d, depth, p, channels=4, num_classes=1000, mlp_ratio=4):
  """Trainable parameters of facebookresearch/DiT ``models.py`` (learn_sigma, class-dropout row), layer by layer."""
  patch = p * p * channels * d + d
  timestep_mlp = 256 * d + d + d * d + d
  labels = (num_classes + 1) * d
  attention = d * 3 * d + 3 * d + d * d + d  # fused qkv + projection
  mlp = d * mlp_ratio * d + mlp_ratio * d + mlp_ratio * d * d + d
  ada_ln = d * 6 * d + 6 * d
  final = d * 2 * d + 2 * d + d * p * p * 2 * channels + p * p * 2 * channels
  return patch + timestep_mlp + labels + depth * (attention + mlp + ada_ln) + final


def np_sincos_2d(h, w, dim):
  """MAE's 2-D sin-cos table written out element by element: channel k < dim/2 encodes the column, the rest the row."""
  quarter = dim // 4
  table = np.zeros((h * w, dim))
  for i in range(h):
    for j in range(w):
      for half, pos in enumerate((j, i)):
        for k in range(quarter):
          angle = pos / 10000.0 ** (k / quarter)
          table[i * w + j, half * dim // 2 + k] = math.sin(angle)
          table[i * w + j, half * dim // 2 + quarter + k] = math.cos(angle)
  return table


def np_dit(params, x, t, y, *, patch_size, num_heads, context=None, mask=None):
  """The reference forward pass (facebookresearch/DiT ``DiT.forward``) in float64 numpy from our parameter tree;
  with ``context`` [B, S, D_c] PixArt-alpha's ``PixArtBlock.forward`` (cross-attention after the self-attention,
  on the caption projection; ``mask`` [B, S] bool drops keys)."""
  P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  silu = lambda z: z / (1.0 + np.exp(-z))
  gelu = lambda z: 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))

  def ln(z):
    mu = z.mean(-1, keepdims=True)
    return (z - mu) / np.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + 1e-6)

  def linear(z, p_):
    return z @ p_['kernel'] + p_['bias']

  b, height, width, c_in = x.shape
  p, h, w = patch_size, height // patch_size, width // patch_size
  d = P['patch_embed']['kernel'].shape[-1]
  patches = x.reshape(b, h, p, w, p, c_in).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * w, p * p * c_in)
  tokens = patches @ P['patch_embed']['kernel'].reshape(p * p * c_in, d) + P['patch_embed']['bias']
  tokens = tokens + np_sincos_2d(h, w, d)[None]

  freqs = np.exp(-math.log(10000.0) * np.arange(128) / 128)
  args = 1000.0 * np.asarray(t, np.float64)[:, None] * freqs[None]
  t_freq = np.concatenate([np.cos(args), np.sin(args)], axis=1)
  c = linear(silu(linear(t_freq, P['t_embed']['dense_0'])), P['t_embed']['dense_1'])
  if y is not None:
    c = c + P['y_embed']['table']['embedding'][np.asarray(y)]
  if context is not None:
    context = linear(gelu(linear(np.asarray(context, np.float64), P['context_embed_in'])), P['context_embed_out'])

  def attend(a, z, kv, keep=None):
    q = np.einsum('btd,dhe->bthe', z, a['query']['kernel']) + a['query']['bias']
    k, v = (np.einsum('bsd,dhe->bshe', kv, a[n]['kernel']) + a[n]['bias'] for n in ('key', 'value'))
    logits = np.einsum('bthe,bshe->bhts', q, k) / math.sqrt(d // num_heads)
    if keep is not None:
      logits = np.where(keep[:, None, None, :], logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    o = np.einsum('bhts,bshe->bthe', weights, v)
    return np.einsum('bthe,hed->btd', o, a['out']['kernel']) + a['out']['bias']

  for i in range(len([k for k in P if k.startswith('blocks_')])):
    blk = P[f'blocks_{i}']
    mod = linear(silu(c), blk['adaLN_modulation'])[:, None, :]
    shift1, scale1, gate1, shift2, scale2, gate2 = np.split(mod, 6, axis=-1)
    z = ln(tokens) * (1 + scale1) + shift1
    tokens = tokens + gate1 * attend(blk['attn'], z, z)
    if context is not None:
      tokens = tokens + attend(blk['cross_attn'], tokens, context, None if mask is None else np.asarray(mask))
    z = ln(tokens) * (1 + scale2) + shift2
    tokens = tokens + gate2 * linear(gelu(linear(z, blk['mlp_in'])), blk['mlp_out'])

  shift, scale = np.split(linear(silu(c), P['final_adaLN_modulation'])[:, None, :], 2, axis=-1)
  out = linear(ln(tokens) * (1 + scale) + shift, P['final_linear'])  # [B, T, p p C_out]
  c_out = out.shape[-1] // (p * p)
  return out.reshape(b, h, w, p, p, c_out).transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c_out)


def perturb(params, seed, scale=0.05):
  """Gaussian noise on every parameter, so the zero-initialised layers stop hiding the blocks (numpy: no compiles)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(a + scale * rng.standard_normal(a.shape), jnp.float32), params)


@pytest.fixture(scope='module')
def inputs():
  x = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
  t = jnp.array([0.03, 0.7])
  y = jnp.array([3, 10], jnp.int32)  # 10 = the null label
  return x, t, y


@functools.cache
def init_fn():
  model = DiT(**TINY)
  x, t, y = jnp.zeros(SHAPE), jnp.zeros(SHAPE[:1]), jnp.zeros(SHAPE[:1], jnp.int32)
  # The 'rbg' generator compiles in half the time of threefry for the same test value.
  return jax.jit(lambda seed: nn.unbox(model.init(jax.random.key(seed, impl='rbg'), x, t, y))['params'])


@pytest.fixture(scope='module')
def params():
  return init_fn()(0)


@functools.cache
def apply_fn(dtype='float32', remat='none'):
  model = DiT(**TINY, dtype=dtype, remat=remat)
  return jax.jit(lambda params, x, t, y: model.apply({'params': params}, x, t, y))


@functools.cache
def grad_fn(remat='none'):
  """Gradient of the mean squared distance of the output to 1 (nonzero at the zero-output initialisation)."""
  model = DiT(**TINY, remat=remat)
  loss = lambda params, x, t, y: jnp.mean((model.apply({'params': params}, x, t, y) - 1.0) ** 2)
  return jax.jit(jax.grad(loss))


@pytest.mark.parametrize('name', sorted(PAPER_PARAMS_M))
def test_presets_match_paper_parameter_counts_and_shapes(name):
  model = DiT(**DIT_PRESETS[name])
  x, t, y = jnp.zeros((2, 32, 32, 4)), jnp.zeros((2,)), jnp.zeros((2,), jnp.int32)

  out, variables = jax.eval_shape(model.init_with_output, jax.random.PRNGKey(0), x, t, y)
  count = sum(leaf.size for leaf in jax.tree.leaves(nn.unbox(variables)))
  cfg = DIT_PRESETS[name]
  assert count == reference_param_count(cfg['hidden_size'], cfg['depth'], cfg['patch_size'])
  assert abs(count / 1e6 - PAPER_PARAMS_M[name]) / PAPER_PARAMS_M[name] < 0.01
  assert out.shape == (2, 32, 32, 8) and out.dtype == jnp.float32
  # Every parameter carries one logical axis name per dimension, all from the shared vocabulary.
  boxed = jax.tree.leaves(variables, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert all(isinstance(v, nn.Partitioned) for v in boxed)
  assert all(len(v.names) == v.value.ndim and set(v.names) <= set(layers.AXES) | {None} for v in boxed)
  specs = jax.tree.leaves(nn.get_partition_spec(variables), is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))
  assert len(specs) == len(boxed) and all(any(axis is not None for axis in spec) for spec in specs)


def test_forward_flops_match_paper():
  """Table 1 of the paper: DiT-S/4 costs 1.4 Gflops (multiply-adds, fvcore's convention) at 32x32x4; XLA counts a
  multiply-add as 2 FLOPs. Lowered, never compiled or run."""
  model = DiT(**DIT_PRESETS['DiT-S/4'])
  x, t, y = jnp.zeros((1, 32, 32, 4)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, y)
  gmacs = jax.jit(model.apply).lower(variables, x, t, y).cost_analysis()['flops'] / 2e9
  assert abs(gmacs - 1.4) < 0.05, gmacs


@pytest.mark.parametrize('patch_size', [2, 4, 8])
@pytest.mark.parametrize('learn_sigma,out_channels,expected', [(False, None, 3), (True, None, 6), (True, 1, 2)])
def test_output_shapes(patch_size, learn_sigma, out_channels, expected):
  model = DiT(**{**TINY, 'patch_size': patch_size, 'learn_sigma': learn_sigma, 'out_channels': out_channels})
  x, t, y = jnp.zeros((3, 16, 8, 3)), jnp.zeros((3,)), jnp.zeros((3,), jnp.int32)
  out, _ = jax.eval_shape(model.init_with_output, jax.random.PRNGKey(0), x, t, y)
  assert out.shape == (3, 16, 8, expected) and out.dtype == jnp.float32


def test_input_must_be_a_multiple_of_the_patch():
  model = DiT(**{**TINY, 'patch_size': 4})
  with pytest.raises(ValueError, match='patch size'):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 10, 8, 1)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_fresh_model_outputs_exactly_zero(params, inputs, dtype):
  out = apply_fn(dtype)(params, *inputs)
  assert out.dtype == jnp.float32 and out.shape == SHAPE[:3] + (2,)
  np.testing.assert_array_equal(out, 0.0)


def test_initialisers_follow_the_reference(params):
  d = TINY['hidden_size']

  def check_xavier_uniform(kernel, fan_in, fan_out):
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    assert np.abs(kernel).max() <= bound
    np.testing.assert_allclose(np.std(kernel), bound / math.sqrt(3.0), rtol=0.05)

  blk = params['blocks_0']
  check_xavier_uniform(blk['mlp_in']['kernel'], d, 4 * d)
  check_xavier_uniform(blk['mlp_out']['kernel'], 4 * d, d)
  check_xavier_uniform(blk['attn']['out']['kernel'], d, d)
  for name in ('query', 'key', 'value'):
    check_xavier_uniform(blk['attn'][name]['kernel'], d, 3 * d)  # the reference's fused qkv [D, 3D]
  check_xavier_uniform(params['patch_embed']['kernel'], 2 * 2 * 1, d)  # like the linear [p p C, D]
  for table in (params['y_embed']['table']['embedding'], params['t_embed']['dense_0']['kernel'],
                params['t_embed']['dense_1']['kernel']):
    np.testing.assert_allclose(np.std(table), 0.02, rtol=0.1)
  assert params['y_embed']['table']['embedding'].shape == (TINY['num_classes'] + 1, d)
  for zero in (blk['adaLN_modulation'], params['final_adaLN_modulation'], params['final_linear']):
    assert not np.any(zero['kernel']) and not np.any(zero['bias'])
  assert not any('pos' in jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params))


def test_matches_numpy_reference_forward(params, inputs):
  params = perturb(params, 2)
  out = apply_fn()(params, *inputs)
  expected = np_dit(params, *(np.asarray(a) for a in inputs), patch_size=2, num_heads=TINY['num_heads'])
  assert np.all(np.isfinite(out)) and np.abs(out).mean() > 0.1
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_only_the_output_layer_learns_at_initialisation(params, inputs):
  """adaLN-Zero: every block starts as the identity and the final linear at zero, so at initialisation only the
  final linear gets a gradient; one SGD step makes the output nonzero."""
  grads = grad_fn()(params, *inputs)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g))
    assert bool(np.any(g)) == ('final_linear' in jax.tree_util.keystr(path)), jax.tree_util.keystr(path)
  out = apply_fn()(jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), *inputs)
  assert np.all(np.isfinite(out)) and np.abs(out).min() > 0


def test_perturbed_gradients_are_finite_and_reach_every_layer(params, inputs):
  grads = grad_fn()(perturb(params, 3), *inputs)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)), name
    # The key bias shifts each query's logits by a constant, which the softmax ignores: its gradient is round-off.
    if "'key'" not in name or 'kernel' in name:
      assert np.abs(g).max() > 1e-6, name


def test_conditioning_changes_the_output(params, inputs):
  params = perturb(params, 4)
  x, t, _ = inputs
  f, null = apply_fn(), TINY['num_classes']
  out = {label: f(params, x, t, jnp.full((2,), label, jnp.int32)) for label in (0, 1, null)}
  assert np.abs(out[0] - out[1]).max() > 1e-3
  assert np.abs(out[0] - out[null]).max() > 1e-3  # the null label has its own row
  assert np.all(np.isfinite(out[null]))
  assert np.abs(f(params, x, t + 0.2, jnp.zeros((2,), jnp.int32)) - out[0]).max() > 1e-3
  with pytest.raises(ValueError, match='num_classes'):
    DiT(**TINY).apply({'params': params}, x, t)


def test_unconditional_model_has_no_label_table(inputs):
  model = DiT(**{**TINY, 'num_classes': None})
  x, t, y = inputs
  out, variables = jax.eval_shape(model.init_with_output, jax.random.PRNGKey(0), x, t)
  assert 'y_embed' not in variables['params'] and out.shape == SHAPE[:3] + (2,)
  with pytest.raises(ValueError, match='num_classes'):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, y)


def test_bfloat16_close_to_float32(params, inputs):
  """bf16 matmuls (8-bit mantissa, unit roundoff 2^-9 = 0.2 %) on a float32 residual stream: the relative L2 error
  measured over six perturbations is 0.29-0.41 %, bounded here by 3 % (7x); the lower bound shows that the bf16
  path is really taken."""
  params = perturb(params, 6)
  out32 = apply_fn('float32')(params, *inputs)
  out16 = apply_fn('bfloat16')(params, *inputs)
  assert out16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert 1e-4 < rel < 0.03, rel


def test_remat_gradients_equal_plain(params, inputs):
  """Per-block remat of the DiT (every policy is checked on a generic block in test_layers)."""
  params = perturb(params, 7)
  plain, remat = grad_fn()(params, *inputs), grad_fn('full')(params, *inputs)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(plain))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale), plain, remat)


def test_deterministic_given_the_rng(params, inputs):
  again, other = init_fn()(0), init_fn()(1)
  jax.tree.map(np.testing.assert_array_equal, params, again)
  assert not np.array_equal(params['blocks_0']['mlp_in']['kernel'], other['blocks_0']['mlp_in']['kernel'])
  p = perturb(params, 8)
  np.testing.assert_array_equal(apply_fn()(p, *inputs), apply_fn()(p, *inputs))


@pytest.mark.parametrize('h,w,dim', [(4, 4, 64), (3, 5, 16), (1, 2, 8)])
def test_position_embedding_matches_numpy(h, w, dim):
  np.testing.assert_allclose(sincos_pos_embed_2d(h, w, dim), np_sincos_2d(h, w, dim), atol=1e-6)
  with pytest.raises(ValueError, match='divisible by 4'):
    sincos_pos_embed_2d(h, w, dim + 2)


# Text conditioning (PixArt-alpha cross-attention): the tiny DiT, unconditional, on a context of S=5 tokens of D_c=12.
TEXT = {**TINY, 'num_classes': None, 'context_dim': 12}
CONTEXT_SHAPE = (2, 5, 12)


@pytest.fixture(scope='module')
def text_case():
  x = jax.random.normal(jax.random.PRNGKey(1), SHAPE)
  t = jnp.array([0.03, 0.7])
  context = jax.random.normal(jax.random.PRNGKey(2), CONTEXT_SHAPE)
  params = nn.unbox(jax.jit(DiT(**TEXT).init)(jax.random.PRNGKey(0), x, t, context))['params']
  return params, x, t, context


@functools.cache
def text_apply_fn():
  model = DiT(**TEXT)
  return jax.jit(lambda params, x, t, cond: model.apply({'params': params}, x, t, cond))


def without_text(params):
  return {k: ({n: p for n, p in v.items() if n != 'cross_attn'} if k.startswith('blocks_') else v)
          for k, v in params.items() if not k.startswith('context_embed')}


def test_text_context_adds_cross_attention_parameters_only(text_case):
  """context_dim adds, per block, q/k/v/out projections of width D (keys and values read the projected context)
  and once the caption projection D_c -> D -> D; everything else is the class-free DiT's tree, unchanged."""
  params, x, t, _ = text_case
  d, depth, dc = TEXT['hidden_size'], TEXT['depth'], TEXT['context_dim']
  plain = jax.eval_shape(DiT(**{**TEXT, 'context_dim': None}).init, jax.random.PRNGKey(0), x, t)['params']
  shapes = lambda tree: jax.tree.map(lambda a: a.shape, nn.unbox(tree))
  assert shapes(without_text(params)) == shapes(plain)
  count = lambda tree: sum(a.size for a in jax.tree.leaves(tree))
  assert count(params) - count(plain) == depth * 4 * (d * d + d) + (dc * d + d) + (d * d + d)
  for i in range(depth):
    out = params[f'blocks_{i}']['cross_attn']['out']
    assert not np.any(out['kernel']) and not np.any(out['bias'])  # PixArt's zero-initialised projection


def test_text_dit_matches_numpy_reference(text_case):
  params, x, t, context = text_case
  params = perturb(params, 11)
  out = text_apply_fn()(params, x, t, context)
  expected = np_dit(params, np.asarray(x), np.asarray(t), None, patch_size=2, num_heads=TEXT['num_heads'],
                    context=np.asarray(context))
  assert out.shape == SHAPE[:3] + (2,) and np.abs(out).mean() > 0.1
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  other = text_apply_fn()(params, x, t, context[::-1])  # swap the two examples' contexts
  assert np.abs(other - out).max() > 1e-3


def test_fresh_cross_attention_leaves_the_dit_unchanged(text_case):
  """With the zero-initialised cross-attention output the text DiT computes what the same weights compute without
  cross-attention, whatever the context; one context change then matters only through the learnt projection."""
  params, x, t, context = text_case
  params = perturb(params, 12)
  params = {k: ({**v, 'cross_attn': {**v['cross_attn'], 'out': jax.tree.map(jnp.zeros_like, v['cross_attn']['out'])}}
                if k.startswith('blocks_') else v) for k, v in params.items()}
  plain = DiT(**{**TEXT, 'context_dim': None}).apply({'params': without_text(params)}, x, t)
  for c in (context, 3.0 * context[::-1]):
    np.testing.assert_allclose(text_apply_fn()(params, x, t, c), plain, rtol=1e-5, atol=1e-6)


def test_context_mask_drops_the_masked_tokens(text_case):
  params, x, t, context = text_case
  params = perturb(params, 13)
  mask = jnp.array([[True, True, False, False, False], [True, False, True, False, True]])
  noise = 5.0 * jax.random.normal(jax.random.PRNGKey(3), CONTEXT_SHAPE)
  out = text_apply_fn()(params, x, t, {'context': context, 'mask': mask})
  changed = text_apply_fn()(params, x, t, {'context': jnp.where(mask[..., None], context, noise), 'mask': mask})
  np.testing.assert_allclose(out, changed, rtol=1e-5, atol=1e-6)
  expected = np_dit(params, np.asarray(x), np.asarray(t), None, patch_size=2, num_heads=TEXT['num_heads'],
                    context=np.asarray(context), mask=np.asarray(mask))
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
  # No kept token: no cross-attention update (the DiT without it on the same weights).
  none = text_apply_fn()(params, x, t, {'context': context, 'mask': jnp.zeros(CONTEXT_SHAPE[:2], bool)})
  plain = DiT(**{**TEXT, 'context_dim': None}).apply({'params': without_text(params)}, x, t)
  np.testing.assert_allclose(none, plain, rtol=1e-5, atol=1e-6)


def test_text_context_errors_and_clips(text_case):
  params, x, t, context = text_case
  with pytest.raises(ValueError, match='context_dim=12'):
    text_apply_fn()(params, x, t, context[..., :8])
  with pytest.raises(ValueError, match='needs context_dim'):
    DiT(**TINY).apply({'params': params}, x, t, context)
  labels_and_text = DiT(**{**TEXT, 'num_classes': 10})
  out = jax.eval_shape(labels_and_text.init_with_output, jax.random.PRNGKey(0), x, t,
                       {'context': context, 'labels': jnp.zeros((2,), jnp.int32)})[0]
  assert out.shape == SHAPE[:3] + (2,)
  clip = jnp.zeros((2, 4, 8, 8, 1))  # factorized blocks repeat the context per frame / per position
  out = jax.eval_shape(DiT(**DIT_PRESETS['dit3d_tiny'], context_dim=12).init_with_output, jax.random.PRNGKey(0),
                       clip, t, context)[0]
  assert out.shape == clip.shape
