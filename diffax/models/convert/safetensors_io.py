"""Published PyTorch weights in diffax: one safetensors reader and one "names and shapes must match" check.

Nothing is downloaded at run time and nothing is unpickled: a ``.safetensors`` file is read into numpy by the
``safetensors`` package, every tensor is renamed to its Flax path by a pure function of its name, and the result
must have exactly the names and shapes of the Flax model's parameters (``jax.eval_shape`` of its ``init``), or
nothing is loaded. Each converter (:mod:`~diffax.models.convert.autoencoder_kl`, :mod:`~diffax.models.convert.clip`)
adds its renames and the exact download command that a missing file's error prints.

How PyTorch names and layouts map to Flax (``to_torch_name`` and ``convert_state_dict``):

* module paths keep their names, ``.`` -> ``/``, and a list index joins its list: ``down_blocks.0.resnets.1``
  -> ``down_blocks_0/resnets_1``;
* ``weight`` becomes ``kernel`` (conv OIHW -> HWIO, linear [out, in] -> [in, out]), ``scale`` (a norm) or
  ``embedding`` (an ``nn.Embedding``), whichever the Flax model has; ``bias`` stays; other names stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import os
from pathlib import Path
import re
from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
import numpy as np
from safetensors.numpy import load_file

Shapes = Mapping[str, tuple[int, ...]]


def resolve_path(path: str | os.PathLike | None, *, env_var: str, what: str, how_to_get: str) -> Path:
  """``path``, else ``$env_var``; raises ``FileNotFoundError`` with ``how_to_get`` (the download command)."""
  where = path if path is not None else os.environ.get(env_var)
  if not where:
    raise FileNotFoundError(f'No {what} weights given: pass a path or set ${env_var}.\n{how_to_get}')
  where = Path(where).expanduser()
  if not where.is_file():
    raise FileNotFoundError(f'{what} weights not found at {where}.\n{how_to_get}')
  return where


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a ``.safetensors`` file as numpy arrays (float16 / bfloat16 kept; converters cast)."""
  return load_file(os.fspath(path))


def param_shapes(model: nn.Module, *example_args: Any, **example_kwargs: Any) -> dict[str, tuple[int, ...]]:
  """``'encoder/conv_in/kernel' -> (3, 3, 3, 128)``: every parameter of ``model.init(rng, *example_args)``,
  computed abstractly (no memory, no FLOPs)."""
  variables = jax.eval_shape(model.init, jax.random.key(0), *example_args, **example_kwargs)
  params = nn.meta.unbox(variables)['params']
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params, sep='/').items()}


def check_names_and_shapes(arrays: Mapping[str, np.ndarray], expected: Shapes, *, what: str) -> None:
  """Raises ``ValueError`` naming every missing, unexpected and mis-shaped array of ``arrays``."""
  missing = sorted(set(expected) - set(arrays))
  extra = sorted(set(arrays) - set(expected))
  misshaped = [f'{k}: {tuple(arrays[k].shape)} (expected {tuple(expected[k])})'
               for k in sorted(set(arrays) & set(expected)) if tuple(arrays[k].shape) != tuple(expected[k])]
  problems = [f'{label} ({len(items)}): {", ".join(items)}' for label, items in
              (('missing', missing), ('unexpected', extra), ('wrong shape', misshaped)) if items]
  if problems:
    raise ValueError(f'{what} weights do not match the model (is it the right file and preset?); '
                     + '; '.join(problems))


def to_flax_path(torch_name: str) -> tuple[str, str]:
  """``'a.blocks.0.conv.weight'`` -> (``'a/blocks_0/conv'``, ``'weight'``): module path and torch leaf name."""
  module, _, leaf = torch_name.rpartition('.')
  return re.sub(r'\.(\d+)(?=\.|$)', r'_\1', module).replace('.', '/'), leaf


def _leaf(module: str, leaf: str, value: np.ndarray, expected: Shapes) -> tuple[str, np.ndarray]:
  prefix = f'{module}/' if module else ''
  if leaf == 'weight':
    if f'{prefix}kernel' in expected:
      layout = {4: (2, 3, 1, 0), 2: (1, 0)}.get(value.ndim)
      return f'{prefix}kernel', value if layout is None else value.transpose(layout)
    for name in ('scale', 'embedding'):
      if f'{prefix}{name}' in expected:
        return f'{prefix}{name}', value
  return f'{prefix}{leaf}', value


def convert_state_dict(state_dict: Mapping[str, np.ndarray], expected: Shapes, *, what: str,
                       rename: Callable[[str], str | None] = lambda name: name) -> dict:
  """PyTorch tensors -> the nested Flax ``params`` of float32 numpy arrays (see the module docstring).

  Args:
    state_dict: torch names -> arrays (e.g. from :func:`read_safetensors`).
    expected: the model's flat parameter shapes (:func:`param_shapes`).
    what: the network's name for error messages.
    rename: maps a torch name to the name to convert (old aliases to current ones), or to None to skip it (a
      buffer such as ``position_ids``, the other tower of a two-tower checkpoint).

  Raises:
    ValueError: any missing, unexpected or mis-shaped parameter (all are listed); nothing is returned then.
  """
  arrays = {}
  for name, value in state_dict.items():
    new_name = rename(name)
    if new_name is None:
      continue
    key, array = _leaf(*to_flax_path(new_name), np.asarray(value), expected)
    arrays[key] = array
  check_names_and_shapes(arrays, expected, what=what)
  return traverse_util.unflatten_dict({k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}, sep='/')

