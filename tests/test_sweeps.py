"""Sweeps: overrides, names and validation in-process; the runner and the collector on a real two-run sweep.

The end-to-end part runs ``experiments/sweep.py`` on two 2-step runs of ``configs/digits.py:runlocal`` (one compiled
program, shared through the persistent compilation cache), runs it again (nothing is launched), resumes a run whose
last checkpoint and marker were removed, evaluates one run's checkpoint through an eval-only sweep, and checks the
collector's table and CSV against the event files and eval JSON read independently.
"""

import csv
import io
import json
import re
import shlex
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from diffax.trainer import events
import trainer_runs

sys.path.insert(0, str(trainer_runs.REPO / 'experiments'))
import collect  # noqa: E402
import sweep  # noqa: E402
from sweeps_lib import jobs as jobs_lib  # noqa: E402
from sweeps_lib import spec  # noqa: E402
from sweeps_lib import validation  # noqa: E402

TINY = {'train.num_steps': 2, 'train.checkpoint_every': 1, 'train.log_every': 1, 'train.sample_every': 0,
        'train.eval_every': 2, 'eval.num_samples_train': 16}
SAFE_NAME = r'[A-Za-z0-9._+=,-]+'


def test_grid_and_product():
  axes = spec.product(spec.grid('diffusion.schedule', ['linear', 'cosine']), spec.grid('seed', [0, 1, 2]))
  assert axes == [{'diffusion.schedule': s, 'seed': k} for s in ('linear', 'cosine') for k in (0, 1, 2)]
  zipped = [{'b': 2}, {'b': 3, 'c': 4}]
  assert spec.product(spec.grid('a', [1]), zipped) == [{'a': 1, 'b': 2}, {'a': 1, 'b': 3, 'c': 4}]
  with pytest.raises(spec.SweepError, match="'a'"):
    spec.product(spec.grid('a', [1]), spec.grid('a', [2]))


def test_run_names_are_short_readable_and_safe():
  runs = spec.expand(spec.Sweep(config='configs/digits.py', overrides=spec.product(
      spec.grid('sample.num_steps', [5]), spec.grid('train.num_steps', [100]),
      spec.grid('diffusion.schedule', ['linear']), spec.grid('train.ema_decays', [(0.99, 0.999)]),
      spec.grid('train.ema_warmup', [False]), spec.grid('optim.learning_rate', [3e-4]))))
  assert runs[0].name == ('sample.num_steps=5,train.num_steps=100,schedule=linear,ema_decays=0.99+0.999,'
                          'ema_warmup=false,learning_rate=0.0003')
  assert spec.expand(spec.Sweep(config='c.py'))[0].name == 'base'
  long = spec.run_name({'sample.kwargs.note': 'x' * 300}, {'sample.kwargs.note': 'note'})
  assert len(long) <= 120 and re.fullmatch(SAFE_NAME, long)
  assert long != spec.run_name({'sample.kwargs.note': 'x' * 299 + 'y'}, {'sample.kwargs.note': 'note'})
  odd = spec.run_name({'data.data_dir': '/a b/c:d'}, {'data.data_dir': 'data_dir'})
  assert odd == 'data_dir=_a_b_c_d' and re.fullmatch(SAFE_NAME, runs[0].name)
  with pytest.raises(spec.SweepError, match='share the workdir name'):
    spec.expand(spec.Sweep(config='c.py', overrides=spec.grid('data.data_dir', ['a b', 'a_b'])))


@pytest.mark.parametrize('key, value', [('train.num_steps', 7), ('optim.learning_rate', 3e-4),
                                        ('optim.learning_rate', 1), ('diffusion.schedule', 'linear'),
                                        ('train.ema_decays', (0.99, 0.999)), ('train.ema_decays', (0.9,)),
                                        ('train.async_checkpointing', False), ('data.data_dir', '/x/y z')])
def test_overrides_parse_back_as_on_the_command_line(key, value):
  """What ``--config.KEY=flag_value(v)`` gives through ml_collections' flag parser is the sweep's value."""
  config = validation.parse_config('configs/digits.py:runlocal', {key: value})
  section, name = key.split('.')
  assert config[section][name] == value and type(config[section][name]) is type(
      trainer_runs.load_test_config()[section][name])


@pytest.mark.parametrize('overrides, message', [
    ({'diffusion.schedul': 'linear'}, "unknown config key 'diffusion.schedul' (did you mean 'diffusion.schedule'?)"),
    ({'trian.num_steps': 3}, "unknown config key 'trian.num_steps' (did you mean 'train.num_steps'?)"),
    ({'diffusion': 'x'}, "'diffusion' is a section"),
    ({'diffusion.schedule': 'quadratic'}, "config.diffusion.schedule: 'quadratic' is not one of"),
    ({'train.num_steps': 'many'}, 'config.train.num_steps'),
    ({'train.num_steps': 0}, 'config.train.num_steps: must be positive'),
])
def test_validation_names_the_run_and_key(overrides, message):
  s = spec.Sweep(config='configs/digits.py:runlocal', overrides=[{'seed': 1}, overrides])
  with pytest.raises(spec.SweepError) as error:
    validation.validate(s, spec.expand(s))
  assert message in str(error.value) and str(error.value).startswith('run ')


def test_validation_of_eval_steps_and_eval_only_sweeps():
  s = spec.Sweep(config='configs/digits.py:runlocal', overrides=spec.grid('seed', [0]), eval=True,
                  eval_overrides={'eval.num_samples': 0})
  with pytest.raises(spec.SweepError, match=r'run seed=0 \(eval\): config.eval.num_samples'):
    validation.validate(s, spec.expand(s))
  s = spec.Sweep(config='configs/digits.py:runlocal', source='w', overrides=spec.grid('diffusion.prediction', ['v']))
  with pytest.raises(spec.SweepError, match=r'only sample\.\*, eval\.\*, mesh\.\* may vary'):
    validation.validate(s, spec.expand(s))
  open_section = spec.Sweep(config='configs/digits.py:runlocal', overrides=spec.grid('sample.kwargs.eta', [0.5]),
                             fixed={'sample.sampler': 'ddim'})
  assert validation.validate(open_section, spec.expand(open_section)) == {'eta=0.5': 6}


def test_commands_and_selection(tmp_path):
  s = spec.Sweep(config='configs/digits.py:runlocal', overrides=spec.product(
      spec.grid('sample.sampler', ['ddim', 'dpm_solver']), spec.grid('sample.num_steps', [5, 10])),
      fixed={'train.num_steps': 3}, eval=True, eval_overrides={'eval.num_samples': 64})
  runs = spec.expand(s)
  assert [r.name for r in spec.select(runs, ['sampler=ddim'])] == ['sampler=ddim,num_steps=5',
                                                                    'sampler=ddim,num_steps=10']
  assert [r.name for r in spec.select(runs, ['sample.num_steps=10', 'sampler=ddim', 'sampler=dpm_solver'])] == [
      'sampler=ddim,num_steps=10', 'sampler=dpm_solver,num_steps=10']
  jobs = jobs_lib.make_jobs(s, runs[:1], {runs[0].name: 3}, root=str(tmp_path), python='python', logs='')
  train, evaluate = jobs[0].commands
  workdir = f'{tmp_path}/sampler=ddim,num_steps=5'
  common = ['--config=configs/digits.py:runlocal', f'--workdir={workdir}']
  assert train == ['python', '-m', 'diffax.main', *common, '--mode=train', '--config.train.num_steps=3',
                   '--config.sample.sampler=ddim', '--config.sample.num_steps=5']
  assert evaluate == ['python', '-m', 'diffax.main', *common, '--mode=eval', '--config.train.num_steps=3',
                      '--config.sample.sampler=ddim', '--config.sample.num_steps=5', '--config.eval.num_samples=64']
  line = jobs[0].shell_line()
  assert subprocess.run(['bash', '-n', '-c', line], check=False).returncode == 0
  parts = line.split(' && ')
  assert [shlex.split(p) for p in parts[:2]] == [train, evaluate]
  assert parts[2] == f'test -d {shlex.quote(workdir + "/checkpoints/3")}' and parts[3:] == [
      jobs[0].marker_line().split(' && ')[1]]
  marker = json.loads(shlex.split(parts[3].split(' > ')[0])[2])
  assert marker['spec']['steps'][1] == ['eval', {'train.num_steps': 3, 'sample.sampler': 'ddim', 'sample.num_steps': 5,
                                                 'eval.num_samples': 64}]


def test_slurm_launcher_writes_one_job_per_run(tmp_path, capsys):
  sweep_file = tmp_path / 'grid.py'
  sweep_file.write_text('from sweeps_lib import spec\nSWEEP = spec.Sweep(config="configs/digits.py:runlocal", '
                        'overrides=spec.grid("seed", [0, 1]))\n')
  code = sweep.main([str(sweep_file), '--root', str(tmp_path / 'root'), '--launcher', 'slurm', '--dry-run', '--',
                     '--nodes', '2', '--gpus-per-node', '4', '--partition', 'a100'])
  out = capsys.readouterr().out
  assert code == 0 and out.count('#!/bin/bash') == 2 and not (tmp_path / 'root').exists()
  for seed in (0, 1):
    workdir = tmp_path / 'root' / f'seed={seed}'
    assert f'#SBATCH --job-name=grid:seed={seed}\n' in out and f'#SBATCH --output={workdir}/slurm-%j.out\n' in out
    srun = next(shlex.split(l) for l in out.splitlines() if l.startswith('srun ') and f'seed={seed}' in l)
    assert srun[:4] == ['srun', '--nodes=2', '--ntasks-per-node=4', '--kill-on-bad-exit=1']
    assert srun[4:] == jobs_lib.command('configs/digits.py:runlocal', str(workdir), 'train', {'seed': seed},
                                        python='python')
  assert out.count('#SBATCH --partition=a100\n') == 2 and out.count(' > ') == 2  # the DONE marker lines


def test_sweep_files_import_the_spec(tmp_path):
  good, old = tmp_path / 'good.py', tmp_path / 'old.py'
  good.write_text('from sweeps_lib import spec\nSWEEP = spec.Sweep(config="c.py", overrides=spec.grid("seed", [0]))\n')
  assert spec.load(good) == spec.Sweep(config='c.py', overrides=[{'seed': 0}])
  old.write_text('import sweep\nSWEEP = sweep.Sweep(config="c.py")\n')
  with pytest.raises(spec.SweepError, match='from sweeps_lib import spec'):
    spec.load(old)
  (tmp_path / 'none.py').write_text('SWEEPS = 1\n')
  with pytest.raises(spec.SweepError, match='defines no SWEEP'):
    spec.load(tmp_path / 'none.py')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A real two-run sweep, run once, again, and after losing its last checkpoint; plus an eval-only sweep."""
  tmp = tmp_path_factory.mktemp('sweep')
  (tmp / 'tiny.py').write_text(f'from sweeps_lib import spec\nSWEEP = spec.Sweep(config="configs/digits.py:runlocal", '
                               f'overrides=spec.grid("seed", [0, 1]), fixed={TINY!r})\n')
  root = tmp / 'root'

  def run(sweep_file, root_dir):
    proc = subprocess.run([sys.executable, str(trainer_runs.REPO / 'experiments' / 'sweep.py'), str(sweep_file),
                           '--root', str(root_dir), '--parallel', '1'], env=trainer_runs.env_with(1),
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, trainer_runs.failure_excerpt(proc.stdout + proc.stderr)
    return proc.stdout

  first = run(tmp / 'tiny.py', root)
  done_before = {s: (root / f'seed={s}' / 'DONE').read_text() for s in (0, 1)}
  second = run(tmp / 'tiny.py', root)
  # Interrupted after step 1: no marker, no final checkpoint.
  (root / 'seed=1' / 'DONE').unlink()
  subprocess.run(['rm', '-r', str(root / 'seed=1' / 'checkpoints' / '2')], check=True)
  third = run(tmp / 'tiny.py', root)
  (tmp / 'nfe.py').write_text(f'from sweeps_lib import spec\nSWEEP = spec.Sweep(config="configs/digits.py:runlocal", '
                              f'source="{root}/seed=0", overrides=spec.grid("sample.sampler", ["ddim"]), '
                              f'fixed={{"sample.num_steps": 2, "eval.num_samples": 16}})\n')
  evaluated = run(tmp / 'nfe.py', tmp / 'nfe')
  return dict(root=root, nfe=tmp / 'nfe', first=first, second=second, third=third, evaluated=evaluated,
              done_before=done_before)


def test_runner_trains_skips_and_resumes(trained):
  root = trained['root']
  assert 'seed=0: finished' in trained['first'] and 'seed=1: finished' in trained['first']
  for seed in (0, 1):
    run_dir = root / f'seed={seed}'
    assert json.loads((run_dir / 'run.json').read_text())['overrides'] == {'seed': seed}
    assert json.loads((run_dir / 'DONE').read_text())['spec']['steps'] == [['train', {**TINY, 'seed': seed}]]
    assert sorted(p.name for p in (run_dir / 'checkpoints').iterdir()) == ['1', '2']
  assert json.loads((root / 'sweep.json').read_text())['runs'] == {'seed=0': {'seed': 0}, 'seed=1': {'seed': 1}}
  # The second invocation launched nothing: both skipped, markers and logs untouched.
  assert trained['second'].count('done, skipped') == 2 and 'started' not in trained['second']
  assert (root / 'seed=0' / 'DONE').read_text() == trained['done_before'][0]
  assert (root / 'seed=0' / 'log.txt').read_text().count('\n=== ') == 1
  # The third resumed seed=1 from its step-1 checkpoint and trained step 2 again.
  assert 'seed=0: done, skipped' in trained['third'] and 'seed=1: finished' in trained['third']
  log = (root / 'seed=1' / 'log.txt').read_text()
  assert log.count('\n=== ') == 2 and 'Resumed from step 1' in log.split('\n=== ')[2]
  assert (root / 'seed=1' / 'DONE').read_text() != trained['done_before'][1]


def test_eval_only_sweep_reads_the_source_checkpoint(trained):
  run_dir = trained['nfe'] / 'sampler=ddim'
  assert (run_dir / 'checkpoints').resolve() == (trained['root'] / 'seed=0' / 'checkpoints').resolve()
  [result] = [json.loads(p.read_text()) for p in (run_dir / 'eval').glob('step_*.json')]
  assert result['step'] == 2 and result['protocol']['sampler'] == 'ddim' and result['protocol']['nfe'] == 2
  assert (run_dir / 'DONE').exists() and not list((trained['root'] / 'seed=0').glob('eval/*ddim*'))


def test_collector_table_csv_and_plot(trained, tmp_path, capsys):
  out_csv, out_png = tmp_path / 'r.csv', tmp_path / 'r.png'
  assert collect.main([str(trained['root']), str(trained['nfe']), '--csv', str(out_csv), '--plot', str(out_png)]) == 0
  table = capsys.readouterr().out
  rows = {r['run']: r for r in csv.DictReader(io.StringIO(out_csv.read_text()))}
  assert sorted(rows) == ['sampler=ddim', 'seed=0', 'seed=1']
  for seed in (0, 1):
    run_dir, row = trained['root'] / f'seed={seed}', rows[f'seed={seed}']
    losses = events.read_scalars(str(run_dir))['train/loss']
    assert [s for s, _ in losses] == [1, 2] and row['seed'] == str(seed) and row['steps'] == '2'
    assert float(row['train/loss final']) == np.mean([v for _, v in losses])
    assert float(row['train/loss best']) == min(v for _, v in losses)
    [record] = [json.loads(p.read_text()) for p in (run_dir / 'eval').glob('step_*.json')]
    for metric, value in record['metrics'].items():
      assert float(row[f'eval/{metric} final']) == value and row[f'eval/{metric} best step'] == '2'
    cells = [c.strip() for c in next(l for l in table.splitlines() if l.startswith(f'| seed={seed} ')).split('|')]
    assert f'{np.mean([v for _, v in losses]):.4g}' in cells and f'{record["metrics"]["digits_fd"]:.4g}' in cells
  nfe_row = rows['sampler=ddim']
  assert nfe_row['sample.sampler'] == 'ddim' and nfe_row['nfe'] == '2' and nfe_row['train/loss final'] == ''
  with Image.open(out_png) as image:
    assert image.format == 'PNG' and image.size[0] > image.size[1] > 100
