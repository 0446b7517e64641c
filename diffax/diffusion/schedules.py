"""Noise schedules and forward processes, all in one representation.

Every process is a Gaussian perturbation of the data indexed by a continuous time ``t``:

  q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I),    log_snr(t) = log(alpha_t^2 / sigma_t^2),     (1)

(Kingma et al. 2021, "Variational Diffusion Models", eq. 1-2). The linear SDE with these marginals is

  dx = f(t) x dt + g(t) dw,   f(t) = d log(alpha_t)/dt,   g(t)^2 = d(sigma_t^2)/dt - 2 f(t) sigma_t^2  (2)

(Song et al. 2021, "Score-Based Generative Modeling through SDEs", eq. 5 and app. B; Kingma et al. 2021,
app. A.1), so drift and diffusion are derived from ``alpha_sigma`` by automatic differentiation and every
schedule supports every sampler and the probability-flow ODE (Song et al. eq. 13).

Discrete-time DDPM schedules use ``t_n = (n + 1) / T`` for the 0-based timestep index ``n``; between the
knots the log-SNR is interpolated linearly, so samplers that only visit knots see the exact discrete values.

All schedules are frozen dataclasses: hashable, free of state and safe to close over in ``jax.jit``.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def expand_like(a: Array, x: Array) -> Array:
  """Appends trailing unit axes to per-example ``a`` [B] (or [] ) so it broadcasts against ``x`` [B, ...]."""
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


class Schedule(abc.ABC):
  """A forward process ``x_t = alpha_t x_0 + sigma_t eps`` for ``t`` in ``[t_min, t_max]``."""

  t_min: float
  t_max: float

  @abc.abstractmethod
  def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
    """Returns ``(alpha_t, sigma_t)``, each with the shape of ``t``, in float32 (float64 for a float64 ``t``)."""

  @abc.abstractmethod
  def t_from_log_snr(self, log_snr: Array) -> Array:
    """Inverse of :meth:`log_snr` (used by DPM-Solver's log-SNR grids and to move between schedules)."""

  @property
  @abc.abstractmethod
  def prior_std(self) -> float:
    """Standard deviation of the prior N(0, prior_std^2 I) that sampling starts from at ``t_max``."""

  def alpha_sigma_dot(self, t: Array) -> tuple[Array, Array]:
    """The rates ``(d alpha_t / dt, d sigma_t / dt)``, each with the shape of ``t``, by forward-mode autodiff.

    They define the velocity ``u = d x_t / dt = alpha_dot_t x_0 + sigma_dot_t eps`` of the path (Lipman et al.
    2023, "Flow Matching", eq. 15; Ma et al. 2024, "SiT", eq. 3); the interpolants override them in closed form.
    """
    t = _as_float(t)
    _, rates = jax.jvp(self.alpha_sigma, (t,), (jnp.ones_like(t),))
    return rates

  def log_snr(self, t: Array) -> Array:
    """``log(alpha_t^2 / sigma_t^2)`` (VDM eq. 2)."""
    alpha_t, sigma_t = self.alpha_sigma(t)
    return 2.0 * (jnp.log(alpha_t) - jnp.log(sigma_t))

  def marginal(self, x0: Array, t: Array, noise: Array) -> Array:
    """Samples ``x_t = alpha_t x0 + sigma_t noise`` (eq. 1). ``x0``, ``noise``: [B, ...]; ``t``: [B] or []."""
    alpha_t, sigma_t = self.alpha_sigma(t)
    return expand_like(alpha_t, x0) * x0 + expand_like(sigma_t, x0) * noise

  def sde(self, t: Array) -> tuple[Array, Array]:
    """Returns ``(f(t), g(t)^2)`` of the SDE ``dx = f(t) x dt + g(t) dw`` (eq. 2), shape of ``t``."""
    t = _as_float(t)

    def log_alpha_and_var(t):
      alpha_t, sigma_t = self.alpha_sigma(t)
      return jnp.log(alpha_t), jnp.square(sigma_t)

    (_, var_t), (f_t, dvar_dt) = jax.jvp(log_alpha_and_var, (t,), (jnp.ones_like(t),))
    return f_t, dvar_dt - 2.0 * f_t * var_t

  def drift_diffusion(self, x: Array, t: Array) -> tuple[Array, Array]:
    """Score-SDE's ``sde(x, t)``: the drift ``f(t) x`` [B, ...] and the diffusion ``g(t)`` (shape of ``t``)."""
    f_t, g2_t = self.sde(t)
    return expand_like(f_t, x) * x, jnp.sqrt(g2_t)

  def posterior(self, s: Array, t: Array) -> tuple[Array, Array, Array]:
    """Coefficients of ``q(x_s | x_t, x_0) = N(c_x0 x_0 + c_xt x_t, var I)`` for ``s < t``.

    With ``alpha_{t|s} = alpha_t / alpha_s`` and ``sigma_{t|s}^2 = sigma_t^2 - alpha_{t|s}^2 sigma_s^2``:
    ``c_x0 = alpha_s sigma_{t|s}^2 / sigma_t^2``, ``c_xt = alpha_{t|s} sigma_s^2 / sigma_t^2`` and
    ``var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2`` (VDM eq. 28-31; for consecutive DDPM steps this is
    DDPM eq. 6-7, for respaced steps the iDDPM respacing rule). A clean target (``alpha_s = 1``,
    ``sigma_s = 0``) goes through :func:`posterior_from` directly.
    """
    alpha_s, sigma_s = self.alpha_sigma(s)
    alpha_t, sigma_t = self.alpha_sigma(t)
    return posterior_from(alpha_s, sigma_s, alpha_t, sigma_t)

  def prior_sample(self, rng: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """Draws ``x_T ~ N(0, prior_std^2 I)``."""
    return self.prior_std * jax.random.normal(rng, shape, dtype)

  def prior_logp(self, z: Array) -> Array:
    """Log-density of the prior at ``z`` [B, ...], summed over all but the batch axis -> [B]."""
    d = math.prod(z.shape[1:])
    sq = jnp.sum(jnp.square(z.reshape(z.shape[0], -1)), axis=-1)
    return -0.5 * d * math.log(2 * math.pi * self.prior_std**2) - 0.5 * sq / self.prior_std**2


def posterior_from(alpha_s: Array, sigma_s: Array, alpha_t: Array,
                   sigma_t: Array) -> tuple[Array, Array, Array]:
  """``(c_x0, c_xt, var)`` of ``q(x_s | x_t, x_0)`` from the marginal coefficients (see ``posterior``)."""
  alpha_ts = alpha_t / alpha_s
  var_ts = jnp.square(sigma_t) - jnp.square(alpha_ts) * jnp.square(sigma_s)
  var_t = jnp.square(sigma_t)
  return alpha_s * var_ts / var_t, alpha_ts * jnp.square(sigma_s) / var_t, var_ts * jnp.square(sigma_s) / var_t


def float_dtype(x=None) -> jnp.dtype:
  """The dtype schedule arithmetic runs in for the input ``x``: float64 where ``x`` is a float64 array (which needs
  ``jax_enable_x64``, for closed-form checks below float32 rounding), else float32 (Python numbers, float32,
  bfloat16, integers, no input)."""
  return jnp.dtype(jnp.float64) if getattr(x, 'dtype', None) == jnp.float64 else jnp.dtype(jnp.float32)


def _as_float(t: Array) -> Array:
  return jnp.asarray(t, float_dtype(t))


@dataclasses.dataclass(frozen=True)
class VPSDE(Schedule):
  """Score-SDE variance-preserving SDE ``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw`` (Song et al. eq. 11).

  ``beta(t) = beta_min + t (beta_max - beta_min)``; ``alpha_t = exp(-1/2 int_0^t beta)`` and
  ``sigma_t^2 = 1 - alpha_t^2`` (eq. 29). Its Euler discretisation with N = 1000 is DDPM's linear schedule.
  """

  beta_min: float = 0.1
  beta_max: float = 20.0
  t_min: float = 1e-3
  t_max: float = 1.0

  @property
  def prior_std(self) -> float:
    return 1.0

  def beta(self, t: Array) -> Array:
    return self.beta_min + _as_float(t) * (self.beta_max - self.beta_min)

  def integral_beta(self, t: Array) -> Array:
    """``int_0^t beta(s) ds``."""
    t = _as_float(t)
    return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * jnp.square(t)

  def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
    b = self.integral_beta(t)
    return jnp.exp(-0.5 * b), jnp.sqrt(-jnp.expm1(-b))

  def log_snr(self, t: Array) -> Array:
    return -jnp.log(jnp.expm1(self.integral_beta(t)))

  def _t_from_integral_beta(self, b: Array) -> Array:
    db = self.beta_max - self.beta_min
    return (2.0 * b) / (self.beta_min + jnp.sqrt(self.beta_min**2 + 2.0 * db * b))

  def t_from_log_snr(self, log_snr: Array) -> Array:
    return self._t_from_integral_beta(jax.nn.softplus(-_as_float(log_snr)))


@dataclasses.dataclass(frozen=True)
class SubVPSDE(VPSDE):
  """Score-SDE sub-VP SDE (Song et al. eq. 12): the VP drift with ``g(t)^2 = beta(t) (1 - alpha_t^4)``.

  Same ``alpha_t`` as VP; ``sigma_t = 1 - alpha_t^2`` (eq. 30), so ``sigma_t^2`` lies below the VP variance.
  """

  def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
    b = self.integral_beta(t)
    return jnp.exp(-0.5 * b), -jnp.expm1(-b)

  def log_snr(self, t: Array) -> Array:
    b = self.integral_beta(t)
    return -b - 2.0 * jnp.log(-jnp.expm1(-b))

  def t_from_log_snr(self, log_snr: Array) -> Array:
    # alpha / (1 - alpha^2) = r := exp(log_snr / 2)  =>  alpha = (sqrt(1 + 4 r^2) - 1) / (2 r).
    r = jnp.exp(0.5 * _as_float(log_snr))
    alpha = 2.0 * r / (jnp.sqrt(1.0 + 4.0 * jnp.square(r)) + 1.0)
    return self._t_from_integral_beta(-2.0 * jnp.log(alpha))


@dataclasses.dataclass(frozen=True)
class VESDE(Schedule):
  """Score-SDE variance-exploding SDE ``dx = sigma(t) sqrt(2 log(sigma_max / sigma_min)) dw`` (eq. 9).

  ``alpha_t = 1``, ``sigma_t = sigma_min (sigma_max / sigma_min)^t`` (eq. 31, as in the reference code).
  """

  sigma_min: float = 0.01
  sigma_max: float = 50.0
  t_min: float = 1e-5
  t_max: float = 1.0

  @property
  def prior_std(self) -> float:
    return self.sigma_max

  def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
    t = _as_float(t)
    sigma_t = self.sigma_min * jnp.exp(t * math.log(self.sigma_max / self.sigma_min))
    return jnp.ones_like(t), sigma_t

  def t_from_log_snr(self, log_snr: Array) -> Array:
    log_sigma = -0.5 * _as_float(log_snr)
    return (log_sigma - math.log(self.sigma_min)) / math.log(self.sigma_max / self.sigma_min)


@dataclasses.dataclass(frozen=True)
class EDM(Schedule):
  """Karras et al. 2022 ("Elucidating the Design Space", EDM): ``sigma(t) = t``, ``s(t) = 1``.

  Holds the EDM design constants: ``sigma_data`` for preconditioning (Table 1), the log-normal training
  distribution ``ln sigma ~ N(p_mean, p_std^2)`` and the ``rho`` time discretisation (eq. 5).
  """

  sigma_min: float = 0.002
  sigma_max: float = 80.0
  sigma_data: float = 0.5
  p_mean: float = -1.2
  p_std: float = 1.2
  rho: float = 7.0

  @property
  def t_min(self) -> float:
    return self.sigma_min

  @property
  def t_max(self) -> float:
    return self.sigma_max

  @property
  def prior_std(self) -> float:
    return self.sigma_max

  def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
    t = _as_float(t)
    return jnp.ones_like(t), t

  def t_from_log_snr(self, log_snr: Array) -> Array:
    return jnp.exp(-0.5 * _as_float(log_snr))

  def training_sigma(self, rng: Array, shape: tuple[int, ...]) -> Array:
    """``sigma = exp(p_mean + p_std n)``, ``n ~ N(0, 1)`` (EDM Table 1, training)."""
    return jnp.exp(self.p_mean + self.p_std * jax.random.normal(rng, shape, jnp.float32))

  def sigma_steps(self, num_steps: int) -> Array:
    """EDM eq. 5: ``sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``, i < N.

    Returns [num_steps] descending noise levels from ``sigma_max`` to ``sigma_min`` (the sampler appends
    ``sigma_N = 0``).
    """
    i = jnp.arange(num_steps, dtype=jnp.float32) / max(num_steps - 1, 1)
    lo, hi = self.sigma_min**(1 / self.rho), self.sigma_max**(1 / self.rho)
    return (hi + i * (lo - hi))**self.rho


class DiscreteSchedule(Schedule):
  """A DDPM-style variance-preserving schedule of ``T`` betas, ``alpha_bar_n = prod_{m<=n} (1 - beta_m)``.

  Timestep index ``n`` in ``0..T-1`` sits at ``t_n = (n + 1) / T``; ``alpha_t^2 = alpha_bar_n`` there.
  The log-SNR is linear between knots (and extrapolated linearly below ``t_0 = 1/T``).
  """

  num_timesteps: int

  @abc.abstractmethod
  def betas(self) -> np.ndarray:
    """[T] float64 betas."""

  @property
  def prior_std(self) -> float:
    return 1.0

  @property
  def t_min(self) -> float:
    return 1.0 / self.num_timesteps

  @property
  def t_max(self) -> float:
    return 1.0

  def alphas_cumprod(self) -> np.ndarray:
    """[T] float64 ``alpha_bar_n`` (DDPM eq. 4)."""
    return np.cumprod(1.0 - self.betas())

  @functools.cached_property
  def _knots(self) -> tuple[np.ndarray, np.ndarray]:
    """Knot times [T + 1] (with an extrapolated knot at t = 0) and their log-SNRs, float64 (cast to the precision
    of ``t`` where used)."""
    abar = self.alphas_cumprod()
    log_snr = np.log(abar) - np.log1p(-abar)
    t = np.arange(1, self.num_timesteps + 1) / self.num_timesteps
    log_snr0 = log_snr[0] + (log_snr[0] - log_snr[1])
    return np.concatenate([[0.0], t]), np.concatenate([[log_snr0], log_snr])

  def timestep_to_t(self, n: Array) -> Array:
    """0-based timestep index -> continuous time ``(n + 1) / T``."""
    return (jnp.asarray(n).astype(jnp.float32) + 1.0) / self.num_timesteps

  def t_to_timestep(self, t: Array) -> Array:
    """Continuous time -> nearest 0-based timestep index (int32), e.g. for a network's discrete embedding."""
    n = jnp.round(_as_float(t) * self.num_timesteps) - 1.0
    return jnp.clip(n, 0, self.num_timesteps - 1).astype(jnp.int32)

  def log_snr(self, t: Array) -> Array:
    knots_t, knots_log_snr = self._knots
    t = _as_float(t)
    return jnp.interp(t, jnp.asarray(knots_t, t.dtype), jnp.asarray(knots_log_snr, t.dtype))

  def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
    log_snr = self.log_snr(t)
    return jnp.sqrt(jax.nn.sigmoid(log_snr)), jnp.sqrt(jax.nn.sigmoid(-log_snr))

  def t_from_log_snr(self, log_snr: Array) -> Array:
    knots_t, knots_log_snr = self._knots
    log_snr = _as_float(log_snr)
    return jnp.interp(-log_snr, jnp.asarray(-knots_log_snr, log_snr.dtype), jnp.asarray(knots_t, log_snr.dtype))


@dataclasses.dataclass(frozen=True)
class LinearSchedule(DiscreteSchedule):
  """DDPM's linear betas from ``beta_start`` to ``beta_end`` over ``T`` steps (Ho et al. 2020, sec. 4)."""

  num_timesteps: int = 1000
  beta_start: float = 1e-4
  beta_end: float = 0.02

  def betas(self) -> np.ndarray:
    return np.linspace(self.beta_start, self.beta_end, self.num_timesteps, dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class CosineSchedule(DiscreteSchedule):
  """iDDPM cosine schedule (Nichol & Dhariwal 2021, eq. 17).

  ``alpha_bar(t) = f(t) / f(0)``, ``f(t) = cos^2(((t / T + s) / (1 + s)) pi / 2)``, and
  ``beta_t = min(1 - alpha_bar(t) / alpha_bar(t - 1), max_beta)`` (the paper clips at 0.999).
  """

  num_timesteps: int = 1000
  s: float = 0.008
  max_beta: float = 0.999

  def betas(self) -> np.ndarray:
    steps = np.arange(self.num_timesteps + 1, dtype=np.float64) / self.num_timesteps
    f = np.cos((steps + self.s) / (1 + self.s) * np.pi / 2)**2
    abar = f / f[0]
    return np.minimum(1.0 - abar[1:] / abar[:-1], self.max_beta)


class Interpolant(Schedule):
  """A path ``x_t = alpha_t x_0 + sigma_t eps`` from data at ``t = 0`` (``alpha = 1, sigma = 0``) to pure noise at
  ``t = 1`` (``alpha = 0, sigma = 1``): the stochastic interpolants of Albergo & Vanden-Eijnden 2023 in the
  convention of SiT (Ma et al. 2024, sec. 2.2) and SD3 (Esser et al. 2024, sec. 2).

  The end points themselves are singular in log-SNR (``+inf`` at 0, ``-inf`` at 1), so ``t_min`` and ``t_max``
  stop just inside; the prior is ``N(0, I)``, the exact marginal at ``t = 1``, whose mismatch at ``t_max`` is
  ``alpha_{t_max} x_0`` (1e-3 for the defaults, below VP's ``alpha_1 = 6.6e-3``). The log-SNR samplers
  (DDIM, DPM-Solver, the adaptive ODE) need ``t_max < 1``; the flow samplers of
  :mod:`diffax.diffusion.samplers.flow` also run from ``t_max = 1``.
  """

  @property
  def prior_std(self) -> float:
    return 1.0


@dataclasses.dataclass(frozen=True)
class RectifiedFlow(Interpolant):
  """The linear path ``alpha_t = 1 - t``, ``sigma_t = t`` (Liu et al. 2023, "Rectified Flow", eq. 1; Lipman et al.
  2023's optimal-transport path with ``sigma_min = 0``; SiT's "Linear"; SD3 eq. 3), velocity ``u = eps - x_0``.

  ``log_snr = 2 log((1 - t) / t)`` and ``t = sigmoid(-log_snr / 2)``.
  """

  t_min: float = 1e-3
  t_max: float = 1.0 - 1e-3

  def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
    t = _as_float(t)
    return 1.0 - t, t

  def alpha_sigma_dot(self, t: Array) -> tuple[Array, Array]:
    t = _as_float(t)
    return -jnp.ones_like(t), jnp.ones_like(t)

  def log_snr(self, t: Array) -> Array:
    t = _as_float(t)
    return 2.0 * (jnp.log1p(-t) - jnp.log(t))

  def t_from_log_snr(self, log_snr: Array) -> Array:
    return jax.nn.sigmoid(-0.5 * _as_float(log_snr))


@dataclasses.dataclass(frozen=True)
class GVP(Interpolant):
  """SiT's generalised variance-preserving path ``alpha_t = cos(pi t / 2)``, ``sigma_t = sin(pi t / 2)`` (Ma et al.
  2024, sec. 2.2; Albergo & Vanden-Eijnden 2023's trigonometric interpolant), velocity
  ``u = pi / 2 (cos(pi t / 2) eps - sin(pi t / 2) x_0)``, which is ``pi / 2`` times Salimans & Ho's ``v``.

  ``log_snr = -2 log tan(pi t / 2)`` and ``t = 2 / pi arctan(exp(-log_snr / 2))``. In log-SNR it is the
  continuous-time cosine schedule of Nichol & Dhariwal 2021 without the offset ``s``.
  """

  t_min: float = 1e-3
  t_max: float = 1.0 - 1e-3

  def alpha_sigma(self, t: Array) -> tuple[Array, Array]:
    angle = 0.5 * math.pi * _as_float(t)
    return jnp.cos(angle), jnp.sin(angle)

  def alpha_sigma_dot(self, t: Array) -> tuple[Array, Array]:
    angle = 0.5 * math.pi * _as_float(t)
    return -0.5 * math.pi * jnp.sin(angle), 0.5 * math.pi * jnp.cos(angle)

  def log_snr(self, t: Array) -> Array:
    return -2.0 * jnp.log(jnp.tan(0.5 * math.pi * _as_float(t)))

  def t_from_log_snr(self, log_snr: Array) -> Array:
    return (2.0 / math.pi) * jnp.arctan(jnp.exp(-0.5 * _as_float(log_snr)))


SCHEDULES: dict[str, type[Schedule]] = {
    'linear': LinearSchedule,
    'cosine': CosineSchedule,
    'vp': VPSDE,
    'subvp': SubVPSDE,
    've': VESDE,
    'edm': EDM,
    'rectified_flow': RectifiedFlow,
    'gvp': GVP,
}


def get_schedule(name: str, **kwargs) -> Schedule:
  """Registry lookup, e.g. ``get_schedule('vp', beta_max=20.0)``; configs choose schedules by name."""
  if name not in SCHEDULES:
    raise ValueError(f'Unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}.')
  return SCHEDULES[name](**kwargs)
