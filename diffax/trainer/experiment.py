"""One run's objects, built once from a validated config: mesh, data source, model, schedule, loss, sampler,
optimizer, the abstract sharded state and the checkpointer. Training, sampling and evaluation share it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from diffax.trainer import checkpoint, components, config as config_lib, console, finetune, optim, sharding, train_state
from diffax.trainer import latents, text
from diffax.data.pipeline import data_key, make_iterator
from diffax.data.sources import SourceConfigError, get_source


class Experiment:
  """The objects one run needs, built once from the config (model, schedule, loss, mesh, data, state)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | epath.Path):
    config_lib.validate(config)
    self.config = config
    self.workdir = epath.Path(workdir)
    if '://' not in str(workdir):
      self.workdir = self.workdir.resolve()  # Orbax needs absolute local paths
    self.mesh = sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp)
    num_devices = self.mesh.size
    for key in ('train.batch_size', 'sample.num_samples', 'eval.batch_size'):
      section, name = key.split('.')
      if config[section][name] % num_devices:
        raise config_lib.ConfigError(key, f'{config[section][name]} is not divisible by the {num_devices} devices.')
    try:
      self.source = get_source(config.data.name, split=config.data.split, data_dir=config.data.data_dir or None,
                               feature=config.data.feature, num_frames=config.data.num_frames,
                               length=config.data.length, sample_rate=config.data.sample_rate,
                               style=config.data.style, resize=config.data.resize,
                               image_size=config.data.image_size)
    except SourceConfigError as e:
      raise config_lib.ConfigError(e.key, e.detail) from e
    record = self.source[0]
    self.image_shape = tuple(np.asarray(record[data_key(record)]).shape)  # (H, W, C), (T, H, W, C) or (L, C)
    self.latent = latents.from_config(config, self.image_shape)  # data.latents: the frozen autoencoder, or None
    self.source, self.batch_shape = latents.wrap_source(config, self.latent, self.source, self.workdir)
    self.batch_shape = self.batch_shape or self.image_shape  # the pipeline's examples (images or cached latents)
    self.image_shape = self.latent.latent_shape if self.latent else self.image_shape  # the model's examples
    if config.data.num_classes and not 0 <= int(record['label']) < config.data.num_classes:
      raise config_lib.ConfigError('data.num_classes', f'label {record["label"]} of {config.data.name} is outside '
                                   f'[0, {config.data.num_classes}).')
    self.text = text.from_config(config)  # captions' tokenizer and prompts of a text model, else None
    self.cond_shape = self.text.cond_shape if self.text else (() if config.data.num_classes else None)
    self.schedule = components.build_schedule(config)
    self.model = components.build_model(config)
    rank = len(self.image_shape) - 1
    if getattr(self.model, 'spatial_dims', 2) != rank:
      raise config_lib.ConfigError('model.overrides.spatial_dims', f'{config.data.name} has examples of shape '
                                   f'{self.image_shape} (spatial rank {rank}) but the model takes spatial_dims='
                                   f'{self.model.spatial_dims}; pick a {rank}-D preset or set spatial_dims={rank}.')
    if rank != 2:
      self._check_example_fits_model(rank)
    if self.latent:
      latents.check_model(config, self.latent, self.init_backbone, self.example_inputs,
                          lambda p, *a: self.model.apply({'params': p}, *a, train=False))
    self.tuning = finetune.from_config(config, self)  # fine-tuning hooks (identity for a run from scratch)
    self.loss_fn = self.tuning.loss_fn(components.build_loss(
        config, self.tuning.apply_fn(components.apply_fn_of(self.model)), self.schedule))
    self.objective = latents.objective(self.latent, components.build_objective(
        config, components.apply_fn_of(self.model), self.schedule, self.loss_fn, example_shape=self.image_shape))
    self.generate = self.tuning.generate(components.build_generate(config, self.model, self.schedule,
                                                                   channels=self.image_shape[-1]))
    self.optimizer, self.lr_schedule = optim.make_optimizer(num_steps=config.train.num_steps, **config.optim)
    self.optimizer = self.tuning.freeze(self.optimizer)
    self.abstract_state, self.state_shardings = train_state.abstract_state(
        self.init_params, self.optimizer, mesh=self.mesh, rules=config.mesh.rules, **self._create_kwargs())
    self.checkpointer = checkpoint.Checkpointer(self.workdir / 'checkpoints', keep=config.train.keep_checkpoints,
                                                keep_period=config.train.keep_period,
                                                async_checkpointing=config.train.async_checkpointing)
    self._compiled_generate = {}

  def _check_example_fits_model(self, rank: int) -> None:
    """A clip length or waveform length the model cannot take (not a multiple of the DiT's tubelet / patch or of
    the U-Net's downsampling) is a :class:`ConfigError` naming ``data.num_frames`` / ``data.length``."""
    try:
      jax.eval_shape(self.init_backbone, jax.random.PRNGKey(0))
    except ValueError as e:
      key = 'data.length' if rank == 1 else 'data.num_frames'
      raise config_lib.ConfigError(key, f'{self.config.data.name} examples of shape {self.image_shape} do not fit '
                                   f'{self.config.model.name}/{self.config.model.preset}: {e}') from e

  def example_inputs(self, batch_size: int = 1) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    x = jnp.zeros((batch_size, *self.image_shape), jnp.float32)
    cond = None if self.cond_shape is None else jnp.zeros((batch_size, *self.cond_shape), jnp.int32)
    return x, jnp.ones((batch_size,), jnp.float32), cond

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global train batch the loss sees (:meth:`model_batch`), as shapes with the batch sharding."""
    batch_sharding = sharding.batch_sharding(self.mesh)
    b = self.config.train.batch_size
    batch = {'x': jax.ShapeDtypeStruct((b, *self.batch_shape), jnp.float32, sharding=batch_sharding)}
    if self.cond_shape is not None:  # labels [b] or caption ids [b, L]
      batch['cond'] = jax.ShapeDtypeStruct((b, *self.cond_shape), jnp.int32, sharding=batch_sharding)
    return self.tuning.abstract_batch(batch)

  def init_backbone(self, rng: jax.Array) -> Any:
    return self.model.init({'params': rng}, *self.example_inputs(), train=False)['params']

  def init_params(self, rng: jax.Array) -> Any:
    return self.tuning.init_params(rng, self.init_backbone)

  def _create_kwargs(self) -> dict[str, Any]:
    return dict(seed=self.config.seed, num_ema=len(self.config.train.ema_decays),
                frozen_like=self.objective.frozen_like)

  def restore_or_init(self, data_iterator=None, *, step: int | None = None) -> train_state.TrainState:
    state = self.checkpointer.restore(self.abstract_state, data_iterator, step=step)
    if state is not None:
      console.say(f'Resumed from step {int(state.step)} in {self.checkpointer.directory}.',
                  enabled=jax.process_index() == 0)
      return state
    return self.tuning.start(train_state.create(self.init_params, self.optimizer, shardings=self.state_shardings,
                                                initial=self.objective.initial, **self._create_kwargs()))

  def data_iterator(self):
    c = self.config
    return make_iterator(self.tuning.train_source(self), global_batch_size=c.train.batch_size, seed=c.seed,
                         shuffle=True, random_flip=c.data.random_flip, dequantize=c.data.dequantize,
                         worker_count=c.data.worker_count)

  def model_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the loss sees: ``{'x', 'cond'}``, or only ``{'x'}`` for an unconditional model."""
    return self.tuning.model_batch(host_batch if self.cond_shape is not None else {'x': host_batch['x']})

  def sample_params(self, state: train_state.TrainState) -> Any:
    return state.ema_params[components.ema_index(self.config)]

  def generate_fn(self, batch_size: int):
    """Compiled ``generate(params, rng, labels) -> (samples [batch_size, H, W, C] sharded over the batch axes,
    nfe)``: the configured sampler on the model, with guidance.

    Compiled once per batch size (on every process together, see :func:`sharding.compile_on_all_processes`).
    """
    if batch_size not in self._compiled_generate:
      labels_sharding = sharding.batch_sharding(self.mesh)
      conditional = self.cond_shape is not None
      shape = (batch_size, *self.image_shape)

      def run(params, rng, labels):
        out = self.generate(params, rng, labels if conditional else None, shape)
        return out.samples, out.nfe

      jitted = jax.jit(run, in_shardings=(self.state_shardings.params, sharding.replicated(self.mesh),
                                          labels_sharding),
                       out_shardings=(labels_sharding, sharding.replicated(self.mesh)))
      rng = jax.eval_shape(jax.random.PRNGKey, 0)
      labels = jax.ShapeDtypeStruct((batch_size, *(self.cond_shape or ())), jnp.int32)
      self._compiled_generate[batch_size] = latents.decoding(self.latent, sharding.compile_on_all_processes(
          jitted, self.abstract_state.params, rng, labels, name=f'generate_{batch_size}'),
          sharding.replicated(self.mesh))  # latent samples decoded
    return self._compiled_generate[batch_size]

  def grid_labels(self, n: int) -> jax.Array:
    """Labels of a sample grid: classes cycle along rows (column j shows class j mod num_classes); a text model's
    caption ids [n, L] (:meth:`text.TextConditioning.grid_tokens`)."""
    if self.text:
      return jax.device_put(self.text.grid_tokens(n), sharding.batch_sharding(self.mesh))
    num_classes = max(self.config.data.num_classes, 1)
    return jax.device_put(jnp.arange(n, dtype=jnp.int32) % num_classes, sharding.batch_sharding(self.mesh))
