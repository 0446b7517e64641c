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
from diffax.trainer import distill, text
from diffax.trainer.config import ConfigError
from diffax.trainer.objective import Objective
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
  """The backbone with the data's classes, the compute dtype, remat, and learned variance for the hybrid loss;
  with ``model.text_encoder`` the backbone takes the encoder's context and is wrapped with it (:mod:`.text`)."""
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
            'num_classes': config.data.num_classes or None, 'learn_sigma': learn_sigma, **text.backbone_fields(config),
            **overrides}
  try:
    backbone = models.get_model(config.model.name, preset=config.model.preset or None, **fields)
  except TypeError as error:
    raise ConfigError('model.overrides', str(error))
  return text.conditioned(config, backbone)


def apply_fn_of(model: nn.Module) -> losses.ApplyFn:
  """The ``apply_fn(params, x, t, cond, *, train, rngs)`` that losses take."""

  def apply_fn(params, x, t, cond, *, train, rngs):
    return model.apply({'params': params}, x, t, cond, train=train, rngs=rngs)

  return apply_fn


def sigma_data(config: ml_collections.ConfigDict, schedule: schedules.Schedule) -> float:
  """The one ``sigma_data`` that training and sampling share (EDM preconditioning and loss weight).

  The EDM schedule carries its own (``diffusion.schedule_kwargs.sigma_data``); a different
  ``diffusion.sigma_data`` beside it would train with one value and sample with the other, so it is an error.
  """
  if isinstance(schedule, schedules.EDM) and schedule.sigma_data != config.diffusion.sigma_data:
    raise ConfigError('diffusion.sigma_data', f'{config.diffusion.sigma_data} differs from the EDM schedule\'s '
                      f'sigma_data {schedule.sigma_data} (diffusion.schedule_kwargs.sigma_data); set both to the '
                      'same value.')
  return config.diffusion.sigma_data


def build_loss(config: ml_collections.ConfigDict, apply_fn: losses.ApplyFn,
               schedule: schedules.Schedule) -> losses.LossFn:
  d = config.diffusion
  cond_dropout = None
  if config.data.num_classes and d.p_uncond > 0:
    cond_dropout = losses.CondDropout(p_uncond=d.p_uncond, null_label=config.data.num_classes)
  if config.model.text_encoder and d.p_uncond > 0:  # caption dropout to the empty caption
    cond_dropout = losses.CondDropout(p_uncond=d.p_uncond, null_tokens=text.from_config(config).null_tokens)
  kwargs = dict(schedule=schedule, prediction=d.prediction, sigma_data=sigma_data(config, schedule),
                cond_dropout=cond_dropout)
  if d.loss != 'hybrid':
    kwargs['weighting'] = losses.Weighting(d.weighting, gamma=d.weighting_gamma or None)
  if d.loss == 'flow':
    if schedule.t_max > 1.0:
      raise ConfigError('diffusion.schedule', f"the flow loss draws t in [0, 1] (SD3's time densities); "
                        f'{d.schedule!r} runs to t_max = {schedule.t_max}: use rectified_flow, gvp or vp.')
    kwargs.update(time_sampling=d.time_sampling or 'uniform', loc=d.logit_normal_loc, scale=d.logit_normal_scale,
                  mode_scale=d.mode_scale, shift=d.time_shift)
  return losses.get_loss(d.loss, apply_fn, **kwargs)


def build_objective(config: ml_collections.ConfigDict, apply_fn: losses.ApplyFn, schedule: schedules.Schedule,
                    loss_fn: losses.LossFn, *, example_shape: tuple[int, ...]) -> Objective:
  """The run's :class:`Objective`: ``loss_fn`` alone, or the ``distill.method`` objective with its teacher."""
  if not config.distill.method:
    return Objective.of_loss(loss_fn)
  distill.check_teacher(config, example_shape)
  return distill.build_objective(config, apply_fn, schedule, sigma_data=sigma_data(config, schedule),
                                 channels=example_shape[-1])


def ema_index(config: ml_collections.ConfigDict) -> int:
  """Which of ``state.ema_params`` the sampler uses (``sample.ema_decay = 0`` picks the first)."""
  decays = tuple(config.train.ema_decays)
  return decays.index(config.sample.ema_decay) if config.sample.ema_decay else 0


_PER_CALL = ('t_start', 'x_T', 'inpaint', 'return_trajectory')  # sampler arguments the trainer never sets


def sampler_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Every keyword the configured sampler runs with: its defaults, updated by ``sample.num_steps`` and
  ``sample.spacing`` where set (``0`` / ``''`` mean the sampler's default) and by ``sample.kwargs``.

  What is returned is what runs, and what evaluation results record. A keyword the sampler does not take
  (``sample.num_steps`` for ``'adaptive_ode'``, a misspelt ``sample.kwargs`` entry) is a :class:`ConfigError`, and
  so is a ``sample.spacing`` grid file (``*.json``, ``diffax.samplers.save_grid``) that cannot be read or does not
  fit the sampler's ``num_steps`` and final step.
  """
  s = config.sample
  sampler = samplers.get_sampler(s.sampler)
  parameters = {name: p for name, p in inspect.signature(sampler).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _PER_CALL}
  given = {f'sample.kwargs.{k}': (k, v) for k, v in _kwargs(s.kwargs).items()}
  for key in ('num_steps', 'spacing'):
    if s[key]:
      if f'sample.kwargs.{key}' in given:
        raise ConfigError(f'sample.kwargs.{key}', f'set sample.{key} instead.')
      given[f'sample.{key}'] = (key, s[key])
  for config_key, (name, _) in given.items():
    if name not in parameters:
      raise ConfigError(config_key, f'sampler {s.sampler!r} takes no {name!r}; its keywords are {sorted(parameters)}.')
  used = {name: p.default for name, p in parameters.items()}
  used.update(dict(given.values()))
  for config_key, (name, value) in given.items():
    if name == 'spacing' and samplers.is_grid_path(value):  # a grid file: readable, and for these steps
      try:
        samplers.check_grid(samplers.load_grid(value), used['num_steps'],
                            ends_at_zero=used.get('denoise_to_zero', True))
      except ValueError as e:
        raise ConfigError(config_key, str(e)) from e
  return used


def build_generate(config: ml_collections.ConfigDict, model: nn.Module, schedule: schedules.Schedule, *,
                   channels: int) -> Callable[[Any, Array, Array | None, tuple[int, ...]], samplers.SampleOutput]:
  """``generate(params, rng, labels [B] | None, shape) -> SampleOutput``: the configured sampler on the model.

  Learned-variance channels are dropped before guidance and sampling (the samplers use the mean prediction).
  With ``sample.guidance_scale != 1`` the model is guided (Ho & Salimans 2022) against the null label (a text
  model: against the empty caption; ``labels`` are then token ids [B, L]).
  """
  s = config.sample
  sampler = samplers.get_sampler(s.sampler)
  kwargs = sampler_kwargs(config)
  denoiser_fields = dict(schedule=schedule, prediction=config.diffusion.prediction,
                         sigma_data=sigma_data(config, schedule), clip_x0=s.clip_x0 or None)
  num_classes = config.data.num_classes
  conditioning = text.from_config(config)

  def generate(params, rng, labels, shape):

    def net(x, t, cond):
      return model.apply({'params': params}, x, t, cond, train=False)[..., :channels]

    if labels is None:
      model_fn = lambda x, t: net(x, t, None)
    elif s.guidance_scale == 1.0:
      model_fn = lambda x, t: net(x, t, labels)
    else:
      null_cond = jnp.full_like(labels, num_classes) if conditioning is None else jnp.broadcast_to(
          jnp.asarray(conditioning.null_tokens, labels.dtype), labels.shape)  # the empty caption for text
      model_fn = parameterization.classifier_free_guidance(net, cond=labels, null_cond=null_cond,
                                                           scale=s.guidance_scale)
    denoiser = distill.sampling_denoiser(config, parameterization.Denoiser(model_fn, **denoiser_fields))
    return sampler(denoiser, rng, shape, **kwargs)

  return generate
