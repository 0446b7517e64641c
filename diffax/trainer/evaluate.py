"""Evaluation runs: generate N samples over all devices and stream them through an evaluator.

``--mode eval`` restores the EMA parameters of a checkpoint, generates ``eval.num_samples`` images with the
configured sampler, NFE and guidance (class-conditional runs cycle through the classes, so every class gets
N / num_classes samples), and writes the metrics through the CLU writers and to
``workdir/eval/step_<n>_<sampler settings>.json`` together with the protocol that produced them.
``--mode reference`` writes the Inception statistics of the configured dataset split to ``eval.reference_stats``
(with ``eval.metric='fvd'``: the I3D statistics of its clips).
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
from diffax.data.sources import Source, SourceConfigError, get_source
from diffax.diffusion import samplers
from diffax.evaluation import caption_agreement, clip_evaluator, clip_score, evaluators, fvd, i3d, i3d_weights
from diffax.evaluation import moving_digits, stats, tones
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
  if config.eval.metric == 'fvd':
    return _fvd_evaluator(config)
  raise config_lib.ConfigError('eval.metric', 'no metric configured; choose digits, captions, clip_score, '
                               'inception, moving_digits, tones or fvd.')


def _clip_source(config: ml_collections.ConfigDict) -> Source:
  """``data.split`` of the configured data, which FVD needs to be clips [T >= 9, H, W, 1 or 3]."""
  d = config.data
  try:
    source = get_source(d.name, split=d.split, data_dir=d.data_dir or None, feature=d.feature,
                        num_frames=d.num_frames)
  except SourceConfigError as e:
    raise config_lib.ConfigError(e.key, e.detail) from e
  shape = tuple(source.image_shape)
  if len(shape) != 4 or shape[-1] not in (1, 3):
    raise config_lib.ConfigError('eval.metric', f"'fvd' judges clips [T, H, W, 1 or 3]; {d.name!r} holds examples "
                                 f'of shape {shape}.')
  if shape[0] < i3d.MIN_FRAMES:
    raise config_lib.ConfigError('data.num_frames', f"'fvd' needs clips of {i3d.MIN_FRAMES} frames or more (I3D's "
                                 f'final pool spans 2 steps after a stride of 8), got {shape[0]}; FVD is usually '
                                 'reported at 16.')
  return source


def _i3d_weights_path(config: ml_collections.ConfigDict) -> str:
  try:
    return str(i3d_weights.resolve_path(config.eval.i3d_weights or None))
  except FileNotFoundError as e:
    raise config_lib.ConfigError('eval.i3d_weights', str(e)) from e


def _fvd_evaluator(config: ml_collections.ConfigDict) -> fvd.FVDEvaluator:
  """FVD of generated clips against ``eval.reference_stats``, the real clips' statistics (``--mode reference``)."""
  num_frames = _clip_source(config).image_shape[0]
  weights = _i3d_weights_path(config)
  path = config.eval.reference_stats
  if not path or not os.path.isfile(path):
    raise config_lib.ConfigError('eval.reference_stats', f"'fvd' compares with the I3D statistics of the real clips "
                                 f'({path or "no file set"}): write them once with the same config and '
                                 '--mode reference (python -m diffax.main --config=... --mode reference '
                                 '--config.eval.reference_stats=real_clips.npz).')
  return fvd.FVDEvaluator(num_frames=num_frames, weights_path=weights, reference_stats=path)


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
  if config.model.name == 'autoencoder':  # held-out reconstructions (diffax.trainer.autoencoder_train)
    from diffax.trainer import autoencoder_train  # pylint: disable=g-import-not-at-top
    return autoencoder_train.evaluate(config, workdir)
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
  if config.eval.metric == 'fvd':
    return _fvd_reference_stats(config)
  exp_mesh = sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp)
  source = get_source(config.data.name, split=config.data.split, data_dir=config.data.data_dir or None,
                      resize=config.data.resize, image_size=config.data.image_size)
  evaluator = evaluators.InceptionEvaluator(weights_path=config.eval.inception_weights or None, keep_features=True)
  count = _stream_split(config, source, evaluator, exp_mesh)
  feature_stats = evaluator.features_stats()
  if jax.process_index() == 0:
    stats.save_reference_stats(config.eval.reference_stats, feature_stats.mean, feature_stats.cov,
                               features=evaluator.pool_features())
    console.say(f'Wrote the statistics of {count} images of {config.data.name}/{config.data.split} to '
                f'{config.eval.reference_stats} (sha256 {stats.file_sha256(config.eval.reference_stats)}).')
  return config.eval.reference_stats


def _stream_split(config: ml_collections.ConfigDict, source: Source, evaluator: evaluators.Evaluator, mesh) -> int:
  """Feeds every full ``eval.batch_size`` batch of ``source`` once, in order, as global batches; returns the count."""
  batch = config.eval.batch_size
  count = 0
  for host_batch in make_iterator(source, global_batch_size=batch, seed=0, shuffle=False, num_epochs=1):
    evaluator.update(sharding.global_batch(host_batch, mesh)['x'])
    count += batch
  return count


def _fvd_reference_stats(config: ml_collections.ConfigDict) -> str:
  """``--mode reference`` for ``eval.metric='fvd'``: the I3D statistics of ``data.split``'s clips, with the
  weights' digest, the clip length and the resolution they were made under."""
  source = _clip_source(config)
  evaluator = fvd.FVDEvaluator(num_frames=source.image_shape[0], weights_path=_i3d_weights_path(config))
  count = _stream_split(config, source, evaluator, sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp))
  if jax.process_index() == 0:
    evaluator.save_reference(config.eval.reference_stats)
    console.say(f'Wrote the I3D statistics of {count} clips of {config.data.name}/{config.data.split} to '
                f'{config.eval.reference_stats} (sha256 {stats.file_sha256(config.eval.reference_stats)}).')
  return config.eval.reference_stats
