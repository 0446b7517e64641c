"""Time grids optimised for a model, a sampler and a budget of steps: the grid that minimises the sampler's global
error against a fine solve of the probability-flow ODE from the same starts.

For a deterministic sampler ``S`` with ``N`` steps on the grid ``ts``, calibration starts ``x_T^b`` [B, ...]
(prior draws) and the reference endpoints ``x_ref^b`` of the same starts (DPM-Solver++(2M) on ``reference_steps``
log-SNR steps, the ODE's solution to well below the few-step error), the objective is the mean squared error

  E(ts) = 1/(B D) sum_b ||S(x_T^b; ts) - x_ref^b||^2,

minimised with Adam through the sampler (every grid sampler is differentiable in its times). The grid runs
from ``t_start`` (default ``base.default_start``, where the log-SNR grid starts) down to ``t_min`` in log-SNR
``lambda`` and stays strictly descending by
construction: with ``theta`` [N] and ``f = cumsum(softmax(theta))``, its interior times are
``t(lambda_start + f_i (lambda_min - lambda_start))`` for ``i < N - 1``; it ends at ``t_min`` when the sampler
stops there (``denoise_to_zero=False``) or, after its ``N`` evaluation times, at the clean sentinel 0 (the last
evaluation time is then free too). ``theta = 0`` is the log-SNR-uniform grid, the start of the search, and the
best grid seen on the calibration batch is returned, so it is never worse there than log-SNR-uniform.

This is the sampler's own error as the criterion, where "Align Your Steps" (Sabour et al. 2024) minimises a KL
bound between the true and the discretised SDE; on an exact Gaussian mixture everything is closed form, for a
trained network a search costs ``iterations`` forward and backward passes through ``N`` model calls on the
calibration batch (and one reference solve). Save the result with :func:`grid_file.save_grid` and sample with
``spacing=<file or times>``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import optax

from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import base, dpm_solver

Array = jax.Array
Sampler = Callable[..., base.SampleOutput]


def ends_at_zero(sampler: Sampler, sampler_kwargs: Mapping[str, Any] | None = None) -> bool:
  """Whether ``sampler`` run with ``sampler_kwargs`` ends with a step to ``t = 0`` (its ``denoise_to_zero``, given
  or default; samplers without one always do)."""
  kwargs = dict(sampler_kwargs or {})
  if 'denoise_to_zero' in kwargs:
    return bool(kwargs['denoise_to_zero'])
  parameter = inspect.signature(sampler).parameters.get('denoise_to_zero')
  return True if parameter is None else bool(parameter.default)


def reference_solve(denoiser: Denoiser, x_T: Array, *, to_zero: bool, reference_steps: int = 200,
                    t_start: float | None = None) -> Array:
  """The probability-flow ODE's endpoints [*x_T.shape] from ``x_T``: DPM-Solver++(2M) on ``reference_steps``
  log-SNR steps to ``t_min``, then (``to_zero``) the jump to the x0-prediction, as the few-step samplers end."""
  return dpm_solver.dpm_solver_sample(denoiser, jax.random.PRNGKey(0), x_T.shape, num_steps=reference_steps,
                                      spacing='log_snr', denoise_to_zero=to_zero, t_start=t_start,
                                      x_T=x_T).samples


def grid_error(denoiser: Denoiser, sampler: Sampler, spacing: base.Spacing, x_T: Array, reference: Array, *,
               num_steps: int, sampler_kwargs: Mapping[str, Any] | None = None) -> Array:
  """The objective ``E`` [] (module docstring): mean squared error of ``sampler``'s endpoints from ``x_T`` [B, ...]
  on the grid ``spacing`` against ``reference`` [B, ...]."""
  out = sampler(denoiser, jax.random.PRNGKey(0), x_T.shape, num_steps=num_steps, spacing=spacing, x_T=x_T,
                **dict(sampler_kwargs or {}))
  return jnp.mean(jnp.square(out.samples - reference))


def grid_from_logits(denoiser: Denoiser, theta: Array, *, to_zero: bool, t_start: float | None = None) -> Array:
  """The grid [N + 1] of the logits ``theta`` [N] (module docstring); ``theta = 0`` is log-SNR-uniform."""
  schedule = denoiser.schedule
  t_start = base.default_start(schedule) if t_start is None else t_start
  lam_start, lam_min = schedule.log_snr(jnp.float32(t_start)), schedule.log_snr(jnp.float32(schedule.t_min))
  frac = jnp.cumsum(jax.nn.softmax(theta))[:-1]
  inner = jnp.clip(schedule.t_from_log_snr(lam_start + frac * (lam_min - lam_start)), schedule.t_min, t_start)
  end = 0.0 if to_zero else schedule.t_min
  return jnp.concatenate([jnp.full((1,), t_start, jnp.float32), inner, jnp.full((1,), end, jnp.float32)])


def optimize_grid(denoiser: Denoiser, sampler: Sampler, rng: Array, shape: Sequence[int], *, num_steps: int,
                  sampler_kwargs: Mapping[str, Any] | None = None, t_start: float | None = None,
                  reference_steps: int = 200, iterations: int = 150, learning_rate: float = 0.05) -> Array:
  """The grid [num_steps + 1] that minimises ``sampler``'s global error on a calibration batch (module docstring).

  Args:
    denoiser: the model under its schedule and parameterisation (guided already, if it is to be sampled so).
    sampler: a deterministic grid sampler of :mod:`diffax.diffusion.samplers` (``unipc_sample``,
      ``dpm_solver_sample``, ``deis_sample``, ``ipndm_sample``, ``ddim_sample``, ``edm_heun_sample``, ...).
    rng: PRNG key of the calibration starts.
    shape: [B, ...] of the calibration batch.
    num_steps: the sampler's steps, the grid's length less one.
    sampler_kwargs: the sampler's other keywords as it will be run (``order``, ``denoise_to_zero``, ...); the
      grid is optimised for exactly that sampler and ends where it ends (0 or ``t_min``).
    t_start: start time (default ``base.default_start(schedule)``, where the log-SNR grid starts).
    reference_steps: DPM-Solver++(2M) log-SNR steps of the reference solve.
    iterations: Adam steps on the logits.
    learning_rate: Adam's step size on the logits.

  Returns:
    Descending times [num_steps + 1], float32, for ``spacing=`` of the sampler (or :func:`grid_file.save_grid`).
  """
  kwargs = dict(sampler_kwargs or {})
  for name in ('num_steps', 'spacing', 'x_T', 't_start'):
    if name in kwargs:
      raise ValueError(f'sampler_kwargs sets {name!r}, which optimize_grid chooses; pass it as its own argument.')
  to_zero = ends_at_zero(sampler, kwargs)
  x_T = denoiser.schedule.prior_sample(rng, tuple(shape))
  reference = reference_solve(denoiser, x_T, to_zero=to_zero, reference_steps=reference_steps, t_start=t_start)
  optimizer = optax.adam(learning_rate)

  def loss(theta):
    ts = grid_from_logits(denoiser, theta, to_zero=to_zero, t_start=t_start)
    return grid_error(denoiser, sampler, ts, x_T, reference, num_steps=num_steps, sampler_kwargs=kwargs)

  def body(carry, _):
    theta, opt_state, best_theta, best_loss = carry
    value, grad = jax.value_and_grad(loss)(theta)
    grad = jnp.where(jnp.isfinite(grad), grad, 0.0)
    better = value < best_loss
    best_theta, best_loss = jnp.where(better, theta, best_theta), jnp.where(better, value, best_loss)
    with jax.numpy_dtype_promotion('standard'):  # optax's Adam bias correction computes ``float ** int32``
      updates, opt_state = optimizer.update(grad, opt_state, theta)
    return (optax.apply_updates(theta, updates), opt_state, best_theta, best_loss), None

  @jax.jit
  def search(theta):
    carry = (theta, optimizer.init(theta), theta, jnp.float32(jnp.inf))
    (theta, _, best_theta, best_loss), _ = jax.lax.scan(body, carry, None, length=iterations)
    last = loss(theta)
    return jnp.where(last < best_loss, theta, best_theta)

  theta = search(jnp.zeros((num_steps,), jnp.float32))
  return grid_from_logits(denoiser, theta, to_zero=to_zero, t_start=t_start)
