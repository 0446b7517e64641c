"""ControlNet in the trainer (``finetune.mode='controlnet'``; Zhang et al. 2023): a trained base frozen, a
ControlNet (:mod:`diffax.models.controlnet`) started from its encoder and trained on control images computed from
every training image (:mod:`diffax.data.control`: Sobel edges or a low-resolution version).

The parameters are ``{'base': frozen backbone, 'control': ControlNet}``. Each host batch gains ``'control'``
[b, H, W, C] in [0, 1] (computed on the host from the images the batch holds, after flips); the control image
reaches the model beside the parameters, so the diffusion loss and its label dropout are unchanged (labels are
dropped for guidance, the control never is: ControlNet keeps its condition while prompts are dropped, sec. 3.4).

Sampling uses ``sample.control`` (an .npy / .png file of [N, H, W, C] or [H, W, C] control images; sample ``i``
follows control ``i mod N``) or, by default, the control images of the test split arranged so that sample ``i``
gets one of class ``i mod num_classes`` (the grid's labels), at conditioning scale ``sample.control_scale``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffax.data import control as control_data
from diffax.data.sources import get_source
from diffax.models import controlnet as controlnet_lib
from diffax.trainer import components, finetune, restore
from diffax.trainer.config import ConfigError

Params = Any


class _Controlled:
  """The controlled model seen as a Linen module by the sampler: ``apply({'params': {'base', 'control'}}, x, t,
  cond)`` with the control images [B, H, W, C] of the batch (a guided 2B batch reuses them)."""

  def __init__(self, base, controlnet, control: jax.Array, scale: float):
    self.base, self.controlnet, self.control, self.scale = base, controlnet, control, scale

  def apply(self, variables, x, t, cond, *, train: bool = False):
    p = variables['params']
    control = self.control[jnp.arange(x.shape[0]) % self.control.shape[0]]
    return controlnet_lib.controlled_apply(self.base, self.controlnet, p['base'], p['control'], x, t, cond, control,
                                           scale=self.scale, train=train)


def default_controls(config, n: int) -> np.ndarray:
  """Control images of ``n`` test-split images, image ``i`` of class ``i mod num_classes``: [n, H, W, C]."""
  c = config.data
  source = get_source(c.name, split='test', data_dir=c.data_dir or None, style=c.style, resize=c.resize,
                      image_size=c.image_size)
  num_classes = max(c.num_classes, 1)
  by_class: dict[int, list[int]] = {}
  for i in range(len(source)):
    by_class.setdefault(int(source[i]['label']) if c.num_classes else 0, []).append(i)
  picks = [by_class[i % num_classes][(i // num_classes) % len(by_class[i % num_classes])] for i in range(n)]
  x = np.stack([source[i]['image'] for i in picks]).astype(np.float32) / 127.5 - 1.0
  f = config.finetune.control
  return control_data.control_image(x, f.kind, factor=f.factor).astype(np.float32)


def load_controls(path: str, image_shape: tuple[int, ...]) -> np.ndarray:
  """``sample.control`` read and checked: [N, H, W, C] with (H, W, C) the data's, values in [0, 1]."""
  try:
    controls = control_data.read_control_file(path)
  except FileNotFoundError as error:
    raise ConfigError('sample.control', str(error)) from error
  if tuple(controls.shape[1:]) != tuple(image_shape):
    raise ConfigError('sample.control', f'{path} holds control images of shape {controls.shape}; the model needs '
                      f'[N, {", ".join(map(str, image_shape))}] (or one [{", ".join(map(str, image_shape))}] '
                      'image) in [0, 1].')
  if controls.min() < 0 or controls.max() > 1:
    raise ConfigError('sample.control', f'{path} holds values in [{controls.min():.3g}, {controls.max():.3g}]; '
                      'control images lie in [0, 1] (or uint8).')
  return controls


class ControlTuning(finetune.Tuning):
  """The hooks of a ControlNet run (module docstring) on the experiment's backbone, schedule and shapes."""

  def __init__(self, config, exp):
    super().__init__(exp.model, exp.example_inputs())
    f = config.finetune
    if f.control.kind not in control_data.KINDS:
      raise ConfigError('finetune.control.kind', f'{f.control.kind!r} is not one of {control_data.KINDS}.')
    h, w = exp.image_shape[:2]
    if f.control.kind == 'lowres' and (f.control.factor < 1 or h % f.control.factor or w % f.control.factor):
      raise ConfigError('finetune.control.factor', f'{f.control.factor} must divide the image size {h} x {w}.')
    if len(exp.image_shape) != 3:
      raise ConfigError('finetune.mode', f"'controlnet' controls images [H, W, C], not {exp.image_shape}.")
    self.config, self.schedule, self.image_shape = config, exp.schedule, exp.image_shape
    self.base_workdir, self.base_step = f.base_workdir, f.base_step
    hint = tuple(f.control.hint_channels)
    self.controlnet = controlnet_lib.ControlNet(exp.model, hint_channels=hint, hint_strides=(1,) * len(hint))
    self.controls = (load_controls(config.sample.control, exp.image_shape) if config.sample.control
                     else default_controls(config, config.sample.num_samples))

  def control_of(self, x: Any, xp=np) -> Any:
    """The configured control image of images ``x`` [..., H, W, C] in [-1, 1] (numpy or ``xp=jnp``)."""
    c = self.config.finetune.control
    return control_data.control_image(x, c.kind, factor=c.factor, xp=xp)

  def init_params(self, rng, base_init):
    rng_base, rng_control = jax.random.split(rng)
    x, t, cond = self.example_inputs
    control = self.controlnet.init(rng_control, x, t, cond, jnp.zeros_like(x), train=False)['params']
    return {'base': base_init(rng_base), 'control': control}

  def apply_fn(self, apply_fn):
    del apply_fn  # the controlled model replaces the backbone's

    def controlled(params, x, t, cond, *, train, rngs):
      p = params['params']
      return controlnet_lib.controlled_apply(self.model, self.controlnet, p['base'], p['control'], x, t, cond,
                                             params['control'], train=train, rngs=rngs)

    return controlled

  def loss_fn(self, loss_fn):
    return lambda params, batch, rng: loss_fn({'params': params, 'control': batch['control']}, batch, rng)

  def freeze(self, optimizer):
    return finetune.freeze(optimizer, lambda params: finetune.trainable_labels(params, mode='controlnet'))

  def generate(self, generate):
    del generate  # rebuilt on the controlled model
    scale = self.config.sample.control_scale

    def controlled_generate(params, rng, labels, shape):
      control = jnp.asarray(self.controls)[jnp.arange(shape[0]) % len(self.controls)]
      model = _Controlled(self.model, self.controlnet, control, scale)
      return components.build_generate(self.config, model, self.schedule, channels=shape[-1])(params, rng, labels,
                                                                                             shape)

    return controlled_generate

  def start(self, state):
    """The base's EMA weights in ``'base'`` and in the ControlNet's copy of the encoder (sec. 3.2)."""
    try:
      base = restore.restore_ema_params(self.base_workdir, self.abstract_base, step=self.base_step,
                                        key='finetune.base_workdir')
    except restore.RestoreError as error:
      raise ConfigError('finetune.base_workdir', str(error)) from error

    def place(params):
      host = {'base': base, 'control': controlnet_lib.init_from_base(jax.device_get(params['control']), base)}
      return jax.tree.map(lambda new, old: jax.device_put(np.asarray(new).astype(old.dtype), old.sharding), host,
                          params)

    return state.replace(params=place(state.params), ema_params=tuple(place(e) for e in state.ema_params))

  def model_batch(self, batch):
    return {**batch, 'control': self.control_of(batch['x']).astype(np.float32)}

  def abstract_batch(self, batch):
    return {**batch, 'control': batch['x']}
