"""Clips and waveforms on 2 local devices: the batch is split along its leading axis as an image batch is, and the
trainer trains exactly as on 1 device with the same global batch.

One subprocess per device count runs the trainer (``train.train_and_evaluate``, what ``main`` calls) on the video
config (3-D DiT) and on the audio config (a 1-D U-Net of one level with attention, which compiles faster than the
config's three), both for 4 steps with a 1-step sampler. Only the reduction order differs between the meshes (the
batch mean and the gradient all-reduce), so the losses agree to float32 round-off and the parameters after 4 Adam
steps to a small multiple of the learning rate's effect on a round-off-sized gradient difference (as in
``tests/test_train_parallel.py``).
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from diffax.trainer import events
import trainer_runs

RUNS = {
    'video': ('moving_digits', {}),
    'audio': ('audio_tones', {'model.overrides.ch_mult': (1,), 'model.overrides.attn_resolutions': (128,)}),
}
SHRINK = {'train.eval_every': 0, 'train.sample_every': 0, 'sample.sampler': 'ddim', 'sample.num_steps': 1,
          'sample.num_samples': 2}

PROGRAM = '''
import importlib.util, json, pathlib, sys
import jax, numpy as np
from diffax.trainer import compile_cache, experiment, sharding, train
runs, root = json.loads(sys.argv[1]), pathlib.Path(sys.argv[2])
for kind, (path, overrides) in runs.items():
  spec = importlib.util.spec_from_file_location(kind, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config('runlocal')
  for key, value in overrides.items():
    section, name = key.rsplit('.', 1)
    config[section][name] = tuple(value) if isinstance(value, list) else value
  compile_cache.enable(config.train.compilation_cache, str(root))
  exp = experiment.Experiment(config, root / f'{kind}_probe')
  host = exp.model_batch(next(exp.data_iterator()))
  layout = {}
  for name, x in sharding.global_batch(host, exp.mesh).items():
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    layout[name] = {'global': list(x.shape), 'shards': [list(s.data.shape) for s in shards],
                    'rows': [[s.index[0].start or 0, s.index[0].stop or x.shape[0]] for s in shards],
                    'equal': all(np.array_equal(np.asarray(s.data), host[name][s.index]) for s in shards)}
  state = train.train_and_evaluate(config, str(root / kind))
  np.save(root / f'{kind}_params.npy', np.concatenate([np.ravel(p) for p in jax.tree.leaves(state.params)]))
  print(f'RESULT {kind} ' + json.dumps({'step': int(state.step), 'layout': layout}))
'''


def _run(devices: int, root) -> dict:
  """``{kind: (losses, final params, step, batch layout)}`` of the trainer runs on ``devices`` local devices."""
  runs = {k: (f'{trainer_runs.REPO}/configs/{name}.py', {**SHRINK, **extra}) for k, (name, extra) in RUNS.items()}
  proc = subprocess.run([sys.executable, '-c', PROGRAM, json.dumps(runs), str(root)], cwd=trainer_runs.REPO,
                        env=trainer_runs.env_with(devices), capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, trainer_runs.failure_excerpt(proc.stderr)
  out = {}
  for line in proc.stdout.splitlines():
    if line.startswith('RESULT '):
      _, kind, payload = line.split(' ', 2)
      result = json.loads(payload)
      losses = [v for _, v in events.read_scalars(root / kind)['train/loss']]
      out[kind] = (losses, np.load(root / f'{kind}_params.npy'), result['step'], result['layout'])
  assert set(out) == set(RUNS)
  return out


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
  return _run(1, tmp_path_factory.mktemp('one_device'))


@pytest.fixture(scope='module')
def two_devices(tmp_path_factory):
  return _run(2, tmp_path_factory.mktemp('two_devices'))


@pytest.mark.parametrize('kind', list(RUNS))
def test_two_devices_split_the_batch_by_examples(two_devices, kind):
  layout = two_devices[kind][3]
  b = 8  # train.batch_size of runlocal
  example = [4, 32, 32, 1] if kind == 'video' else [128, 1]  # data.num_frames / data.length of runlocal
  assert layout['x']['global'] == [b, *example]
  assert layout['x']['shards'] == [[b // 2, *example]] * 2  # whole clips / waveforms on each device
  assert layout['cond']['shards'] == [[b // 2]] * 2
  for entry in layout.values():
    assert entry['rows'] == [[0, b // 2], [b // 2, b]] and entry['equal']


@pytest.mark.parametrize('kind', list(RUNS))
def test_two_devices_train_as_one(one_device, two_devices, kind):
  losses, params, step, _ = two_devices[kind]
  reference_losses, reference_params, reference_step, _ = one_device[kind]
  assert step == reference_step == 4 and len(losses) == 4
  np.testing.assert_allclose(losses, reference_losses, rtol=2e-5)
  np.testing.assert_allclose(params, reference_params, rtol=0, atol=2e-4)
  assert np.max(np.abs(params - reference_params)) < 0.05 * np.max(np.abs(reference_params))
