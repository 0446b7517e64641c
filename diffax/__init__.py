"""diffax: pure-functional diffusion models in JAX.

``from diffax import schedules, losses, samplers`` (or ``import diffax.samplers``) gives the library pieces with
no trainer, config or global state attached; everything jit-compiles, vmaps and works with any
``model_fn(x_t, t) -> output`` wrapped in a :class:`Denoiser`. The trainer is :mod:`diffax.trainer`.
"""

import sys

from diffax.diffusion import likelihood
from diffax.diffusion import losses
from diffax.diffusion import parameterization
from diffax.diffusion import samplers
from diffax.diffusion import schedules
from diffax.diffusion import time_sampling
from diffax.diffusion import vlb
from diffax.diffusion.parameterization import Denoiser, classifier_free_guidance
from diffax.diffusion.samplers import get_sampler
from diffax.diffusion.schedules import get_schedule

__version__ = '0.1.0'

# The short names are the modules themselves, so ``import diffax.samplers`` works like ``from diffax import samplers``.
for _module in (likelihood, losses, parameterization, samplers, schedules, time_sampling, vlb):
  sys.modules[f'{__name__}.{_module.__name__.rsplit(".", 1)[-1]}'] = _module
del _module

__all__ = [
    'Denoiser', 'classifier_free_guidance', 'get_sampler', 'get_schedule', 'likelihood', 'losses', 'parameterization',
    'samplers', 'schedules', 'time_sampling', 'vlb'
]
