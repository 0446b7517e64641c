"""DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models"): exponential integrators of the probability-flow ODE in the data prediction.

With ``lambda_t = log(alpha_t / sigma_t)`` (half the log-SNR) the ODE's exact solution from ``s`` to ``t``
is (DPM-Solver++ sec. 4.1)

  x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x0_hat(x_lambda, lambda) dlambda,

and with ``h = lambda_t - lambda_s`` and ``x0_hat`` frozen at ``s`` this is the first-order step
``x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x0_hat``, algebraically DDIM with ``eta = 0``.
Higher orders replace ``x0_hat`` by a finite-difference expansion in ``lambda``:

  * ``order=2, method='multistep'`` -- DPM-Solver++(2M) (Alg. 2): ``D = (1 + 1/(2 r)) m_0 - 1/(2 r) m_1``
    with the previous step's x0-prediction ``m_1`` and ``r = h_prev / h``; one model call per step.
  * ``order=3, method='multistep'`` -- DPM-Solver++(3M), the third-order multistep update of the reference
    implementation (and diffusers): with ``r_0 = h_prev / h``, ``r_1 = h_prev2 / h``,
    ``D1 = D1_0 + r_0 / (r_0 + r_1) (D1_0 - D1_1)``, ``D2 = (D1_0 - D1_1) / (r_0 + r_1)`` (``D1_0`` and
    ``D1_1`` the scaled differences of consecutive x0-predictions) and ``phi_1 = e^-h - 1``,
    ``phi_2 = phi_1 / h + 1``, ``phi_3 = phi_2 / h - 1/2``:
    ``x_t = (sigma_t / sigma_s) x_s - alpha_t phi_1 m_0 + alpha_t phi_2 D1 - alpha_t phi_3 D2``.
  * ``order=2, method='singlestep'`` -- DPM-Solver++(2S) (Alg. 1 with ``r = 1/2``): a first-order step to
    the log-SNR midpoint ``s_1`` gives ``u``, then ``D = x0_hat(u, s_1)``; two model calls per step.
  * ``order=2, method='sde'`` -- SDE-DPM-Solver++(2M) (Lu et al. 2022b's SDE solver; diffusers'
    ``algorithm_type='sde-dpmsolver++'``, midpoint form): the reverse SDE solved exactly in the linear part,

      x_t = (sigma_t / sigma_s) e^-h x_s + alpha_t (1 - e^-2h) (m_0 + D1 / 2) + sigma_t sqrt(1 - e^-2h) z,

    ``D1 = (m_0 - m_1) / r``, ``z ~ N(0, I)`` fresh at every step; one model call per step. Its first order
    (``D1 = 0``) is ancestral DDPM on the grid, DDIM with ``eta = 1``.

Multistep methods warm up with lower orders (the first step is first order, 3M's second is second order).

Time grid and evaluation count: ``num_steps`` grid intervals of :func:`base.time_grid` (``spacing='log_snr'``,
uniform in log-SNR from ``t_start`` to ``schedule.t_min``, by default; also ``'linspace'``, uniform in
time, and ``'karras'``, or a grid given as data). With ``denoise_to_zero=True`` the grid's last interval goes
from ``t_min`` to the clean sentinel ``t = 0`` and that step is the first-order jump to the x0-prediction (the
reference implementation's ``denoise_to_zero``, diffusers' ``final_sigmas_type='zero'``); with ``False``
(default) the ``num_steps`` intervals end at ``t_min`` and ``x_{t_min}`` is returned. Model
evaluations: ``num_steps`` for multistep; ``2 num_steps`` for 2S, less one when the last step is the jump.
``lower_order_final`` (as in diffusers) lowers the order of the last two steps to 1 and 2 when
``num_steps < 15``, which stabilises very short multistep runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import base
from diffax.diffusion.schedules import Schedule

Array = jax.Array
METHODS = ('multistep', 'singlestep', 'sde')
LOWER_ORDER_FINAL_BELOW = 15


def multistep_orders(num_steps: int, order: int, *, lower_order_final: bool,
                     denoise_to_zero: bool) -> np.ndarray:
  """The order of each of ``num_steps`` multistep updates [num_steps] (int32).

  Warm-up ``min(order, i + 1)``; with ``lower_order_final`` and fewer than 15 steps the last two steps use at
  most orders 1 and 2 (diffusers' ``lower_order_final`` / ``lower_order_second``); the jump to ``t = 0`` is
  always first order.
  """
  i = np.arange(num_steps)
  orders = np.minimum(order, i + 1)
  if lower_order_final and num_steps < LOWER_ORDER_FINAL_BELOW:
    orders = np.minimum(orders, num_steps - i)
  if denoise_to_zero:
    orders[-1] = 1
  return orders.astype(np.int32)


def _alpha_sigma_lambda(schedule: Schedule, t: Array) -> tuple[Array, Array, Array]:
  """``(alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t))``; ``lambda = +inf`` at the clean ``t = 0``."""
  alpha_t, sigma_t = base.alpha_sigma_clean(schedule, t)
  return alpha_t, sigma_t, jnp.log(alpha_t) - jnp.log(sigma_t)


def _first_order(x: Array, x0: Array, sigma_s: Array, alpha_t: Array, sigma_t: Array, h: Array) -> Array:
  """First-order step ``x_t = (sigma_t / sigma_s) x_s - alpha_t (e^-h - 1) x0``; finite at ``t = 0``."""
  return (sigma_t / sigma_s) * x - (alpha_t * jnp.expm1(-h)) * x0


def dpm_solver_sample(denoiser: Denoiser, rng: Array, shape: Sequence[int], *, num_steps: int = 20,
                      order: int = 2, method: str = 'multistep', spacing: base.Spacing = 'log_snr',
                      lower_order_final: bool = True, denoise_to_zero: bool = False, t_start: float | None = None,
                      x_T: Array | None = None, inpaint: base.Inpaint | None = None,
                      return_trajectory: bool = False) -> base.SampleOutput:
  """Samples [*shape] with DPM-Solver++ (module docstring gives the updates and the evaluation count).

  Defaults by measurement (``experiments/results/sampler_accuracy_few_step.md``, exact mixtures, LinearSchedule,
  sliced W2 at 5 / 10 / 20 NFE): 2M on the log-SNR grid from :func:`base.default_start`, stopping at ``t_min``
  with ``lower_order_final``. All ``num_steps`` steps then share the log-SNR range, where the jump spends one
  evaluation on the step from ``t_min`` to 0 and leaves the others longer: ring 0.065 / 0.047 / 0.042 against
  0.067 / 0.053 / 0.042 with the jump, 64-D 0.043 / 0.019 / 0.018 against 0.044 / 0.020 / 0.018 (equal from 15
  NFE on). ``lower_order_final`` wins on the ring (without it 0.104 / 0.048) and at 10 on the 64-D mixture
  (0.020), loses at 5 there (0.021); diffusers' time-uniform ``'linspace'`` loses everywhere (0.22 / 0.075 on the
  ring at 5 / 10). A grid optimised for the model (``spacing=`` a file of :func:`grid_search.optimize_grid`) is
  the best measured at 5 NFE: 0.038 (ring) and 0.018 (64-D, the floor 0.017). On the cosine digits default
  (``experiments/results/few_step_digits.md``) these defaults give digits_fd 9.8 at 5 NFE and 7.5 at 10.

  Args:
    denoiser: the model under its schedule and parameterisation.
    rng: PRNG key for the prior draw (and the step noise of ``'sde'``).
    shape: [B, ...] of the samples.
    num_steps: grid intervals; model evaluations for the multistep methods.
    order: 1 (DDIM; DDPM for ``'sde'``), 2 or 3 (multistep only).
    method: ``'multistep'`` (2M, 3M), ``'singlestep'`` (2S) or ``'sde'`` (2M-SDE).
    spacing: see :func:`base.time_grid`; ``'log_snr'`` is the paper's default.
    lower_order_final: lower the last two multistep orders when ``num_steps < 15``.
    denoise_to_zero: end with the jump from ``t_min`` to the x0-prediction (else, the default, return
      ``x_{t_min}``).
    t_start: start time (SDEdit); ``x_T`` must then be the noised input at ``t_start``.
  """
  schedule = denoiser.schedule
  if method not in METHODS:
    raise ValueError(f'Unknown method {method!r}; choose one of {METHODS}.')
  max_order = {'multistep': 3, 'singlestep': 2, 'sde': 2}[method]
  if order not in range(1, max_order + 1):
    raise ValueError(f'order={order} is not available for method={method!r}; choose 1 to {max_order}.')
  dtype = base.float_dtype(x_T)
  ts = base.solver_grid(schedule, num_steps, spacing, denoise_to_zero=denoise_to_zero, t_start=t_start, dtype=dtype)

  if method == 'singlestep':
    step, state = _singlestep(denoiser, schedule, order), None
    nfe = order * num_steps - (order - 1) * int(denoise_to_zero)
  else:
    orders = jnp.asarray(multistep_orders(num_steps, order, lower_order_final=lower_order_final,
                                          denoise_to_zero=denoise_to_zero))
    step = (_sde if method == 'sde' else _multistep)(denoiser, schedule, order, orders)
    # (step index, x0-predictions [order - 1, *shape] and lambdas [order - 1] of the previous points).
    state = (jnp.int32(0), jnp.zeros((order - 1, *shape), dtype), jnp.zeros((order - 1,), dtype))
    nfe = num_steps
  return base.run(step, rng, shape, ts, schedule=schedule, nfe=nfe, state=state, x_T=x_T, inpaint=inpaint,
                  return_trajectory=return_trajectory)


def _multistep(denoiser: Denoiser, schedule: Schedule, order: int, orders: Array) -> base.Step:
  """DPM-Solver++(1, 2M, 3M) steps; ``orders`` [num_steps] gives each step's order."""

  def step(x, state, t_cur, t_next, key):
    del key
    i, m_prev, lam_prev = state
    _, sigma_s, lam_s = _alpha_sigma_lambda(schedule, t_cur)
    alpha_t, sigma_t, lam_t = _alpha_sigma_lambda(schedule, t_next)
    h = lam_t - lam_s
    m0, _ = denoiser(x, t_cur)
    x_first = _first_order(x, m0, sigma_s, alpha_t, sigma_t, h)
    phi_1 = jnp.expm1(-h)

    def first(_):
      return x_first

    def second(_):
      r = (lam_s - lam_prev[0]) / h
      d = (1.0 + 0.5 / r) * m0 - (0.5 / r) * m_prev[0]
      return _first_order(x, d, sigma_s, alpha_t, sigma_t, h)

    def third(_):
      r0, r1 = (lam_s - lam_prev[0]) / h, (lam_prev[0] - lam_prev[1]) / h
      d1_0, d1_1 = (m0 - m_prev[0]) / r0, (m_prev[0] - m_prev[1]) / r1
      d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
      d2 = (d1_0 - d1_1) / (r0 + r1)
      phi_2 = phi_1 / h + 1.0
      phi_3 = phi_2 / h - 0.5
      return x_first + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2

    x_next = jax.lax.switch(orders[i] - 1, (first, second, third)[:order], None)
    m_prev = jnp.concatenate([m0[None], m_prev], axis=0)[:order - 1]
    lam_prev = jnp.concatenate([lam_s[None], lam_prev], axis=0)[:order - 1]
    return x_next, (i + 1, m_prev, lam_prev)

  return step


def _sde(denoiser: Denoiser, schedule: Schedule, order: int, orders: Array) -> base.Step:
  """SDE-DPM-Solver++(1, 2M) steps (midpoint form); ``orders`` [num_steps] gives each step's order."""

  def step(x, state, t_cur, t_next, key):
    i, m_prev, lam_prev = state
    _, sigma_s, lam_s = _alpha_sigma_lambda(schedule, t_cur)
    alpha_t, sigma_t, lam_t = _alpha_sigma_lambda(schedule, t_next)
    h = lam_t - lam_s
    m0, _ = denoiser(x, t_cur)
    one_minus = -jnp.expm1(-2.0 * h)  # 1 - e^-2h; 1 at the clean t = 0
    d = m0
    if order == 2:
      r = (lam_s - lam_prev[0]) / h
      d = jnp.where(orders[i] == 2, m0 + (0.5 / r) * (m0 - m_prev[0]), m0)
    noise = jax.random.normal(key, x.shape, x.dtype)
    x_next = (sigma_t / sigma_s * jnp.exp(-h)) * x + (alpha_t * one_minus) * d
    x_next = x_next + (sigma_t * jnp.sqrt(one_minus)) * noise
    m_prev = jnp.concatenate([m0[None], m_prev], axis=0)[:order - 1]
    lam_prev = jnp.concatenate([lam_s[None], lam_prev], axis=0)[:order - 1]
    return x_next, (i + 1, m_prev, lam_prev)

  return step


def _singlestep(denoiser: Denoiser, schedule: Schedule, order: int) -> base.Step:
  """DPM-Solver++(2S) steps (Alg. 1, ``r = 1/2``), or first-order steps for ``order=1``."""

  def step(x, state, t_cur, t_next, key):
    del key
    _, sigma_s, lam_s = _alpha_sigma_lambda(schedule, t_cur)
    alpha_t, sigma_t, lam_t = _alpha_sigma_lambda(schedule, t_next)
    h = lam_t - lam_s
    m0, _ = denoiser(x, t_cur)

    def first(_):
      return _first_order(x, m0, sigma_s, alpha_t, sigma_t, h)

    def second(_):
      # Midpoint in log-SNR; its lambda is re-read from the schedule so r matches the time the model sees.
      t_mid = schedule.t_from_log_snr(lam_s + lam_t)
      alpha_mid, sigma_mid, lam_mid = _alpha_sigma_lambda(schedule, t_mid)
      r = (lam_mid - lam_s) / h
      u = _first_order(x, m0, sigma_s, alpha_mid, sigma_mid, lam_mid - lam_s)
      m_mid, _ = denoiser(u, t_mid)
      d = (1.0 - 0.5 / r) * m0 + (0.5 / r) * m_mid
      return _first_order(x, d, sigma_s, alpha_t, sigma_t, h)

    if order == 1:
      return first(None), state
    return jax.lax.cond(t_next > 0, second, first, None), state

  return step
