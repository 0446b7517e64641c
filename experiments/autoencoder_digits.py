"""Autoencoder on the embedded digits: held-out reconstruction metrics while training, and throughput.

A hand-written loop kept as the encode / decode / train-step throughput benchmark; the trainer trains the same
autoencoder with checkpoints, EMA, evaluation and export: ``python -m diffax.main --config
configs/autoencoder_digits.py --workdir DIR`` (writes ``DIR/autoencoder`` for ``data.latents.autoencoder``).

  python experiments/autoencoder_digits.py [--steps 600] [--disc-start 300] [--out experiments/results/...md]
      [--save DIR]

The 8x8 digits (``diffax.data.digits``) are upsampled (bilinear) to 16x16 in [-1, 1]; the ``small`` autoencoder
preset (factor 4, 4 latent channels: 16x16x1 -> 4x4x4) trains with L1 + 1e-6 KL (LDM's KL-f8 weights) and, from
``--disc-start`` (0 = never), the patch discriminator with the adaptive weight (``diffax.models.autoencoder_loss``),
Adam(lr 1e-3, b1 0.5, b2 0.9) at batch 64. Printed: PSNR / SSIM on the 359 held-out digits from the posterior
mean, and the encode / decode / train-step throughput on this machine. ``--save DIR`` writes the trained
autoencoder for latent diffusion (``diffax.trainer.latents.save_autoencoder``: params.npz + autoencoder.json, used
as ``--config.data.latents.autoencoder=DIR``) with the latent scaling factor set to 1 / std of the training
digits' posterior means (LDM sec. 4.3.2), so the diffusion model sees latents of unit variance.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffax.data.digits import load_digits
from diffax.evaluation import reconstruction
from diffax.models import autoencoder, autoencoder_loss
from diffax.trainer import latents


def images(split: str) -> jax.Array:
  x = load_digits(split)[0].astype(np.float32) / 127.5 - 1.0
  return jax.image.resize(jnp.asarray(x), (x.shape[0], 16, 16, 1), 'bilinear')


def rate(fn, *args, n: int) -> float:
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(3):
    jax.block_until_ready(fn(*args))
  return 3 * n / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--disc-start', type=int, default=0)
  parser.add_argument('--every', type=int, default=150)
  parser.add_argument('--out', default='')
  parser.add_argument('--save', default='', help='directory for the trained autoencoder (params.npz + json)')
  args = parser.parse_args()
  train, test = images('train'), images('test')
  model = autoencoder.get_autoencoder('small', in_channels=1)
  disc = autoencoder_loss.PatchDiscriminator(ch=16, num_layers=2, num_groups=8) if args.disc_start else None
  rng = jax.random.key(0)
  params = {'autoencoder': nn.meta.unbox(model.init(rng, train[:1])['params'])}
  if disc is not None:
    params['discriminator'] = nn.meta.unbox(disc.init(rng, train[:1])['params'])
  loss_fn = autoencoder_loss.make_autoencoder_loss(model, disc, reconstruction='l1', kl_weight=1e-6,
                                                   disc_start=args.disc_start)
  optimizer = optax.adam(1e-3, b1=0.5, b2=0.9)

  @jax.jit
  def step(params, opt_state, batch, rng, i):
    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, {'x': batch}, rng, i)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux

  @jax.jit
  def reconstruct(ae_params, x):
    return model.apply({'params': ae_params}, x)[0]

  opt_state = optimizer.init(params)
  lines = ['| step | rec L1 (train batch) | PSNR (dB, held out) | SSIM (held out) |', '|---:|---:|---:|---:|']
  order = np.random.default_rng(0)
  start = time.perf_counter()
  for i in range(1, args.steps + 1):
    batch = train[order.choice(train.shape[0], 64, replace=False)]
    params, opt_state, aux = step(params, opt_state, batch, jax.random.fold_in(rng, i), jnp.int32(i))
    if i % args.every == 0 or i == args.steps:
      x_hat = reconstruct(params['autoencoder'], test)
      lines.append(f'| {i} | {float(aux["rec"]):.4f} | {float(jnp.mean(reconstruction.psnr(test, x_hat))):.2f} | '
                   f'{float(jnp.mean(reconstruction.ssim(test, x_hat))):.4f} |')
      print(lines[-1], flush=True)
  seconds = time.perf_counter() - start
  ae = params['autoencoder']
  encode = jax.jit(lambda p, x: model.apply({'params': p}, x, method='encode_latents'))
  decode = jax.jit(lambda p, z: model.apply({'params': p}, z, method='decode_latents'))
  z_test = encode(ae, test[:256])
  speed = ['| operation | images / s (batch 256, 16x16x1) |', '|---|---:|',
           f'| encode | {rate(encode, ae, test[:256], n=256):.0f} |',
           f'| decode | {rate(decode, ae, z_test, n=256):.0f} |',
           f'| train step (batch 64, incl. compile) | {args.steps * 64 / seconds:.0f} |']
  header = (f'small autoencoder (0.95 M params at 3 channels; in_channels=1 here), {args.steps} steps, disc_start '
            f'{args.disc_start or "off"}, {jax.devices()[0].platform}, {seconds:.0f} s training.')
  table = '\n'.join([header, '', *lines, '', *speed])
  print('\n'.join(['', *speed]))
  if args.save:
    z = jnp.concatenate([encode(ae, train[i:i + 256]) for i in range(0, train.shape[0], 256)])
    scaling_factor = float(1.0 / jnp.std(z))  # the small preset's factor is 1, so z is unscaled here
    record = latents.save_autoencoder(args.save, ae, preset='small', fields={'in_channels': 1, 'scaling_factor':
                                      scaling_factor}, input_shape=(16, 16, 1),
                                      note=f'experiments/autoencoder_digits.py --steps {args.steps} --disc-start '
                                      f'{args.disc_start}: digits 8x8 bilinear to 16x16 in [-1, 1]')
    table += (f'\n\nSaved to `{args.save}`: latents {record["latent_shape"]}, scaling factor {scaling_factor:.4f} '
              f'(1 / std of the {train.shape[0]} training digits\' posterior means), sha256 {record["sha256"][:12]}.')
    print(table.splitlines()[-1])
  if args.out:
    pathlib.Path(args.out).write_text(f'`python experiments/autoencoder_digits.py --steps {args.steps} --disc-start '
                                      f'{args.disc_start}`\n\n{table}\n')


if __name__ == '__main__':
  main()
