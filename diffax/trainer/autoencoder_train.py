"""Training, evaluating and exporting an autoencoder run (:mod:`diffax.trainer.autoencoder`).

The loop is the diffusion runs' (:mod:`diffax.trainer.train`: the same jitted step with the state donated, metrics
read one step late, checkpoints with the data position, pre-emption); what differs is what it shows and keeps:

* sample grids (``workdir/samples/step_<n>.png``): held-out images, each row of originals followed by the row of
  their reconstructions (EMA weights, posterior mean);
* evaluation (every ``train.eval_every`` steps on ``eval.num_samples_train`` held-out images, ``--mode eval`` on
  ``eval.num_samples``, both capped at the split's size): ``psnr``, ``ssim`` and the reconstruction Fréchet
  distance, ``rfid`` in the FID Inception network's features (``eval.metric='inception'``, ``eval.inception_weights``)
  or ``digits_rfd`` in the digits classifier's (``'digits'``, as ``digits_fd``), through the CLU writers and
  ``workdir/eval/step_<n>_reconstruction.json``;
* at the end, ``workdir/autoencoder/`` in the format of :func:`diffax.trainer.latents.save_autoencoder` with the
  latent scaling factor ``1 / std`` of the posterior means of the first ``autoencoder.scaling_examples`` training
  images (LDM sec. 4.3.2), read by a latent run as ``--config.data.latents.autoencoder=WORKDIR/autoencoder``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from diffax.evaluation import digits, evaluators, inception, inception_weights
from diffax.trainer import console, latents, media, sharding, train, train_state
from diffax.trainer.autoencoder import AutoencoderRun
from diffax.trainer.config import ConfigError

EXPORT_DIR = 'autoencoder'


def make_evaluator(run: AutoencoderRun) -> evaluators.ReconstructionEvaluator:
  """PSNR / SSIM and the rFID in the features ``eval.metric`` names (at the data's shape: the digits classifier
  reads 8x8 digits, so reconstructions of upsampled digits are resized back first)."""
  c, shape = run.config, run.image_shape
  to_data = lambda x: x if x.shape[1:] == shape else jax.image.resize(x, (x.shape[0], *shape), 'bilinear')
  if c.eval.metric == 'digits':
    if shape != (8, 8, 1):
      raise ConfigError('eval.metric', f"'digits' features are of 8x8 digits; {c.data.name} has {shape} images.")
    classifier = digits.DigitsClassifier.load_or_train()
    features = jax.jit(lambda x: classifier.features(to_data(x)))  # a 50 k-parameter MLP: its constants are small
    return evaluators.ReconstructionEvaluator(features, dim=digits.FEATURE_DIM,
                                              name='digits_rfd', protocol={'features': 'digits classifier',
                                                                           'classifier_recipe': digits.recipe_hash()})
  if c.eval.metric == 'inception':
    weights = inception_weights.load_inception_variables(c.eval.inception_weights or None)
    pool, resize = inception.make_feature_fn(weights.variables), jax.jit(to_data)  # weights: pool's argument
    return evaluators.ReconstructionEvaluator(lambda x: pool(resize(x))['pool'], dim=inception.FEATURE_DIM,
                                              name='rfid', protocol={
                                                  'features': 'FID Inception pool3',
                                                  'weights_content_sha256': weights.content_sha256,
                                                  'weights_source_sha256': weights.source_sha256})
  return evaluators.ReconstructionEvaluator()


def evaluate_params(run: AutoencoderRun, params: Any, evaluator: evaluators.ReconstructionEvaluator, *,
                    num_examples: int) -> tuple[dict[str, float], dict[str, Any]]:
  """``(metrics, protocol)`` of the autoencoder ``params`` on the first ``num_examples`` held-out images."""
  count = min(num_examples, len(run.held_out))
  reconstruct = jax.jit(run.reconstruct)
  start = time.perf_counter()
  evaluator.reset()
  for x, n in run.batches(run.held_out, count, run.config.eval.batch_size):
    evaluator.update(*reconstruct(params, x), count=n)
  c = run.config
  protocol = {'split': c.autoencoder.eval_split, 'input_shape': list(run.input_shape),
              'posterior': 'mean', 'ema_decay': c.sample.ema_decay or tuple(c.train.ema_decays)[0],
              'seconds': time.perf_counter() - start, **evaluator.protocol(),
              **({'lpips_content_sha256': run.lpips.content_sha256} if run.lpips else {})}  # the trained loss's
  return evaluator.result(), protocol


def write_results(run: AutoencoderRun, writer, step: int, metrics: dict, protocol: dict) -> str | None:
  """CLU scalars ``eval/<name>`` and ``workdir/eval/step_<n>_reconstruction.json``; its path on process 0."""
  writer.write_scalars(step, {f'eval/{k}': v for k, v in metrics.items()})
  writer.flush()
  if jax.process_index():
    return None
  path = run.workdir / 'eval' / f'step_{step:08d}_reconstruction.json'
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({'step': step, 'metrics': metrics, 'protocol': protocol}, indent=2))
  console.say(f'Step {step}: ' + ', '.join(f'{k} {v:.4g}' for k, v in metrics.items()) + f' (written to {path}).')
  return str(path)


def grid_columns(n: int) -> int:
  """Images per row of an ``n``-image grid: the largest divisor of ``n`` up to 10."""
  return max(c for c in range(1, 11) if n % c == 0)


def write_grid(run: AutoencoderRun, params: Any, step: int, writer) -> np.ndarray:
  """The first ``sample.num_samples`` held-out images, each row of originals followed by the row of their
  reconstructions: [2 n, *input_shape], written through the writer and as ``samples/step_<n>.png``."""
  n = run.config.sample.num_samples
  x, _ = next(run.batches(run.held_out, n, n))
  originals, recons = (np.asarray(multihost_utils.process_allgather(a, tiled=True)) for a in
                       jax.jit(run.reconstruct)(params, x))
  columns = grid_columns(n)
  rows = np.stack([originals.reshape(-1, columns, *originals.shape[1:]),
                   recons.reshape(-1, columns, *recons.shape[1:])], axis=1)  # [n / columns, 2, columns, ...]
  grid = rows.reshape(2 * n, *originals.shape[1:])
  media.write_samples(writer, step, grid, directory=run.workdir / 'samples' if jax.process_index() == 0 else None,
                      columns=columns)
  return grid


def export(run: AutoencoderRun, params: Any) -> dict[str, Any]:
  """``workdir/autoencoder/``: the autoencoder ``params`` with the scaling factor ``1 / std`` of its training
  latents (posterior means of the first ``autoencoder.scaling_examples`` training images, LDM sec. 4.3.2)."""
  encode = jax.jit(lambda p, x: run.model.apply({'params': p}, run.to_input(x), method='encode').mode())
  count = min(run.config.autoencoder.scaling_examples, len(run.source))
  z = [np.asarray(multihost_utils.process_allgather(encode(params, x), tiled=True))[:n]
       for x, n in run.batches(run.source, count, run.config.eval.batch_size)]
  scaling_factor = float(1.0 / np.std(np.concatenate(z).astype(np.float64)))
  fields = {**run.fields, 'scaling_factor': scaling_factor, 'shift_factor': 0.0}
  host = jax.tree.map(np.asarray, multihost_utils.process_allgather(params, tiled=True))
  directory = run.workdir / EXPORT_DIR
  note = (f'autoencoder run {run.workdir} ({run.config.data.name}/{run.config.data.split} resized to '
          f'{list(run.input_shape)}); scaling factor 1 / std of {count} training latents')
  if jax.process_index() == 0:
    record = latents.save_autoencoder(directory, host, preset=run.config.model.preset, fields=fields,
                                      input_shape=run.input_shape, note=note)
    console.say(f'Wrote the autoencoder to {directory} (latents {record["latent_shape"]}, scaling factor '
                f'{scaling_factor:.4g}): --config.data.latents.autoencoder={directory}')
  multihost_utils.sync_global_devices('autoencoder_export')
  return json.loads((directory / latents.META).read_text())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> train_state.TrainState:
  """Trains the autoencoder (resuming if possible), evaluates and exports it; returns the final state."""
  preempted = train.Preempted()
  run = AutoencoderRun(config, workdir)
  c, lead = config.train, jax.process_index() == 0
  writer = metric_writers.create_default_writer(str(run.workdir), just_logging=not lead)
  iterator = run.data_iterator()
  state = run.restore_or_init(iterator)
  start = int(state.step)
  if start == 0:
    flat = train.flatten_config(config.to_dict())
    writer.write_hparams({k: str(v) for k, v in flat.items()})
    if lead:
      train.write_run_record(run)
  t0 = time.perf_counter()
  compiled = train.compile_train_step(run)
  console.say(f'Compiled the train step in {time.perf_counter() - t0:.1f} s.', enabled=lead)
  report = periodic_actions.ReportProgress(num_train_steps=c.num_steps, writer=writer, every_steps=c.log_every)
  progress = console.Progress(c.num_steps, c.batch_size, every=c.log_every, enabled=lead)
  log = train.MetricsLog(run, writer, progress,
                         flops_per_step=float((compiled.cost_analysis() or {}).get('flops', 0.0)))
  evaluator, eval_path, previous = None, None, None
  for step in range(start + 1, c.num_steps + 1):
    t_host = time.perf_counter()
    batch = sharding.global_batch(run.model_batch(next(iterator)), run.mesh)
    log.host_seconds += time.perf_counter() - t_host
    state, metrics = compiled(state, batch)
    if previous is not None:
      log.add(*previous)
    previous = (step, metrics)
    report(step)
    stop = preempted.signalled or run.checkpointer.reached_preemption(step)
    if step % c.checkpoint_every == 0 or step == c.num_steps or stop:
      run.checkpointer.save(step, state, iterator)
    if c.sample_every and step % c.sample_every == 0 and step != c.num_steps:
      write_grid(run, run.sample_params(state), step, writer)
    if c.eval_every and step % c.eval_every == 0:
      evaluator = evaluator or make_evaluator(run)
      results = evaluate_params(run, run.sample_params(state), evaluator, num_examples=config.eval.num_samples_train)
      progress.close()
      eval_path = write_results(run, writer, step, *results)
    if stop:
      break
  if previous is not None:
    log.add(*previous)
  progress.close()
  if int(state.step) == c.num_steps:
    write_grid(run, run.sample_params(state), c.num_steps, writer)
    export(run, run.sample_params(state))
  run.checkpointer.wait_until_finished()
  writer.flush()
  if lead:
    train.print_summary(run, int(state.step), eval_path, time.perf_counter() - t0)
  return state


def _restored(config: ml_collections.ConfigDict, workdir: str, step: int | None = None):
  run = AutoencoderRun(config, workdir)
  if not run.checkpointer.all_steps():
    raise FileNotFoundError(f'No checkpoint in {run.checkpointer.directory}; train first (--mode train).')
  if step is not None and step not in run.checkpointer.all_steps():
    raise ConfigError('eval.checkpoint_step', f'no checkpoint at step {step}; available: '
                      f'{run.checkpointer.all_steps()}.')
  state = run.restore_or_init(step=step)
  return run, state, metric_writers.create_default_writer(str(run.workdir), just_logging=jax.process_index() > 0)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """``--mode eval``: the metrics of checkpoint ``eval.checkpoint_step`` (-1: the latest) on ``eval.num_samples``
  held-out images."""
  run, state, writer = _restored(config, workdir, None if config.eval.checkpoint_step == -1 else
                                 config.eval.checkpoint_step)
  metrics, protocol = evaluate_params(run, run.sample_params(state), make_evaluator(run),
                                      num_examples=config.eval.num_samples)
  write_results(run, writer, int(state.step), metrics, protocol)
  return metrics


def sample(config: ml_collections.ConfigDict, workdir: str) -> np.ndarray:
  """``--mode sample``: the grid of held-out originals and reconstructions of the latest checkpoint."""
  run, state, writer = _restored(config, workdir)
  grid = write_grid(run, run.sample_params(state), int(state.step), writer)
  writer.flush()
  return grid

