"""diffax.data.latent_cache: shards cover the split once and are split among processes by i % P; an encoding
interrupted after k shards (with a partial temporary file left) resumes to files identical byte for byte to an
uninterrupted one, encoding only the missing shards; two processes (threads here) sharing one directory encode
disjoint shards and agree with one process; another encoding or shard size is refused; reading is lazy."""

import pathlib
import pickle
import subprocess
import sys
import threading

import numpy as np
import pytest

from diffax.data import latent_cache

ENCODING = {'autoencoder_sha256': 'ab' * 32, 'sampling': 'posterior_mean'}
N, SHARD = 30, 7  # five shards, the last of two records


def fake_encode(start, stop):
  """Depends on the record indices only, like the trainer's encoder (fold_in(key, index) per record)."""
  index = np.arange(start, stop)
  latent = np.stack([np.random.default_rng(i).standard_normal((2, 2, 3)).astype(np.float32) for i in index])
  return {'latent': latent, 'label': index % 10}


def write(directory, encode=fake_encode, **kwargs):
  kwargs = {'encoding': ENCODING, 'num_records': N, 'records_per_shard': SHARD, 'poll_seconds': 0.01, **kwargs}
  return latent_cache.write(directory, encode=encode, **kwargs)


def shard_bytes(directory):
  return {p.name: p.read_bytes() for p in sorted(directory.glob('shard-*.npy'))}


@pytest.mark.parametrize('num_records, per_shard, processes', [(30, 7, 1), (30, 7, 2), (30, 7, 8), (7, 7, 3)])
def test_shards_cover_the_split_once_and_processes_take_every_pth(num_records, per_shard, processes):
  ranges = latent_cache.shard_ranges(num_records, per_shard)
  assert [i for a, b in ranges for i in range(a, b)] == list(range(num_records))
  assert all(b - a == per_shard for a, b in ranges[:-1])
  taken = [latent_cache.assigned_shards(len(ranges), p, processes) for p in range(processes)]
  assert sorted(i for t in taken for i in t) == list(range(len(ranges)))
  assert all(i % processes == p for p, t in enumerate(taken) for i in t)


def test_the_cache_reads_back_every_record_lazily(tmp_path):
  manifest = write(tmp_path / 'c')
  assert manifest['complete'] and len(manifest['shards']) == 5 and manifest['shards'][-1] == {
      'file': 'shard-00004-of-00005.npy', 'start': 28, 'stop': 30}
  source = latent_cache.ShardedSource(tmp_path / 'c')
  want = fake_encode(0, N)
  assert len(source) == N
  for i in np.random.default_rng(0).permutation(N):
    record = source[int(i)]
    np.testing.assert_array_equal(record['latent'], want['latent'][i])
    assert record['latent'].dtype == np.float32 and record['latent'].shape == (2, 2, 3) and record['label'] == i % 10
  with pytest.raises(IndexError):
    source[N]  # pylint: disable=pointless-statement
  # Lazy: the source holds no records (its pickle, what grain's workers get, is smaller than one shard's data),
  # and a shard's data are read only when one of its records is.
  write(tmp_path / 'big', encode=lambda a, b: {'latent': np.zeros((b - a, 16, 16, 4), np.float32)})
  big = latent_cache.ShardedSource(tmp_path / 'big')
  assert len(pickle.dumps(big)) < SHARD * 16 * 16 * 4 * 4 / 4
  assert pickle.loads(pickle.dumps(source))[17]['label'] == 7
  fresh = latent_cache.ShardedSource(tmp_path / 'c')
  last = tmp_path / 'c' / 'shard-00004-of-00005.npy'
  last.write_bytes(last.read_bytes()[:-1])  # its last record cut short
  np.testing.assert_array_equal(fresh[3]['latent'], want['latent'][3])
  np.testing.assert_array_equal(fresh[28]['latent'], want['latent'][28])
  with pytest.raises(ValueError):
    fresh[29]  # pylint: disable=pointless-statement


def test_an_interrupted_encoding_resumes_to_the_same_files(tmp_path):
  write(tmp_path / 'whole')
  calls = []

  def failing(start, stop):
    if len(calls) == 2:
      raise KeyboardInterrupt  # the run is killed while encoding the third shard
    calls.append(start)
    return fake_encode(start, stop)

  with pytest.raises(KeyboardInterrupt):
    write(tmp_path / 'resumed', encode=failing)
  directory = tmp_path / 'resumed'
  assert sorted(shard_bytes(directory)) == ['shard-00000-of-00005.npy', 'shard-00001-of-00005.npy']
  assert not latent_cache.read_manifest(directory)['complete']
  with pytest.raises(FileNotFoundError, match='no complete'):
    latent_cache.ShardedSource(directory)
  (directory / '.shard-00002-of-00005.npy.tmp-dead').write_bytes(b'half a shard')  # a rename that never came
  resumed = []
  write(directory, encode=lambda a, b: resumed.append(a) or fake_encode(a, b))
  assert resumed == [14, 21, 28]
  assert shard_bytes(directory) == shard_bytes(tmp_path / 'whole')
  assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in (tmp_path / 'whole').iterdir())
  assert latent_cache.read_manifest(directory) == latent_cache.read_manifest(tmp_path / 'whole')
  write(directory, encode=lambda a, b: pytest.fail('a complete cache is not encoded again'))


def test_two_processes_share_the_shards_and_agree_with_one(tmp_path):
  write(tmp_path / 'one')
  encoded, results = {0: [], 1: []}, {}

  def process(p):
    def encode(a, b):
      encoded[p].append(a)
      return fake_encode(a, b)
    results[p] = write(tmp_path / 'two', encode=encode, process_index=p, process_count=2)

  threads = [threading.Thread(target=process, args=(p,)) for p in (1, 0)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  assert encoded == {0: [0, 14, 28], 1: [7, 21]}
  assert results[0] == results[1] == latent_cache.read_manifest(tmp_path / 'two')
  assert shard_bytes(tmp_path / 'two') == shard_bytes(tmp_path / 'one')


@pytest.mark.parametrize('complete', [True, False])
def test_another_encoding_or_shard_size_is_refused(tmp_path, complete):
  if complete:
    write(tmp_path / 'c')
  else:  # killed before its first shard: the manifest alone says what the directory is for
    def killed(start, stop):
      raise RuntimeError('killed')
    with pytest.raises(RuntimeError):
      write(tmp_path / 'c', encode=killed)
  other = {**ENCODING, 'autoencoder_sha256': 'cd' * 32}
  with pytest.raises(latent_cache.CacheMismatchError) as error:
    write(tmp_path / 'c', encoding=other)
  assert error.value.diff == {'encoding': (ENCODING, other)}
  with pytest.raises(latent_cache.CacheMismatchError) as error:
    write(tmp_path / 'c', records_per_shard=8)
  assert error.value.diff == {'records_per_shard': (SHARD, 8)}


def test_a_missing_shard_of_a_complete_cache_is_named(tmp_path):
  write(tmp_path / 'c')
  (tmp_path / 'c' / 'shard-00002-of-00005.npy').unlink()
  with pytest.raises(FileNotFoundError, match='shard-00002-of-00005.npy'):
    latent_cache.ShardedSource(tmp_path / 'c')


def test_two_real_processes_share_one_directory(tmp_path):
  """The same as two OS processes (the protocol relies on the file system only): process 1 starts first."""
  write(tmp_path / 'one')
  script = (f'import sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r}); '
            'import test_latent_cache as t; p = int(sys.argv[1]); '
            f'print(t.write({str(tmp_path / "two")!r}, encode=lambda a, b: print(a) or t.fake_encode(a, b), '
            'process_index=p, process_count=2)["complete"])')
  procs = [subprocess.Popen([sys.executable, '-c', script, str(p)], stdout=subprocess.PIPE, text=True) for p in (1, 0)]
  outputs = [proc.communicate(timeout=120)[0].split() for proc in procs]
  assert [proc.returncode for proc in procs] == [0, 0]
  assert outputs == [['7', '21', 'True'], ['0', '14', '28', 'True']]
  assert shard_bytes(tmp_path / 'two') == shard_bytes(tmp_path / 'one')
