"""LPIPS-VGG weights: the expected parameter table, and a verified loader for local ``.npz`` files.

Nothing is downloaded at run time and nothing is unpickled: the weights are a plain ``.npz`` read with
``np.load(allow_pickle=False)``, made once by ``python -m diffax.evaluation.convert_lpips`` from two published
files, torchvision's ImageNet VGG-16 (the trunk) and lpips' v0.1 linear layers (the calibration).

The chain of trust is that of the FID network (see ``inception_weights``):

  1. ``VGG_SHA256`` and ``LIN_SHA256`` pin the two source files; the converter refuses any others.
     torchvision names its files by their SHA-256 prefix (``397923af``); the full digest is the one several
     independent codebases verify that download against (553,433,881 bytes); no machine that built diffax could
     fetch the file to recompute it. ``LIN_SHA256`` was computed here, and is the same for
     ``lpips/weights/v0.1/vgg.pth`` in richzhang/PerceptualSimilarity and in the lpips 0.1.4 wheel on PyPI.
  2. The conversion is a pure, tested function of the two state_dicts (``convert_lpips.state_dicts_to_arrays``).
  3. The ``.npz`` records both source digests and ``meta/content_sha256``, the digest of the arrays themselves
     (``inception_weights.content_sha256``). The loader requires the source digests to equal the pins,
     recomputes the content digest, checks every name and shape against :data:`EXPECTED_SHAPES`, and requires
     the lin weights to be non-negative (LPIPS clamps them at 0 in training, so a negative one is not LPIPS).

A file forged with matching metadata passes 1-3: pin the content digest the converter prints (and
:class:`LpipsWeights` reports) in the run's config and pass it as ``expected_sha256``.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
from pathlib import Path

from flax import struct
import numpy as np

from diffax.evaluation.inception_weights import content_sha256
from diffax.evaluation.inception_weights import verified_tree
from diffax.models.convert import safetensors_io

VGG_FILENAME = 'vgg16-397923af.pth'
VGG_URL = f'https://download.pytorch.org/models/{VGG_FILENAME}'
VGG_SHA256 = '397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0'
LIN_FILENAME = 'vgg.pth'
LIN_URL = 'https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/vgg.pth'
LIN_SHA256 = 'a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868'
ENV_VAR = 'DIFFAX_LPIPS_WEIGHTS'
META_VGG_SHA256 = 'meta/vgg_sha256'
META_LIN_SHA256 = 'meta/lin_sha256'
META_CONTENT_SHA256 = 'meta/content_sha256'

HOW_TO_GET = f"""Nothing is downloaded at run time. To create the weights file once:
  1. Download torchvision's VGG-16 (SHA-256 {VGG_SHA256}) and lpips' v0.1 linear layers (SHA-256 {LIN_SHA256}):
       curl -L -o {VGG_FILENAME} {VGG_URL}
       curl -L -o {LIN_FILENAME} {LIN_URL}
  2. Convert them to a pickle-free .npz (torch is needed for this step only):
       pip install 'diffax[convert]'
       python -m diffax.evaluation.convert_lpips --vgg {VGG_FILENAME} --lin {LIN_FILENAME} --out lpips_vgg.npz
  3. Point diffax at it: export {ENV_VAR}=$PWD/lpips_vgg.npz (or pass the path explicitly)."""

VGG16_CONVS: tuple[tuple[str, int, int, int], ...] = (
    ('conv1_1', 0, 3, 64), ('conv1_2', 2, 64, 64),
    ('conv2_1', 5, 64, 128), ('conv2_2', 7, 128, 128),
    ('conv3_1', 10, 128, 256), ('conv3_2', 12, 256, 256), ('conv3_3', 14, 256, 256),
    ('conv4_1', 17, 256, 512), ('conv4_2', 19, 512, 512), ('conv4_3', 21, 512, 512),
    ('conv5_1', 24, 512, 512), ('conv5_2', 26, 512, 512), ('conv5_3', 28, 512, 512))
"""(name, index in torchvision's ``vgg16().features``, in channels, out channels) of each 3x3 convolution up to
relu5_3 (Simonyan & Zisserman 2015, configuration D); a 2x2 max-pool precedes conv2_1, conv3_1, conv4_1, conv5_1."""

TAPS: tuple[tuple[str, int], ...] = (('relu1_2', 64), ('relu2_2', 128), ('relu3_3', 256), ('relu4_3', 512),
                                     ('relu5_3', 512))
"""The five feature maps LPIPS compares (lpips' ``lin0`` ... ``lin4``), with their channels."""


def _expected_shapes() -> dict[str, tuple[int, ...]]:
  shapes = {}
  for name, _, cin, cout in VGG16_CONVS:
    shapes[f'vgg/{name}/kernel'] = (3, 3, cin, cout)  # HWIO
    shapes[f'vgg/{name}/bias'] = (cout,)
  for tap, channels in TAPS:
    shapes[f'lin/{tap}/kernel'] = (channels,)
  return shapes


EXPECTED_SHAPES: dict[str, tuple[int, ...]] = _expected_shapes()
"""``'vgg/conv3_2/kernel' -> (3, 3, 256, 256)``, ``'lin/relu3_3/kernel' -> (256,)`` etc.: every array of the
``.npz``."""


def check_arrays(arrays: Mapping[str, np.ndarray]) -> None:
  """Raises ``ValueError`` naming every missing, unexpected and mis-shaped array (meta keys ignored) and every
  lin layer with a negative weight."""
  names = {k for k in arrays if not k.startswith('meta/')}
  missing = sorted(set(EXPECTED_SHAPES) - names)
  extra = sorted(names - set(EXPECTED_SHAPES))
  misshaped = [f'{k}: {tuple(arrays[k].shape)} (expected {EXPECTED_SHAPES[k]})'
               for k in sorted(names & set(EXPECTED_SHAPES)) if tuple(arrays[k].shape) != EXPECTED_SHAPES[k]]
  negative = [k for k in sorted(names & set(EXPECTED_SHAPES)) if k.startswith('lin/') and np.any(arrays[k] < 0)]
  problems = [f'{label} ({len(items)}): {", ".join(items)}' for label, items in
              (('missing', missing), ('unexpected', extra), ('wrong shape', misshaped),
               ('negative lin weights', negative)) if items]
  if problems:
    raise ValueError('LPIPS-VGG arrays do not match the expected table; ' + '; '.join(problems))


def save_lpips_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], *, vgg_sha256: str,
                   lin_sha256: str) -> str:
  """Checks ``arrays`` against the table, writes them (float32) with their meta entries; returns the content
  digest."""
  check_arrays(arrays)
  out = {k: np.asarray(arrays[k], np.float32) for k in sorted(EXPECTED_SHAPES)}
  digest = content_sha256(out)
  out |= {META_VGG_SHA256: np.asarray(vgg_sha256), META_LIN_SHA256: np.asarray(lin_sha256),
          META_CONTENT_SHA256: np.asarray(digest)}
  with open(path, 'wb') as f:
    np.savez(f, **out)
  return digest


@struct.dataclass
class LpipsWeights:
  """Verified weights, a pytree (pass it through ``jax.jit``): ``vgg[name] = {'kernel': [3, 3, I, O], 'bias': [O]}``
  and ``lin[tap] = {'kernel': [C]}`` (float32), with the digests to record alongside every value computed."""
  vgg: dict
  lin: dict
  content_sha256: str = struct.field(pytree_node=False)
  vgg_sha256: str = struct.field(pytree_node=False)
  lin_sha256: str = struct.field(pytree_node=False)
  path: str = struct.field(pytree_node=False)


def resolve_path(path: str | os.PathLike | None = None) -> Path:
  """``path``, else ``$DIFFAX_LPIPS_WEIGHTS``; raises ``FileNotFoundError`` saying how to make the file."""
  return safetensors_io.resolve_path(path, env_var=ENV_VAR, what='LPIPS', how_to_get=HOW_TO_GET)


def load_weights(path: str | os.PathLike | None = None, *, expected_sha256: str | None = None) -> LpipsWeights:
  """Loads and verifies a converted LPIPS-VGG ``.npz`` (see the module docstring for what is checked).

  Args:
    path: the ``.npz``; defaults to ``$DIFFAX_LPIPS_WEIGHTS``.
    expected_sha256: if given, the content digest must equal it (pin it in the run's config).

  Raises:
    FileNotFoundError: no file; the message gives the download and convert commands.
    ValueError: not converted from the pinned files, corrupted, or off the table.
  """
  where = resolve_path(path)
  with np.load(where, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  if not {META_VGG_SHA256, META_LIN_SHA256, META_CONTENT_SHA256} <= set(arrays):
    raise ValueError(f'{where} has no {META_VGG_SHA256} / {META_LIN_SHA256} / {META_CONTENT_SHA256} entries: it was '
                     f'not written by diffax.evaluation.convert_lpips.\n{HOW_TO_GET}')
  for key, pinned, filename in ((META_VGG_SHA256, VGG_SHA256, VGG_FILENAME), (META_LIN_SHA256, LIN_SHA256,
                                                                              LIN_FILENAME)):
    if str(arrays[key]) != pinned:
      raise ValueError(f'{where} was converted from a {filename} with SHA-256 {arrays[key]}, not the pinned '
                       f'{pinned}.\n{HOW_TO_GET}')
  check_arrays(arrays)
  tree, actual = verified_tree(where, arrays, recorded=str(arrays[META_CONTENT_SHA256]),
                               expected_sha256=expected_sha256)
  return LpipsWeights(vgg=tree['vgg'], lin=tree['lin'], content_sha256=actual, vgg_sha256=VGG_SHA256,
                      lin_sha256=LIN_SHA256, path=str(where))
