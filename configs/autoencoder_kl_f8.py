"""Stable Diffusion's VAE: LDM's KL-f8 autoencoder (f = 8, 4 latent channels) on ImageNet 256x256.

Command (every worker of a pod slice / every SLURM task runs the same):
  python -m diffax.main --config configs/autoencoder_kl_f8.py --workdir gs://BUCKET/autoencoder_kl_f8 \\
    --config.eval.inception_weights=pt_inception-2015-12-05.npz --config.autoencoder.lpips_weights=lpips_vgg.npz
then latent diffusion on it: ``--config.data.latents.autoencoder=gs://BUCKET/autoencoder_kl_f8/autoencoder``.

LDM's ``configs/autoencoder/autoencoder_kl_32x32x4.yaml`` (CompVis/latent-diffusion a506df5) and the code it names:
  * network (``ddconfig``): ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, no attention but the mid-block's,
    z_channels 4 (``double_z``: mean and log-variance) = ``model.preset='sd'``, 83.65 M parameters;
  * loss (``LPIPSWithDiscriminator``, ``ldm/modules/losses/contperceptual.py``): L1, ``kl_weight`` 1e-6,
    ``disc_start`` 50,001, ``disc_weight`` 0.5, pix2pix's ``NLayerDiscriminator`` (3 layers, width 64; GroupNorm
    here in place of its BatchNorm, 2.77 M parameters), hinge loss, ``disc_factor`` 1. LDM sums the pixel terms per
    image (``torch.sum(nll_loss) / B``) where diffax averages them, so its KL weight is ``1e-6 / (256 256 3)`` here
    for the same balance; the adaptive weight is scale-free. ``perceptual_weight`` 1: LPIPS-VGG v0.1, converted
    once by ``python -m diffax.evaluation.convert_lpips`` (``autoencoder.lpips_weights`` or
    ``$DIFFAX_LPIPS_WEIGHTS``). Its learned output log-variance (``logvar_init`` 0) is not trained here;
  * optimizer (``ldm/models/autoencoder.py``, ``main.py``): Adam(b1 0.5, b2 0.9) for the autoencoder and the
    discriminator at lr = accumulate_grad_batches x ngpu x batch_size x base_learning_rate = 2 x 8 x 12 x 4.5e-6
    = 8.64e-4 (LDM's per-GPU batch 12 and ``accumulate_grad_batches`` 2 on 8 devices, a count its config does not
    fix), constant, no clipping, no EMA in LDM (diffax keeps one at 0.9999 and evaluates and exports it);
  * data: ImageNet train / validation at 256 (LDM's ``ImageNetSRTrain``: rescaled and cropped to 256; here ADM's
    center crop, ``data.resize='center_crop'``).
LDM's config sets no length (Lightning trains until stopped): 150,000 updates here, 100,000 of them with the
discriminator. Evaluation: PSNR, SSIM and rFID (FID Inception features of reconstructions against those of the
originals) on ImageNet validation, LDM table 8's protocol for its autoencoders.
``get_config('runlocal')``: the ``small`` preset on the same data, a few steps (a smoke run).
"""

from diffax.trainer import config as config_lib

LDM_BASE_LEARNING_RATE = 4.5e-6
LDM_IMAGES_PER_UPDATE = 2 * 8 * 12  # accumulate_grad_batches x ngpu x batch_size


def get_config(arg: str | None = None):
  if arg not in (None, '', 'runlocal'):
    raise ValueError(f'Unknown autoencoder_kl_f8 variant {arg!r}; use "" or "runlocal".')
  c = config_lib.default_config()
  c.data.name = 'imagenet2012'
  c.data.resize = 'center_crop'
  c.data.image_size = 256
  c.data.num_classes = 0
  c.model.name = 'autoencoder'
  c.model.preset = 'sd'
  c.autoencoder.reconstruction = 'l1'
  c.autoencoder.kl_weight = 1e-6 / (256 * 256 * 3)
  c.autoencoder.disc_weight = 0.5
  c.autoencoder.disc_start = 50_001
  c.autoencoder.disc_layers = 3
  c.autoencoder.disc_ch = 64
  c.autoencoder.disc_groups = 32
  c.autoencoder.perceptual_weight = 1.0
  c.autoencoder.eval_split = 'validation'
  c.optim.optimizer = 'adam'
  c.optim.learning_rate = LDM_IMAGES_PER_UPDATE * LDM_BASE_LEARNING_RATE
  c.optim.b1 = 0.5
  c.optim.b2 = 0.9
  c.optim.grad_clip = 0.0
  c.optim.grad_accum_steps = 2
  c.train.batch_size = LDM_IMAGES_PER_UPDATE // 2
  c.train.num_steps = 2 * 150_000  # train steps are micro-batches: 150,000 updates
  c.train.ema_decays = (0.9999,)
  c.train.log_every = 100
  c.train.checkpoint_every = 5_000
  c.train.keep_period = 50_000
  c.train.sample_every = 5_000
  c.train.eval_every = 50_000
  c.sample.num_samples = 16
  c.eval.metric = 'inception'
  c.eval.num_samples = 50_000
  c.eval.num_samples_train = 5_000
  c.eval.batch_size = 256
  if arg == 'runlocal':
    config_lib.runlocal(c, preset='small')
    c.autoencoder.disc_start = 2
    c.autoencoder.disc_ch = 8
    c.autoencoder.disc_groups = 4
    c.autoencoder.scaling_examples = 16
    c.optim.grad_accum_steps = 1
    c.autoencoder.perceptual_weight = 0.0  # no LPIPS file on a laptop
    c.eval.metric = ''
  return c
