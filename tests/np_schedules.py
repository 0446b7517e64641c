"""Float64 numpy ``(alpha_t, sigma_t)`` of the schedules, written from the papers independently of diffax's maths."""

import numpy as np

from diffax.diffusion import schedules


def alpha_sigma(schedule: schedules.Schedule, t) -> tuple[np.ndarray, np.ndarray]:
  """DDPM knots (Ho et al. eq. 4), VP / VE (Song et al. eq. 29, 31) and EDM (sigma = t), in float64."""
  t = np.asarray(t, np.float64)
  if isinstance(schedule, schedules.DiscreteSchedule):
    abar = np.cumprod(1.0 - schedule.betas())[np.round(t * schedule.num_timesteps).astype(int) - 1]
    return np.sqrt(abar), np.sqrt(1.0 - abar)
  if isinstance(schedule, schedules.VPSDE):
    b = schedule.beta_min * t + 0.5 * (schedule.beta_max - schedule.beta_min) * t**2
    return np.exp(-0.5 * b), np.sqrt(-np.expm1(-b))
  if isinstance(schedule, schedules.VESDE):
    return np.ones_like(t), schedule.sigma_min * (schedule.sigma_max / schedule.sigma_min)**t
  if isinstance(schedule, schedules.EDM):
    return np.ones_like(t), t
  raise TypeError(f'No numpy reference for {type(schedule).__name__}.')
