"""FID Inception port: parameter table, layer semantics vs PyTorch formulas, shapes, batch invariance, weight I/O.

The real weights cannot be fetched here, so a synthetic torch-layout state_dict (OIHW kernels, BatchNorm
running statistics, fc [out, in]) goes through the real converter, writer and verified loader, and its
variables drive every forward pass.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffax.evaluation import convert_inception
from diffax.evaluation import inception
from diffax.evaluation import inception_weights as iw

# torchvision's inception_v3 (aux head, 1000 classes) has 27,161,264 parameters (torchvision model table).
TORCHVISION_INCEPTION_V3_PARAMS = 27_161_264
AUX_PARAMS = (768 * 128 + 2 * 128) + (128 * 768 * 5 * 5 + 2 * 768) + (768 * 1000 + 1000)  # conv0, conv1, fc
FID_INCEPTION_PARAMS = TORCHVISION_INCEPTION_V3_PARAMS - AUX_PARAMS + 8 * (2048 + 1)  # no aux; 1008-way fc


def _torch_state_dict(seed=0):
  """Random weights in pytorch-fid's state_dict names and layouts (plus BN's num_batches_tracked)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for name, cin, cout, kh, kw in iw.CONVS:
    t = name.replace('/', '.')
    sd[f'{t}.conv.weight'] = (rng.normal(size=(cout, cin, kh, kw)) * np.sqrt(2 / (cin * kh * kw))).astype(np.float32)
    sd[f'{t}.bn.weight'] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    sd[f'{t}.bn.bias'] = rng.normal(scale=0.1, size=cout).astype(np.float32)
    sd[f'{t}.bn.running_mean'] = rng.normal(scale=0.1, size=cout).astype(np.float32)
    sd[f'{t}.bn.running_var'] = rng.uniform(0.5, 1.5, cout).astype(np.float32)
    sd[f'{t}.bn.num_batches_tracked'] = np.array(0, np.int64)
  sd['fc.weight'] = (rng.normal(size=(1008, 2048)) * 0.02).astype(np.float32)
  sd['fc.bias'] = rng.normal(scale=0.1, size=1008).astype(np.float32)
  return sd


@pytest.fixture(scope='module')
def state_dict():
  return _torch_state_dict()


@pytest.fixture(scope='module')
def weights_file(state_dict, tmp_path_factory):
  path = tmp_path_factory.mktemp('inception') / 'fid_inception.npz'
  arrays = convert_inception.state_dict_to_arrays(state_dict)
  digest = iw.save_inception_npz(path, arrays, source_sha256=iw.PTH_SHA256)
  return path, digest


@pytest.fixture(scope='module')
def weights(weights_file):
  path, digest = weights_file
  return iw.load_inception_variables(path, expected_sha256=digest)


@pytest.fixture(scope='module')
def feature_fn(weights):
  return inception.make_feature_fn(weights.variables)


def test_table_matches_model_and_published_parameter_count():
  shapes = jax.eval_shape(inception.FIDInceptionV3().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert {k: tuple(v.shape) for k, v in iw.flatten(shapes).items()} == iw.EXPECTED_SHAPES
  num_params = sum(int(np.prod(s)) for k, s in iw.EXPECTED_SHAPES.items() if k.startswith('params/'))
  assert num_params == FID_INCEPTION_PARAMS == 23_850_960
  assert len(iw.CONVS) == 94  # BasicConv2d layers of Inception-v3 without the auxiliary head


def _torch_conv_bn_relu(x_nchw, w_oihw, gamma, beta, mean, var, stride, pad):
  """Reference PyTorch semantics: zero-padded cross-correlation, BatchNorm(eps=1e-3) with running stats, ReLU."""
  (ph, pw), (sh, sw) = pad, stride
  x = np.pad(x_nchw, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
  _, _, kh, kw = w_oihw.shape
  ho, wo = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
  y = np.zeros((x.shape[0], w_oihw.shape[0], ho, wo))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
      y += np.einsum('nchw,oc->nohw', patch, w_oihw[:, :, i, j])
  y = (y - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-3) * gamma[:, None, None] + beta[:, None, None]
  return np.maximum(y, 0.0)


@pytest.mark.parametrize('name, stride, pad', [('Conv2d_1a_3x3', (2, 2), (0, 0)),
                                               ('Mixed_6b/branch7x7_2', (1, 1), (0, 3)),
                                               ('Mixed_6b/branch7x7dbl_2', (1, 1), (3, 0))])
def test_converted_conv_layer_matches_torch_semantics(state_dict, weights, name, stride, pad):
  t = name.replace('/', '.')
  w = state_dict[f'{t}.conv.weight']
  x_nchw = np.random.default_rng(0).normal(size=(2, w.shape[1], 9, 11)).astype(np.float32)
  ref = _torch_conv_bn_relu(x_nchw, w, *(state_dict[f'{t}.bn.{k}'] for k in ('weight', 'bias', 'running_mean',
                                                                            'running_var')), stride, pad)
  node = lambda col: _subtree(weights.variables[col], name)
  layer = inception.BasicConv2d(w.shape[0], w.shape[2:], stride, ((pad[0], pad[0]), (pad[1], pad[1])))
  out = layer.apply({'params': node('params'), 'batch_stats': node('batch_stats')}, x_nchw.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref, rtol=1e-4, atol=1e-4)


def _subtree(tree, name):
  for part in name.split('/'):
    tree = tree[part]
  return tree


def _torch_bilinear(x, size):
  """F.interpolate(mode='bilinear', align_corners=False) on [B, H, W, C], written from its index formula."""
  def axis_weights(n_in):
    src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    m = np.zeros((size, n_in))
    np.add.at(m, (np.arange(size), i0), 1 - lam)
    np.add.at(m, (np.arange(size), i1), lam)
    return m
  return np.einsum('ih,jw,bhwc->bijc', axis_weights(x.shape[1]), axis_weights(x.shape[2]), x)


@pytest.mark.parametrize('in_hw', [(6, 6), (5, 8), (20, 20)])  # up, anisotropic, down (no antialiasing)
def test_resize_matches_torch_bilinear(in_hw):
  x = np.random.default_rng(0).uniform(-1, 1, (2, *in_hw, 3)).astype(np.float32)
  got = inception.resize_bilinear(jnp.asarray(x), 13)
  np.testing.assert_allclose(np.asarray(got), _torch_bilinear(x.astype(np.float64), 13), atol=1e-5)


def test_tf_style_average_pool_ignores_padding():
  x = np.random.default_rng(0).normal(size=(1, 4, 5, 2)).astype(np.float32)
  got = np.asarray(inception._avg_pool_3x3(jnp.asarray(x)))  # pylint: disable=protected-access
  for i in range(4):
    for j in range(5):
      window = x[0, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
      np.testing.assert_allclose(got[0, i, j], window.mean(axis=(0, 1)), rtol=1e-6)


def test_features_shapes_dtypes_and_batch_invariance(feature_fn, weights):
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32))
  out = feature_fn(images)
  assert out['pool'].shape == (2, 2048) and out['logits'].shape == out['logits_unbiased'].shape == (2, 1008)
  assert all(v.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(v))) for v in out.values())
  assert float(jnp.min(out['pool'])) >= 0.0  # mean of ReLU outputs
  np.testing.assert_allclose(out['logits'] - out['logits_unbiased'],
                             np.broadcast_to(weights.variables['params']['fc']['bias'], (2, 1008)), atol=1e-5)
  np.testing.assert_allclose(out['logits_unbiased'], out['pool'] @ weights.variables['params']['fc']['kernel'],
                             rtol=1e-4, atol=1e-4)
  assert not np.allclose(out['pool'][0], out['pool'][1])  # the inputs matter
  # Each image's features are independent of the rest of the batch. (One compiled shape: swapping and
  # duplicating rows is as strict as splitting the batch, and a second XLA compile costs ~10 s here.)
  swapped = feature_fn(images[::-1])['pool'][::-1]
  doubled = feature_fn(jnp.stack([images[1], images[1]]))['pool']
  np.testing.assert_allclose(swapped, out['pool'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(doubled[0], out['pool'][1], rtol=1e-5, atol=1e-6)


def test_unresized_input_must_be_299():
  with pytest.raises(ValueError, match='299'):
    jax.eval_shape(inception.FIDInceptionV3(resize_input=False).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_converter_maps_names_and_layouts(state_dict):
  arrays = convert_inception.state_dict_to_arrays(state_dict)
  assert set(arrays) == set(iw.EXPECTED_SHAPES)  # num_batches_tracked dropped
  np.testing.assert_array_equal(arrays['params/fc/kernel'], state_dict['fc.weight'].T)
  np.testing.assert_array_equal(arrays['batch_stats/Mixed_7c/branch_pool/bn/var'],
                                state_dict['Mixed_7c.branch_pool.bn.running_var'])
  np.testing.assert_array_equal(arrays['params/Mixed_5b/branch5x5_2/bn/scale'],
                                state_dict['Mixed_5b.branch5x5_2.bn.weight'])
  np.testing.assert_array_equal(arrays['params/Mixed_6e/branch7x7_2/conv/kernel'][0, :, 3, 5],
                                state_dict['Mixed_6e.branch7x7_2.conv.weight'][5, 3, 0, :])
  with pytest.raises(ValueError, match='AuxLogits.fc.weight'):
    convert_inception.state_dict_to_arrays({**state_dict, 'AuxLogits.fc.weight': np.zeros((1000, 768))})
  missing = {k: v for k, v in state_dict.items() if k != 'Mixed_7b.branch1x1.conv.weight'}
  with pytest.raises(ValueError, match=r'missing \(1\): params/Mixed_7b/branch1x1/conv/kernel'):
    convert_inception.state_dict_to_arrays(missing)


def test_converter_refuses_unpinned_pth(tmp_path):
  (tmp_path / 'fake.pth').write_bytes(b'not the weights')
  with pytest.raises(ValueError, match=iw.PTH_SHA256):
    convert_inception.convert(tmp_path / 'fake.pth', tmp_path / 'out.npz')


def test_loader_reports_digests(weights, weights_file):
  assert weights.content_sha256 == weights_file[1] and weights.source_sha256 == iw.PTH_SHA256
  assert weights.variables['params']['fc']['kernel'].shape == (2048, 1008)


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch):
  monkeypatch.delenv(iw.ENV_VAR, raising=False)
  for path in (None, tmp_path / 'nope.npz'):
    with pytest.raises(FileNotFoundError) as e:
      iw.load_inception_variables(path)
    for needle in (iw.PTH_URL, iw.PTH_SHA256, "pip install 'diffax[convert]'",
                   'python -m diffax.evaluation.convert_inception --pth', iw.ENV_VAR):
      assert needle in str(e.value)
  monkeypatch.setenv(iw.ENV_VAR, str(tmp_path / 'from_env.npz'))
  with pytest.raises(FileNotFoundError, match='from_env.npz'):
    iw.load_inception_variables()


def _rewrite(src, dst, **changes):
  with np.load(src) as f:
    arrays = {k: f[k] for k in f.files}
  arrays.update(changes)
  np.savez(dst, **{k: v for k, v in arrays.items() if v is not None})
  return dst


def test_loader_rejects_bad_files(weights_file, tmp_path):
  src, digest = weights_file
  kernel = 'params/Conv2d_1a_3x3/conv/kernel'
  with np.load(src) as f:
    tampered = f[kernel].copy()
  tampered[0, 0, 0, 0] += 1.0
  cases = {
      'not the pinned': {iw.META_SOURCE_SHA256: np.asarray('0' * 64)},
      'corrupted': {kernel: tampered},
      (r'missing \(1\): params/fc/bias; unexpected \(1\): params/extra; '
       r'wrong shape \(1\): params/fc/kernel: \(1008, 2048\) \(expected \(2048, 1008\)\)'): {
           'params/fc/bias': None, 'params/extra': np.zeros(3, np.float32),
           'params/fc/kernel': np.zeros((1008, 2048), np.float32)},
      'not written by': {iw.META_CONTENT_SHA256: None},
  }
  for i, (message, changes) in enumerate(cases.items()):
    with pytest.raises(ValueError, match=message):
      iw.load_inception_variables(_rewrite(src, tmp_path / f'{i}.npz', **changes))
  with pytest.raises(ValueError, match='was pinned'):
    iw.load_inception_variables(src, expected_sha256='f' * 64)
  assert iw.load_inception_variables(src).content_sha256 == digest
