"""The data pipeline: the digits split, grain iterators (order, sharding, flips, dequantisation, resumption
through get_state / Orbax), TFDS sources offline under ``tfds.testing.mock_data``, and the missing-dataset error."""

import collections
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from sklearn import datasets as sk_datasets
import tensorflow_datasets as tfds

from diffax.data import digits
from diffax.data.pipeline import make_iterator
from diffax.data.sources import DatasetNotPreparedError, get_source


class IdSource:
  """``N`` records whose image and label both carry the record id: image [2, 3, 1] = (id, id + 1, ..., id + 5)."""

  image_shape = (2, 3, 1)
  num_classes = 256

  def __init__(self, n: int):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'image': (np.arange(6, dtype=np.uint8) + np.uint8(i)).reshape(2, 3, 1), 'label': i}


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['x'], y['x'])
    np.testing.assert_array_equal(x['cond'], y['cond'])


# ---------------------------------------------------------------------------------------------- digits split


def test_digits_values_match_sklearn_exactly():
  bunch = sk_datasets.load_digits()
  images, labels = digits.load_digits('all')
  assert images.dtype == np.uint8 and images.shape == (1797, 8, 8, 1)
  assert labels.dtype == np.int32 and labels.shape == (1797,)
  expected = np.floor(bunch.images * 255 / 16 + 0.5)  # round half up; v * 255 / 16 is never exactly k + 1/2 but 127.5
  np.testing.assert_array_equal(images[..., 0], expected)
  np.testing.assert_array_equal(labels, bunch.target)
  assert images.min() == 0 and images.max() == 255


def test_digits_split_is_stratified_disjoint_and_covers_all():
  (x_tr, y_tr), (x_te, y_te), (x_all, y_all) = (digits.load_digits(s) for s in ('train', 'test', 'all'))
  assert (len(y_tr), len(y_te)) == (1438, 359)
  counts_all, counts_te = np.bincount(y_all, minlength=10), np.bincount(y_te, minlength=10)
  np.testing.assert_array_equal(counts_te, np.round(0.2 * counts_all))
  # train + test is exactly `all` as a multiset of (image, label) rows, so the splits are disjoint and complete.
  rows = lambda x, y: sorted(map(bytes, np.concatenate([x.reshape(len(y), -1), y[:, None].astype(np.uint8)], 1)))
  assert rows(np.concatenate([x_tr, x_te]), np.concatenate([y_tr, y_te])) == rows(x_all, y_all)


def test_digits_split_is_deterministic():
  first = digits.load_digits('test')
  digits._all_digits.cache_clear()
  second = digits.load_digits('test')
  np.testing.assert_array_equal(first[0], second[0])
  np.testing.assert_array_equal(first[1], second[1])


def test_digits_unknown_split():
  with pytest.raises(ValueError, match='validation'):
    digits.load_digits('validation')


# ------------------------------------------------------------------------------------------- iterator basics


def test_batch_shapes_dtypes_and_exact_scaling():
  source = get_source('digits', split='train')
  images, labels = digits.load_digits('train')
  it = make_iterator(source, global_batch_size=32, seed=0, shuffle=False, process_index=0, process_count=1)
  batches = take(it, 2)
  for k, batch in enumerate(batches):
    assert batch['x'].shape == (32, 8, 8, 1) and batch['x'].dtype == np.float32
    assert batch['cond'].shape == (32,) and batch['cond'].dtype == np.int32
    np.testing.assert_array_equal(batch['x'], images[32 * k:32 * (k + 1)].astype(np.float32) / 127.5 - 1)
    np.testing.assert_array_equal(batch['cond'], labels[32 * k:32 * (k + 1)])
  assert batches[0]['x'].min() == -1 and batches[0]['x'].max() == 1


def test_same_seed_same_batches_other_seed_other_batches():
  source = IdSource(40)
  kw = dict(global_batch_size=8, random_flip=True, dequantize=True, process_index=0, process_count=1)
  a, b, c = (take(make_iterator(source, seed=s, **kw), 6) for s in (3, 3, 4))
  assert_batches_equal(a, b)
  assert not np.array_equal(a[0]['cond'], c[0]['cond'])
  assert not np.array_equal(np.concatenate([x['x'] for x in a]), np.concatenate([x['x'] for x in c]))


def test_consecutive_seeds_do_not_replay_each_others_epochs():
  """grain seeds epoch e of ``shuffle(seed)`` with ``seed + e``; the pipeline derives its seeds to avoid that."""
  kw = dict(global_batch_size=10, process_index=0, process_count=1)
  epoch_1_of_seed_0 = np.concatenate([b['cond'] for b in take(make_iterator(IdSource(20), seed=0, **kw), 4)[2:]])
  epoch_0_of_seed_1 = np.concatenate([b['cond'] for b in take(make_iterator(IdSource(20), seed=1, **kw), 2)])
  assert not np.array_equal(epoch_1_of_seed_0, epoch_0_of_seed_1)


def test_no_shuffle_reads_records_in_order_across_epochs():
  it = make_iterator(IdSource(10), global_batch_size=4, seed=0, shuffle=False, process_index=0, process_count=1)
  ids = np.concatenate([b['cond'] for b in take(it, 5)])
  np.testing.assert_array_equal(ids, np.concatenate([np.arange(10), np.arange(10)]))


def test_every_epoch_is_a_fresh_permutation():
  n = 50
  it = make_iterator(IdSource(n), global_batch_size=8, seed=0, process_index=0, process_count=1)
  ids = np.concatenate([b['cond'] for b in take(it, 19)])  # 152 reads >= 3 epochs; batches straddle epochs
  epochs = ids[:3 * n].reshape(3, n)
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  assert not np.array_equal(epochs[0], np.arange(n))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


@pytest.mark.parametrize('process_count', [1, 2])
def test_num_epochs_drops_the_partial_global_batch(process_count):
  n, global_batch = 50, 8
  runs = [list(make_iterator(IdSource(n), global_batch_size=global_batch, seed=1, num_epochs=2,
                             process_index=p, process_count=process_count)) for p in range(process_count)]
  for batches in runs:
    assert len(batches) == 2 * n // global_batch  # 12 global batches: 96 of the 100 reads of two epochs
  ids = np.concatenate([b['cond'] for batches in runs for b in batches])
  assert len(ids) == 96 and len(np.unique(ids)) == n


def test_processes_split_each_global_batch():
  """Process p gets the p-th slice of every global batch: disjoint, equal sizes, and exactly the one-process batch
  (flips and noise included, so the data do not depend on the process count)."""
  kw = dict(global_batch_size=12, seed=5, random_flip=True, dequantize=True)
  source = IdSource(48)  # no global batch straddles an epoch, so ids within one are distinct
  whole = take(make_iterator(source, process_index=0, process_count=1, **kw), 7)
  parts = [take(make_iterator(source, process_index=p, process_count=3, **kw), 7) for p in range(3)]
  for step, global_batch in enumerate(whole):
    local = [parts[p][step] for p in range(3)]
    assert all(b['cond'].shape == (4,) and b['x'].shape == (4, 2, 3, 1) for b in local)
    ids = [set(b['cond'].tolist()) for b in local]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    np.testing.assert_array_equal(np.concatenate([b['cond'] for b in local]), global_batch['cond'])
    np.testing.assert_array_equal(np.concatenate([b['x'] for b in local]), global_batch['x'])


# ---------------------------------------------------------------------------------------------- augmentation


def test_random_flip_mirrors_about_half_of_the_images():
  source = get_source('digits', split='train')
  images, _ = digits.load_digits('train')
  it = make_iterator(source, global_batch_size=100, seed=0, shuffle=False, random_flip=True, process_index=0,
                     process_count=1)
  x = np.concatenate([b['x'] for b in take(it, 4)])
  original = images[:400].astype(np.float32) / 127.5 - 1
  mirrored = original[:, :, ::-1]
  is_original = np.all(x == original, axis=(1, 2, 3))
  is_mirrored = np.all(x == mirrored, axis=(1, 2, 3))
  assert np.all(is_original | is_mirrored)
  flipped = is_mirrored & ~is_original  # symmetric images count as unflipped
  assert 0.4 < flipped.mean() < 0.6


def test_uniform_dequantization_stays_in_the_pixel_bin():
  """x = 2 (u + n) / 256 - 1 with n ~ U[0, 1): (x + 1) * 128 - u is the noise, mean 1/2 and variance 1/12."""
  source = get_source('digits', split='train')
  images, _ = digits.load_digits('train')
  it = make_iterator(source, global_batch_size=200, seed=0, shuffle=False, dequantize=True, process_index=0,
                     process_count=1)
  x = np.concatenate([b['x'] for b in take(it, 5)]).astype(np.float64)
  assert x.min() >= -1 and x.max() < 1
  noise = (x + 1) * 128 - images[:1000]
  assert noise.min() >= 0 and noise.max() < 1
  n = noise.size  # 64,000 draws: standard errors 0.0011 (mean) and 0.0003 (variance)
  assert abs(noise.mean() - 0.5) < 5 / np.sqrt(12 * n)
  assert abs(noise.var() - 1 / 12) < 5 / np.sqrt(180 * n)


# ------------------------------------------------------------------------------------------------ resumption


def test_set_state_resumes_exactly():
  kw = dict(global_batch_size=12, seed=2, random_flip=True, dequantize=True, process_index=1, process_count=2)
  source = IdSource(30)
  reference = take(make_iterator(source, **kw), 9)
  it = make_iterator(source, **kw)
  take(it, 4)
  state = it.get_state()
  take(it, 2)  # the saved state does not move with the iterator
  resumed = make_iterator(source, **kw)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 5), reference[4:])


def test_orbax_checkpoint_of_state_and_iterator_resumes_exactly(tmp_path):
  kw = dict(global_batch_size=16, seed=7, random_flip=True, dequantize=True)
  source = get_source('digits', split='test')
  reference = take(make_iterator(source, **kw), 30)  # 30 x 16 > 359: crosses an epoch boundary

  train_state = {'params': jnp.arange(3.0), 'step': jnp.int32(25)}
  it = make_iterator(source, **kw)
  take(it, 25)
  manager = ocp.CheckpointManager(tmp_path / 'ckpt')
  manager.save(25, args=ocp.args.Composite(state=ocp.args.StandardSave(train_state),
                                           data=grain.checkpoint.CheckpointSave(it)))
  take(it, 3)  # consumed while the save may still be running
  manager.wait_until_finished()
  manager.close()

  manager = ocp.CheckpointManager(tmp_path / 'ckpt')
  fresh = make_iterator(source, **kw)
  restored = manager.restore(manager.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, train_state)),
      data=grain.checkpoint.CheckpointRestore(fresh)))
  manager.close()
  assert restored['data'] is fresh
  np.testing.assert_array_equal(restored['state']['params'], train_state['params'])
  assert_batches_equal(take(fresh, 5), reference[25:])


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize('kwargs, match', [
    (dict(global_batch_size=10, process_count=4, process_index=0), 'divisible'),
    (dict(global_batch_size=64, process_count=1, process_index=0), 'larger than the dataset'),
    (dict(global_batch_size=8, process_count=2, process_index=2), 'process_index'),
    (dict(global_batch_size=0, process_count=1, process_index=0), 'global_batch_size'),
    (dict(global_batch_size=8, process_count=1, process_index=0, num_epochs=0), 'num_epochs'),
])
def test_invalid_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    make_iterator(IdSource(40), seed=0, **kwargs)


def test_non_uint8_source_is_rejected():
  class FloatSource(IdSource):
    def __getitem__(self, i):
      return {'image': np.zeros((2, 3, 1), np.float32), 'label': 0}

  with pytest.raises(ValueError, match='uint8'):
    make_iterator(FloatSource(10), global_batch_size=2, seed=0, process_index=0, process_count=1)


# ------------------------------------------------------------------------------------------------------ TFDS


def test_tfds_source_runs_the_real_pipeline_under_mock_data():
  """``tfds.testing.mock_data`` patches ``DatasetBuilder.as_data_source``, which ``tfds.data_source`` calls."""
  with tfds.testing.mock_data(num_examples=24):
    source = get_source('cifar10', split='train', data_dir='/nonexistent')
    raw = tfds.data_source('cifar10', split='train')
    assert len(source) == 24 and source.image_shape == (32, 32, 3) and source.num_classes == 10
    batches = list(make_iterator(source, global_batch_size=8, seed=0, shuffle=False, num_epochs=1,
                                 process_index=0, process_count=1))
    assert len(batches) == 3
    for k, batch in enumerate(batches):
      assert batch['x'].shape == (8, 32, 32, 3) and batch['x'].dtype == np.float32
      for i in range(8):
        record = raw[8 * k + i]
        np.testing.assert_array_equal(batch['x'][i], record['image'].astype(np.float32) / 127.5 - 1)
        assert batch['cond'][i] == record['label']


@pytest.mark.parametrize('name, extra', [
    ('cifar10', None),
    ('imagenet_resized/64x64', 'Imagenet64_train_part1_npz.zip'),
    ('imagenet2012', 'ILSVRC2012_img_train.tar'),
])
def test_missing_dataset_says_how_to_prepare_it(tmp_path, name, extra):
  with pytest.raises(DatasetNotPreparedError) as info:
    get_source(name, split='train', data_dir=str(tmp_path))
  message = str(info.value)
  assert isinstance(info.value, FileNotFoundError)
  assert f'tfds build {name} --data_dir={tmp_path} --file_format=array_record' in message
  if extra:
    assert extra in message and os.path.join(str(tmp_path), 'downloads', 'manual') in message
  assert not os.listdir(tmp_path)  # nothing was downloaded or created


def test_unknown_tfds_name_is_not_reported_as_unprepared(tmp_path):
  with pytest.raises(tfds.core.registered.DatasetNotFoundError):
    get_source('no_such_dataset_xyz', split='train', data_dir=str(tmp_path))


def test_digits_source_ignores_data_dir():
  counts = collections.Counter(get_source('digits', split='all', data_dir='/nonexistent')[i]['label']
                               for i in range(1797))
  assert counts == collections.Counter(sk_datasets.load_digits().target.tolist())
