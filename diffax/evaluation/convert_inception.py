"""Converts pytorch-fid's FID Inception weights (``.pth``) to the pickle-free ``.npz`` that diffax loads.

Run once, on any machine with torch (the only step that needs it)::

  curl -L -o pt_inception-2015-12-05-6726825d.pth \\
    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  pip install 'diffax[convert]'
  python -m diffax.evaluation.convert_inception --pth pt_inception-2015-12-05-6726825d.pth --out fid_inception.npz

The ``.pth`` must have the pinned SHA-256 (``inception_weights.PTH_SHA256``); it is read with
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects. The mapping itself,
:func:`state_dict_to_arrays`, is pure numpy so that it is tested without torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
import os

import numpy as np

from diffax.evaluation import inception_weights
from diffax.evaluation.stats import file_sha256

_BN_LEAVES = {'weight': 'params/{}/scale', 'bias': 'params/{}/bias', 'running_mean': 'batch_stats/{}/mean',
              'running_var': 'batch_stats/{}/var'}


def state_dict_to_arrays(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Maps pytorch-fid ``fid_inception_v3().state_dict()`` names and layouts to the Flax tree's flat names.

  * ``X.conv.weight`` [O, I, kh, kw] -> ``params/X/conv/kernel`` [kh, kw, I, O] (OIHW -> HWIO);
  * ``X.bn.{weight, bias}`` -> ``params/X/bn/{scale, bias}``;
    ``X.bn.{running_mean, running_var}`` -> ``batch_stats/X/bn/{mean, var}``;
    ``X.bn.num_batches_tracked`` is dropped (a training counter);
  * ``fc.weight`` [1008, 2048] -> ``params/fc/kernel`` [2048, 1008]; ``fc.bias`` -> ``params/fc/bias``.

  Module paths keep their names with ``.`` -> ``/``. Raises ``ValueError`` on any other name and on any
  name or shape that is off ``inception_weights.EXPECTED_SHAPES``.
  """
  out, unknown = {}, []
  for key, value in state_dict.items():
    value = np.asarray(value)
    module, _, leaf = key.rpartition('.')
    path = module.replace('.', '/')
    if leaf == 'num_batches_tracked':
      continue
    if module.endswith('.conv') and leaf == 'weight' and value.ndim == 4:
      out[f'params/{path}/kernel'] = value.transpose(2, 3, 1, 0)
    elif module.endswith('.bn') and leaf in _BN_LEAVES:
      out[_BN_LEAVES[leaf].format(path)] = value
    elif module == 'fc' and leaf == 'weight' and value.ndim == 2:
      out['params/fc/kernel'] = value.T
    elif module == 'fc' and leaf == 'bias':
      out['params/fc/bias'] = value
    else:
      unknown.append(key)
  if unknown:
    raise ValueError(f'Not part of the FID Inception (is this pytorch-fid\'s {inception_weights.PTH_FILENAME}?): '
                     f'{", ".join(unknown)}')
  inception_weights.check_arrays(out)
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def convert(pth: str | os.PathLike, out: str | os.PathLike, *,
            expected_sha256: str = inception_weights.PTH_SHA256) -> str:
  """Verifies ``pth`` against ``expected_sha256``, converts it and writes ``out``; returns the content digest."""
  actual = file_sha256(pth)
  if actual != expected_sha256:
    raise ValueError(f'{pth} has SHA-256 {actual}, expected {expected_sha256} '
                     f'({inception_weights.PTH_FILENAME} from {inception_weights.PTH_URL}).')
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("Converting the .pth needs torch: pip install 'diffax[convert]'.") from e
  state_dict = torch.load(pth, map_location='cpu', weights_only=True)
  arrays = state_dict_to_arrays({k: v.detach().cpu().numpy() for k, v in state_dict.items()})
  return inception_weights.save_inception_npz(out, arrays, source_sha256=actual)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--pth', required=True, help=f'path to {inception_weights.PTH_FILENAME}')
  parser.add_argument('--out', required=True, help='the .npz to write')
  args = parser.parse_args(argv)
  digest = convert(args.pth, args.out)
  print(f'Wrote {args.out}\n  content SHA-256: {digest} (pin it as expected_sha256 in your eval config)\n'
        f'  use it with: export {inception_weights.ENV_VAR}={os.path.abspath(args.out)}')


if __name__ == '__main__':
  main()
