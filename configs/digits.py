"""The embedded default: class-conditional 8x8 digits (scikit-learn's bundled 1,797 images) on a CPU.

Command (``make run`` runs exactly this):
  python -m diffax.main --config configs/digits.py --workdir workdirs/digits

Expect about 3-4 minutes on a 2-core CPU (~1 min of it compiling); the v-MSE falls from ~1 to ~0.1. At the end
the run evaluates 1,000 guided samples with the digits classifier (``diffax.evaluation.digits``; held-out
accuracy 98.9 %) and logs ``digits_accuracy`` ~0.99 (samples classified as the class they were drawn for) and
``digits_fd`` ~8 (Fréchet distance of classifier features to the real test digits; other real digits score
~3.6, noise ~260). ``workdirs/digits`` holds the checkpoints, TensorBoard logs (``tensorboard --logdir
workdirs``), ``samples/step_00001500.png`` (one column per class 0-9) and ``eval/*.json``.

Tuned by measurement on this 2-core CPU (1,000 samples each, DPM-Solver++(2M) 25 steps = 25 NFE):

  run                                      train s  digits_accuracy  digits_fd  note
  unet_small (1.9 M), batch 128             -        -                -          0.5 steps/s: 1 h for 2,000 steps
  unet_tiny, eps, guidance 1                170      0.593            6.8e6      eps -> x0 blows up near t = 1
  unet_tiny, eps, clip_x0 1, guidance 1     170      0.770            6.1
  unet_tiny, eps, clip_x0 1, guidance 2     170      0.963            8.1
  unet_tiny, v, guidance 1                  170      0.937            5.0
  unet_tiny, v, guidance 1.5 (this config)  170      0.994            8.0
  unet_tiny, v, guidance 2                  170      0.999            13.7       less varied

The table's scores are of the sampler as it was then (DPM-Solver++ jumping to x0 at the end, its grid from t = 1).
With the current defaults (steps end at t_min, log-SNR grids start at log-SNR -8.76, ``base.default_start`` of
``diffax.diffusion.samplers``) a fresh run of this config scores digits_fd 7.8 at 25 NFE, 7.5 at 10 and 9.8 at 5;
iPNDM's defaults (``--config.sample.sampler=ipndm``) 7.3 at 10 and 9.0 at 5
(``experiments/results/few_step_digits.md``).

v-prediction keeps x0 = alpha_t x_t - sigma_t v bounded at high noise, where an eps model's x0 = (x_t - sigma_t
eps) / alpha_t amplifies its errors by 1 / alpha_t; guidance 1.5 buys the accuracy for a little diversity.
``get_config('runlocal')`` shrinks everything to a few steps (a CPU smoke run, as the other configs' ``runlocal``).

``get_config('flow')`` (``--config configs/digits.py:flow``; ``flow,runlocal`` shrinks it) trains rectified flow
instead: the linear interpolant (``rectified_flow``), velocity prediction and the conditional flow-matching loss with
t ~ U(0, 1), sampled with 25 flow Euler steps; model, optimizer, steps and guidance as above. Measured by
``experiments/flow_digits.py`` (``experiments/results/flow_digits.md``, 1,000 samples): digits_accuracy 0.997 and
digits_fd 8.4 at 25 NFE, next to 0.993 / 7.8 for this default with DPM-Solver++ at equal steps.
"""

from diffax.trainer import config as config_lib


def get_config(arg: str | None = None):
  c = config_lib.default_config()
  c.data.name = 'digits'
  c.data.num_classes = 10
  c.model.name = 'unet'
  c.model.preset = 'unet_tiny'
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
  c.train.batch_size = 64
  c.train.log_every = 100
  c.train.checkpoint_every = 500
  c.train.eval_every = 1500
  c.train.ema_decays = (0.999,)
  c.sample.sampler = 'dpm_solver'
  c.sample.num_steps = 25
  c.sample.guidance_scale = 1.5
  c.sample.num_samples = 100
  c.eval.metric = 'digits'
  c.eval.num_samples = 1000
  c.eval.num_samples_train = 1000
  c.eval.batch_size = 100  # = sample.num_samples: one compiled sampler serves the grid and the evaluation
  variant = (arg or '').split(',')
  if set(variant) - {'', 'flow', 'runlocal'}:
    raise ValueError(f'Unknown digits variant {arg!r}; combine flow and runlocal, e.g. "flow,runlocal".')
  if 'flow' in variant:
    c.diffusion.schedule = 'rectified_flow'
    c.diffusion.prediction = 'velocity'
    c.diffusion.loss = 'flow'
    c.diffusion.weighting = 'velocity'
    c.diffusion.time_sampling = 'uniform'
    c.sample.sampler = 'flow_euler'
  if 'runlocal' in variant:
    c.train.num_steps = 6
    c.train.batch_size = 16
    c.train.log_every = 2
    c.train.checkpoint_every = 2
    c.train.eval_every = 0
    c.optim.warmup_steps = 2
    c.sample.num_samples = 16
    c.sample.num_steps = 4
    c.sample.guidance_scale = 1.0
    c.eval.num_samples = 32
    c.eval.batch_size = 16
  return c
