"""Few-step students of the embedded digits default, distilled from the checkpoint ``make run`` writes.

Commands (after ``make run``, which trains the teacher in workdirs/digits):
  python -m diffax.main --config configs/digits_distill.py --workdir workdirs/digits_pd4          # 4-step PD
  python -m diffax.main --config configs/digits_distill.py:progressive_1 --workdir workdirs/digits_pd1
  python -m diffax.main --config configs/digits_distill.py:consistency --workdir workdirs/digits_cd
  --config.distill.teacher_workdir=DIR points at another teacher (same network, schedule and classes).

Variants (``get_config(arg)``, ``arg`` = variant, optionally ``+runlocal``):
  progressive     Salimans & Ho 2022: the guided (w = 1.5, as the teacher samples) 32-step DDIM teacher halved in
                  3 rounds of 600 steps to a 4-step DDIM student (v-prediction, truncated-SNR weight).
  progressive_1   the same, 5 rounds of 600 steps, down to 1 step.
  consistency     consistency distillation (CM Algorithm 2): Heun steps of the guided teacher on an 18-level Karras
                  grid, L2 metric, target EMA 0.95, sampled in one step (``sample.num_steps`` > 1: multistep).
  ict             improved consistency training (no teacher in the loss; initialised from the teacher).
Each ends with the digits metric (1,000 samples: digits_accuracy, digits_fd) as the default does;
``experiments/distill_digits.py`` measures all of them against the teacher at 25 NFE.
"""

import pathlib

from diffax.trainer import config as config_lib

VARIANTS = ('progressive', 'progressive_1', 'consistency', 'ict')


def get_config(arg: str | None = None):
  variant, _, local = (arg or 'progressive').partition('+')
  if variant == 'runlocal':
    variant, local = 'progressive', 'runlocal'
  if variant not in VARIANTS or local not in ('', 'runlocal'):
    raise ValueError(f'Unknown variant {arg!r}; choose one of {VARIANTS}, optionally with "+runlocal".')
  c = config_lib.load_file(pathlib.Path(__file__).with_name('digits.py'))  # the teacher's network, schedule, data
  c.distill.teacher_workdir = 'workdirs/digits'
  c.distill.guidance_scale = 1.0 if variant == 'ict' else 1.5  # the teacher as make run samples it
  c.diffusion.p_uncond = 0.0  # the student learns the guided teacher; it is not guided itself
  c.sample.guidance_scale = 1.0
  c.optim.learning_rate = 2e-4
  c.optim.lr_schedule = 'constant'
  c.optim.warmup_steps = 20
  c.train.log_every = 100
  c.train.checkpoint_every = 600
  if variant.startswith('progressive'):
    c.distill.method = 'progressive'
    c.distill.teacher_steps = 32
    c.sample.sampler = 'ddim'
    c.sample.spacing = 'trailing'
    c.sample.num_steps = 4 if variant == 'progressive' else 1
    c.train.num_steps = 600 * (3 if variant == 'progressive' else 5)
    c.train.ema_decays = (0.99,)  # shorter than a round, so the EMA follows the current round's student
  else:
    c.distill.method = 'consistency_distillation' if variant == 'consistency' else 'consistency_training'
    c.distill.target_ema_decay = 0.95 if variant == 'consistency' else 0.0
    c.train.ema_decays = (0.999, 0.95) if variant == 'consistency' else (0.999,)
    c.sample.sampler = 'consistency'
    c.sample.spacing = ''
    c.sample.num_steps = 1
    c.train.num_steps = 1500
  c.train.eval_every = c.train.num_steps
  if local:
    c.distill.teacher_workdir = ''  # the test sets it
    c.train.update(num_steps=4, batch_size=16, log_every=2, checkpoint_every=2, eval_every=0)
    c.optim.warmup_steps = 1
    c.sample.num_samples = 16
    c.eval.update(num_samples=32, batch_size=16)
    if c.distill.method == 'progressive':
      c.distill.teacher_steps = 8  # 2 rounds of 2 steps: 8 -> 4 -> 2
      c.sample.num_steps = 2
  return c
