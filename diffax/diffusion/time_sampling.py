"""Which noise levels a training loss visits: time distributions and their low-discrepancy variant.

Every method maps uniforms ``u`` [B] in [0, 1) to times, so the antithetic option of VDM applies to all:

  u_i = mod(u_0 + i / B, 1),   u_0 ~ U(0, 1)                  (Kingma et al. 2021, "VDM", app. I)

puts exactly one ``u_i`` in every bin ``[k / B, (k + 1) / B)`` while each ``u_i`` stays marginally uniform,
so the batch mean of a loss keeps its expectation and loses variance.

Methods of :func:`sample_times`, each returning times ``t`` [B] and importance weights [B]:
  * ``'discrete'``: a timestep ``n ~ U{0, ..., N - 1}`` on :func:`discrete_grid` (DDPM, Ho et al. 2020,
    Algorithm 1; SMLD's geometric noise levels for a VE schedule, Song & Ermon 2019).
  * ``'uniform'``: ``t ~ U(t_eps, t_max)`` (score-SDE, Song et al. 2021, eq. 7).
  * ``'log_snr'``: ``t`` uniform in log-SNR, i.e. with density ``p(t) proportional to -d log_snr / dt``,
    which equals ``g(t)^2 / sigma_t^2`` for every schedule (schedules eq. 2). The importance weights
    ``1 / ((t_max - t_eps) p(t))`` keep every expectation equal to the one under ``'uniform'``; with the
    likelihood weighting ``lambda(t) = g(t)^2`` they are constant, which is the importance sampling of
    Song et al. 2021b ("Maximum Likelihood Training of Score-Based Diffusion Models", sec. 5).
  * ``'lognormal'``: ``ln sigma ~ N(p_mean, p_std^2)`` with ``sigma = sigma_t / alpha_t`` (EDM, Karras et al.
    2022, Table 1), mapped to a time by ``t_from_log_snr(-2 ln sigma)`` and clipped to ``[t_min, t_max]``;
    on the EDM schedule ``t = sigma`` unclipped and the draw is ``EDM.training_sigma``.

The flow-matching time densities of SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers", sec. 3.1),
for schedules on ``t`` in [0, 1] (:data:`FLOW_TIME_SAMPLINGS`, with ``'uniform'``), clipped to
``[t_eps, t_max]``. SD3 counts them as loss weightings ``w_t = t / (1 - t) pi(t)`` on the eps-loss; here, as
there, ``t`` is drawn from ``pi`` and the importance weights are ones:
  * ``'logit_normal'``: ``t = sigmoid(loc + scale n)``, ``n ~ N(0, 1)`` (SD3 eq. 19, "lognorm(m, s)"; density
    ``pi(t) = exp(-(logit(t) - loc)^2 / (2 scale^2)) / (scale sqrt(2 pi) t (1 - t))``; SD3 trains with (0, 1)).
  * ``'mode'``: ``t = f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u)``, ``u ~ U(0, 1)`` (SD3 eq. 20, "mode(s)",
    ``s = mode_scale`` in ``[-1, 2 / (pi - 2)]``): uniform for ``s = 0``, more mass in the middle for ``s > 0``,
    and unlike the logit-normal a density that stays positive at both ends (heavy tails).
  * ``'cosmap'``: ``t = 1 - 1 / (tan(pi u / 2) + 1)`` (SD3 eq. 21, the cosine schedule's log-SNR density).

:func:`shift_times` is the resolution-dependent timestep shift (SD3 eq. 23), for training times and sampling
grids alike, with the shifts of SD3 (:func:`resolution_shift`) and Flux (:func:`flux_shift`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffax.diffusion.schedules import EDM, DiscreteSchedule, Schedule

Array = jax.Array
TIME_SAMPLINGS = ('discrete', 'uniform', 'log_snr', 'lognormal', 'logit_normal', 'mode', 'cosmap')
FLOW_TIME_SAMPLINGS = ('uniform', 'logit_normal', 'mode', 'cosmap')
"""The time densities of SD3's flow-matching comparison (module docstring), for schedules on [0, 1]."""


def stratified_uniform(rng: Array, batch_size: int, *, antithetic: bool = False) -> Array:
  """``u`` [B] float32 in [0, 1): i.i.d. uniform, or ``mod(u_0 + i / B, 1)`` if ``antithetic`` (VDM app. I)."""
  if not antithetic:
    return jax.random.uniform(rng, (batch_size,), jnp.float32)
  u0 = jax.random.uniform(rng, (), jnp.float32)
  return jnp.mod(u0 + jnp.arange(batch_size, dtype=jnp.float32) / batch_size, 1.0)


def resolve_num_timesteps(schedule: Schedule, num_timesteps: int | None) -> int:
  """``num_timesteps``, defaulting to ``T`` of a discrete schedule and to 1000 otherwise."""
  if num_timesteps is None:
    return schedule.num_timesteps if isinstance(schedule, DiscreteSchedule) else 1000
  if num_timesteps < 2:
    raise ValueError(f'num_timesteps must be at least 2, got {num_timesteps}.')
  return num_timesteps


def discrete_grid(schedule: Schedule, num_timesteps: int) -> Array:
  """The ``N`` noise levels of discrete-time training and of the VLB: [N] ascending times.

  The knots ``t_n = (n + 1) / T`` of a discrete schedule with ``N = T``; otherwise ``N`` times evenly
  spaced over ``[t_min, t_max]`` -- for ``VPSDE`` with ``N = 1000`` these are ``(n + 1) / N``, the DDPM
  discretisation of score-SDE, and for ``VESDE`` they give SMLD's geometric noise levels.
  """
  if isinstance(schedule, DiscreteSchedule) and num_timesteps == schedule.num_timesteps:
    return schedule.timestep_to_t(jnp.arange(num_timesteps))
  return jnp.linspace(schedule.t_min, schedule.t_max, num_timesteps, dtype=jnp.float32)


def sample_timesteps(rng: Array, batch_size: int, num_timesteps: int, *, antithetic: bool = False) -> Array:
  """Timestep indices ``n`` [B] int32, uniform over ``0 .. num_timesteps - 1``."""
  u = stratified_uniform(rng, batch_size, antithetic=antithetic)
  return jnp.minimum(jnp.floor(u * num_timesteps), num_timesteps - 1).astype(jnp.int32)


def sample_times(rng: Array, batch_size: int, *, schedule: Schedule, method: str = 'uniform',
                 antithetic: bool = False, num_timesteps: int | None = None, t_eps: float | None = None,
                 p_mean: float = -1.2, p_std: float = 1.2, loc: float = 0.0, scale: float = 1.0,
                 mode_scale: float = 1.29) -> tuple[Array, Array]:
  """Draws training times by ``method`` (module docstring).

  Args:
    rng: PRNG key.
    batch_size: B.
    schedule: the forward process.
    method: one of :data:`TIME_SAMPLINGS`.
    antithetic: stratify the underlying uniforms (VDM app. I).
    num_timesteps: N for ``'discrete'`` (see :func:`resolve_num_timesteps`).
    t_eps: lower end for ``'uniform'`` and ``'log_snr'``; defaults to ``schedule.t_min``.
    p_mean, p_std: ``'lognormal'`` constants; ignored on the EDM schedule, which holds its own.
    loc, scale: ``'logit_normal'``'s location and scale (SD3's ``m``, ``s``).
    mode_scale: ``'mode'``'s ``s`` (SD3's best: 1.29).

  Returns:
    ``t`` [B] float32 and importance weights [B] float32 (ones except for ``'log_snr'``).
  """
  if method not in TIME_SAMPLINGS:
    raise ValueError(f'Unknown time sampling {method!r}; choose one of {TIME_SAMPLINGS}.')
  ones = jnp.ones((batch_size,), jnp.float32)
  if method == 'discrete':
    n = resolve_num_timesteps(schedule, num_timesteps)
    return discrete_grid(schedule, n)[sample_timesteps(rng, batch_size, n, antithetic=antithetic)], ones
  if method == 'lognormal':
    return _lognormal_times(rng, batch_size, schedule, antithetic, p_mean, p_std), ones
  t_lo = schedule.t_min if t_eps is None else t_eps
  t_hi = schedule.t_max
  u = stratified_uniform(rng, batch_size, antithetic=antithetic)
  if method == 'uniform':
    return t_lo + u * (t_hi - t_lo), ones
  if method in FLOW_TIME_SAMPLINGS:
    return jnp.clip(_flow_times(u, schedule, method, loc, scale, mode_scale), t_lo, t_hi), ones
  lam_hi = schedule.log_snr(jnp.float32(t_lo))
  lam_lo = schedule.log_snr(jnp.float32(t_hi))
  t = jnp.clip(schedule.t_from_log_snr(lam_hi + u * (lam_lo - lam_hi)), t_lo, t_hi)
  _, dlam_dt = jax.jvp(schedule.log_snr, (t,), (jnp.ones_like(t),))
  return t, (lam_hi - lam_lo) / ((t_hi - t_lo) * -dlam_dt)


def _lognormal_times(rng: Array, batch_size: int, schedule: Schedule, antithetic: bool, p_mean: float,
                     p_std: float) -> Array:
  """EDM's training noise levels (Table 1) as times of ``schedule``."""
  if isinstance(schedule, EDM):
    if not antithetic:
      return schedule.training_sigma(rng, (batch_size,))
    p_mean, p_std = schedule.p_mean, schedule.p_std
  if antithetic:
    u = stratified_uniform(rng, batch_size, antithetic=True)
    normal = jax.scipy.special.ndtri(jnp.clip(u, 1e-7, 1.0 - 1e-7))
  else:
    normal = jax.random.normal(rng, (batch_size,), jnp.float32)
  sigma = jnp.exp(p_mean + p_std * normal)
  if isinstance(schedule, EDM):
    return sigma
  t = schedule.t_from_log_snr(-2.0 * jnp.log(sigma))
  return jnp.clip(t, schedule.t_min, schedule.t_max)


def _flow_times(u: Array, schedule: Schedule, method: str, loc: float, scale: float, mode_scale: float) -> Array:
  """SD3's time densities (module docstring) as maps of uniforms ``u`` [B] to ``t`` [B] in [0, 1]."""
  if schedule.t_max > 1.0:
    raise ValueError(f'time sampling {method!r} draws t in [0, 1]; {type(schedule).__name__} runs to t_max = '
                     f'{schedule.t_max}. Use a schedule on [0, 1] (e.g. rectified_flow, gvp, vp).')
  if method == 'logit_normal':
    if scale <= 0:
      raise ValueError(f'logit_normal needs scale > 0, got {scale}.')
    normal = jax.scipy.special.ndtri(jnp.clip(u, 1e-7, 1.0 - 1e-7))
    return jax.nn.sigmoid(loc + scale * normal)
  if method == 'mode':
    if not -1.0 <= mode_scale <= 2.0 / (math.pi - 2.0):
      raise ValueError(f'mode_scale must lie in [-1, 2 / (pi - 2)] = [-1, 1.752] for a monotone map (SD3 eq. 20), '
                       f'got {mode_scale}.')
    return 1.0 - u - mode_scale * (jnp.square(jnp.cos(0.5 * math.pi * u)) - 1.0 + u)
  return 1.0 - 1.0 / (jnp.tan(0.5 * math.pi * u) + 1.0)


def shift_times(t: Array, shift: float | Array) -> Array:
  """SD3 eq. 23: ``t' = shift t / (1 + (shift - 1) t)`` for ``t`` in [0, 1] (any shape).

  Keeps 0 and 1 and moves every time towards noise for ``shift > 1``; on the linear path it lowers the log-SNR
  by exactly ``2 log(shift)``, i.e. scales the noise-to-signal ratio ``sigma_t / alpha_t`` by ``shift``.
  """
  t = jnp.asarray(t, jnp.float32)
  return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(num_pixels: int, base_pixels: int = 256 * 256) -> float:
  """SD3's shift ``sqrt(m / n)`` (sec. 5.3.2) for ``m = num_pixels`` against the base resolution ``n``."""
  return math.sqrt(num_pixels / base_pixels)


def flux_shift(seq_len: int, *, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
               max_shift: float = 1.15) -> float:
  """Flux's shift ``exp(mu)``, ``mu`` linear in the image sequence length from ``base_shift`` at ``base_seq_len``
  tokens to ``max_shift`` at ``max_seq_len`` (Flux.1 ``get_schedule``; diffusers ``calculate_shift``)."""
  mu = base_shift + (max_shift - base_shift) * (seq_len - base_seq_len) / (max_seq_len - base_seq_len)
  return math.exp(mu)
