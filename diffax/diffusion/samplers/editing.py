"""Editing with any sampler: SDEdit image-to-image and inpainting by replacement.

Both are thin: they prepare the sampler's ``x_T`` / ``t_start`` or its ``inpaint=`` argument and call the
sampler, so every sampler in :mod:`diffax.diffusion.samplers` edits.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import base

Array = jax.Array
Sampler = Callable[..., base.SampleOutput]
"""``sampler(denoiser, rng, shape, *, ..., t_start=, x_T=, inpaint=) -> SampleOutput``."""


def sdedit(sampler: Sampler, denoiser: Denoiser, rng: Array, x_input: Array, *, t_start: float,
           **sampler_kwargs) -> base.SampleOutput:
  """SDEdit (Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with SDEs", Alg. 1).

  Perturbs the guide ``x_input`` [B, ...] to ``x_{t_start} = alpha x_input + sigma z`` (``schedule.marginal``)
  and runs ``sampler`` from ``t_start``. Small ``t_start`` stays faithful to the input; ``t_start =
  schedule.t_max`` forgets it (unconditional sampling). For a discrete schedule pass a knot ``(n + 1) / T``
  so the first model evaluation is at the time the input was noised to.
  """
  rng_noise, rng_sample = jax.random.split(rng)
  x_input = jnp.asarray(x_input, jnp.float32)
  noise = jax.random.normal(rng_noise, x_input.shape, jnp.float32)
  x_t = denoiser.schedule.marginal(x_input, jnp.float32(t_start), noise)
  return sampler(denoiser, rng_sample, x_input.shape, t_start=t_start, x_T=x_t, **sampler_kwargs)


def inpaint(sampler: Sampler, denoiser: Denoiser, rng: Array, x_known: Array, mask: Array,
            **sampler_kwargs) -> base.SampleOutput:
  """Fills the pixels of ``x_known`` [B, ...] where ``mask`` (broadcastable, 1 = known) is 0.

  Known pixels are replaced by the noised ``x_known`` after every step (:class:`base.Inpaint`, RePaint
  eq. 8 without resampling) and are returned exactly. The replacement is an approximation of the
  conditional ``p(x_unknown | x_known)``: the unknown pixels see the known ones only through the noisy
  model input, so their distribution is correct only as far as that coupling allows.
  """
  x_known = jnp.asarray(x_known, jnp.float32)
  condition = base.Inpaint(x_known=x_known, mask=jnp.asarray(mask, jnp.float32))
  return sampler(denoiser, rng, x_known.shape, inpaint=condition, **sampler_kwargs)
