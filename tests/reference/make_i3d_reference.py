"""Makes tests/data/i3d_reference.npz: the outputs of piergiaj/pytorch-i3d's own InceptionI3d on seeded weights.

Run once, in a throwaway environment (torch is never a diffax dependency), on the port's original source::

  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 numpy
  git clone https://github.com/piergiaj/pytorch-i3d /tmp/pytorch-i3d   # commit 05783d11f9632b25fe3d50395a9c9bb51f848d6d
  /tmp/torchenv/bin/python tests/reference/make_i3d_reference.py /tmp/pytorch-i3d/pytorch_i3d.py

The script refuses any ``pytorch_i3d.py`` but that commit's (Git blob id :data:`SOURCE_GIT_SHA1`). It builds
``InceptionI3d(400, in_channels=3)`` in eval mode and replaces every tensor of its state_dict by a draw of
:func:`seeded_state_dict` (pure numpy, seed :data:`SEED`, in sorted name order): He-normal convolution kernels, and
BatchNorm scale, offset, running mean and running variance all away from their identity values, so that a
transposed kernel, a swapped scale/offset, an ignored running statistic or a wrong epsilon cannot pass. The input is
:func:`reference_clips`: 2 clips of 19 frames at 224x224, so that the "same" padding meets both of its cases
(19 frames: an odd size under stride 2; 224 pixels: even sizes, asymmetric padding) and the final [2, 7, 7] pool
leaves 2 time positions. Only small outputs are stored (float32): the port's ``forward`` output as
``logits_per_time`` [2, 2, 400] (its [B, 400, T'] transposed), ``extract_features`` averaged over time as
``pool`` [2, 1024], and :func:`table_fingerprint` of the state_dict's names and shapes (without BatchNorm's
``num_batches_tracked``), which the test compares with the one it derives from diffax's table. The test draws the
same weights with :func:`seeded_state_dict` and the same clips with :func:`reference_clips`.
"""

import hashlib
import importlib.util
import os
import sys

import numpy as np

SEED = 0
SOURCE_GIT_SHA1 = '9e974997379ae3a7c1fef4e7ced6dc1fe61db44d'  # pytorch_i3d.py at commit 05783d1
CLIPS_SHAPE = (2, 19, 224, 224, 3)  # [B, T, H, W, C]
OUT = os.path.join(os.path.dirname(__file__), '..', 'data', 'i3d_reference.npz')


def seeded_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = SEED) -> dict[str, np.ndarray]:
  """float32 tensors in PyTorch layout for every ``name -> shape``, drawn in sorted name order from one generator."""
  rng = np.random.default_rng(seed)
  out = {}
  for name in sorted(shapes):
    shape = shapes[name]
    if name.endswith('conv3d.weight'):
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif name.endswith(('bn.weight', 'bn.running_var')):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bn.bias, bn.running_mean, logits.conv3d.bias
      value = rng.normal(scale=0.2, size=shape)
    out[name] = value.astype(np.float32)
  return out


def table_fingerprint(shapes: dict[str, tuple[int, ...]]) -> str:
  """SHA-256 of ``name:shape`` lines in sorted order."""
  lines = ''.join(f'{name}:{",".join(map(str, shapes[name]))}\n' for name in sorted(shapes))
  return hashlib.sha256(lines.encode()).hexdigest()


def reference_clips(seed: int = SEED) -> np.ndarray:
  """float32 [2, 19, 224, 224, 3] in [-1, 1]: a smooth moving pattern plus noise (a different generator from the
  weights')."""
  rng = np.random.default_rng(seed + 1)
  b, t, h, w, c = CLIPS_SHAPE
  grid = np.arange(t)[:, None, None, None] + np.arange(h)[:, None, None] / 16 + np.arange(w)[:, None] / 24
  phase = rng.uniform(0, 2 * np.pi, (b, 1, 1, 1, c))
  clips = 0.6 * np.sin(grid[None] * 0.7 + phase) + 0.3 * rng.uniform(-1, 1, CLIPS_SHAPE)
  return clips.astype(np.float32)


def git_blob_sha1(path: str) -> str:
  with open(path, 'rb') as f:
    data = f.read()
  return hashlib.sha1(f'blob {len(data)}\0'.encode() + data).hexdigest()


def main(source: str):
  import torch  # pylint: disable=import-outside-toplevel

  if git_blob_sha1(source) != SOURCE_GIT_SHA1:
    raise SystemExit(f'{source} is not pytorch_i3d.py of piergiaj/pytorch-i3d at 05783d1 (Git blob id '
                     f'{git_blob_sha1(source)}, expected {SOURCE_GIT_SHA1}).')
  spec = importlib.util.spec_from_file_location('pytorch_i3d', source)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  model = module.InceptionI3d(400, in_channels=3).eval()
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
  weights = seeded_state_dict(shapes)
  missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
  assert not unexpected and all(k.endswith('num_batches_tracked') for k in missing), (missing, unexpected)
  x = torch.from_numpy(reference_clips().transpose(0, 4, 1, 2, 3).copy())  # [B, C, T, H, W]
  with torch.no_grad():
    logits = model(x)  # [B, 400, T']
    features = model.extract_features(x)  # [B, 1024, T', 1, 1]
  np.savez(OUT, logits_per_time=logits.numpy().transpose(0, 2, 1),
           pool=features.numpy()[:, :, :, 0, 0].mean(axis=2), table_fingerprint=np.asarray(table_fingerprint(shapes)))
  print(f'wrote {OUT}: logits_per_time {tuple(logits.shape)} (|max| {float(logits.abs().max()):.3g}), parameters',
        sum(p.numel() for p in model.parameters()))


if __name__ == '__main__':
  main(sys.argv[1])
