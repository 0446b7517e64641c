"""Samplers: each ``sample(model_fn, rng, shape, *, schedule, prediction, ...) -> SampleOutput``.

Every sampler runs its whole loop inside ``jax.lax`` (one compiled program), reports its model evaluations,
accepts a given ``x_T``, ``t_start`` (SDEdit), ``inpaint`` and ``return_trajectory``, and never clips the
x0-prediction unless ``clip_x0`` is given. See ``base`` for the shared conventions.
"""

from collections.abc import Callable

from diffax.diffusion.samplers.ancestral import ancestral_sample
from diffax.diffusion.samplers.base import Inpaint, SampleOutput, time_grid
from diffax.diffusion.samplers.ddim import ddim_sample
from diffax.diffusion.samplers.dpm_solver import dpm_solver_sample
from diffax.diffusion.samplers.editing import inpaint, sdedit
from diffax.diffusion.samplers.edm import edm_sample
from diffax.diffusion.samplers.ode import adaptive_ode_sample, heun_ode_sample, ode_encode
from diffax.diffusion.samplers.pc import pc_sample

SAMPLERS: dict[str, Callable[..., SampleOutput]] = {
    'ddpm': ancestral_sample,
    'ddim': ddim_sample,
    'pc': pc_sample,
    'heun_ode': heun_ode_sample,
    'adaptive_ode': adaptive_ode_sample,
    'edm': edm_sample,
    'dpm_solver': dpm_solver_sample,
}


def get_sampler(name: str) -> Callable[..., SampleOutput]:
  """Registry lookup so configs pick a sampler by string, e.g. ``get_sampler('dpm_solver')``."""
  if name not in SAMPLERS:
    raise ValueError(f'Unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}.')
  return SAMPLERS[name]


__all__ = [
    'SAMPLERS', 'Inpaint', 'SampleOutput', 'adaptive_ode_sample', 'ancestral_sample', 'ddim_sample',
    'dpm_solver_sample', 'edm_sample', 'get_sampler', 'heun_ode_sample', 'inpaint', 'ode_encode', 'pc_sample',
    'sdedit', 'time_grid'
]
