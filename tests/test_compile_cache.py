"""The trainer's persistent compilation cache: where ``train.compilation_cache`` puts it, and that a second
process loads the programs the first one compiled instead of compiling them again."""

import os
import subprocess
import sys

from diffax.trainer import compile_cache


def test_cache_dir_settings(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert compile_cache.cache_dir('user', 'w') == str(tmp_path / 'xdg' / 'diffax' / 'jax')
  assert compile_cache.cache_dir('workdir', '/runs/a') == '/runs/a/compilation_cache'
  assert compile_cache.cache_dir('/somewhere/else', 'w') == '/somewhere/else'
  assert compile_cache.cache_dir('', 'w') is None


_PROBE = '''
import sys, time
import jax, jax.numpy as jnp
from diffax.trainer import compile_cache
compile_cache.enable('workdir', sys.argv[1])
f = jax.jit(lambda x: jnp.tanh(jnp.cumsum(jnp.sin(x) @ x.T, axis=0)).sum() + sum(jnp.cos(x * k).sum() for k in range(200)))
t0 = time.perf_counter()
f.lower(jnp.ones((64, 64))).compile()
print(f'{time.perf_counter() - t0:.4f}')
'''


def test_a_second_process_reads_the_cache(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env['XLA_FLAGS'] = ''  # full optimisation: a program slow enough to be worth caching
  run = lambda: float(subprocess.run([sys.executable, '-c', _PROBE, str(tmp_path)], env=env, check=True,
                                     capture_output=True, text=True).stdout.split()[-1])
  first = run()
  entries = sorted(p.name for p in (tmp_path / 'compilation_cache').iterdir() if p.name.endswith('-cache'))
  second = run()
  assert entries, 'the first run wrote no cache entry'
  assert sorted(p.name for p in (tmp_path / 'compilation_cache').iterdir() if p.name.endswith('-cache')) == entries
  assert second < first / 2, (first, second)
