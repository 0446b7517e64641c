"""Flow matching in closed form: interpolants, the velocity parameterisation, the exact mixture velocity, SD3's time
densities and shifts, and the conditional flow-matching loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, stats

from diffax.diffusion import losses, parameterization, schedules, time_sampling
from diffax.testing import mixtures

RF, GVP = schedules.get_schedule('rectified_flow'), schedules.get_schedule('gvp')
PATHS = {'rectified_flow': RF, 'gvp': GVP, 'vp': schedules.VPSDE(), 'cosine': schedules.CosineSchedule()}
RING = mixtures.ring_mixture()


def _state(schedule, n=64, dim=3):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  t = jax.random.uniform(k1, (n,), minval=schedule.t_min, maxval=schedule.t_max)
  x0, eps = jax.random.normal(k2, (n, dim)), jax.random.normal(k3, (n, dim))
  return x0, eps, schedule.marginal(x0, t, eps), t


def test_interpolants_in_closed_form():
  t = jnp.linspace(0.01, 0.99, 50)
  for schedule, (alpha, sigma) in ((RF, (1 - t, t)), (GVP, (jnp.cos(math.pi * t / 2), jnp.sin(math.pi * t / 2)))):
    a, s = schedule.alpha_sigma(t)
    np.testing.assert_allclose(a, alpha, atol=1e-6)
    np.testing.assert_allclose(s, sigma, atol=1e-6)
    np.testing.assert_allclose(schedule.log_snr(t), 2 * np.log(alpha / sigma), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(schedule.t_from_log_snr(schedule.log_snr(t)), t, atol=1e-5)
    # Closed-form rates equal the generic autodiff of alpha_sigma (Schedule.alpha_sigma_dot).
    for closed, auto in zip(schedule.alpha_sigma_dot(t), schedules.Schedule.alpha_sigma_dot(schedule, t)):
      np.testing.assert_allclose(closed, auto, rtol=1e-5, atol=1e-6)
  _, g2 = RF.sde(t)  # g^2 = d sigma^2 / dt - 2 f sigma^2 with f = -1 / (1 - t): 2 t / (1 - t)
  np.testing.assert_allclose(g2, 2 * t / (1 - t), rtol=1e-4)
  assert RF.prior_std == GVP.prior_std == 1.0 and 0 < RF.t_min < RF.t_max < 1


@pytest.mark.parametrize('name', sorted(PATHS))
def test_velocity_is_the_time_derivative_of_the_interpolant_and_converts_exactly(name):
  """u = d/dt (alpha_t x0 + sigma_t eps) by jax.jvp of ``schedule.marginal``; (V) inverts it, and going through
  the velocity to every other prediction and back gives the same (x0, eps)."""
  schedule = PATHS[name]
  x0, eps, x_t, t = _state(schedule)
  alpha, sigma = schedule.alpha_sigma(t)
  da, ds = schedule.alpha_sigma_dot(t)
  _, u_auto = jax.jvp(lambda t: schedule.marginal(x0, t, eps), (t,), (jnp.ones_like(t),))
  rates = dict(alpha_dot_t=da, sigma_dot_t=ds)
  u = parameterization.output_from_x0_eps('velocity', x0, eps, x_t, alpha, sigma, **rates)
  np.testing.assert_allclose(u, u_auto, rtol=1e-4, atol=1e-4)
  x0_back, eps_back = parameterization.x0_eps_from_output('velocity', u, x_t, alpha, sigma, **rates)
  np.testing.assert_allclose(x0_back, x0, atol=2e-3, rtol=1e-3)
  np.testing.assert_allclose(eps_back, eps, atol=2e-3, rtol=1e-3)
  for prediction in parameterization.PREDICTIONS:
    out = parameterization.output_from_x0_eps(prediction, x0_back, eps_back, x_t, alpha, sigma)
    x0_p, eps_p = parameterization.x0_eps_from_output(prediction, out, x_t, alpha, sigma)
    u_p = parameterization.output_from_x0_eps('velocity', x0_p, eps_p, x_t, alpha, sigma, **rates)
    np.testing.assert_allclose(u_p, u, rtol=2e-3, atol=2e-3, err_msg=prediction)
  with pytest.raises(ValueError, match='alpha_sigma_dot'):
    parameterization.x0_eps_from_output('velocity', u, x_t, alpha, sigma)


def test_velocity_on_the_linear_path_is_eps_minus_x0_and_on_gvp_pi_over_2_times_v():
  for schedule, expected in ((RF, lambda x0, eps, v: eps - x0), (GVP, lambda x0, eps, v: math.pi / 2 * v)):
    x0, eps, x_t, t = _state(schedule)
    alpha, sigma = schedule.alpha_sigma(t)
    da, ds = schedule.alpha_sigma_dot(t)
    v = parameterization.output_from_x0_eps('v', x0, eps, x_t, alpha, sigma)
    u = parameterization.output_from_x0_eps('velocity', x0, eps, x_t, alpha, sigma, alpha_dot_t=da, sigma_dot_t=ds)
    np.testing.assert_allclose(u, expected(x0, eps, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['rectified_flow', 'gvp', 'vp'])
def test_exact_mixture_velocity_is_the_probability_flow_and_solves_the_continuity_equation(name):
  """From Tweedie's formula (``GaussianMixture.velocity``) against two independent autodiff identities of the
  noised mixture density ``p_t``: the probability-flow drift ``u = f x - g^2 / 2 grad log p_t`` (score-SDE eq. 13)
  and the continuity equation ``d_t log p_t + div u + u . grad log p_t = 0``."""
  schedule = PATHS[name]
  _, _, x_t, t = _state(schedule, n=32, dim=2)
  t = jnp.clip(t, 0.05, 0.95)
  u = jax.jit(lambda x, t: RING.velocity(x, t, schedule))(x_t, t)

  def log_p(x, t):  # one point x [2], time t []
    alpha, sigma = schedule.alpha_sigma(t)
    return RING.log_prob(x[None], alpha[None], sigma[None])[0]

  score = jax.jit(jax.vmap(jax.grad(log_p)))(x_t, t)
  f, g2 = schedule.sde(t)
  np.testing.assert_allclose(u, f[:, None] * x_t - 0.5 * g2[:, None] * score, rtol=2e-3, atol=2e-3)
  dlogp_dt = jax.jit(jax.vmap(jax.grad(log_p, argnums=1)))(x_t, t)
  div_u = jax.jit(jax.vmap(lambda x, t: jnp.trace(jax.jacfwd(lambda y: RING.velocity(y[None], t[None], schedule)[0])(
      x))))(x_t, t)
  residual = dlogp_dt + div_u + jnp.sum(u * score, axis=-1)
  scale = jnp.abs(dlogp_dt) + jnp.abs(div_u) + 1.0
  assert float(jnp.max(jnp.abs(residual) / scale)) < 5e-3


def test_exact_velocity_model_denoises_and_gives_sits_score():
  """A 'velocity' model in a Denoiser recovers the exact posterior mean, and ``-eps_hat / sigma_t`` equals SiT's score
  from the velocity, ``(alpha u - alpha_dot x) / (sigma (alpha_dot sigma - alpha sigma_dot))``."""
  for schedule in (RF, GVP):
    _, _, x_t, t = _state(schedule, dim=2)
    x0_hat, eps_hat = RING.denoiser(schedule, 'velocity')(x_t, t)
    alpha, sigma = schedule.alpha_sigma(t)
    np.testing.assert_allclose(x0_hat, RING.posterior_mean(x_t, alpha, sigma), atol=2e-3 / float(alpha.min()))
    u = np.asarray(RING.velocity(x_t, t, schedule), np.float64)
    a, s = np.asarray(alpha, np.float64)[:, None], np.asarray(sigma, np.float64)[:, None]
    da, ds = (np.asarray(r, np.float64)[:, None] for r in schedule.alpha_sigma_dot(t))
    sit_score = (a * u - da * np.asarray(x_t)) / (s * (da * s - a * ds))
    np.testing.assert_allclose(-eps_hat / sigma[:, None], sit_score, rtol=1e-3, atol=1e-3)


def test_logit_normal_mode_and_cosmap_have_sd3s_distributions():
  n = 20_000
  draw = lambda method, **kw: np.asarray(time_sampling.sample_times(jax.random.key(0), n, schedule=RF, method=method,
                                                                    t_eps=1e-6, **kw)[0], np.float64)
  t = draw('logit_normal', loc=0.5, scale=0.8)  # SD3 eq. 19: logit(t) ~ N(loc, scale^2)
  assert stats.kstest(np.log(t / (1 - t)), stats.norm(0.5, 0.8).cdf).pvalue > 1e-3
  t = draw('cosmap')  # SD3 eq. 21 inverted: P(T <= t) = 2 / pi arctan(t / (1 - t))
  assert stats.kstest(t, lambda x: 2 / np.pi * np.arctan(x / (1 - x))).pvalue > 1e-3
  assert stats.kstest(draw('mode', mode_scale=0.0), 'uniform').pvalue > 1e-3  # s = 0 is uniform
  # SD3 eq. 20, s = 1.29: mean 1/2 and the variance by quadrature of f(u)^2; heavy tails, unlike the logit-normal.
  t = draw('mode', mode_scale=1.29)
  f = lambda u: 1 - u - 1.29 * (np.cos(np.pi * u / 2)**2 - 1 + u)
  var = integrate.quad(lambda u: f(u)**2, 0, 1)[0] - 0.25
  assert abs(t.mean() - 0.5) < 4 * math.sqrt(var / n) and abs(t.var() - var) < 0.05 * var
  assert var < 1 / 12 and np.mean(t < 0.02) > 0.002 and np.mean(draw('logit_normal') < 0.02) < 0.0005
  with pytest.raises(ValueError, match='mode_scale'):
    draw('mode', mode_scale=2.0)
  with pytest.raises(ValueError, match='t in \\[0, 1\\]'):
    time_sampling.sample_times(jax.random.key(0), 4, schedule=schedules.EDM(), method='logit_normal')


def test_timestep_shift_moves_the_log_snr_by_two_log_shift():
  """SD3 eq. 23 on the linear path: sigma / alpha is multiplied by the shift; SD3 at 1024^2 against 256^2: 4;
  Flux's exp(mu): 0.5 at 256 tokens, 1.15 at 4096."""
  t = jnp.linspace(0.01, 0.99, 99)
  for shift in (0.5, 3.0):
    np.testing.assert_allclose(RF.log_snr(time_sampling.shift_times(t, shift)), RF.log_snr(t) - 2 * math.log(shift),
                               atol=2e-4)
  assert time_sampling.resolution_shift(1024 * 1024) == 4.0
  assert time_sampling.flux_shift(256) == pytest.approx(math.exp(0.5))
  assert time_sampling.flux_shift(4096) == pytest.approx(math.exp(1.15))


def _velocity_apply(schedule):
  """The exact velocity model, perturbed by ``params = [a, b]``: ``u -> (1 + a) u + b x_t``."""

  def apply_fn(params, x, t, cond, *, train, rngs):
    del cond, train, rngs
    return (1.0 + params[0]) * RING.velocity(x, t, schedule) + params[1] * x

  return apply_fn


@pytest.mark.parametrize('name, kwargs', [('rectified_flow', {}), ('gvp', dict(time_sampling='logit_normal')),
                                          ('rectified_flow', dict(time_sampling='mode', shift=3.0, antithetic=True))])
def test_exact_velocity_minimises_the_flow_loss(name, kwargs):
  """The CFM loss is quadratic in the perturbation ``theta``; with common random numbers its sample minimiser
  ``-H^-1 g(0)`` must lie within 0.03 of the exact velocity (theta = 0; measured: at most 0.017, mode + shift).
  The velocity target is noisier than an x0 target, so the batch is 16k. A wrong target (a sign, the v of another path) moves it by O(1)."""
  schedule = PATHS[name]
  x, _ = RING.sample(jax.random.PRNGKey(3), 16384)
  loss_fn = losses.get_loss('flow', _velocity_apply(schedule), schedule=schedule, **kwargs)
  d = 0.05
  thetas = jnp.asarray([[0, 0], [d, 0], [-d, 0], [0, d], [0, -d]], jnp.float32)
  value, grad = jax.jit(jax.vmap(jax.value_and_grad(lambda p: loss_fn(p, {'x': x}, jax.random.key(1))[0])))(thetas)
  value, grad = np.asarray(value, np.float64), np.asarray(grad, np.float64)
  assert np.all(value[0] < value[1:]), value
  hessian = np.stack([grad[1] - grad[2], grad[3] - grad[4]], axis=1) / (2 * d)
  theta_star = -np.linalg.solve(hessian, grad[0])
  assert np.max(np.abs(theta_star)) < 0.03, theta_star


def test_flow_loss_is_the_velocity_mse_in_every_parameterisation():
  """Default: aux['loss'] = ||u_hat - (eps - x0)||^2 on the linear path; every prediction of the same model gives
  the same per-example loss (the velocity weighting, SD3's ``w_t = t / (1 - t)`` on the eps-loss)."""
  x, _ = RING.sample(jax.random.PRNGKey(3), 256)
  per_example = []
  for prediction in parameterization.ALL_PREDICTIONS:
    model_fn = RING.model_fn(RF, prediction)
    if prediction == 'edm':
      continue
    apply_fn = lambda p, x, t, cond, train, rngs, m=model_fn: m(x, t) * (1.0 + p)
    loss_fn = losses.flow_loss(apply_fn, schedule=RF, prediction=prediction, time_sampling='logit_normal')
    per_example.append(jax.jit(loss_fn)(jnp.float32(0.0), {'x': x}, jax.random.key(2))[1])
  for aux in per_example[1:]:
    np.testing.assert_allclose(aux['loss'], per_example[0]['loss'], rtol=2e-3, atol=1e-5)
  t = np.asarray(per_example[0]['t'])
  np.testing.assert_allclose(per_example[0]['weight'], 1 / t**2, rtol=1e-4)  # (d / sigma)^2 in x0-space
  rf_eps = losses.Weighting('velocity')(jnp.asarray(t), schedule=RF, prediction='eps')
  np.testing.assert_allclose(rf_eps / np.square((1 - t) / t), 1 / (1 - t)**2, rtol=1e-4)  # eps-space: w_t lambda'/2


def test_flow_loss_drops_labels_and_rejects_bad_options():
  seen = []

  def apply_fn(params, x, t, cond, *, train, rngs):
    seen.append(cond)
    return params * x

  batch = {'x': jnp.ones((64, 2)), 'cond': jnp.zeros((64,), jnp.int32)}
  loss_fn = losses.flow_loss(apply_fn, schedule=RF, cond_dropout=losses.CondDropout(0.5, null_label=10))
  _, aux = loss_fn(jnp.float32(1.0), batch, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(seen[0]) == 10, aux['uncond'])
  assert 10 < int(aux['uncond'].sum()) < 54
  assert float(jnp.min(aux['t'])) >= RF.t_min and float(jnp.max(aux['t'])) <= RF.t_max
  with pytest.raises(ValueError, match='logit_normal'):
    losses.flow_loss(apply_fn, schedule=RF, time_sampling='lognormal')
  with pytest.raises(ValueError, match='t_max'):
    losses.flow_loss(apply_fn, schedule=schedules.EDM())
