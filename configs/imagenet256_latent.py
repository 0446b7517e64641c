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

Data: TFDS ``imagenet2012`` (prepared with ``tfds build imagenet2012 --file_format=array_record`` from the manual
download, see diffax.data.sources), its images of varying size brought to 256x256 per record by ADM's
``center_crop_arr`` as DiT's train.py does (``data.resize='center_crop'``, ``data.image_size=256``: BOX halvings
while the short side is >= 512, BICUBIC to a short side of 256, the central crop; diffax.data.transforms), then a
random horizontal flip (``data.random_flip``) before encoding. The Inception reference statistics for FID are of
the same crops: ``--mode reference --config.eval.reference_stats=PATH`` reads the split through the same source.

Encoding once instead of every step (fast-DiT's pre-extracted features, without their flips):
``--config.data.latents.mode=cached --config.data.random_flip=False`` writes the split's latents as shards of
``data.latents.shard_size`` records under ``WORKDIR/latents/train`` (or ``data.latents.cache``, best a local disk:
records are read one at a time) with a manifest of the autoencoder's sha256, the crop and the sampling rule (one
posterior sample per record from ``fold_in(PRNGKey(seed), index)``); every host encodes every P-th shard, a killed
encoding resumes from its finished shards, and a cache of another autoencoder or crop is refused.

``get_config('runlocal')``: DiT-tiny on the same 32x32x4 latents, 4 steps of batch 8 (a CPU smoke run; it still
reads the SD-VAE file). tests/test_train_latent.py runs it on ``tfds.testing.mock_data`` records of varying size,
cropped to 16x16 and encoded by a tiny RGB autoencoder.
"""

from diffax.trainer import config as config_lib


def get_config(arg: str | None = None):
  if arg not in (None, '', 'runlocal'):
    raise ValueError(f'Unknown imagenet256_latent variant {arg!r}; use "" or "runlocal".')
  c = config_lib.default_config()
  c.data.name = 'imagenet2012'
  c.data.num_classes = 1000
  c.data.random_flip = True
  c.data.resize = 'center_crop'
  c.data.image_size = 256
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
