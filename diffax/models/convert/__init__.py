"""Published PyTorch checkpoints (safetensors) -> diffax params, in numpy, with no torch at run time.

* :mod:`~diffax.models.convert.safetensors_io`: the reader, the generic renaming and the names-and-shapes check;
* :mod:`~diffax.models.convert.autoencoder_kl`: diffusers ``AutoencoderKL`` (SD / SDXL / SD3 / FLUX VAEs);
"""

from diffax.models.convert import autoencoder_kl
from diffax.models.convert import safetensors_io
from diffax.models.convert.autoencoder_kl import load_autoencoder

__all__ = ['autoencoder_kl', 'load_autoencoder', 'safetensors_io']
