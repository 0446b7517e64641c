"""LoRA fine-tuning of the ``make run`` digits model to a new style: bold digits (strokes dilated).

Commands (the base first; ``make run`` trains exactly it):
  python -m diffax.main --config configs/digits.py --workdir workdirs/digits
  python -m diffax.main --config configs/digits_lora.py --workdir workdirs/digits_lora

The base's EMA weights are read from ``finetune.base_workdir`` (never written), frozen through optax, and rank-4
adapters on the attention projections and the ResBlock convolutions (23.6 k next to the base's 178 k) train
for 400 steps on ``data.style='bold'`` (260 s on a loaded 2-core CPU). The adapters alone are written to
``workdirs/digits_lora/adapters/lora.npz`` (+ ``.json``) at every checkpoint. Measured (200 samples,
``experiments/finetune_digits.py``): the samples' mean ink moves from the base's 0.313 to 0.597 (real scanned
digits 0.303, bold 0.599) and the digits classifier still gives the class of 70 % of them (of real bold digits:
63 %); merged at weight 0.5 the adapters give ink 0.451.

Sample the base with one or several adapters merged at chosen weights (the samples go to that workdir's
``samples/``; the LoRA run itself samples with its own adapters, plus any given here):
  python -m diffax.main --config configs/digits.py --workdir workdirs/digits --mode sample \\
      --config.finetune.adapters="('workdirs/digits_lora/adapters/lora.npz:0.5',)"

``get_config('runlocal')`` shrinks it to a few steps (tests; pass ``--config.finetune.base_workdir``).
"""

import pathlib

from diffax.trainer import config as config_lib


def get_config(arg: str | None = None):
  # the base's data, model and diffusion: the checkpoint must fit them
  c = config_lib.load_file(pathlib.Path(__file__).with_name('digits.py'), arg)
  c.data.style = 'bold'
  c.finetune.mode = 'lora'
  c.finetune.base_workdir = 'workdirs/digits'
  c.finetune.lora_rank = 4
  c.finetune.lora_alpha = 4.0
  c.finetune.lora_targets = ('attention', 'resblock_convs')
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 20
  c.optim.lr_schedule = 'constant'
  c.train.num_steps = 400
  c.train.checkpoint_every = 200
  c.train.eval_every = 400
  if arg == 'runlocal':
    c.finetune.base_workdir = ''
    c.optim.warmup_steps = 0
    c.train.num_steps = 4
    c.train.checkpoint_every = 2
    c.train.eval_every = 0
  return c
