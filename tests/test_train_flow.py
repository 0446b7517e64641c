"""Flow matching in the trainer: ``diffusion.loss='flow'`` with its time-density keys, the named errors, every sampler
of the registry on a velocity model, and the real main on ``digits:flow,runlocal``."""

import importlib.util
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import special, stats

from diffax.diffusion import losses, samplers, schedules
from diffax.diffusion.time_sampling import shift_times
from diffax.trainer import components, config as config_lib, events
import trainer_runs


def digits_config(arg: str = 'flow,runlocal', **overrides):
  """``configs/digits.py:<arg>`` with ``{'section.key': value}`` overrides (keyword sections included)."""
  spec = importlib.util.spec_from_file_location('digits_config', trainer_runs.REPO / 'configs' / 'digits.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.update_from_flattened_dict(overrides)
  return c


def test_flow_variant_composes_and_keeps_the_default():
  default, flow = digits_config(None), digits_config('flow')
  config_lib.validate(flow)
  assert default.diffusion.loss == 'ddpm' and default.sample.sampler == 'dpm_solver'
  assert (flow.diffusion.loss, flow.diffusion.schedule, flow.diffusion.prediction) == (
      'flow', 'rectified_flow', 'velocity')
  assert flow.sample.sampler == 'flow_euler'
  assert flow.train.num_steps == default.train.num_steps and flow.optim == default.optim
  small = digits_config('flow,runlocal')
  assert small.diffusion == flow.diffusion and small.train == digits_config('runlocal').train
  with pytest.raises(ValueError, match='flw'):
    digits_config('flw')


@pytest.mark.parametrize('overrides, key', [
    ({'diffusion.time_sampling': 'lognorm'}, 'diffusion.time_sampling'),
    ({'diffusion.logit_normal_scale': 0.0}, 'diffusion.logit_normal_scale'),
    ({'diffusion.mode_scale': 2.0}, 'diffusion.mode_scale'),
    ({'diffusion.time_shift': 0.0}, 'diffusion.time_shift'),
    ({'sample.sampler': 'ddim', 'sample.spacing': 'leading'}, 'sample.spacing'),
    ({'sample.sampler': 'ddpm', 'sample.kwargs.spacing': 'leading'}, 'sample.kwargs.spacing'),
    ({'sample.kwargs.shift': 0.0}, 'sample.kwargs.shift'),
    ({'sample.sampler': 'flow_sde', 'sample.kwargs.diffusion': 'sigmoid'}, 'sample.kwargs.diffusion'),
    ({'diffusion.loss': 'hybrid'}, 'diffusion.prediction'),  # iDDPM's hybrid loss trains an eps model
])
def test_flow_config_errors_name_the_key(overrides, key):
  with pytest.raises(config_lib.ConfigError, match=key.replace('.', r'\.')) as error:
    config_lib.validate(digits_config(**overrides))
  assert error.value.key == key


@pytest.mark.parametrize('key, value', [('time_sampling', 'logit_normal'), ('time_shift', 3.0),
                                        ('logit_normal_loc', 0.5), ('mode_scale', 0.5)])
def test_flow_keys_under_another_loss_are_errors(key, value):
  """The default (DDPM loss) would silently ignore a flow time-density key."""
  with pytest.raises(config_lib.ConfigError, match=f'diffusion.{key}') as error:
    config_lib.validate(digits_config('runlocal', **{f'diffusion.{key}': value}))
  assert error.value.key == f'diffusion.{key}'


def test_leading_spacing_stays_legal_on_discrete_schedules():
  config_lib.validate(digits_config('runlocal', **{'sample.sampler': 'ddim', 'sample.spacing': 'leading'}))


def test_flow_loss_on_a_schedule_beyond_unit_time_is_an_error():
  c = digits_config(**{'diffusion.schedule': 'edm', 'diffusion.sigma_data': 0.5})
  config_lib.validate(c)
  with pytest.raises(config_lib.ConfigError, match='diffusion.schedule') as error:
    components.build_loss(c, lambda params, x, t, cond, *, train, rngs: x, components.build_schedule(c))
  assert error.value.key == 'diffusion.schedule'


def _scaled_identity(params, x, t, cond, *, train, rngs):
  del t, cond, train, rngs
  return params['w'] * x


@pytest.mark.parametrize('time_sampling', ['uniform', 'logit_normal', 'mode', 'cosmap'])
def test_trainer_flow_loss_is_the_library_loss(time_sampling):
  """Same batch and rng: the trainer's loss is ``losses.flow_loss`` with the keys' values (and not the default
  density's loss, so a key the trainer dropped would show)."""
  c = digits_config(**{'diffusion.time_sampling': time_sampling, 'diffusion.logit_normal_loc': 0.3,
                       'diffusion.logit_normal_scale': 0.8, 'diffusion.mode_scale': 0.5, 'diffusion.time_shift': 3.0})
  config_lib.validate(c)
  schedule = components.build_schedule(c)
  params = {'w': jnp.float32(0.5)}
  batch = {'x': jax.random.normal(jax.random.PRNGKey(0), (64, 8, 8, 1)), 'cond': jnp.arange(64, dtype=jnp.int32) % 10}
  rng = jax.random.PRNGKey(1)
  got, aux = components.build_loss(c, _scaled_identity, schedule)(params, batch, rng)
  library = losses.flow_loss(_scaled_identity, schedule=schedules.RectifiedFlow(), prediction='velocity',
                             weighting='velocity', time_sampling=time_sampling, loc=0.3, scale=0.8, mode_scale=0.5,
                             shift=3.0, cond_dropout=losses.CondDropout(p_uncond=0.1, null_label=10))
  want, want_aux = library(params, batch, rng)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_array_equal(aux['uncond'], want_aux['uncond'])
  plain, _ = losses.flow_loss(_scaled_identity, schedule=schedules.RectifiedFlow())(params, batch, rng)
  assert abs(float(got) - float(plain)) > 1e-3 * float(plain)


def test_flow_loss_trains_the_dit():
  """The trainer's flow loss on the DiT with labels (the U-Net trains in :func:`flow_run`): finite, with a finite
  non-zero gradient. At init the DiT's output is zero (adaLN-Zero), so its loss is the mean of (eps - x_0)^2: 2 for
  x_0 ~ N(0, 1)."""
  c = digits_config(**{'model.name': 'dit', 'model.preset': 'dit_tiny'})
  config_lib.validate(c)
  model = components.build_model(c)
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 8, 8, 1))
  batch = {'x': x, 'cond': jnp.arange(16, dtype=jnp.int32) % 10}
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), x, jnp.ones((16,)), batch['cond'], train=False)['params'])
  loss_fn = components.build_loss(c, components.apply_fn_of(model), components.build_schedule(c))
  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, jax.random.PRNGKey(2))
  assert float(loss) == pytest.approx(2.0, abs=0.3)
  grad_norm = float(optax.tree.norm(grads))
  assert np.isfinite(grad_norm) and grad_norm > 0


def test_trainer_time_density_is_the_shifted_logit_normal():
  """aux['t'] of the trainer's loss against SD3's closed form: P(t' <= x) = Phi((logit(x / (s - (s - 1) x)) - m)
  / scale) for t' = shift_s(sigmoid(m + scale n)) (SD3 eqs. 19 and 23)."""
  loc, scale, shift = -0.4, 0.7, 3.0
  c = digits_config(**{'diffusion.time_sampling': 'logit_normal', 'diffusion.logit_normal_loc': loc,
                       'diffusion.logit_normal_scale': scale, 'diffusion.time_shift': shift})
  loss_fn = components.build_loss(c, _scaled_identity, components.build_schedule(c))
  _, aux = loss_fn({'w': jnp.float32(1.0)}, {'x': jnp.zeros((8192, 1, 1, 1))}, jax.random.PRNGKey(2))
  t = np.asarray(aux['t'], np.float64)

  def cdf(x):
    unshifted = x / (shift - (shift - 1.0) * x)
    return stats.norm.cdf((special.logit(unshifted) - loc) / scale)

  assert stats.kstest(t, cdf).pvalue > 1e-3
  # the shift moved the median of sigmoid(loc) towards noise, as eq. 23 says
  np.testing.assert_allclose(np.median(t), float(shift_times(special.expit(loc), shift)), atol=0.01)


class GaussianVelocity(nn.Module):
  """The exact velocity ``E[eps - x_0 | x_t]`` of data ``N(mu, s^2)`` per pixel on the linear path
  ``x_t = (1 - t) x_0 + t eps``: with ``V = (1 - t)^2 s^2 + t^2`` and ``r = x_t - (1 - t) mu``,
  ``E[x_0 | x_t] = mu + (1 - t) s^2 r / V`` and ``E[eps | x_t] = t r / V``."""
  mu: float
  s: float

  def __call__(self, x, t, cond, train=False):
    del cond, train
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    a = 1.0 - t
    var = jnp.square(a) * self.s**2 + jnp.square(t)
    r = x - a * self.mu
    return t * r / var - (self.mu + a * self.s**2 * r / var)


STEPS = {'ddpm': 100, 'ddim': 50, 'consistency': 1, 'pc': 200, 'edm_heun': 40, 'adaptive_ode': 0, 'dpm_solver': 20,
         'flow_euler': 50, 'flow_heun': 25, 'flow_sde': 250, 'unipc': 20, 'deis': 20, 'ipndm': 20}


@pytest.mark.parametrize('sampler', sorted(samplers.SAMPLERS))
def test_every_sampler_draws_the_data_of_an_exact_velocity_model(sampler):
  """The trainer's generate on a velocity model of Gaussian data N(0.5, 0.3^2): every sampler of the registry
  reaches it through the parameterisation conversions (the consistency sampler, one evaluation at t_max, returns
  E[x_0 | x_T], whose spread is (1 - t_max) s^2 / V times the prior's)."""
  assert set(STEPS) == set(samplers.SAMPLERS)
  mu, s = 0.5, 0.3
  c = digits_config(**{'sample.sampler': sampler, 'sample.num_steps': STEPS[sampler], 'data.num_classes': 0})
  config_lib.validate(c)
  schedule = components.build_schedule(c)
  generate = components.build_generate(c, GaussianVelocity(mu, s), schedule, channels=1)
  out = jax.jit(lambda rng: generate({}, rng, None, (2048, 2, 2, 1)))(jax.random.PRNGKey(3))
  x = np.asarray(out.samples, np.float64)
  assert np.all(np.isfinite(x))
  assert abs(x.mean() - mu) < 0.03, x.mean()
  if sampler == 'consistency':
    t = schedule.t_max
    assert x.std() == pytest.approx((1 - t) * s**2 / ((1 - t)**2 * s**2 + t**2), rel=0.05)
  else:
    assert x.std() == pytest.approx(s, rel=0.08), x.std()


@pytest.fixture(scope='module')
def flow_run(tmp_path_factory):
  """``digits:flow,runlocal`` trained by the real main for 6 steps, evaluating at the end."""
  workdir = tmp_path_factory.mktemp('flow_run')
  trainer_runs.run_main(workdir, 'train.eval_every=6', 'eval.num_samples_train=16',
                        config=f'{trainer_runs.REPO}/configs/digits.py:flow,runlocal')
  return workdir


def test_flow_run_trains_with_finite_losses(flow_run):
  losses_by_step = dict(events.read_scalars(flow_run)['train/loss'])
  assert sorted(losses_by_step) == [2, 4, 6]
  assert all(np.isfinite(v) and 0 < v < 10 for v in losses_by_step.values())
  assert (flow_run / 'checkpoints' / '6').is_dir()


def test_flow_run_writes_samples_and_an_eval_json(flow_run):
  assert (flow_run / 'samples' / 'step_00000006.png').is_file()
  result = json.loads((flow_run / 'eval' / 'step_00000006_flow_euler-4_w1.json').read_text())
  assert result['protocol']['prediction'] == 'velocity' and result['protocol']['schedule'] == 'rectified_flow'
  assert result['protocol']['nfe'] == 4 and result['protocol']['num_samples'] == 16
  assert np.isfinite(result['metrics']['digits_fd']) and 0 <= result['metrics']['digits_accuracy'] <= 1
