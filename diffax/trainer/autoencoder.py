"""The autoencoder run kind (``model.name='autoencoder'``): a KL autoencoder trained by the trainer for latent
diffusion (Rombach et al. 2022, sec. 3 and app. G; :class:`diffax.models.autoencoder.AutoencoderKL`).

``model.preset`` / ``model.overrides`` pick the network (``AUTOENCODER_PRESETS``, e.g. ``'sd'``: LDM's KL-f8), and
the ``autoencoder`` section the loss of :func:`diffax.models.autoencoder_loss.make_autoencoder_loss`:

  L = rec(x, D(z)) + kl_weight KL(q(z|x) || N(0, I)) + [update >= disc_start] (lambda L_G + L_D)
  rec = |x - D(z)|_1 (or L2, per-pixel mean) + perceptual_weight LPIPS(x, D(z))

With ``autoencoder.perceptual_weight > 0`` the LPIPS-VGG weights (:mod:`diffax.evaluation.lpips_weights`: a local
converted ``.npz``, verified against the pinned source digests, optionally pinned by ``autoencoder.lpips_sha256``)
are read at start and held in ``TrainState.frozen['lpips']``, so they are arguments of the step, not constants,
and a resumed run needs no other file; their content digest is recorded with every evaluation.

With ``autoencoder.disc_weight > 0`` the patch discriminator trains in the same step: the parameters are
``{'autoencoder', 'discriminator'}`` and one optimizer step on the joint scalar is LDM's two simultaneous Adam steps.
``optim`` configures both (``optax.multi_transform`` over the two sub-trees; ``autoencoder.disc_learning_rate`` gives
the discriminator its own peak rate, global-norm clipping acts per sub-tree). ``disc_start`` counts optimizer
updates, as LDM's ``global_step``. Images are resized (bilinear) to ``autoencoder.resolution`` inside the step when
it differs from the data's size. The state, EMA, checkpoints and resumption are the diffusion runs'
(:mod:`diffax.trainer.train_state`, :mod:`.checkpoint`); the loop, evaluation and export are
:mod:`diffax.trainer.autoencoder_train`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from diffax.data.pipeline import make_iterator
from diffax.data.sources import SourceConfigError, get_source
from diffax.evaluation import lpips, lpips_weights
from diffax.models import autoencoder as autoencoder_lib
from diffax.models import autoencoder_loss
from diffax.trainer import checkpoint, console, optim, sharding, train_state
from diffax.trainer.config import ConfigError
from diffax.trainer.objective import Objective

Array = jax.Array
MODEL_NAME = 'autoencoder'
METRICS = ('digits', 'inception', '')
"""``eval.metric`` of an autoencoder run: the features of its rFID (digits classifier, FID Inception) or none."""
DISC_KEYS = ('disc_start', 'disc_layers', 'disc_ch', 'disc_groups', 'disc_learning_rate')
LPIPS_KEYS = ('lpips_weights', 'lpips_sha256')


def defaults() -> dict[str, Any]:
  """The ``autoencoder`` section of :func:`diffax.trainer.config.default_config`."""
  return dict(
      resolution=0,  # train on resolution x resolution images (bilinear from the data's); 0 = the data's size
      reconstruction='l1',  # 'l1' or 'l2' per pixel, averaged over the pixels
      kl_weight=1e-6,  # KL per image against the pixel-mean reconstruction (LDM sums pixels: its w is w / (H W C) here)
      disc_weight=0.0,  # factor of the adaptive GAN weight (LDM: 0.5); 0 = no discriminator
      disc_start=0,  # first optimizer update with the GAN terms (LDM KL-f8: 50,001)
      disc_layers=3,  # the patch discriminator's strided layers (pix2pix n_layers; 3 = 70x70 patches)
      disc_ch=64,  # its first width
      disc_groups=32,  # its GroupNorm groups
      disc_learning_rate=0.0,  # the discriminator's peak learning rate; 0 = optim.learning_rate
      perceptual_weight=0.0,  # LPIPS-VGG added to the reconstruction term (LDM: 1.0); 0 = none
      lpips_weights='',  # the converted LPIPS .npz (diffax.evaluation.lpips_weights); '' = $DIFFAX_LPIPS_WEIGHTS
      lpips_sha256='',  # pin of its content digest (printed by the converter); '' = not pinned
      eval_split='test',  # held-out split of PSNR / SSIM / rFID and of the sample grids
      scaling_examples=4096,  # training images whose latents' std gives the exported scaling factor
  )


def is_autoencoder_run(config: ml_collections.ConfigDict) -> bool:
  return config.model.name == MODEL_NAME


def validate(config: ml_collections.ConfigDict) -> None:
  """The ``autoencoder`` keys, and the sections an autoencoder run does not read left at their defaults."""
  a, default = config.autoencoder, defaults()
  if not is_autoencoder_run(config):
    for key, value in default.items():
      if a[key] != value:
        raise ConfigError(f'autoencoder.{key}', f"is read by model.name='{MODEL_NAME}' only; leave it at {value!r}.")
    return
  if a.reconstruction not in autoencoder_loss.RECONSTRUCTION:
    raise ConfigError('autoencoder.reconstruction', f'{a.reconstruction!r} is not one of '
                      f'{sorted(autoencoder_loss.RECONSTRUCTION)}.')
  for key in ('resolution', 'kl_weight', 'disc_weight', 'disc_start', 'disc_learning_rate', 'perceptual_weight'):
    if a[key] < 0:
      raise ConfigError(f'autoencoder.{key}', f'must be non-negative, got {a[key]!r}.')
  for key in ('disc_layers', 'disc_ch', 'disc_groups', 'scaling_examples'):
    if a[key] <= 0:
      raise ConfigError(f'autoencoder.{key}', f'must be positive, got {a[key]!r}.')
  if a.disc_weight == 0:
    for key in DISC_KEYS:
      if a[key] != default[key]:
        raise ConfigError(f'autoencoder.{key}', 'is read with a discriminator only: set autoencoder.disc_weight > 0 '
                          f'(LDM: 0.5) or leave it at {default[key]!r}.')
  if a.perceptual_weight == 0:
    for key in LPIPS_KEYS:
      if a[key]:
        raise ConfigError(f'autoencoder.{key}', 'is read with the perceptual term only: set '
                          'autoencoder.perceptual_weight > 0 (LDM: 1.0) or leave it empty.')
  if a.disc_ch % min(a.disc_groups, a.disc_ch):
    raise ConfigError('autoencoder.disc_groups', f'{a.disc_groups} groups do not divide disc_ch={a.disc_ch}.')
  if config.eval.metric not in METRICS:
    raise ConfigError('eval.metric', f'an autoencoder run reports PSNR / SSIM and the rFID of one of {METRICS} '
                      f"('' = PSNR / SSIM only), not {config.eval.metric!r}.")
  fields = {f.name for f in dataclasses.fields(autoencoder_lib.AutoencoderKL)} - {'parent', 'name', 'dtype'}
  for key in config.model.overrides:
    if key not in fields:
      raise ConfigError(f'model.overrides.{key}', f'AutoencoderKL has no field {key!r}; its fields are '
                        f'{sorted(fields)}.')
  others = {'model.text_encoder': config.model.text_encoder, 'data.latents.autoencoder':
            config.data.latents.autoencoder, 'distill.method': config.distill.method,
            'finetune.mode': config.finetune.mode}
  for key, value in others.items():
    if value:
      raise ConfigError(key, f"is not read by an autoencoder run (model.name='{MODEL_NAME}'), which trains on the "
                        'images: leave it empty.')


class AutoencoderRun:
  """One autoencoder run's objects, built once from a validated config (the :class:`~diffax.trainer.experiment.
  Experiment` of this run kind): mesh, train and held-out sources, the autoencoder and discriminator, the
  objective, optimizer, abstract sharded state and checkpointer."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | epath.Path):
    from diffax.trainer import config as config_lib  # pylint: disable=g-import-not-at-top
    config_lib.validate(config)
    self.config, a = config, config.autoencoder
    self.workdir = epath.Path(workdir)
    if '://' not in str(workdir):
      self.workdir = self.workdir.resolve()
    self.mesh = sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp)
    for key in ('train.batch_size', 'sample.num_samples', 'eval.batch_size'):
      section, name = key.split('.')
      if config[section][name] % self.mesh.size:
        raise ConfigError(key, f'{config[section][name]} is not divisible by the {self.mesh.size} devices.')
    self.source, self.held_out = self._source(config.data.split), self._source(a.eval_split)
    self.image_shape = tuple(np.asarray(self.source[0]['image']).shape)  # the data's [H, W, C]
    size = a.resolution or self.image_shape[0]
    self.input_shape = (size, size if a.resolution else self.image_shape[1], self.image_shape[-1])
    self.fields = {'in_channels': self.image_shape[-1], **config.model.overrides.to_dict()}
    self.fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in self.fields.items()}
    self.model = autoencoder_lib.get_autoencoder(config.model.preset or None, dtype=jnp.dtype(config.model.dtype),
                                                 **self.fields)
    f = self.model.downsampling_factor
    if self.input_shape[0] % f or self.input_shape[1] % f:
      raise ConfigError('autoencoder.resolution', f'{self.input_shape[:2]} images are not divisible by the '
                        f"autoencoder's factor {f}; set a resolution that is.")
    self.discriminator = autoencoder_loss.PatchDiscriminator(ch=a.disc_ch, num_layers=a.disc_layers,
                                                             num_groups=a.disc_groups) if a.disc_weight else None
    self.lpips = self._lpips()
    self.objective = Objective(loss_at=self.loss_at, **({} if self.lpips is None else dict(
        frozen_like=lambda params: {'lpips': jax.tree.map(jnp.zeros_like, self._lpips_tree())},
        initial=lambda abstract: (None, {'lpips': self._lpips_tree()}))))
    self.schedule = None  # no noise schedule: the train step reports no per-log-SNR loss breakdown
    self.optimizer, self.lr_schedule = self._optimizer()
    self.abstract_state, self.state_shardings = train_state.abstract_state(
        self.init_params, self.optimizer, mesh=self.mesh, rules=config.mesh.rules, seed=config.seed,
        num_ema=len(config.train.ema_decays), frozen_like=self.objective.frozen_like)
    self.checkpointer = checkpoint.Checkpointer(self.workdir / 'checkpoints', keep=config.train.keep_checkpoints,
                                                keep_period=config.train.keep_period,
                                                async_checkpointing=config.train.async_checkpointing)

  def _source(self, split: str):
    d = self.config.data
    try:
      source = get_source(d.name, split=split, data_dir=d.data_dir or None, style=d.style, resize=d.resize,
                          image_size=d.image_size)
    except SourceConfigError as e:
      raise ConfigError(e.key, e.detail) from e
    if 'image' not in source[0]:
      raise ConfigError('data.name', f'an autoencoder trains on images; {d.name} has records {sorted(source[0])}.')
    return source

  def _lpips(self) -> lpips_weights.LpipsWeights | None:
    """The verified LPIPS-VGG weights of the perceptual term (read at start, so a bad file fails before any step)."""
    a = self.config.autoencoder
    if not a.perceptual_weight:
      return None
    if min(self.input_shape[:2]) < lpips.MIN_SIZE or self.input_shape[-1] not in (1, 3):
      raise ConfigError('autoencoder.perceptual_weight', f'LPIPS-VGG compares RGB or grayscale images of at least '
                        f'{lpips.MIN_SIZE}x{lpips.MIN_SIZE}; the autoencoder takes {self.input_shape}.')
    try:
      return lpips_weights.load_weights(a.lpips_weights or None, expected_sha256=a.lpips_sha256 or None)
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError('autoencoder.lpips_weights', str(e)) from e

  def _lpips_tree(self) -> dict[str, Any]:
    return {'vgg': self.lpips.vgg, 'lin': self.lpips.lin}

  def to_input(self, x: Array) -> Array:
    """Images [B, *image_shape] -> the autoencoder's [B, *input_shape] (bilinear; unchanged at equal sizes)."""
    if x.shape[1:] == self.input_shape:
      return x
    return jax.image.resize(x, (x.shape[0], *self.input_shape), 'bilinear')

  def loss_at(self, step: Array, frozen: Any, ema_params: Any):
    """The library loss at optimizer update ``step // optim.grad_accum_steps`` on the resized batch; the LPIPS
    weights of the perceptual term are the state's frozen ``'lpips'`` tree (arguments of the step, not constants)."""
    del ema_params
    a, update = self.config.autoencoder, step // self.config.optim.grad_accum_steps
    perceptual_fn = None if self.lpips is None else functools.partial(
        lpips.distance, self.lpips.replace(vgg=frozen['lpips']['vgg'], lin=frozen['lpips']['lin']))
    loss = autoencoder_loss.make_autoencoder_loss(self.model, self.discriminator, reconstruction=a.reconstruction,
                                                  kl_weight=a.kl_weight, disc_weight=a.disc_weight,
                                                  disc_start=a.disc_start, perceptual_fn=perceptual_fn,
                                                  perceptual_weight=a.perceptual_weight)

    def loss_fn(params, batch, rng):
      return loss(params, {'x': self.to_input(batch['x'])}, rng, update)

    return loss_fn

  def init_params(self, rng: Array) -> dict[str, Any]:
    rng_ae, rng_disc = jax.random.split(rng)
    x = jnp.zeros((1, *self.input_shape), jnp.float32)
    params = {'autoencoder': self.model.init(rng_ae, x)['params']}
    if self.discriminator is not None:
      params['discriminator'] = self.discriminator.init(rng_disc, x)['params']
    return params

  def _optimizer(self) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``config.optim`` over both sub-trees (the discriminator at its own peak rate), accumulation outermost."""
    c = self.config
    kwargs = {**c.optim.to_dict(), 'grad_accum_steps': 1, 'num_steps': c.train.num_steps}
    kwargs['num_steps'] //= c.optim.grad_accum_steps  # the schedules count updates
    tx, schedule = optim.make_optimizer(**kwargs)
    if self.discriminator is not None:
      disc_tx, _ = optim.make_optimizer(**{**kwargs, 'learning_rate': c.autoencoder.disc_learning_rate or
                                           c.optim.learning_rate})
      joint = optax.multi_transform({'autoencoder': tx, 'discriminator': disc_tx},
                                    lambda params: {k: jax.tree.map(lambda _, k=k: k, v) for k, v in params.items()})
      tx = optax.GradientTransformation(lambda params: joint.init(nn.meta.unbox(params)), joint.update)
    if c.optim.grad_accum_steps > 1:
      tx = optax.MultiSteps(tx, every_k_schedule=c.optim.grad_accum_steps)
    return tx, schedule

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    b = self.config.train.batch_size
    return {'x': jax.ShapeDtypeStruct((b, *self.image_shape), jnp.float32,
                                      sharding=sharding.batch_sharding(self.mesh))}

  def model_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {'x': host_batch['x']}

  def data_iterator(self):
    c = self.config
    return make_iterator(self.source, global_batch_size=c.train.batch_size, seed=c.seed, shuffle=True,
                         random_flip=c.data.random_flip, dequantize=c.data.dequantize,
                         worker_count=c.data.worker_count)

  def restore_or_init(self, data_iterator=None, *, step: int | None = None) -> train_state.TrainState:
    state = self.checkpointer.restore(self.abstract_state, data_iterator, step=step)
    if state is not None:
      console.say(f'Resumed from step {int(state.step)} in {self.checkpointer.directory}.',
                  enabled=jax.process_index() == 0)
      return state
    return train_state.create(self.init_params, self.optimizer, shardings=self.state_shardings, seed=self.config.seed,
                              num_ema=len(self.config.train.ema_decays), frozen_like=self.objective.frozen_like,
                              initial=self.objective.initial)

  def sample_params(self, state: train_state.TrainState) -> Any:
    """The EMA autoencoder that is evaluated and exported (``sample.ema_decay``; 0 = the first decay)."""
    decays = tuple(self.config.train.ema_decays)
    index = decays.index(self.config.sample.ema_decay) if self.config.sample.ema_decay else 0
    return state.ema_params[index]['autoencoder']

  def reconstruct(self, params: Any, x: Array) -> tuple[Array, Array]:
    """Images [B, *image_shape] -> ``(x, x_hat)`` at the autoencoder's input shape: the (resized) originals and
    their reconstructions from the posterior mean, clipped to [-1, 1] as images are shown."""
    x = self.to_input(x)
    x_hat, _ = self.model.apply({'params': params}, x)
    return x, jnp.clip(x_hat.astype(jnp.float32), -1.0, 1.0)

  def batches(self, source, count: int, batch_size: int):
    """``(x, n)``: the first ``count`` images of ``source`` in order as global batches [batch_size, *image_shape] in
    [-1, 1] (every process reads the whole batch and places its shards; the last batch is padded by repeating its
    final image) and how many of its rows are real."""
    batch_sharding = sharding.batch_sharding(self.mesh)
    for start in range(0, count, batch_size):
      rows = [source[min(i, count - 1)]['image'] for i in range(start, start + batch_size)]
      x = np.stack(rows).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
      yield jax.make_array_from_callback(x.shape, batch_sharding, lambda index, x=x: x[index]), min(batch_size,
                                                                                                   count - start)
