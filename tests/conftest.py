"""Test-wide JAX settings: strict dtype promotion and no implicit rank promotion, as library code must obey.

Compiled programs are cached on disk (shared by the pytest workers and the trainer subprocesses they start), so
the end-to-end tests that run the same tiny config several times compile it once.
"""

import os
import tempfile

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'diffax-test-jax-cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('DIFFAX_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'diffax-test-cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import jax  # noqa: E402  (the cache settings above must precede the import)

jax.config.update('jax_numpy_dtype_promotion', 'strict')
jax.config.update('jax_numpy_rank_promotion', 'raise')
