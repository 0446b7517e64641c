"""What the digits experiments share: configs loaded by file and variant, the CPU time of the child processes
(the trainers they start), and the digits metrics of a trained run's EMA weights under a config's sampler.

Imported by ``experiments/flow_digits.py`` and ``experiments/distill_digits.py`` (run as scripts, so this
directory is on ``sys.path``).
"""

from __future__ import annotations

import pathlib
import resource
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffax.evaluation import evaluators
from diffax.trainer import components, config as config_lib, restore

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None, **overrides) -> ml_collections.ConfigDict:
  """``configs/<name>.py``'s ``get_config(arg)`` with ``{'section.key': value}`` overrides."""
  config = config_lib.load_file(ROOT / 'configs' / f'{name}.py', arg)
  for key, value in overrides.items():
    section, leaf = key.split('.')
    config[section][leaf] = value
  return config


def children_cpu_minutes() -> float:
  """User + system CPU minutes of the finished child processes so far."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return (usage.ru_utime + usage.ru_stime) / 60


def evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path, num_samples: int,
             evaluator: evaluators.DigitsEvaluator, *, seed: int = 0) -> dict[str, float]:
  """digits metrics of ``num_samples`` samples (classes cycling) of the run's EMA weights (``sample.ema_decay``)
  with the config's sampler, steps and guidance, in batches of 100; the sampling seed is the trainer's evaluation
  seed (``sample.seed + 1``) plus ``seed``. Adds ``'nfe'``, ``'cpu_min'`` and ``'wall_min'`` of the sampling."""
  batch_size = min(100, num_samples)
  model = components.build_model(config)
  schedule = components.build_schedule(config)
  generate = components.build_generate(config, model, schedule, channels=1)
  x, t, cond = jnp.zeros((1, 8, 8, 1)), jnp.ones((1,)), jnp.zeros((1,), jnp.int32)
  abstract = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), x, t, cond, train=False)))
  params = restore.restore_ema_params(str(workdir), abstract['params'], ema_index=components.ema_index(config),
                                      key='--workdir')
  run = jax.jit(lambda p, rng, labels: generate(p, rng, labels, (batch_size, 8, 8, 1)))
  evaluator.reset()
  cpu, wall = time.process_time(), time.perf_counter()
  nfe = 0
  for b in range(-(-num_samples // batch_size)):
    labels = jnp.arange(b * batch_size, (b + 1) * batch_size, dtype=jnp.int32) % config.data.num_classes
    out = run(params, jax.random.fold_in(jax.random.PRNGKey(config.sample.seed + 1 + seed), b), labels)
    evaluator.update(out.samples, labels)
    nfe = int(out.nfe)
  return {**evaluator.result(), 'nfe': nfe, 'cpu_min': (time.process_time() - cpu) / 60,
          'wall_min': (time.perf_counter() - wall) / 60}
