"""Control images (Sobel edges, low resolution) and digits styles against scipy references; control files."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from diffax.data import control, digits, get_source


def _images(seed=0, shape=(3, 8, 8, 2)):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.mark.parametrize('xp', [np, jnp])
def test_sobel_edges_match_scipy(xp):
  x = _images()
  u = (x.astype(np.float64) + 1) / 2
  expected = np.zeros_like(u)
  for b in range(u.shape[0]):
    for c in range(u.shape[-1]):  # scipy smooths along every other axis: one 2-D image at a time
      g_x = ndimage.sobel(u[b, ..., c], axis=1, mode='nearest')  # width: [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
      g_y = ndimage.sobel(u[b, ..., c], axis=0, mode='nearest')
      expected[b, ..., c] = np.hypot(g_x, g_y) / (4 * np.sqrt(2))
  np.testing.assert_allclose(np.asarray(control.sobel_edges(xp.asarray(x), xp)), expected, atol=1e-6)
  assert control.sobel_edges(np.ones((1, 4, 4, 1), np.float32)).max() == 0  # flat image: no edges
  step = np.where(np.arange(4) < 2, -1.0, 1.0)[None, None, :, None] * np.ones((1, 4, 1, 1))
  assert control.sobel_edges(step).max() == pytest.approx(4 / (4 * np.sqrt(2)))  # a unit step: |G_x| = 4


def test_low_resolution_is_block_means_repeated():
  x = _images(shape=(2, 8, 8, 1))
  lowres = control.control_image(x, 'lowres', factor=4)
  u = (x + 1) / 2
  np.testing.assert_allclose(lowres[:, 5, 6], u[:, 4:8, 4:8].mean(axis=(1, 2)), rtol=1e-6)
  assert np.unique(lowres[0, ..., 0]).size == 4
  with pytest.raises(ValueError, match='factor 3 must divide'):
    control.low_resolution(x, 3)


def test_digits_styles():
  scanned, labels = digits.load_digits('test')
  bold, bold_labels = digits.load_digits('test', 'bold')
  footprint = ndimage.generate_binary_structure(2, 1)  # the plus-shaped element
  expected = np.stack([ndimage.grey_dilation(im[..., 0], footprint=footprint, mode='constant', cval=0)
                       for im in scanned])[..., None]
  np.testing.assert_array_equal(bold, expected)
  np.testing.assert_array_equal(bold_labels, labels)
  assert bold.mean() > 1.3 * scanned.mean()  # bolder strokes carry more ink
  np.testing.assert_array_equal(digits.load_digits('test', 'inverted')[0], 255 - scanned)
  assert get_source('digits', split='test', style='bold')[0]['image'].tolist() == bold[0].tolist()
  with pytest.raises(ValueError, match="config.data.style.*'italic'"):
    get_source('digits', split='test', style='italic')
  with pytest.raises(ValueError, match='config.data.style'):
    get_source('tones', split='train', style='bold')


def test_control_files_read_as_floats_in_unit_range(tmp_path):
  image = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
  Image.fromarray(image).save(tmp_path / 'c.png')
  np.testing.assert_allclose(control.read_control_file(str(tmp_path / 'c.png')), image[None, ..., None] / 255.0,
                             rtol=1e-6)
  np.save(tmp_path / 'c.npy', np.full((2, 8, 8, 1), 0.25, np.float32))
  assert control.read_control_file(str(tmp_path / 'c.npy')).shape == (2, 8, 8, 1)
  with pytest.raises(FileNotFoundError, match='No control image file'):
    control.read_control_file(str(tmp_path / 'missing.npy'))
