"""diffax: pure-functional diffusion models in JAX.

``from diffax import schedules, losses, samplers`` gives the library pieces with no trainer, config or global
state attached; everything jit-compiles, vmaps and works with any ``model_fn(x_t, t) -> output``.
"""

from diffax.diffusion import likelihood
from diffax.diffusion import losses
from diffax.diffusion import parameterization
from diffax.diffusion import samplers
from diffax.diffusion import schedules
from diffax.diffusion import time_sampling
from diffax.diffusion import vlb
from diffax.diffusion.parameterization import classifier_free_guidance
from diffax.diffusion.samplers import get_sampler
from diffax.diffusion.schedules import get_schedule

__version__ = '0.1.0'

__all__ = [
    'classifier_free_guidance', 'get_sampler', 'get_schedule', 'likelihood', 'losses', 'parameterization',
    'samplers', 'schedules', 'time_sampling', 'vlb'
]
