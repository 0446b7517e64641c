"""A ControlNet on the ``make run`` digits model: samples follow a Sobel edge map of a digit.

Commands (the base first; ``make run`` trains exactly it):
  python -m diffax.main --config configs/digits.py --workdir workdirs/digits
  python -m diffax.main --config configs/digits_controlnet.py --workdir workdirs/digits_controlnet

The base is frozen; a trainable copy of its encoder (started from the base's weights), a small conditioning
encoder and zero-initialised 1x1 convolutions (Zhang et al. 2023) train for 600 steps on the Sobel edge maps of
the training digits (``finetune.control.kind='edges'``; ``'lowres'`` for 2x2 block means), 252 s on a loaded
2-core CPU. At the end the sample grid follows the edge maps of test digits (sample ``i`` gets a digit of class
``i mod 10``); sample with your own control images, [N, 8, 8, 1] in [0, 1] as .npy or a grey .png, at a chosen
conditioning scale:
  python -m diffax.main --config configs/digits_controlnet.py --workdir workdirs/digits_controlnet --mode sample \\
      --config.sample.control=edges.npy --config.sample.control_scale=1.0

Measured (``experiments/finetune_digits.py``, 200 samples): the mean absolute error between a sample's edge map
and the requested one is 0.042, against 0.140 for the uncontrolled base (= this ControlNet at scale 0) and 0.134
for another real digit of the same class; the classifier reads 99.5 % of the samples as their class.
``get_config('runlocal')`` shrinks it to a few steps (tests; pass ``--config.finetune.base_workdir``).
"""

import pathlib

from diffax.trainer import config as config_lib


def get_config(arg: str | None = None):
  # the base's data, model and diffusion: the checkpoint must fit them
  c = config_lib.load_file(pathlib.Path(__file__).with_name('digits.py'), arg)
  c.finetune.mode = 'controlnet'
  c.finetune.base_workdir = 'workdirs/digits'
  c.finetune.control.kind = 'edges'
  c.finetune.control.hint_channels = (16, 16)
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 20
  c.optim.lr_schedule = 'constant'
  c.train.num_steps = 600
  c.train.checkpoint_every = 300
  c.train.eval_every = 600
  c.sample.control_scale = 1.0
  if arg == 'runlocal':
    c.finetune.base_workdir = ''
    c.optim.warmup_steps = 0
    c.train.num_steps = 2
    c.train.checkpoint_every = 2
    c.train.eval_every = 0
  return c
