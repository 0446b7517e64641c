"""The trainer's configuration: every key with its default and type, and the checks run at start.

Experiment files in ``configs/`` start from :func:`default_config` and change values, so a misspelt key fails
where it is written (the returned ConfigDict is locked) and every override from the command line
(``--config.optim.learning_rate=1e-4``) is type-checked by ml_collections. Three sections hold keyword
arguments for library objects and are open: ``model.overrides`` (fields of the backbone), ``diffusion.
schedule_kwargs`` and ``sample.kwargs``; the command line may add keys there (``--config.sample.kwargs.eta=1``),
and :func:`validate` / :mod:`diffax.trainer.components` build those objects once and name the key when a keyword is
unknown or has the wrong type. Sections follow score_sde / VDM: ``data / model / diffusion / optim / train /
sample / eval / distill / mesh``.
"""

from __future__ import annotations

import math

import ml_collections

from diffax.diffusion import losses, parameterization, schedules, samplers, time_sampling
from diffax.diffusion.samplers import flow as flow_samplers


class ConfigError(ValueError):
  """A configuration value that cannot work; the message names the key and what is allowed."""

  def __init__(self, key: str, message: str):
    super().__init__(f'config.{key}: {message}')
    self.key = key


def default_config() -> ml_collections.ConfigDict:
  """All keys the trainer reads, with defaults (the embedded digits default changes a few)."""
  from diffax.trainer import autoencoder, distill, latents  # they import ConfigError from here
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = dict(
      name='digits',  # 'digits' (bundled with scikit-learn), 'moving_digits', 'tones' or a tfds name, e.g. 'cifar10'
      feature='',  # tfds feature to read ('' = 'image', else the dataset's one Video / Audio feature)
      num_frames=0,  # clips: frames per example (0 = the dataset's; moving_digits: 16)
      length=0,  # waveforms: samples per example (0 = the dataset's; tones: 1024)
      sample_rate=0,  # waveforms: the rate the model is trained at (0 = the dataset's; tones: 8000)
      data_dir='',  # tfds data_dir; '' = tfds default (~/tensorflow_datasets or $TFDS_DATA_DIR)
      split='train',
      num_classes=10,  # 0 = unconditional; otherwise labels are the condition (label num_classes is null)
      random_flip=False,
      dequantize=False,
      worker_count=0,  # grain worker processes per host (0 = in the main process)
      style='',  # digits only: '' (as scanned), 'bold' or 'inverted' (diffax.data.digits.STYLES)
      resize='',  # tfds images: '' (as stored) or 'center_crop' (ADM's, to image_size: diffax.data.transforms)
      image_size=0,  # the size of data.resize's square images (e.g. 256 for imagenet2012); 0 with resize=''
  )
  c.data.latents = latents.defaults()  # latent diffusion: a frozen autoencoder's latents (diffax.trainer.latents)
  c.model = dict(
      name='unet',  # a key of diffax.models.MODELS
      preset='',  # a preset of that model (diffax.models.PRESETS) or '' for the model's defaults
      dtype='float32',  # compute dtype: 'float32' or 'bfloat16'; parameters are always float32
      remat='none',  # 'none' or a policy of diffax.models.layers.REMAT_POLICIES
      text_encoder='',  # text-to-image: a text tower trained with the backbone, e.g. 'clip_tiny' (trainer/text.py)
  )
  c.model.overrides = ml_collections.ConfigDict()  # backbone fields, e.g. {'ch': 64, 'dropout': 0.1}
  c.diffusion = dict(
      schedule='cosine',  # a key of diffax.diffusion.schedules.SCHEDULES
      prediction='eps',  # one of parameterization.PREDICTIONS
      loss='ddpm',  # a key of losses.LOSSES
      weighting='eps',  # one of losses.WEIGHTINGS (ignored by the 'hybrid' loss)
      weighting_gamma=0.0,  # min-SNR gamma / P2 exponent; 0 = the paper's default
      p_uncond=0.1,  # label dropout for classifier-free guidance (conditional models only)
      sigma_data=0.5,
      # Flow-matching time density (loss='flow' only; SD3 sec. 3.1, diffax.diffusion.time_sampling):
      time_sampling='',  # '' = 'uniform', or 'logit_normal', 'mode', 'cosmap'
      logit_normal_loc=0.0,  # 'logit_normal': t = sigmoid(loc + scale n) (SD3 eq. 19; SD3 trains with (0, 1))
      logit_normal_scale=1.0,
      mode_scale=1.29,  # 'mode': SD3 eq. 20's s, in [-1, 2 / (pi - 2)]
      time_shift=1.0,  # SD3 eq. 23's shift of the training times (> 1: towards noise); 1 = none
  )
  c.diffusion.schedule_kwargs = ml_collections.ConfigDict()
  c.optim = dict(
      optimizer='adamw',  # 'adamw' or 'adam'
      learning_rate=2e-4,
      lr_schedule='constant',  # 'constant' or 'cosine' (both after a linear warm-up)
      warmup_steps=0,
      min_lr_ratio=0.0,  # cosine decays to learning_rate * min_lr_ratio
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      grad_clip=1.0,  # global-norm clipping; 0 = off
      grad_accum_steps=1,  # optax.MultiSteps: one update every k micro-batches of train.batch_size
  )
  c.train = dict(
      num_steps=10_000,
      batch_size=128,  # global batch over all devices and processes
      log_every=100,
      checkpoint_every=1000,
      keep_checkpoints=3,  # the last N checkpoints are kept ...
      keep_period=0,  # ... plus every K-th step (0 = none)
      async_checkpointing=True,
      sample_every=0,  # sample grid every N steps (0 = only at the end)
      eval_every=0,  # periodic evaluation every N steps with eval.num_samples_train (0 = off)
      ema_decays=(0.9999,),
      ema_warmup=True,  # decay_n = min(decay, (1 + n) / (10 + n))
      nan_policy='stop',  # 'stop' (keep the last good checkpoint) or 'skip' (drop the update)
      loss_buckets=4,  # loss broken down over this many equal bins of t
      peak_flops_per_device=0.0,  # for MFU; 0 = look up the device kind (unknown kinds report no MFU)
      compilation_cache='user',  # 'user' (~/.cache/diffax/jax), 'workdir', a directory, or '' = off
  )
  c.sample = dict(
      sampler='dpm_solver',  # a key of samplers.SAMPLERS
      num_steps=0,  # sampler steps; 0 = the sampler's default (a sampler without steps, e.g. 'adaptive_ode', needs 0)
      guidance_scale=1.0,  # classifier-free guidance weight w (1 = the conditional model)
      clip_x0=0.0,  # clip every x0-prediction to [-c, c] (pixel data: 1); 0 = never clip
      spacing='',  # time grid ('trailing', 'log_snr', 'karras', ...) of samplers that take one; '' = its default
      num_samples=64,  # grid size
      ema_decay=0.0,  # which EMA to sample from; 0 = the first of train.ema_decays
      seed=0,
      prompts='',  # text models: prompts of the sample grid separated by ';' ('' = the held-out captions)
      control='',  # finetune.mode='controlnet': .npy / .png control images ('' = those of the test split)
      control_scale=1.0,  # ControlNet conditioning scale s at sampling (0 = the base model)
  )
  c.sample.kwargs = ml_collections.ConfigDict()
  c.eval = dict(
      metric='digits',  # 'digits', 'inception', 'moving_digits', 'tones', 'fvd' (clips) or '' (none)
      num_samples=50_000,  # for --mode eval
      num_samples_train=2_000,  # for periodic evaluation during training
      batch_size=256,  # global generation batch
      inception_weights='',  # '' = $DIFFAX_INCEPTION_WEIGHTS
      i3d_weights='',  # metric 'fvd': the converted I3D .npz ('' = $DIFFAX_I3D_WEIGHTS; see i3d_weights.py)
      reference_stats='',  # .npz with mu / sigma of the real data's Inception features
      clip_weights='',  # metric 'clip_score': CLIP ViT-L/14 safetensors ('' = $DIFFAX_CLIP_WEIGHTS)
      clip_tokenizer='',  # ... and its tokenizer.json ('' = $DIFFAX_CLIP_TOKENIZER)
      checkpoint_step=-1,  # -1 = latest
  )
  c.distill = distill.defaults()  # few-step students: see diffax.trainer.distill
  c.autoencoder = autoencoder.defaults()  # model.name='autoencoder': its loss (diffax.trainer.autoencoder)
  c.finetune = dict(  # diffax.trainer.finetune / control: start from a trained run and train part of it
      mode='',  # '' (train from scratch), 'full', 'subtrees', 'lora' or 'controlnet'
      base_workdir='',  # the trained base run (read only); its EMA weights start this run
      base_step=-1,  # its checkpoint step (-1 = newest)
      trainable=(),  # 'subtrees': regexes of the parameter paths / sub-trees that train
      lora_rank=4,
      lora_alpha=4.0,
      lora_dropout=0.0,
      lora_targets=('attention',),  # regexes of layer paths or names of diffax.models.lora.TARGETS
      adapters=(),  # 'path.npz:weight' LoRA files merged into the sampled model (any mode; weight 1 if omitted)
      dreambooth=dict(  # Ruiz et al. 2023: instance images under a new label (data.num_classes - 1)
          class_label=-1,  # the class the instances belong to (-1 = off); its base samples preserve the prior
          num_instances=5,  # instance images: the first of the training split in that class
          num_class_images=64,  # class images generated by the base at the start (workdir/dreambooth/)
          prior_weight=1.0,  # lambda of eq. 2
      ),
      control=dict(  # finetune.mode='controlnet'
          kind='edges',  # 'edges' (Sobel) or 'lowres' (diffax.data.control.KINDS)
          factor=2,  # 'lowres': block size
          hint_channels=(16, 16),  # widths of the conditioning encoder
      ),
  )
  c.mesh = dict(
      data=-1,  # -1 = all devices not used by other axes
      fsdp=1,
      rules=(('embed', 'fsdp'), ('conv_out', 'fsdp')),  # logical parameter axis -> mesh axis
  )
  c.lock()
  for open_section in (c.model.overrides, c.diffusion.schedule_kwargs, c.sample.kwargs):
    open_section.unlock()
  return c


def load_file(path, arg: str | None = None) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of the config file ``path`` (what ``--config=path:arg`` reads), e.g. for a config that
  starts from another (``configs/digits_lora.py`` from ``configs/digits.py``, whose checkpoint it fine-tunes)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def runlocal(c: ml_collections.ConfigDict, *, preset: str) -> ml_collections.ConfigDict:
  """Shrinks a config to a CPU smoke run (big_vision's ``runlocal``): a tiny ``preset``, 4 steps of batch 8,
  fp32, no sharding, checkpoints every 2 steps, no periodic sampling or evaluation, 8 three-step samples."""
  c.model.preset = preset
  c.model.dtype = 'float32'
  c.mesh.fsdp = 1
  c.train.update(num_steps=4, batch_size=8, log_every=2, checkpoint_every=2, sample_every=0, eval_every=0)
  c.optim.warmup_steps = min(c.optim.warmup_steps, 1)
  c.sample.update(num_samples=8, num_steps=3)
  c.eval.batch_size = 8
  return c


def _choice(config: ml_collections.ConfigDict, key: str, allowed) -> None:
  value = config
  for part in key.split('.'):
    value = value[part]
  if value not in allowed:
    raise ConfigError(key, f'{value!r} is not one of {sorted(allowed)}.')


def _positive(config: ml_collections.ConfigDict, *keys: str, allow_zero: bool = False) -> None:
  for key in keys:
    value = config
    for part in key.split('.'):
      value = value[part]
    if value < 0 or (value == 0 and not allow_zero):
      raise ConfigError(key, f'must be {"non-negative" if allow_zero else "positive"}, got {value!r}.')


def validate(config: ml_collections.ConfigDict) -> None:
  """Rejects impossible settings with the key named. Keyword sections are checked by building them."""
  from diffax import models  # the registry imports Flax modules; keep config import light
  from diffax.trainer import autoencoder, distill, latents, text

  _choice(config, 'model.name', (*models.MODELS, autoencoder.MODEL_NAME))
  if config.model.preset:
    _choice(config, 'model.preset', {**models.PRESETS, autoencoder.MODEL_NAME: models.AUTOENCODER_PRESETS}[
        config.model.name])
  _choice(config, 'model.dtype', ('float32', 'bfloat16'))
  _choice(config, 'model.remat', ('none', *models.layers.REMAT_POLICIES))
  _choice(config, 'diffusion.schedule', schedules.SCHEDULES)
  _choice(config, 'diffusion.prediction', parameterization.ALL_PREDICTIONS)
  _choice(config, 'diffusion.loss', losses.LOSSES)
  _choice(config, 'diffusion.weighting', losses.WEIGHTINGS)
  _choice(config, 'optim.optimizer', ('adamw', 'adam'))
  _choice(config, 'optim.lr_schedule', ('constant', 'cosine'))
  _choice(config, 'train.nan_policy', ('stop', 'skip'))
  _choice(config, 'sample.sampler', {**samplers.SAMPLERS, **samplers.DEPRECATED_NAMES})
  samplers.canonical_name(config.sample.sampler)  # warns about a deprecated name
  _choice(config, 'finetune.mode', ('', 'full', 'subtrees', 'lora', 'controlnet'))
  _choice(config, 'eval.metric', ('digits', 'captions', 'clip_score', 'inception', 'moving_digits', 'tones', 'fvd',
                                  ''))
  _positive(config, 'optim.learning_rate', 'optim.grad_accum_steps', 'train.num_steps', 'train.batch_size',
            'train.log_every', 'train.checkpoint_every', 'train.keep_checkpoints', 'train.loss_buckets',
            'sample.num_samples', 'eval.batch_size', 'eval.num_samples',
            'eval.num_samples_train', 'mesh.fsdp')
  _positive(config, 'optim.warmup_steps', 'optim.weight_decay', 'optim.grad_clip', 'train.keep_period',
            'train.sample_every', 'train.eval_every', 'data.num_classes', 'data.worker_count', 'data.num_frames',
            'data.length', 'data.sample_rate', 'data.image_size', 'sample.num_steps',
            'diffusion.p_uncond', allow_zero=True)
  if not 0.0 <= config.optim.min_lr_ratio <= 1.0:
    raise ConfigError('optim.min_lr_ratio', f'must lie in [0, 1], got {config.optim.min_lr_ratio}.')
  if config.optim.warmup_steps > config.train.num_steps:
    raise ConfigError('optim.warmup_steps', f'{config.optim.warmup_steps} exceeds train.num_steps.')
  if not config.train.ema_decays or not all(0.0 < d < 1.0 for d in config.train.ema_decays):
    raise ConfigError('train.ema_decays', f'needs one or more decays in (0, 1), got {config.train.ema_decays}.')
  if config.sample.ema_decay and config.sample.ema_decay not in config.train.ema_decays:
    raise ConfigError('sample.ema_decay', f'{config.sample.ema_decay} is not one of train.ema_decays '
                      f'{tuple(config.train.ema_decays)} (0 picks the first).')
  if config.diffusion.p_uncond >= 1.0:
    raise ConfigError('diffusion.p_uncond', 'must be below 1 (it is the probability of dropping a label).')
  if config.sample.guidance_scale != 1.0 and not (config.data.num_classes or config.model.text_encoder):
    raise ConfigError('sample.guidance_scale', 'guidance needs a class-conditional model (data.num_classes > 0) '
                      'or a text model (model.text_encoder).')
  if config.sample.guidance_scale != 1.0 and config.diffusion.p_uncond == 0.0:
    raise ConfigError('sample.guidance_scale', 'guidance needs an unconditional model too: set '
                      'diffusion.p_uncond > 0 (label dropout), or guidance_scale = 1.')
  if config.diffusion.loss == 'hybrid' and config.diffusion.prediction != 'eps':
    raise ConfigError('diffusion.prediction', "the 'hybrid' loss (iDDPM) trains an eps model.")
  if config.diffusion.loss == 'edm' and config.diffusion.prediction != 'edm' and config.diffusion.schedule == 'edm':
    raise ConfigError('diffusion.prediction', "EDM training on the 'edm' schedule uses prediction='edm'.")
  _validate_flow(config)
  text.from_config(config)
  distill.validate(config)
  latents.validate(config)
  autoencoder.validate(config)
  if config.mesh.data == 0 or config.mesh.data < -1:
    raise ConfigError('mesh.data', f'must be -1 (all remaining devices) or positive, got {config.mesh.data}.')


FLOW_KEYS = ('time_sampling', 'logit_normal_loc', 'logit_normal_scale', 'mode_scale', 'time_shift')
"""``diffusion.*`` keys that only the flow loss reads."""


def _validate_flow(config: ml_collections.ConfigDict) -> None:
  """The flow loss's time-density keys, and the sampler options that make no sense on the schedule.

  A flow key changed under another loss would be silently ignored, so it is an error naming it; so is
  ``sample.spacing='leading'`` (DDIM's integer-timestep grid) on a continuous-time schedule such as the
  interpolants, and a flow sampler's ``shift`` or ``diffusion`` it cannot use.
  """
  d, defaults = config.diffusion, default_config().diffusion
  if d.loss != 'flow':
    for key in FLOW_KEYS:
      if d[key] != defaults[key]:
        raise ConfigError(f'diffusion.{key}', f"is read by diffusion.loss='flow' only, not {d.loss!r}; leave it at "
                          f'{defaults[key]!r}.')
  else:
    _choice(config, 'diffusion.time_sampling', ('', *time_sampling.FLOW_TIME_SAMPLINGS))
    _positive(config, 'diffusion.logit_normal_scale', 'diffusion.time_shift')
    if not -1.0 <= d.mode_scale <= 2.0 / (math.pi - 2.0):
      raise ConfigError('diffusion.mode_scale', f'must lie in [-1, 2 / (pi - 2)] = [-1, 1.752] (SD3 eq. 20: a '
                        f'monotone map), got {d.mode_scale}.')
  schedule_cls = schedules.SCHEDULES[d.schedule]
  kwargs = config.sample.kwargs.to_dict()
  spacing = config.sample.spacing or kwargs.get('spacing', '')
  if spacing == 'leading' and not issubclass(schedule_cls, schedules.DiscreteSchedule):
    key = 'sample.spacing' if config.sample.spacing else 'sample.kwargs.spacing'
    raise ConfigError(key, f"'leading' counts integer timesteps of a discrete schedule; {d.schedule!r} is "
                      "continuous-time: use 'trailing' or 'linspace'.")
  if 'shift' in kwargs and not kwargs['shift'] > 0:
    raise ConfigError('sample.kwargs.shift', f'must be positive (SD3 eq. 23; 1 = a uniform grid), got '
                      f'{kwargs["shift"]!r}.')
  if 'diffusion' in kwargs and kwargs['diffusion'] not in flow_samplers.DIFFUSIONS:
    raise ConfigError('sample.kwargs.diffusion', f'{kwargs["diffusion"]!r} is not one of {flow_samplers.DIFFUSIONS} '
                      "(flow_sde's w_t, SiT eq. 8).")
