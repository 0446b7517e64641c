"""Test-wide JAX settings: strict dtype promotion and no implicit rank promotion, as library code must obey.

Compiled programs are cached on disk (shared by the pytest workers and the trainer subprocesses they start, all
under JAX's file lock), so the end-to-end tests that run the same tiny config several times compile it once. XLA's backend optimisation is
off (unless ``XLA_FLAGS`` sets it): the test programs are tiny, so compiling dominates, and level 0 compiles them
several times faster; the tests check the maths, which every level must get right.

Every temporary file of a test session, including the ``tmp*tfds`` folders TFDS leaves behind for each builder
it cannot find prepared (``DatasetInfo.initialize_from_bucket``) and those of the trainer subprocesses, lands in
one session folder (``TMPDIR``) that is removed when the session ends.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'diffax-test-jax-cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('DIFFAX_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'diffax-test-cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# The trainer subprocesses share the cache with a size limit, which makes JAX lock every read and write; the
# pytest workers must lock too (same limit as diffax.trainer.compile_cache.MAX_SIZE_BYTES), or an eviction scan
# meets an entry whose access-time file is not written yet and the write fails.
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(4 * 2**30))
_SESSION_TMP = tempfile.mkdtemp(prefix='diffax-tests-')  # after the caches above, which outlive the session
os.environ['TMPDIR'] = tempfile.tempdir = _SESSION_TMP
atexit.register(shutil.rmtree, _SESSION_TMP, ignore_errors=True)
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} --xla_backend_optimization_level=0'.strip()

import jax  # noqa: E402  (the cache settings above must precede the import)

jax.config.update('jax_numpy_dtype_promotion', 'strict')
jax.config.update('jax_numpy_rank_promotion', 'raise')
