"""Few-step students in the trainer: progressive distillation, consistency distillation and consistency training.

``distill.method`` picks the objective (:mod:`diffax.diffusion.distillation` holds the maths); everything else is
the ordinary trainer. The teacher is the EMA of a trained run (``distill.teacher_workdir``, read through
:func:`diffax.trainer.restore.restore_ema_params`, never written) and is also the student's initialisation. It is
kept in ``TrainState.frozen``, so a resumed run needs nothing but its own checkpoints.

* ``'progressive'`` (Salimans & Ho 2022): rounds of halving. The first teacher samples with
  ``distill.teacher_steps`` DDIM steps; each of the ``log2(teacher_steps / sample.num_steps)`` rounds takes an equal
  share of ``train.num_steps`` and ends with the teacher replaced by the student (Algorithm 2's ``eta <- theta``),
  so one run goes from ``teacher_steps`` to ``sample.num_steps``. The student is sampled by DDIM on the
  ``'trailing'`` grid it was trained on. Guidance is distilled in the first round only (Meng et al. 2023's two
  stages in one run): later teachers are students with the guidance already in them.
* ``'consistency_distillation'`` (CM Algorithm 2): a Heun / Euler step of the teacher's probability-flow ODE on a
  Karras grid of ``distill.num_scales``; target network ``theta-`` is the EMA copy ``distill.target_ema_decay`` of
  ``train.ema_decays`` (CM: 0.95 beside a sampling EMA) or ``stopgrad(theta)`` when it is 0.
* ``'consistency_training'`` (iCT, Song & Dhariwal 2023): no teacher; the discretisation curriculum over
  ``train.num_steps``, lognormal pairs, pseudo-Huber; ``distill.teacher_workdir`` optionally gives the initialisation
  (CM sec. 6).

Consistency students are sampled by ``sample.sampler='consistency'`` (1 step = one network evaluation).
A teacher's guidance (``distill.guidance_scale``, Meng et al. 2023) is distilled into the student, which is then
sampled without guidance.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from diffax.diffusion import distillation, losses, parameterization, schedules
from diffax.trainer import restore
from diffax.trainer.config import ConfigError
from diffax.trainer.objective import Objective

Params = Any
METHODS = ('progressive', 'consistency_distillation', 'consistency_training')
CONSISTENCY = ('consistency_distillation', 'consistency_training')
_TEACHER_KEYS = ('model.name', 'model.preset', 'model.overrides', 'diffusion.schedule', 'diffusion.schedule_kwargs',
                 'diffusion.prediction', 'data.num_classes')
"""Keys a student must share with its teacher (its ``config.json``): the network, its schedule and its conditioning."""


def defaults() -> dict[str, Any]:
  """The ``distill`` section of :func:`diffax.trainer.config.default_config`."""
  return dict(
      method='',  # '' (off), 'progressive', 'consistency_distillation' or 'consistency_training'
      teacher_workdir='',  # trained run whose EMA is the teacher and the student's initialisation
      teacher_step=-1,  # its checkpoint step; -1 = the newest
      teacher_ema_index=0,  # which of its EMA copies (the order of its train.ema_decays)
      guidance_scale=1.0,  # the teacher's classifier-free guidance, distilled into the student
      teacher_steps=0,  # progressive: DDIM steps of the first teacher (a power-of-2 multiple of sample.num_steps)
      num_scales=18,  # consistency distillation: Karras grid size N (CM uses 18 on CIFAR-10)
      solver='heun',  # consistency distillation: the teacher's ODE step ('heun' or 'euler')
      metric='',  # consistency: 'l2' or 'pseudo_huber'; '' = the method's (CD: l2, iCT: pseudo_huber)
      target_ema_decay=0.0,  # consistency: the train.ema_decays entry that is theta-; 0 = stopgrad(theta)
      ict_s0=10,  # iCT curriculum N(k) = min(s0 2^floor(k / K'), s1) + 1 (iCT eq. 5)
      ict_s1=1280,
  )


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  """The value at ``key``, JSON-normalised (tuples as lists) so a run record and a live config compare."""
  value = config
  for part in key.split('.'):
    value = value[part]
  return json.loads(json.dumps(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value))


def _rounds(config: ml_collections.ConfigDict) -> int:
  return int(round(math.log2(config.distill.teacher_steps / config.sample.num_steps)))


def validate(config: ml_collections.ConfigDict) -> None:
  """The ``distill`` section against the rest of the config (keys named in each error)."""
  d = config.distill
  if not d.method:
    return
  if d.method not in METHODS:
    raise ConfigError('distill.method', f'{d.method!r} is not one of {("", *METHODS)}.')
  if d.method != 'consistency_training' and not d.teacher_workdir:
    raise ConfigError('distill.teacher_workdir', f"distill.method={d.method!r} needs a teacher: the workdir of a "
                      'trained run (e.g. workdirs/digits after make run).')
  if config.diffusion.loss == 'hybrid':
    raise ConfigError('diffusion.loss', "distillation students have no learned variance; train the teacher with "
                      "another loss or distil with diffusion.loss='ddpm'.")
  expected = 'ddim' if d.method == 'progressive' else 'consistency'
  if config.sample.sampler != expected:
    raise ConfigError('sample.sampler', f'a {d.method} student is sampled by {expected!r} (the steps it was trained '
                      f'for), not {config.sample.sampler!r}.')
  if config.sample.guidance_scale != 1.0:
    raise ConfigError('sample.guidance_scale', 'a student learns the guided teacher (distill.guidance_scale); sample '
                      'it with guidance_scale=1.')
  if d.guidance_scale != 1.0 and not (config.data.num_classes and d.method != 'consistency_training'):
    raise ConfigError('distill.guidance_scale', 'teacher guidance needs a class-conditional teacher '
                      '(data.num_classes > 0) and a teacher (not consistency_training).')
  if d.method == 'progressive':
    n = config.sample.num_steps
    if not n or d.teacher_steps < 2 * n or d.teacher_steps % n or 2**_rounds(config) * n != d.teacher_steps:
      raise ConfigError('distill.teacher_steps', f'{d.teacher_steps} must be sample.num_steps ({n}) times a power '
                        'of 2 >= 2 (each round halves the steps).')
    if config.sample.spacing not in ('', 'trailing'):
      raise ConfigError('sample.spacing', "a progressive student is trained on the 'trailing' grid t_max i / N.")
    if config.train.num_steps < _rounds(config):
      raise ConfigError('train.num_steps', f'{config.train.num_steps} steps cannot hold {_rounds(config)} rounds.')
  else:
    if d.metric not in ('', *distillation.METRICS):
      raise ConfigError('distill.metric', f'{d.metric!r} is not one of {("", *distillation.METRICS)}.')
    if d.solver not in distillation.ODE_SOLVERS:
      raise ConfigError('distill.solver', f'{d.solver!r} is not one of {distillation.ODE_SOLVERS}.')
    if d.target_ema_decay and d.target_ema_decay not in config.train.ema_decays:
      raise ConfigError('distill.target_ema_decay', f'{d.target_ema_decay} is not one of train.ema_decays '
                        f'{tuple(config.train.ema_decays)} (add it there, or 0 for stopgrad(theta)).')
    if d.num_scales < 2:
      raise ConfigError('distill.num_scales', f'needs at least 2 noise levels, got {d.num_scales}.')


def check_teacher(config: ml_collections.ConfigDict, example_shape: tuple[int, ...]) -> None:
  """The teacher run's recorded config (``config.json``) against this one: same network, schedule, conditioning and
  example shape, so a teacher of another architecture or image shape is an error before any step."""
  path = epath.Path(config.distill.teacher_workdir) / 'config.json'
  if not path.exists():
    return  # checkpoints without a run record are still checked leaf by leaf (restore_ema_params)
  run = json.loads(path.read_text())
  if tuple(run['example_shape']) != tuple(example_shape):
    raise ConfigError('distill.teacher_workdir', f'the teacher was trained on examples of shape '
                      f'{tuple(run["example_shape"])}, this run has {tuple(example_shape)} (set data.* as there).')
  teacher = ml_collections.ConfigDict(run['config'])
  for key in _TEACHER_KEYS:
    if _get(teacher, key) != _get(config, key):
      raise ConfigError(key, f'{_get(config, key)!r} differs from the teacher\'s {_get(teacher, key)!r} '
                        f'({path}); a student shares its teacher\'s network and schedule.')


def build_objective(config: ml_collections.ConfigDict, apply_fn: losses.ApplyFn, schedule: schedules.Schedule, *,
                    sigma_data: float, channels: int) -> Objective:
  """The configured distillation objective; ``apply_fn`` is the student's (and the teacher's) network."""
  d, prediction = config.distill, config.diffusion.prediction
  net = lambda params, x, t, cond, *, train, rngs: apply_fn(params, x, t, cond, train=train, rngs=rngs)[..., :channels]

  def read_teacher(abstract_params: Params) -> Params:
    return restore.restore_ema_params(d.teacher_workdir, abstract_params, ema_index=d.teacher_ema_index,
                                      step=d.teacher_step, key='distill.teacher_workdir')

  def teacher(params: Params, guidance_scale: float | jax.Array = d.guidance_scale) -> distillation.Teacher:
    return distillation.Teacher(net, params, schedule, prediction, sigma_data=sigma_data,
                                guidance_scale=guidance_scale, null_label=config.data.num_classes or None)

  def target(ema_params: tuple[Params, ...]) -> Params | None:
    return ema_params[tuple(config.train.ema_decays).index(d.target_ema_decay)] if d.target_ema_decay else None

  with_teacher = dict(frozen_like=lambda params: {'teacher': params},
                      initial=lambda abstract: (lambda p: (p, {'teacher': p}))(read_teacher(abstract)))
  if d.method == 'progressive':
    rounds = _rounds(config)
    per_round = -(-config.train.num_steps // rounds)

    def loss_at(step, frozen, ema_params):
      """Round 1 learns the guided teacher; later rounds learn the previous student, whose guidance is built in
      (guiding it again would compound ``w`` and query a null label it was never trained on)."""
      del ema_params
      round_index = jnp.minimum(step // per_round, rounds - 1)
      num_student_steps = jnp.right_shift(jnp.int32(d.teacher_steps), round_index + 1)
      w = d.guidance_scale if d.guidance_scale == 1.0 else jnp.where(round_index == 0, d.guidance_scale, 1.0)
      return distillation.progressive_distillation_loss(net, teacher=teacher(frozen['teacher'], w),
                                                        prediction=prediction, num_student_steps=num_student_steps,
                                                        sigma_data=sigma_data)

    def update_frozen(step, params, frozen):
      round_end = (step % per_round == 0) & (step < rounds * per_round)  # Algorithm 2: eta <- theta
      return {'teacher': jax.tree.map(lambda p, t: jnp.where(round_end, p, t), params, frozen['teacher'])}

    return Objective(loss_at=loss_at, update_frozen=update_frozen, **with_teacher)
  if d.method == 'consistency_distillation':
    return Objective(loss_at=lambda step, frozen, ema_params: distillation.consistency_distillation_loss(
        net, teacher=teacher(frozen['teacher']), num_scales=d.num_scales, solver=d.solver, metric=d.metric or 'l2',
        target_params=target(ema_params), prediction=prediction, sigma_data=sigma_data), **with_teacher)
  return Objective(
      loss_at=lambda step, frozen, ema_params: distillation.consistency_training_loss(
          net, schedule=schedule, step=step, total_steps=config.train.num_steps, s0=d.ict_s0, s1=d.ict_s1,
          metric=d.metric or 'pseudo_huber', target_params=target(ema_params), prediction=prediction,
          sigma_data=sigma_data),
      initial=(lambda abstract: (read_teacher(abstract), {})) if d.teacher_workdir else None)


def sampling_denoiser(config: ml_collections.ConfigDict, denoiser: parameterization.Denoiser
                      ) -> parameterization.Denoiser:
  """The network as the sampler sees it: a consistency student's consistency function (an x0-prediction,
  CM eq. 7 on the VE-equivalent state), else ``denoiser`` itself."""
  if config.distill.method not in CONSISTENCY:
    return denoiser
  sigma_min, _ = distillation.ve_sigma_range(denoiser.schedule)
  network = dataclasses.replace(denoiser, clip_x0=None)  # the function trained is of the unclipped denoiser
  return parameterization.Denoiser(distillation.consistency_model_fn(network, sigma_min=sigma_min),
                                   denoiser.schedule, 'x0', clip_x0=denoiser.clip_x0)
