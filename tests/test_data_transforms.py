"""data.resize='center_crop': ADM's / DiT's center crop against a reference of the same steps written here on PIL
images, its geometry against a closed form (a linear ramp survives box and bicubic resampling), and imagenet2012
records of varying size under ``tfds.testing.mock_data`` becoming one size through the source and the pipeline."""

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from diffax.data import transforms
from diffax.data.pipeline import make_iterator
from diffax.data.sources import SourceConfigError, get_source


def adm_center_crop(array, image_size):
  """guided-diffusion's center_crop_arr as published, on a PIL image (sizes are (W, H) there)."""
  pil_image = Image.fromarray(array)
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
  arr = np.array(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


@pytest.fixture(scope='module')
def mock_imagenet():
  with tfds.testing.mock_data(num_examples=12):
    yield tfds.data_source('imagenet2012', split='train')


def test_center_crop_is_adms_on_records_of_varying_size(mock_imagenet):
  shapes = set()
  for i in range(len(mock_imagenet)):
    image = mock_imagenet[i]['image']
    shapes.add(image.shape)
    for size in (8, 16):
      got = transforms.center_crop(image, size)
      assert got.shape == (size, size, 3) and got.dtype == np.uint8
      np.testing.assert_array_equal(got, adm_center_crop(image, size))
  short_sides = [min(s[:2]) for s in shapes]
  assert len(shapes) > 6 and min(short_sides) < 16  # varying sizes, some upsampled
  assert max(short_sides) >= 2 * 8  # some records take the BOX halvings


def test_center_crop_of_a_grayscale_image_is_that_of_its_plane():
  image = np.random.default_rng(0).integers(0, 256, (37, 21, 1), dtype=np.uint8)
  np.testing.assert_array_equal(transforms.center_crop(image, 8)[..., 0], adm_center_crop(image[..., 0], 8))


def test_geometry_follows_the_steps_on_a_linear_ramp():
  """A 40 x 100 ramp u(x) = 2 x + 20 to size 16: one halving (40 >= 32) to 20 x 50, bicubic to 16 x 40, columns
  12..27 kept. Box and Keys' bicubic reproduce linear functions, so output column j is the ramp at the original
  position (12 + j + 0.5) * 100 / 40 - 0.5 (to rounding)."""
  x = np.arange(100, dtype=np.float64)
  image = np.broadcast_to((2 * x + 20).astype(np.uint8)[None, :, None], (40, 100, 3)).copy()
  got = transforms.center_crop(image, 16).astype(np.float64)
  want = 2 * ((12 + np.arange(16) + 0.5) * 100 / 40 - 0.5) + 20
  np.testing.assert_allclose(got, np.broadcast_to(want[None, :, None], got.shape), atol=1.01)
  tall = np.ascontiguousarray(np.swapaxes(image, 0, 1))  # 100 x 40: the same along the rows
  np.testing.assert_array_equal(transforms.center_crop(tall, 16), np.swapaxes(transforms.center_crop(image, 16), 0, 1))


def test_imagenet2012_source_crops_every_record_and_the_pipeline_flips_them():
  with tfds.testing.mock_data(num_examples=12):
    raw = tfds.data_source('imagenet2012', split='train')
    source = get_source('imagenet2012', split='train', data_dir='/nonexistent', resize='center_crop', image_size=16)
    assert source.image_shape == (16, 16, 3) and len(source) == 12 and source.num_classes == 1000
    crops = [adm_center_crop(raw[i]['image'], 16) for i in range(12)]
    for i in range(12):
      np.testing.assert_array_equal(source[i]['image'], crops[i])
    (batch,) = list(make_iterator(source, global_batch_size=12, seed=0, shuffle=False, num_epochs=1,
                                  random_flip=True, process_index=0, process_count=1))
  u = np.rint((batch['x'] + 1) * 127.5)
  flipped = [np.array_equal(u[i], crops[i][:, ::-1]) and not np.array_equal(u[i], crops[i]) for i in range(12)]
  kept = [np.array_equal(u[i], crops[i]) for i in range(12)]
  assert all(f or k for f, k in zip(flipped, kept)) and 0 < sum(flipped) < 12


@pytest.mark.parametrize('name, kwargs, key', [
    ('imagenet2012', {}, 'data.resize'),
    ('imagenet2012', {'resize': 'center_crop'}, 'data.image_size'),
    ('imagenet2012', {'image_size': 16}, 'data.resize'),
    ('imagenet2012', {'resize': 'random_crop', 'image_size': 16}, 'data.resize'),
    ('digits', {'resize': 'center_crop', 'image_size': 16}, 'data.resize'),
])
def test_sizes_that_cannot_work_name_the_key(name, kwargs, key):
  with tfds.testing.mock_data(num_examples=4):
    with pytest.raises(SourceConfigError) as error:
      get_source(name, split='train', data_dir='/nonexistent', **kwargs)
  assert error.value.key == key
