"""Text-to-digits on a CPU: the 8x8 digits with generated captions, a tiny CLIP text tower trained with the U-Net.

Command:
  python -m diffax.main --config configs/digits_text.py --workdir workdirs/digits_text
  python -m diffax.main --config configs/digits_text.py --workdir workdirs/digits_text --mode sample \\
      --config.sample.prompts='a thin seven;a bold zero;a one leaning right'

Data: ``digits_captions`` (:mod:`diffax.data.captions`): every training digit captioned from its label and the
tertile of its ink mass and slant within its class, e.g. ``a thin seven``, ``a bold zero leaning right`` (90
captions over 16 words, 8 token ids each). Model: ``clip_tiny`` (2 layers of width 64, causal, its final hidden
state as the context) feeding the cross-attention of ``unet_tiny`` at 4x4 (or, with ``--config.model.name=dit
--config.model.preset=dit_tiny``, the PixArt-alpha cross-attention of every DiT block); captions are dropped to the
empty caption 10 % of the time, and sampling guides against the empty caption with weight 1.5 as the digits default.

The end-of-run evaluation draws 1,000 samples from the held-out (test split) captions and reports
``caption_digit_agreement`` (the digits classifier reads the caption's digit; chance 0.1),
``caption_thickness_agreement`` / ``caption_slant_agreement`` (the measured tertile matches the caption's; chance
1/3, real digits 1 by construction) and ``digits_fd``. Measured after 683 of the 2,000 steps (300 samples;
experiments/results/digits_text.md): digit 0.993, thickness 0.867, slant 0.777, digits_fd 12.6 at w = 1.5 (0.940 /
0.780 / 0.663 / 8.1 at w = 1). ``get_config('runlocal')`` is a CPU smoke run of 6 steps.
"""

import pathlib

from diffax.trainer import config as config_lib


def get_config(arg: str | None = None):
  # the digits default's U-Net, v-prediction, optimiser, sampler and guidance; captions instead of labels
  c = config_lib.load_file(pathlib.Path(__file__).with_name('digits.py'), arg)
  c.data.name = 'digits_captions'
  c.data.num_classes = 0  # the condition is the caption
  c.model.text_encoder = 'clip_tiny'
  c.sample.guidance_scale = 1.5  # against the empty caption (also in runlocal: the guided path is tested)
  c.eval.metric = 'captions'
  if arg == 'runlocal':
    c.train.checkpoint_every = 3
    c.train.eval_every = 6
    c.eval.num_samples_train = 32
  else:
    c.train.num_steps = 2000
    c.train.eval_every = 2000
  return c
