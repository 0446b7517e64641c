"""The autoencoder's training objective (Rombach et al. 2022, app. G; Esser et al. 2021, eq. 7 and 8):
reconstruction (+ an optional perceptual term) + KL + an optional patch-GAN term with the adaptive weight.

  L_AE = rec(x, D(z)) + kl_weight KL(q(z|x) || N(0, I)) + disc_factor lambda L_G,    L_G = -E[D_psi(x_hat)]
  rec(x, x_hat) = mean_pixels l(x - x_hat) + perceptual_weight P(x, x_hat)   (l: L1 or L2; P: e.g. LPIPS)
  L_D  = disc_factor 1/2 (E[relu(1 - D_psi(x))] + E[relu(1 + D_psi(x_hat))])    (hinge)

``lambda = disc_weight ||grad_{W_L} rec|| / (||grad_{W_L} L_G|| + 1e-4)`` (clipped to [0, 1e4], no gradient)
balances the two on the decoder's last layer W_L, and ``disc_factor = [step >= disc_start]``. Both objectives
are one scalar over the joint params ``{'autoencoder', 'discriminator'}``: ``x_hat`` enters ``L_D`` through a
stop-gradient and ``psi`` is frozen in ``L_G``, so one optimizer step on the sum is the simultaneous update of
LDM's two optimizers. The discriminator is pix2pix's ``NLayerDiscriminator`` (Isola et al. 2017) with GroupNorm
in place of BatchNorm, so it holds no running statistics.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffax.models import layers
from diffax.models.autoencoder import AutoencoderKL

Array = jax.Array


class PatchDiscriminator(nn.Module):
  """[B, H, W, C] -> per-patch logits [B, H', W', 1] (70x70 receptive field for ``num_layers=3``)."""
  ch: int = 64
  num_layers: int = 3
  num_groups: int = 32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.leaky_relu(nn.Conv(self.ch, (4, 4), strides=2, padding=1, name='conv_0')(x), 0.2)
    for i in range(1, self.num_layers + 1):
      width = self.ch * min(2 ** i, 8)
      h = nn.Conv(width, (4, 4), strides=2 if i < self.num_layers else 1, padding=1, use_bias=False,
                  name=f'conv_{i}')(h)
      h = nn.leaky_relu(layers.group_norm(min(self.num_groups, width), name=f'norm_{i}')(h), 0.2)
    return nn.Conv(1, (4, 4), padding=1, name='conv_out')(h)


RECONSTRUCTION = {'l1': lambda d: jnp.abs(d), 'l2': lambda d: jnp.square(d)}


def make_autoencoder_loss(model: AutoencoderKL, discriminator: PatchDiscriminator | None, *,
                          reconstruction: str = 'l1', kl_weight: float = 1e-6, disc_weight: float = 0.5,
                          disc_start: int = 0, perceptual_fn: Callable[[Array, Array], Array] | None = None,
                          perceptual_weight: float = 1.0) -> Callable:
  """``loss_fn(params, batch, rng, step) -> (loss, aux)`` for params ``{'autoencoder', 'discriminator'}``.

  Args:
    model: the autoencoder (trained on a posterior sample).
    discriminator: a :class:`PatchDiscriminator`, or None for reconstruction + KL only.
    reconstruction: ``'l1'`` or ``'l2'``, the per-pixel loss, averaged over pixels.
    kl_weight: weight of the per-image KL against the pixel-mean reconstruction term (LDM's KL-f8 weighs 1e-6
      against the per-image pixel sum, i.e. ``1e-6 / (H W C)`` here).
    disc_weight, disc_start: lambda's factor and the first step with the GAN terms (LDM: 0.5, 50,001).
    perceptual_fn: ``(x, x_hat) -> [B]``, differentiable in ``x_hat`` (e.g.
      ``functools.partial(diffax.evaluation.lpips.distance, weights)``, with ``weights`` an argument of the jitted
      step so that they are not compiled in as constants), or None. As in LDM's
      ``LPIPSWithDiscriminator``, ``perceptual_weight`` times it joins the reconstruction term, so it also enters
      the adaptive weight's ``||grad_{W_L} rec||``.
    perceptual_weight: its weight (LDM: 1.0).

  ``batch['x']`` is [B, H, W, C] in [-1, 1]. ``aux``: ``rec`` (pixel + weighted perceptual), ``perceptual``
  (unweighted; 0 without ``perceptual_fn``), ``kl``, ``g_loss``, ``d_loss``, ``disc_weight`` scalars and the
  per-example ``loss`` [B] (rec + weighted KL).
  """
  if reconstruction not in RECONSTRUCTION:
    raise ValueError(f'Unknown reconstruction loss {reconstruction!r}; choose one of {sorted(RECONSTRUCTION)}.')
  rec_fn = RECONSTRUCTION[reconstruction]

  def loss_fn(params, batch, rng, step):
    x = batch['x']
    ae = params['autoencoder']
    posterior = model.apply({'params': ae}, x, method='encode')
    z = posterior.sample(rng)
    last = ae['decoder']['conv_out']['kernel']

    def decode(kernel):
      p = {**ae, 'decoder': {**ae['decoder'], 'conv_out': {**ae['decoder']['conv_out'], 'kernel': kernel}}}
      return model.apply({'params': p}, z, method='decode')

    def rec_of(y):  # [B, H, W, C] -> ([B] reconstruction term, [B] unweighted perceptual distance)
      pixel = jnp.mean(rec_fn(y - x), axis=(1, 2, 3))
      if perceptual_fn is None:
        return pixel, jnp.zeros_like(pixel)
      perceptual = perceptual_fn(x, y)
      return pixel + perceptual_weight * perceptual, perceptual

    x_hat, decode_vjp = jax.vjp(decode, last)
    rec_per_example, rec_vjp, perceptual = jax.vjp(rec_of, x_hat, has_aux=True)  # [B], [B]
    kl = posterior.kl()  # [B]
    rec = jnp.mean(rec_per_example)
    loss = rec + kl_weight * jnp.mean(kl)
    aux = {'rec': rec, 'perceptual': jnp.mean(perceptual), 'kl': jnp.mean(kl),
           'loss': rec_per_example + kl_weight * kl}
    if discriminator is None:
      return loss, aux | {'g_loss': jnp.zeros(()), 'd_loss': jnp.zeros(()), 'disc_weight': jnp.zeros(())}
    disc = params['discriminator']
    g_loss_of = lambda images: -jnp.mean(discriminator.apply({'params': jax.lax.stop_gradient(disc)}, images))
    g_loss = g_loss_of(x_hat)
    (grad_rec,) = decode_vjp(*rec_vjp(jnp.full_like(rec_per_example, 1.0 / rec_per_example.shape[0])))
    (grad_g,) = decode_vjp(jax.grad(g_loss_of)(x_hat))
    weight = jax.lax.stop_gradient(
        disc_weight * jnp.clip(jnp.linalg.norm(grad_rec) / (jnp.linalg.norm(grad_g) + 1e-4), 0.0, 1e4))
    factor = (step >= disc_start).astype(jnp.float32)
    logits_real = discriminator.apply({'params': disc}, x)
    logits_fake = discriminator.apply({'params': disc}, jax.lax.stop_gradient(x_hat))
    d_loss = 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))
    loss = loss + factor * (weight * g_loss + d_loss)
    return loss, aux | {'g_loss': g_loss, 'd_loss': d_loss, 'disc_weight': weight}

  return loss_fn
