"""Low-rank adaptation (LoRA; Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685) as a parameter transformation of any Flax model: no module is rewritten.

A targeted layer with kernel ``W`` (a Dense / DenseGeneral [*in, *out] or a Conv [*k, C_in, C_out]) gains a
rank-``r`` update (eq. 3)

  h = W x + (alpha / r) B A dropout(x),      A: [*in, r] (a Conv: [*k, C_in, r]),  B: [r, *out]

held in a separate pytree of adapters that mirrors the parameters (``{..path..: {'lora_a', 'lora_b'}}``).
``A`` starts like PyTorch's default (Kaiming-uniform, ``a = sqrt(5)``; PEFT), ``B`` at zero, so a fresh adapter
leaves the model unchanged (sec. 4.1). For a Conv, ``A`` is a convolution with the layer's own kernel size,
strides and padding into ``r`` channels and ``B`` a 1x1 convolution back (LoCon / diffusers' LoRA convs), so the
product ``tensordot(A, B)`` is again a kernel of ``W``'s shape.

Two ways to run an adapted model, equal to float32 round-off:

* :func:`adapted`: a context in which every targeted layer adds its low-rank path (``nn.intercept_methods``);
  the base parameters stay untouched, which is how adapters are trained (with dropout) and how several are
  mixed at sampling time.
* :func:`merge`: ``W + (alpha / r) tensordot(A, B)`` written into the kernels, so sampling costs nothing extra;
  :func:`unmerge` subtracts the same product.

Layers are chosen by regular expressions fully matching their module paths (``'/'``-joined names, e.g.
``'down_1_attn_0/attn/query'``); :data:`TARGETS` names common sets. A pattern matching no layer is an error that
lists the layers the model has.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import contextlib
import dataclasses
import re
import zlib
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp

Array = jax.Array
Params = Any

TARGETS: dict[str, tuple[str, ...]] = {
    # Self / cross attention of the U-Net's AttnBlock ('attn'), SpatialTransformer ('self_attn', 'cross_attn')
    # and DiT ('attn'): the query, key, value and output projections (LoRA's W_q, W_k, W_v, W_o).
    'attention': (r'.*attn/(query|key|value|out)',),
    # ... and the MLPs of the transformer blocks (DiT's mlp_in / mlp_out, SD's GEGLU ff_in / ff_out).
    'attention_mlp': (r'.*attn/(query|key|value|out)', r'(.*/)?(mlp_in|mlp_out|ff_in|ff_out)'),
    # The 3x3 convolutions of every U-Net ResBlock (LoCon-style adaptation of the convolutions).
    'resblock_convs': (r'.*block_\d+/conv_[01]',),
}
"""Named target sets: a config may give one of these names instead of patterns."""

ADAPTABLE = (nn.Dense, nn.DenseGeneral, nn.Conv)
"""Layer types that take an adapter."""


class LoraTargetError(ValueError):
  """A target pattern or an adapter path that names no adaptable layer of the model."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """What to adapt and how.

  Attributes:
    rank: r, the inner width of every update.
    alpha: the update is scaled by ``alpha / rank`` (sec. 4.1: tuning alpha is like tuning the learning rate).
    dropout: dropout rate on the input of ``A`` during training (PEFT's ``lora_dropout``).
    targets: regular expressions, each fully matching the ``'/'``-joined paths of the layers to adapt, or names
      of :data:`TARGETS`.
  """
  rank: int = 4
  alpha: float = 4.0
  dropout: float = 0.0
  targets: tuple[str, ...] = ('attention',)

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f'LoRA rank must be >= 1, got {self.rank}.')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'LoRA dropout must lie in [0, 1), got {self.dropout}.')
    if not self.targets:
      raise ValueError('LoRA needs at least one target pattern (or a name of lora.TARGETS).')

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def patterns(self) -> tuple[str, ...]:
    return tuple(p for target in self.targets for p in TARGETS.get(target, (target,)))


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """An adaptable layer met in a forward pass: its kind, kernel shape and number of output axes of the kernel."""
  kind: str
  kernel_shape: tuple[int, ...]
  num_out: int

  def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of ``A`` [*in, r] and ``B`` [r, *out]."""
    split = len(self.kernel_shape) - self.num_out
    return self.kernel_shape[:split] + (rank,), (rank,) + self.kernel_shape[split:]


def _num_out(module: nn.Module) -> int:
  if isinstance(module, nn.Conv):
    if module.feature_group_count != 1:
      raise LoraTargetError(f'{module.path}: grouped convolutions take no adapter.')
    return 1
  if isinstance(module, nn.DenseGeneral) and module.batch_dims:
    raise LoraTargetError(f'{module.path}: DenseGeneral with batch_dims takes no adapter.')
  features = module.features
  return 1 if isinstance(features, int) else len(features)


def layers_of(model: nn.Module, params: Params, *args, **kwargs) -> dict[str, LayerSpec]:
  """Every adaptable layer that ``model.apply({'params': params}, *args, **kwargs)`` calls, by path.

  Traced with ``jax.eval_shape`` (nothing is computed); ``params`` may be shapes.
  """
  found: dict[str, LayerSpec] = {}

  def record(next_fun, call_args, call_kwargs, context):
    module = context.module
    if context.method_name == '__call__' and isinstance(module, ADAPTABLE) and module.path:
      kernel = module.variables['params']['kernel']
      found['/'.join(module.path)] = LayerSpec(type(module).__name__, tuple(kernel.shape), _num_out(module))
    return next_fun(*call_args, **call_kwargs)

  def forward(p):
    with nn.intercept_methods(record):
      return model.apply({'params': p}, *args, **kwargs)

  jax.eval_shape(forward, params)
  return found


def select(layers: dict[str, LayerSpec], patterns: Sequence[str]) -> list[str]:
  """The paths of ``layers`` that some pattern fully matches; a pattern that matches none is an error."""
  chosen = set()
  for pattern in patterns:
    regex = re.compile(pattern)
    matches = {path for path in layers if regex.fullmatch(path)}
    if not matches:
      raise LoraTargetError(f'LoRA target {pattern!r} matches no adaptable layer (Dense, DenseGeneral or Conv) '
                            f'of the model; its layers are: {", ".join(sorted(layers))}.')
    chosen |= matches
  return sorted(chosen)


def init(rng: Array, layers: dict[str, LayerSpec], config: LoraConfig) -> Params:
  """Fresh adapters for the layers of ``layers`` chosen by ``config.targets``: ``A`` Kaiming-uniform, ``B`` zero.

  Returns:
    ``{..path..: {'lora_a': [*in, r], 'lora_b': [r, *out]}}`` float32, nested like the parameters.
  """
  a_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')  # PyTorch's kaiming_uniform(sqrt(5))
  flat = {}
  for i, path in enumerate(select(layers, config.patterns())):
    a_shape, b_shape = layers[path].adapter_shapes(config.rank)
    a = a_init(jax.random.fold_in(rng, i), a_shape, jnp.float32)  # fan-in: every input axis of the kernel
    flat[tuple(path.split('/'))] = {'lora_a': a, 'lora_b': jnp.zeros(b_shape, jnp.float32)}
  return flax.traverse_util.unflatten_dict(flat)


def adapter_paths(adapters: Params) -> dict[str, tuple[Array, Array]]:
  """``{'a/b/c': (A, B)}`` of a nested adapter tree."""
  flat = flax.traverse_util.flatten_dict(adapters)
  paths = {path[:-1] for path in flat}
  return {'/'.join(p): (flat[p + ('lora_a',)], flat[p + ('lora_b',)]) for p in sorted(paths)}


def check(adapters: Params, layers: dict[str, LayerSpec]) -> None:
  """Raises :class:`LoraTargetError` if an adapter names a layer the model lacks or has the wrong shape."""
  for path, (a, b) in adapter_paths(adapters).items():
    if path not in layers:
      raise LoraTargetError(f'The adapter for {path!r} names no adaptable layer of the model; its layers are: '
                            f'{", ".join(sorted(layers))}.')
    rank = a.shape[-1]
    if (tuple(a.shape), tuple(b.shape)) != layers[path].adapter_shapes(rank):
      raise LoraTargetError(f'The adapter for {path!r} has A {tuple(a.shape)}, B {tuple(b.shape)}; the layer '
                            f'(kernel {layers[path].kernel_shape}) needs {layers[path].adapter_shapes(rank)}.')


def delta(a: Array, b: Array) -> Array:
  """``tensordot(A, B)``: the kernel-shaped update [*in, *out] of one adapter (without the scale)."""
  return jnp.tensordot(a, b, axes=1)


def _add_to_kernels(params: Params, adapters: Sequence[tuple[Params, float]]) -> Params:
  flat = flax.traverse_util.flatten_dict(params)
  for tree, scale in adapters:
    for path, (a, b) in adapter_paths(tree).items():
      key = tuple(path.split('/')) + ('kernel',)
      if key not in flat:
        raise LoraTargetError(f'The adapter for {path!r} has no kernel {"/".join(key)} in the parameters.')
      flat[key] = flat[key] + (scale * delta(a, b)).astype(flat[key].dtype)
  return flax.traverse_util.unflatten_dict(flat)


def merge(params: Params, adapters: Params, *, scale: float) -> Params:
  """The parameters with ``W + scale tensordot(A, B)`` in every adapted kernel (``scale = alpha / rank``,
  times a mixing weight for several adapters)."""
  return _add_to_kernels(params, [(adapters, scale)])


def unmerge(params: Params, adapters: Params, *, scale: float) -> Params:
  """Inverse of :func:`merge`: ``W - scale tensordot(A, B)`` (exact up to float32 round-off)."""
  return _add_to_kernels(params, [(adapters, -scale)])


def _dropout_rng(rng: Array, path: str) -> Array:
  return jax.random.fold_in(rng, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def _low_rank(module: nn.Module, x: Array, a: Array, b: Array) -> Array:
  """``B A x`` through the layer's own contraction (its kernel size, strides and padding for a Conv)."""
  down = module.clone(parent=None, name=None, features=a.shape[-1], use_bias=False)
  h = down.apply({'params': {'kernel': a}}, x)  # [..., r]
  up = nn.DenseGeneral(module.features, axis=-1, use_bias=False, dtype=module.dtype, param_dtype=jnp.float32)
  return up.apply({'params': {'kernel': b}}, h)


@contextlib.contextmanager
def adapted(adapters: Sequence[tuple[Params, float]], *, dropout: float = 0.0,
            rng: Array | None = None) -> Iterator[None]:
  """Within the context, each layer with an adapter computes ``W x + sum_i s_i B_i A_i dropout(x)``.

  Args:
    adapters: ``(adapter tree, scale)`` pairs; ``scale`` is ``alpha / rank`` times an optional mixing weight.
    dropout: rate on the adapters' input; active only when ``rng`` is given (training).
    rng: dropout key; each layer folds in a hash of its path.
  """
  by_path: dict[str, list[tuple[Array, Array, float]]] = {}
  for tree, scale in adapters:
    for path, (a, b) in adapter_paths(tree).items():
      by_path.setdefault(path, []).append((a, b, scale))

  def intercept(next_fun: Callable, args, kwargs, context):
    module = context.module
    path = '/'.join(module.path)
    if context.method_name != '__call__' or not isinstance(module, ADAPTABLE) or path not in by_path:
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    x = args[0]
    if dropout and rng is not None:
      keep = jax.random.bernoulli(_dropout_rng(rng, path), 1.0 - dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - dropout), jnp.zeros_like(x))
    for a, b, scale in by_path[path]:
      y = y + scale * _low_rank(module, x, a, b).astype(y.dtype)
    return y

  with nn.intercept_methods(intercept):
    yield


def adapt_apply_fn(apply_fn: Callable, config: LoraConfig) -> Callable:
  """``apply_fn(params, x, t, cond, *, train, rngs)`` of a model -> the same on ``{'base': params, 'lora':
  adapters}``, with LoRA dropout from ``rngs['dropout']`` when training."""

  def adapted_apply_fn(params, x, t, cond, *, train, rngs):
    rng = (rngs or {}).get('dropout') if train else None
    with adapted([(params['lora'], config.scale)], dropout=config.dropout, rng=rng):
      return apply_fn(params['base'], x, t, cond, train=train, rngs=rngs)

  return adapted_apply_fn


def num_params(tree: Params) -> int:
  """Number of scalars in a parameter (or adapter) tree."""
  return sum(x.size for x in jax.tree.leaves(tree))
