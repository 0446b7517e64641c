"""LPIPS-VGG: parameter table, converter, verified loader, and the distance against the ``lpips`` package.

tests/reference/make_lpips_reference.py made ``tests/data/lpips_vgg_seeded.npz`` once (torch 2.13.0, torchvision
0.28.0, lpips 0.1.4, in a throwaway venv): ``lpips.LPIPS(net='vgg', pretrained=False, pnet_rand=True)`` in eval
mode with every weight overwritten from a numpy seed, run on four fixed 64x48 image pairs; it stores the distances,
the per-layer terms and the gradient in ``x`` of the first two pairs. Here the same seeded weights (drawn by the
script's own numpy function, in the torch names and layouts of ``vgg16-397923af.pth`` and lpips' ``vgg.pth``) go
through the real converter, writer and verified loader, and diffax must reproduce the stored values to float32
round-off.
"""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.evaluation import convert_lpips
from diffax.evaluation import lpips
from diffax.evaluation import lpips_weights as lw
from diffax.evaluation.stats import file_sha256

DATA = Path(__file__).parent / 'data'
_spec = importlib.util.spec_from_file_location('make_lpips_reference',
                                               Path(__file__).parent / 'reference' / 'make_lpips_reference.py')
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

# torchvision's VGG-16 has 138,357,544 parameters (torchvision model table); its classifier holds the rest.
TORCHVISION_VGG16_PARAMS = 138_357_544
CLASSIFIER_PARAMS = (25088 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 1000 + 1000)
DISTANCE = jax.jit(lpips.distance)  # one compiled program per input shape for the whole module


@pytest.fixture(scope='module')
def state_dicts():
  return reference.seeded_state_dicts()


@pytest.fixture(scope='module')
def weights_file(state_dicts, tmp_path_factory):
  path = tmp_path_factory.mktemp('lpips') / 'lpips_vgg.npz'
  arrays = convert_lpips.state_dicts_to_arrays(*state_dicts)
  return path, lw.save_lpips_npz(path, arrays, vgg_sha256=lw.VGG_SHA256, lin_sha256=lw.LIN_SHA256)


@pytest.fixture(scope='module')
def weights(weights_file):
  path, digest = weights_file
  return lw.load_weights(path, expected_sha256=digest)


@pytest.fixture(scope='module')
def ref():
  return dict(np.load(DATA / 'lpips_vgg_seeded.npz'))


@pytest.fixture(scope='module')
def images():
  return tuple(jnp.asarray(a) for a in reference.seeded_images())


def test_table_matches_published_parameter_count():
  vgg = sum(int(np.prod(s)) for k, s in lw.EXPECTED_SHAPES.items() if k.startswith('vgg/'))
  lin = sum(int(np.prod(s)) for k, s in lw.EXPECTED_SHAPES.items() if k.startswith('lin/'))
  assert vgg == TORCHVISION_VGG16_PARAMS - CLASSIFIER_PARAMS == 14_714_688
  assert lin == 64 + 128 + 256 + 512 + 512
  assert [index for _, index, _, _ in lw.VGG16_CONVS] == [k for k, _, _ in reference.VGG16_CONVS]


def test_distance_matches_lpips_package(weights, images, ref):
  x, y = images
  np.testing.assert_allclose(jax.jit(lpips.layer_distances)(weights, x, y), ref['per_layer'], rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(DISTANCE(weights, x, y), ref['d'], rtol=2e-5)
  assert len(set(np.round(ref['d'], 3))) == 4  # the four pairs differ, so a mixed-up batch cannot pass


def test_gradient_matches_lpips_package(weights, images, ref):
  x, y = images
  grad = jax.jit(jax.grad(lambda a: jnp.sum(lpips.distance(weights, a, y[:2]))))(x[:2])
  np.testing.assert_allclose(grad, ref['grad_x'], rtol=1e-4, atol=1e-4 * np.abs(ref['grad_x']).max())


def test_metric_properties(weights, images):
  x, y = images
  np.testing.assert_allclose(DISTANCE(weights, x, x), 0.0, atol=1e-12)
  np.testing.assert_allclose(DISTANCE(weights, y, x), DISTANCE(weights, x, y), rtol=1e-6)
  gray = jnp.concatenate([x[:2, ..., :1], y[:2, ..., :1]]).astype(jnp.bfloat16)  # any dtype runs in float32
  rgb = jnp.repeat(gray.astype(jnp.float32), 3, axis=-1)
  np.testing.assert_array_equal(DISTANCE(weights, gray, gray[::-1]), DISTANCE(weights, rgb, rgb[::-1]))


def test_normalization_has_a_finite_gradient_at_a_dead_feature_vector():
  f = jnp.zeros((2, 3, 4)).at[0].set(1.0)  # position 1 is all-zero channels, as a dead ReLU gives
  np.testing.assert_allclose(lpips.normalize_channels(f)[0], 0.5 / (1.0 + 0.5e-10) * np.ones((3, 4)), rtol=1e-6)
  grad = jax.jit(jax.grad(lambda a: jnp.sum(lpips.normalize_channels(a) ** 2 * jnp.arange(4.0).reshape(1, 1, 4))))(f)
  assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad[1]).max()) == 0.0


@pytest.mark.parametrize('shape, message', [((1, 16, 16, 2), r'\[B, H, W, 3\]'), ((16, 16, 3), r'\[B, H, W, 3\]'),
                                            ((1, 15, 32, 3), 'at least 16x16')])
def test_bad_inputs_are_refused(weights, shape, message):
  with pytest.raises(ValueError, match=message):
    lpips.distance(weights, jnp.zeros(shape), jnp.zeros(shape))
  with pytest.raises(ValueError, match='one shape'):
    lpips.distance(weights, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 32, 16, 3)))


def test_converter_maps_names_and_layouts(state_dicts):
  vgg, lin = state_dicts
  arrays = convert_lpips.state_dicts_to_arrays(vgg, lin)
  assert set(arrays) == set(lw.EXPECTED_SHAPES)
  np.testing.assert_array_equal(arrays['vgg/conv4_2/kernel'][0, 2, 7, 5], vgg['features.19.weight'][5, 7, 0, 2])
  np.testing.assert_array_equal(arrays['vgg/conv5_3/bias'], vgg['features.28.bias'])
  np.testing.assert_array_equal(arrays['lin/relu3_3/kernel'], lin['lin2.model.1.weight'].reshape(-1))
  no_dropout = {k.replace('model.1', 'model.0'): v for k, v in lin.items()}  # NetLinLayer(use_dropout=False)
  np.testing.assert_array_equal(convert_lpips.state_dicts_to_arrays(vgg, no_dropout)['lin/relu1_2/kernel'],
                                arrays['lin/relu1_2/kernel'])
  head = {'classifier.6.weight': np.zeros((1000, 4096), np.float32), 'classifier.6.bias': np.zeros(1000, np.float32)}
  assert set(convert_lpips.state_dicts_to_arrays(vgg | head, lin)) == set(arrays)  # the classifier is dropped
  with pytest.raises(ValueError, match="VGG-16 .*: features.30.weight"):
    convert_lpips.state_dicts_to_arrays(vgg | {'features.30.weight': np.zeros((1, 1, 3, 3))}, lin)
  with pytest.raises(ValueError, match='linear layer .*: lin5.model.1.weight'):
    convert_lpips.state_dicts_to_arrays(vgg, lin | {'lin5.model.1.weight': np.zeros((1, 8, 1, 1))})
  missing = {k: v for k, v in vgg.items() if k != 'features.12.bias'}
  with pytest.raises(ValueError, match=r'missing \(1\): vgg/conv3_2/bias'):
    convert_lpips.state_dicts_to_arrays(missing, lin)
  with pytest.raises(ValueError, match=r'negative lin weights \(1\): lin/relu4_3/kernel'):
    convert_lpips.state_dicts_to_arrays(vgg, lin | {'lin3.model.1.weight': -lin['lin3.model.1.weight']})


def test_converter_refuses_unpinned_files(tmp_path):
  (tmp_path / 'fake.pth').write_bytes(b'not the weights')
  with pytest.raises(ValueError, match=lw.VGG_SHA256):
    convert_lpips.convert(tmp_path / 'fake.pth', tmp_path / 'fake.pth', tmp_path / 'out.npz')
  with pytest.raises(ValueError, match=lw.LIN_SHA256):
    convert_lpips.convert(tmp_path / 'fake.pth', tmp_path / 'fake.pth', tmp_path / 'out.npz',
                          vgg_sha256=file_sha256(tmp_path / 'fake.pth'))


def test_loader_reports_digests_and_weights_are_a_pytree(weights, weights_file):
  assert weights.content_sha256 == weights_file[1]
  assert (weights.vgg_sha256, weights.lin_sha256) == (lw.VGG_SHA256, lw.LIN_SHA256)
  assert len(jax.tree.leaves(weights)) == len(lw.EXPECTED_SHAPES)
  assert weights.vgg['conv1_1']['kernel'].shape == (3, 3, 3, 64) and weights.lin['relu5_3']['kernel'].shape == (512,)


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
  monkeypatch.delenv(lw.ENV_VAR, raising=False)
  for path in (None, tmp_path / 'nope.npz'):
    with pytest.raises(FileNotFoundError) as e:
      lw.load_weights(path)
    for needle in (lw.VGG_URL, lw.LIN_URL, lw.VGG_SHA256, lw.LIN_SHA256, "pip install 'diffax[convert]'",
                   'python -m diffax.evaluation.convert_lpips --vgg vgg16-397923af.pth --lin vgg.pth --out',
                   lw.ENV_VAR):
      assert needle in str(e.value)
  monkeypatch.setenv(lw.ENV_VAR, str(tmp_path / 'from_env.npz'))
  with pytest.raises(FileNotFoundError, match='from_env.npz'):
    lw.load_weights()


def _rewrite(src, dst, **changes):
  with np.load(src) as f:
    arrays = {k: f[k] for k in f.files}
  arrays.update(changes)
  np.savez(dst, **{k: v for k, v in arrays.items() if v is not None})
  return dst


def test_loader_rejects_bad_files(weights_file, tmp_path):
  src, digest = weights_file
  with np.load(src) as f:
    tampered, lin = f['vgg/conv1_1/kernel'].copy(), f['lin/relu1_2/kernel']
  tampered[0, 0, 0, 0] += 1.0
  cases = {
      'vgg16-397923af.pth with SHA-256 0+, not the pinned': {lw.META_VGG_SHA256: np.asarray('0' * 64)},
      'vgg.pth with SHA-256 1+, not the pinned': {lw.META_LIN_SHA256: np.asarray('1' * 64)},
      'corrupted': {'vgg/conv1_1/kernel': tampered},
      (r'missing \(1\): vgg/conv1_1/bias; unexpected \(1\): vgg/extra; '
       r'wrong shape \(1\): lin/relu1_2/kernel: \(1, 64, 1, 1\) \(expected \(64,\)\)'): {
           'vgg/conv1_1/bias': None, 'vgg/extra': np.zeros(3, np.float32),
           'lin/relu1_2/kernel': lin[None, :, None, None]},
      r'negative lin weights \(1\): lin/relu1_2/kernel': {'lin/relu1_2/kernel': -lin},
      'not written by': {lw.META_CONTENT_SHA256: None},
  }
  for i, (message, changes) in enumerate(cases.items()):
    with pytest.raises(ValueError, match=message):
      lw.load_weights(_rewrite(src, tmp_path / f'{i}.npz', **changes))
  with pytest.raises(ValueError, match='was pinned'):
    lw.load_weights(src, expected_sha256='f' * 64)
  assert lw.load_weights(src).content_sha256 == digest
