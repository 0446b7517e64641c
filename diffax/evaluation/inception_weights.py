"""FID Inception weights: the expected parameter table, and a verified loader for local ``.npz`` files.

Nothing is downloaded at run time and nothing is unpickled: the weights are a plain ``.npz`` read with
``np.load(allow_pickle=False)``, made once by ``python -m diffax.evaluation.convert_inception`` from
pytorch-fid's release ``pt_inception-2015-12-05-6726825d.pth``.

How the pinned SHA-256 protects the weights (the chain of trust):

  1. ``PTH_SHA256`` pins the published ``.pth``. torch.hub names files by their SHA-256 prefix (here
     ``6726825d``); the full digest is the one that several independent evaluation codebases verify the
     download against (for pytorch-fid's release and for torch-fidelity's mirror of the same bytes,
     ``weights-inception-2015-12-05-6726825d.pth``). The converter refuses any other file.
  2. The conversion is a pure, tested function of the state_dict (``convert_inception.state_dict_to_arrays``),
     so the converted arrays are a deterministic function of those pinned bytes.
  3. The ``.npz`` records ``meta/source_sha256`` (the ``.pth`` digest it came from) and
     ``meta/content_sha256``, a digest of the arrays themselves (:func:`content_sha256`: names, dtypes,
     shapes and little-endian bytes in sorted order), not of the zip container, whose timestamps make file
     bytes differ between conversions. The loader requires the source digest to equal ``PTH_SHA256``,
     recomputes the content digest, and checks every name and shape against :data:`EXPECTED_SHAPES`.

Steps 1-3 catch a wrong download, a different network, truncation and bit rot. They cannot catch a file
forged with matching metadata: for that, pin the content digest that the converter prints (and that
:class:`InceptionWeights` reports) in the run's config and pass it as ``expected_sha256``. It is not pinned
here because no machine that built diffax could fetch the ``.pth`` to compute it. The trainer records
``content_sha256`` in every evaluation it writes.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from diffax.models.convert import safetensors_io

PTH_FILENAME = 'pt_inception-2015-12-05-6726825d.pth'
PTH_URL = f'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{PTH_FILENAME}'
PTH_SHA256 = '6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2'
ENV_VAR = 'DIFFAX_INCEPTION_WEIGHTS'
META_SOURCE_SHA256 = 'meta/source_sha256'
META_CONTENT_SHA256 = 'meta/content_sha256'

HOW_TO_GET = f"""Nothing is downloaded at run time. To create the weights file once:
  1. Download pytorch-fid's port of the 2015-12-05 TensorFlow Inception graph (SHA-256 {PTH_SHA256}):
       curl -L -o {PTH_FILENAME} \\
         {PTH_URL}
  2. Convert it to a pickle-free .npz (torch is needed for this step only):
       pip install 'diffax[convert]'
       python -m diffax.evaluation.convert_inception --pth {PTH_FILENAME} --out fid_inception.npz
  3. Point diffax at it: export {ENV_VAR}=$PWD/fid_inception.npz (or pass the path explicitly)."""

Conv = tuple[str, int, int, int, int]  # (module name, in channels, out channels, kernel height, kernel width)


def _inception_a(name: str, cin: int, pool_features: int) -> list[Conv]:
  return [(f'{name}/branch1x1', cin, 64, 1, 1), (f'{name}/branch5x5_1', cin, 48, 1, 1),
          (f'{name}/branch5x5_2', 48, 64, 5, 5), (f'{name}/branch3x3dbl_1', cin, 64, 1, 1),
          (f'{name}/branch3x3dbl_2', 64, 96, 3, 3), (f'{name}/branch3x3dbl_3', 96, 96, 3, 3),
          (f'{name}/branch_pool', cin, pool_features, 1, 1)]


def _inception_b(name: str, cin: int) -> list[Conv]:
  return [(f'{name}/branch3x3', cin, 384, 3, 3), (f'{name}/branch3x3dbl_1', cin, 64, 1, 1),
          (f'{name}/branch3x3dbl_2', 64, 96, 3, 3), (f'{name}/branch3x3dbl_3', 96, 96, 3, 3)]


def _inception_c(name: str, cin: int, c7: int) -> list[Conv]:
  return [(f'{name}/branch1x1', cin, 192, 1, 1), (f'{name}/branch7x7_1', cin, c7, 1, 1),
          (f'{name}/branch7x7_2', c7, c7, 1, 7), (f'{name}/branch7x7_3', c7, 192, 7, 1),
          (f'{name}/branch7x7dbl_1', cin, c7, 1, 1), (f'{name}/branch7x7dbl_2', c7, c7, 7, 1),
          (f'{name}/branch7x7dbl_3', c7, c7, 1, 7), (f'{name}/branch7x7dbl_4', c7, c7, 7, 1),
          (f'{name}/branch7x7dbl_5', c7, 192, 1, 7), (f'{name}/branch_pool', cin, 192, 1, 1)]


def _inception_d(name: str, cin: int) -> list[Conv]:
  return [(f'{name}/branch3x3_1', cin, 192, 1, 1), (f'{name}/branch3x3_2', 192, 320, 3, 3),
          (f'{name}/branch7x7x3_1', cin, 192, 1, 1), (f'{name}/branch7x7x3_2', 192, 192, 1, 7),
          (f'{name}/branch7x7x3_3', 192, 192, 7, 1), (f'{name}/branch7x7x3_4', 192, 192, 3, 3)]


def _inception_e(name: str, cin: int) -> list[Conv]:
  return [(f'{name}/branch1x1', cin, 320, 1, 1), (f'{name}/branch3x3_1', cin, 384, 1, 1),
          (f'{name}/branch3x3_2a', 384, 384, 1, 3), (f'{name}/branch3x3_2b', 384, 384, 3, 1),
          (f'{name}/branch3x3dbl_1', cin, 448, 1, 1), (f'{name}/branch3x3dbl_2', 448, 384, 3, 3),
          (f'{name}/branch3x3dbl_3a', 384, 384, 1, 3), (f'{name}/branch3x3dbl_3b', 384, 384, 3, 1),
          (f'{name}/branch_pool', cin, 192, 1, 1)]


CONVS: tuple[Conv, ...] = tuple([
    ('Conv2d_1a_3x3', 3, 32, 3, 3), ('Conv2d_2a_3x3', 32, 32, 3, 3), ('Conv2d_2b_3x3', 32, 64, 3, 3),
    ('Conv2d_3b_1x1', 64, 80, 1, 1), ('Conv2d_4a_3x3', 80, 192, 3, 3),
    *_inception_a('Mixed_5b', 192, 32), *_inception_a('Mixed_5c', 256, 64), *_inception_a('Mixed_5d', 288, 64),
    *_inception_b('Mixed_6a', 288),
    *_inception_c('Mixed_6b', 768, 128), *_inception_c('Mixed_6c', 768, 160),
    *_inception_c('Mixed_6d', 768, 160), *_inception_c('Mixed_6e', 768, 192),
    *_inception_d('Mixed_7a', 768), *_inception_e('Mixed_7b', 1280), *_inception_e('Mixed_7c', 2048),
])
"""Every ``BasicConv2d`` of the FID Inception (torchvision's layer list with pytorch-fid's channel counts)."""


def _expected_shapes() -> dict[str, tuple[int, ...]]:
  shapes = {}
  for name, cin, cout, kh, kw in CONVS:
    shapes[f'params/{name}/conv/kernel'] = (kh, kw, cin, cout)  # HWIO
    shapes[f'params/{name}/bn/scale'] = (cout,)
    shapes[f'params/{name}/bn/bias'] = (cout,)
    shapes[f'batch_stats/{name}/bn/mean'] = (cout,)
    shapes[f'batch_stats/{name}/bn/var'] = (cout,)
  shapes['params/fc/kernel'] = (2048, 1008)
  shapes['params/fc/bias'] = (1008,)
  return shapes


EXPECTED_SHAPES: dict[str, tuple[int, ...]] = _expected_shapes()
"""``'params/Mixed_6b/branch7x7_2/conv/kernel' -> (1, 7, 128, 128)`` etc.: every array of the ``.npz``."""


def check_arrays(arrays: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]] = EXPECTED_SHAPES, *,
                 network: str = 'FID Inception') -> None:
  """Raises ``ValueError`` naming every missing, unexpected and mis-shaped array (meta keys ignored) of the
  ``network``'s table ``expected`` (default this module's)."""
  names = {k for k in arrays if not k.startswith('meta/')}
  missing = sorted(set(expected) - names)
  extra = sorted(names - set(expected))
  misshaped = [f'{k}: {tuple(arrays[k].shape)} (expected {expected[k]})'
               for k in sorted(names & set(expected)) if tuple(arrays[k].shape) != expected[k]]
  problems = [f'{label} ({len(items)}): {", ".join(items)}' for label, items in
              (('missing', missing), ('unexpected', extra), ('wrong shape', misshaped)) if items]
  if problems:
    raise ValueError(f'{network} arrays do not match the expected table; ' + '; '.join(problems))


def content_sha256(arrays: Mapping[str, np.ndarray]) -> str:
  """SHA-256 of the weights themselves: for each non-meta name in sorted order, the UTF-8 name, dtype
  string, shape and C-order little-endian float32 bytes, NUL-separated."""
  digest = hashlib.sha256()
  for name in sorted(k for k in arrays if not k.startswith('meta/')):
    a = np.ascontiguousarray(arrays[name], dtype='<f4')
    digest.update(b'\0'.join([name.encode(), a.dtype.str.encode(), ','.join(map(str, a.shape)).encode(),
                              a.tobytes(), b'']))
  return digest.hexdigest()


def save_inception_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], *, source_sha256: str) -> str:
  """Checks ``arrays`` against the table, writes them (float32) with their meta entries; returns the
  content digest."""
  check_arrays(arrays)
  out = {k: np.asarray(arrays[k], np.float32) for k in sorted(EXPECTED_SHAPES)}
  digest = content_sha256(out)
  out[META_SOURCE_SHA256] = np.asarray(source_sha256)
  out[META_CONTENT_SHA256] = np.asarray(digest)
  with open(path, 'wb') as f:
    np.savez(f, **out)
  return digest


def unflatten(arrays: Mapping[str, np.ndarray]) -> dict:
  """``{'params/a/b': x}`` -> ``{'params': {'a': {'b': x}}}`` (meta entries dropped)."""
  tree: dict = {}
  for name, value in arrays.items():
    if name.startswith('meta/'):
      continue
    *parents, leaf = name.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def flatten(tree: Mapping, prefix: str = '') -> dict[str, np.ndarray]:
  """Inverse of :func:`unflatten`."""
  out = {}
  for key, value in tree.items():
    name = f'{prefix}/{key}' if prefix else key
    out.update(flatten(value, name) if isinstance(value, Mapping) else {name: value})
  return out


@dataclasses.dataclass(frozen=True)
class InceptionWeights:
  """Verified weights: ``variables`` = ``{'params': ..., 'batch_stats': ...}`` of numpy float32 arrays for
  ``FIDInceptionV3.apply``; the digests to record with every evaluation."""
  variables: dict
  content_sha256: str
  source_sha256: str
  path: str


def resolve_path(path: str | os.PathLike | None = None) -> Path:
  """``path``, else ``$DIFFAX_INCEPTION_WEIGHTS``; raises ``FileNotFoundError`` saying how to make the file."""
  return safetensors_io.resolve_path(path, env_var=ENV_VAR, what='FID Inception', how_to_get=HOW_TO_GET)


def load_inception_variables(path: str | os.PathLike | None = None, *,
                             expected_sha256: str | None = None) -> InceptionWeights:
  """Loads and verifies a converted FID Inception ``.npz`` (see the module docstring for what is checked).

  Args:
    path: the ``.npz``; defaults to ``$DIFFAX_INCEPTION_WEIGHTS``.
    expected_sha256: if given, the content digest must equal it (pin it in the run's config).

  Raises:
    FileNotFoundError: no file; the message says how to download and convert the weights.
    ValueError: not converted from the pinned ``.pth``, corrupted, or names/shapes off the table.
  """
  where = resolve_path(path)
  with np.load(where, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  if META_SOURCE_SHA256 not in arrays or META_CONTENT_SHA256 not in arrays:
    raise ValueError(f'{where} has no {META_SOURCE_SHA256} / {META_CONTENT_SHA256} entries: it was not written by '
                     f'diffax.evaluation.convert_inception.\n{HOW_TO_GET}')
  source, recorded = str(arrays[META_SOURCE_SHA256]), str(arrays[META_CONTENT_SHA256])
  if source != PTH_SHA256:
    raise ValueError(f'{where} was converted from a .pth with SHA-256 {source}, not the pinned FID Inception '
                     f'release {PTH_SHA256}.\n{HOW_TO_GET}')
  check_arrays(arrays)
  variables, actual = verified_tree(where, arrays, recorded=recorded, expected_sha256=expected_sha256)
  return InceptionWeights(variables=variables, content_sha256=actual, source_sha256=source, path=str(where))


def verified_tree(where: Path, arrays: Mapping[str, np.ndarray], *, recorded: str,
                  expected_sha256: str | None) -> tuple[dict, str]:
  """``(nested float32 weights, content digest)`` of a converted ``.npz``'s ``arrays`` whose names and shapes
  were checked: their :func:`content_sha256` must equal the converter's ``recorded`` digest (else the file is
  corrupted) and, if given, the pinned ``expected_sha256``. Shared by the FID Inception, I3D and LPIPS loaders."""
  actual = content_sha256(arrays)
  if actual != recorded:
    raise ValueError(f'{where} is corrupted: its arrays hash to {actual}, but the converter recorded {recorded}.')
  if expected_sha256 is not None and actual != expected_sha256:
    raise ValueError(f'{where} has content SHA-256 {actual}, but {expected_sha256} was pinned.')
  return unflatten({k: np.asarray(v, np.float32) for k, v in arrays.items() if not k.startswith('meta/')}), actual
