"""Training losses, built by small factories as ``loss_fn(params, batch, rng) -> (loss, aux)``.

Every loss here regresses the model output onto its target at a random noise level, and every weighting
is written as a weight ``w(t)`` on the x0-space error:

  L = E_{t, x_0, eps} [ w(t) iw(t) ||x0_hat(x_t, t) - x_0||^2 ],   x_t = alpha_t x_0 + sigma_t eps,      (1)

with ``iw`` the importance weight of the time distribution (:mod:`time_sampling`). For fixed ``(x_t, t)``
every prediction is affine in ``x0_hat``, so its error is a multiple of the x0-space error,

  ||out - out*||^2 = c^2(t) ||x0_hat - x_0||^2,                                                         (2)
  c^2 = snr (eps), 1 (x0), (alpha^2 + sigma^2)^2 / sigma^2 (v), alpha^2 / sigma^4 (score), 1 / c_out^2 (edm),
        d^2 / sigma^2 (velocity; d = alpha sigma_dot - sigma alpha_dot, so 1 / t^2 on the linear path)

with ``snr = alpha_t^2 / sigma_t^2`` (e.g. ``||eps - eps_hat||^2 = snr ||x_0 - x0_hat||^2``). The loss is
evaluated as ``(w / c^2) ||out - out*||^2`` in the model's own output space, which is exact and free of the
cancellation a conversion to x0 would bring, and any weighting works with any prediction type
(:class:`Weighting`; all per dimension, ``sigma = sigma_t / alpha_t`` for EDM):

  ``'eps'``            snr                      the eps-MSE: DDPM's L_simple (Ho et al. 2020, eq. 14),
                                                score-SDE's lambda = sigma_t^2 (Song et al. 2021, eq. 7),
                                                "SNR weighting" in Hang et al. 2023
  ``'x0'``             1                        the x0-MSE
  ``'v'``              (alpha^2 + sigma^2)^2 / sigma^2   the v-MSE ("v-loss"; snr + 1 for VP schedules)
  ``'output'``         c^2                      the MSE of the model's own output
  ``'truncated_snr'``  max(snr, 1)              Salimans & Ho 2022, "Progressive Distillation", sec. 4
  ``'min_snr'``        min(snr, gamma)          Hang et al. 2023, "Min-SNR Weighting": min(snr, gamma) / snr
                                                on the eps-MSE, min(snr, gamma) / (snr + 1) on the v-MSE
  ``'p2'``             snr / (k + snr)^gamma    Choi et al. 2022, "P2 Weighting": lambda_t / (k + snr)^gamma
                                                on L_simple
  ``'likelihood'``     snr g(t)^2 / sigma_t^2   lambda(t) = g(t)^2 on the score-MSE (Song et al. 2021b,
                                                "Maximum Likelihood Training", thm. 1)
  ``'edm'``            (sigma^2 + s_d^2) / (sigma s_d)^2   EDM (Karras et al. 2022) eq. 8 and Table 1;
                                                ``lambda c_out^2 = 1``: unit weight on the raw network F
  ``'velocity'``       d^2 / sigma^2             the velocity MSE of conditional flow matching (Lipman et al.
                                                2023, eq. 23); on the linear path SD3's ``w_t = t / (1 - t)``
                                                on the eps-loss (Esser et al. 2024, sec. 3.1)

SD3's comparison (its Table 1) is a weighting and a time density each: ``'velocity'`` with the densities of
:func:`flow_loss` (rf, rf/lognorm, rf/mode, rf/cosmap), ``'eps'`` (eps/linear, LDM) and ``'v'`` (v/cos) with
:func:`dsm_loss` on a VP schedule, ``'edm'`` with :func:`edm_loss`.

Conditioning: ``batch['cond']`` (class labels [B] int, a context [B, L, D], or a pytree of such) goes to
``apply_fn`` after :func:`drop_condition` (classifier-free guidance training). The loss rng is split into
four explicit streams: time, noise, label dropout and the model's ``'dropout'`` rng.

``aux`` holds per-example terms for ablations (a per-timestep-bucket breakdown is a histogram over
``aux['t']``): ``'loss'`` [B], ``'t'`` [B], ``'log_snr'`` [B], ``'weight'`` [B] (``w iw``, the x0-space weight
actually applied), ``'mse_x0'`` [B] (unweighted x0-space error) and ``'uncond'`` [B] (label dropped).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from diffax.diffusion import parameterization, time_sampling, vlb
from diffax.diffusion.schedules import EDM, Schedule, expand_like
from diffax.diffusion.time_sampling import FLOW_TIME_SAMPLINGS, sample_times, shift_times

Array = jax.Array
ApplyFn = Callable[..., Array]
"""``apply_fn(params, x [B, ...], t [B], cond, *, train: bool, rngs: dict) -> output [B, ...]`` (Flax apply)."""
LossFn = Callable[[Any, dict[str, Any], Array], tuple[Array, dict[str, Array]]]
"""``loss_fn(params, batch, rng) -> (scalar loss, aux)``; ``batch = {'x': [B, ...], 'cond': optional}``."""
WEIGHTINGS = ('eps', 'x0', 'v', 'output', 'truncated_snr', 'min_snr', 'p2', 'likelihood', 'edm', 'velocity')
REDUCTIONS = ('mean', 'sum')


@dataclasses.dataclass(frozen=True)
class Weighting:
  """A weight ``w(t)`` on the x0-space MSE (module docstring, eq. 1-2).

  Attributes:
    kind: one of :data:`WEIGHTINGS`.
    gamma: ``'min_snr'``'s truncation (default 5, Hang et al.) or ``'p2'``'s exponent (default 1, Choi et al.).
    k: ``'p2'``'s offset.
  """

  kind: str = 'eps'
  gamma: float | None = None
  k: float = 1.0

  def __post_init__(self):
    if self.kind not in WEIGHTINGS:
      raise ValueError(f'Unknown weighting {self.kind!r}; choose one of {WEIGHTINGS}.')

  def __call__(self, t: Array, *, schedule: Schedule, prediction: str, sigma_data: float = 0.5) -> Array:
    """``w(t)`` [B] for times ``t`` [B]."""
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    snr = jnp.square(alpha_t / sigma_t)
    if self.kind == 'eps':
      return snr
    if self.kind == 'x0':
      return jnp.ones_like(snr)
    if self.kind == 'v':
      return jnp.square(jnp.square(alpha_t) + jnp.square(sigma_t)) / jnp.square(sigma_t)
    if self.kind in ('output', 'velocity'):
      alpha_dot_t, sigma_dot_t = schedule.alpha_sigma_dot(t)
      return output_scale_sq(prediction if self.kind == 'output' else 'velocity', alpha_t, sigma_t,
                             sigma_data=sigma_data, alpha_dot_t=alpha_dot_t, sigma_dot_t=sigma_dot_t)
    if self.kind == 'truncated_snr':
      return jnp.maximum(snr, 1.0)
    if self.kind == 'min_snr':
      return jnp.minimum(snr, 5.0 if self.gamma is None else self.gamma)
    if self.kind == 'p2':
      return snr / (self.k + snr)**(1.0 if self.gamma is None else self.gamma)
    if self.kind == 'likelihood':
      _, g2 = schedule.sde(t)
      return snr * g2 / jnp.square(sigma_t)
    sigma = sigma_t / alpha_t
    return (jnp.square(sigma) + sigma_data**2) / jnp.square(sigma * sigma_data)


def output_scale_sq(prediction: str, alpha_t: Array, sigma_t: Array, *, sigma_data: float = 0.5,
                    alpha_dot_t: Array | None = None, sigma_dot_t: Array | None = None) -> Array:
  """``c^2`` [B] of eq. (2): ``||out - out*||^2 = c^2 ||x0_hat - x_0||^2`` at fixed ``(x_t, t)``.

  ``'velocity'`` needs the rates (``schedule.alpha_sigma_dot``): ``u - u* = -(d / sigma) (x0_hat - x_0)``.
  """
  parameterization.check_prediction(prediction)
  if prediction == 'velocity':
    if alpha_dot_t is None or sigma_dot_t is None:
      raise ValueError("prediction='velocity' needs the rates alpha_dot_t, sigma_dot_t (schedule.alpha_sigma_dot).")
    return jnp.square((alpha_t * sigma_dot_t - sigma_t * alpha_dot_t) / sigma_t)
  if prediction == 'eps':
    return jnp.square(alpha_t / sigma_t)
  if prediction == 'x0':
    return jnp.ones_like(alpha_t)
  if prediction == 'v':
    return jnp.square(jnp.square(alpha_t) + jnp.square(sigma_t)) / jnp.square(sigma_t)
  if prediction == 'score':
    return jnp.square(alpha_t) / jnp.square(jnp.square(sigma_t))
  _, c_out, _, _ = parameterization.edm_preconditioning(sigma_t / alpha_t, sigma_data)
  return 1.0 / jnp.square(c_out)


@dataclasses.dataclass(frozen=True)
class CondDropout:
  """Condition dropout for classifier-free guidance (Ho & Salimans 2022, Algorithm 1).

  With probability ``p_uncond`` per example the whole condition becomes the null condition: integer leaves
  (class labels [B]) become ``null_label`` -- by convention ``num_classes``, an extra embedding row the
  network keeps for "no label" -- and floating leaves (a context [B, L, D]) become ``null_value``. With
  ``null_tokens`` (the empty caption's ids, length L), integer leaves [B, L] (token ids) become that sequence
  instead: the text encoder then sees the null caption. A sampler guides with
  ``parameterization.classifier_free_guidance(..., null_cond=<the same null values>)``.
  """

  p_uncond: float = 0.1
  null_label: int | None = None
  null_value: float = 0.0
  null_tokens: tuple[int, ...] | None = None


def drop_condition(cond: Any, rng: Array, dropout: CondDropout | None, *,
                   batch_size: int) -> tuple[Any, Array]:
  """Replaces ``cond`` (a pytree of [B, ...] leaves, or None) by the null condition for a random subset.

  Returns the new condition and the mask ``dropped`` [B] bool (the same examples in every leaf; all False
  without a condition or a ``dropout``).
  """
  leaves = jax.tree.leaves(cond)
  if dropout is None or not leaves:
    return cond, jnp.zeros((batch_size,), bool)
  is_label = lambda leaf: jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.integer)
  is_tokens = lambda leaf: dropout.null_tokens is not None and is_label(leaf) and jnp.ndim(leaf) == 2
  if dropout.null_label is None and any(is_label(leaf) and not is_tokens(leaf) for leaf in leaves):
    raise ValueError('Integer (class label) conditions need CondDropout(null_label=num_classes), token ids [B, L] '
                     'CondDropout(null_tokens=<the empty caption\'s ids>).')
  dropped = jax.random.bernoulli(rng, dropout.p_uncond, (batch_size,))

  def drop(leaf):
    leaf = jnp.asarray(leaf)
    if is_tokens(leaf):
      if len(dropout.null_tokens) != leaf.shape[1]:
        raise ValueError(f'null_tokens has {len(dropout.null_tokens)} ids; the token ids are {leaf.shape}.')
      return jnp.where(dropped[:, None], jnp.asarray(dropout.null_tokens, leaf.dtype)[None], leaf)
    null = dropout.null_label if is_label(leaf) else dropout.null_value
    return jnp.where(expand_like(dropped, leaf), jnp.asarray(null, leaf.dtype), leaf)

  return jax.tree.map(drop, cond), dropped


@dataclasses.dataclass(frozen=True)
class _Forward:
  """One noised model evaluation: everything a loss needs, float32, per example [B] or [B, ...]."""

  x0: Array
  noise: Array
  x_t: Array
  t: Array
  alpha_t: Array
  sigma_t: Array
  alpha_dot_t: Array
  sigma_dot_t: Array
  output: Array
  dropped: Array

  def target(self, prediction: str, sigma_data: float) -> Array:
    """What a ``prediction`` model should output here [B, ...]."""
    return parameterization.output_from_x0_eps(prediction, self.x0, self.noise, self.x_t, self.alpha_t,
                                               self.sigma_t, sigma_data=sigma_data, alpha_dot_t=self.alpha_dot_t,
                                               sigma_dot_t=self.sigma_dot_t)

  def scale_sq(self, prediction: str, sigma_data: float) -> Array:
    """``c^2`` [B] of eq. (2) here."""
    return output_scale_sq(prediction, self.alpha_t, self.sigma_t, sigma_data=sigma_data,
                           alpha_dot_t=self.alpha_dot_t, sigma_dot_t=self.sigma_dot_t)


def _forward(apply_fn: ApplyFn, params: Any, batch: dict[str, Any], t: Array, rng_noise: Array,
             rng_cond: Array, rng_model: Array, *, schedule: Schedule, prediction: str, sigma_data: float,
             cond_dropout: CondDropout | None, train: bool) -> _Forward:
  x0 = jnp.asarray(batch['x'], jnp.float32)
  noise = jax.random.normal(rng_noise, x0.shape, jnp.float32)
  alpha_t, sigma_t = schedule.alpha_sigma(t)
  alpha_dot_t, sigma_dot_t = schedule.alpha_sigma_dot(t)
  x_t = schedule.marginal(x0, t, noise)
  cond, dropped = drop_condition(batch.get('cond'), rng_cond, cond_dropout, batch_size=x0.shape[0])
  x_in, t_in = parameterization.model_inputs(prediction, x_t, t, alpha_t, sigma_t, sigma_data=sigma_data)
  output = apply_fn(params, x_in, t_in, cond, train=train, rngs={'dropout': rng_model}).astype(jnp.float32)
  return _Forward(x0, noise, x_t, t, alpha_t, sigma_t, alpha_dot_t, sigma_dot_t, output, dropped)


def _reduce(x: Array, reduce: str) -> Array:
  """Mean or sum over all but the batch axis: [B, ...] -> [B]."""
  x = x.reshape(x.shape[0], -1)
  return jnp.mean(x, axis=-1) if reduce == 'mean' else jnp.sum(x, axis=-1)


def _check(prediction: str, reduce: str) -> None:
  parameterization.check_prediction(prediction)
  if reduce not in REDUCTIONS:
    raise ValueError(f'Unknown reduce {reduce!r}; choose one of {REDUCTIONS}.')


def _regression_loss(apply_fn: ApplyFn, *, schedule: Schedule, prediction: str, weighting: str | Weighting,
                     times: Callable[[Array, int], tuple[Array, Array]], reduce: str, sigma_data: float,
                     cond_dropout: CondDropout | None, train: bool) -> LossFn:
  """Eq. (1) with ``times(rng, B) -> (t [B], importance weight [B])``."""
  _check(prediction, reduce)
  weighting = Weighting(weighting) if isinstance(weighting, str) else weighting

  def loss_fn(params, batch, rng):
    rng_time, rng_noise, rng_cond, rng_model = jax.random.split(rng, 4)
    t, iw = times(rng_time, batch['x'].shape[0])
    f = _forward(apply_fn, params, batch, t, rng_noise, rng_cond, rng_model, schedule=schedule,
                 prediction=prediction, sigma_data=sigma_data, cond_dropout=cond_dropout, train=train)
    target = f.target(prediction, sigma_data)
    mse_x0 = _reduce(jnp.square(f.output - target), reduce) / f.scale_sq(prediction, sigma_data)  # [B]
    weight = weighting(t, schedule=schedule, prediction=prediction, sigma_data=sigma_data) * iw  # [B]
    per_example = weight * mse_x0  # [B]
    aux = {'loss': per_example, 't': t, 'log_snr': schedule.log_snr(t), 'weight': weight, 'mse_x0': mse_x0,
           'uncond': f.dropped}
    return jnp.mean(per_example), aux

  return loss_fn


def ddpm_loss(apply_fn: ApplyFn, *, schedule: Schedule, prediction: str = 'eps',
              weighting: str | Weighting = 'eps', num_timesteps: int | None = None, antithetic: bool = False,
              reduce: str = 'mean', sigma_data: float = 0.5, cond_dropout: CondDropout | None = None,
              train: bool = True) -> LossFn:
  """Discrete-time loss: ``n ~ U{0..N-1}`` on :func:`time_sampling.discrete_grid`, weighting by name.

  The defaults are DDPM's L_simple (Ho et al. 2020, eq. 14 and Algorithm 1). On continuous schedules this
  gives score-SDE's discrete variants: ``VPSDE`` with ``N = 1000`` is the DDPM loss of the reference code,
  and ``VESDE`` with ``prediction='score'`` the SMLD loss (Song & Ermon 2019; lambda = sigma^2 is ``'eps'``).
  """

  def times(rng, batch_size):
    return time_sampling.sample_times(rng, batch_size, schedule=schedule, method='discrete',
                                      antithetic=antithetic, num_timesteps=num_timesteps)

  return _regression_loss(apply_fn, schedule=schedule, prediction=prediction, weighting=weighting,
                          times=times, reduce=reduce, sigma_data=sigma_data, cond_dropout=cond_dropout,
                          train=train)


def dsm_loss(apply_fn: ApplyFn, *, schedule: Schedule, prediction: str = 'score',
             weighting: str | Weighting = 'eps', importance_sampling: bool = False, t_eps: float | None = None,
             antithetic: bool = False, reduce: str = 'mean', sigma_data: float = 0.5,
             cond_dropout: CondDropout | None = None, train: bool = True) -> LossFn:
  """Continuous-time denoising score matching (Song et al. 2021, eq. 7), ``t ~ U(t_eps, t_max)``.

  ``weighting='eps'`` is ``lambda(t) = sigma_t^2``; ``'likelihood'`` is ``lambda(t) = g(t)^2`` (Song et al.
  2021b). ``importance_sampling`` draws ``t`` uniformly in log-SNR with importance weights, so the
  expectation is unchanged and the likelihood weighting becomes constant (:mod:`time_sampling`).
  ``t_eps`` defaults to ``schedule.t_min`` (score-SDE's reference code trains from ``t_eps = 1e-5``).
  """

  def times(rng, batch_size):
    return time_sampling.sample_times(rng, batch_size, schedule=schedule,
                                      method='log_snr' if importance_sampling else 'uniform',
                                      antithetic=antithetic, t_eps=t_eps)

  return _regression_loss(apply_fn, schedule=schedule, prediction=prediction, weighting=weighting,
                          times=times, reduce=reduce, sigma_data=sigma_data, cond_dropout=cond_dropout,
                          train=train)


def edm_loss(apply_fn: ApplyFn, *, schedule: Schedule, prediction: str = 'edm',
             weighting: str | Weighting = 'edm', p_mean: float = -1.2, p_std: float = 1.2,
             sigma_data: float | None = None, antithetic: bool = False, reduce: str = 'mean',
             cond_dropout: CondDropout | None = None, train: bool = True) -> LossFn:
  """EDM's loss (Karras et al. 2022, eq. 8, Table 1): ``ln sigma ~ N(p_mean, p_std^2)``,
  ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``, preconditioned ``prediction='edm'``.

  On the ``EDM`` schedule its own ``p_mean``, ``p_std`` and ``sigma_data`` are used (the arguments here
  apply to other schedules, where ``sigma = sigma_t / alpha_t`` is mapped to a time through the log-SNR).
  """
  if isinstance(schedule, EDM):
    sigma_data = schedule.sigma_data if sigma_data is None else sigma_data
  sigma_data = 0.5 if sigma_data is None else sigma_data

  def times(rng, batch_size):
    return time_sampling.sample_times(rng, batch_size, schedule=schedule, method='lognormal',
                                      antithetic=antithetic, p_mean=p_mean, p_std=p_std)

  return _regression_loss(apply_fn, schedule=schedule, prediction=prediction, weighting=weighting,
                          times=times, reduce=reduce, sigma_data=sigma_data, cond_dropout=cond_dropout,
                          train=train)


def flow_loss(apply_fn: ApplyFn, *, schedule: Schedule, prediction: str = 'velocity',
              weighting: str | Weighting = 'velocity', time_sampling: str = 'uniform', loc: float = 0.0,
              scale: float = 1.0, mode_scale: float = 1.29, shift: float = 1.0, t_eps: float | None = None,
              antithetic: bool = False, reduce: str = 'mean', sigma_data: float = 0.5,
              cond_dropout: CondDropout | None = None, train: bool = True) -> LossFn:
  """Conditional flow matching (Lipman et al. 2023, eq. 23; Liu et al. 2023, eq. 1; SiT eq. 5; SD3 eq. 2):

    L = E_{t, x_0, eps} || u_hat(x_t, t) - (alpha_dot_t x_0 + sigma_dot_t eps) ||^2,   t ~ pi(t),

  the defaults (``prediction='velocity'``, ``weighting='velocity'``). Its minimiser is the marginal velocity
  ``E[alpha_dot_t x_0 + sigma_dot_t eps | x_t]``, whose probability-flow ODE carries the prior to the data. The
  time density is one of :data:`time_sampling.FLOW_TIME_SAMPLINGS` (``loc``, ``scale``: the logit-normal's;
  ``mode_scale``: mode sampling's ``s``), then moved by :func:`time_sampling.shift_times` with ``shift`` (SD3
  eq. 23) and kept in ``[t_eps, t_max]`` (``t_eps`` defaults to ``schedule.t_min``). Like every loss here it
  takes any prediction and any weighting (module docstring), so SD3's table is a pair of arguments, and any
  schedule on [0, 1]: on ``'rectified_flow'`` the target is ``eps - x_0``, on ``'gvp'`` SiT's GVP velocity.
  """
  t_lo = schedule.t_min if t_eps is None else t_eps
  if time_sampling not in FLOW_TIME_SAMPLINGS:
    raise ValueError(f'Unknown flow time sampling {time_sampling!r}; choose one of {FLOW_TIME_SAMPLINGS}.')
  if schedule.t_max > 1.0:
    raise ValueError(f'flow_loss draws t in [0, 1]; {type(schedule).__name__} runs to t_max = {schedule.t_max}.')
  if shift <= 0:
    raise ValueError(f'shift must be positive, got {shift}.')

  def times(rng, batch_size):
    t, iw = sample_times(rng, batch_size, schedule=schedule, method=time_sampling, antithetic=antithetic, t_eps=t_lo,
                         loc=loc, scale=scale, mode_scale=mode_scale)
    return jnp.clip(shift_times(t, shift), t_lo, schedule.t_max), iw

  return _regression_loss(apply_fn, schedule=schedule, prediction=prediction, weighting=weighting,
                          times=times, reduce=reduce, sigma_data=sigma_data, cond_dropout=cond_dropout,
                          train=train)


def hybrid_loss(apply_fn: ApplyFn, *, schedule: Schedule, prediction: str = 'eps',
                variance: str = 'learned_range', vlb_weight: float = 1e-3, num_timesteps: int | None = None,
                antithetic: bool = False, sigma_data: float = 0.5, cond_dropout: CondDropout | None = None,
                train: bool = True) -> LossFn:
  """iDDPM's ``L_hybrid = L_simple + lambda L_vlb`` (Nichol & Dhariwal 2021, sec. 3.1, lambda = 0.001).

  One discrete level ``n`` per example; ``L_simple`` is the eps-MSE (mean over dims) and ``L_vlb`` is
  estimated as ``N L_n`` in bits/dim (:func:`vlb.vlb_term`) with a stop-gradient on the predicted mean, so
  ``L_vlb`` trains only the variance channels (``variance='learned_range'``: output [..., 2C]). This is
  iDDPM's reference ``RESCALED_MSE`` loss. ``aux`` adds ``'mse'`` [B] and ``'vlb'`` [B] (bits/dim).
  """
  _check(prediction, 'mean')
  if variance not in vlb.VARIANCES:
    raise ValueError(f'Unknown variance {variance!r}; choose one of {vlb.VARIANCES}.')
  num_timesteps = time_sampling.resolve_num_timesteps(schedule, num_timesteps)
  grid = time_sampling.discrete_grid(schedule, num_timesteps)

  def loss_fn(params, batch, rng):
    rng_time, rng_noise, rng_cond, rng_model = jax.random.split(rng, 4)
    n = time_sampling.sample_timesteps(rng_time, batch['x'].shape[0], num_timesteps, antithetic=antithetic)
    f = _forward(apply_fn, params, batch, grid[n], rng_noise, rng_cond, rng_model, schedule=schedule,
                 prediction=prediction, sigma_data=sigma_data, cond_dropout=cond_dropout, train=train)
    mean_out, var_out = (jnp.split(f.output, 2, axis=-1) if variance == 'learned_range'
                         else (f.output, None))
    target = f.target(prediction, sigma_data)
    scale = (Weighting('eps')(f.t, schedule=schedule, prediction=prediction, sigma_data=sigma_data)
             / f.scale_sq(prediction, sigma_data))
    mse = scale * _reduce(jnp.square(mean_out - target), 'mean')  # [B] eps-space MSE
    frozen = jax.lax.stop_gradient(mean_out)
    output = frozen if var_out is None else jnp.concatenate([frozen, var_out], axis=-1)
    term = vlb.vlb_term(output, f.x0, f.x_t, n, schedule=schedule, prediction=prediction, variance=variance,
                        num_timesteps=num_timesteps, sigma_data=sigma_data)  # [B] nats
    vlb_bpd = num_timesteps * term / (math.prod(f.x0.shape[1:]) * math.log(2.0))  # [B]
    per_example = mse + vlb_weight * vlb_bpd  # [B]
    aux = {'loss': per_example, 't': f.t, 'log_snr': schedule.log_snr(f.t), 'mse': mse, 'vlb': vlb_bpd,
           'uncond': f.dropped}
    return jnp.mean(per_example), aux

  return loss_fn


LOSSES: dict[str, Callable[..., LossFn]] = {
    'ddpm': ddpm_loss,
    'dsm': dsm_loss,
    'edm': edm_loss,
    'hybrid': hybrid_loss,
    'flow': flow_loss,
}


def get_loss(name: str, apply_fn: ApplyFn, **kwargs) -> LossFn:
  """Registry lookup, e.g. ``get_loss('ddpm', apply_fn, schedule=s, weighting='min_snr')``."""
  if name not in LOSSES:
    raise ValueError(f'Unknown loss {name!r}; choose one of {sorted(LOSSES)}.')
  return LOSSES[name](apply_fn, **kwargs)
