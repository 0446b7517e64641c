"""Fine-tuning through the real ``main``: LoRA (configs/digits_lora.py), DreamBooth (digits_dreambooth.py) and a
ControlNet (digits_controlnet.py), shrunk to ``runlocal``, from one 2-step base trained by the real main; the base
workdir is hashed before and after and never changes. Plus the named errors for bad bases, targets, adapters and
control images, and the prior-preservation loss of DreamBooth against eq. 2 computed by hand."""

import hashlib
import pathlib
import shutil
import subprocess

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffax.models import lora
from diffax.trainer import config as config_lib, dreambooth, experiment, finetune, images, restore
import trainer_runs

CONFIGS = trainer_runs.REPO / 'configs'


@pytest.fixture(autouse=True)
def _standard_promotion():
  """optax's Adam bias correction computes ``float ** int32`` counts, which strict promotion rejects."""
  with jax.numpy_dtype_promotion('standard'):
    yield


def _digest(directory: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob('*')) if p.is_file()}


def _config(name: str, *overrides: str):
  return trainer_runs.load_test_config(*overrides, name=name)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """The base (2 steps of configs/digits.py:runlocal, the session's shared one, linked as ROOT/base), then LoRA,
  DreamBooth and ControlNet runs on it."""
  root = tmp_path_factory.mktemp('finetune')
  base = root / 'base'
  base.symlink_to(trainer_runs.shared_base(tmp_path_factory), target_is_directory=True)
  before = _digest(base)
  small = ('sample.num_samples=8', 'eval.batch_size=8', 'train.num_steps=2', 'train.checkpoint_every=2')
  runs = {name: subprocess.Popen(trainer_runs.main_command(root / name, f'finetune.base_workdir={base}', *small,
                                                           config=f'{CONFIGS}/{name}.py:runlocal'),
                                 env=trainer_runs.env_with(), cwd=trainer_runs.REPO, stderr=subprocess.PIPE, text=True)
          for name in ('digits_lora', 'digits_dreambooth', 'digits_controlnet')}  # concurrently: one base, three runs
  for name, proc in runs.items():
    _, log = proc.communicate(timeout=900)
    assert proc.returncode == 0, f'{name} failed:\n{trainer_runs.failure_excerpt(log)}'
  return root, before


def _final_state(name: str, workdir: pathlib.Path, *overrides: str):
  exp = experiment.Experiment(_config(name, *overrides), workdir)
  state = exp.checkpointer.restore(exp.abstract_state)
  exp.checkpointer.close()
  return exp, state


def _base_params(root: pathlib.Path, exp) -> dict:
  return restore.restore_ema_params(str(root / 'base'), exp.tuning.abstract_base)


def _assert_equal_trees(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_lora_run_trains_only_its_adapters_and_saves_them_alone(runs):
  root, before = runs
  workdir = root / 'digits_lora'
  exp, state = _final_state('digits_lora', workdir, f'finetune.base_workdir={root / "base"}')
  _assert_equal_trees(state.params['base'], _base_params(root, exp))  # frozen: exact-zero updates
  adapters, lora_config = finetune.load_adapters(str(workdir / 'adapters' / 'lora.npz'))
  assert (lora_config.rank, lora_config.targets) == (4, ('attention', 'resblock_convs'))
  _assert_equal_trees(adapters, jax.device_get(state.ema_params[0]['lora']))  # the sampled (EMA) adapters
  assert all(np.abs(b).max() > 0 for _, b in lora.adapter_paths(adapters).values())  # every B left zero
  assert sorted(p.name for p in (workdir / 'adapters').glob('*.npz')) == ['lora.npz', 'lora_step_00000002.npz']
  base_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state.params['base']))
  assert (workdir / 'adapters' / 'lora.npz').stat().st_size < 0.25 * base_bytes
  assert _digest(root / 'base') == before  # the base workdir is never written to


def test_adapters_load_onto_a_base_with_weights_at_sampling(runs, tmp_path):
  """Sampling the LoRA run with its own adapter merged again at weight -1 gives the base's samples (the grid the
  base run wrote at its end, with the same sampler, seed and step)."""
  root, _ = runs
  lora_file = root / 'digits_lora' / 'adapters' / 'lora.npz'
  run_copy = tmp_path / 'lora_copy'  # sampling writes into the workdir
  shutil.copytree(root / 'digits_lora', run_copy)
  trainer_runs.run_main(run_copy, f'finetune.base_workdir={root / "base"}', 'sample.num_samples=8',
                        'eval.batch_size=8', f"finetune.adapters=('{lora_file}:-1.0',)", mode='sample',
                        config=f'{CONFIGS}/digits_lora.py:runlocal')
  cancelled = np.load(run_copy / 'samples' / 'samples_step_00000002.npz')['images']
  base_grid = np.asarray(Image.open(root / 'base' / 'samples' / 'step_00000002.png'))[::4, ::4, None]  # scale 4
  np.testing.assert_allclose(images.grid(cancelled, columns=8).astype(np.float32), base_grid, atol=1.0)  # 8 samples


def test_dreambooth_run_adds_the_instance_label_and_keeps_its_class_images(runs):
  root, before = runs
  workdir = root / 'digits_dreambooth'
  with np.load(workdir / 'dreambooth' / 'class_images.npz') as f:
    class_images, label = f['images'], int(f['label'])
  assert class_images.shape == (8, 8, 8, 1) and class_images.dtype == np.uint8 and label == 7
  assert (workdir / 'dreambooth' / 'class_images.png').exists()
  exp, state = _final_state('digits_dreambooth', workdir, f'finetune.base_workdir={root / "base"}')
  base = restore.restore_ema_params(str(root / 'base'), exp.tuning.abstract_restored)
  table = np.asarray(state.params['label_embed']['table']['embedding'])
  base_table = base['label_embed']['table']['embedding']
  assert table.shape == (12, base_table.shape[1]) and base_table.shape[0] == 11  # 10 classes + [V] + null
  start = dreambooth.add_label(base, exp.tuning.abstract_base, class_label=7)['label_embed']['table']['embedding']
  np.testing.assert_array_equal(start[10], base_table[7])  # [V] starts as its class noun
  np.testing.assert_array_equal(start[11], base_table[10])  # the null label keeps its row
  assert np.abs(table[10] - start[10]).max() > 0  # full fine-tuning moved the new label's embedding
  assert _digest(root / 'base') == before


def test_controlnet_run_freezes_the_base_and_trains_the_copy(runs):
  root, before = runs
  workdir = root / 'digits_controlnet'
  exp, state = _final_state('digits_controlnet', workdir, f'finetune.base_workdir={root / "base"}')
  base = _base_params(root, exp)
  _assert_equal_trees(state.params['base'], base)
  control = flax.traverse_util.flatten_dict(jax.device_get(state.params['control']))
  zero = [np.abs(v).max() for k, v in control.items() if k[0].startswith('zero_') and k[-1] == 'kernel']
  assert zero and max(zero) > 0  # the zero convolutions left zero
  assert (workdir / 'samples' / 'step_00000002.png').exists()
  assert _digest(root / 'base') == before


def test_bad_fine_tuning_inputs_are_named_config_errors(runs, tmp_path):
  root, before = runs
  base = f'finetune.base_workdir={root / "base"}'
  with pytest.raises(config_lib.ConfigError, match=r'finetune.base_workdir.*holds no checkpoints'):
    experiment.Experiment(_config('digits_lora', f'finetune.base_workdir={tmp_path / "nothing"}'), tmp_path / 'a')
  with pytest.raises(config_lib.ConfigError, match=r"finetune.lora_targets.*'nothing_\.\*' matches no.*"
                                                   r'down_1_attn_0/attn/query'):
    experiment.Experiment(_config('digits_lora', base, "finetune.lora_targets=('nothing_.*',)"), tmp_path / 'b')
  other = _config('digits_lora', base, 'finetune.mode=full')
  other.model.overrides.ch = 8  # another architecture than the base's
  exp = experiment.Experiment(other, tmp_path / 'c')
  with pytest.raises(config_lib.ConfigError, match=r'finetune.base_workdir.*another architecture.*conv_in/'):
    exp.restore_or_init()
  lora_dir = root / 'digits_lora' / 'adapters' / 'lora.npz'
  with pytest.raises(config_lib.ConfigError, match=r'finetune.adapters.*no adapter file'):
    experiment.Experiment(_config('digits_lora', base, f"finetune.adapters=('{tmp_path}/missing.npz:0.5',)"),
                          tmp_path / 'd')
  small = _config('digits_lora', base, f"finetune.adapters=('{lora_dir}:0.5',)")
  small.model.overrides.ch = 8
  with pytest.raises(config_lib.ConfigError, match=r'finetune.adapters.*has A .* the layer'):
    experiment.Experiment(small, tmp_path / 'e')
  wrong = tmp_path / 'control.npy'
  np.save(wrong, np.zeros((2, 16, 16, 1), np.float32))
  with pytest.raises(config_lib.ConfigError, match=r'sample.control.*\(2, 16, 16, 1\).*\[N, 8, 8, 1\]'):
    experiment.Experiment(_config('digits_controlnet', base, f'sample.control={wrong}'), tmp_path / 'f')
  with pytest.raises(config_lib.ConfigError, match=r"finetune.mode.*DreamBooth.*'full' or 'subtrees'"):
    experiment.Experiment(_config('digits_dreambooth', base, 'finetune.mode=lora'), tmp_path / 'g')
  with pytest.raises(config_lib.ConfigError, match=r'finetune.base_workdir.*own workdir'):
    experiment.Experiment(_config('digits_lora', base), root / 'base')
  assert _digest(root / 'base') == before


def test_prior_preservation_loss_is_eq2_over_the_batch_halves():
  per_example = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0])
  inner = lambda params, batch, rng: (jnp.mean(per_example), {'loss': per_example})
  loss_fn = dreambooth.prior_preservation_loss(inner, instance_label=10, prior_weight=0.5)
  loss, aux = loss_fn(None, {'cond': jnp.asarray([10, 7, 10, 7, 7], jnp.int32)}, None)
  np.testing.assert_allclose(loss, (1.0 + 3.0) / 2 + 0.5 * (2.0 + 4.0 + 5.0) / 3, rtol=1e-6)
  np.testing.assert_array_equal(aux['instance'], [1, 0, 1, 0, 0])
