"""Probability-flow ODE samplers (fixed-step Heun, adaptive Runge-Kutta) and the deterministic encoder.

Every schedule ``x_t = alpha_t x_0 + sigma_t eps`` has a probability-flow ODE with the marginals of its SDE
``dx = f(t) x dt + g(t) dw`` (Song et al. 2021, "Score-Based Generative Modeling through SDEs", eq. 13):

  dx/dt = f(t) x - 1/2 g(t)^2 grad log p_t(x),     grad log p_t(x) = -eps_hat(x, t) / sigma_t.     (13)

Inserting ``f = d log(alpha_t)/dt`` and ``g^2 = d(sigma_t^2)/dt - 2 f sigma_t^2`` (schedules eq. 2) shows that
in the scale-free variables ``x_bar = x / alpha_t`` and ``sigma_bar = sigma_t / alpha_t = exp(-log_snr / 2)``
the same ODE reads

  d x_bar / d sigma_bar = eps_hat(x, t),     i.e.     d x_bar / du = sigma_bar eps_hat(x, t),  u = log sigma_bar
                                                                                                    (H)

(DDIM eq. 14; Karras et al. 2022, "EDM", eq. 4 with ``s(t) = alpha_t``, ``sigma(t) = sigma_bar``). In (H) a
trajectory no longer depends on the schedule, only on the log-SNR range, so we integrate (H) rather than (13)
in ``t``: a fixed step in ``t`` loses its order where ``sigma_t ~ sqrt(beta_min t)`` (VP near ``t = 0``), and
adaptive solves in ``t`` cost 2-3 times more steps for EDM (``t = sigma``) and discrete schedules than in
``u`` (measured on the ring mixture at rtol = atol = 1e-5: VP 22 vs 22, EDM 21 vs 48, cosine 40 vs 96 steps).

* Fixed steps: :func:`diffax.diffusion.samplers.edm.edm_heun_sample` (``s_churn = 0``) takes Heun steps in
  ``sigma_bar`` (EDM Algorithm 1) over any ``base.time_grid``; its Euler predictor is exactly a DDIM step, and
  its last step, to the clean sentinel ``t = 0`` (``sigma_bar = 0``), is an Euler step of (H), which is exactly
  the x0-prediction (Tweedie denoising).
* :func:`adaptive_ode_sample` and :func:`ode_encode` solve (H) in ``u`` with diffrax (``Tsit5`` or
  ``Dopri5``, PID step-size control; score-SDE uses RK45 with rtol = atol = 1e-5). One solve covers the
  whole batch: shared steps, error measured as the RMS over all entries (as score-SDE's ``solve_ivp`` on
  the flattened batch). :func:`probability_flow` is the vector field of (H); the likelihood reuses it.

Adaptive ``nfe``: both solvers have 7 stages and are FSAL (the last stage of a step is the first of the next,
and survives a rejected step), and the first step size is given (``u`` changes by 0.1), so
``nfe = 6 num_steps + 1`` with ``num_steps`` counting accepted and rejected steps (diffrax ``stats``). This is
exact unless the very first attempted step is rejected (diffrax then re-evaluates the first stage: one more
evaluation per such rejection).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import warnings

import diffrax
import jax
import jax.numpy as jnp

from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import base
from diffax.diffusion.schedules import Schedule

Array = jax.Array
VectorField = Callable[[Array, object], object]
"""``(u [], y) -> dy/du`` with ``y`` any pytree of arrays."""

SOLVERS = {'tsit5': diffrax.Tsit5, 'dopri5': diffrax.Dopri5}
_STAGES_PER_STEP = 6  # 7-stage FSAL pairs: one stage is carried over from the previous step.
_FIRST_STEP = 0.1  # |du| of the first attempted step.
LOOSE_TOLERANCE = 1e-3
"""Above this ``rtol`` or ``atol`` :func:`adaptive_ode_sample` warns. Measured with the exact mixture models on VP
(experiments/results/sampler_accuracy.md): sharpness (mean Mahalanobis^2 / D, 1 is exact) at rtol = atol = 1e-1,
3e-2, 1e-2, 1e-3: ring 4.0, 1.03, 1.63, 0.99; 64-D mixture 836, 4.5, 1.09, 1.005. The controller's error is an
RMS over the whole batch, so a loose tolerance lets individual samples land far off their modes."""


def flow_time(schedule: Schedule, t: Array | float) -> tuple[Array, Array]:
  """``(u, alpha_t)`` at schedule time ``t``: the time ``u = log sigma_bar = -log_snr / 2`` of (H) and the
  scale that maps ``x_bar`` back to ``x = alpha_t x_bar``."""
  t = jnp.asarray(t, jnp.float32)
  alpha_t, _ = schedule.alpha_sigma(t)
  return -0.5 * schedule.log_snr(t), alpha_t


def probability_flow(denoiser: Denoiser) -> Callable[[Array, Array], Array]:
  """The vector field of (H): ``(u [], x_bar [B, ...]) -> d x_bar / du`` [B, ...], one model evaluation.

  The model is evaluated at ``t = schedule.t_from_log_snr(-2 u)`` and ``x = alpha_t x_bar``.
  """
  schedule = denoiser.schedule

  def field(u, x_bar):
    u = jnp.asarray(u, jnp.float32)
    t = schedule.t_from_log_snr(-2.0 * u)
    alpha_t, _ = schedule.alpha_sigma(t)
    _, eps = denoiser(alpha_t * x_bar, t)
    return jnp.exp(u) * eps

  return field


def solve(vector_field: VectorField, y0: object, *, u0: Array, u1: Array, solver: str = 'tsit5',
          rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096,
          save_us: Array | None = None) -> tuple[object, object | None, Array]:
  """Integrates ``dy/du = vector_field(u, y)`` from ``u0`` to ``u1`` (either direction) adaptively.

  Returns ``(y(u1), ys, nfe)``: ``ys`` holds ``y`` at ``save_us`` [S] (leading axis S) or is None; ``nfe``
  (int32 []) counts evaluations of ``vector_field`` (module docstring). Fails at run time if ``max_steps``
  steps do not reach ``u1``.
  """
  if solver not in SOLVERS:
    raise ValueError(f'Unknown solver {solver!r}; choose one of {sorted(SOLVERS)}.')
  u0, u1 = jnp.asarray(u0, jnp.float32), jnp.asarray(u1, jnp.float32)
  saveat = diffrax.SaveAt(t1=True) if save_us is None else diffrax.SaveAt(t1=True, ts=save_us)
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(lambda u, y, args: vector_field(u, y)), SOLVERS[solver](), t0=u0, t1=u1,
      dt0=_FIRST_STEP * jnp.sign(u1 - u0), y0=y0, saveat=saveat,
      stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol), max_steps=max_steps)
  y1 = jax.tree.map(lambda y: y[-1], sol.ys)
  ys = None if save_us is None else jax.tree.map(lambda y: y[:-1], sol.ys)
  nfe = _STAGES_PER_STEP * jnp.asarray(sol.stats['num_steps'], jnp.int32) + 1
  return y1, ys, nfe


def adaptive_ode_sample(denoiser: Denoiser, rng: Array, shape: Sequence[int], *, solver: str = 'tsit5',
                        rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096, denoise: bool = True,
                        num_save_points: int = 11, t_start: float | None = None, t_end: float | None = None,
                        x_T: Array | None = None, inpaint: base.Inpaint | None = None,
                        return_trajectory: bool = False) -> base.SampleOutput:
  """Samples [*shape] by solving (H) adaptively from ``t_start`` (``t_max``) to ``t_end`` (``t_min``).

  Args:
    denoiser: the model under its schedule and parameterisation.
    rng: PRNG key for the prior draw.
    shape: [B, ...] of the samples.
    solver: ``'tsit5'`` or ``'dopri5'``; ``rtol``, ``atol`` for the PID step-size controller, applied to
      ``x_bar = x / alpha_t``.
    max_steps: solver steps before giving up (an error at run time).
    denoise: finish with the x0-prediction at ``t_end`` (one more evaluation), like the last step of
      the fixed-step Heun sampler; otherwise return ``x`` at ``t_end``.
    num_save_points: with ``return_trajectory``, the trajectory holds ``x`` at this many times uniform in
      log-SNR from ``t_start`` to ``t_end`` (``x_T`` first, ``x(t_end)`` last): [num_save_points, *shape].
    t_start: start time (SDEdit); ``x_T`` must then be the noised input at ``t_start``.
    inpaint: not supported (known pixels would have to be replaced between solver steps); use
      :func:`diffax.diffusion.samplers.edm.edm_heun_sample`.

  Returns:
    ``SampleOutput`` whose ``nfe`` is an int32 array (module docstring).
  """
  if inpaint is not None:
    raise ValueError('adaptive_ode_sample cannot inpaint: known pixels would have to be replaced between '
                     'solver steps, which one adaptive diffeqsolve does not allow. Use edm_heun_sample.')
  if max(rtol, atol) > LOOSE_TOLERANCE:
    warnings.warn(f'adaptive_ode_sample with rtol={rtol}, atol={atol}: tolerances above {LOOSE_TOLERANCE} give '
                  'samples far from the model\'s distribution (Mahalanobis ratios of 4 to 800 at 0.1 on exact '
                  'mixtures); use 1e-3 or tighter, or a fixed-step solver (unipc, deis, dpm_solver) for a small '
                  'budget.', UserWarning, stacklevel=2)
  schedule = denoiser.schedule
  t_end = schedule.t_min if t_end is None else t_end
  u0, alpha0 = flow_time(schedule, schedule.t_max if t_start is None else t_start)
  u1, alpha1 = flow_time(schedule, t_end)
  x, _ = base.initial_x(schedule, rng, tuple(shape), x_T)
  field = probability_flow(denoiser)
  save_us = jnp.linspace(u0, u1, num_save_points) if return_trajectory else None
  x_bar, trajectory, nfe = solve(field, x / alpha0, u0=u0, u1=u1, solver=solver, rtol=rtol, atol=atol,
                                 max_steps=max_steps, save_us=save_us)
  x = alpha1 * x_bar
  if return_trajectory:
    alpha_save, _ = schedule.alpha_sigma(schedule.t_from_log_snr(-2.0 * save_us))
    trajectory = alpha_save.reshape((-1,) + (1,) * len(shape)) * trajectory
  if denoise:
    x, _ = denoiser(x, jnp.float32(t_end))
    nfe = nfe + 1
  return base.SampleOutput(samples=x, nfe=nfe, trajectory=trajectory)


def ode_encode(denoiser: Denoiser, x: Array, *, solver: str = 'tsit5', rtol: float = 1e-5, atol: float = 1e-5,
               max_steps: int = 4096, t_start: float | None = None,
               t_end: float | None = None) -> tuple[Array, Array]:
  """Maps data ``x`` [B, ...] (taken as ``x`` at ``t_start``) to its latent at ``t_end`` along (H).

  ``t_start`` defaults to ``schedule.t_min`` and ``t_end`` to ``schedule.t_max``: the inverse of
  ``adaptive_ode_sample(..., denoise=False)`` up to solver tolerance (DDIM sec. 5.4, latent interpolation).
  Returns ``(z [B, ...], nfe)``.
  """
  schedule = denoiser.schedule
  u0, alpha0 = flow_time(schedule, schedule.t_min if t_start is None else t_start)
  u1, alpha1 = flow_time(schedule, schedule.t_max if t_end is None else t_end)
  x_bar, _, nfe = solve(probability_flow(denoiser),
                        jnp.asarray(x, jnp.float32) / alpha0,
                        u0=u0,
                        u1=u1,
                        solver=solver,
                        rtol=rtol,
                        atol=atol,
                        max_steps=max_steps)
  return alpha1 * x_bar, nfe
