"""Exact log-likelihoods through the probability-flow ODE, and bits/dim of 8-bit data.

Along an ODE ``dy/du = v(y, u)`` the log-density obeys ``d log p_u(y(u)) / du = -div v`` (Chen et al. 2018,
"Neural ODEs", instantaneous change of variables), so integrating from the data to the prior

  log p_0(y(u_0)) = log p_T(y(u_T)) + int_{u_0}^{u_T} div v(y(u), u) du     (Song et al. 2021, eq. 39, app. D.2).

We integrate the probability-flow ODE in its scale-free form (H) of :mod:`diffax.diffusion.samplers.ode`,
``y = x_bar = x / alpha_t`` over ``u = -log_snr / 2``, jointly with the divergence, from ``t_eps``
(``schedule.t_min`` by default; score-SDE uses 1e-5) to ``t_max``. Changing variables between ``x`` and
``x_bar`` adds ``D log(alpha_T / alpha_eps)``:

  log p(x) = prior_logp(z) + D log alpha_T - D log alpha_eps + int div_{x_bar} v du,   z = alpha_T x_bar_T.

``div v`` is exact (the trace of the Jacobian from ``D`` Jacobian-vector products; small ``D`` only) or the
Hutchinson-Skilling estimate ``e^T (dv/dy) e`` with one probe ``e`` per example, Rademacher or Gaussian, held
fixed along the trajectory (FFJORD, Grathwohl et al. 2019), which is unbiased for ``log p``.

Bits/dim of 8-bit data (uniform dequantisation, Theis et al. 2016; score-SDE app. and ``run_lib``): pixels
``k`` in ``{0, ..., 255}`` become ``y = k + u``, ``u ~ U[0, 1)^D``, and the model sees
``x = y * 2 / 256 - 1`` in ``[-1, 1)`` (score-SDE's ``(255 x + u) / 256`` followed by its centring scaler).
For densities of ``y`` with unit-width bins, ``E_u[-log2 p_y(k + u)]`` bounds the discrete
``-log2 P(k)`` from above (Jensen); with ``p_y(y) = p_x(x) (2/256)^D``

  bpd = -(log p_x(x) + D log(2/256)) / (D log 2) = -log p_x(x) / (D log 2) + 7.

So the offset is ``log2(128) = 7`` for data in ``[-1, 1]`` (``log2(256) = 8`` for data in ``[0, 1]``, score-SDE's
``offset = 7 - inverse_scaler(-1)``), not ``log2(127.5)``: 127.5 belongs to the grid ``k / 127.5 - 1`` with no
dequantisation noise, whose bins of width ``2/255`` would overrun ``[-1, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import ode

Array = jax.Array
ESTIMATORS = ('rademacher', 'gaussian', 'exact')


@flax.struct.dataclass
class Likelihood:
  """``log_p`` [B] nats of ``x`` under the model's density at ``t_eps``; ``prior_logp`` [B] of the latent
  ``z`` [B, ...] at ``t_max``; ``nfe`` (int32 []) evaluations of the joint vector field, each one model
  evaluation with one Jacobian-vector product (``D`` of them for ``'exact'``)."""

  log_p: Array
  prior_logp: Array
  z: Array
  nfe: Array


def _divergence_field(field, x_shape: tuple[int, ...], hutchinson: str, probe: Array | None):
  """Joint vector field ``(u, (x_bar, delta)) -> (d x_bar / du, div)`` with ``div`` [B] of ``field``."""
  batch, dim = x_shape[0], math.prod(x_shape[1:])

  def joint(u, y):
    x_bar, _ = y
    if hutchinson == 'exact':
      dx, jvp = jax.linearize(lambda x: field(u, x), x_bar)
      basis = jnp.eye(dim, dtype=jnp.float32).reshape((dim, 1) + x_shape[1:])
      columns = jax.vmap(jvp)(jnp.broadcast_to(basis, (dim,) + x_shape))  # [D, B, ...]: J e_i per example
      div = jnp.einsum('ibi->b', columns.reshape(dim, batch, dim))
    else:
      dx, jvp_probe = jax.jvp(lambda x: field(u, x), (x_bar,), (probe,))
      div = jnp.sum((probe * jvp_probe).reshape(batch, dim), axis=-1)
    return dx, div

  return joint


def ode_log_likelihood(denoiser: Denoiser, rng: Array, x: Array, *, hutchinson: str = 'rademacher',
                       t_eps: float | None = None, solver: str = 'tsit5', rtol: float = 1e-5, atol: float = 1e-5,
                       max_steps: int = 4096) -> Likelihood:
  """Log-likelihood of ``x`` [B, ...] (model space, taken as ``x`` at ``t_eps``) under the probability flow.

  Args:
    denoiser: the model under its schedule and parameterisation; examples must not interact (no batch
      statistics), since divergences are taken per example.
    rng: PRNG key for the Hutchinson probes (unused for ``'exact'``).
    x: [B, ...] float data.
    hutchinson: ``'rademacher'``, ``'gaussian'`` or ``'exact'`` (``D`` Jacobian-vector products per
      evaluation; for small ``D``).
    t_eps: start time (default ``schedule.t_min``).
    solver, rtol, atol, max_steps: as :func:`ode.solve`, on ``(x_bar, int div)`` jointly.
  """
  if hutchinson not in ESTIMATORS:
    raise ValueError(f'Unknown hutchinson {hutchinson!r}; choose one of {ESTIMATORS}.')
  x = jnp.asarray(x, jnp.float32)
  dim = math.prod(x.shape[1:])
  if hutchinson == 'rademacher':
    probe = jax.random.rademacher(rng, x.shape, jnp.float32)
  elif hutchinson == 'gaussian':
    probe = jax.random.normal(rng, x.shape, jnp.float32)
  else:
    probe = None
  schedule = denoiser.schedule
  u0, alpha_eps = ode.flow_time(schedule, schedule.t_min if t_eps is None else t_eps)
  u1, alpha_T = ode.flow_time(schedule, schedule.t_max)
  joint = _divergence_field(ode.probability_flow(denoiser), x.shape, hutchinson, probe)
  y0 = (x / alpha_eps, jnp.zeros(x.shape[:1], jnp.float32))
  (x_bar, delta_logp), _, nfe = ode.solve(joint, y0, u0=u0, u1=u1, solver=solver, rtol=rtol, atol=atol,
                                          max_steps=max_steps)
  z = alpha_T * x_bar
  prior_logp = schedule.prior_logp(z)
  log_p = prior_logp + delta_logp + dim * (jnp.log(alpha_T) - jnp.log(alpha_eps))
  return Likelihood(log_p=log_p, prior_logp=prior_logp, z=z, nfe=nfe)


def bits_per_dim(nll: Array, shape: Sequence[int]) -> Array:
  """Converts a negative log-likelihood in nats of one example of ``shape`` (no batch axis) to bits/dim."""
  return nll / (math.prod(shape) * math.log(2))


def uniform_dequantize(rng: Array, pixels: Array, *, num_bins: int = 256) -> Array:
  """Integer pixels ``k`` in ``[0, num_bins)`` -> ``x = (k + u) 2 / num_bins - 1`` in ``[-1, 1)``, ``u ~ U[0, 1)``."""
  u = jax.random.uniform(rng, pixels.shape, jnp.float32)
  return (pixels.astype(jnp.float32) + u) * (2.0 / num_bins) - 1.0


def dequantized_bits_per_dim(log_p: Array, shape: Sequence[int], *, num_bins: int = 256) -> Array:
  """Bits/dim of the discrete pixels from the log-density ``log_p`` [B] of their dequantised ``[-1, 1)`` image.

  ``-(log_p + D log(2 / num_bins)) / (D log 2)``: the density of ``y = k + u`` in pixel units is
  ``p_x (2 / num_bins)^D`` (module docstring); 7 bits/dim above the continuous value for 256 bins.
  """
  d = math.prod(shape)
  return -(log_p + d * math.log(2.0 / num_bins)) / (d * math.log(2))


def ode_bits_per_dim(denoiser: Denoiser, rng: Array, x: Array, *, dequantize: bool = True, num_bins: int = 256,
                     hutchinson: str = 'rademacher', t_eps: float | None = None, solver: str = 'tsit5',
                     rtol: float = 1e-5, atol: float = 1e-5, max_steps: int = 4096) -> tuple[Array, Likelihood]:
  """Bits/dim [B] of ``x`` through :func:`ode_log_likelihood`, and its :class:`Likelihood`.

  With ``dequantize`` (score-SDE's evaluation), ``x`` [B, ...] holds integer pixels in ``[0, num_bins)``;
  they are dequantised with the first half of ``rng`` (:func:`uniform_dequantize`) and the result is the
  upper bound on the discrete bits/dim (:func:`dequantized_bits_per_dim`), 8-bit numbers comparable with
  published ones. Otherwise ``x`` is continuous model-space data and the result is its continuous
  ``-log p / (D log 2)``. The second half of ``rng`` draws the Hutchinson probes.
  """
  rng_dequantize, rng_probe = jax.random.split(rng)
  shape = x.shape[1:]
  if dequantize:
    x = uniform_dequantize(rng_dequantize, x, num_bins=num_bins)
  result = ode_log_likelihood(denoiser, rng_probe, x, hutchinson=hutchinson, t_eps=t_eps, solver=solver,
                              rtol=rtol, atol=atol, max_steps=max_steps)
  if dequantize:
    return dequantized_bits_per_dim(result.log_p, shape, num_bins=num_bins), result
  return bits_per_dim(-result.log_p, shape), result
