"""EDM on CIFAR-10 (Karras et al. 2022, config F of table 2): DDPM++ with EDM preconditioning, loss and sampler.

Command:
  python -m diffax.main --config configs/cifar10_edm.py --workdir gs://BUCKET/cifar10_edm
  (``--config configs/cifar10_edm.py:cond`` for the class-conditional variant.)
Data: ``tfds build cifar10 --data_dir=$TFDS_DATA_DIR --file_format=array_record`` once.

Settings (EDM app. F.2, table 7): sigma_data 0.5, ln sigma ~ N(-1.2, 1.2^2), lambda = 1 / c_out^2, the 56-62 M
DDPM++ U-Net fed c_noise = ln(sigma) / 4 through a positional embedding (t_scale 1), dropout 0.13; Adam lr 1e-3,
batch 512, warm-up over 10 Mimg (19.5k steps), 200 Mimg (390k steps), EMA half-life 500 kimg (decay 0.99929 per
step at batch 512), horizontal flips (the paper's non-leaking augmentation is not used). Sampling: Heun, 18 steps
(35 NFE), rho 7. Expect FID ~2.0 unconditional / ~1.8 conditional (paper: 1.97 / 1.79, with augmentation).
"""

from diffax.trainer import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.default_config()
  c.data.name = 'cifar10'
  c.data.num_classes = 10 if arg == 'cond' else 0
  c.data.random_flip = True
  c.model.name = 'unet'
  c.model.preset = 'ddpmpp_cifar10'
  c.model.overrides.t_scale = 1.0
  c.model.overrides.dropout = 0.13
  c.diffusion.schedule = 'edm'
  c.diffusion.prediction = 'edm'
  c.diffusion.loss = 'edm'
  c.diffusion.weighting = 'edm'
  c.diffusion.sigma_data = 0.5
  c.diffusion.p_uncond = 0.0
  c.optim.optimizer = 'adam'
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 19_531
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.grad_clip = 0.0
  c.train.num_steps = 390_625
  c.train.batch_size = 512
  c.train.checkpoint_every = 10_000
  c.train.keep_period = 50_000
  c.train.sample_every = 10_000
  c.train.eval_every = 50_000
  c.train.ema_decays = (0.99929,)
  c.sample.sampler = 'edm_heun'
  c.sample.num_steps = 18
  c.sample.num_samples = 64
  c.eval.metric = 'inception'
  c.eval.batch_size = 500
  c.eval.num_samples_train = 10_000
  if arg == 'runlocal':
    config_lib.runlocal(c, preset='unet_tiny')
  return c
