"""Progressive distillation and consistency models against closed forms on exact Gaussian mixtures.

A teacher that is the exact mixture denoiser makes every distillation target computable in float64 numpy; small
MLP students trained for a few hundred steps show that one round of progressive distillation keeps the teacher's
sample error at half the steps and that consistency training / distillation lower the one-step error.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffax.diffusion import distillation, schedules
from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import ddim_sample, edm_heun_sample
from diffax.diffusion.samplers.consistency import consistency_sample
from diffax.testing import mixtures

VP = schedules.VPSDE()
EDM = schedules.EDM()
RING = mixtures.ring_mixture()


def _exact_teacher(schedule, prediction='v'):
  model_fn = RING.model_fn(schedule, prediction)
  return distillation.Teacher(lambda params, x, t, cond, *, train, rngs: model_fn(x, t), {}, schedule, prediction)


def _np_posterior_mean(x, alpha, sigma):
  """float64 Tweedie denoiser of the isotropic ring mixture [N, 2]."""
  w, mu, var0 = (np.asarray(v, np.float64) for v in (RING.weights, RING.means, RING.eigvals[:, 0]))
  var = alpha[:, None]**2 * var0[None] + sigma[:, None]**2  # [N, K]
  resid = x[:, None, :] - alpha[:, None, None] * mu[None]  # [N, K, 2]
  log_r = np.log(w)[None] - 0.5 * np.sum(resid**2, -1) / var - np.log(var)
  r = np.exp(log_r - log_r.max(-1, keepdims=True))
  r /= r.sum(-1, keepdims=True)
  m_k = mu[None] + (alpha[:, None] * var0[None] / var)[..., None] * resid
  return np.einsum('nk,nkd->nd', r, m_k)


def _f64(x):
  return np.asarray(x, np.float64)


@pytest.mark.parametrize('i', [1, 2, 4])
def test_progressive_target_matches_a_float64_reference(i):
  """PD eq. 8 with two exact teacher DDIM steps, against numpy float64 (i = 1 ends at clean data t'' = 0)."""
  n = 4
  x0, _ = RING.sample(jax.random.key(0), 512)
  t = jnp.full((512,), i / n)
  t_mid, t_next = t - 0.5 / n, t - 1.0 / n
  z_t = VP.marginal(x0, t, jax.random.normal(jax.random.key(1), x0.shape))
  got = distillation.progressive_target(_exact_teacher(VP).denoiser(), z_t, t, t_mid, t_next)

  (a_t, s_t), (a_m, s_m) = (tuple(map(_f64, VP.alpha_sigma(s))) for s in (t, t_mid))
  a_n, s_n = (np.ones(512), np.zeros(512)) if i == 1 else tuple(map(_f64, VP.alpha_sigma(t_next)))
  z = _f64(z_t)
  x_hat = _np_posterior_mean(z, a_t, s_t)
  z_mid = a_m[:, None] * x_hat + (s_m / s_t)[:, None] * (z - a_t[:, None] * x_hat)
  x_hat_mid = _np_posterior_mean(z_mid, a_m, s_m)
  z_next = a_n[:, None] * x_hat_mid + (s_n / s_m)[:, None] * (z_mid - a_m[:, None] * x_hat_mid)
  ratio = (s_n / s_t)[:, None]
  want = (z_next - ratio * z) / (a_n[:, None] - ratio * a_t[:, None])
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-3)
  if i == 1:
    np.testing.assert_allclose(np.asarray(got), x_hat_mid, atol=2e-4)  # the last pair lands on the x0-prediction


def test_one_ddim_step_to_the_target_reproduces_the_two_teacher_steps():
  """The defining property of x_tilde: DDIM from t with x0 = x_tilde lands where two teacher steps land."""
  x0, _ = RING.sample(jax.random.key(2), 256)
  t = jnp.full((256,), 0.75)
  z_t = VP.marginal(x0, t, jax.random.normal(jax.random.key(3), x0.shape))
  denoiser = _exact_teacher(VP).denoiser()
  x_tilde = distillation.progressive_target(denoiser, z_t, t, t - 0.125, t - 0.25)
  (a_t, s_t), (a_s, s_s) = VP.alpha_sigma(jnp.float32(0.75)), VP.alpha_sigma(jnp.float32(0.5))
  one = a_s * x_tilde + (s_s / s_t) * (z_t - a_t * x_tilde)
  (a_m, s_m) = VP.alpha_sigma(jnp.float32(0.625))
  x_hat, _ = denoiser(z_t, t)
  z_mid = a_m * x_hat + (s_m / s_t) * (z_t - a_t * x_hat)
  x_hat_mid, _ = denoiser(z_mid, t - 0.125)
  z_next = a_s * x_hat_mid + (s_s / s_m) * (z_mid - a_m * x_hat_mid)
  np.testing.assert_allclose(np.asarray(one), np.asarray(z_next), atol=1e-4)


def test_teacher_heun_step_matches_a_float64_reference():
  """The CD teacher step: EDM's Heun step of dx/dsigma = (x - D) / sigma with the exact denoiser."""
  x0, _ = RING.sample(jax.random.key(4), 256)
  s_hi, s_lo = jnp.full((256,), 2.0), jnp.full((256,), 1.2)
  x = x0 + 2.0 * jax.random.normal(jax.random.key(5), x0.shape)
  got = distillation.teacher_ode_step(_exact_teacher(EDM, 'edm').denoiser(), x, s_hi, s_lo, solver='heun')
  xd = _f64(x)
  d1 = (xd - _np_posterior_mean(xd, np.ones(256), np.full(256, 2.0))) / 2.0
  xe = xd - 0.8 * d1
  d2 = (xe - _np_posterior_mean(xe, np.ones(256), np.full(256, 1.2))) / 1.2
  np.testing.assert_allclose(np.asarray(got), xd - 0.4 * (d1 + d2), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize('schedule,prediction', [(EDM, 'edm'), (VP, 'v'), (schedules.CosineSchedule(), 'eps')])
def test_consistency_function_is_the_identity_at_sigma_min_and_the_edm_raw_network(schedule, prediction):
  """f(x, sigma_min) = x for any network (CM's boundary condition), and with an exact denoiser
  f = c_skip x + c_out F where F is the raw network of the EDM denoiser D."""
  sigma_min, _ = distillation.ve_sigma_range(schedule)
  denoiser = RING.denoiser(schedule, prediction)
  x = jax.random.normal(jax.random.key(6), (64, 2))
  np.testing.assert_allclose(distillation.consistency_function(denoiser, x, jnp.full((64,), sigma_min),
                                                               sigma_min=sigma_min), x, atol=1e-5)
  sigma = jnp.full((64,), 0.7)
  d = RING.posterior_mean(x, 1.0, 0.7)
  c_skip, c_out = distillation.consistency_scalings(0.7, sigma_data=0.5, sigma_min=sigma_min)
  var = 0.7**2 + 0.25
  raw = (d - 0.25 / var * x) / (0.7 * 0.5 / np.sqrt(var))
  np.testing.assert_allclose(distillation.consistency_function(denoiser, x, sigma, sigma_min=sigma_min),
                             c_skip * x + c_out * raw, atol=2e-3, rtol=2e-3)


def test_ict_curriculum_and_lognormal_pairs():
  """iCT eq. 5: N = 11, 21, ..., 1281 in 8 equal stages; eq. 10 puts most mass near sigma = exp(-1.1)."""
  ns = [int(distillation.ict_num_scales(k, total_steps=800)) for k in (0, 99, 100, 350, 799)]
  assert ns == [11, 11, 21, 81, 1281]
  sigmas = distillation.karras_sigmas(81, sigma_min=0.002, sigma_max=80.0, size=1281)
  assert float(sigmas[0]) == pytest.approx(0.002, rel=1e-5) and float(sigmas[80]) == pytest.approx(80.0, rel=1e-5)
  logits = distillation.lognormal_index_logits(sigmas, jnp.int32(81))
  p = np.exp(np.asarray(logits, np.float64))
  assert np.all(p[80:] == 0) and p.sum() == pytest.approx(2.0, abs=0.05)  # erf(+large) - erf(-large), unnormalised
  p /= p.sum()
  mode = int(np.argmax(p))
  assert 0.1 < float(sigmas[mode]) < 1.0


class _MLP(nn.Module):
  """A small time-conditioned MLP on 2-D points: ``(x [B, 2], t [B]) -> [B, 2]``."""

  @nn.compact
  def __call__(self, x, t):
    freqs = jnp.asarray([0.5, 1.0, 2.0, 4.0, 8.0, 16.0], jnp.float32)
    emb = jnp.concatenate([jnp.sin(t[:, None] * freqs[None]), jnp.cos(t[:, None] * freqs[None])], axis=-1)
    h = jnp.concatenate([x, emb], axis=-1)
    for _ in range(3):
      h = nn.silu(nn.Dense(128)(h))
    return nn.Dense(2, kernel_init=nn.initializers.zeros)(h)


def _apply(params, x, t, cond, *, train, rngs):
  del cond, train, rngs
  return _MLP().apply({'params': params}, x, t)


def _train(loss_of, num_steps, *, lr=2e-3, batch_size=512, seed=0):
  """Adam on ``loss_of(step) -> loss_fn`` with fresh mixture batches, in one compiled scan."""
  params = _MLP().init(jax.random.key(seed), jnp.zeros((1, 2)), jnp.zeros((1,)))['params']
  optimizer = optax.adam(optax.cosine_decay_schedule(lr, num_steps, 0.05))

  def body(carry, step):
    params, opt_state = carry
    rng = jax.random.fold_in(jax.random.key(seed + 1), step)
    x, _ = RING.sample(jax.random.fold_in(rng, 0), batch_size)
    grads = jax.grad(lambda p: loss_of(step)(p, {'x': x}, jax.random.fold_in(rng, 1))[0])(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return (optax.apply_updates(params, updates), opt_state), None

  with jax.numpy_dtype_promotion('standard'):  # optax's bias correction mixes Python floats and int32 counts
    (params, _), _ = jax.jit(lambda p: jax.lax.scan(body, (p, optimizer.init(p)), jnp.arange(num_steps)))(params)
  return params


def test_one_round_of_progressive_distillation_keeps_the_sample_error_at_half_the_steps():
  """A 2-step student of the exact 4-step DDIM teacher lands next to the teacher's 4-step samples (same x_T),
  far closer than the teacher itself in 2 steps; errors against the exact ODE solution (DDIM, 256 steps)."""
  teacher = _exact_teacher(VP)
  loss = distillation.progressive_distillation_loss(_apply, teacher=teacher, num_student_steps=2)
  params = _train(lambda step: loss, 800)
  x_T = jax.random.normal(jax.random.key(7), (2000, 2))
  run = lambda d, n: ddim_sample(d, jax.random.key(0), x_T.shape, num_steps=n, x_T=x_T).samples
  exact, teacher4, teacher2 = (run(teacher.denoiser(), n) for n in (256, 4, 2))
  student = run(Denoiser(lambda x, t: _apply(params, x, t, None, train=False, rngs={}), VP, 'v'), 2)
  dist = lambda a, b: float(jnp.mean(jnp.linalg.norm(a - b, axis=-1)))
  assert dist(teacher4, exact) < 0.7 * dist(teacher2, exact)  # halving the teacher's steps costs accuracy ...
  assert dist(student, exact) < 1.1 * dist(teacher4, exact)  # ... the student's 2 steps do not
  assert dist(student, teacher4) < 0.2 * dist(teacher2, teacher4)


def _one_step_error(params):
  x_T = 80.0 * jax.random.normal(jax.random.key(8), (2000, 2))
  exact = edm_heun_sample(RING.denoiser(EDM, 'edm'), jax.random.key(0), x_T.shape, num_steps=64, x_T=x_T).samples
  net = Denoiser(lambda x, t: _apply(params, x, t, None, train=False, rngs={}), EDM, 'edm')
  cm = Denoiser(distillation.consistency_model_fn(net, sigma_min=EDM.sigma_min), EDM, 'x0')
  one = consistency_sample(cm, jax.random.key(0), x_T.shape, num_steps=1, x_T=x_T).samples
  two = consistency_sample(cm, jax.random.key(0), x_T.shape, num_steps=2, x_T=x_T).samples
  assert np.all(np.isfinite(np.asarray(two)))
  return float(jnp.mean(jnp.linalg.norm(one - exact, axis=-1)))


@pytest.mark.parametrize('algorithm', ['training', 'distillation'])
def test_consistency_models_lower_the_one_step_error(algorithm):
  """One-step samples f(x_T, sigma_max) move toward the exact ODE solution from x_T as iCT (no teacher) or CD (an
  exact teacher, Heun steps) trains; the untrained network maps x_T to the data mean scaled by c_skip."""
  num_steps = 600
  if algorithm == 'training':
    loss_of = lambda step: distillation.consistency_training_loss(_apply, schedule=EDM, step=step,
                                                                  total_steps=num_steps, prediction='edm')
  else:
    cd = distillation.consistency_distillation_loss(_apply, teacher=_exact_teacher(EDM, 'edm'), num_scales=18,
                                                    prediction='edm')
    loss_of = lambda step: cd
  init = _MLP().init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))['params']
  before, after = _one_step_error(init), _one_step_error(_train(loss_of, num_steps, lr=1e-3, batch_size=256))
  assert after < 0.5 * before, (before, after)
