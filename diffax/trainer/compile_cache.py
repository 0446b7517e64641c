"""JAX's persistent compilation cache for trainer runs, so a second run, an evaluation after training and each
run of a sweep load their programs instead of compiling them again.

``train.compilation_cache`` picks the directory: ``'user'`` (default) is ``$XDG_CACHE_HOME/diffax/jax`` (else
``~/.cache/diffax/jax``), shared by every run of this user on this machine; ``'workdir'`` is
``WORKDIR/compilation_cache``; any other string is a directory; ``''`` turns the cache off. Entries are keyed by
the program, the compile options, the backend and the JAX version, so a changed model or flag compiles anew.

Several processes may share one directory: with a size limit JAX takes a file lock around every read and
write (``filelock``), and in a multi-process run only process 0 writes (JAX's own rule).
"""

from __future__ import annotations

import os
import pathlib

import jax

MAX_SIZE_BYTES = 4 * 2**30  # least recently used entries are evicted beyond this (and it enables the file lock)
MIN_COMPILE_SECONDS = 0.2  # programs that compile faster are not worth a disk round trip


def cache_dir(setting: str, workdir: str) -> str | None:
  """The directory ``train.compilation_cache = setting`` names, or None when the cache is off."""
  if not setting:
    return None
  if setting == 'user':
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(root, 'diffax', 'jax')
  if setting == 'workdir':
    return os.path.join(workdir, 'compilation_cache')
  return os.path.expanduser(setting)


def enable(setting: str, workdir: str) -> str | None:
  """Points JAX's persistent cache at :func:`cache_dir` (before the first compilation); returns the directory.

  A directory already set through ``JAX_COMPILATION_CACHE_DIR`` wins over the config.
  """
  path = jax.config.jax_compilation_cache_dir or cache_dir(setting, workdir)
  if path is None:
    return None
  if '://' not in path:
    pathlib.Path(path).mkdir(parents=True, exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_compilation_cache_max_size', MAX_SIZE_BYTES)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECONDS)
  return path
