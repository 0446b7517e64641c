"""Fine-tuning a trained model: the base's EMA weights read (never written), what trains frozen through optax,
LoRA adapters saved on their own and loaded onto a base, several at once with weights.

Modes (``finetune.mode``):

* ``'full'``: every base parameter trains (a new run started from the base's weights);
* ``'subtrees'``: only parameters whose ``'/'``-joined path fully matches one of ``finetune.trainable``;
* ``'lora'``: the parameters are ``{'base': ..., 'lora': adapters}`` (:mod:`diffax.models.lora`) and only the
  adapters train;
* ``'controlnet'``: ``{'base': ..., 'control': ControlNet}`` and only the ControlNet trains
  (:mod:`diffax.trainer.control`).

DreamBooth (``finetune.dreambooth``, :mod:`diffax.trainer.dreambooth`) runs in ``'full'`` or ``'subtrees'`` mode
with one more class than the base: the new label's embedding starts from its class's row.

Freezing is an ``optax.multi_transform`` of the configured optimizer over the trainable parameters and
``optax.set_to_zero`` over the rest: the frozen parameters get no optimizer state (Adam's moments exist only for
what trains) and exact-zero updates, and XLA drops their unused weight gradients.
"""

from __future__ import annotations

import copy
import functools
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
from diffax.trainer import components, dreambooth as dreambooth_lib, restore
from diffax.trainer.config import ConfigError

Params = Any
MODES = ('full', 'subtrees', 'lora', 'controlnet')


def trainable_labels(params: Params, *, mode: str, trainable: Sequence[str] = ()) -> Params:
  """``'trainable'`` / ``'frozen'`` for every leaf of ``params`` (the labels of :func:`freeze`).

  A ``'subtrees'`` pattern selects every leaf below a sub-tree whose ``'/'``-joined path it fully matches
  (``'label_embed'`` trains ``label_embed/table/embedding``; ``'.*attn.*'`` every attention parameter). A pattern
  that matches nothing is a :class:`ConfigError` listing the top-level sub-trees.
  """
  if mode == 'full':
    return jax.tree.map(lambda _: 'trainable', params)
  if mode in ('lora', 'controlnet'):  # the base is frozen, the adapters / the ControlNet train
    return {key: jax.tree.map(lambda _, k=key: 'frozen' if k == 'base' else 'trainable', tree)
            for key, tree in params.items()}
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


def parse_adapters(entries: Sequence[str]) -> list[tuple[str, float]]:
  """``finetune.adapters`` entries ``'path:weight'`` (the weight defaults to 1) -> ``(path, weight)``."""
  weighted = []
  for entry in entries:
    path, sep, weight = entry.rpartition(':')
    try:
      weighted.append((path, float(weight)) if sep else (entry, 1.0))
    except ValueError:
      weighted.append((entry, 1.0))  # a ':' inside the path (gs://...)
    if not epath.Path(weighted[-1][0]).exists():
      raise ConfigError('finetune.adapters', f'no adapter file {weighted[-1][0]!r} (a LoRA run writes '
                        'WORKDIR/adapters/lora.npz); entries are \'path.npz:weight\'.')
  return weighted


def _abstract_params(model, example_inputs) -> Params:
  return jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), *example_inputs,
                                                         train=False)['params']))


class Tuning:
  """The hooks through which fine-tuning changes a run (:class:`diffax.trainer.experiment.Experiment` calls
  each once). This base is a run trained from scratch: every hook is the identity, except that LoRA files
  (``finetune.adapters``) are merged with their weights into the model that is sampled and evaluated.

  Args:
    model: the backbone.
    example_inputs: ``(x, t, cond)`` of batch 1 for tracing the model.
    adapters: ``(path, weight)`` adapter files to merge at sampling; each is checked against the model's layers.
  """

  def __init__(self, model, example_inputs: tuple[Any, ...], *, adapters: Sequence[tuple[str, float]] = ()):
    self.model, self.example_inputs = model, example_inputs
    self.adapters = tuple(adapters)
    if self.adapters:
      layers = lora.layers_of(model, self.abstract_base, *example_inputs, train=False)
      for path, _ in self.adapters:
        try:
          lora.check(load_adapters(path)[0], layers)
        except lora.LoraTargetError as error:
          raise ConfigError('finetune.adapters', f'{path}: {error}') from error

  @functools.cached_property
  def abstract_base(self) -> Params:
    """The backbone's unboxed parameter shapes."""
    return _abstract_params(self.model, self.example_inputs)

  def init_params(self, rng, base_init: Callable[[Any], Params]) -> Params:
    """The run's (boxed) parameter tree from ``base_init(rng)``, the backbone's."""
    return base_init(rng)

  def apply_fn(self, apply_fn: Callable) -> Callable:
    """The model the loss trains, on the run's parameter tree."""
    return apply_fn

  def loss_fn(self, loss_fn: Callable) -> Callable:
    """The run's loss from the diffusion loss of :meth:`apply_fn`."""
    return loss_fn

  def freeze(self, optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    return optimizer

  def backbone_params(self, params: Params) -> Params:
    """The backbone parameters the sampler runs: the run's, with ``finetune.adapters`` merged in."""
    return merge_adapters(params, self.adapters)

  def generate(self, generate: Callable) -> Callable:
    """``generate(params, rng, labels, shape)`` on the run's parameters."""
    return (lambda params, *args: generate(self.backbone_params(params), *args)) if self.adapters else generate

  def start(self, state):
    """The fresh state of step 0 (a fine-tuning run puts the base's weights in)."""
    return state

  def model_batch(self, batch: dict) -> dict:
    """Host batch ``{'x', 'cond'}`` -> what the loss sees."""
    return batch

  def abstract_batch(self, batch: dict) -> dict:
    """The shapes of :meth:`model_batch` from those of ``{'x', 'cond'}``."""
    return batch

  def train_source(self, exp):
    """The source the training batches are drawn from."""
    return exp.source

  def save(self, exp, step: int, state) -> None:
    """Called at every checkpoint: writes what the run saves on its own (LoRA adapters)."""


class FineTuning(Tuning):
  """What a fine-tuning run changes in an experiment: the initial parameters (the base's EMA weights, plus fresh
  adapters for LoRA), the frozen optimizer, and the apply / generate functions on the run's parameter tree.

  Args:
    model: the backbone (as the base run built it, or with one more class for DreamBooth).
    example_inputs: ``(x, t, cond)`` of batch 1 for tracing the model.
    mode: ``'full'``, ``'subtrees'`` or ``'lora'``.
    base_workdir: the trained base run's workdir (read only).
    base_step: its checkpoint step (-1 = newest).
    trainable: (``'subtrees'``) patterns of the parameter paths that train.
    lora_config: (``'lora'``) rank, alpha, dropout and targets.
    adapters: see :class:`Tuning`.
    dreambooth: personalisation with prior preservation (``'full'`` / ``'subtrees'``); ``base_model`` is then
      the base's architecture (one class less).
  """

  def __init__(self, model, example_inputs: tuple[Any, ...], *, mode: str, base_workdir: str, base_step: int = -1,
               trainable: Sequence[str] = (), lora_config: lora.LoraConfig | None = None,
               adapters: Sequence[tuple[str, float]] = (), dreambooth: dreambooth_lib.DreamBooth | None = None,
               base_model=None):
    if mode not in MODES[:3]:
      raise ConfigError('finetune.mode', f'{mode!r} is not one of {MODES} (or \'\' for no fine-tuning).')
    if not base_workdir:
      raise ConfigError('finetune.base_workdir', 'fine-tuning needs the workdir of a trained base run.')
    super().__init__(model, example_inputs, adapters=adapters)
    self.mode, self.base_workdir, self.base_step, self.trainable = mode, base_workdir, base_step, tuple(trainable)
    self.dreambooth = dreambooth
    self.abstract_restored = _abstract_params(base_model, example_inputs) if base_model else self.abstract_base
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

  def loss_fn(self, loss_fn: Callable) -> Callable:
    if self.dreambooth is None:
      return loss_fn
    return dreambooth_lib.prior_preservation_loss(loss_fn, instance_label=self.dreambooth.instance_label,
                                                  prior_weight=self.dreambooth.prior_weight)

  def freeze(self, optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    return freeze(optimizer, lambda params: trainable_labels(params, mode=self.mode, trainable=self.trainable))

  def backbone_params(self, params: Params) -> Params:
    """LoRA adapters are merged into the base before sampling (then ``finetune.adapters``, if any)."""
    if self.mode == 'lora':
      params = lora.merge(params['base'], params['lora'], scale=self.lora_config.scale)
    return merge_adapters(params, self.adapters)

  def generate(self, generate: Callable) -> Callable:
    return lambda params, *args: generate(self.backbone_params(params), *args)

  def restore_base(self) -> Params:
    """The base run's EMA weights (numpy) in this run's backbone shapes; a missing or other base is a
    :class:`ConfigError` naming ``finetune.base_workdir``."""
    try:
      base = restore.restore_ema_params(self.base_workdir, self.abstract_restored, step=self.base_step,
                                        key='finetune.base_workdir')
    except restore.RestoreError as error:
      raise ConfigError('finetune.base_workdir', str(error)) from error
    if self.dreambooth is not None:
      base = dreambooth_lib.add_label(base, self.abstract_base, class_label=self.dreambooth.class_label)
    return base

  def start(self, state):
    """A fresh state whose base parameters (and their EMA copies) are the base run's EMA weights."""
    base = self.restore_base()

    def place(params):
      target = params['base'] if self.mode == 'lora' else params
      restored = jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding), base, target)
      return {**params, 'base': restored} if self.mode == 'lora' else restored

    return state.replace(params=place(state.params), ema_params=tuple(place(e) for e in state.ema_params))

  def train_source(self, exp):
    if self.dreambooth is None:
      return exp.source
    return dreambooth_lib.paired_source(exp, self.dreambooth, self.restore_base)

  def save(self, exp, step: int, state) -> None:
    """LoRA: the sampled (EMA) adapters alone in ``workdir/adapters/lora.npz`` and ``lora_step_<step>.npz``."""
    if self.mode != 'lora':
      return
    adapters = jax.device_get(exp.sample_params(state)['lora'])
    if jax.process_index() == 0:
      for name in ('lora.npz', f'lora_step_{step:08d}.npz'):
        save_adapters(str(exp.workdir / 'adapters' / name), adapters, self.lora_config)


def from_config(config, exp) -> Tuning:
  """The run's :class:`Tuning` from ``config.finetune`` (checked here, with the keys named) and the experiment's
  model, schedule, shapes and workdir."""
  f = config.finetune
  adapters = parse_adapters(f.adapters)
  inputs = exp.example_inputs()
  if f.mode not in ('', *MODES):
    raise ConfigError('finetune.mode', f'{f.mode!r} is not one of {("", *MODES)}.')
  if not f.mode:
    if f.base_workdir or f.dreambooth.class_label >= 0:
      raise ConfigError('finetune.mode', f'finetune.base_workdir or finetune.dreambooth is set but finetune.mode is '
                        f'\'\' (train from scratch); choose one of {MODES}.')
    return Tuning(exp.model, inputs, adapters=adapters)
  if not f.base_workdir or not restore.checkpoint_steps(f.base_workdir):
    raise ConfigError('finetune.base_workdir', f'{f.base_workdir!r} holds no checkpoints (DIR/checkpoints/<step>); '
                      'train the base first, e.g. python -m diffax.main --config configs/digits.py --workdir DIR.')
  if epath.Path(f.base_workdir).resolve() == epath.Path(exp.workdir).resolve():
    raise ConfigError('finetune.base_workdir', 'is this run\'s own workdir; a fine-tuning run writes to a new '
                      'workdir and only reads the base.')
  if f.mode == 'controlnet':
    from diffax.trainer import control  # pylint: disable=g-import-not-at-top  (control builds on this module)
    if adapters:
      raise ConfigError('finetune.adapters', 'merge LoRA adapters into a base, not into a ControlNet run.')
    return control.ControlTuning(config, exp)
  dreambooth, base_model = None, None
  if f.dreambooth.class_label >= 0:
    dreambooth = dreambooth_lib.from_config(config)
    if f.mode == 'lora':
      raise ConfigError('finetune.mode', "DreamBooth trains the new label's embedding: use 'full' or 'subtrees' "
                        "(with 'label_embed' in finetune.trainable).")
    base_config = copy.deepcopy(config)
    base_config.data.num_classes -= 1
    base_model = components.build_model(base_config)
  for key, ok in (('lora_rank', f.lora_rank >= 1), ('lora_dropout', 0 <= f.lora_dropout < 1),
                  ('lora_targets', bool(f.lora_targets))):
    if not ok:
      raise ConfigError(f'finetune.{key}', f'{f[key]!r} is out of range (rank >= 1, dropout in [0, 1), one or more '
                        'targets).')
  lora_config = lora.LoraConfig(rank=f.lora_rank, alpha=f.lora_alpha, dropout=f.lora_dropout,
                                targets=tuple(f.lora_targets))
  return FineTuning(exp.model, inputs, mode=f.mode, base_workdir=f.base_workdir, base_step=f.base_step,
                    trainable=tuple(f.trainable), lora_config=lora_config, adapters=adapters, dreambooth=dreambooth,
                    base_model=base_model)
