"""Distillation in the trainer: the real main distils a teacher trained by the real main (progressive rounds and
consistency distillation), the teacher is read into the one state and never written, and bad distill configs are
named errors before any step."""

import hashlib
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from diffax.trainer import config as config_lib, experiment, restore
import trainer_runs

DISTILL = f'{trainer_runs.REPO}/configs/digits_distill.py'


def _digest(directory: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob('*')) if p.is_file()}


def _config(variant: str, teacher) -> config_lib.ml_collections.ConfigDict:
  c = config_lib.load_file(DISTILL, f'{variant}+runlocal')
  c.distill.teacher_workdir = str(teacher)
  return c


def _leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A 2-step teacher from the digits test config (the session's shared base), and a progressive and a consistency
  student of it."""
  teacher = trainer_runs.shared_base(tmp_path_factory)
  before = _digest(teacher)
  students = {}
  for variant in ('progressive', 'consistency'):
    students[variant] = tmp_path_factory.mktemp(variant)
    trainer_runs.run_main(students[variant], f'distill.teacher_workdir={teacher}',
                          config=f'{DISTILL}:{variant}+runlocal')
  return teacher, before, students


def _state(variant: str, teacher, workdir, step: int):
  exp = experiment.Experiment(_config(variant, teacher), workdir)
  state = exp.checkpointer.restore(exp.abstract_state, step=step)
  exp.checkpointer.close()
  return state


def _teacher_ema(teacher, scratch):
  exp = experiment.Experiment(_config('consistency', teacher), scratch)  # the student's shapes, not its workdir
  return restore.restore_ema_params(str(teacher), exp.abstract_state.params)


def test_the_teacher_workdir_is_only_read(runs):
  teacher, before, _ = runs
  assert _digest(teacher) == before


def test_progressive_rounds_replace_the_teacher_by_the_student(runs):
  """runlocal: 8 -> 4 -> 2 DDIM steps in 2 rounds of 2 train steps; a round's end copies the student into the
  frozen teacher (Algorithm 2's eta <- theta), the last round's end does not."""
  teacher, _, students = runs
  end_of_round_1 = _state('progressive', teacher, students['progressive'], 2)
  end = _state('progressive', teacher, students['progressive'], 4)
  for got, student in zip(_leaves(end_of_round_1.frozen['teacher']), _leaves(end_of_round_1.params)):
    np.testing.assert_array_equal(got, student)
  for got, student in zip(_leaves(end.frozen['teacher']), _leaves(end_of_round_1.params)):
    np.testing.assert_array_equal(got, student)
  assert any(not np.array_equal(a, b) for a, b in zip(_leaves(end.params), _leaves(end_of_round_1.params)))
  assert (students['progressive'] / 'samples' / 'step_00000004.png').exists()


def test_consistency_distillation_keeps_the_teacher_frozen(runs, tmp_path):
  teacher, _, students = runs
  ema = _leaves(_teacher_ema(teacher, tmp_path))
  end = _state('consistency', teacher, students['consistency'], 4)
  for got, want in zip(_leaves(end.frozen['teacher']), ema):
    np.testing.assert_array_equal(got, want)
  assert any(not np.array_equal(a, b) for a, b in zip(_leaves(end.params), ema))  # initialised from it, trained
  record = json.loads((students['consistency'] / 'config.json').read_text())
  assert record['config']['distill']['method'] == 'consistency_distillation' and record['example_shape'] == [8, 8, 1]
  assert (students['consistency'] / 'samples' / 'step_00000004.png').exists()


@pytest.mark.parametrize('overrides, key', [
    ({'distill.teacher_workdir': ''}, 'distill.teacher_workdir'),
    ({'sample.sampler': 'dpm_solver'}, 'sample.sampler'),
    ({'distill.teacher_steps': 12}, 'distill.teacher_steps'),
    ({'sample.guidance_scale': 2.0, 'diffusion.p_uncond': 0.1}, 'sample.guidance_scale'),
    ({'distill.method': 'progressive_v2'}, 'distill.method'),
])
def test_bad_distill_configs_name_the_key(tmp_path, overrides, key):
  c = _config('progressive', tmp_path)
  for name, value in overrides.items():
    section, leaf = name.split('.')
    c[section][leaf] = value
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(c)
  assert error.value.key == key


def test_a_teacher_of_another_network_or_shape_is_an_error_before_any_step(runs, tmp_path):
  teacher, _, _ = runs
  c = _config('consistency', teacher)
  c.model.overrides.ch = 8
  with pytest.raises(config_lib.ConfigError, match='differs from the teacher') as error:
    experiment.Experiment(c, tmp_path / 'other_network')
  assert error.value.key == 'model.overrides'
  moved = tmp_path / 'teacher_of_16x16'
  shutil.copytree(teacher, moved)
  record = json.loads((moved / 'config.json').read_text())
  (moved / 'config.json').write_text(json.dumps({**record, 'example_shape': [16, 16, 1]}))
  with pytest.raises(config_lib.ConfigError, match=r'\(16, 16, 1\)'):
    experiment.Experiment(_config('consistency', moved), tmp_path / 'other_shape')


def test_a_teacher_without_checkpoints_is_a_named_error(tmp_path):
  empty = tmp_path / 'never_trained'
  empty.mkdir()
  exp = experiment.Experiment(_config('consistency', empty), tmp_path / 'student')
  with pytest.raises(restore.RestoreError, match='distill.teacher_workdir'):
    exp.restore_or_init()


def test_progressive_guides_the_first_teacher_only(tmp_path):
  """Round 1 learns the guided teacher (w = 1.5); round 2 learns the previous student unguided, since its guidance
  is built in. Checked against the library loss with the same teacher, on a network whose null-label output
  differs, so guiding or not changes the target."""
  from diffax.diffusion import distillation
  from diffax.trainer import components, distill
  c = _config('progressive', tmp_path)  # runlocal: 2 rounds of 2 steps, 8 -> 4 -> 2
  schedule = components.build_schedule(c)

  def net(params, x, t, cond, *, train, rngs):
    del t, train, rngs
    null = (cond == c.data.num_classes).astype(x.dtype)[:, None, None, None]
    return params['w'] * x + params['b'] * (1.0 - null) - 0.3 * null

  objective = distill.build_objective(c, net, schedule, sigma_data=0.5, channels=1)
  params = {'w': np.float32(0.2), 'b': np.float32(0.4)}
  frozen = {'teacher': {'w': np.float32(0.5), 'b': np.float32(-0.2)}}
  batch = {'x': np.asarray(jax.random.normal(jax.random.PRNGKey(0), (6, 8, 8, 1))), 'cond': np.arange(6) % 10}
  rng = jax.random.PRNGKey(1)
  with jax.numpy_dtype_promotion('standard'):
    for step, steps, w in ((0, 4, 1.5), (2, 2, 1.0)):
      teacher = distillation.Teacher(net, frozen['teacher'], schedule, 'v', guidance_scale=w, null_label=10)
      want, _ = distillation.progressive_distillation_loss(net, teacher=teacher, num_student_steps=steps)(
          params, batch, rng)
      got, _ = jax.jit(lambda s: objective.loss_at(s, frozen, ())(params, batch, rng))(np.int32(step))
      np.testing.assert_allclose(got, want, rtol=1e-6)
      other = distillation.Teacher(net, frozen['teacher'], schedule, 'v', guidance_scale=2.5 - w, null_label=10)
      wrong, _ = distillation.progressive_distillation_loss(net, teacher=other, num_student_steps=steps)(
          params, batch, rng)
      assert abs(float(wrong) - float(got)) > 1e-3 * abs(float(got))
