"""ControlNet: the controlled model equals the base at initialisation and at scale 0; controls; shape errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import models
from diffax.models import controlnet as cn

X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 1)), jnp.float32)
T = jnp.asarray([0.3, 0.8], jnp.float32)
LABELS = jnp.asarray([1, 10], jnp.int32)
CONTROL = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 8, 8, 1)), jnp.float32)


def _perturbed(tree, seed):
  """``tree`` plus 0.1 N(0, 1) noise drawn in numpy (a jax draw per leaf shape would compile one program each)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + jnp.asarray(0.1 * rng.standard_normal(x.shape), jnp.float32), tree)


def _setup(name):
  preset = {'unet': 'unet_tiny', 'dit': 'dit_tiny'}[name]
  base = models.get_model(name, preset=preset, num_classes=10, learn_sigma=False)
  base_params = nn.meta.unbox(jax.jit(base.init)(jax.random.PRNGKey(0), X, T, LABELS)['params'])
  base_params = _perturbed(base_params, 3)  # "trained"
  net = cn.ControlNet(base, depth=1 if name == 'dit' else None)
  control_params = nn.meta.unbox(jax.jit(net.init)(jax.random.PRNGKey(1), X, T, LABELS, CONTROL)['params'])
  return base, base_params, net, cn.init_from_base(control_params, base_params)


@pytest.mark.parametrize('name', ['unet', 'dit'])
def test_controlled_model_equals_base_at_init_and_scale_zero(name):
  base, base_params, net, control_params = _setup(name)
  expected = base.apply({'params': base_params}, X, T, LABELS)
  apply = lambda cp, s: cn.controlled_apply(base, net, base_params, cp, X, T, LABELS, CONTROL, scale=s)  # op by op
  np.testing.assert_array_equal(apply(control_params, 1.0), expected)  # zero layers: exactly the base
  copy = jax.tree.leaves(control_params['encoder'])
  assert copy and all(np.array_equal(a, b) for a, b in zip(
      copy, jax.tree.leaves({k: base_params[k] for k in control_params['encoder']})))  # the copy starts trained

  trained = _perturbed(control_params, 4)  # after training the zero layers are not zero
  controlled = apply(trained, 1.0)
  assert np.max(np.abs(controlled - expected)) > 1e-2
  np.testing.assert_array_equal(apply(trained, 0.0), expected)
  other = cn.controlled_apply(base, net, base_params, trained, X, T, LABELS, 1.0 - CONTROL)
  assert np.max(np.abs(other - controlled)) > 1e-3  # the output follows the control image


def test_control_image_of_the_wrong_shape_is_a_clear_error():
  base, base_params, net, control_params = _setup('unet')
  with pytest.raises(cn.ControlShapeError, match=r'\(2, 8, 8, .C_control.\).*got \(2, 4, 4, 1\)'):
    cn.controlled_apply(base, net, base_params, control_params, X, T, LABELS, CONTROL[:, :4, :4])
  dit = models.get_model('dit', preset='dit_tiny', num_classes=10)
  with pytest.raises(ValueError, match='another backbone'):
    cn.init_from_base(control_params, nn.meta.unbox(dit.init(jax.random.PRNGKey(0), X, T, LABELS)['params']))
