"""diffusers ``AutoencoderKL`` safetensors -> :class:`diffax.models.autoencoder.AutoencoderKL` params.

The Flax modules carry diffusers' names (``encoder.down_blocks.0.resnets.1.conv1.weight`` ->
``encoder/down_blocks_0/resnets_1/conv1/kernel``), so the mapping is the generic one of
:mod:`~diffax.models.convert.safetensors_io` plus the attention names of checkpoints saved before diffusers 0.14
(``query, key, value, proj_attn`` -> ``to_q, to_k, to_v, to_out.0``). Usage::

  model, params = load_autoencoder('sd-vae-ft-mse.safetensors', preset='sd')
  latents = model.apply({'params': params}, images, method='encode_latents')  # [B, H/8, W/8, 4]
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from diffax.models import autoencoder
from diffax.models.convert import safetensors_io

ENV_VAR = 'DIFFAX_AUTOENCODER_WEIGHTS'

WEIGHTS = {
    'sd': ('stabilityai/sd-vae-ft-mse', 'diffusion_pytorch_model.safetensors', 'sd-vae-ft-mse.safetensors'),
    'sdxl': ('stabilityai/sdxl-vae', 'diffusion_pytorch_model.safetensors', 'sdxl-vae.safetensors'),
    'sd3': ('stabilityai/stable-diffusion-3-medium-diffusers', 'vae/diffusion_pytorch_model.safetensors',
            'sd3-vae.safetensors'),
    'flux': ('black-forest-labs/FLUX.1-schnell', 'vae/diffusion_pytorch_model.safetensors', 'flux-vae.safetensors'),
}
"""Published diffusers-layout autoencoders by preset: (Hugging Face repository, file, local name)."""

_DEPRECATED = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def how_to_get(preset: str | None) -> str:
  """The exact download command for ``preset``'s published weights."""
  if preset not in WEIGHTS:
    return (f'No published weights are known for preset {preset!r} (known: {sorted(WEIGHTS)}); pass the path of '
            'a diffusers AutoencoderKL diffusion_pytorch_model.safetensors with the same configuration.')
  repo, file, local = WEIGHTS[preset]
  return (f'Nothing is downloaded at run time. Download the weights once (gated repositories need a token: '
          f'add -H "Authorization: Bearer $HF_TOKEN"):\n'
          f'  curl -L -o {local} https://huggingface.co/{repo}/resolve/main/{file}\n'
          f'then pass the path or export {ENV_VAR}=$PWD/{local}.')


def _rename(name: str) -> str:
  return re.sub(r'\.(query|key|value|proj_attn)\.', lambda m: f'.{_DEPRECATED[m.group(1)]}.', name)


def expected_shapes(model: autoencoder.AutoencoderKL) -> dict[str, tuple[int, ...]]:
  """Every parameter shape of ``model`` (flat ``'encoder/conv_in/kernel'`` names)."""
  f = model.downsampling_factor
  return safetensors_io.param_shapes(model, jnp.zeros((1, 2 * f, 2 * f, model.in_channels), jnp.float32))


def params_from_diffusers(state_dict: dict[str, np.ndarray], model: autoencoder.AutoencoderKL) -> dict:
  """diffusers ``AutoencoderKL.state_dict()`` names and layouts -> ``model``'s params (float32 numpy).

  Raises:
    ValueError: a missing, unexpected or mis-shaped tensor (all are listed).
  """
  return safetensors_io.convert_state_dict(state_dict, expected_shapes(model), what='AutoencoderKL',
                                           rename=_rename)


def load_autoencoder(path: str | os.PathLike | None = None, *, preset: str | None = 'sd',
                     **overrides: Any) -> tuple[autoencoder.AutoencoderKL, dict]:
  """The ``preset`` autoencoder (fields updated by ``overrides``) and its params read from ``path``.

  Args:
    path: a diffusers-layout ``.safetensors``; defaults to ``$DIFFAX_AUTOENCODER_WEIGHTS``.
    preset: a key of :data:`diffax.models.autoencoder.AUTOENCODER_PRESETS` whose shapes the file must have.

  Raises:
    FileNotFoundError: no file; the message gives the download command.
    ValueError: the file's names or shapes do not match the preset.
  """
  model = autoencoder.get_autoencoder(preset, **overrides)
  where = safetensors_io.resolve_path(path, env_var=ENV_VAR, what=f'{preset!r} autoencoder',
                                      how_to_get=how_to_get(preset))
  return model, params_from_diffusers(safetensors_io.read_safetensors(where), model)
