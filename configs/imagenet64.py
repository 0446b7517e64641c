"""Class-conditional ImageNet 64x64 with classifier-free guidance: ADM (default) or a DiT backbone.

Command (every worker of a TPU pod slice / every SLURM task runs the same):
  python -m diffax.main --config configs/imagenet64.py --workdir gs://BUCKET/imagenet64_adm
  python -m diffax.main --config configs/imagenet64.py:dit --workdir gs://BUCKET/imagenet64_dit
  python -m diffax.main --config configs/imagenet64.py:sit --workdir gs://BUCKET/imagenet64_sit
Data: ``imagenet_resized/64x64`` needs the manual download (``Imagenet64_train_part1_npz.zip``,
``Imagenet64_train_part2_npz.zip``, ``Imagenet64_val_npz.zip`` from image-net.org into
``$TFDS_DATA_DIR/downloads/manual``), then ``tfds build imagenet_resized/64x64 --file_format=array_record``.

ADM (Dhariwal & Nichol 2021, table 9 / app. C): the 296 M U-Net with learned variance (iDDPM hybrid loss), cosine
schedule over 1000 steps, dropout 0.1, AdamW lr 1e-4, batch 2048, EMA 0.9999, 540k steps; label dropout 0.1 so the
same model samples unconditionally for guidance (Ho & Salimans 2022). The ``dit`` variant is DiT-B/4 in pixel
space (64x64x3 -> 256 tokens) with adaLN-Zero, lr 1e-4, batch 256, FSDP over 4 devices (mesh.fsdp). Sampling:
DPM-Solver++(2M), 25 steps, guidance 1.5 (a good FID trade-off; scale 1 gives the plain conditional model).
Expect FID ~2.1 at 250 ancestral steps without guidance for ADM (paper: 2.07); DPM-Solver++ at 25 NFE reaches
within ~0.5 of that.

The ``sit`` variant is SiT-B/2 (Ma et al. 2024, "SiT", sec. 3-4: DiT-B/2's 130 M transformer, 12 blocks of
width 768, here on 2x2 pixel patches: 1024 tokens) trained by conditional flow matching on the linear interpolant
(``rectified_flow``, velocity prediction, t ~ U(0, 1)) with SiT's recipe: AdamW lr 1e-4 without weight decay, no
gradient clipping, batch 256, label dropout 0.1, EMA 0.9999, 400k steps (SiT-B's table entries), sampled by SiT's
SDE (``flow_sde``: Euler-Maruyama with w_t = sigma_t, 250 steps). SiT reports 256x256 latent results; there is
no published pixel-space 64x64 number to expect.
"""

from diffax.trainer import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.default_config()
  c.data.name = 'imagenet_resized/64x64'
  c.data.num_classes = 1000
  c.data.random_flip = True
  c.diffusion.schedule = 'cosine'
  c.diffusion.prediction = 'eps'
  c.diffusion.p_uncond = 0.1
  c.optim.optimizer = 'adamw'
  c.optim.learning_rate = 1e-4
  c.optim.grad_clip = 1.0
  c.train.ema_decays = (0.9999,)
  c.train.log_every = 100
  c.train.checkpoint_every = 5_000
  c.train.keep_period = 50_000
  c.train.sample_every = 5_000
  c.train.eval_every = 50_000
  c.sample.sampler = 'dpm_solver'
  c.sample.num_steps = 25
  c.sample.guidance_scale = 1.5
  c.sample.num_samples = 64
  c.eval.metric = 'inception'
  c.eval.batch_size = 512
  c.eval.num_samples_train = 10_000
  variant = (arg or 'adm').split(',')
  if 'sit' in variant:
    c.model.name = 'dit'
    c.model.preset = 'DiT-B/2'
    c.model.dtype = 'bfloat16'
    c.diffusion.schedule = 'rectified_flow'
    c.diffusion.prediction = 'velocity'
    c.diffusion.loss = 'flow'
    c.diffusion.weighting = 'velocity'
    c.diffusion.time_sampling = 'uniform'
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 0.0  # SiT's train.py clips no gradients
    c.train.batch_size = 256
    c.train.num_steps = 400_000
    c.mesh.fsdp = 4
    c.sample.sampler = 'flow_sde'
    c.sample.num_steps = 250
    c.sample.kwargs.diffusion = 'sigma'
  elif 'dit' in variant:
    c.model.name = 'dit'
    c.model.preset = 'DiT-B/4'
    c.model.dtype = 'bfloat16'
    c.diffusion.loss = 'ddpm'
    c.train.batch_size = 256
    c.train.num_steps = 400_000
    c.mesh.fsdp = 4
  else:
    c.model.name = 'unet'
    c.model.preset = 'adm_imagenet64'
    c.model.dtype = 'bfloat16'
    c.diffusion.loss = 'hybrid'
    c.train.batch_size = 2048
    c.train.num_steps = 540_000
  if 'runlocal' in variant:
    config_lib.runlocal(c, preset='dit_tiny' if {'dit', 'sit'} & set(variant) else 'unet_tiny')
  return c
