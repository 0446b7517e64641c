"""The U-Net on sequences [B, L, C] and clips [B, T, H, W, C]: one definition restricted or extended exactly.

* A 1-D U-Net is the 2-D U-Net on [B, L, 1, C] with every 3x3 kernel replaced by its middle column (what a
  'SAME' convolution over a width-1 image uses), so the 1-D path is the image path, not a copy of it.
* A clip U-Net without temporal convolutions and with zero relative position biases is equivariant to permuting
  the frames (space-only convolutions, clip-wide GroupNorm, temporal attention without positions); the relative
  position bias and the temporal convolutions break exactly that symmetry, and the temporal attention carries
  information between frames.
* Frame conditioning sees the given frames only where the mask is 1.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.models import get_model, unet
from diffax.models.unet import UNet

O0 = {'xla_backend_optimization_level': 0}
MICRO = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), num_heads=2, num_groups=2)
CLIP = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_heads=2, num_groups=2, spatial_dims=3)


def _random_params(model: nn.Module, *inputs, seed: int = 0):
  """Host-drawn parameters with no zero layer (a fresh U-Net outputs zero): kernels N(0, 1 / fan_in), norm
  scales N(1, 0.1^2), biases and relative-position tables N(0, 0.1^2)."""
  variables = jax.eval_shape(functools.partial(model.init, jax.random.PRNGKey(0)), *inputs)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if len(leaf.shape) > 1 and path[-1].key != 'table':
      return jnp.asarray(rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape), jnp.float32)
    mean = 1.0 if path[-1].key == 'scale' else 0.0
    return jnp.asarray(rng.normal(mean, 0.1 if len(leaf.shape) == 1 else 1.0, leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(variables['params']))


def _apply(model: nn.Module):
  return jax.jit(lambda p, x, t, cond=None: model.apply({'params': p}, x, t, cond), compiler_options=O0)


def _inputs(shape, seed: int = 0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=shape), jnp.float32),
          jnp.asarray(rng.uniform(size=shape[:1]), jnp.float32))


def test_sequence_unet_is_the_image_unet_on_width_one_images():
  x, t = _inputs((2, 16, 3))
  model_1d, model_2d = UNet(**MICRO, spatial_dims=1), UNet(**MICRO)
  params_2d = _random_params(model_2d, x[:, :, None], t)

  def middle_column(path, kernel):  # [3, 3, C_in, C_out] -> [3, C_in, C_out]; 1x1 kernels -> [1, C_in, C_out]
    return kernel[:, kernel.shape[1] // 2] if kernel.ndim == 4 else kernel

  params_1d = jax.tree_util.tree_map_with_path(middle_column, params_2d)
  shapes_1d = jax.eval_shape(functools.partial(model_1d.init, jax.random.PRNGKey(0)), x, t)['params']
  assert jax.tree.map(lambda a: a.shape, params_1d) == jax.tree.map(lambda a: a.shape, nn.unbox(shapes_1d))
  out_1d = _apply(model_1d)(params_1d, x, t)
  out_2d = _apply(model_2d)(params_2d, x[:, :, None], t)[:, :, 0]
  assert out_1d.shape == x.shape
  np.testing.assert_allclose(out_1d, out_2d, rtol=1e-4, atol=1e-5)


def test_sequence_unet_resamples_and_attends_at_the_configured_lengths():
  model = get_model('unet', preset='unet1d_tiny')
  x, t = _inputs((2, 64, 1))
  variables = jax.eval_shape(functools.partial(model.init, jax.random.PRNGKey(0)), x, t)['params']
  attention = sorted(k for k in variables if 'attn' in k)
  assert attention == ['down_2_attn_0', 'mid_attn', 'up_2_attn_0', 'up_2_attn_1']  # only at length 64 / 4 = 16
  assert variables['down_0_resample']['kernel'].value.shape == (3, 16, 16)
  with pytest.raises(ValueError, match=r'\[B, L, C\]'):
    model.init(jax.random.PRNGKey(0), x[:, :, None], t)
  with pytest.raises(ValueError, match='divisible by'):
    model.init(jax.random.PRNGKey(0), x[:, :62], t)


@functools.cache
def _clip_model_and_params(temporal_conv: bool):
  model = UNet(**CLIP, temporal_conv=temporal_conv)
  x, t = _inputs((2, 4, 8, 8, 2))
  return model, _random_params(model, x, t)


def _zero_relative_bias(params):
  return jax.tree_util.tree_map_with_path(lambda path, a: jnp.zeros_like(a) if path[-1].key == 'table' else a,
                                          params)


def test_clip_unet_shapes_names_and_fresh_init():
  model, params = _clip_model_and_params(True)
  x, t = _inputs((2, 4, 8, 8, 2))
  assert params['conv_in']['kernel'].shape == (1, 3, 3, 2, 8)  # space-only 1x3x3 (VDM)
  assert params['down_0_block_0']['conv_0_temporal']['conv']['kernel'].shape == (3, 1, 1, 8, 8)
  assert params['down_0_resample']['kernel'].shape == (1, 3, 3, 8, 8)
  assert params['mid_attn_temporal']['relative_position']['table'].shape == (32, 2)
  assert 'down_1_attn_0_temporal' in params and 'down_0_attn_0' not in params  # attention at 4x4 only
  out = _apply(model)(params, x, t)
  assert out.shape == x.shape and np.isfinite(out).all()
  fresh = jax.jit(model.init, compiler_options=O0)(jax.random.PRNGKey(0), x, t)['params']
  np.testing.assert_array_equal(_apply(model)(nn.unbox(fresh), x, t), 0.0)  # zero-initialised output conv


def test_clip_unet_temporal_pathway_breaks_exactly_the_frame_permutation_symmetry():
  x, t = _inputs((2, 4, 8, 8, 2))
  perm = np.array([2, 0, 3, 1])
  model, params = _clip_model_and_params(False)
  apply = _apply(model)
  symmetric = _zero_relative_bias(params)
  np.testing.assert_allclose(apply(symmetric, x[:, perm], t), apply(symmetric, x, t)[:, perm], rtol=1e-4, atol=1e-5)
  ordered = np.abs(apply(params, x[:, perm], t) - apply(params, x, t)[:, perm]).max()
  assert ordered > 1e-2, ordered  # relative positions: frame order matters
  model_tc, params_tc = _clip_model_and_params(True)
  with_conv = np.abs(_apply(model_tc)(_zero_relative_bias(params_tc), x[:, perm], t)
                     - _apply(model_tc)(_zero_relative_bias(params_tc), x, t)[:, perm]).max()
  assert with_conv > 1e-2, with_conv  # temporal convolutions: neighbours matter
  # The temporal attention moves information between frames (the space-only convolutions never do).
  x_changed = x.at[:, 0].add(1.0)
  change = np.abs(apply(symmetric, x_changed, t) - apply(symmetric, x, t))[:, 1:].max()
  assert change > 1e-2, change


def test_frame_conditioning_reads_the_given_frames_only():
  model = UNet(**CLIP, frame_conditioning=True)
  x, t = _inputs((2, 4, 8, 8, 2))
  frames, _ = _inputs((2, 4, 8, 8, 2), seed=1)
  mask = jnp.asarray([[1, 1, 0, 0], [1, 0, 0, 1]], jnp.float32)  # prediction from 2 frames; interpolation
  params = _random_params(model, x, t, {'frames': frames, 'mask': mask})
  assert params['conv_in']['kernel'].shape == (1, 3, 3, 2 + 2 + 1, 8)  # x, masked frames, mask
  apply = _apply(model)
  out = apply(params, x, t, {'frames': frames, 'mask': mask})
  hidden = frames + (1.0 - mask)[:, :, None, None, None] * 5.0  # changes only the frames that are masked out
  np.testing.assert_array_equal(apply(params, x, t, {'frames': hidden, 'mask': mask}), out)
  seen = frames + mask[:, :, None, None, None] * 0.5
  assert np.abs(apply(params, x, t, {'frames': seen, 'mask': mask}) - out).max() > 1e-2
  with pytest.raises(ValueError, match="'mask'"):
    model.init(jax.random.PRNGKey(0), x, t, {'frames': frames})
  with pytest.raises(ValueError, match='spatial_dims=3'):
    UNet(**MICRO, frame_conditioning=True).init(jax.random.PRNGKey(0), x[:, 0], t, {'frames': x[:, 0],
                                                                                     'mask': mask})


def test_clip_unet_gradients_with_remat_match():
  micro = dict(ch=8, ch_mult=(1,), num_res_blocks=0, attn_resolutions=(), num_groups=2, spatial_dims=3,
               temporal_conv=True)  # three ResBlocks with temporal convolutions around factorised attention
  model = UNet(**micro)
  x, t = _inputs((2, 4, 4, 4, 2))
  params = _random_params(model, x, t)

  def loss(m):
    return lambda p: jnp.mean(jnp.square(m.apply({'params': p}, x, t) - x))

  g = jax.jit(jax.grad(loss(model)), compiler_options=O0)(params)
  g_remat = jax.jit(jax.grad(loss(UNet(**micro, remat='full'))), compiler_options=O0)(params)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(g))


def test_nd_presets_and_bad_ranks():
  counts = {}
  for name, shape in (('unet1d_tiny', (1, 64, 1)), ('unet3d_tiny', (1, 8, 16, 16, 1))):
    model = get_model('unet', preset=name)
    variables = jax.eval_shape(functools.partial(model.init, jax.random.PRNGKey(0)), jnp.zeros(shape),
                               jnp.zeros((1,)))
    counts[name] = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nn.unbox(variables['params'])))
  assert counts == {'unet1d_tiny': 129_457, 'unet3d_tiny': 230_001}
  with pytest.raises(ValueError, match='spatial_dims'):
    unet.resampled_axes(4)
  with pytest.raises(ValueError, match='temporal_conv'):
    UNet(**MICRO, temporal_conv=True).init(jax.random.PRNGKey(0), *_inputs((1, 8, 8, 1)))
