"""LoRA as a parameter transformation: zero adapters are the identity, merged == adapted, exact unmerge, targets.

Every model call runs jitted (one compile per program, not one per operation as op-by-op dispatch does).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax import models
from diffax.models import lora

X = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 1)), jnp.float32)
T = jnp.asarray([0.3, 0.8], jnp.float32)
LABELS = jnp.asarray([1, 10], jnp.int32)  # a class and the null label


def _model(name: str, **fields):
  preset = {'unet': 'unet_tiny', 'dit': 'dit_tiny'}[name]
  model = models.get_model(name, preset=preset, num_classes=10, learn_sigma=False, **fields)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), X, T, LABELS)['params'])
  noise = _randomised(params, seed=7)  # a trained model has no zero-initialised layers left
  return model, jax.jit(functools.partial(jax.tree.map, jnp.add))(params, noise)


def _randomised(adapters, seed=1):
  """Adapters with a non-zero B, so the update is not trivially zero (numpy draws: nothing to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), jnp.float32), adapters)


def _apply(model, params, adapters=()):
  """The model's output [2, 8, 8, 1] with ``adapters`` [(adapters, scale), ...] applied on the fly."""
  scales = [scale for _, scale in adapters]

  def forward(params, trees):
    with lora.adapted(list(zip(trees, scales))):
      return model.apply({'params': params}, X, T, LABELS)

  return jax.jit(forward)(params, [tree for tree, _ in adapters])


def _merged_apply(model, params, adapters):
  """The model's output with ``adapters`` merged into ``params`` first (:func:`lora.merge` in order)."""
  for tree, scale in adapters:
    params = jax.jit(functools.partial(lora.merge, scale=scale))(params, tree)
  return _apply(model, params)


CASES = [('unet', ('attention', 'resblock_convs', r'down_0_resample', 'conv_out')),
         ('dit', ('attention_mlp', 'patch_embed'))]


@pytest.mark.parametrize('name, targets', CASES)
def test_zero_adapter_is_identity_and_merged_equals_adapted(name, targets):
  model, params = _model(name)
  layers = lora.layers_of(model, params, X, T, LABELS)
  config = lora.LoraConfig(rank=2, alpha=3.0, targets=targets)
  adapters = lora.init(jax.random.PRNGKey(2), layers, config)
  base = _apply(model, params)
  np.testing.assert_array_equal(_apply(model, params, [(adapters, config.scale)]), base)  # B = 0: exactly
  np.testing.assert_array_equal(_merged_apply(model, params, [(adapters, config.scale)]), base)

  adapters = _randomised(adapters)
  adapted = _apply(model, params, [(adapters, config.scale)])
  merged = _merged_apply(model, params, [(adapters, config.scale)])
  assert np.max(np.abs(adapted - base)) > 1e-2  # the update does something ...
  np.testing.assert_allclose(merged, adapted, rtol=0, atol=2e-5 * np.max(np.abs(adapted)))  # ... the same both ways
  restored = lora.unmerge(lora.merge(params, adapters, scale=config.scale), adapters, scale=config.scale)
  for p, r in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    np.testing.assert_allclose(r, p, rtol=0, atol=1e-6)


def test_dense_and_conv_updates_against_numpy():
  """One DenseGeneral [D, H, Dh] and one strided Conv: W x + s B A x by an independent computation."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 6, 6, 3)).astype(np.float32)

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      h = nn.Conv(4, (3, 3), strides=(2, 2), padding='SAME', name='conv')(x)  # [2, 3, 3, 4]
      return nn.DenseGeneral((2, 5), name='proj')(h)  # [2, 3, 3, 2, 5]

  net = Net()
  params = net.init(jax.random.PRNGKey(0), x)['params']
  adapters = _randomised(lora.init(jax.random.PRNGKey(1), lora.layers_of(net, params, x),
                                   lora.LoraConfig(rank=3, targets=('conv', 'proj'))))
  with lora.adapted([(adapters, 0.7)]):
    out = net.apply({'params': params}, x)
  a, b = adapters['conv']['lora_a'], adapters['conv']['lora_b']  # [3, 3, 3, r], [r, 4]
  kernel = np.asarray(params['conv']['kernel']) + 0.7 * np.einsum('hwcr,ro->hwco', a, b)
  padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))  # SAME for k = 3, stride 2 on 6: pad 0 before, 1 after
  h = np.stack([np.stack([np.einsum('bhwc,hwco->bo', padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3], kernel)
                          for j in range(3)], 1) for i in range(3)], 1) + np.asarray(params['conv']['bias'])
  a, b = adapters['proj']['lora_a'], adapters['proj']['lora_b']  # [4, r], [r, 2, 5]
  w = np.asarray(params['proj']['kernel']) + 0.7 * np.einsum('cr,rhd->chd', a, b)
  expected = np.einsum('bijc,chd->bijhd', h, w) + np.asarray(params['proj']['bias'])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_several_adapters_with_weights_equal_their_merges():
  model, params = _model('dit')
  layers = lora.layers_of(model, params, X, T, LABELS)
  one = _randomised(lora.init(jax.random.PRNGKey(0), layers, lora.LoraConfig(targets=('attention',))), seed=4)
  two = _randomised(lora.init(jax.random.PRNGKey(0), layers, lora.LoraConfig(targets=(r'.*mlp_(in|out)',))), seed=5)
  mixed = _apply(model, params, [(one, 0.5), (two, 1.5)])
  np.testing.assert_allclose(_merged_apply(model, params, [(one, 0.5), (two, 1.5)]), mixed, rtol=0,
                             atol=2e-5 * np.max(np.abs(mixed)))


def test_dropout_and_gradients_under_jit_and_remat():
  model, params = _model('unet', remat='full')
  config = lora.LoraConfig(rank=2, dropout=0.5, targets=('attention',))
  adapters = _randomised(lora.init(jax.random.PRNGKey(0), lora.layers_of(model, params, X, T, LABELS), config))
  apply_fn = lora.adapt_apply_fn(
      lambda p, x, t, c, *, train, rngs: model.apply({'params': p}, x, t, c, train=train, rngs=rngs), config)

  @functools.partial(jax.jit, static_argnums=2)
  def loss(lora_params, rng, train):
    out = apply_fn({'base': params, 'lora': lora_params}, X, T, LABELS, train=train, rngs={'dropout': rng})
    return jnp.mean(out ** 2)

  eval_loss = loss(adapters, jax.random.PRNGKey(1), False)
  assert loss(adapters, jax.random.PRNGKey(9), False) == eval_loss  # no dropout at evaluation
  assert loss(adapters, jax.random.PRNGKey(1), True) != eval_loss  # dropout on the adapters' input
  grads = jax.grad(loss)(adapters, jax.random.PRNGKey(1), True)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_unknown_targets_name_the_pattern_and_list_the_layers():
  model, params = _model('unet')
  layers = lora.layers_of(model, params, X, T, LABELS)
  with pytest.raises(lora.LoraTargetError, match=r"'.*mlp_in'.*down_1_attn_0/attn/query"):
    lora.init(jax.random.PRNGKey(0), layers, lora.LoraConfig(targets=('attention', r'.*mlp_in')))
  dit, dit_params = _model('dit')
  adapters = lora.init(jax.random.PRNGKey(0), lora.layers_of(dit, dit_params, X, T, LABELS),
                       lora.LoraConfig(targets=('attention',)))
  with pytest.raises(lora.LoraTargetError, match=r"'blocks_0/attn/\w+' names no adaptable layer"):
    lora.check(adapters, layers)  # DiT adapters on a U-Net
  wrong_rank = lora.init(jax.random.PRNGKey(0), layers, lora.LoraConfig(rank=2))
  wrong_rank['mid_attn']['attn']['query']['lora_b'] = jnp.zeros((3, 2, 16))
  with pytest.raises(lora.LoraTargetError, match="mid_attn/attn/query"):
    lora.check(wrong_rank, layers)
