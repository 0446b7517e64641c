"""Converts torchvision's VGG-16 and lpips' v0.1 linear layers (``.pth``) to the pickle-free ``.npz`` diffax loads.

Run once, on any machine with torch (the only step that needs it)::

  curl -L -o vgg16-397923af.pth https://download.pytorch.org/models/vgg16-397923af.pth
  curl -L -o vgg.pth https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/vgg.pth
  pip install 'diffax[convert]'
  python -m diffax.evaluation.convert_lpips --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg.npz

Both files must have their pinned SHA-256 (``lpips_weights.VGG_SHA256``, ``lpips_weights.LIN_SHA256``); they are
read with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects. The mapping itself,
:func:`state_dicts_to_arrays`, is pure numpy so that it is tested without torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
import os

import numpy as np

from diffax.evaluation import lpips_weights
from diffax.evaluation.stats import file_sha256

_VGG_NAMES = {index: name for name, index, _, _ in lpips_weights.VGG16_CONVS}
_LIN_KEYS = {f'lin{k}.model.{i}.weight': tap for k, (tap, _) in enumerate(lpips_weights.TAPS) for i in (0, 1)}


def state_dicts_to_arrays(vgg: Mapping[str, np.ndarray], lin: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps the two torch state_dicts' names and layouts to the ``.npz``'s flat names.

  * ``vgg``, torchvision ``vgg16().state_dict()``: ``features.{i}.weight`` [O, I, 3, 3] ->
    ``vgg/{conv}/kernel`` [3, 3, I, O] (OIHW -> HWIO) and ``features.{i}.bias`` -> ``vgg/{conv}/bias``, with
    ``conv`` the VGG name of features index ``i`` (``lpips_weights.VGG16_CONVS``); ``classifier.*`` is dropped
    (LPIPS stops at relu5_3).
  * ``lin``, lpips ``weights/v0.1/vgg.pth``: ``lin{k}.model.1.weight`` [1, C, 1, 1] (``model.0`` when saved
    without dropout) -> ``lin/{tap}/kernel`` [C], with ``tap`` the k-th of ``lpips_weights.TAPS``.

  Raises ``ValueError`` on any other name, and on any name, shape or negative lin weight that is off
  ``lpips_weights.EXPECTED_SHAPES``.
  """
  out, unknown = {}, []
  for key, value in vgg.items():
    value = np.asarray(value)
    parts = key.split('.')
    if parts[0] == 'classifier':
      continue
    if len(parts) == 3 and parts[0] == 'features' and parts[1].isdigit() and int(parts[1]) in _VGG_NAMES:
      name = _VGG_NAMES[int(parts[1])]
      if parts[2] == 'weight' and value.ndim == 4:
        out[f'vgg/{name}/kernel'] = value.transpose(2, 3, 1, 0)
        continue
      if parts[2] == 'bias':
        out[f'vgg/{name}/bias'] = value
        continue
    unknown.append(key)
  if unknown:
    raise ValueError(f'Not part of torchvision\'s VGG-16 (is this {lpips_weights.VGG_FILENAME}?): {", ".join(unknown)}')
  for key, value in lin.items():
    value = np.asarray(value)
    if key not in _LIN_KEYS or value.ndim != 4 or value.shape[0] != 1 or value.shape[2:] != (1, 1):
      unknown.append(key)
    else:
      out[f'lin/{_LIN_KEYS[key]}/kernel'] = value.reshape(-1)
  if unknown:
    raise ValueError(f'Not an LPIPS-VGG linear layer (is this lpips\' v0.1 {lpips_weights.LIN_FILENAME}?): '
                     f'{", ".join(unknown)}')
  lpips_weights.check_arrays(out)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def convert(vgg: str | os.PathLike, lin: str | os.PathLike, out: str | os.PathLike, *,
            vgg_sha256: str = lpips_weights.VGG_SHA256, lin_sha256: str = lpips_weights.LIN_SHA256) -> str:
  """Verifies both files against their digests, converts them and writes ``out``; returns the content digest."""
  for path, expected, filename, url in ((vgg, vgg_sha256, lpips_weights.VGG_FILENAME, lpips_weights.VGG_URL),
                                        (lin, lin_sha256, lpips_weights.LIN_FILENAME, lpips_weights.LIN_URL)):
    actual = file_sha256(path)
    if actual != expected:
      raise ValueError(f'{path} has SHA-256 {actual}, expected {expected} ({filename} from {url}).')
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("Converting the .pth files needs torch: pip install 'diffax[convert]'.") from e
  def load(path):
    return {k: v.detach().cpu().numpy() for k, v in torch.load(path, map_location='cpu', weights_only=True).items()}

  arrays = state_dicts_to_arrays(load(vgg), load(lin))
  return lpips_weights.save_lpips_npz(out, arrays, vgg_sha256=vgg_sha256, lin_sha256=lin_sha256)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--vgg', required=True, help=f'path to torchvision\'s {lpips_weights.VGG_FILENAME}')
  parser.add_argument('--lin', required=True, help=f'path to lpips\' weights/v0.1/{lpips_weights.LIN_FILENAME}')
  parser.add_argument('--out', required=True, help='the .npz to write')
  args = parser.parse_args(argv)
  digest = convert(args.vgg, args.lin, args.out)
  print(f'Wrote {args.out}\n  content SHA-256: {digest} (pin it as expected_sha256 in your config)\n'
        f'  use it with: export {lpips_weights.ENV_VAR}={os.path.abspath(args.out)}')


if __name__ == '__main__':
  main()
