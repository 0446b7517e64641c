"""U-Net: published parameter counts, shapes, conditioning, dropout, mixed precision, remat, axis names."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.models import layers
from diffax.models.unet import UNET_PRESETS, UNet

# name -> (published parameter count, input size, self-attention blocks or None where unpublished).
PUBLISHED = {
    'ddpm_cifar10': (35.7e6, 32, None),  # Ho et al. 2020, app. B
    'ddpmpp_cifar10': (61.8e6, 32, 6),  # Karras et al. 2022 (EDM), table 7 config A and app. F.4
    'adm_imagenet64': (295.9e6, 64, 22),  # Karras et al. 2024 (EDM2), fig. 16 config A; EDM app. F.4
}
NUM_CLASSES, CONTEXT_DIM = 10, 12
TINY = UNET_PRESETS['unet_tiny']
MICRO = dict(ch=8, ch_mult=(1,), num_res_blocks=0, attn_resolutions=(), num_groups=2, dropout=0.1)
CONFIGS = {
    # Forward passes only. ADM layout: BigGAN resampling blocks, AdaGN, learned sigma, labels, heads by channels.
    'labels': dict(TINY, attn_resolutions=(), num_classes=NUM_CLASSES, resblock_updown=True,
                   resample_skip_conv=True, scale_shift_norm=True, learn_sigma=True, num_head_channels=8,
                   dropout=0.1),
    # Forward passes only. DDPM layout (strided conv / nearest + conv resampling), skip rescaling, SD cross-attention.
    'context': dict(TINY, attn_resolutions=(), context_dim=CONTEXT_DIM, context_heads=2, skip_rescale=True,
                    dropout=0.1),
    # Gradients (compile time grows with every block): the smallest U-Net, three ResBlocks around one attention.
    'micro_labels': dict(MICRO, num_classes=NUM_CLASSES, scale_shift_norm=True),
    'micro_context': dict(MICRO, context_dim=CONTEXT_DIM, context_heads=2),
}
O0 = {'xla_backend_optimization_level': 0}
"""Compile time, not run time, dominates these tiny models: XLA's backend (LLVM) optimisation is switched off,
which cuts CPU compile times several-fold (the tiny U-Net's gradients came out bit-identical when checked)."""


def _count(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nn.unbox(params)))


def _abstract_init(model: UNet, x, t, cond):
  """(output, variables) as ShapeDtypeStructs: nothing is allocated or compiled."""
  return jax.eval_shape(functools.partial(model.init_with_output, jax.random.PRNGKey(0)), x, t, cond)


def _assert_logical_names(params):
  is_box = lambda p: isinstance(p, nn.LogicallyPartitioned)
  boxes = jax.tree_util.tree_leaves_with_path(params, is_leaf=is_box)
  for path, box in boxes:
    assert isinstance(box, nn.LogicallyPartitioned), f'{jax.tree_util.keystr(path)} has no logical axis names'
    assert len(box.names) == len(box.value.shape), jax.tree_util.keystr(path)
    assert set(box.names) <= set(layers.AXES) | {None}, (jax.tree_util.keystr(path), box.names)
    assert box.value.dtype == jnp.float32, jax.tree_util.keystr(path)
  assert boxes


def _inputs(name: str, batch: int = 2):
  """x [B, 8, 8, 3], t [B] and labels [B] or a context [B, 5, CONTEXT_DIM], drawn on the host."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, 8, 8, 3)), jnp.float32)
  t = jnp.asarray(rng.uniform(size=(batch,)), jnp.float32)
  if 'labels' in name:
    return x, t, jnp.arange(batch, dtype=jnp.int32)
  return x, t, jnp.asarray(rng.normal(size=(batch, 5, CONTEXT_DIM)), jnp.float32)


@functools.cache
def _params(name: str):
  """Random parameters drawn on the host (no compiled init): kernels N(0, 1 / fan_in), norm scales N(1, 0.1^2),
  biases N(0, 0.1^2); no layer is zero, unlike a fresh init."""
  _, variables = _abstract_init(UNet(**CONFIGS[name]), *_inputs(name))
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    if len(leaf.shape) > 1:
      return jnp.asarray(rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape), jnp.float32)
    return jnp.asarray(rng.normal(1.0 if path[-1].key == 'scale' else 0.0, 0.1, leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(variables['params']))


@functools.cache
def _apply(name: str, *, dtype: str = 'float32'):
  """Jitted evaluation-mode forward pass ``(params, x, t, cond) -> output``."""
  model = UNet(**CONFIGS[name], dtype=dtype)
  return jax.jit(lambda p, x, t, cond: model.apply({'params': p}, x, t, cond), compiler_options=O0)


def _train_loss(name: str, remat: str = 'none'):
  """``(params, x, t, cond, rng) -> (loss, training-mode output)`` with dropout drawn from ``rng``."""
  model = UNet(**CONFIGS[name], remat=remat)

  def loss(p, x, t, cond, rng):
    out = model.apply({'params': p}, x, t, cond, train=True, rngs={'dropout': rng})
    return jnp.mean(jnp.square(out - 1.0)), out

  return loss


@functools.cache
def _grad(name: str, remat: str = 'none'):
  """Jitted ``((loss, output), grads)`` of :func:`_train_loss`."""
  return jax.jit(jax.value_and_grad(_train_loss(name, remat), has_aux=True), compiler_options=O0)


def _run(name: str, cond=None, **kwargs) -> np.ndarray:
  x, t, default_cond = _inputs(name)
  out = _apply(name, **kwargs)(_params(name), x, t, default_cond if cond is None else cond)
  assert out.dtype == jnp.float32
  return np.asarray(out)


def _train_run(name: str, seed: int):
  """(output [B, H, W, C_out], grads) of one training-mode pass with dropout rng ``seed``."""
  (_, out), grads = _grad(name)(_params(name), *_inputs(name), jax.random.PRNGKey(seed))
  return np.asarray(out), grads


@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_published_presets(name):
  published, size, num_attention = PUBLISHED[name]
  kwargs = UNET_PRESETS[name]
  x, t = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.float32)
  cond = jax.ShapeDtypeStruct((2,), jnp.int32) if kwargs.get('num_classes') else None
  out, variables = _abstract_init(UNet(**kwargs), x, t, cond)
  assert abs(_count(variables['params']) / published - 1) < 0.01
  assert out.shape == (2, size, size, 6 if kwargs.get('learn_sigma') else 3) and out.dtype == jnp.float32
  if num_attention is not None:
    assert sum('attn' in key for key in variables['params']) == num_attention
  _assert_logical_names(variables['params'])


def test_small_presets():
  for name, size, limit in (('unet_tiny', 8, 1e6), ('unet_small', 32, 5e6)):
    x, t = jnp.zeros((1, size, size, 3)), jnp.zeros((1,))
    out, variables = _abstract_init(UNet(**UNET_PRESETS[name]), x, t, None)
    assert out.shape == x.shape and _count(variables['params']) < limit
    _assert_logical_names(variables['params'])


@pytest.mark.parametrize('kwargs, hw, c_in, c_out', [
    (dict(out_channels=5, learn_sigma=True, noise_embedding='fourier', t_scale=1.0), (16, 8), 1, 10),
    (dict(ch_mult=(1, 2, 2), attn_resolutions=(8, 4), context_dim=CONTEXT_DIM, context_heads=4, transformer_depth=2,
          up_attn_last_only=True), (16, 16), 3, 3),
])
def test_output_shapes(kwargs, hw, c_in, c_out):
  x, t = jnp.zeros((2, *hw, c_in)), jnp.zeros((2,))
  cond = jnp.zeros((2, 7, CONTEXT_DIM)) if 'context_dim' in kwargs else None
  out, variables = _abstract_init(UNet(**TINY | kwargs), x, t, cond)
  assert out.shape == (2, *hw, c_out) and out.dtype == jnp.float32
  _assert_logical_names(variables['params'])


def test_init_deterministic_and_zero_output():
  """Same rng -> same parameters; the zero-initialised output conv (DDPM, ADM) gives exactly zero output."""
  init = jax.jit(UNet(**CONFIGS['micro_labels']).init_with_output, compiler_options=O0)
  x, t, labels = _inputs('micro_labels')
  (out, a), (_, b), (_, c) = (init(jax.random.PRNGKey(seed), x, t, labels) for seed in (0, 0, 1))
  assert all(jax.tree.leaves(jax.tree.map(lambda u, v: np.array_equal(u, v), a, b)))
  assert not np.array_equal(a['params']['conv_in']['kernel'].value, c['params']['conv_in']['kernel'].value)
  assert np.all(np.asarray(out) == 0.0)
  assert np.all(np.asarray(a['params']['mid_block_0']['conv_1']['kernel'].value) == 0.0)


@pytest.mark.parametrize('name', ['labels', 'context'])
def test_finite_outputs(name):
  out = _run(name)
  assert out.shape == (2, 8, 8, 6 if CONFIGS[name].get('learn_sigma') else 3)
  assert np.all(np.isfinite(out)) and np.std(out) > 1e-3


@pytest.mark.parametrize('name', ['micro_labels', 'micro_context'])
def test_finite_gradients_reach_every_parameter(name):
  _, grads = _train_run(name, seed=3)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
    assert np.any(g != 0.0), f'{jax.tree_util.keystr(path)} gets no gradient'


def test_label_conditioning():
  base = _run('labels', cond=jnp.array([0, 1], jnp.int32))
  other = _run('labels', cond=jnp.array([0, 2], jnp.int32))
  null = _run('labels', cond=jnp.array([NUM_CLASSES, NUM_CLASSES], jnp.int32))
  np.testing.assert_array_equal(base[0], other[0])  # examples are independent
  assert np.max(np.abs(base[1] - other[1])) > 1e-3
  assert np.all(np.isfinite(null)) and np.min(np.max(np.abs(null - base), axis=(1, 2, 3))) > 1e-3


def test_context_conditioning():
  _, _, context = _inputs('context')
  base = _run('context', cond=context)
  changed = _run('context', cond=jnp.asarray(np.asarray(context) * np.array([1.0, -1.0])[:, None, None]))
  np.testing.assert_allclose(base[0], changed[0], rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(base[1] - changed[1])) > 1e-3


def test_dropout_only_in_training_and_deterministic():
  """Evaluation runs without any rng (Flax would raise if dropout asked for one); training draws its masks from
  the ``'dropout'`` rng, reproducibly."""
  (train_1, _), (train_2, _) = _train_run('micro_labels', 1), _train_run('micro_labels', 2)
  eval_out = _run('micro_labels')
  np.testing.assert_array_equal(train_1, _train_run('micro_labels', 1)[0])
  assert np.max(np.abs(train_1 - train_2)) > 1e-3 and np.max(np.abs(train_1 - eval_out)) > 1e-3


def test_bf16_close_to_fp32():
  """bf16 keeps 8 mantissa bits (unit roundoff 2^-9 = 0.2 %); through the ~15 layers of the tiny U-Net the relative
  L2 error of the output measured 0.8-0.9 % (CPU; both tiny configs, three inputs each). The bound, about 3x that,
  checks that the bf16 path computes the same function; where the precision goes is checked exactly by
  :func:`test_mixed_precision_placement` (normalising in bf16 moved this error only to 1.0 %)."""
  fp32, bf16 = _run('context'), _run('context', dtype='bfloat16')
  assert 0.0 < np.linalg.norm(bf16 - fp32) / np.linalg.norm(fp32) < 0.03


@pytest.mark.parametrize('name', ['labels', 'context'])
def test_mixed_precision_placement(name):
  """With dtype bf16 every conv / dense layer computes in bf16 and every norm in float32 (traced, not compiled)."""
  model = UNet(**CONFIGS[name], dtype='bfloat16')

  def dtypes(kinds):
    capture = lambda module, _: isinstance(module, kinds)
    out, state = jax.eval_shape(functools.partial(model.apply, capture_intermediates=capture, mutable='intermediates'),
                                {'params': _params(name)}, *_inputs(name))
    assert out.dtype == jnp.float32
    return {leaf.dtype for leaf in jax.tree.leaves(state)}

  assert dtypes((nn.GroupNorm, nn.LayerNorm)) == {jnp.dtype(jnp.float32)}
  assert dtypes((nn.Conv, nn.DenseGeneral)) == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize('policy', sorted(layers.REMAT_POLICIES))
def test_remat_gradients_equal(policy):
  """Rematerialisation (dropout active) changes memory, not values: ResBlocks (static train flag) and attention."""
  args = (_params('micro_labels'), *_inputs('micro_labels'), jax.random.PRNGKey(5))
  (loss, _), grads = _grad('micro_labels')(*args)
  (loss_remat, _), grads_remat = _grad('micro_labels', policy)(*args)
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_remat, grads)


def test_remat_spatial_transformer_traces():
  """The cross-attention blocks under remat: same parameter tree, gradient traces (no compile)."""
  args = (_params('micro_context'), *_inputs('micro_context'), jax.random.PRNGKey(5))
  grads, _ = jax.eval_shape(jax.grad(_train_loss('micro_context', 'full'), has_aux=True), *args)
  assert jax.tree.structure(grads) == jax.tree.structure(args[0])


@pytest.mark.parametrize('kwargs, cond, shape, match', [
    (dict(num_classes=NUM_CLASSES), None, (2, 8, 8, 3), 'pass labels'),
    (dict(context_dim=CONTEXT_DIM), jnp.zeros((2, 5, 3)), (2, 8, 8, 3), 'context'),
    ({}, jnp.zeros((2,), jnp.int32), (2, 8, 8, 3), 'neither'),
    ({}, None, (2, 7, 7, 3), 'divisible'),
    (dict(num_head_channels=5), None, (2, 8, 8, 3), 'num_head_channels'),
    (dict(context_dim=CONTEXT_DIM, context_heads=3), jnp.zeros((2, 5, CONTEXT_DIM)), (2, 8, 8, 3), 'context_heads'),
    (dict(noise_embedding='gaussian'), None, (2, 8, 8, 3), 'noise embedding'),
    (dict(remat='everything'), None, (2, 8, 8, 3), 'remat policy'),
])
def test_invalid_configurations(kwargs, cond, shape, match):
  with pytest.raises(ValueError, match=match):
    _abstract_init(UNet(**TINY | kwargs), jnp.zeros(shape), jnp.zeros((shape[0],)), cond)
