"""Few-step generation: progressive distillation and consistency models, as losses ``loss_fn(params, batch, rng)``.

Every loss here takes the frozen networks it learns from as arguments -- a :class:`Teacher` (its params and apply
function under its schedule and parameterisation) and, for consistency models, the target parameters -- so the
trainer keeps them in its one state and a test passes an exact mixture denoiser instead.

**Progressive distillation** (Salimans & Ho 2022, Algorithm 2). A student of ``N`` steps learns two deterministic
DDIM steps of an ``2N``-step teacher in one. With ``t = i / N``, ``t' = t - 0.5 / N``, ``t'' = t - 1 / N`` (times
scaled by ``schedule.t_max``) and ``z_t = alpha_t x + sigma_t eps``, the teacher makes

  z_t'  = alpha_t' x_hat(z_t) + (sigma_t' / sigma_t) (z_t - alpha_t x_hat(z_t)),
  z_t'' = alpha_t'' x_hat(z_t') + (sigma_t'' / sigma_t') (z_t' - alpha_t' x_hat(z_t')),

and the student's x0-target is the one a single DDIM step from ``t`` to ``t''`` would need to land on ``z_t''``,

  x_tilde = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)        (PD eq. 8)

(``x_hat(z_t')`` itself when ``t'' = 0``). The loss is ``max(snr_t, 1) ||x_hat_student(z_t) - x_tilde||^2``, the
paper's truncated-SNR weighting (sec. 4), which equals its v-MSE up to ``snr + 1`` vs ``max(snr, 1)``.

**Consistency models** (Song et al. 2023, "Consistency Models", CM; Song & Dhariwal 2023, "Improved Techniques
for Training Consistency Models", iCT). A consistency function maps any point of a probability-flow ODE trajectory
to its origin. It is parameterised on the VE-equivalent state ``x = x_t / alpha_t`` at ``sigma = sigma_t /
alpha_t`` (so it exists for every schedule) as

  f(x, sigma) = c_skip(sigma) x + c_out(sigma) F,   c_skip = s_d^2 / ((sigma - sigma_min)^2 + s_d^2),
  c_out = (sigma - sigma_min) s_d / sqrt(sigma^2 + s_d^2)                                              (CM eq. 7)

where ``F`` is the raw network of the EDM denoiser ``D = c_skip^edm x + c_out^edm F`` (EDM Table 1); a network of
any parameterisation gives ``D`` (its x0-prediction) and hence ``F``, so a pretrained diffusion model is a
consistency model's initialisation, as CM sec. 6 and LCM use. ``f(x, sigma_min) = x`` exactly. Training compares
``f_theta`` at ``sigma_{i+1}`` with the target network ``f_theta-`` at ``sigma_i`` on Karras' grid (EDM eq. 5):

  * consistency distillation (CM Algorithm 2): ``x_{sigma_i}`` is one ODE step (Euler or Heun) of the teacher
    from ``x_{sigma_{i+1}} = x + sigma_{i+1} z``;
  * consistency training (CM Algorithm 3, iCT): ``x_{sigma_i} = x + sigma_i z`` with the same ``z``, the
    discretisation curriculum ``N(k) = min(s0 2^floor(k / K'), s1) + 1`` (iCT eq. 5), discrete lognormal noise
    levels (iCT eq. 10), weights ``1 / (sigma_{i+1} - sigma_i)`` and the pseudo-Huber metric
    ``sqrt(||a - b||^2 + c^2) - c`` with ``c = 0.00054 sqrt(d)`` (iCT sec. 3.3).

The target network is an argument: iCT's ``theta- = stopgrad(theta)`` (``target_params=None``) or CM's EMA of the
student (the trainer passes one of its EMA copies).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from diffax.diffusion import parameterization
from diffax.diffusion.losses import ApplyFn, LossFn
from diffax.diffusion.schedules import Schedule, expand_like

Array = jax.Array
ODE_SOLVERS = ('euler', 'heun')
METRICS = ('pseudo_huber', 'l2')


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen network under its schedule and parameterisation: what distillation learns from.

  Attributes:
    apply_fn: ``apply_fn(params, x [B, ...], t [B], cond, *, train, rngs) -> output [B, ...]`` (Flax apply).
    params: the teacher's (EMA) parameters; never differentiated.
    schedule, prediction, sigma_data: how to read its output (:class:`~diffax.diffusion.parameterization.Denoiser`).
    guidance_scale: classifier-free guidance weight of the teacher (Ho & Salimans 2022 eq. 6; 1 = none), so a
      student learns the guided model in one network (Meng et al. 2023, "On Distillation of Guided Diffusion").
      An array (e.g. traced, to change it during training) always runs the guided, batch-2B call.
    null_label: the "no label" index used for guidance (``num_classes``).
    channels: output channels to keep (drops a learned-variance head); ``None`` keeps all.
  """

  apply_fn: ApplyFn
  params: Any
  schedule: Schedule
  prediction: str = 'v'
  sigma_data: float = 0.5
  guidance_scale: float | Array = 1.0
  null_label: int | None = None
  channels: int | None = None

  def denoiser(self, cond: Any = None) -> parameterization.Denoiser:
    """The teacher as the ``Denoiser`` samplers take, conditioned on ``cond`` (labels [B] or None)."""
    params = jax.lax.stop_gradient(self.params)

    def net(x, t, c):
      out = self.apply_fn(params, x, t, c, train=False, rngs={})
      return out if self.channels is None else out[..., :self.channels]

    if cond is None or (isinstance(self.guidance_scale, (int, float)) and self.guidance_scale == 1.0):
      model_fn = lambda x, t: net(x, t, cond)
    else:
      if self.null_label is None:
        raise ValueError('Teacher(guidance_scale != 1) needs null_label (the number of classes).')
      model_fn = parameterization.classifier_free_guidance(net, cond=cond, null_cond=jnp.full_like(
          cond, self.null_label), scale=self.guidance_scale)
    return parameterization.Denoiser(model_fn, self.schedule, self.prediction, sigma_data=self.sigma_data)


def _alpha_sigma(schedule: Schedule, t: Array) -> tuple[Array, Array]:
  """``schedule.alpha_sigma(t)`` with ``t <= 0`` meaning clean data ``(1, 0)`` (the samplers' convention)."""
  alpha_t, sigma_t = schedule.alpha_sigma(jnp.maximum(t, schedule.t_min))
  clean = t <= 0
  return jnp.where(clean, 1.0, alpha_t), jnp.where(clean, 0.0, sigma_t)


def _ddim_step(x0: Array, z_t: Array, alpha_t: Array, sigma_t: Array, alpha_s: Array, sigma_s: Array) -> Array:
  """Deterministic DDIM from ``t`` to ``s``: ``alpha_s x0 + (sigma_s / sigma_t) (z_t - alpha_t x0)`` [B, ...]."""
  a_t, s_t, a_s, s_s = (expand_like(v, z_t) for v in (alpha_t, sigma_t, alpha_s, sigma_s))
  return a_s * x0 + (s_s / s_t) * (z_t - a_t * x0)


def progressive_target(denoiser: parameterization.Denoiser, z_t: Array, t: Array, t_mid: Array,
                       t_next: Array) -> Array:
  """The student's x0-target (PD eq. 8) [B, ...] from two teacher DDIM steps ``t -> t_mid -> t_next``.

  Args:
    denoiser: the teacher (``Teacher.denoiser(cond)``).
    z_t: [B, ...] noisy input at ``t``.
    t, t_mid, t_next: [B] times, ``t > t_mid > t_next >= 0`` (``0`` is clean data).
  """
  schedule = denoiser.schedule
  alpha_t, sigma_t = _alpha_sigma(schedule, t)
  alpha_m, sigma_m = _alpha_sigma(schedule, t_mid)
  alpha_n, sigma_n = _alpha_sigma(schedule, t_next)
  x0_t, _ = denoiser(z_t, t)
  z_mid = _ddim_step(x0_t, z_t, alpha_t, sigma_t, alpha_m, sigma_m)
  x0_mid, _ = denoiser(z_mid, t_mid)
  z_next = _ddim_step(x0_mid, z_mid, alpha_m, sigma_m, alpha_n, sigma_n)
  ratio = expand_like(sigma_n / sigma_t, z_t)
  return (z_next - ratio * z_t) / (expand_like(alpha_n, z_t) - ratio * expand_like(alpha_t, z_t))


def progressive_distillation_loss(apply_fn: ApplyFn, *, teacher: Teacher, num_student_steps: int | Array,
                                  prediction: str = 'v', sigma_data: float = 0.5, train: bool = True) -> LossFn:
  """Salimans & Ho 2022, Algorithm 2: a ``num_student_steps``-step student of a ``2 num_student_steps``-step
  teacher, on the teacher's schedule, with the truncated-SNR weight ``max(snr_t, 1)`` on the x0-error.
  ``num_student_steps`` may be traced (an int32 [] that halves from round to round inside one compiled step).

  The student is sampled by DDIM (``eta = 0``, ``spacing='trailing'``) with ``num_student_steps`` steps: its
  grid ``t_max i / N`` is the one it is trained on. ``batch = {'x': [B, ...], 'cond': optional [B]}``.
  ``aux``: ``'loss'`` [B], ``'t'`` [B], ``'log_snr'`` [B], ``'weight'`` [B], ``'mse_x0'`` [B].
  """
  parameterization.check_prediction(prediction)
  schedule = teacher.schedule
  n_int = jnp.asarray(num_student_steps, jnp.int32)
  n = n_int.astype(jnp.float32)

  def loss_fn(params, batch, rng):
    rng_time, rng_noise, rng_model = jax.random.split(rng, 3)
    x0 = jnp.asarray(batch['x'], jnp.float32)
    cond = batch.get('cond')
    i = jax.random.randint(rng_time, x0.shape[:1], 1, n_int + 1).astype(jnp.float32)  # [B]
    t = schedule.t_max * i / n
    t_mid, t_next = schedule.t_max * (i - 0.5) / n, schedule.t_max * (i - 1.0) / n
    z_t = schedule.marginal(x0, t, jax.random.normal(rng_noise, x0.shape, jnp.float32))
    x_tilde = jax.lax.stop_gradient(progressive_target(teacher.denoiser(cond), z_t, t, t_mid, t_next))
    student = parameterization.Denoiser(
        lambda x, s: apply_fn(params, x, s, cond, train=train, rngs={'dropout': rng_model}), schedule, prediction,
        sigma_data=sigma_data)
    x0_hat, _ = student(z_t, t)
    mse_x0 = jnp.mean(jnp.square(x0_hat - x_tilde).reshape(x0.shape[0], -1), axis=-1)  # [B]
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    weight = jnp.maximum(jnp.square(alpha_t / sigma_t), 1.0)  # [B]
    per_example = weight * mse_x0  # [B]
    aux = {'loss': per_example, 't': t, 'log_snr': schedule.log_snr(t), 'weight': weight, 'mse_x0': mse_x0}
    return jnp.mean(per_example), aux

  return loss_fn


def consistency_scalings(sigma: Array, *, sigma_data: float, sigma_min: float) -> tuple[Array, Array]:
  """``(c_skip, c_out)`` of CM eq. 7 (iCT keeps them), each with the shape of ``sigma``."""
  c_skip = sigma_data**2 / (jnp.square(sigma - sigma_min) + sigma_data**2)
  c_out = (sigma - sigma_min) * sigma_data * jax.lax.rsqrt(jnp.square(sigma) + sigma_data**2)
  return c_skip, c_out


def consistency_function(denoiser: parameterization.Denoiser, x: Array, sigma: Array, *,
                         sigma_min: float) -> Array:
  """``f(x, sigma)`` [B, ...] (module docstring) of the network behind ``denoiser``.

  Args:
    denoiser: the network under its schedule and parameterisation (its x0-prediction is the EDM ``D``).
    x: [B, ...] VE-equivalent state ``x_t / alpha_t``.
    sigma: [B] VE-equivalent noise level ``sigma_t / alpha_t`` (at least ``sigma_min``).
  """
  schedule, sigma_data = denoiser.schedule, denoiser.sigma_data
  t = ve_time(schedule, sigma)
  alpha_t, _ = schedule.alpha_sigma(t)
  d, _ = denoiser(expand_like(alpha_t, x) * x, t)
  c_skip_edm, c_out_edm, _, _ = parameterization.edm_preconditioning(sigma, sigma_data)
  raw = (d - expand_like(c_skip_edm, x) * x) / expand_like(c_out_edm, x)
  c_skip, c_out = consistency_scalings(sigma, sigma_data=sigma_data, sigma_min=sigma_min)
  return expand_like(c_skip, x) * x + expand_like(c_out, x) * raw


def consistency_model_fn(denoiser: parameterization.Denoiser, *, sigma_min: float) -> parameterization.ModelFn:
  """The consistency function as an x0-prediction ``(x_t [B, ...], t [B]) -> x0`` on ``denoiser``'s schedule:
  ``Denoiser(consistency_model_fn(d, sigma_min=...), d.schedule, 'x0')`` is what consistency sampling takes."""
  schedule = denoiser.schedule

  def model_fn(x_t, t):
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    return consistency_function(denoiser, x_t / expand_like(alpha_t, x_t), sigma_t / alpha_t, sigma_min=sigma_min)

  return model_fn


def ve_sigma_range(schedule: Schedule) -> tuple[float, float]:
  """``(sigma_min, sigma_max)``: the VE-equivalent noise levels ``sigma_t / alpha_t`` at ``t_min`` and ``t_max``."""
  with jax.ensure_compile_time_eval():  # Python floats also when called under a trace
    lo, hi = (float(jnp.exp(-0.5 * schedule.log_snr(jnp.float32(t)))) for t in (schedule.t_min, schedule.t_max))
  return lo, hi


def ve_time(schedule: Schedule, sigma: Array) -> Array:
  """The schedule time [B] whose VE-equivalent noise level is ``sigma`` [B]."""
  t = schedule.t_from_log_snr(-2.0 * jnp.log(sigma))
  return jnp.clip(t, schedule.t_min, schedule.t_max)


def karras_sigmas(num_scales: Array | int, *, sigma_min: float, sigma_max: float, rho: float = 7.0,
                  size: int | None = None) -> Array:
  """Ascending ``sigma_1 .. sigma_N`` of EDM eq. 5 / CM's grid, ``N = num_scales`` (may be traced).

  ``size`` pads the result to a static length (entries past ``N`` repeat ``sigma_max``); default ``N``.
  """
  size = int(num_scales) if size is None else size
  i = jnp.arange(size, dtype=jnp.float32)
  frac = jnp.minimum(i / (jnp.asarray(num_scales, jnp.float32) - 1.0), 1.0)
  lo, hi = sigma_min**(1 / rho), sigma_max**(1 / rho)
  return (lo + frac * (hi - lo))**rho


def ict_num_scales(step: Array, *, total_steps: int, s0: int = 10, s1: int = 1280) -> Array:
  """iCT eq. 5: ``N(k) = min(s0 2^floor(k / K'), s1) + 1``, ``K' = floor(K / (log2(s1 / s0) + 1))``; int32 []."""
  k_prime = max(math.floor(total_steps / (math.log2(s1 / s0) + 1)), 1)
  doublings = jnp.floor(jnp.asarray(step, jnp.float32) / k_prime)
  return (jnp.minimum(s0 * jnp.exp2(doublings), s1) + 1).astype(jnp.int32)


def lognormal_index_logits(sigmas: Array, num_scales: Array, *, p_mean: float = -1.1, p_std: float = 2.0) -> Array:
  """Unnormalised log-probabilities [size - 1] of the pair index ``i`` (iCT eq. 10): ``p(i) propto erf((ln sigma_{i+1} -
  P_mean) / (sqrt 2 P_std)) - erf((ln sigma_i - P_mean) / (sqrt 2 P_std))``; pairs past ``N - 1`` get ``-inf``."""
  cdf = jax.scipy.special.erf((jnp.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))
  mass = cdf[1:] - cdf[:-1]
  valid = jnp.arange(mass.shape[0]) < num_scales - 1
  return jnp.where(valid & (mass > 0), jnp.log(jnp.maximum(mass, 1e-30)), -jnp.inf)


def pseudo_huber(a: Array, b: Array, *, c: float | None = None) -> Array:
  """iCT's ``sqrt(||a - b||^2 + c^2) - c`` per example [B]; ``c`` defaults to ``0.00054 sqrt(d)``."""
  diff = (a - b).reshape(a.shape[0], -1)
  c = 0.00054 * math.sqrt(diff.shape[-1]) if c is None else c
  return jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1) + c**2) - c


def _distance(metric: str, a: Array, b: Array) -> Array:
  if metric == 'pseudo_huber':
    return pseudo_huber(a, b)
  return jnp.mean(jnp.square(a - b).reshape(a.shape[0], -1), axis=-1)


def teacher_ode_step(denoiser: parameterization.Denoiser, x: Array, sigma: Array, sigma_next: Array, *,
                     solver: str = 'heun') -> Array:
  """One step of the probability-flow ODE ``dx / dsigma = (x - D(x, sigma)) / sigma`` (EDM eq. 4, VE form)
  from ``sigma`` to ``sigma_next`` [B] with Euler or Heun (EDM Algorithm 1), on the VE state ``x`` [B, ...]."""
  if solver not in ODE_SOLVERS:
    raise ValueError(f'Unknown ODE solver {solver!r}; choose one of {ODE_SOLVERS}.')
  schedule = denoiser.schedule

  def slope(x_ve, s):
    t = ve_time(schedule, s)
    alpha_t, _ = schedule.alpha_sigma(t)
    d, _ = denoiser(expand_like(alpha_t, x_ve) * x_ve, t)
    return (x_ve - d) / expand_like(s, x_ve)

  h = expand_like(sigma_next - sigma, x)
  d_cur = slope(x, sigma)
  x_euler = x + h * d_cur
  if solver == 'euler':
    return x_euler
  return x + 0.5 * h * (d_cur + slope(x_euler, sigma_next))


def _consistency_loss(apply_fn: ApplyFn, *, schedule: Schedule, prediction: str, sigma_data: float,
                      num_scales: Array | int, max_scales: int, pair_logits: Callable[[Array], Array],
                      weighting: Callable[[Array, Array], Array], metric: str, target_params: Any,
                      next_point: Callable[[Any, Array, Array, Array, Array, Array], Array], rho: float,
                      train: bool) -> LossFn:
  """The loss both algorithms share: ``lambda(sigma_i) d(f_theta(x_{sigma_{i+1}}), f_theta-(x_{sigma_i}))``.

  ``next_point(cond, x0, z, x_hi, sigma_hi, sigma_lo) -> x_{sigma_lo}`` makes the lower point of a pair.
  """
  parameterization.check_prediction(prediction)
  if metric not in METRICS:
    raise ValueError(f'Unknown consistency metric {metric!r}; choose one of {METRICS}.')
  sigma_min, sigma_max = ve_sigma_range(schedule)

  def loss_fn(params, batch, rng):
    rng_index, rng_noise, rng_model = jax.random.split(rng, 3)
    x0 = jnp.asarray(batch['x'], jnp.float32)
    cond = batch.get('cond')
    sigmas = karras_sigmas(num_scales, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, size=max_scales)
    i = jax.random.categorical(rng_index, pair_logits(sigmas), shape=x0.shape[:1])  # [B]
    sigma_lo, sigma_hi = sigmas[i], sigmas[i + 1]  # [B]
    z = jax.random.normal(rng_noise, x0.shape, jnp.float32)
    x_hi = x0 + expand_like(sigma_hi, x0) * z
    x_lo = jax.lax.stop_gradient(next_point(cond, x0, z, x_hi, sigma_hi, sigma_lo))

    def f(p, x, sigma, rngs):
      net = lambda x_t, t: apply_fn(p, x_t, t, cond, train=train, rngs=rngs)
      return consistency_function(parameterization.Denoiser(net, schedule, prediction, sigma_data=sigma_data), x,
                                  sigma, sigma_min=sigma_min)

    online = f(params, x_hi, sigma_hi, {'dropout': rng_model})
    target_p = jax.lax.stop_gradient(params if target_params is None else target_params)
    target = jax.lax.stop_gradient(f(target_p, x_lo, sigma_lo, {'dropout': rng_model}))
    distance = _distance(metric, online, target)  # [B]
    weight = weighting(sigma_lo, sigma_hi)  # [B]
    per_example = weight * distance
    t_hi = ve_time(schedule, sigma_hi)
    aux = {'loss': per_example, 't': t_hi, 'log_snr': -2.0 * jnp.log(sigma_hi), 'weight': weight,
           'distance': distance, 'num_scales': jnp.broadcast_to(jnp.asarray(num_scales, jnp.int32), i.shape)}
    return jnp.mean(per_example), aux

  return loss_fn


def consistency_distillation_loss(apply_fn: ApplyFn, *, teacher: Teacher, num_scales: int = 18,
                                  solver: str = 'heun', metric: str = 'l2', target_params: Any = None,
                                  prediction: str = 'v', sigma_data: float = 0.5, rho: float = 7.0,
                                  train: bool = True) -> LossFn:
  """CM Algorithm 2: ``x_{sigma_i}`` is one teacher ODE step (``solver``) from ``x_{sigma_{i+1}}``; ``i``
  uniform over the ``num_scales - 1`` pairs (CM uses ``N = 18`` on CIFAR-10), unit weights (CM's
  ``lambda = 1``), on the teacher's schedule. ``target_params``: CM's EMA target ``theta-``; ``None`` is the
  student itself under ``stop_gradient``. ``aux`` as the diffusion losses plus ``'distance'`` [B]."""
  if solver not in ODE_SOLVERS:
    raise ValueError(f'Unknown ODE solver {solver!r}; choose one of {ODE_SOLVERS}.')

  def next_point(cond, x0, z, x_hi, sigma_hi, sigma_lo):
    del x0, z
    return teacher_ode_step(teacher.denoiser(cond), x_hi, sigma_hi, sigma_lo, solver=solver)

  return _consistency_loss(
      apply_fn, schedule=teacher.schedule, prediction=prediction, sigma_data=sigma_data, num_scales=num_scales,
      max_scales=num_scales, pair_logits=lambda sigmas: jnp.zeros((num_scales - 1,), jnp.float32),
      weighting=lambda lo, hi: jnp.ones_like(lo), metric=metric, target_params=target_params,
      next_point=next_point, rho=rho, train=train)


def consistency_training_loss(apply_fn: ApplyFn, *, schedule: Schedule, step: Array | int, total_steps: int,
                              s0: int = 10, s1: int = 1280, p_mean: float = -1.1, p_std: float = 2.0,
                              metric: str = 'pseudo_huber', target_params: Any = None, prediction: str = 'v',
                              sigma_data: float = 0.5, rho: float = 7.0, train: bool = True) -> LossFn:
  """Improved consistency training (iCT, Song & Dhariwal 2023) without a teacher: ``x_{sigma_i} = x + sigma_i z``
  with the ``z`` of ``x_{sigma_{i+1}}``; the curriculum :func:`ict_num_scales` at training step ``step`` of
  ``total_steps``, lognormal pair sampling (:func:`lognormal_index_logits`), weights ``1 / (sigma_{i+1} -
  sigma_i)``, the pseudo-Huber metric, and ``theta- = stopgrad(theta)`` (``target_params=None``, iCT sec. 3.2).
  """

  def next_point(cond, x0, z, x_hi, sigma_hi, sigma_lo):
    del cond, x_hi, sigma_hi
    return x0 + expand_like(sigma_lo, x0) * z

  return _consistency_loss(
      apply_fn, schedule=schedule, prediction=prediction, sigma_data=sigma_data,
      num_scales=ict_num_scales(step, total_steps=total_steps, s0=s0, s1=s1), max_scales=s1 + 1,
      pair_logits=lambda sigmas: lognormal_index_logits(
          sigmas, ict_num_scales(step, total_steps=total_steps, s0=s0, s1=s1), p_mean=p_mean, p_std=p_std),
      weighting=lambda lo, hi: 1.0 / (hi - lo), metric=metric, target_params=target_params,
      next_point=next_point, rho=rho, train=train)
