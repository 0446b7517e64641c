"""Latent diffusion in the trainer (Rombach et al. 2022): the diffusion model trains on an autoencoder's latents.

``data.latents.autoencoder`` names a frozen KL autoencoder (:class:`diffax.models.autoencoder.AutoencoderKL`):
either a directory written by :func:`save_autoencoder` (``autoencoder.json`` + ``params.npz``: an autoencoder run's
``WORKDIR/autoencoder``, :mod:`diffax.trainer.autoencoder_train`, or that workdir itself; or by
``experiments/autoencoder_digits.py --save``) or a diffusers ``AutoencoderKL`` ``.safetensors`` converted at load
(``data.latents.preset`` gives its architecture, e.g. ``'sd'``). The model sees

  z = scaling_factor * (E(x) - shift_factor)       (LDM sec. 4.3.2; E(x) the posterior mean, or a sample)

of shape ``autoencoder latent_shape``; images are resized (bilinear) to the autoencoder's input size first when the
data has another, and decoded samples are resized back, so samples and evaluation have the data's shape.

``data.latents.mode``:
  * ``'on_the_fly'``: every train batch is encoded inside the jitted step; the encoder is a frozen extra of the
    run (``TrainState.frozen['autoencoder']``, :class:`diffax.trainer.objective.Objective`), checkpointed with it;
    ``data.latents.sample=True`` draws z from the posterior afresh each step.
  * ``'cached'``: the split is encoded once at start (deterministically: the posterior mean, or one sample per
    record from ``fold_in(PRNGKey(seed), record index)``) into shards of ``data.latents.shard_size`` records in
    the directory ``data.latents.cache`` (default ``workdir/latents/<split>``), with a manifest recording the
    autoencoder's sha256, the data, the preprocessing and the sampling rule (:mod:`diffax.data.latent_cache`):
    an interrupted encoding resumes from its finished shards, processes share the shards, and a cache of another
    encoding is a :class:`ConfigError`. The pipeline then reads latents lazily (records ``{'latent', 'label'}``).

Sampling runs in latent space and the samples are decoded (:meth:`LatentSpace.decode`) before they are written
or evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
import concurrent.futures
import dataclasses
import hashlib
import json
import re
from typing import Any

from etils import epath
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffax.data import latent_cache
from diffax.models import autoencoder as autoencoder_lib
from diffax.trainer.config import ConfigError
from diffax.trainer.objective import Objective

Array = jax.Array
Params = Any
MODES = ('on_the_fly', 'cached')
META = 'autoencoder.json'
PARAMS = 'params.npz'


def defaults() -> dict[str, Any]:
  """The ``data.latents`` section of :func:`diffax.trainer.config.default_config`."""
  return dict(
      autoencoder='',  # '' (pixel space), a save_autoencoder directory or a diffusers AutoencoderKL .safetensors
      preset='',  # a .safetensors file's architecture (diffax.models.autoencoder.AUTOENCODER_PRESETS, e.g. 'sd')
      mode='on_the_fly',  # 'on_the_fly' (encode each batch in the step) or 'cached' (encode the split once)
      sample=False,  # z from the posterior (True) or its mean (False)
      cache='',  # 'cached': the latent cache directory; '' = workdir/latents/<split>
      shard_size=10_000,  # 'cached': records per shard (the unit of resuming and of splitting among processes)
  )


def file_sha256(path: str | epath.Path) -> str:
  return hashlib.sha256(epath.Path(path).read_bytes()).hexdigest()


def save_autoencoder(directory: str | epath.Path, params: Params, *, preset: str, fields: dict[str, Any],
                     input_shape: tuple[int, ...], note: str = '') -> dict[str, Any]:
  """Writes ``directory/params.npz`` (flat ``'encoder/conv_in/kernel'`` names) and ``directory/autoencoder.json``
  (preset, field overrides, input shape [H, W, C], latent shape [h, w, c], scaling / shift factors, the sha256 of
  the params file); returns the JSON record."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nn.meta.unbox(params), sep='/').items()}
  with (directory / PARAMS).open('wb') as f:
    np.savez(f, **flat)
  model = autoencoder_lib.get_autoencoder(preset, **fields)
  f = model.downsampling_factor
  record = {'preset': preset, 'fields': fields, 'input_shape': list(input_shape),
            'latent_shape': [input_shape[0] // f, input_shape[1] // f, model.latent_channels],
            'scaling_factor': model.scaling_factor, 'shift_factor': model.shift_factor,
            'sha256': file_sha256(directory / PARAMS), 'note': note}
  (directory / META).write_text(json.dumps(record, indent=2))
  return record


def _read_saved(directory: epath.Path) -> tuple[autoencoder_lib.AutoencoderKL, Params, dict[str, Any]]:
  record = json.loads((directory / META).read_text())
  if file_sha256(directory / PARAMS) != record['sha256']:
    raise ConfigError('data.latents.autoencoder', f'{directory / PARAMS} does not have the sha256 recorded in '
                      f'{directory / META}; the directory was changed after it was saved: save it again.')
  with (directory / PARAMS).open('rb') as f:
    flat = dict(np.load(f))
  model = autoencoder_lib.get_autoencoder(record['preset'], **record['fields'])
  return model, traverse_util.unflatten_dict(flat, sep='/'), record


@dataclasses.dataclass(frozen=True)
class LatentSpace:
  """A frozen autoencoder between the data and the diffusion model.

  Attributes:
    model: the autoencoder; ``params`` its parameters (host arrays).
    data_shape: examples of the data [H, W, C]; ``input_shape``: what the autoencoder was trained on (images are
      resized between the two); ``latent_shape``: the diffusion model's examples [h, w, c].
    sha256: of the autoencoder's params file (recorded with cached latents and in evaluation protocols).
    mode, sample: ``data.latents.mode`` / ``.sample``.
  """
  model: autoencoder_lib.AutoencoderKL
  params: Params
  data_shape: tuple[int, ...]
  input_shape: tuple[int, ...]
  latent_shape: tuple[int, ...]
  sha256: str
  mode: str
  sample: bool

  def encode(self, params: Params, x: Array, rng: Array | None = None) -> Array:
    """Images [B, *data_shape] in [-1, 1] -> latents ``scaling_factor (z - shift_factor)`` [B, *latent_shape];
    z is the posterior mean, or a sample with ``rng``."""
    if x.shape[1:] != self.input_shape:
      x = jax.image.resize(x, (x.shape[0], *self.input_shape), 'bilinear')
    return self.model.apply({'params': params}, x, rng, method='encode_latents')

  def decode(self, params: Params, latents: Array) -> Array:
    """Latents [B, *latent_shape] -> images [B, *data_shape] (float32; resized back where the sizes differ)."""
    x = self.model.apply({'params': params}, latents, method='decode_latents')
    if x.shape[1:] != self.data_shape:
      x = jax.image.resize(x, (x.shape[0], *self.data_shape), 'bilinear')
    return x

  def protocol(self) -> dict[str, Any]:
    """What evaluation results record about the latent space."""
    return {'latents_autoencoder_sha256': self.sha256, 'latents_mode': self.mode, 'latents_sample': self.sample,
            'latent_shape': list(self.latent_shape), 'scaling_factor': self.model.scaling_factor}


def validate(config: ml_collections.ConfigDict) -> None:
  """The ``data.latents`` keys on their own (the files are read by :func:`from_config`)."""
  lat = config.data.latents
  if lat.mode not in MODES:
    raise ConfigError('data.latents.mode', f'{lat.mode!r} is not one of {MODES}.')
  if not lat.autoencoder:
    changed = [k for k, v in defaults().items() if k != 'autoencoder' and lat[k] != v]
    if changed:
      raise ConfigError('data.latents.autoencoder', f'data.latents.{changed[0]} is set but no autoencoder: set '
                        'data.latents.autoencoder to a saved autoencoder directory (python experiments/'
                        'autoencoder_digits.py --save DIR) or a diffusers AutoencoderKL .safetensors.')
    return
  for augmentation in ('random_flip', 'dequantize'):
    if lat.mode == 'cached' and config.data[augmentation]:
      raise ConfigError(f'data.{augmentation}', "cached latents are of the images as stored; use data.latents."
                        f"mode='on_the_fly' (augments before encoding) or {augmentation}=False.")
  for key in ('cache', 'shard_size'):
    if lat.mode != 'cached' and lat[key] != defaults()[key]:
      raise ConfigError(f'data.latents.{key}', "is read by data.latents.mode='cached' only.")
  if lat.shard_size < 1:
    raise ConfigError('data.latents.shard_size', f'must be positive, got {lat.shard_size}.')


def from_config(config: ml_collections.ConfigDict, data_shape: tuple[int, ...]) -> LatentSpace | None:
  """The configured latent space for data of shape ``data_shape``, or None in pixel space.

  Raises:
    ConfigError: a missing or altered file, a ``.safetensors`` without ``data.latents.preset``, data that are not
      images or whose channels differ from the autoencoder's.
  """
  lat = config.data.latents
  validate(config)
  if not lat.autoencoder:
    return None
  path = epath.Path(lat.autoencoder)
  if not (path / META).exists() and (path / 'autoencoder' / META).exists():
    path = path / 'autoencoder'  # an autoencoder run's workdir (diffax.trainer.autoencoder_train): its export
  key = 'data.latents.autoencoder'
  if len(data_shape) != 3:
    raise ConfigError(key, f'latent diffusion takes images [H, W, C]; {config.data.name} has examples of shape '
                      f'{data_shape}.')
  if path.is_dir() and (path / META).exists():
    model, params, record = _read_saved(path)
    input_shape, sha256 = tuple(record['input_shape']), record['sha256']
  elif path.suffix == '.safetensors':
    from diffax.models import convert  # pylint: disable=g-import-not-at-top
    if not lat.preset:
      raise ConfigError('data.latents.preset', f'{path} is a diffusers checkpoint: name its architecture, one of '
                        f'{sorted(autoencoder_lib.AUTOENCODER_PRESETS)} (e.g. sd for sd-vae-ft-mse).')
    try:
      model, params = convert.load_autoencoder(path, preset=lat.preset, in_channels=data_shape[-1])
    except FileNotFoundError as e:
      raise ConfigError(key, str(e)) from e
    except ValueError as e:
      raise ConfigError('data.latents.preset', str(e)) from e
    input_shape, sha256 = tuple(data_shape), file_sha256(path)
  else:
    what = 'does not exist' if not path.exists() else f'is not a saved autoencoder directory (no {META})'
    raise ConfigError(key, f'{path} {what}: train one (python -m diffax.main --config configs/autoencoder_digits.py '
                      '--workdir DIR, then DIR or DIR/autoencoder), write one with python experiments/'
                      'autoencoder_digits.py --save DIR, or '
                      'give a diffusers AutoencoderKL .safetensors with data.latents.preset (published VAEs: '
                      'diffax.models.convert.autoencoder_kl.how_to_get).')
  if input_shape[-1] != data_shape[-1]:
    raise ConfigError(key, f'the autoencoder takes {input_shape[-1]}-channel images, {config.data.name} has '
                      f'{data_shape[-1]} channels; train or pick an autoencoder for this data.')
  f = model.downsampling_factor
  if input_shape[0] % f or input_shape[1] % f:
    raise ConfigError(key, f'{input_shape[:2]} images are not divisible by the autoencoder\'s factor {f}.')
  latent_shape = (input_shape[0] // f, input_shape[1] // f, model.latent_channels)
  return LatentSpace(model, params, tuple(data_shape), input_shape, latent_shape, sha256, lat.mode, lat.sample)


def check_model(config: ml_collections.ConfigDict, space: LatentSpace, init_backbone: Callable[[Array], Params],
                example_inputs: Callable[[], tuple[Array, ...]], apply: Callable[..., Array]) -> None:
  """The backbone must take latents [h, w, c] and predict ``c`` channels (2 c with learned variance): otherwise
  a :class:`ConfigError` naming ``data.latents.autoencoder``, before any step."""
  try:
    params = jax.eval_shape(init_backbone, jax.random.PRNGKey(0))
    out = jax.eval_shape(lambda p, args: apply(p, *args), params, example_inputs())
  except (ValueError, TypeError) as e:
    raise ConfigError('data.latents.autoencoder', f'latents of shape {space.latent_shape} do not fit '
                      f'{config.model.name}/{config.model.preset}: {e}') from e
  channels = space.latent_shape[-1] * (2 if config.diffusion.loss == 'hybrid' else 1)
  if out.shape[-1] != channels:
    raise ConfigError('data.latents.autoencoder', f'the autoencoder has {space.latent_shape[-1]} latent channels '
                      f'but {config.model.name} predicts {out.shape[-1]} (model.overrides.out_channels?); they must '
                      'match: drop the override or pick an autoencoder with that many channels.')


def objective(space: LatentSpace | None, base: Objective) -> Objective:
  """``base`` on latents encoded in the step (mode ``'on_the_fly'``): the autoencoder is the frozen extra
  ``frozen['autoencoder']`` beside ``base``'s own; any other mode (or pixel space) returns ``base``."""
  if space is None or space.mode != 'on_the_fly':
    return base

  def loss_at(step, frozen, ema_params):
    inner = base.loss_at(step, {k: v for k, v in frozen.items() if k != 'autoencoder'}, ema_params)

    def loss_fn(params, batch, rng):
      rng_z, rng = jax.random.split(rng)
      z = space.encode(frozen['autoencoder'], batch['x'], rng_z if space.sample else None)
      return inner(params, {**batch, 'x': jax.lax.stop_gradient(z)}, rng)

    return loss_fn

  def frozen_like(params):  # shapes only: `initial` places the saved weights, restores read the checkpoint's
    return {**(base.frozen_like(params) if base.frozen_like else {}),
            'autoencoder': jax.tree.map(lambda w: jnp.zeros(w.shape, w.dtype), space.params)}

  def update_frozen(step, params, frozen):
    if base.update_frozen is None:
      return frozen
    rest = base.update_frozen(step, params, {k: v for k, v in frozen.items() if k != 'autoencoder'})
    return {**rest, 'autoencoder': frozen['autoencoder']}

  def initial(abstract):
    params, frozen = base.initial(abstract) if base.initial is not None else (None, {})
    return params, {**frozen, 'autoencoder': space.params}

  return Objective(loss_at=loss_at, frozen_like=frozen_like, initial=initial, update_frozen=update_frozen)


def decoding(space: LatentSpace | None, generate: Callable[..., tuple[Array, Array]],
             replicated: jax.sharding.Sharding) -> Callable[..., tuple[Array, Array]]:
  """``generate(params, rng, labels) -> (samples, nfe)`` with the latent samples decoded to images
  [B, *data_shape] (one more compiled program; the autoencoder's params, placed ``replicated`` over the mesh, are
  its argument, not constants)."""
  if space is None:
    return generate
  decode = jax.jit(space.decode)
  params = jax.device_put(space.params, replicated)

  def run(*args):
    latents, nfe = generate(*args)
    return decode(params, latents), nfe

  return run


def _encoding(config: ml_collections.ConfigDict, space: LatentSpace) -> dict[str, Any]:
  """What a cache's latents are of and how they were made (its manifest's ``encoding``)."""
  d = config.data
  sampling = (f'posterior_sample: mean + std * normal(fold_in(PRNGKey({config.seed}), record index))'
              if space.sample else 'posterior_mean')
  return {'autoencoder_sha256': space.sha256, 'data': d.name, 'split': d.split, 'style': d.style,
          'preprocessing': {'resize': d.resize, 'image_size': d.image_size, 'pixels': 'u / 127.5 - 1',
                            'bilinear_to': list(space.input_shape) if space.input_shape != space.data_shape else None},
          'latent_shape': list(space.latent_shape), 'scaling_factor': space.model.scaling_factor,
          'shift_factor': space.model.shift_factor, 'sampling': sampling}


def _shard_encoder(space: LatentSpace, source: Any, seed: int, batch_size: int) -> Callable[[int, int], dict]:
  """``encode(start, stop) -> {'latent': float32 [n, h, w, c], 'label' / 'tokens': [n, ...]}`` of records
  [start, stop), in batches of ``batch_size`` from ``start`` (the last one padded), so a shard's latents depend
  on its records only; a posterior sample of record ``i`` is drawn from ``fold_in(PRNGKey(seed), i)``."""
  key = jax.random.PRNGKey(seed)

  def encode_batch(params, x, index):
    if not space.sample:
      return space.encode(params, x)
    return jax.vmap(lambda x1, i: space.encode(params, x1[None], jax.random.fold_in(key, i))[0])(x, index)

  encode_batch = jax.jit(encode_batch)
  params = jax.device_put(space.params)

  def encode(start, stop):
    fields = {}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      for first in range(start, stop, batch_size):
        index = np.arange(first, min(first + batch_size, stop))
        records = list(pool.map(source.__getitem__, index))
        padded = np.concatenate([index, np.full(batch_size - len(index), index[-1])])
        x = np.stack([records[i - first]['image'] for i in padded]).astype(np.float32) / np.float32(127.5) - 1
        latent = np.asarray(encode_batch(params, jnp.asarray(x), jnp.asarray(padded, jnp.int32)))[:len(index)]
        fields.setdefault('latent', []).append(latent)
        for name in ('label', 'tokens'):
          if name in records[0]:
            fields.setdefault(name, []).append(np.stack([np.asarray(r[name]) for r in records]))
    return {k: np.concatenate(v) for k, v in fields.items()}

  return encode


def cache_directory(config: ml_collections.ConfigDict, workdir: epath.Path) -> epath.Path:
  """``data.latents.cache``, or ``workdir/latents/<split>`` (the split's name with ``[:%]`` made ``_``)."""
  if config.data.latents.cache:
    return epath.Path(config.data.latents.cache)
  return workdir / 'latents' / re.sub(r'[^\w.-]', '_', config.data.split)


def cached_source(config: ml_collections.ConfigDict, space: LatentSpace, source: Any, workdir: epath.Path,
                  *, batch_size: int = 256) -> latent_cache.ShardedSource:
  """The split encoded once (mode ``'cached'``) into shards of ``data.latents.shard_size`` records under
  :func:`cache_directory` (:mod:`diffax.data.latent_cache`: resumable, atomically written shards, process ``p``
  of ``P`` encoding shards ``i % P == p``, all waiting for the complete manifest), or read from there if it was
  written for this autoencoder, data, preprocessing and sampling rule; records ``{'latent', 'label'}`` read
  lazily.

  Raises:
    ConfigError: the directory records another encoding (``data.latents.cache``) or shard size
      (``data.latents.shard_size``); ``data.latents.cache`` is a file (a single-file cache of an earlier diffax).
  """
  directory = cache_directory(config, workdir)
  if directory.is_file():
    raise ConfigError('data.latents.cache', f'{directory} is a file; latent caches are directories of shards '
                      f'({latent_cache.MANIFEST} + shard-*.npy): delete it (the split is encoded again) or point '
                      'data.latents.cache at a directory.')
  try:
    latent_cache.write(directory, encoding=_encoding(config, space), num_records=len(source),
                       records_per_shard=config.data.latents.shard_size,
                       encode=_shard_encoder(space, source, config.seed, batch_size),
                       process_index=jax.process_index(), process_count=jax.process_count())
  except latent_cache.CacheMismatchError as e:
    key = 'data.latents.shard_size' if set(e.diff) == {'records_per_shard'} else 'data.latents.cache'
    raise ConfigError(key, f'{e}: another autoencoder, data, preprocessing or sampling rule. Delete the directory '
                      'or point data.latents.cache elsewhere.') from e
  return latent_cache.ShardedSource(directory)


def wrap_source(config: ml_collections.ConfigDict, space: LatentSpace | None, source: Any,
                workdir: epath.Path) -> tuple[Any, tuple[int, ...] | None]:
  """``(source, batch_shape)``: what the pipeline reads and the shape of its ``x`` examples: the cached latents
  (mode ``'cached'``) or the images themselves (``None``: unchanged)."""
  if space is None or space.mode != 'cached':
    return source, None
  return cached_source(config, space, source, workdir), space.latent_shape
