"""Audio on a CPU: class-conditional synthetic waveforms (tones, up / down chirps, AM tones; 512 samples at 8 kHz).

Command:
  python -m diffax.main --config configs/audio_tones.py --workdir workdirs/audio_tones

The waveforms are generated deterministically (:mod:`diffax.data.tones`); no download. The backbone is the 1-D
U-Net (``unet1d_tiny``: levels at lengths 512, 256, 128, attention at the last, ``attn_resolutions=(128,)``),
v-prediction on the cosine schedule, DPM-Solver++(2M) with 25 steps. ``workdirs/audio_tones/samples`` holds one WAV per
sample and a grid of their spectrograms; TensorBoard shows them as audio summaries. The evaluation reports the
Fréchet distance in the features of :mod:`diffax.evaluation.tones`' spectrogram classifier and its accuracy.

``get_config('runlocal')`` shrinks everything to a few steps (the end-to-end test runs it).
"""

from diffax.trainer import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.default_config()
  c.data.name = 'tones'
  c.data.length = 512
  c.data.sample_rate = 8000
  c.data.num_classes = 4
  c.model.name = 'unet'
  c.model.preset = 'unet1d_tiny'
  c.model.overrides.attn_resolutions = (128,)
  c.diffusion.schedule = 'cosine'
  c.diffusion.prediction = 'v'
  c.diffusion.loss = 'ddpm'
  c.diffusion.weighting = 'v'
  c.diffusion.p_uncond = 0.1
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 100
  c.optim.lr_schedule = 'cosine'
  c.optim.min_lr_ratio = 0.1
  c.train.num_steps = 1000
  c.train.batch_size = 32
  c.train.log_every = 100
  c.train.checkpoint_every = 500
  c.train.eval_every = 1000
  c.train.ema_decays = (0.999,)
  c.sample.sampler = 'dpm_solver'
  c.sample.num_steps = 25
  c.sample.num_samples = 16
  c.eval.metric = 'tones'
  c.eval.num_samples = 256
  c.eval.num_samples_train = 256
  c.eval.batch_size = 16
  if arg == 'runlocal':
    c.data.length = 128
    c.model.overrides.attn_resolutions = (32,)
    c.train.update(num_steps=4, batch_size=8, log_every=1, checkpoint_every=4, eval_every=4)
    c.optim.warmup_steps = 1
    c.sample.update(num_samples=8, num_steps=3)
    c.eval.update(num_samples=16, num_samples_train=16, batch_size=8)
  return c
