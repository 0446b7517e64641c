"""Closed-form tests of the training losses: the exact mixture denoiser minimises every loss, the weightings
equal independent numpy formulas, condition dropout and time sampling have the stated distributions, and
every loss jits, vmaps and differentiates."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffax.diffusion import losses, parameterization, schedules, time_sampling
from diffax.testing import mixtures

import np_schedules

_MIX = mixtures.ring_mixture()  # 8 isotropic modes of std 0.1 on the unit circle, weights proportional to k + 1


def _ring_samples(n: int, seed: int = 0) -> jax.Array:
  """Exact samples [n, 2] of ``_MIX``, drawn with numpy (no per-op compiles at import)."""
  rs = np.random.RandomState(seed)
  weights = np.asarray(_MIX.weights, np.float64)
  labels = rs.choice(8, size=n, p=weights / weights.sum())
  return jnp.asarray(np.asarray(_MIX.means)[labels] + 0.1 * rs.randn(n, 2), jnp.float32)


_X = _ring_samples(4096)


def _time_and_x_t(schedule, prediction, x_in, t_in, sigma_data):
  """Undoes ``model_inputs``: ``(x_t, t)`` from what the network sees (the EDM inputs are preconditioned)."""
  if prediction != 'edm':
    return x_in, t_in
  sigma_ve = jnp.exp(4.0 * t_in)
  t = schedule.t_from_log_snr(-2.0 * jnp.log(sigma_ve))
  alpha_t, _ = schedule.alpha_sigma(t)
  _, _, c_in, _ = parameterization.edm_preconditioning(sigma_ve, sigma_data)
  return x_in * (alpha_t / c_in)[:, None], t


def _exact_apply(schedule, prediction, *, sigma_data=0.5, variance_channels=False):
  """The exact mixture model as an ``apply_fn`` whose ``params = [a, b]`` perturb it in x0-space:
  ``x0_hat -> (1 + a) x0_hat + b`` (``eps_hat`` follows, so the output stays consistent with ``x_t``)."""
  model_fn = _MIX.model_fn(schedule, prediction, sigma_data=sigma_data)

  def apply_fn(params, x_in, t_in, cond, *, train, rngs):
    del cond, train, rngs
    x_t, t = _time_and_x_t(schedule, prediction, x_in, t_in, sigma_data)
    alpha_t, sigma_t = schedule.alpha_sigma(t)
    x0, _ = parameterization.x0_eps_from_output(prediction, model_fn(x_in, t_in), x_t, alpha_t, sigma_t,
                                                sigma_data=sigma_data)
    x0 = (1.0 + params[0]) * x0 + params[1]
    eps = (x_t - alpha_t[:, None] * x0) / sigma_t[:, None]
    out = parameterization.output_from_x0_eps(prediction, x0, eps, x_t, alpha_t, sigma_t, sigma_data=sigma_data)
    return jnp.concatenate([out, jnp.zeros_like(out)], axis=-1) if variance_channels else out

  return apply_fn


_MINIMISER_CASES = {
    'ddpm-eps': ('ddpm', schedules.LinearSchedule(), dict(prediction='eps')),
    'ddpm-v-min_snr': ('ddpm', schedules.CosineSchedule(), dict(prediction='v', weighting='min_snr')),
    'dsm-x0-likelihood-is': ('dsm', schedules.VPSDE(), dict(prediction='x0', weighting='likelihood',
                                                            importance_sampling=True, antithetic=True)),
    'edm-edm': ('edm', schedules.EDM(), dict(antithetic=True)),
    'edm-on-vp-eps': ('edm', schedules.VPSDE(), dict(prediction='eps')),
}


@pytest.mark.parametrize('case', sorted(_MINIMISER_CASES))
def test_exact_denoiser_minimises_the_loss(case):
  """Common random numbers (one rng for every perturbation) make the comparison sharp.

  Each loss is quadratic in ``theta = (a, b)``, so ``theta* = -H^-1 g(0)`` (H from central differences of
  the gradient, exact for a quadratic) is the minimiser the sample sees; it must lie within 0.01 of the
  exact model, a fifth of the perturbation (measured: at most 0.0036, in 'ddpm-eps'). Any positive
  weighting is minimised by the exact denoiser, so this checks targets, inputs and noise, not weights.
  """
  name, schedule, kwargs = _MINIMISER_CASES[case]
  prediction = kwargs.get('prediction', 'edm')
  apply_fn = _exact_apply(schedule, prediction, variance_channels=name == 'hybrid')
  loss_fn = losses.get_loss(name, apply_fn, schedule=schedule, **kwargs)
  d = 0.05
  thetas = jnp.asarray([[0, 0], [d, 0], [-d, 0], [0, d], [0, -d]], jnp.float32)
  value, grad = jax.jit(jax.vmap(jax.value_and_grad(lambda p: loss_fn(p, {'x': _X}, jax.random.key(1))[0])))(thetas)
  value, grad = np.asarray(value, np.float64), np.asarray(grad, np.float64)
  assert np.all(value[0] < value[1:]), value
  hessian = np.stack([grad[1] - grad[2], grad[3] - grad[4]], axis=1) / (2 * d)
  theta_star = -np.linalg.solve(hessian, grad[0])
  assert np.max(np.abs(theta_star)) < 0.2 * d, theta_star
  assert np.linalg.norm(grad[0]) < 0.2 * min(np.linalg.norm(g) for g in grad[1:])


def test_losses_agree_across_predictions():
  """One weighting, five parameterisations of the same (perturbed) model: identical per-example losses."""
  schedule = schedules.VPSDE()
  theta = jnp.asarray([0.1, 0.05], jnp.float32)

  @jax.jit
  def per_example():
    out = []
    for prediction in parameterization.PREDICTIONS:
      loss_fn = losses.dsm_loss(_exact_apply(schedule, prediction), schedule=schedule, prediction=prediction,
                                weighting='truncated_snr')
      out.append(loss_fn(theta, {'x': _X[:512]}, jax.random.key(2))[1]['loss'])
    return jnp.stack(out)

  got = np.asarray(per_example())
  for row in got[1:]:
    np.testing.assert_allclose(row, got[0], rtol=1e-3, atol=1e-6)  # measured: 1.2e-4


def _np_reference(kind, x0, x_t, t, out, schedule, prediction, sd=0.5):
  """Per-example loss [B] from the papers' own formulas, in float64 numpy."""
  a, s = np_schedules.alpha_sigma(schedule, t)
  a, s = a[:, None], s[:, None]
  eps = (x_t - a * x0) / s
  snr = (a / s)**2
  if prediction == 'eps':
    eps_hat = out
  elif prediction == 'x0':
    eps_hat = (x_t - a * out) / s
  elif prediction == 'v':  # VP: x0 = a x_t - s v, eps = s x_t + a v
    eps_hat = s * x_t + a * out
  elif prediction == 'score':
    eps_hat = -s * out
  else:
    sigma = s / a
    c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / np.sqrt(sigma**2 + sd**2)
    f_target = (x0 - c_skip * x_t / a) / c_out
    d_hat = c_skip * x_t / a + c_out * out
    lam = (sigma**2 + sd**2) / (sigma * sd)**2
    np.testing.assert_allclose(lam * c_out**2, 1.0, rtol=1e-12)
    if kind == 'edm':  # EDM eq. 8 on D, and the unit-weight F-MSE it equals
      ref = np.mean(lam * (d_hat - x0)**2, -1)
      np.testing.assert_allclose(ref, np.mean((out - f_target)**2, -1), rtol=1e-6)
      return ref
    eps_hat = (x_t - a * d_hat) / s
  mse_eps = np.mean((eps_hat - eps)**2, -1)
  x0_hat = (x_t - s * eps_hat) / a
  if kind == 'eps':  # Ho et al. eq. 14
    return mse_eps
  if kind == 'min_snr':  # Hang et al., written for the v-MSE: min(snr, 5) / (snr + 1)
    v, v_hat = a * eps - s * x0, a * eps_hat - s * x0_hat
    return np.mean(np.minimum(snr, 5.0) / (snr + 1) * (v_hat - v)**2, -1)
  if kind == 'p2':  # Choi et al.: L_simple / (k + snr)^gamma, k = 1, gamma = 0.5
    return np.mean((eps_hat - eps)**2 / np.sqrt(1.0 + snr), -1)
  if kind == 'likelihood':  # Song et al. 2021b: g(t)^2 ||s_hat - s||^2, g^2 = beta(t) for VP
    g2 = schedule.beta_min + t[:, None] * (schedule.beta_max - schedule.beta_min)
    return np.mean(g2 * (-eps_hat / s + eps / s)**2, -1)
  if kind == 'sigma2':  # Song et al. eq. 7, lambda = sigma^2 on the score
    return np.mean(s**2 * (-eps_hat / s + eps / s)**2, -1)
  if kind == 'v':
    v, v_hat = a * eps - s * x0, a * eps_hat - s * x0_hat
    return np.mean((v_hat - v)**2, -1)
  assert kind == 'truncated_snr'
  return np.mean(np.maximum(snr, 1.0) * (x0_hat - x0)**2, -1)


_IDENTITY_CASES = [
    ('ddpm', schedules.LinearSchedule(), 'x0', 'eps', 'eps'),
    ('ddpm', schedules.CosineSchedule(), 'v', 'min_snr', 'min_snr'),
    ('ddpm', schedules.LinearSchedule(), 'eps', losses.Weighting('p2', gamma=0.5, k=1.0), 'p2'),
    ('dsm', schedules.VPSDE(), 'score', 'likelihood', 'likelihood'),
    ('ddpm', schedules.VESDE(), 'eps', 'eps', 'sigma2'),  # SMLD's discrete sigmas
    ('edm', schedules.EDM(), 'edm', 'edm', 'edm'),
    ('dsm', schedules.VPSDE(), 'eps', 'v', 'v'),
    ('ddpm', schedules.CosineSchedule(), 'x0', 'truncated_snr', 'truncated_snr'),
]


@pytest.mark.parametrize('name,schedule,prediction,weighting,kind', _IDENTITY_CASES,
                         ids=[c[-1] for c in _IDENTITY_CASES])
def test_weighting_equals_numpy_formula(name, schedule, prediction, weighting, kind):
  """Runs the loss unjitted, records what the network saw and returned, and recomputes each per-example
  loss in float64 with the formula as its paper writes it (in eps-, v-, score- or D-space)."""
  seen = []
  exact = _exact_apply(schedule, prediction)

  def apply_fn(params, x_in, t_in, cond, *, train, rngs):
    out = exact(params, x_in, t_in, cond, train=train, rngs=rngs)
    seen.append((x_in, t_in, out))
    return out

  x0 = _X[:64]
  kwargs = {} if name == 'edm' else {'prediction': prediction}
  loss_fn = losses.get_loss(name, apply_fn, schedule=schedule, weighting=weighting, **kwargs)
  loss, aux = loss_fn(jnp.asarray([0.1, -0.05], jnp.float32), {'x': x0}, jax.random.key(3))
  x_in, t_in, out = (np.asarray(v, np.float64) for v in seen[0])
  t = np.asarray(aux['t'], np.float64)
  if prediction == 'edm':
    sd = 0.5
    x_in = x_in * np.sqrt(t**2 + sd**2)[:, None]  # undo c_in (alpha = 1)
  ref = _np_reference(kind, np.asarray(x0, np.float64), x_in, t, out, schedule, prediction)
  np.testing.assert_allclose(np.asarray(aux['loss']), ref, rtol=2e-3, atol=1e-7)
  np.testing.assert_allclose(float(loss), ref.mean(), rtol=2e-3)
  np.testing.assert_allclose(aux['loss'], aux['weight'] * aux['mse_x0'], rtol=1e-5)


def test_condition_dropout():
  """Dropped fraction within 4 binomial sigmas; null label and zeroed context on the same examples."""
  p, batch = 0.3, 20000
  rng = np.random.RandomState(0)
  cond = {'label': jnp.asarray(rng.randint(0, 10, batch), jnp.int32),
          'context': jnp.asarray(rng.randn(batch, 3, 2) + 5.0, jnp.float32)}
  dropout = losses.CondDropout(p_uncond=p, null_label=10)
  new, dropped = jax.jit(lambda c, r: losses.drop_condition(c, r, dropout, batch_size=batch))(cond, jax.random.key(0))
  dropped = np.asarray(dropped)
  assert abs(dropped.mean() - p) < 4 * math.sqrt(p * (1 - p) / batch)
  assert np.all(np.asarray(new['label'])[dropped] == 10)
  np.testing.assert_array_equal(np.asarray(new['label'])[~dropped], np.asarray(cond['label'])[~dropped])
  assert np.all(np.asarray(new['context'])[dropped] == 0.0)
  np.testing.assert_array_equal(np.asarray(new['context'])[~dropped], np.asarray(cond['context'])[~dropped])
  context = jnp.ones((3, 2, 2), jnp.float32)
  custom, _ = losses.drop_condition(context, jax.random.key(0), losses.CondDropout(1.0, null_value=-1.0),
                                    batch_size=3)
  assert np.all(np.asarray(custom) == -1.0)
  same, none = losses.drop_condition(cond, jax.random.key(0), None, batch_size=batch)
  assert same is cond and not np.any(none)
  with pytest.raises(ValueError, match='null_label'):
    losses.drop_condition(cond['label'], jax.random.key(0), losses.CondDropout(0.1), batch_size=batch)


def test_antithetic_times_are_stratified_and_marginally_uniform():
  batch, keys = 8, jax.random.split(jax.random.key(0), 4000)
  u = np.asarray(jax.jit(jax.vmap(lambda k: time_sampling.stratified_uniform(k, batch, antithetic=True)))(keys))
  np.testing.assert_array_equal(np.sort(np.floor(u * batch), axis=1), np.broadcast_to(np.arange(batch), u.shape))
  for i in (0, 5):
    assert stats.kstest(u[:, i], 'uniform').pvalue > 1e-3
  n = np.asarray(jax.jit(lambda k: time_sampling.sample_timesteps(k, 100, 1000, antithetic=True))(keys[0]))
  np.testing.assert_array_equal(np.sort(n // 10), np.arange(100))  # one timestep per bin of ten
  sched = schedules.EDM()
  sigma = np.asarray(jax.jit(lambda k: time_sampling.sample_times(k, 64, schedule=sched, method='lognormal',
                                                                  antithetic=True)[0])(keys[1]))
  q = stats.norm.cdf((np.log(sigma) - sched.p_mean) / sched.p_std)
  np.testing.assert_array_equal(np.sort(np.floor(q * 64)), np.arange(64))


def test_time_distributions():
  """Discrete times are knots; lognormal matches EDM.training_sigma and, on a VP schedule, N(p_mean, p_std)
  in ln(sigma_t / alpha_t); log-SNR importance weights have mean 1 and reweight to the uniform mean."""
  key = jax.random.key(7)
  lin = schedules.LinearSchedule()
  t, w = time_sampling.sample_times(key, 4000, schedule=lin, method='discrete')
  k = np.asarray(t) * 1000
  np.testing.assert_allclose(k, np.round(k), atol=1e-3)
  assert np.all(np.asarray(w) == 1) and k.min() >= 1 and k.max() <= 1000
  assert stats.kstest(np.round(k), stats.randint(1, 1001).cdf).pvalue > 1e-3
  edm = schedules.EDM()
  np.testing.assert_array_equal(time_sampling.sample_times(key, 64, schedule=edm, method='lognormal')[0],
                                edm.training_sigma(key, (64,)))
  vp = schedules.VPSDE()
  t_vp = time_sampling.sample_times(key, 4000, schedule=vp, method='lognormal', p_mean=-1.0, p_std=1.0)[0]
  log_sigma = -0.5 * np.asarray(vp.log_snr(t_vp), np.float64)
  assert stats.kstest(log_sigma, stats.norm(-1.0, 1.0).cdf).pvalue > 1e-3
  t_is, iw = time_sampling.sample_times(key, 4000, schedule=vp, method='log_snr', t_eps=0.05)
  t_is, iw = np.asarray(t_is, np.float64), np.asarray(iw, np.float64)
  lam = np.asarray(vp.log_snr(jnp.asarray(t_is, jnp.float32)), np.float64)
  lam_range = np.asarray(vp.log_snr(jnp.asarray([1.0, 0.05], jnp.float32)), np.float64)
  assert stats.kstest(lam, stats.uniform(lam_range[0], lam_range[1] - lam_range[0]).cdf).pvalue > 1e-3
  se = iw.std() / math.sqrt(iw.size)
  assert abs(iw.mean() - 1.0) < 4 * se
  assert abs((iw * t_is).mean() - 0.525) < 4 * (iw * t_is).std() / math.sqrt(iw.size)


def _linear_apply(params, x_in, t_in, cond, *, train, rngs):
  """A tiny model: per-pixel linear map plus a label embedding, scaled by the time input."""
  assert train and set(rngs) == {'dropout'}
  h = jnp.einsum('bhwc,cd->bhwd', x_in, params['w']) + params['emb'][cond][:, None, None, :]
  return h * (1.0 + t_in.reshape(-1, 1, 1, 1))


@pytest.mark.parametrize('name', sorted(losses.LOSSES))
def test_every_loss_jits_vmaps_and_differentiates(name):
  """jit(vmap(grad)) over two parameter sets: finite, nonzero gradients for every parameter, and the scalar
  loss is the batch mean of ``aux['loss']``.

  ``'ddpm'`` also drops labels: the gradient reaches the null label's embedding row exactly when some
  example was dropped, and a label's own row exactly when its example was kept. ``'hybrid'`` checks the
  stop-gradient on the mean: the mean channels get exactly the L_simple gradient, and the variance
  channels ``vlb_weight`` times the L_vlb gradient.
  """
  schedule = schedules.EDM() if name == 'edm' else schedules.CosineSchedule(num_timesteps=50)
  channels_out = 4 if name == 'hybrid' else 2
  rng = np.random.RandomState(0)
  params = {'w': jnp.asarray(0.3 * rng.randn(2, 2, channels_out), jnp.float32),
            'emb': jnp.asarray(0.1 * rng.randn(2, 11, channels_out), jnp.float32)}
  labels = np.array([1, 2, 3, 4])
  batch = {'x': jnp.asarray(rng.uniform(-1, 1, (4, 3, 3, 2)), jnp.float32), 'cond': jnp.asarray(labels, jnp.int32)}
  kwargs = {'vlb_weight': 0.5} if name == 'hybrid' else {}
  dropout = losses.CondDropout(p_uncond=0.5, null_label=10) if name == 'ddpm' else None
  loss_fn = losses.get_loss(name, _linear_apply, schedule=schedule, cond_dropout=dropout, **kwargs)

  def parts(p):  # [loss, mean L_simple, mean L_vlb] for the hybrid, [loss] otherwise
    loss, aux = loss_fn(p, batch, jax.random.key(1))
    extra = [jnp.mean(aux['mse']), jnp.mean(aux['vlb'])] if name == 'hybrid' else []
    return jnp.stack([loss] + extra), aux

  jac, aux = jax.jit(jax.vmap(jax.jacrev(parts, has_aux=True)))(params)
  assert aux['loss'].shape == (2, 4) and aux['t'].shape == (2, 4)
  for leaf in jax.tree.leaves(jac):
    assert np.all(np.isfinite(leaf)) and np.any(leaf[:, 0] != 0)
  if name == 'ddpm':
    emb_grad = np.abs(np.asarray(jac['emb'][:, 0])).sum(-1)  # [2, 11]
    uncond = np.asarray(aux['uncond'][0])
    assert 0 < uncond.sum() < 4  # both branches are exercised with this rng
    np.testing.assert_array_equal(emb_grad[:, labels] > 0, np.broadcast_to(~uncond, (2, 4)))
    assert np.all(emb_grad[:, 10] > 0)
  if name == 'hybrid':
    w = np.asarray(jac['w'])  # [2 param sets, 3 parts, 2, 4 channels]
    np.testing.assert_allclose(w[:, 0, :, :2], w[:, 1, :, :2], rtol=1e-5, atol=1e-8)
    assert np.all(w[:, 1, :, 2:] == 0) and np.all(w[:, 2, :, 2:] != 0)
    np.testing.assert_allclose(w[:, 0, :, 2:], 0.5 * w[:, 2, :, 2:], rtol=1e-5)


def test_bf16_model_matches_fp32():
  """A model that computes in bf16 (inputs and outputs rounded) leaves the fp32 schedule maths intact."""
  schedule = schedules.LinearSchedule()
  fp32 = _exact_apply(schedule, 'eps')

  def bf16(params, x_in, t_in, cond, *, train, rngs):
    x_in, t_in = x_in.astype(jnp.bfloat16).astype(jnp.float32), t_in.astype(jnp.bfloat16).astype(jnp.float32)
    return fp32(params, x_in, t_in, cond, train=train, rngs=rngs).astype(jnp.bfloat16)

  theta = jnp.zeros((2,), jnp.float32)

  @jax.jit
  def both():
    return [losses.ddpm_loss(fn, schedule=schedule)(theta, {'x': _X[:1024]}, jax.random.key(4))[0]
            for fn in (fp32, bf16)]

  a, b = both()
  assert abs(float(b) / float(a) - 1.0) < 5e-3  # measured: 5.6e-4


def test_bad_options_say_what_is_allowed():
  with pytest.raises(ValueError, match='Unknown loss'):
    losses.get_loss('nope', _linear_apply, schedule=schedules.VPSDE())
  with pytest.raises(ValueError, match='Unknown weighting'):
    losses.ddpm_loss(_linear_apply, schedule=schedules.VPSDE(), weighting='snr2')
  with pytest.raises(ValueError, match='Unknown prediction'):
    losses.dsm_loss(_linear_apply, schedule=schedules.VPSDE(), prediction='noise')
  with pytest.raises(ValueError, match='Unknown reduce'):
    losses.edm_loss(_linear_apply, schedule=schedules.EDM(), reduce='max')
  with pytest.raises(ValueError, match='Unknown variance'):
    losses.hybrid_loss(_linear_apply, schedule=schedules.CosineSchedule(), variance='fixed')
  with pytest.raises(ValueError, match='Unknown time sampling'):
    time_sampling.sample_times(jax.random.key(0), 4, schedule=schedules.VPSDE(), method='beta')
