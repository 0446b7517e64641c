"""Class-conditional ImageNet 256x256 in the latent space of Stable Diffusion's VAE: DiT-XL/2 (Peebles & Xie 2023).

Commands (every worker of a TPU pod slice / every SLURM task runs the same):
  curl -L -o sd-vae-ft-mse.safetensors \\
    https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main/diffusion_pytorch_model.safetensors
  python -m diffax.main --config configs/imagenet256_latent.py --workdir gs://BUCKET/imagenet256_dit_xl2 \\
    --config.data.latents.autoencoder=$PWD/sd-vae-ft-mse.safetensors
  python -m diffax.main --config configs/imagenet256_latent.py --workdir ... --mode eval   # FID on 50,000

The DiT paper's setting (sec. 4, tables 4 and 5): 256x256x3 images -> SD-VAE (``data.latents.preset='sd'``,
converted from diffusers at start, scaling 0.18215) latents 32x32x4, encoded in the step from a posterior sample
(``data.latents.mode='on_the_fly'``, ``sample=True``: DiT's train.py) after a random flip; DiT-XL/2 (28 blocks,
width 1152, 16 heads, 2x2 patches: 256 tokens, adaLN-Zero, 675 M parameters) with learned sigma trained by the
hybrid loss (iDDPM: L_simple + L_vlb) on the linear schedule of 1,000 steps (beta 1e-4 .. 0.02); AdamW lr 1e-4,
no weight decay, no gradient clipping, no warm-up, batch 256, label dropout 0.1, EMA 0.9999, 400k steps (the
400K table entries; FID 2.27 is the 7M-step model). Sampling: 250 ancestral DDPM steps with classifier-free
guidance 1.5 (DiT table 4: FID-50K 2.27 with guidance 1.5 at 7M steps; DiT guides only the first three latent
channels, diffax all four). The samplers use the mean prediction; the learned variance is trained but not read
at sampling (diffax's ancestral step uses the posterior variance beta~_t).

Data: ImageNet 256x256 as a fixed-size TFDS dataset (``data.name``): the trainer's TFDS source needs one image size,
so prepare ADM's center crops at 256 (``center_crop_arr``) into a TFDS dataset first; ``imagenet2012`` itself has
images of varying size and is refused with that message.
``get_config('runlocal')``: DiT-tiny on the same latent shape, a few steps (a CPU smoke run).
"""

from diffax.trainer import config as config_lib


def get_config(arg: str | None = None):
  if arg not in (None, '', 'runlocal'):
    raise ValueError(f'Unknown imagenet256_latent variant {arg!r}; use "" or "runlocal".')
  c = config_lib.default_config()
  c.data.name = 'imagenet2012'
  c.data.num_classes = 1000
  c.data.random_flip = True
  c.data.latents.autoencoder = 'sd-vae-ft-mse.safetensors'
  c.data.latents.preset = 'sd'
  c.data.latents.mode = 'on_the_fly'
  c.data.latents.sample = True
  c.model.name = 'dit'
  c.model.preset = 'DiT-XL/2'
  c.model.dtype = 'bfloat16'
  c.diffusion.schedule = 'linear'
  c.diffusion.prediction = 'eps'
  c.diffusion.loss = 'hybrid'
  c.diffusion.p_uncond = 0.1
  c.optim.optimizer = 'adamw'
  c.optim.learning_rate = 1e-4
  c.optim.weight_decay = 0.0
  c.optim.grad_clip = 0.0
  c.optim.warmup_steps = 0
  c.train.batch_size = 256
  c.train.num_steps = 400_000
  c.train.ema_decays = (0.9999,)
  c.train.log_every = 100
  c.train.checkpoint_every = 5_000
  c.train.keep_period = 50_000
  c.train.sample_every = 5_000
  c.train.eval_every = 50_000
  c.mesh.fsdp = 4
  c.sample.sampler = 'ddpm'
  c.sample.num_steps = 250
  c.sample.guidance_scale = 1.5
  c.sample.num_samples = 64
  c.eval.metric = 'inception'
  c.eval.num_samples = 50_000
  c.eval.num_samples_train = 10_000
  c.eval.batch_size = 512
  if arg == 'runlocal':
    config_lib.runlocal(c, preset='dit_tiny')
  return c
