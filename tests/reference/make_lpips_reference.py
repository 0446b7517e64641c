"""Makes tests/data/lpips_vgg_seeded.npz: the ``lpips`` package's LPIPS-VGG (v0.1) on seeded weights and images.

Run once, in a throwaway environment (torch, torchvision and lpips are never diffax dependencies)::

  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 torchvision==0.28.0 lpips==0.1.4 scipy
  /tmp/torchenv/bin/python tests/reference/make_lpips_reference.py

The network is ``lpips.LPIPS(net='vgg', pretrained=False, pnet_rand=True)`` (so nothing is downloaded) in eval
mode, i.e. torchvision's ``vgg16().features`` sliced at relu1_2 / relu2_2 / relu3_3 / relu4_3 / relu5_3 and the five
1x1 ``NetLinLayer`` s. Every tensor is then overwritten from :func:`seeded_state_dicts` (pure numpy, so the test
draws the very same weights without torch): He-scaled normal kernels, small normal biases and non-negative
uniform lin weights, in the names and layouts of the two files diffax converts (torchvision's
``vgg16-397923af.pth`` and lpips' ``weights/v0.1/vgg.pth``). Only small outputs are stored, in float32: the
distances ``d`` [4] and per-layer terms ``per_layer`` [4, 5] of the pairs of :func:`seeded_images`, and the
gradient ``grad_x`` [2, H, W, 3] (NHWC) of ``d[0] + d[1]`` with respect to the first two ``x``.

The CUDA build of torchvision is the only one the package mirror holds; its compiled ops cannot load next to a
CPU torch, and LPIPS needs none of them, so the package is entered without running its ``__init__`` (which
registers those ops) and only its pure-Python ``models`` are imported.
"""

import importlib.util
import os
import sys
import types

import numpy as np

# torchvision ``vgg16().features`` index of each 3x3 convolution, with its in / out channels.
VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
               (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512))
LIN_CHANNELS = (64, 128, 256, 512, 512)
IMAGE_HW = (64, 48)  # not square, so that a swapped H / W axis cannot pass
OUT = os.path.join(os.path.dirname(__file__), '..', 'data', 'lpips_vgg_seeded.npz')


def seeded_state_dicts(seed: int = 0) -> tuple[dict, dict]:
  """(torchvision VGG-16 ``features.*`` state_dict, lpips ``lin*`` state_dict) of float32 numpy arrays."""
  rng = np.random.default_rng(seed)
  vgg = {}
  for index, cin, cout in VGG16_CONVS:
    kernel = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))  # He et al. 2015
    vgg[f'features.{index}.weight'] = kernel.astype(np.float32)
    vgg[f'features.{index}.bias'] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
  lin = {f'lin{k}.model.1.weight': rng.uniform(0.0, 1.0, (1, c, 1, 1)).astype(np.float32)
         for k, c in enumerate(LIN_CHANNELS)}
  return vgg, lin


def seeded_images(seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Four pairs (x, y), each [4, H, W, 3] float32 in [-1, 1]: noise + perturbation, a smooth image and its
  one-pixel shift, two independent noise images, a smooth image and its half-contrast copy."""
  rng = np.random.default_rng(seed)
  h, w = IMAGE_HW
  ii, jj = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing='ij')
  phase = rng.uniform(0, 2 * np.pi, (2, 3))
  smooth = [np.stack([np.sin(2 * np.pi * (2 * ii + 3 * jj) + p) * np.cos(5 * ii - p) for p in ph], -1)
            for ph in phase]
  noise = rng.uniform(-1, 1, (3, h, w, 3))
  x = np.stack([noise[0], smooth[0], noise[1], smooth[1]])
  y = np.stack([np.clip(noise[0] + 0.1 * rng.standard_normal((h, w, 3)), -1, 1), np.roll(smooth[0], 1, axis=1),
                noise[2], 0.5 * smooth[1]])
  return x.astype(np.float32), y.astype(np.float32)


def _lpips_module():
  spec = importlib.util.find_spec('torchvision')
  package = types.ModuleType('torchvision')
  package.__path__ = list(spec.submodule_search_locations)
  sys.modules['torchvision'] = package
  from torchvision import models  # pylint: disable=import-outside-toplevel
  package.models = models
  import lpips  # pylint: disable=import-outside-toplevel
  return lpips


def main():
  lpips = _lpips_module()
  import torch  # pylint: disable=import-outside-toplevel
  model = lpips.LPIPS(net='vgg', pretrained=False, pnet_rand=True, verbose=False).eval()
  vgg, lin = seeded_state_dicts()
  state = {}
  for key, value in model.state_dict().items():
    parts = key.split('.')
    if parts[0] == 'net':  # net.slice{k}.{features index}.{weight, bias}
      state[key] = torch.from_numpy(vgg[f'features.{parts[2]}.{parts[3]}'])
    elif parts[0] in ('lins', 'lin0', 'lin1', 'lin2', 'lin3', 'lin4'):  # lins.{k} aliases lin{k}
      k = parts[1] if parts[0] == 'lins' else parts[0][3:]
      state[key] = torch.from_numpy(lin[f'lin{k}.model.1.weight'])
    else:
      state[key] = value  # the ScalingLayer's shift and scale
  assert len(state) == len(model.state_dict()) and {f'features.{k}.{l}' for k, *_ in VGG16_CONVS
                                                     for l in ('weight', 'bias')} == set(vgg)
  model.load_state_dict(state, strict=True)
  x, y = seeded_images()
  nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
  x_t = nchw(x).requires_grad_(True)
  d, per_layer = model(x_t, nchw(y), retPerLayer=True)
  (d[0] + d[1]).sum().backward()
  np.savez(OUT, d=d.detach().numpy().reshape(-1), per_layer=np.stack([r.detach().numpy().reshape(-1)
                                                                       for r in per_layer], axis=1),
           grad_x=x_t.grad.numpy()[:2].transpose(0, 2, 3, 1))
  print('d:', d.detach().numpy().reshape(-1))


if __name__ == '__main__':
  main()
