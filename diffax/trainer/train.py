"""The training loop: wiring only (data -> sharded step -> metrics, samples, checkpoints), no maths.

``train_and_evaluate(config, workdir)`` trains until ``train.num_steps``, resuming from the newest readable
checkpoint in ``workdir/checkpoints``. Metrics of step ``n`` are read while step ``n + 1`` runs (nanodo), so
the host never stalls the device; the non-finite check is therefore one step late, which is safe because a
non-finite step leaves the state unchanged (:func:`train_step.make_train_step`).
"""

from __future__ import annotations

import json
import logging
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from diffax.trainer import autoencoder, console, evaluate, images, media, sharding, train_state, train_step
from diffax.trainer.experiment import Experiment

PEAK_FLOPS = {'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v6 lite': 918e12,
              'NVIDIA H100 80GB HBM3': 989e12, 'NVIDIA H200': 989e12, 'NVIDIA A100-SXM4-80GB': 312e12,
              'NVIDIA A100-SXM4-40GB': 312e12}
"""Dense bf16 peak FLOP/s per device by ``device_kind`` (vendor data sheets), for the MFU estimate."""


def _peak_flops(config: ml_collections.ConfigDict) -> float:
  return config.train.peak_flops_per_device or PEAK_FLOPS.get(jax.devices()[0].device_kind, 0.0)


class Preempted:
  """Records a SIGTERM (single-process pre-emption); multi-host runs use JAX's pre-emption sync service."""

  def __init__(self):
    self.signalled = False
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    self.signalled = True


def _write_samples(exp: Experiment, generate, params, step: int, writer) -> np.ndarray:
  rng = jax.random.fold_in(jax.random.PRNGKey(exp.config.sample.seed), step)
  samples, _ = generate(params, rng, exp.grid_labels(exp.config.sample.num_samples))
  samples = np.asarray(multihost_utils.process_allgather(samples, tiled=True))
  media.write_samples(writer, step, samples, directory=exp.workdir / 'samples' if jax.process_index() == 0 else None,
                      columns=min(max(exp.config.data.num_classes, 0), len(samples)) or None,  # a column per class
                      sample_rate=getattr(exp.source, 'sample_rate', 0) or exp.config.data.sample_rate)
  return samples


def compile_train_step(exp: Experiment) -> Any:
  """The train step jitted with explicit shardings and the state donated, compiled from abstract shapes."""
  c = exp.config.train
  step_fn = train_step.make_train_step(exp.objective, exp.optimizer, ema_decays=tuple(c.ema_decays),
                                       ema_warmup=c.ema_warmup,
                                       edges=None if exp.schedule is None else train_step.log_snr_edges(
                                           exp.schedule, c.loss_buckets))
  jitted = jax.jit(step_fn, in_shardings=(exp.state_shardings, sharding.batch_sharding(exp.mesh)),
                   out_shardings=(exp.state_shardings, sharding.replicated(exp.mesh)), donate_argnums=0)
  return sharding.compile_on_all_processes(jitted, exp.abstract_state, exp.abstract_batch(), name='train_step')


class MetricsLog:
  """Step metrics as they are read back, one step late: :meth:`add` checks a step's finiteness and writes the
  averages of every ``train.log_every`` steps with the throughput since the last write."""

  def __init__(self, exp: Experiment, writer, progress: console.Progress, *, flops_per_step: float):
    self.exp, self.writer, self.progress, self.flops_per_step = exp, writer, progress, flops_per_step
    self.window: list[dict] = []
    self.host_seconds, self.start = 0.0, time.perf_counter()

  def add(self, step: int, metrics: dict) -> None:
    """``metrics`` of train step ``step`` (1-based); raises if it was not finite under ``nan_policy=stop``."""
    _check_finite(step, metrics, self.exp)
    self.window.append(metrics)
    self.progress.update(step, float(metrics['loss']))
    if step % self.exp.config.train.log_every == 0:
      _write_train_metrics(self.writer, step, self.window, self.exp, elapsed=time.perf_counter() - self.start,
                           host_seconds=self.host_seconds, flops_per_step=self.flops_per_step)
      self.window, self.host_seconds, self.start = [], 0.0, time.perf_counter()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_state.TrainState:
  """Trains (resuming if possible) and returns the final state; see the module docstring."""
  if autoencoder.is_autoencoder_run(config):  # its own samples (reconstructions), evaluation and export
    from diffax.trainer import autoencoder_train  # pylint: disable=g-import-not-at-top
    return autoencoder_train.train_and_evaluate(config, workdir)
  preempted = Preempted()
  exp = Experiment(config, workdir)
  c = config.train
  writer = metric_writers.create_default_writer(str(exp.workdir), just_logging=jax.process_index() > 0)
  iterator = exp.data_iterator()
  state = exp.restore_or_init(iterator)
  start = int(state.step)
  lead = jax.process_index() == 0
  if start == 0:
    writer.write_hparams({k: str(v) for k, v in flatten_config(config.to_dict()).items()})
    if lead:
      write_run_record(exp)
  t0 = time.perf_counter()
  compiled = compile_train_step(exp)
  generate = exp.generate_fn(config.sample.num_samples)
  console.say(f'Compiled the train step and the sampler in {time.perf_counter() - t0:.1f} s.', enabled=lead)
  report = periodic_actions.ReportProgress(num_train_steps=c.num_steps, writer=writer, every_steps=c.log_every)
  progress = console.Progress(c.num_steps, c.batch_size, every=c.log_every, enabled=lead)
  log = MetricsLog(exp, writer, progress, flops_per_step=float((compiled.cost_analysis() or {}).get('flops', 0.0)))
  evaluator, eval_path = None, None

  previous = None  # (step, metrics) of the step dispatched before this one
  for step in range(start + 1, c.num_steps + 1):
    t_host = time.perf_counter()
    batch = sharding.global_batch(exp.model_batch(next(iterator)), exp.mesh)
    log.host_seconds += time.perf_counter() - t_host
    state, metrics = compiled(state, batch)
    if previous is not None:
      log.add(*previous)  # reading step n - 1 back while step n runs
    previous = (step, metrics)
    report(step)
    stop = preempted.signalled or exp.checkpointer.reached_preemption(step)
    if step % c.checkpoint_every == 0 or step == c.num_steps or stop:
      exp.checkpointer.save(step, state, iterator)
      exp.tuning.save(exp, step, state)  # what a fine-tuning run keeps on its own (LoRA adapters)
    if c.sample_every and step % c.sample_every == 0 and step != c.num_steps:
      _write_samples(exp, generate, exp.sample_params(state), step, writer)
    if c.eval_every and step % c.eval_every == 0:
      evaluator = evaluator or evaluate.make_evaluator(config)
      evaluator.reset()
      results = evaluate.generate_and_evaluate(exp, exp.sample_params(state), evaluator,
                                               num_samples=config.eval.num_samples_train, seed=config.sample.seed + 1)
      progress.close()
      eval_path = evaluate.write_results(exp, writer, step, *results)
    if stop:
      logging.warning('Pre-empted at step %d; the checkpoint is being finalised.', step)
      break
  if previous is not None:
    log.add(*previous)
  progress.close()
  if int(state.step) == c.num_steps:
    _write_samples(exp, generate, exp.sample_params(state), c.num_steps, writer)
  exp.checkpointer.wait_until_finished()
  writer.flush()
  if lead:
    print_summary(exp, int(state.step), eval_path, time.perf_counter() - t0)
  return state


def write_run_record(exp: Experiment) -> None:
  """``workdir/config.json``: the config and example shape this run trained with, read by runs that use it as a
  teacher or base (:func:`diffax.trainer.distill.check_teacher`)."""
  record = {'config': json.loads(exp.config.to_json_best_effort()), 'example_shape': list(exp.image_shape)}
  (exp.workdir / 'config.json').write_text(json.dumps(record, indent=2))


def print_summary(exp: Experiment, step: int, eval_path: str | None, seconds: float) -> None:
  """Where the run's results are, printed at its end."""
  w = exp.workdir
  samples = sorted((w / 'samples').glob('step_*.png'))
  lines = [f'Stopped at step {step} of {exp.config.train.num_steps} after {seconds:.0f} s.',
           f'  checkpoints  {exp.checkpointer.directory} (steps {exp.checkpointer.all_steps()})',
           f'  metrics      tensorboard --logdir {w}']
  if eval_path:
    lines.append(f'  evaluation   {eval_path}')
  if samples:
    lines.append(f'  samples      {samples[-1]}')
  log = console.log_path(str(w), 0)
  if log.exists():
    lines.append(f'  log          {log}')
  console.say('\n'.join(lines))


def _check_finite(step: int, metrics: dict, exp: Experiment) -> None:
  if int(metrics['finite']):
    return
  if exp.config.train.nan_policy == 'skip':
    logging.warning('Non-finite loss or gradient at step %d: update skipped (train.nan_policy=skip).', step)
    return
  exp.checkpointer.wait_until_finished()
  kept = exp.checkpointer.all_steps()
  raise FloatingPointError(
      f'Non-finite loss or gradient at step {step} (loss={float(metrics["loss"])}, grad_norm='
      f'{float(metrics["grad_norm"])}). Training stopped; the checkpoints in {exp.checkpointer.directory} '
      f'(steps {kept}) are untouched and the run resumes from step {kept[-1] if kept else 0}. Lower '
      'optim.learning_rate, check the data, or set train.nan_policy=skip to drop such updates.')


def _write_train_metrics(writer, step: int, window: list[dict], exp: Experiment, *, elapsed: float,
                         host_seconds: float, flops_per_step: float) -> None:
  fetched = jax.device_get(window)
  c = exp.config
  steps = len(fetched)
  scalars = {
      'train/loss': float(np.mean([m['loss'] for m in fetched])),
      'train/grad_norm': float(np.mean([m['grad_norm'] for m in fetched])),
      'train/learning_rate': float(exp.lr_schedule(max(step - 1, 0) // c.optim.grad_accum_steps)),
      'train/skipped_updates': float(np.sum([1 - m['finite'] for m in fetched])),
      'perf/steps_per_second': steps / elapsed,
      'perf/images_per_second': steps * c.train.batch_size / elapsed,
      'perf/host_ms_per_step': 1e3 * host_seconds / steps,
      **{f'train/{k[4:]}': float(np.mean([m[k] for m in fetched])) for k in fetched[0] if k.startswith('aux/')},
  }
  if 'loss_bucket_sums' in fetched[0]:
    sums = np.sum([m['loss_bucket_sums'] for m in fetched], axis=0)
    counts = np.sum([m['loss_bucket_counts'] for m in fetched], axis=0)
    for k, (total, count) in enumerate(zip(sums, counts)):
      if count:
        scalars[f'train/loss_bucket_{k}'] = float(total / count)
  peak = _peak_flops(c)
  if peak and flops_per_step:
    scalars['perf/mfu'] = flops_per_step * steps / elapsed / (peak * exp.mesh.size)
  writer.write_scalars(step, scalars)


def flatten_config(d: dict, prefix: str = '') -> dict[str, Any]:
  flat = {}
  for k, v in d.items():
    if isinstance(v, dict):
      flat.update(flatten_config(v, f'{prefix}{k}.'))
    else:
      flat[f'{prefix}{k}'] = v
  return flat


def sample(config: ml_collections.ConfigDict, workdir: str) -> np.ndarray:
  """``--mode sample``: ``sample.num_samples`` images from the latest checkpoint -> .npz and a PNG grid."""
  if autoencoder.is_autoencoder_run(config):  # held-out images next to their reconstructions
    from diffax.trainer import autoencoder_train  # pylint: disable=g-import-not-at-top
    return autoencoder_train.sample(config, workdir)
  exp = Experiment(config, workdir)
  if not exp.checkpointer.all_steps():
    raise FileNotFoundError(f'No checkpoint in {exp.checkpointer.directory}; train first (--mode train).')
  state = exp.restore_or_init()
  step = int(state.step)
  writer = metric_writers.create_default_writer(str(exp.workdir), just_logging=jax.process_index() > 0)
  samples = _write_samples(exp, exp.generate_fn(config.sample.num_samples), exp.sample_params(state), step,
                           writer)
  labels = np.asarray(multihost_utils.process_allgather(exp.grid_labels(config.sample.num_samples), tiled=True))
  if jax.process_index() == 0:
    path = exp.workdir / 'samples' / f'samples_step_{step:08d}.npz'
    with path.open('wb') as f:
      np.savez(f, images=images.to_uint8(samples), labels=labels)
    console.say(f'Wrote {len(samples)} samples to {path}.')
  writer.flush()
  return samples
