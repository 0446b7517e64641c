"""Fine-tuning a trained model: the base's EMA weights read (never written), what trains frozen through optax,
LoRA adapters saved on their own and loaded onto a base, several at once with weights.

Modes (``finetune.mode``):

* ``'full'``: every base parameter trains (a new run started from the base's weights);
* ``'subtrees'``: only parameters whose ``'/'``-joined path fully matches one of ``finetune.trainable``;
* ``'lora'``: the parameters are ``{'base': ..., 'lora': adapters}`` (:mod:`diffax.models.lora`) and only the
  adapters train.

Freezing is an ``optax.multi_transform`` of the configured optimizer over the trainable parameters and
``optax.set_to_zero`` over the rest: the frozen parameters get no optimizer state (Adam's moments exist only for
what trains) and exact-zero updates, and XLA drops their unused weight gradients.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import numpy as np
import optax
from etils import epath

from diffax.models import lora
from diffax.trainer import restore
from diffax.trainer.config import ConfigError

Params = Any
MODES = ('full', 'subtrees', 'lora')


def trainable_labels(params: Params, *, mode: str, trainable: Sequence[str] = ()) -> Params:
  """``'trainable'`` / ``'frozen'`` for every leaf of ``params`` (the labels of :func:`freeze`).

  A ``'subtrees'`` pattern selects every leaf below a sub-tree whose ``'/'``-joined path it fully matches
  (``'label_embed'`` trains ``label_embed/table/embedding``; ``'.*attn.*'`` every attention parameter). A pattern
  that matches nothing is a :class:`ConfigError` listing the top-level sub-trees.
  """
  if mode == 'full':
    return jax.tree.map(lambda _: 'trainable', params)
  if mode == 'lora':
    return {'base': jax.tree.map(lambda _: 'frozen', params['base']),
            'lora': jax.tree.map(lambda _: 'trainable', params['lora'])}
  if mode != 'subtrees':
    raise ConfigError('finetune.mode', f'{mode!r} is not one of {MODES}.')
  if not trainable:
    raise ConfigError('finetune.trainable', "mode 'subtrees' needs patterns of the parameters to train.")
  flat = flax.traverse_util.flatten_dict(params)
  prefixes = {key: ['/'.join(key[:i]) for i in range(1, len(key) + 1)] for key in flat}
  labels = {key: 'frozen' for key in flat}
  for pattern in trainable:
    hits = [key for key, paths in prefixes.items() if any(re.fullmatch(pattern, path) for path in paths)]
    if not hits:
      raise ConfigError('finetune.trainable', f'{pattern!r} matches no parameter path or sub-tree; the top-level '
                        f'sub-trees are {sorted({k[0] for k in flat})} (paths such as '
                        f'{"/".join(next(iter(flat)))!r}).')
    labels.update({key: 'trainable' for key in hits})
  return flax.traverse_util.unflatten_dict(labels)


def freeze(optimizer: optax.GradientTransformation,
           labels: Params | Callable[[Params], Params]) -> optax.GradientTransformation:
  """``optimizer`` on the leaves labelled ``'trainable'``, zero updates (and no state) for ``'frozen'``.

  The state is created from unboxed parameters (its moments carry no logical axis names, so they are
  replicated): optax's masking would otherwise leave empty ``MaskedNode`` s inside the Linen boxes.
  """
  frozen = optax.multi_transform({'trainable': optimizer, 'frozen': optax.set_to_zero()}, labels)
  return optax.GradientTransformation(lambda params: frozen.init(nn.meta.unbox(params)), frozen.update)


def save_adapters(path: str, adapters: Params, config: lora.LoraConfig) -> None:
  """Writes the adapters alone: ``path`` (.npz of ``'<layer path>/lora_a'`` arrays) and ``path.json``."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  flat = {'/'.join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(adapters).items()}
  with path.open('wb') as f:
    np.savez(f, **flat)
  epath.Path(f'{path}.json').write_text(json.dumps({'rank': config.rank, 'alpha': config.alpha,
                                                    'dropout': config.dropout, 'targets': list(config.targets)}))


def load_adapters(path: str) -> tuple[Params, lora.LoraConfig]:
  """``(adapters, config)`` written by :func:`save_adapters`."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'No adapter file {path} (written by finetune.save_adapters at the end of a LoRA run).')
  with path.open('rb') as f:
    arrays = dict(np.load(f))
  meta = json.loads(epath.Path(f'{path}.json').read_text())
  meta['targets'] = tuple(meta['targets'])
  adapters = flax.traverse_util.unflatten_dict({tuple(k.split('/')): v for k, v in arrays.items()})
  return adapters, lora.LoraConfig(**meta)


def merge_adapters(params: Params, weighted: Sequence[tuple[str, float]]) -> Params:
  """``params`` with the adapter files of ``weighted`` ``(path, weight)`` merged in, each at
  ``weight * alpha / rank``."""
  for path, weight in weighted:
    adapters, config = load_adapters(path)
    params = lora.merge(params, adapters, scale=weight * config.scale)
  return params


class FineTuning:
  """What a fine-tuning run changes in an experiment: the initial parameters (the base's EMA weights, plus fresh
  adapters for LoRA), the frozen optimizer, and the apply / generate functions on the run's parameter tree.

  Args:
    model: the backbone (as the base run built it).
    example_inputs: ``(x, t, cond)`` of batch 1 for tracing the model.
    mode: one of :data:`MODES`.
    base_workdir: the trained base run's workdir (read only).
    base_step: its checkpoint step (-1 = newest).
    trainable: (``'subtrees'``) patterns of the parameter paths that train.
    lora_config: (``'lora'``) rank, alpha, dropout and targets.
  """

  def __init__(self, model, example_inputs: tuple[Any, ...], *, mode: str, base_workdir: str, base_step: int = -1,
               trainable: Sequence[str] = (), lora_config: lora.LoraConfig | None = None):
    if mode not in MODES:
      raise ConfigError('finetune.mode', f'{mode!r} is not one of {MODES} (or \'\' for no fine-tuning).')
    if not base_workdir:
      raise ConfigError('finetune.base_workdir', 'fine-tuning needs the workdir of a trained base run.')
    self.mode, self.base_workdir, self.base_step, self.trainable = mode, base_workdir, base_step, tuple(trainable)
    self.model, self.example_inputs = model, example_inputs
    self.abstract_base = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), *example_inputs,
                                                                         train=False)['params']))
    self.lora_config = lora_config or lora.LoraConfig()
    if self.mode == 'lora':
      self.layers = lora.layers_of(model, self.abstract_base, *example_inputs, train=False)
      try:
        lora.select(self.layers, self.lora_config.patterns())
      except lora.LoraTargetError as error:
        raise ConfigError('finetune.lora_targets', str(error)) from error
    elif self.mode == 'subtrees':
      trainable_labels(self.abstract_base, mode=mode, trainable=self.trainable)  # patterns checked at start

  def init_params(self, rng, base_init: Callable[[Any], Params]) -> Params:
    """The run's parameter tree: the base's (overwritten by :meth:`start`), with adapters for LoRA."""
    if self.mode != 'lora':
      return base_init(rng)
    rng_base, rng_lora = jax.random.split(rng)
    return {'base': base_init(rng_base), 'lora': lora.init(rng_lora, self.layers, self.lora_config)}

  def apply_fn(self, apply_fn: Callable) -> Callable:
    return lora.adapt_apply_fn(apply_fn, self.lora_config) if self.mode == 'lora' else apply_fn

  def freeze(self, optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    return freeze(optimizer, lambda params: trainable_labels(params, mode=self.mode, trainable=self.trainable))

  def generate(self, generate: Callable) -> Callable:
    """``generate`` on the run's parameters: LoRA adapters are merged into the base before sampling."""
    if self.mode != 'lora':
      return generate
    scale = self.lora_config.scale
    return lambda params, *args: generate(lora.merge(params['base'], params['lora'], scale=scale), *args)

  def start(self, state):
    """A fresh state whose base parameters (and their EMA copies) are the base run's EMA weights."""
    base = restore.restore_ema_params(self.base_workdir, self.abstract_base, step=self.base_step,
                                      key='finetune.base_workdir')

    def place(params):
      target = params['base'] if self.mode == 'lora' else params
      restored = jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding), base, target)
      return {**params, 'base': restored} if self.mode == 'lora' else restored

    return state.replace(params=place(state.params), ema_params=tuple(place(e) for e in state.ema_params))

