"""Few-step sampling of the digits default: digits_fd and digits_accuracy at 5 and 10 NFE against today's 25.

  nice python experiments/few_step_digits.py --workdir workdirs/digits [--samples 1000] [--out results.md]

The workdir is a finished ``make run`` (``configs/digits.py``; read only, through
``diffax.trainer.restore.restore_ema_params``). Every row samples ``--samples`` guided images (guidance 1.5,
classes cycling, the same seeds for every row) with the EMA weights and scores them with the digits classifier
(``diffax.evaluation.digits``; real test digits score digits_fd ~3.6). Rows: the config's own DPM-Solver++(2M) at
25 NFE; at each of ``--nfe`` the solvers' defaults, diffusers' time-uniform DPM-Solver++(2M) (``linspace`` with the
final jump) and UniPC / DPM-Solver++ on a grid optimised for this model and NFE by
``diffax.samplers.optimize_grid`` (``--search-iterations`` Adam steps on ``--calibration`` guided starts of other
seeds), saved as a grid file and sampled through the config (``sample.spacing = <file>``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax.diffusion import parameterization, samplers
from diffax.evaluation import evaluators
from diffax.trainer import components, restore

BASELINE = ('dpm_solver', 25, {})
"""The digits default's own sampler: DPM-Solver++(2M), 25 steps, its default grid and final step."""
FEW_STEP = (
    ('dpm_solver', {}),
    ('dpm_solver', {'spacing': 'linspace'}),
    ('unipc', {}),
    ('ipndm', {}),
)
"""Sampler and keywords of the rows at every few-step NFE (besides the optimised grids)."""
OPTIMISED = (('unipc', {}),)
"""Samplers (with their defaults) that also run on a grid optimised for the model at every few-step NFE (each
search compiles the backward pass through the guided U-Net sampler: ~5 min on 2 loaded CPU cores)."""


def load_config(overrides: dict):
  """``configs/digits.py`` with ``overrides`` (``'sample.<key>'`` or ``'kwargs.<key>'`` for ``sample.kwargs``)."""
  spec = importlib.util.spec_from_file_location('digits_config', os.path.join(
      os.path.dirname(__file__), '..', 'configs', 'digits.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in overrides.items():
    section, name = key.split('.', 1)
    if section == 'kwargs':
      config.sample.kwargs[name] = value
    else:
      config[section][name] = value
  return config


def abstract_params(config, model):
  x, t, cond = jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)), jnp.zeros((1,), jnp.int32)
  return jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), x, t, cond, train=False)))['params']


def guided_denoiser(config, model, schedule, params, labels) -> parameterization.Denoiser:
  """The model as the configured sampler sees it for ``labels`` [B]: guided against the null label."""
  net = lambda x, t, cond: model.apply({'params': params}, x, t, cond, train=False)[..., :1]
  model_fn = parameterization.classifier_free_guidance(net, cond=labels, null_cond=jnp.full_like(
      labels, config.data.num_classes), scale=config.sample.guidance_scale)
  return parameterization.Denoiser(model_fn, schedule, config.diffusion.prediction,
                                   sigma_data=components.sigma_data(config, schedule),
                                   clip_x0=config.sample.clip_x0 or None)


def evaluate(config, params, num_samples: int, evaluator: evaluators.DigitsEvaluator) -> dict:
  """digits metrics of ``num_samples`` samples with the config's sampler settings (as the trainer runs them)."""
  batch_size = min(100, num_samples)
  model, schedule = components.build_model(config), components.build_schedule(config)
  generate = components.build_generate(config, model, schedule, channels=1)
  run = jax.jit(lambda p, rng, labels: generate(p, rng, labels, (batch_size, 8, 8, 1)))
  evaluator.reset()
  start = time.time()
  nfe = 0
  for b in range(-(-num_samples // batch_size)):
    labels = jnp.arange(b * batch_size, (b + 1) * batch_size, dtype=jnp.int32) % config.data.num_classes
    out = run(params, jax.random.fold_in(jax.random.PRNGKey(1), b), labels)
    evaluator.update(out.samples, labels)
    nfe = int(out.nfe)
  return {**evaluator.result(), 'nfe': nfe, 'seconds': time.time() - start}


def optimised_grid(config, params, sampler: str, nfe: int, args, directory: str) -> str:
  """A grid file optimised for the model, ``sampler`` with its defaults and ``nfe`` steps on a calibration batch."""
  model, schedule = components.build_model(config), components.build_schedule(config)
  labels = jnp.arange(args.calibration, dtype=jnp.int32) % config.data.num_classes
  denoiser = guided_denoiser(config, model, schedule, params, labels)
  start = time.time()
  ts = samplers.optimize_grid(denoiser, samplers.get_sampler(sampler), jax.random.PRNGKey(1234),
                              (args.calibration, 8, 8, 1), num_steps=nfe, iterations=args.search_iterations,
                              reference_steps=args.reference_steps)
  path = os.path.join(directory, f'{sampler}_{nfe}.json')
  samplers.save_grid(path, ts, sampler=sampler, num_steps=nfe, schedule=config.diffusion.schedule,
                     workdir=os.path.abspath(args.workdir), calibration=args.calibration,
                     iterations=args.search_iterations, search_seconds=round(time.time() - start, 1))
  return path


def overrides_of(sampler: str, num_steps: int, kwargs: dict) -> dict:
  """The config overrides of a row: ``kwargs['spacing']`` (a name or a grid file) goes to ``sample.spacing``."""
  overrides = {'sample.sampler': sampler, 'sample.num_steps': num_steps}
  overrides.update({f'kwargs.{k}': v for k, v in kwargs.items() if k != 'spacing'})
  if 'spacing' in kwargs:
    overrides['sample.spacing'] = kwargs['spacing']
  return overrides


def describe(config) -> str:
  """'sampler, grid, final step' of what the config runs (its sampler's defaults where not set)."""
  used = components.sampler_kwargs(config)
  grid = 'optimised grid' if samplers.is_grid_path(used['spacing']) else used['spacing']
  final = '' if 'denoise_to_zero' not in used else (', jump to x0' if used['denoise_to_zero'] else ', stop at t_min')
  return f'{config.sample.sampler}, {grid}{final}'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='a finished configs/digits.py run (read only)')
  parser.add_argument('--samples', type=int, default=1000, help='samples per row')
  parser.add_argument('--nfe', type=int, nargs='+', default=[5, 10], help='few-step budgets')
  parser.add_argument('--calibration', type=int, default=100, help='calibration batch of the grid search')
  parser.add_argument('--search-iterations', type=int, default=40, help='Adam steps of each grid search')
  parser.add_argument('--reference-steps', type=int, default=100, help='steps of the search\'s reference solve')
  parser.add_argument('--out', default=None, help='also write the markdown table to this file')
  args = parser.parse_args()
  config = load_config({})
  params = restore.restore_ema_params(args.workdir, abstract_params(config, components.build_model(config)),
                                      ema_index=components.ema_index(config), key='--workdir')
  evaluator = evaluators.DigitsEvaluator()
  rows = []

  def add(sampler, num_steps, kwargs, note=''):
    row_config = load_config(overrides_of(sampler, num_steps, kwargs))
    result = evaluate(row_config, params, args.samples, evaluator)
    rows.append(f"| {result['nfe']} | {describe(row_config)}{note} | {result['digits_fd']:.2f} | "
                f"{result['digits_accuracy']:.3f} | {result['seconds']:.0f} |")
    print(rows[-1], flush=True)

  with tempfile.TemporaryDirectory() as directory:
    for nfe in args.nfe:
      for sampler, kwargs in OPTIMISED:
        add(sampler, nfe, {**kwargs, 'spacing': optimised_grid(config, params, sampler, nfe, args, directory)})
      for sampler, kwargs in FEW_STEP:
        add(sampler, nfe, kwargs)
    add(*BASELINE, note=' (the digits default)')
  header = (f"# Few-step sampling of the digits default\n\n`python experiments/few_step_digits.py "
            f"{' '.join(sys.argv[1:])}` on {jax.devices()[0].platform.upper()} ({os.cpu_count()} cores), "
            f'jax {jax.__version__}, {time.strftime("%Y-%m-%d")}.\n\n'
            f'{args.samples} guided samples (scale 1.5) per row; real test digits score digits_fd ~3.6.\n\n'
            '| NFE | sampler, grid, final step | digits_fd | digits_accuracy | wall s |\n|---:|---|---:|---:|---:|')
  text = header + '\n' + '\n'.join(rows) + '\n'
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  main()
