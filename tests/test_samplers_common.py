"""What holds for every sampler: one signature, the registry, and agreement between deterministic solvers."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffax
from diffax.diffusion import samplers, schedules
from diffax.diffusion.parameterization import Denoiser
from diffax.testing import checks, mixtures

COMMON = ('num_steps', 't_start', 'x_T', 'inpaint', 'return_trajectory')


def test_public_api_imports():
  from diffax import losses, samplers as s, schedules as sch  # noqa: F401  (the import is the test)
  assert diffax.get_schedule('edm').sigma_max == 80.0
  assert diffax.get_sampler('ddim') is s.ddim_sample
  with pytest.raises(ValueError, match='dpm_solver'):
    diffax.get_sampler('plms')


@pytest.mark.parametrize('name', sorted(samplers.SAMPLERS))
def test_every_sampler_has_the_common_keyword_only_signature(name):
  params = inspect.signature(samplers.SAMPLERS[name]).parameters
  assert list(params)[:3] == ['denoiser', 'rng', 'shape']
  assert not {'schedule', 'prediction', 'sigma_data', 'clip_x0'} & set(params), 'the denoiser carries those'
  for key in COMMON:
    if name == 'adaptive_ode' and key == 'num_steps':
      continue  # adaptive step count; its budget is rtol / atol / max_steps.
    assert key in params, f'{name} lacks {key}'
    assert params[key].kind is inspect.Parameter.KEYWORD_ONLY
  assert samplers.SAMPLERS[name].__doc__


def _deterministic_runs(schedule):
  """Probability-flow ODE solvers from one x_T at ``t_max`` (the log-SNR and Karras grids would start later by
  default, ``base.default_start``), each with a fine grid; they solve the same ODE."""
  start = {'x_T': None, 't_start': schedule.t_max}
  return {
      'ddim': lambda m, r, x: samplers.ddim_sample(Denoiser(m, schedule), r, x.shape, num_steps=500,
                                                   spacing='log_snr', **start | {'x_T': x}),
      'edm_heun': lambda m, r, x: samplers.edm_heun_sample(Denoiser(m, schedule), r, x.shape, num_steps=100,
                                                           **start | {'x_T': x}),
      'dpm_solver': lambda m, r, x: samplers.dpm_solver_sample(Denoiser(m, schedule), r, x.shape, num_steps=100,
                                                               denoise_to_zero=True, **start | {'x_T': x}),
      'adaptive_ode': lambda m, r, x: samplers.adaptive_ode_sample(Denoiser(m, schedule), r, x.shape, x_T=x,
                                                                   rtol=1e-6, atol=1e-6),
  }


@pytest.mark.parametrize('schedule', [schedules.VPSDE(), schedules.EDM()], ids=['vp', 'edm'])
def test_deterministic_samplers_agree_sample_by_sample(schedule):
  """Given the same x_T, every probability-flow solver maps it to the same sample (Song et al. 2021 eq. 13).

  The ODE map is the same for all of them, so differences are discretisation error and the solvers' different
  last steps (t_min -> clean). Measured 99th percentiles of |diff| against adaptive Tsit5 (rtol 1e-6) on the
  ring, whose modes have std 0.1: DDIM (first order, 500 steps) 6e-3; Heun, EDM-Heun, DPM-Solver++(2M)
  (100 steps) 1e-3 to 2e-3.
  """
  mixture = mixtures.ring_mixture()
  model_fn = mixture.model_fn(schedule, 'eps')
  x_T = schedule.prior_sample(jax.random.PRNGKey(0), (256, 2))
  outs = {name: np.asarray(jax.jit(run, static_argnums=0)(model_fn, jax.random.PRNGKey(1), x_T).samples)
          for name, run in _deterministic_runs(schedule).items()}
  reference = outs.pop('adaptive_ode')
  for name, samples in outs.items():
    err = np.abs(samples - reference)
    tolerance = 0.01 if name == 'ddim' else 0.004
    assert np.quantile(err, 0.99) < tolerance, (name, np.quantile(err, 0.99))


@pytest.mark.parametrize('name', sorted(samplers.SAMPLERS))
def test_every_sampler_inpaints_and_returns_trajectories(name):
  schedule = schedules.VPSDE()
  mixture = mixtures.ring_mixture()
  x_known = jnp.tile(jnp.asarray([[1.0, 0.0]]), (8, 1))
  mask = jnp.tile(jnp.asarray([[1.0, 0.0]]), (8, 1))
  sampler = samplers.SAMPLERS[name]
  kwargs = {}
  if name != 'adaptive_ode':
    kwargs['num_steps'] = 10
    kwargs['inpaint'] = samplers.Inpaint(x_known=x_known, mask=mask)
    kwargs['return_trajectory'] = True
  out = jax.jit(lambda rng: sampler(mixture.denoiser(schedule), rng, (8, 2), **kwargs))(jax.random.PRNGKey(0))
  assert out.samples.shape == (8, 2) and out.samples.dtype == jnp.float32
  assert np.all(np.isfinite(out.samples)) and int(out.nfe) > 0
  if name != 'adaptive_ode':
    np.testing.assert_array_equal(out.samples[:, 0], 1.0)
    assert out.trajectory.shape[1:] == (8, 2)
    np.testing.assert_allclose(out.trajectory[-1], out.samples)


@pytest.mark.parametrize('name', sorted(samplers.SAMPLERS))
def test_every_sampler_vmaps_over_rngs(name):
  """``vmap`` over PRNG keys gives, key by key, what separate calls give (samplers hold no hidden state)."""
  schedule = schedules.EDM()
  model_fn = mixtures.ring_mixture().model_fn(schedule, 'eps')
  kwargs = {} if name == 'adaptive_ode' else {'num_steps': 6}
  run = lambda rng: samplers.SAMPLERS[name](Denoiser(model_fn, schedule), rng, (4, 2), **kwargs).samples
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  batched = jax.jit(jax.vmap(run))(keys)
  single = jax.jit(run)
  for i in range(3):
    np.testing.assert_allclose(batched[i], single(keys[i]), rtol=1e-4, atol=1e-4)


def _class_conditional_ring():
  """Exact conditional model of the ring: label k -> component k alone; label K (null) -> the whole mixture."""
  ring = mixtures.ring_mixture()
  num_modes = ring.weights.shape[0]
  parts = [ring.replace(weights=jax.nn.one_hot(k, num_modes)) for k in range(num_modes)] + [ring]

  def model_fn(schedule):
    exact = [part.model_fn(schedule, 'eps') for part in parts]

    def conditional(x, t, label):
      outs = jnp.stack([f(x, t) for f in exact])  # [K + 1, B, 2]
      return jnp.take_along_axis(outs, label[None, :, None], axis=0)[0]

    return conditional

  return ring, model_fn


@pytest.mark.parametrize('name', ['ddim', 'dpm_solver', 'edm_heun', 'ddpm'])
def test_classifier_free_guidance_through_a_sampler(name):
  """With the exact class-conditional model, guidance scale 1 samples the class's component exactly
  (mode 3 only, Mahalanobis sharpness 1), scale 0 samples the unconditional mixture (its weights), and a scale
  above 1 keeps every sample in the class and pushes it away from the other classes (the guided score adds
  (w - 1) grad log p(c | x_t))."""
  schedule = schedules.LinearSchedule()
  ring, conditional = _class_conditional_ring()
  n, label = 2000, 3
  cond, null = jnp.full((n,), label), jnp.full((n,), ring.weights.shape[0])
  steps = {'ddpm': 1000}.get(name, 50)
  spacing = {'ddim': {'spacing': 'log_snr'}}.get(name, {})

  def run(scale):
    guided = diffax.classifier_free_guidance(conditional(schedule), cond=cond, null_cond=null, scale=scale)
    out = jax.jit(lambda rng: samplers.SAMPLERS[name](Denoiser(guided, schedule), rng, (n, 2), num_steps=steps,
                                                      **spacing))(jax.random.PRNGKey(0))
    labels = jnp.argmax(ring.responsibilities(out.samples), axis=-1)
    others = jnp.delete(ring.means, label, axis=0)
    to_others = jnp.min(jnp.linalg.norm(out.samples[:, None] - others[None], axis=-1), axis=-1)
    return labels, float(jnp.mean(ring.mahalanobis(out.samples, labels))) / 2, float(jnp.mean(to_others))

  labels, sharpness, spread_1 = run(1.0)
  assert float(jnp.mean(labels == label)) > 0.999
  assert abs(sharpness - 1) < 0.1, sharpness  # 3 standard errors sqrt(2 / (2 n)) = 0.067, plus 0.03 bias
  labels, _, _ = run(0.0)
  freq = jnp.bincount(labels, length=8) / n
  np.testing.assert_allclose(freq, ring.weights, atol=4 * np.sqrt(0.25 / n))
  labels, _, spread_3 = run(3.0)
  assert float(jnp.mean(labels == label)) > 0.999
  # Measured mean distance to the nearest other mode, scale 1 -> 3: 0.70 -> 0.82 for the ODE solvers (DPM-Solver,
  # EDM); 0.70 -> 0.72 for ancestral DDPM, whose fresh noise at every step undoes part of the push.
  assert spread_3 > spread_1 + (0.01 if name == 'ddpm' else 0.05), (spread_1, spread_3)


def _small_vp_ring_run(name, **kwargs):
  """8 steps of a sampler from a fixed prior draw of 256 ring samples on VP, jitted."""
  schedule = schedules.VPSDE()
  mixture = mixtures.ring_mixture()
  prediction = kwargs.pop('prediction', 'eps')
  clip_x0 = kwargs.pop('clip_x0', None)
  model_fn = mixture.model_fn(schedule, prediction)
  if kwargs.pop('bf16', False):
    model_fn = checks.bf16_model(model_fn)
  x_T = schedule.prior_sample(jax.random.PRNGKey(3), (256, 2))
  denoiser = Denoiser(model_fn, schedule, prediction, clip_x0=clip_x0)
  if name == 'dpm_solver':  # its final step to t = 0 (the default stops at t_min)
    kwargs['denoise_to_zero'] = True
  run = lambda rng: samplers.SAMPLERS[name](denoiser, rng, (256, 2), num_steps=8, x_T=x_T, **kwargs).samples
  return jax.jit(run)(jax.random.PRNGKey(0))


@pytest.mark.parametrize('name', ['edm_heun', 'dpm_solver'])
@pytest.mark.parametrize('prediction', ['x0', 'v', 'edm'])
def test_every_prediction_gives_the_same_samples(name, prediction):
  """The exact model in any parameterisation is the same denoiser: samples agree up to float32 rounding
  (measured max deviation from the eps-prediction run: 2e-6 to 4e-6)."""
  np.testing.assert_allclose(_small_vp_ring_run(name, prediction=prediction), _small_vp_ring_run(name), atol=1e-4)


@pytest.mark.parametrize('name', ['edm_heun', 'dpm_solver'])
def test_bf16_model_is_close_to_fp32(name):
  """bf16 keeps 8 mantissa bits (relative 4e-3). Measured RMS deviation 6e-3 (DPM-Solver++) and 8e-3 (EDM Heun)
  on data of scale 1, the largest from the few samples near a boundary between modes."""
  rounded, fp32 = _small_vp_ring_run(name, bf16=True), _small_vp_ring_run(name)
  assert float(jnp.sqrt(jnp.mean(jnp.square(rounded - fp32)))) < 2e-2
  assert bool(jnp.all(jnp.isfinite(rounded)))


@pytest.mark.parametrize('name', ['edm_heun', 'dpm_solver'])
def test_clip_x0_only_when_asked(name):
  """Unclipped runs keep the ring's |x| > 1 (the noise-floor tests); with clip_x0 the final step to t = 0
  returns the clipped x0-prediction."""
  clipped = _small_vp_ring_run(name, clip_x0=0.5)
  assert float(jnp.max(jnp.abs(clipped))) == pytest.approx(0.5, abs=1e-5)
