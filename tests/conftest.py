"""Test-wide JAX settings: strict dtype promotion and no implicit rank promotion, as library code must obey."""

import jax

jax.config.update('jax_numpy_dtype_promotion', 'strict')
jax.config.update('jax_numpy_rank_promotion', 'raise')
