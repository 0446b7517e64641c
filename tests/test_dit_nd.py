"""DiT over 1-D patches of sequences and 3-D tubelets of clips: position embeddings, patch order, attention
factorisation and parameter counts."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.models import dit, get_model
from diffax.models.dit import DiT

O0 = {'xla_backend_optimization_level': 0}
SMALL = dict(hidden_size=32, num_heads=2)


def _count(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nn.unbox(params)))


def _abstract_params(model, shape):
  return jax.eval_shape(functools.partial(model.init, jax.random.PRNGKey(0)), jnp.zeros(shape),
                        jnp.zeros(shape[:1]))['params']


def _random_params(model, shape, seed=0):
  """Host-drawn N(0, 1 / fan_in) kernels and N(0, 0.1^2) biases: no zero layer, unlike a fresh DiT."""
  rng = np.random.default_rng(seed)

  def draw(leaf):
    std = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.1
    return jnp.asarray(rng.normal(0.0, std, leaf.shape), jnp.float32)

  return jax.tree.map(draw, nn.unbox(_abstract_params(model, shape)))


def _apply(model):
  return jax.jit(lambda p, x, t: model.apply({'params': p}, x, t), compiler_options=O0)


def test_sincos_1d_is_a_function_of_relative_position_and_3d_adds_frame_to_pixel():
  e = dit.sincos_pos_embed_1d(12, 16)
  gram = e @ e.T  # sum_k sin a sin b + cos a cos b = sum_k cos((a - b) w_k)
  omega = 10_000.0 ** (-np.arange(8) / 8)
  offsets = np.arange(12)[:, None] - np.arange(12)[None, :]
  np.testing.assert_allclose(gram, np.cos(offsets[..., None] * omega).sum(-1), atol=1e-5)
  t, h, w = 3, 2, 4
  e3 = dit.sincos_pos_embed((t, h, w), 16)
  index = lambda f, i, j: (f * h + i) * w + j  # row-major over (frame, row, column), like the patch reshape
  e2 = dit.sincos_pos_embed_2d(h, w, 16)
  np.testing.assert_allclose(e3[index(2, 1, 3)], e[2] + e2[1 * w + 3], rtol=1e-6)
  assert len(np.unique(e3.round(5), axis=0)) == t * h * w
  with pytest.raises(ValueError, match='even'):
    dit.sincos_pos_embed_1d(4, 7)


@pytest.mark.parametrize('spatial_dims,shape,patch', [(1, (1, 16, 2), (4,)), (3, (1, 4, 8, 8, 1), (2, 4, 4))],
                         ids=['sequence', 'clip'])
def test_without_blocks_each_output_patch_sees_its_own_input_patch_only(spatial_dims, shape, patch):
  """With depth 0 a DiT is per-token (embed, LayerNorm, linear), so this pins the patch and unpatch orders."""
  model = DiT(patch_size=patch[-1], tubelet_size=patch[0], depth=0, spatial_dims=spatial_dims, **SMALL)
  params = _random_params(model, shape)
  apply = _apply(model)
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  t = jnp.full((1,), 0.3)
  where = (0, *(s - 1 for s in shape[1:-1]), 0)  # the last position of every axis: the last patch
  changed = np.abs(apply(params, x.at[where].add(3.0), t) - apply(params, x, t))[0].max(-1) > 1e-6
  expected = np.zeros(shape[1:-1], bool)
  expected[tuple(slice(s - q, s) for s, q in zip(shape[1:-1], patch))] = True
  np.testing.assert_array_equal(changed, expected)


def test_factorized_blocks_attend_within_frames_then_across_them():
  shape = (1, 4, 8, 8, 1)  # tubelets 1 x 4 x 4: 4 frames of 2 x 2 tokens
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  t = jnp.full((1,), 0.3)

  def frames_changed(depth, attention):
    model = DiT(patch_size=4, depth=depth, spatial_dims=3, attention=attention, **SMALL)
    params, apply = _random_params(model, shape), _apply(model)
    diff = np.abs(apply(params, x.at[0, 0].add(3.0), t) - apply(params, x, t))[0]
    return tuple(bool(d) for d in diff.reshape(4, -1).max(-1) > 1e-6)

  assert frames_changed(1, 'factorized') == (True, False, False, False)  # block 0 attends within frames
  assert frames_changed(2, 'factorized') == (True, True, True, True)  # block 1 across frames
  assert frames_changed(1, 'joint') == (True, True, True, True)


def test_clip_and_sequence_parameter_counts():
  kwargs = dict(patch_size=2, depth=2, **SMALL)
  image = _count(_abstract_params(DiT(**kwargs), (1, 8, 8, 3)))
  clip = _count(_abstract_params(DiT(**kwargs, spatial_dims=3, attention='factorized'), (1, 4, 8, 8, 3)))
  assert clip == image  # tubelets of one frame: the image DiT's parameters exactly (position embeddings are fixed)
  tubelet = _count(_abstract_params(DiT(**kwargs, spatial_dims=3, tubelet_size=2), (1, 4, 8, 8, 3)))
  d, pixels = 32, 2 * 2 * 3  # one more frame per token: patch embedding + d p p C, final linear + (d + 1) p p C
  assert tubelet - image == d * pixels + (d + 1) * pixels
  sequence = _count(_abstract_params(DiT(**kwargs, spatial_dims=1), (1, 16, 3)))
  assert image - sequence == d * 2 * 3 + (d + 1) * 2 * 3  # p C fewer inputs and outputs per token
  latte = _count(_abstract_params(get_model('dit', preset='Latte-XL/2'), (1, 16, 32, 32, 4)))
  xl = _count(_abstract_params(get_model('dit', preset='DiT-XL/2', num_classes=None, learn_sigma=False),
                               (1, 32, 32, 4)))
  assert latte == xl == 673_663_120


@pytest.mark.parametrize('preset,shape', [('dit1d_tiny', (2, 32, 1)), ('dit3d_tiny', (2, 4, 8, 8, 1))])
def test_tiny_presets_run_and_start_at_zero(preset, shape):
  model = get_model('dit', preset=preset)
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  t = jnp.full((2,), 0.5)
  fresh = jax.jit(model.init, compiler_options=O0)(jax.random.PRNGKey(0), x, t)['params']
  np.testing.assert_array_equal(_apply(model)(nn.unbox(fresh), x, t), 0.0)
  out = _apply(model)(_random_params(model, shape), x, t)
  assert out.shape == shape and np.isfinite(out).all()


def test_bad_shapes_name_the_setting():
  t = jnp.zeros((1,))
  with pytest.raises(ValueError, match='tubelet_size'):
    DiT(patch_size=4, tubelet_size=2, spatial_dims=3, **SMALL).init(jax.random.PRNGKey(0), jnp.zeros((1, 3, 8, 8, 1)),
                                                                    t)
  with pytest.raises(ValueError, match=r'\[B, T, H, W, C\]'):
    DiT(spatial_dims=3, **SMALL).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), t)
  with pytest.raises(ValueError, match='factorized'):
    DiT(attention='factorized', **SMALL).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), t)
