"""DDPM on CIFAR-10 (Ho et al. 2020): the paper's settings, unconditional.

Command (one host; the same command on every worker of a pod):
  python -m diffax.main --config configs/cifar10_ddpm.py --workdir gs://BUCKET/cifar10_ddpm
Data: ``tfds build cifar10 --data_dir=$TFDS_DATA_DIR --file_format=array_record`` once.
Evaluation: ``--mode reference`` once with ``--config.eval.reference_stats=cifar10_train.npz`` and
``--config.data.split=train``, then ``--mode eval`` (needs the FID Inception weights, see
``diffax/evaluation/inception_weights.py``).

Settings (paper, sec. 4 and app. B): linear betas 1e-4..0.02 over T = 1000, eps prediction, L_simple; the 35.7 M
U-Net with dropout 0.1; Adam lr 2e-4, batch 128, 5000 warm-up steps, gradient clipping at 1, EMA 0.9999, random
horizontal flips, 800k steps. Expect FID ~3.2 and IS ~9.5 with 1000-step ancestral sampling (paper: 3.17 / 9.46),
~4-5 with 100-step DDIM (Song et al. 2021, table 1). ``get_config('runlocal')`` shrinks it to a CPU smoke run.
"""

from diffax.trainer import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.default_config()
  c.data.name = 'cifar10'
  c.data.num_classes = 0
  c.data.random_flip = True
  c.model.name = 'unet'
  c.model.preset = 'ddpm_cifar10'
  c.diffusion.schedule = 'linear'
  c.diffusion.prediction = 'eps'
  c.diffusion.loss = 'ddpm'
  c.diffusion.weighting = 'eps'
  c.diffusion.p_uncond = 0.0
  c.optim.optimizer = 'adam'
  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 5000
  c.optim.grad_clip = 1.0
  c.train.num_steps = 800_000
  c.train.batch_size = 128
  c.train.log_every = 100
  c.train.checkpoint_every = 10_000
  c.train.keep_period = 100_000
  c.train.sample_every = 10_000
  c.train.eval_every = 50_000
  c.train.ema_decays = (0.9999,)
  c.sample.sampler = 'ddim'
  c.sample.num_steps = 100
  c.sample.num_samples = 64
  c.eval.metric = 'inception'
  c.eval.num_samples = 50_000
  c.eval.num_samples_train = 10_000
  c.eval.batch_size = 500
  if arg == 'runlocal':
    config_lib.runlocal(c, preset='unet_tiny')
  return c
