"""Evaluation runs: generate N samples over all devices and stream them through an evaluator.

``--mode eval`` restores the EMA parameters of a checkpoint, generates ``eval.num_samples`` images with the
configured sampler, NFE and guidance (class-conditional runs cycle through the classes, so every class gets
N / num_classes samples), and writes the metrics through the CLU writers and to
``workdir/eval/step_<n>_<sampler settings>.json`` together with the protocol that produced them.
``--mode reference`` writes the Inception statistics of the configured dataset split to ``eval.reference_stats``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers, periodic_actions

from diffax.trainer import components, config as config_lib, console, sharding
from diffax.data import captions
from diffax.data.pipeline import make_iterator
from diffax.diffusion import samplers
from diffax.evaluation import caption_agreement, clip_evaluator, clip_score, evaluators, moving_digits, stats, tones
from diffax.models import text as text_models
from diffax.models.convert import clip as convert_clip
from diffax.trainer.experiment import Experiment


def make_evaluator(config: ml_collections.ConfigDict) -> evaluators.Evaluator:
  """The configured evaluator; a missing Inception weights or statistics file fails here, before sampling."""
  if config.eval.metric in ('digits', 'captions') and bool(config.model.text_encoder) != (
      config.eval.metric == 'captions'):
    raise config_lib.ConfigError('eval.metric', "a text model (model.text_encoder) is judged by 'captions' (the "
                                 "agreement with its held-out captions), a class or unconditional model not.")
  if config.eval.metric == 'digits':
    return evaluators.DigitsEvaluator()
  if config.eval.metric == 'captions':
    return caption_agreement.CaptionAgreementEvaluator()
  if config.eval.metric == 'clip_score':
    return _clip_score_evaluator(config)
  if config.eval.metric == 'inception':
    return evaluators.InceptionEvaluator(weights_path=config.eval.inception_weights or None,
                                         reference_stats=config.eval.reference_stats or None)
  if config.eval.metric in ('moving_digits', 'tones') and config.data.name != config.eval.metric:
    raise config_lib.ConfigError('eval.metric', f'{config.eval.metric!r} judges samples of data.name='
                                 f'{config.eval.metric!r}, not {config.data.name!r}.')
  if config.eval.metric == 'moving_digits':
    return moving_digits.MovingDigitsEvaluator(num_frames=config.data.num_frames or 16)
  if config.eval.metric == 'tones':
    return tones.TonesEvaluator(length=config.data.length or 1024)
  raise config_lib.ConfigError('eval.metric', 'no metric configured; choose digits, captions, clip_score, '
                               'inception, moving_digits or tones.')


def _clip_score_evaluator(config: ml_collections.ConfigDict) -> clip_evaluator.ClipScoreEvaluator:
  """CLIP ViT-L/14's score of a text model's samples against the held-out captions they were drawn for."""
  if not config.model.text_encoder:
    raise config_lib.ConfigError('eval.metric', "'clip_score' judges a text model's samples against their prompts: "
                                 'set model.text_encoder.')
  model, params = clip_score.load_clip(config.eval.clip_weights or None)
  tokenizer = text_models.CLIPTokenizer(config.eval.clip_tokenizer or None,
                                        context_length=model.text_model.context_length)
  files = (config.eval.clip_weights or os.environ[convert_clip.ENV_VAR],
           config.eval.clip_tokenizer or os.environ[text_models.TOKENIZER_ENV_VAR])
  return clip_evaluator.ClipScoreEvaluator(model, params, tokenizer, caption_texts, files=files)


def caption_texts(said: np.ndarray) -> list[str]:
  """What held-out captions say, [B, 3] (digit, thickness bin, slant bin) -> their texts."""
  return [captions.caption(*(int(v) for v in row)) for row in said]


def generate_and_evaluate(exp: Experiment, params: Any, evaluator: evaluators.Evaluator, *, num_samples: int,
                          seed: int, writer: metric_writers.MetricWriter | None = None) -> tuple[dict, dict]:
  """Streams ``num_samples`` generated images through ``evaluator``; returns ``(metrics, protocol)``."""
  batch_size = exp.config.eval.batch_size
  generate = exp.generate_fn(batch_size)
  num_batches = -(-num_samples // batch_size)
  num_classes = exp.config.data.num_classes
  labels_sharding = sharding.batch_sharding(exp.mesh)
  progress = periodic_actions.ReportProgress(num_train_steps=num_batches, writer=writer,
                                             every_steps=max(num_batches // 10, 1)) if writer else None
  nfe, start = 0, time.perf_counter()
  for b in range(num_batches):
    index = jnp.arange(b * batch_size, (b + 1) * batch_size, dtype=jnp.int32)
    labels = jax.device_put(index % max(num_classes, 1), labels_sharding)
    cond = labels
    if exp.text:  # held-out captions: the sampler reads their ids, the evaluator what they say
      cond, labels = (jax.device_put(a, labels_sharding) for a in exp.text.held_out(np.asarray(index)))
    samples, nfe = generate(params, jax.random.fold_in(jax.random.PRNGKey(seed), b), cond)
    keep = min(batch_size, num_samples - b * batch_size)
    if keep < batch_size:  # the last batch: drop the surplus (host arrays; this is at most one batch)
      samples, labels = np.asarray(jax.device_get(samples))[:keep], np.asarray(jax.device_get(labels))[:keep]
    evaluator.update(samples, labels if num_classes or exp.text else None)
    if progress:
      progress(b + 1)
  metrics = evaluator.result()
  c = exp.config
  kwargs = components.sampler_kwargs(c)
  protocol = {
      'num_samples': num_samples, 'seed': seed, 'sampler': samplers.canonical_name(c.sample.sampler),
      'sampler_kwargs': {k: (v if isinstance(v, (bool, int, float, str, type(None))) else repr(v))
                         for k, v in kwargs.items()},  # every keyword the sampler ran with, defaults included
      'num_steps': kwargs.get('num_steps'), 'nfe': int(nfe), 'guidance_scale': c.sample.guidance_scale,
      'clip_x0': c.sample.clip_x0,
      'ema_decay': tuple(c.train.ema_decays)[components.ema_index(c)], 'schedule': c.diffusion.schedule,
      'prediction': c.diffusion.prediction, 'seconds': time.perf_counter() - start, **evaluator.protocol(),
      **(exp.latent.protocol() if exp.latent else {})}  # decoded latents: which autoencoder
  return metrics, protocol


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """``--mode eval``: metrics of the checkpoint ``eval.checkpoint_step`` (-1: the latest), written to JSON."""
  exp = Experiment(config, workdir)
  evaluator = make_evaluator(config)
  steps = exp.checkpointer.all_steps()
  if not steps:
    raise FileNotFoundError(f'No checkpoint in {exp.checkpointer.directory}; train first (--mode train).')
  wanted = None if config.eval.checkpoint_step == -1 else config.eval.checkpoint_step
  if wanted is not None and wanted not in steps:
    raise config_lib.ConfigError('eval.checkpoint_step', f'no checkpoint at step {wanted}; available: {steps}.')
  state = exp.restore_or_init(step=wanted)
  step = int(state.step)
  writer = metric_writers.create_default_writer(str(exp.workdir), just_logging=jax.process_index() > 0)
  metrics, protocol = generate_and_evaluate(exp, exp.sample_params(state), evaluator,
                                            num_samples=config.eval.num_samples, seed=config.sample.seed + 1,
                                            writer=writer)
  write_results(exp, writer, step, metrics, protocol)
  return metrics


def write_results(exp: Experiment, writer, step: int, metrics: dict, protocol: dict) -> str | None:
  """CLU scalars ``eval/<name>`` and ``workdir/eval/step_<n>_<sampler>-<steps>_w<scale>.json`` holding
  ``{'step', 'metrics', 'protocol'}``; evaluations with different sampling settings never overwrite each other.
  Returns the JSON's path (on process 0; None elsewhere)."""
  writer.write_scalars(step, {f'eval/{k}': v for k, v in metrics.items()})
  writer.flush()
  if jax.process_index() == 0:
    steps = '' if protocol['num_steps'] is None else f'-{protocol["num_steps"]}'
    tag = f'{protocol["sampler"]}{steps}_w{protocol["guidance_scale"]:g}'
    if protocol['clip_x0']:
      tag += f'_clip{protocol["clip_x0"]:g}'
    path = exp.workdir / 'eval' / f'step_{step:08d}_{tag}.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'step': step, 'metrics': metrics, 'protocol': protocol}, indent=2))
    shown = ', '.join(f'{k} {v:.4g}' for k, v in metrics.items())
    console.say(f'Step {step}: {shown} (written to {path}).')
    return str(path)
  return None


def reference_stats(config: ml_collections.ConfigDict, workdir: str) -> str:
  """``--mode reference``: Inception ``mu`` / ``sigma`` (and the features, for KID) of ``data.split``.

  Every full ``eval.batch_size`` batch of the split is used once (pick a batch size that divides the split,
  e.g. 500 for CIFAR-10's 50,000 training images); the output goes to ``eval.reference_stats``.
  """
  del workdir
  if not config.eval.reference_stats:
    raise config_lib.ConfigError('eval.reference_stats', 'set the output .npz path.')
  exp_mesh = sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp)
  from diffax.data.sources import get_source  # pylint: disable=g-import-not-at-top
  source = get_source(config.data.name, split=config.data.split, data_dir=config.data.data_dir or None)
  evaluator = evaluators.InceptionEvaluator(weights_path=config.eval.inception_weights or None, keep_features=True)
  batch = config.eval.batch_size
  iterator = make_iterator(source, global_batch_size=batch, seed=0, shuffle=False, num_epochs=1)
  count = 0
  for host_batch in iterator:
    evaluator.update(sharding.global_batch(host_batch, exp_mesh)['x'])
    count += batch
  feature_stats = evaluator.features_stats()
  if jax.process_index() == 0:
    stats.save_reference_stats(config.eval.reference_stats, feature_stats.mean, feature_stats.cov,
                               features=evaluator.pool_features())
    console.say(f'Wrote the statistics of {count} images of {config.data.name}/{config.data.split} to '
                f'{config.eval.reference_stats} (sha256 {stats.file_sha256(config.eval.reference_stats)}).')
  return config.eval.reference_stats
