"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models"), in the data prediction, on the probability-flow ODE.

With ``lambda_t = log(alpha_t / sigma_t)``, ``h = lambda_t - lambda_s``, the x0-predictions ``m_0`` at ``s``
and ``m_k`` at earlier points ``s_k`` (``r_k = (lambda_{s_k} - lambda_s) / h < 0``, ``D_k = (m_k - m_0) /
r_k``), and ``B(h)`` either ``h`` (``variant='bh1'``) or ``e^h - 1`` (``'bh2'``):

  UniP-p (sec. 3.2, the predictor):
    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) m_0 - alpha_t B(h) sum_{k<p} a_k D_k,
  UniC-p (sec. 3.1, the corrector, once ``m_t`` at the predicted ``x_t`` is known; the step gets order p + 1):
    x_t^c = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) m_0 - alpha_t B(h) (sum_{k<p} a_k D_k + a_p (m_t - m_0)),

with the coefficients solving ``R_p a = g_p / B(h)`` (Theorem 3.1), ``R_p[i, k] = r_k^i`` (``r_p = 1`` for
UniC) and ``g_i = (-h) phi_{i+1}(-h) i!`` (``phi_1(z) = (e^z - 1) / z``, ``phi_{k+1}(z) = (phi_k(z) - 1/k!) /
z``). As in the reference implementation and diffusers, UniP-2 takes ``a_1 = 1/2`` and UniC-1 ``a_1 = 1/2``
(the leading term of the solution, enough for the order). UniP-1 is DDIM (DPM-Solver++(1)).

One model evaluation per step: the corrector of step ``s -> t`` reuses the model call at the predicted ``x_t``
that the next predictor needs (so it is free), and the corrected ``x_t^c`` carries on while ``m_t`` stays the
prediction at the uncorrected point. The last step has no later call, so it is left uncorrected unless
``final_corrector=True`` spends one more evaluation on it: at the predicted ``x_{t_min}`` (then corrected and
returned, or, with ``denoise_to_zero``, denoised by a second call at the corrected point).

Orders: multistep warm-up ``min(order, i + 1)``; with ``lower_order_final`` step ``i`` of ``N`` uses at most
``N - i`` (diffusers' UniPC rule, at every ``N``); the jump to ``t = 0`` is first order. Grids are
:func:`base.solver_grid` in diffusers' multistep convention (``'linspace'`` is diffusers' UniPC ``linspace``).
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import base
from diffax.diffusion.schedules import Schedule

Array = jax.Array
VARIANTS = ('bh1', 'bh2')
_SERIES_TERMS = 12  # phi_k(z) by its Taylor series for |z| < 1: the next term is below 1 / 12! ~ 2e-9.


def phi(z: Array, k: int) -> Array:
  """``phi_k(z) = sum_j z^j / (j + k)!`` (``phi_0 = e^z``): the recursion ``(phi_{k-1}(z) - 1/(k-1)!) / z`` for
  ``|z| >= 1``, the series below it, where the recursion cancels (its error grows like ``|z|^-k``)."""
  series = sum(jnp.power(z, j) / float(math.factorial(j + k)) for j in range(_SERIES_TERMS))
  z_far = jnp.where(jnp.abs(z) >= 1.0, z, 1.0)
  rec = jnp.exp(z_far)
  for i in range(k):
    rec = (rec - 1.0 / float(math.factorial(i))) / z_far
  return jnp.where(jnp.abs(z) >= 1.0, rec, series)


def unipc_coefficients(rks: Array, h: Array, variant: str, num: int) -> Array:
  """``a`` [num] solving the first ``num`` rows of ``R a = g / B(h)`` for ``rks`` [num] (module docstring)."""
  z = -h
  b_h = z if variant == 'bh1' else jnp.expm1(z)
  g = jnp.stack([z * phi(z, i + 2) * float(math.factorial(i + 1)) for i in range(num)]) / b_h
  r = jnp.stack([jnp.power(rks, i) for i in range(num)])
  return jnp.linalg.solve(r, g)


def _lambda(schedule: Schedule, t: Array) -> tuple[Array, Array, Array]:
  """``(alpha_t, sigma_t, lambda_t)``; ``lambda = +inf`` at the clean ``t = 0``."""
  alpha_t, sigma_t = base.alpha_sigma_clean(schedule, t)
  return alpha_t, sigma_t, jnp.log(alpha_t) - jnp.log(sigma_t)


def _update(x: Array, m0: Array, ms: Array, lams: Array, lam_s: Array, sigma_s: Array, alpha_t: Array,
            sigma_t: Array, lam_t: Array, *, order: int, variant: str, m_t: Array | None) -> Array:
  """UniP-``order`` (``m_t=None``) or UniC-``order`` from ``x`` at ``s`` to ``t``; ``ms`` [>= order - 1, *shape]
  are the earlier x0-predictions (latest first), ``lams`` their lambdas."""
  h = lam_t - lam_s
  x_t = (sigma_t / sigma_s) * x - (alpha_t * jnp.expm1(-h)) * m0
  num = order - 1 if m_t is None else order
  if num == 0:
    return x_t
  rks = [(lams[k] - lam_s) / h for k in range(order - 1)]
  diffs = [(ms[k] - m0) / rks[k] for k in range(order - 1)]
  if m_t is not None:
    rks.append(jnp.ones_like(h))
    diffs.append(m_t - m0)
  if num == 1:
    a = jnp.full((1,), 0.5, h.dtype)
  else:
    a = unipc_coefficients(jnp.stack(rks), h, variant, num)
  b_h = -h if variant == 'bh1' else jnp.expm1(-h)
  return x_t - (alpha_t * b_h) * sum(a[k] * diffs[k] for k in range(num))


def unipc_plan(num_steps: int, order: int, *, corrector: bool, final_corrector: bool, lower_order_final: bool,
               denoise_to_zero: bool) -> tuple[np.ndarray, np.ndarray]:
  """Per scan iteration: the predictor order (0: none, the corrector-only iteration that ``final_corrector``
  appends without ``denoise_to_zero``) and the corrector order applied first (0: none), both int32."""
  i = np.arange(num_steps)
  p_orders = np.minimum(order, i + 1)
  if lower_order_final:
    p_orders = np.minimum(p_orders, num_steps - i)
  if denoise_to_zero:
    p_orders[-1] = 1
  c_orders = np.concatenate([[0], p_orders[:-1]]) if corrector else np.zeros(num_steps, np.int64)
  if final_corrector and not denoise_to_zero:
    p_orders, c_orders = np.append(p_orders, 0), np.append(c_orders, p_orders[-1])
  return p_orders.astype(np.int32), c_orders.astype(np.int32)


def unipc_sample(denoiser: Denoiser, rng: Array, shape: Sequence[int], *, num_steps: int = 10, order: int = 2,
                 variant: str = 'bh2', corrector: bool = True, final_corrector: bool = False,
                 spacing: base.Spacing = 'log_snr', lower_order_final: bool = True, denoise_to_zero: bool = False,
                 t_start: float | None = None, x_T: Array | None = None, inpaint: base.Inpaint | None = None,
                 return_trajectory: bool = False) -> base.SampleOutput:
  """Samples [*shape] with UniPC (module docstring); ``num_steps + final_corrector`` model evaluations.

  Defaults chosen from ``experiments/results/sampler_accuracy_few_step.md`` (exact mixtures, LinearSchedule,
  sliced W2 at 5 / 10 / 20 NFE): UniPC-2 with ``B(h) = e^h - 1`` on the log-SNR grid from
  :func:`base.default_start`, ending at ``t_min`` without the jump to the x0-prediction, with
  ``lower_order_final``: ring 0.068 / 0.045 / 0.042, 64-D 0.036 / 0.020 / 0.017. The jump costs at 5-10 (ring
  0.074 / 0.048, 64-D 0.036 / 0.022); without ``lower_order_final`` the ring loses at 5 (0.118) and both lose at
  10 (0.045 / 0.021), the 64-D mixture gains at 5 (0.022); diffusers' ``'linspace'`` loses everywhere (0.22 /
  0.15 at 5). Order 3 overshoots below 15 evaluations (``sampler_accuracy.md``). A grid optimised for the model
  (:func:`grid_search.optimize_grid`) is the best configuration measured at 5 NFE on the 64-D mixture (0.0175,
  the floor 0.0173) and 0.039 on the ring.

  Args:
    denoiser: the model under its schedule and parameterisation.
    rng: PRNG key for the prior draw.
    shape: [B, ...] of the samples.
    num_steps: solver steps (each one model evaluation).
    order: predictor order ``p`` (1 to 3); with the corrector the steps have order ``p + 1``.
    variant: ``'bh1'`` (``B(h) = h``, the paper's choice for unconditional sampling) or ``'bh2'``
      (``B(h) = e^h - 1``, diffusers' default, the paper's for guided sampling).
    corrector: apply UniC after every step that a later model call allows (``False`` is UniP alone).
    final_corrector: also correct the last step, at the cost of one more model evaluation.
    spacing: grid of :func:`base.solver_grid` (diffusers' multistep convention).
    lower_order_final: cap the order of step ``i`` at ``num_steps - i``.
    denoise_to_zero: the last step jumps to the x0-prediction (else it ends at ``t_min``).
    t_start: start time (SDEdit); ``x_T`` must then be the noised input at ``t_start``.
    return_trajectory: ``x`` at every grid time, ``x_T`` first: [num_steps + 1, *shape] (one more entry, the
      corrected endpoint, for ``final_corrector`` without ``denoise_to_zero``).
  """
  schedule = denoiser.schedule
  if variant not in VARIANTS:
    raise ValueError(f'Unknown variant {variant!r}; choose one of {VARIANTS}.')
  if order not in (1, 2, 3):
    raise ValueError(f'order={order} is not available; choose 1, 2 or 3.')
  if final_corrector and not corrector:
    raise ValueError('final_corrector=True needs corrector=True.')
  dtype = base.float_dtype(x_T)
  ts = base.solver_grid(schedule, num_steps, spacing, denoise_to_zero=denoise_to_zero, t_start=t_start, dtype=dtype)
  p_orders, c_orders = unipc_plan(num_steps, order, corrector=corrector, final_corrector=final_corrector,
                                  lower_order_final=lower_order_final, denoise_to_zero=denoise_to_zero)
  if len(p_orders) > num_steps:
    ts = jnp.append(ts, ts[-1])
  reeval = final_corrector and denoise_to_zero
  tables = (jnp.asarray(p_orders), jnp.asarray(c_orders))

  def step(x, state, t_cur, t_next, key):
    del key
    i, ms, lams, x_prev, sigma_prev = state
    p_order, c_order = tables[0][i], tables[1][i]
    alpha_s, sigma_s, lam_s = _lambda(schedule, t_cur)
    alpha_t, sigma_t, lam_t = _lambda(schedule, t_next)
    m, _ = denoiser(x, t_cur)

    def correct(k):  # UniC-k of the previous step, from x_prev (at lams[0]) to x at t_cur.
      return lambda _: _update(x_prev, ms[0], ms[1:], lams[1:], lams[0], sigma_prev, alpha_s, sigma_s, lam_s,
                               order=k, variant=variant, m_t=m)

    x = jax.lax.switch(c_order, [lambda _: x] + [correct(k) for k in range(1, order + 1)], None)
    if reeval:
      m = jax.lax.cond(t_next > 0, lambda: m, lambda: denoiser(x, t_cur)[0])
    ms_new = jnp.concatenate([m[None], ms[:-1]], axis=0)
    lams_new = jnp.concatenate([lam_s[None], lams[:-1]], axis=0)

    def predict(k):
      return lambda _: _update(x, m, ms_new[1:], lams_new[1:], lam_s, sigma_s, alpha_t, sigma_t, lam_t,
                               order=k, variant=variant, m_t=None)

    x_next = jax.lax.switch(p_order, [lambda _: x] + [predict(k) for k in range(1, order + 1)], None)
    return x_next, (i + 1, ms_new, lams_new, x, sigma_s)

  # (step index, earlier x0-predictions [order, *shape] (latest first) and their lambdas [order], the previous
  # step's start x_prev [*shape] and its sigma).
  state = (jnp.int32(0), jnp.zeros((order, *shape), dtype), jnp.zeros((order,), dtype), jnp.zeros(tuple(shape), dtype),
           jnp.ones((), dtype))
  nfe = len(p_orders) + int(reeval)
  return base.run(step, rng, shape, ts, schedule=schedule, nfe=nfe, state=state, x_T=x_T, inpaint=inpaint,
                  return_trajectory=return_trajectory)
