"""The embedded autoencoder demo: a KL autoencoder on the digits upsampled to 16x16, trained by the trainer.

Command (then the latent demo on it, configs/digits_latent.py):
  python -m diffax.main --config configs/autoencoder_digits.py --workdir workdirs/digits_autoencoder
  python -m diffax.main --config configs/digits_latent.py --workdir workdirs/digits_latent \\
    --config.data.latents.autoencoder=workdirs/digits_autoencoder/autoencoder

The 8x8 digits are resized (bilinear) to 16x16 in the step (``autoencoder.resolution``); the ``small`` preset
(factor 4, 4 latent channels: 16x16x1 -> 4x4x4, 0.95 M parameters) trains for 600 steps with L1 + 1e-6 KL,
Adam(lr 1e-3, b1 0.5, b2 0.9: LDM's betas) at batch 64, EMA 0.999. At the end the run evaluates the 359 held-out
digits (EMA weights, posterior mean): PSNR / SSIM at 16x16 and ``digits_rfd``, the digits classifier's Fréchet
distance between the reconstructions (resized back to 8x8) and their originals, and writes ``workdir/autoencoder/``
(params.npz + autoencoder.json, scaling factor 1 / std of the training latents) for latent diffusion.
``workdir/samples/step_*.png``: rows of held-out originals, each followed by the row of their reconstructions.

``get_config('gan')`` adds the patch discriminator (2 layers, width 16) from update 300 with LDM's adaptive weight
x 0.5. Measured (experiments/results/autoencoder_trainer_digits.md; one run each, 2 CPU cores shared with other
jobs):

  variant                      PSNR (dB)  SSIM   digits_rfd  train rec L1 (last 50)  wall time
  default (no discriminator)   32.65      0.972  0.092       0.055                   469 s
  gan (disc from update 300)   28.18      0.923  0.467       0.125                   1,871 s

At this scale the GAN terms cost reconstruction quality (its adaptive weight climbs from 0.4 to ~7 within 300
updates and the L1 rises from 0.079 to 0.13): LDM starts them after 50,000 updates of a converged autoencoder
and judges them by perceptual quality, not PSNR. ``get_config('runlocal')``: a narrower network, 4 steps, with the
discriminator from update 2 so the tests cover it (``gan,runlocal`` is the same).
"""

from diffax.trainer import config as config_lib


def get_config(arg: str | None = None):
  variant = set((arg or '').split(',')) - {''}
  if variant - {'gan', 'runlocal'}:
    raise ValueError(f'Unknown autoencoder_digits variant {arg!r}; combine gan and runlocal, e.g. "gan,runlocal".')
  c = config_lib.default_config()
  c.data.name = 'digits'
  c.data.num_classes = 0
  c.model.name = 'autoencoder'
  c.model.preset = 'small'
  c.autoencoder.resolution = 16
  c.autoencoder.reconstruction = 'l1'
  c.autoencoder.kl_weight = 1e-6
  c.autoencoder.eval_split = 'test'
  c.autoencoder.scaling_examples = 1438  # the whole training split
  c.optim.optimizer = 'adam'
  c.optim.learning_rate = 1e-3
  c.optim.b1 = 0.5
  c.optim.b2 = 0.9
  c.optim.grad_clip = 0.0
  c.train.num_steps = 600
  c.train.batch_size = 64
  c.train.log_every = 50
  c.train.checkpoint_every = 300
  c.train.eval_every = 600
  c.train.ema_decays = (0.999,)
  c.sample.num_samples = 20  # 2 rows of 10 originals, each above its reconstructions
  c.eval.metric = 'digits'
  c.eval.num_samples = 359  # the whole test split
  c.eval.num_samples_train = 359
  c.eval.batch_size = 64
  if variant:  # 'gan', and 'runlocal' (which covers the discriminator)
    c.autoencoder.update(disc_weight=0.5, disc_start=300, disc_layers=2, disc_ch=16, disc_groups=8)
  if 'runlocal' in variant:
    c.model.overrides.ch = 8
    c.model.overrides.num_groups = 4
    c.autoencoder.update(disc_start=2, disc_ch=8, disc_groups=4, scaling_examples=64)
    c.train.update(num_steps=4, batch_size=8, log_every=1, checkpoint_every=2, eval_every=4)
    c.sample.num_samples = 8
    c.eval.update(num_samples=16, num_samples_train=16, batch_size=8)
  return c
