"""Config -> library objects: the one place where a ConfigDict meets schedules, models, losses and samplers.

Everything past this boundary takes typed arguments. Keyword sections of the config (``model.overrides``,
``diffusion.schedule_kwargs``, ``sample.kwargs``) are checked here, so a wrong keyword fails at start with
the key named (:class:`diffax.trainer.config.ConfigError`).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import inspect
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffax import models
from diffax.trainer.config import ConfigError
from diffax.diffusion import losses, parameterization, samplers, schedules

Array = jax.Array


def _kwargs(section: ml_collections.ConfigDict) -> dict[str, Any]:
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in section.to_dict().items()}


def build_schedule(config: ml_collections.ConfigDict) -> schedules.Schedule:
  kwargs = _kwargs(config.diffusion.schedule_kwargs)
  try:
    return schedules.get_schedule(config.diffusion.schedule, **kwargs)
  except TypeError as error:
    raise ConfigError('diffusion.schedule_kwargs', f'{error} (schedule {config.diffusion.schedule!r} takes '
                      f'{list(inspect.signature(schedules.SCHEDULES[config.diffusion.schedule]).parameters)}).')


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The backbone with the data's classes, the compute dtype, remat, and learned variance for the hybrid loss."""
  model_cls = models.MODELS[config.model.name]
  allowed = {f.name for f in dataclasses.fields(model_cls)} - {'parent', 'name'}
  overrides = _kwargs(config.model.overrides)
  for key in overrides:
    if key not in allowed:
      raise ConfigError(f'model.overrides.{key}', f'{config.model.name} has no field {key!r}; its fields are '
                        f'{sorted(allowed)}.')
  learn_sigma = config.diffusion.loss == 'hybrid'
  if overrides.get('learn_sigma', learn_sigma) != learn_sigma:
    raise ConfigError('model.overrides.learn_sigma', "learned variance goes with diffusion.loss='hybrid' only.")
  fields = {'dtype': jnp.dtype(config.model.dtype), 'remat': config.model.remat,
            'num_classes': config.data.num_classes or None, 'learn_sigma': learn_sigma, **overrides}
  try:
    return models.get_model(config.model.name, preset=config.model.preset or None, **fields)
  except TypeError as error:
    raise ConfigError('model.overrides', str(error))


def apply_fn_of(model: nn.Module) -> losses.ApplyFn:
  """The ``apply_fn(params, x, t, cond, *, train, rngs)`` that losses take."""

  def apply_fn(params, x, t, cond, *, train, rngs):
    return model.apply({'params': params}, x, t, cond, train=train, rngs=rngs)

  return apply_fn


def build_loss(config: ml_collections.ConfigDict, apply_fn: losses.ApplyFn,
               schedule: schedules.Schedule) -> losses.LossFn:
  d = config.diffusion
  cond_dropout = None
  if config.data.num_classes and d.p_uncond > 0:
    cond_dropout = losses.CondDropout(p_uncond=d.p_uncond, null_label=config.data.num_classes)
  kwargs = dict(schedule=schedule, prediction=d.prediction, sigma_data=d.sigma_data, cond_dropout=cond_dropout)
  if d.loss != 'hybrid':
    kwargs['weighting'] = losses.Weighting(d.weighting, gamma=d.weighting_gamma or None)
  if d.loss == 'edm' and isinstance(schedule, schedules.EDM):
    kwargs['sigma_data'] = None  # the schedule's own sigma_data
  return losses.get_loss(d.loss, apply_fn, **kwargs)


def ema_index(config: ml_collections.ConfigDict) -> int:
  """Which of ``state.ema_params`` the sampler uses (``sample.ema_decay = 0`` picks the first)."""
  decays = tuple(config.train.ema_decays)
  return decays.index(config.sample.ema_decay) if config.sample.ema_decay else 0


def build_sample_fn(config: ml_collections.ConfigDict, model: nn.Module, schedule: schedules.Schedule, *,
                    channels: int) -> Callable[[Any, Array, Array | None, tuple[int, ...]], samplers.SampleOutput]:
  """``sample_fn(params, rng, labels [B] | None, shape) -> SampleOutput`` with the configured sampler.

  Learned-variance channels are dropped before guidance and sampling (the samplers use the mean prediction).
  With ``sample.guidance_scale != 1`` the model is guided (Ho & Salimans 2022) against the null label.
  """
  s = config.sample
  sampler = samplers.get_sampler(s.sampler)
  kwargs = _kwargs(s.kwargs)
  parameters = inspect.signature(sampler).parameters
  if 'num_steps' in parameters:
    kwargs.setdefault('num_steps', s.num_steps)
  if s.clip_x0:
    kwargs.setdefault('clip_x0', s.clip_x0)
  if s.spacing:
    if 'spacing' not in parameters:
      raise ConfigError('sample.spacing', f'sampler {s.sampler!r} takes no spacing.')
    kwargs.setdefault('spacing', s.spacing)
  try:
    inspect.signature(sampler).bind(None, None, None, schedule=schedule, prediction=config.diffusion.prediction,
                                    sigma_data=config.diffusion.sigma_data, **kwargs)
  except TypeError as error:
    raise ConfigError('sample.kwargs', f'{error} (sampler {s.sampler!r}).')
  num_classes = config.data.num_classes

  def sample_fn(params, rng, labels, shape):

    def net(x, t, cond):
      return model.apply({'params': params}, x, t, cond, train=False)[..., :channels]

    if labels is None:
      model_fn = lambda x, t: net(x, t, None)
    elif s.guidance_scale == 1.0:
      model_fn = lambda x, t: net(x, t, labels)
    else:
      model_fn = parameterization.classifier_free_guidance(net, cond=labels, null_cond=jnp.full_like(
          labels, num_classes), scale=s.guidance_scale)
    return sampler(model_fn, rng, shape, schedule=schedule, prediction=config.diffusion.prediction,
                   sigma_data=config.diffusion.sigma_data, **kwargs)

  return sample_fn
