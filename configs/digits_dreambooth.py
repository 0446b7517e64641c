"""DreamBooth-style personalisation of the ``make run`` digits model: five bold sevens under a new label.

Commands (the base first; ``make run`` trains exactly it):
  python -m diffax.main --config configs/digits.py --workdir workdirs/digits
  python -m diffax.main --config configs/digits_dreambooth.py --workdir workdirs/digits_dreambooth

The model gets an 11th class, label 10 (the instance token [V]), whose embedding starts as the row of class 7
(the class noun). At the start the base generates 64 sevens (``workdirs/digits_dreambooth/dreambooth/
class_images.png``), and the whole model is fine-tuned for 300 steps on the 5 instance images (the first five
sevens of the training split, drawn bold) and those class images with the prior-preservation loss of Ruiz et al.
2023, eq. 2 (lambda = ``finetune.dreambooth.prior_weight`` = 1). The sample grid's column 10 shows the instance
label: bold sevens; column 7 keeps the base's sevens. Measured (``experiments/finetune_digits.py``, 129 s of
training on a loaded 2-core CPU): label 10 draws mean ink 0.654 (the instances: 0.635), label 7 keeps 0.297 (the
base's sevens: 0.298) and all of its samples are read as 7 by the digits classifier.

``get_config('runlocal')`` shrinks it to a few steps (tests; pass ``--config.finetune.base_workdir``).
"""

import pathlib

from diffax.trainer import config as config_lib


def get_config(arg: str | None = None):
  # the base's model and diffusion: the checkpoint must fit them
  c = config_lib.load_file(pathlib.Path(__file__).with_name('digits.py'), arg)
  c.data.style = 'bold'
  c.data.num_classes = 11  # the base's 10 classes and the instance label 10
  c.finetune.mode = 'full'  # the paper fine-tunes every layer
  c.finetune.base_workdir = 'workdirs/digits'
  c.finetune.dreambooth.class_label = 7
  c.finetune.dreambooth.num_instances = 5
  c.finetune.dreambooth.num_class_images = 64
  c.finetune.dreambooth.prior_weight = 1.0
  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 0
  c.optim.lr_schedule = 'constant'
  c.train.num_steps = 300
  c.train.batch_size = 32
  c.train.checkpoint_every = 300
  c.train.eval_every = 0  # the digits classifier knows no label 10
  c.sample.num_samples = 110  # 10 rows of the 11 labels
  c.eval.metric = ''
  c.eval.batch_size = 110
  if arg == 'runlocal':
    c.finetune.base_workdir = ''
    c.finetune.dreambooth.num_class_images = 8
    c.train.num_steps = 2
    c.train.batch_size = 8
    c.train.checkpoint_every = 2
    c.sample.num_samples = 8
    c.eval.batch_size = 8
  return c
