"""The embedded latent demo: the digits default's diffusion model on the digits autoencoder's latents (LDM).

Commands (the autoencoder first: the trainer writes it to WORKDIR/autoencoder/{params.npz, autoencoder.json}):
  python -m diffax.main --config configs/autoencoder_digits.py --workdir workdirs/digits_autoencoder
  python -m diffax.main --config configs/digits_latent.py --workdir workdirs/digits_latent
  --config.data.latents.autoencoder=DIR points at another saved autoencoder (another run's WORKDIR/autoencoder,
  experiments/autoencoder_digits.py --save DIR, or a diffusers .safetensors with --config.data.latents.preset).

The digits (8x8) are resized to the autoencoder's 16x16 and encoded by its posterior mean into 4x4x4 latents
scaled to unit variance (the saved scaling factor, 1 / std of the training latents: LDM sec. 4.3.2); the split is
encoded once at start into workdir/latents/train/ (``data.latents.mode='cached'``: one shard of its 1,438 records
and a manifest with the autoencoder's sha256 and the sampling rule, diffax.data.latent_cache; a later run or a
resumed one reads it back); ``'on_the_fly'`` encodes every batch inside the step from the run's frozen copy.
The class-conditional ``unet_tiny`` trains with the default's recipe (cosine schedule, v-prediction, guidance 1.5,
DPM-Solver++(2M) 25 steps); samples are decoded and resized back to 8x8, so the grid and the digits metric
(``digits_accuracy``, ``digits_fd`` on 1,000 samples) are those of the pixel default and compare with it directly.

Measured (the autoencoder of experiments/results/autoencoder_digits.md, 600 steps; 1,000 guided samples; 122 s for
the whole run on 2 loaded cores, ~1,100 train images / s against the pixel default's few hundred there):

  what                                              digits_accuracy  digits_fd
  this run (latent unet_tiny, 1,500 steps)          0.962            57.5
  the 359 test digits through the autoencoder       0.953            58.7       (encode, decode, resize to 8x8)
  this run on configs/autoencoder_digits.py's       0.979            48.4       (its default, 600 steps; this
    export (the trainer's, the default path)                                    run 223 s)
  the 359 test digits through that autoencoder      0.975            52.1
  the 8 -> 16 -> 8 resizing alone                   0.975            51.3
  the pixel default (configs/digits.py)             ~0.99            ~8

The latent model matches its autoencoder's reconstructions, and the trainer's autoencoder sits at the resizing's
floor (experiments/results/autoencoder_trainer_digits.md): the gap to the pixel default is the 8 -> 16 -> 8
resizing's, not the diffusion model's or the autoencoder's (an autoencoder of the 8x8 digits themselves would
avoid it; not measured).
``get_config('runlocal')``: a few steps, for the tests (``tests/test_train_latent.py``).
"""

import importlib.util
import pathlib


def _digits_config(arg):
  spec = importlib.util.spec_from_file_location('digits_config', pathlib.Path(__file__).with_name('digits.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str | None = None):
  if arg not in (None, '', 'runlocal'):
    raise ValueError(f'Unknown digits_latent variant {arg!r}; use "" or "runlocal".')
  c = _digits_config(arg)  # the pixel default's model, schedule, recipe and metric (runlocal: shrunk alike)
  c.data.latents.autoencoder = 'workdirs/digits_autoencoder/autoencoder'  # configs/autoencoder_digits.py's export
  c.data.latents.mode = 'cached'
  return c
