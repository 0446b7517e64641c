"""Samplers: each ``sample(denoiser, rng, shape, *, <its own knobs>, t_start, x_T, inpaint, return_trajectory)
-> SampleOutput``.

A sampler takes a :class:`~diffax.diffusion.parameterization.Denoiser` (model, schedule, parameterisation,
optional clipping), e.g. ``ddim_sample(Denoiser(model_fn, schedule, 'v'), rng, shape, num_steps=20)``. Every
sampler runs its whole loop inside ``jax.lax`` (one compiled program), reports its model evaluations, accepts a
given ``x_T``, ``t_start`` (SDEdit), ``inpaint`` and ``return_trajectory``. See ``base`` for the shared
conventions. A grid sampler's ``spacing`` is a name, the times themselves or a grid file (``save_grid``,
``load_grid``), e.g. one that ``optimize_grid`` fitted to a model and a number of steps.
"""

from collections.abc import Callable
import warnings

from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers.ancestral import ancestral_sample
from diffax.diffusion.samplers.base import Inpaint, SampleOutput, check_grid, time_grid
from diffax.diffusion.samplers.consistency import consistency_sample
from diffax.diffusion.samplers.ddim import ddim_sample
from diffax.diffusion.samplers.deis import deis_sample, ipndm_sample
from diffax.diffusion.samplers.dpm_solver import dpm_solver_sample
from diffax.diffusion.samplers.editing import inpaint, sdedit
from diffax.diffusion.samplers.edm import edm_heun_sample
from diffax.diffusion.samplers.flow import flow_euler_sample, flow_heun_sample, flow_sde_sample
from diffax.diffusion.samplers.grid_file import GridFileError, is_grid_path, load_grid, save_grid
from diffax.diffusion.samplers.grid_search import optimize_grid
from diffax.diffusion.samplers.ode import adaptive_ode_sample, ode_encode
from diffax.diffusion.samplers.pc import pc_sample
from diffax.diffusion.samplers.unipc import unipc_sample

SAMPLERS: dict[str, Callable[..., SampleOutput]] = {
    'ddpm': ancestral_sample,
    'ddim': ddim_sample,
    'consistency': consistency_sample,
    'pc': pc_sample,
    'edm_heun': edm_heun_sample,
    'adaptive_ode': adaptive_ode_sample,
    'dpm_solver': dpm_solver_sample,
    'flow_euler': flow_euler_sample,
    'flow_heun': flow_heun_sample,
    'flow_sde': flow_sde_sample,
    'unipc': unipc_sample,
    'deis': deis_sample,
    'ipndm': ipndm_sample,
}
DEPRECATED_NAMES = {'edm': 'edm_heun', 'heun_ode': 'edm_heun'}
"""Old registry names, still accepted with a warning: ``'edm'`` also names a schedule, a prediction and a loss;
the probability-flow Heun sampler ``'heun_ode'`` was ``'edm_heun'`` without churn."""


def canonical_name(name: str) -> str:
  """``name`` itself, or the current name of a deprecated one (with a ``DeprecationWarning``)."""
  if name in DEPRECATED_NAMES:
    warnings.warn(f'Sampler name {name!r} is deprecated; use {DEPRECATED_NAMES[name]!r}.', DeprecationWarning,
                  stacklevel=3)
    return DEPRECATED_NAMES[name]
  if name not in SAMPLERS:
    raise ValueError(f'Unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}.')
  return name


def get_sampler(name: str) -> Callable[..., SampleOutput]:
  """Registry lookup so configs pick a sampler by string, e.g. ``get_sampler('dpm_solver')``."""
  return SAMPLERS[canonical_name(name)]


__all__ = [
    'DEPRECATED_NAMES', 'SAMPLERS', 'Denoiser', 'GridFileError', 'Inpaint', 'SampleOutput', 'adaptive_ode_sample',
    'ancestral_sample', 'canonical_name', 'check_grid', 'ddim_sample', 'deis_sample', 'dpm_solver_sample',
    'edm_heun_sample', 'consistency_sample', 'flow_euler_sample', 'flow_heun_sample', 'flow_sde_sample',
    'get_sampler', 'inpaint', 'ipndm_sample', 'is_grid_path', 'load_grid', 'ode_encode', 'optimize_grid',
    'pc_sample', 'save_grid', 'sdedit', 'time_grid', 'unipc_sample'
]
