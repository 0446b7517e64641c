"""Model parameterisations and the exact conversions between them.

With ``x_t = alpha_t x_0 + sigma_t eps`` (schedules eq. 1) a network may predict

  * ``'eps'``   the noise ``eps`` (DDPM, Ho et al. 2020 eq. 11);
  * ``'x0'``    the clean data ``x_0``;
  * ``'v'``     ``v = alpha_t eps - sigma_t x_0`` (Salimans & Ho 2022, "Progressive Distillation", eq. 13);
  * ``'score'`` ``grad log p_t(x_t) = -eps / sigma_t`` (Song et al. 2021);
  * ``'edm'``   the raw network ``F`` of EDM's preconditioned denoiser (Karras et al. 2022, eq. 7, Table 1)
    ``D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))``, applied to the
    VE-equivalent input ``x_t / alpha_t`` at ``sigma = sigma_t / alpha_t`` (EDM sec. 2, "scaling");
  * ``'velocity'`` the velocity of the path ``u = d x_t / dt = alpha_dot_t x_0 + sigma_dot_t eps`` (flow matching:
    Lipman et al. 2023, eq. 15; Liu et al. 2023; SiT, Ma et al. 2024, eq. 3), ``eps - x_0`` on the linear path.
    With ``x_t = alpha_t x_0 + sigma_t eps`` the 2x2 system has determinant ``d_t = alpha_t sigma_dot_t -
    sigma_t alpha_dot_t`` (1 on the linear path, pi / 2 on GVP), and

      x_0 = (sigma_dot_t x_t - sigma_t u) / d_t,    eps = (alpha_t u - alpha_dot_t x_t) / d_t.            (V)

    Its conversions need the rates ``(alpha_dot_t, sigma_dot_t) = schedule.alpha_sigma_dot(t)`` besides
    ``(alpha_t, sigma_t)``; :data:`RATE_PREDICTIONS` lists such predictions.

For fixed ``(x_t, t)`` every prediction is an affine function of every other, so a model trained in one
parameterisation can be sampled by any sampler, and classifier-free guidance is the same in all of them.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses

import jax
import jax.numpy as jnp

from diffax.diffusion.schedules import Schedule, expand_like, float_dtype

Array = jax.Array
ModelFn = Callable[[Array, Array], Array]
"""``model_fn(x_t [B, ...], t [B]) -> output [B, ...]`` in the model's own parameterisation."""

PREDICTIONS = ('eps', 'x0', 'v', 'score', 'edm')
"""Predictions whose conversions need only ``(alpha_t, sigma_t)``."""
RATE_PREDICTIONS = ('velocity',)
"""Predictions whose conversions also need the rates ``(alpha_dot_t, sigma_dot_t)`` of the schedule."""
ALL_PREDICTIONS = PREDICTIONS + RATE_PREDICTIONS


def check_prediction(prediction: str) -> None:
  if prediction not in ALL_PREDICTIONS:
    raise ValueError(f'Unknown prediction {prediction!r}; choose one of {ALL_PREDICTIONS}.')


def _rates(prediction: str, alpha_dot_t: Array | None, sigma_dot_t: Array | None) -> None:
  if prediction in RATE_PREDICTIONS and (alpha_dot_t is None or sigma_dot_t is None):
    raise ValueError(f'prediction={prediction!r} needs the rates alpha_dot_t, sigma_dot_t '
                     '(schedule.alpha_sigma_dot(t)).')


def edm_preconditioning(sigma: Array, sigma_data: float) -> tuple[Array, Array, Array, Array]:
  """EDM Table 1: ``c_skip = s_d^2 / (s^2 + s_d^2)``, ``c_out = s s_d / sqrt(s^2 + s_d^2)``,
  ``c_in = 1 / sqrt(s^2 + s_d^2)``, ``c_noise = ln(s) / 4``; each with the shape of ``sigma``."""
  var = jnp.square(sigma) + sigma_data**2
  c_skip = sigma_data**2 / var
  c_out = sigma * sigma_data * jax.lax.rsqrt(var)
  c_in = jax.lax.rsqrt(var)
  c_noise = 0.25 * jnp.log(sigma)
  return c_skip, c_out, c_in, c_noise


def x0_eps_from_output(prediction: str, output: Array, x_t: Array, alpha_t: Array, sigma_t: Array, *,
                       sigma_data: float = 0.5, alpha_dot_t: Array | None = None,
                       sigma_dot_t: Array | None = None) -> tuple[Array, Array]:
  """Converts a model output [B, ...] to ``(x0_hat, eps_hat)``; ``alpha_t``, ``sigma_t``: [B] or [].

  ``'edm'`` outputs are ``F`` of the preconditioned denoiser evaluated on the inputs given by
  :func:`model_inputs`; ``'velocity'`` needs the rates ``alpha_dot_t``, ``sigma_dot_t`` ([B] or []), eq. (V).
  """
  check_prediction(prediction)
  _rates(prediction, alpha_dot_t, sigma_dot_t)
  a, s = expand_like(alpha_t, x_t), expand_like(sigma_t, x_t)
  if prediction == 'velocity':
    da, ds = expand_like(alpha_dot_t, x_t), expand_like(sigma_dot_t, x_t)
    det = a * ds - s * da
    x0 = (ds * x_t - s * output) / det
    eps = (a * output - da * x_t) / det
  elif prediction == 'eps':
    eps = output
    x0 = (x_t - s * eps) / a
  elif prediction == 'score':
    eps = -s * output
    x0 = (x_t - s * eps) / a
  elif prediction == 'x0':
    x0 = output
    eps = (x_t - a * x0) / s
  elif prediction == 'v':
    # v = a eps - s x0 and x_t = a x0 + s eps  =>  solve the 2x2 system (a^2 + s^2 = 1 for VP).
    norm = jnp.square(a) + jnp.square(s)
    x0 = (a * x_t - s * output) / norm
    eps = (s * x_t + a * output) / norm
  else:
    c_skip, c_out, _, _ = edm_preconditioning(sigma_t / alpha_t, sigma_data)
    x0 = expand_like(c_skip, x_t) * (x_t / a) + expand_like(c_out, x_t) * output
    eps = (x_t - a * x0) / s
  return x0, eps


def output_from_x0_eps(prediction: str, x0: Array, eps: Array, x_t: Array, alpha_t: Array,
                       sigma_t: Array, *, sigma_data: float = 0.5, alpha_dot_t: Array | None = None,
                       sigma_dot_t: Array | None = None) -> Array:
  """The inverse of :func:`x0_eps_from_output`: the target a model of ``prediction`` type should output."""
  check_prediction(prediction)
  _rates(prediction, alpha_dot_t, sigma_dot_t)
  a, s = expand_like(alpha_t, x_t), expand_like(sigma_t, x_t)
  if prediction == 'velocity':
    return velocity_from_x0_eps(x0, eps, alpha_dot_t, sigma_dot_t)
  if prediction == 'eps':
    return eps
  if prediction == 'score':
    return -eps / s
  if prediction == 'x0':
    return x0
  if prediction == 'v':
    return a * eps - s * x0
  c_skip, c_out, _, _ = edm_preconditioning(sigma_t / alpha_t, sigma_data)
  return (x0 - expand_like(c_skip, x_t) * (x_t / a)) / expand_like(c_out, x_t)


def velocity_from_x0_eps(x0: Array, eps: Array, alpha_dot_t: Array, sigma_dot_t: Array) -> Array:
  """``u = alpha_dot_t x0 + sigma_dot_t eps`` [B, ...]: the velocity of the path through ``(x0, eps)``."""
  return expand_like(alpha_dot_t, x0) * x0 + expand_like(sigma_dot_t, x0) * eps


def model_inputs(prediction: str, x_t: Array, t: Array, alpha_t: Array, sigma_t: Array, *,
                 sigma_data: float = 0.5) -> tuple[Array, Array]:
  """What the network sees: ``(x_t, t)``, or for ``'edm'`` ``(c_in x_t / alpha_t, c_noise)`` (EDM eq. 7)."""
  if prediction != 'edm':
    return x_t, t
  _, _, c_in, c_noise = edm_preconditioning(sigma_t / alpha_t, sigma_data)
  return expand_like(c_in / alpha_t, x_t) * x_t, c_noise


def denoise(model_fn: ModelFn, x_t: Array, t: Array, *, schedule: Schedule, prediction: str = 'eps',
            sigma_data: float = 0.5) -> tuple[Array, Array]:
  """Evaluates ``model_fn`` once and returns ``(x0_hat, eps_hat)`` in float32 (float64 for a float64 ``x_t``).

  Args:
    model_fn: ``(x [B, ...], t [B]) -> output [B, ...]`` in parameterisation ``prediction``; it may
      compute in bf16, its output is cast to float32 before any schedule arithmetic.
    x_t: [B, ...] noisy input at time ``t``.
    t: [] or [B] schedule time.
  """
  dtype = float_dtype(x_t)
  x_t = jnp.asarray(x_t, dtype)
  t = jnp.broadcast_to(jnp.asarray(t, dtype), x_t.shape[:1])
  alpha_t, sigma_t = schedule.alpha_sigma(t)
  x_in, t_in = model_inputs(prediction, x_t, t, alpha_t, sigma_t, sigma_data=sigma_data)
  output = model_fn(x_in, t_in).astype(dtype)
  alpha_dot_t, sigma_dot_t = schedule.alpha_sigma_dot(t) if prediction in RATE_PREDICTIONS else (None, None)
  return x0_eps_from_output(prediction, output, x_t, alpha_t, sigma_t, sigma_data=sigma_data,
                            alpha_dot_t=alpha_dot_t, sigma_dot_t=sigma_dot_t)


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """A model in a parameterisation under a schedule: ``denoiser(x_t [B, ...], t [] | [B]) -> (x0_hat, eps_hat)``.

  What every sampler takes. ``Denoiser(model_fn, schedule)`` wraps an eps-model; ``prediction`` and
  ``sigma_data`` say how to read its output (:func:`denoise`); ``clip_x0`` clips ``x0_hat`` to
  ``[-clip_x0, clip_x0]`` and then recomputes ``eps_hat = (x_t - alpha_t x0_hat) / sigma_t`` so the two stay
  consistent (as DDPM/DDIM reference code does with ``clip_denoised``). Both outputs are float32 (float64 for a
  float64 ``x_t``).
  """

  model_fn: ModelFn
  schedule: Schedule
  prediction: str = 'eps'
  sigma_data: float = 0.5
  clip_x0: float | None = None

  def __post_init__(self):
    check_prediction(self.prediction)

  def __call__(self, x_t: Array, t: Array) -> tuple[Array, Array]:
    x0, eps = denoise(self.model_fn, x_t, t, schedule=self.schedule, prediction=self.prediction,
                      sigma_data=self.sigma_data)
    if self.clip_x0 is not None:
      alpha_t, sigma_t = self.schedule.alpha_sigma(jnp.asarray(t, x0.dtype))
      x0 = jnp.clip(x0, -self.clip_x0, self.clip_x0)
      eps = (x_t - expand_like(alpha_t, x_t) * x0) / expand_like(sigma_t, x_t)
    return x0, eps


def score_from_eps(eps: Array, sigma_t: Array) -> Array:
  """``grad_x log p_t(x) = -eps / sigma_t`` (Song et al. 2021, denoising score matching identity)."""
  return -eps / expand_like(sigma_t, eps)


def classifier_free_guidance(model_fn: Callable[[Array, Array, object], Array], *, cond: object,
                             null_cond: object, scale: float | Array) -> ModelFn:
  """Ho & Salimans 2022, eq. 6: ``out = out(x, null) + w (out(x, cond) - out(x, null))``.

  Returns a plain :data:`ModelFn` so every sampler takes guidance. Both branches run in one batched call
  (batch 2B) and count as one model evaluation. ``scale = 1`` is the conditional model, ``0`` the
  unconditional one. ``cond`` / ``null_cond`` are pytrees with leading axis B (labels [B] or context
  [B, L, D]). Because conversions between parameterisations are affine for fixed ``(x_t, t)``, guiding
  ``eps``, ``x0``, ``v`` or ``F`` gives the same sampler update.
  """

  def guided(x, t):
    both = jax.tree.map(lambda c, n: jnp.concatenate([c, n], axis=0), cond, null_cond)
    out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
    out_cond, out_null = jnp.split(out.astype(float_dtype(out)), 2, axis=0)
    return out_null + scale * (out_cond - out_null)

  return guided

