"""Published PyTorch checkpoints (safetensors) -> diffax params, in numpy, with no torch at run time.

* :mod:`~diffax.models.convert.safetensors_io`: the reader, the generic renaming and the names-and-shapes check;
* :mod:`~diffax.models.convert.autoencoder_kl`: diffusers ``AutoencoderKL`` (SD / SDXL / SD3 / FLUX VAEs);
* :mod:`~diffax.models.convert.clip`: transformers ``CLIPTextModel`` / ``CLIPModel`` (SD 1.x's text encoder, the
  CLIP score network).
"""

from diffax.models.convert import autoencoder_kl
from diffax.models.convert import clip
from diffax.models.convert import safetensors_io
from diffax.models.convert.autoencoder_kl import load_autoencoder
from diffax.models.convert.clip import load_text_encoder

__all__ = ['autoencoder_kl', 'clip', 'load_autoencoder', 'load_text_encoder', 'safetensors_io']
