"""Few-step students of the digits default against their 25-step teacher: quality per NFE and the CPU they cost.

  nice python experiments/distill_digits.py --teacher workdirs/digits [--samples 1000] [--out results.md]

The teacher is a finished ``make run`` workdir (``configs/digits.py``, read only: it is copied under ``--root``
first). Each student of ``configs/digits_distill.py`` (progressive to 4 and to 1 step, consistency distillation,
iCT) is trained with the real ``python -m diffax.main``; then ``--samples`` samples of every model's EMA weights
(classes cycling) are scored by the digits classifier (``digits_accuracy``, ``digits_fd``; real test digits score
digits_fd ~3.6) at the NFE each was made for. The teacher is shown at 25 NFE (DPM-Solver++(2M), guidance 1.5, as
it is evaluated) and, for comparison, with the same few DDIM / DPM-Solver++ steps the students take. The bars of
issue 11: a 4-step student within 1.5x the teacher's digits_fd at 25 NFE, and a 1-step consistency model with
digits_accuracy >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax

from diffax.evaluation import evaluators

import digits_runs  # experiments/, this script's directory, is on sys.path

ROOT = pathlib.Path(__file__).resolve().parents[1]
STUDENTS = {  # variant of configs/digits_distill.py -> the sampler steps it is evaluated at
    'progressive': (4,), 'progressive_1': (1,), 'consistency': (1, 2, 4), 'ict': (1, 2)}
TEACHER_ROWS = (('dpm_solver', 25, ''), ('ddim', 4, 'trailing'), ('dpm_solver', 4, ''), ('ddim', 1, 'trailing'))


def train_student(variant: str, teacher: pathlib.Path, workdir: pathlib.Path, steps: int) -> tuple[float, float]:
  """The real trainer on one variant (no evaluation during training); returns (CPU minutes, wall minutes).

  A finished run under ``workdir`` (with the ``cost.json`` this writes) is reused, so students can be trained in
  several invocations and tabled together."""
  cost_file = workdir / 'cost.json'
  if cost_file.exists():
    return tuple(json.loads(cost_file.read_text()))
  if (workdir / 'checkpoints').exists():
    raise FileExistsError(f'{workdir} holds an unfinished run (its cost would not be measured); pass another --root.')
  command = [sys.executable, '-m', 'diffax.main', f'--config={ROOT}/configs/digits_distill.py:{variant}',
             f'--workdir={workdir}', f'--config.distill.teacher_workdir={teacher}', '--config.train.eval_every=0',
             *([f'--config.train.num_steps={steps}', f'--config.train.checkpoint_every={steps}',
               f'--config.optim.warmup_steps={min(20, steps)}'] if steps else [])]
  cpu, wall = digits_runs.children_cpu_minutes(), time.perf_counter()
  proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'training {variant} failed:\n{proc.stderr[-4000:]}')
  cost = (digits_runs.children_cpu_minutes() - cpu, (time.perf_counter() - wall) / 60)
  cost_file.write_text(json.dumps(cost))
  return cost


def table(rows: list[tuple], costs: dict, args) -> str:
  teacher_fd = next(m['digits_fd'] for name, _, m in rows if name == 'teacher' and m['nfe'] == 25)
  lines = ['# Few-step students of the digits default (configs/digits_distill.py)', '',
           f'`python experiments/distill_digits.py --samples {args.samples}'
           f'{f" --steps {args.steps}" if args.steps else ""}`; {args.samples} samples per row, digits '
           'classifier metrics (`diffax.evaluation.digits`; real test digits: digits_fd ~3.6). Students learn the '
           'teacher guided at w = 1.5 and are sampled without guidance. CPU minutes: user + system time of the '
           f'training processes (2 shared cores; load average {" / ".join(f"{v:.1f}" for v in os.getloadavg())} '
           'at the end).', '',
           '| model | sampler | NFE | digits_accuracy | digits_fd | FD / teacher@25 | train CPU min | train wall min |',
           '|---|---|---|---|---|---|---|---|']
  for name, sampler, m in rows:
    cpu, wall = costs.get(name, (float('nan'), float('nan')))
    lines.append(f'| {name} | {sampler} | {m["nfe"]} | {m["digits_accuracy"]:.3f} | {m["digits_fd"]:.2f} | '
                 f'{m["digits_fd"] / teacher_fd:.2f} | {cpu:.1f} | {wall:.1f} |')
  four = [m['digits_fd'] for name, _, m in rows if name != 'teacher' and m['nfe'] == 4]
  one_cm = [m['digits_accuracy'] for name, _, m in rows if name in ('consistency', 'ict') and m['nfe'] == 1]
  lines.append('')
  if four:
    lines.append(f'Bar 1 (a 4-step student within 1.5x the teacher\'s digits_fd at 25 NFE, {1.5 * teacher_fd:.2f}): '
                 f'best 4-step student {min(four):.2f} -> {"met" if min(four) <= 1.5 * teacher_fd else "NOT met"}.')
  if one_cm:
    lines.append(f'Bar 2 (a 1-step consistency model with digits_accuracy >= 0.9): best {max(one_cm):.3f} -> '
                 f'{"met" if max(one_cm) >= 0.9 else "NOT met"}.')
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--teacher', default=str(ROOT / 'workdirs' / 'digits'), help='a finished make-run workdir')
  parser.add_argument('--samples', type=int, default=1000)
  parser.add_argument('--students', default=','.join(STUDENTS))
  parser.add_argument('--steps', type=int, default=0, help='train steps of every student; 0 = the config\'s')
  parser.add_argument('--root', default=str(ROOT / 'workdirs' / 'distill_digits'))
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  root = pathlib.Path(args.root)
  teacher = root / 'teacher'
  if not teacher.exists():
    shutil.copytree(args.teacher, teacher)  # the given workdir is only read
  costs = {}
  for variant in args.students.split(','):
    costs[variant] = train_student(variant, teacher, root / variant, args.steps)
    print(f'trained {variant}: {costs[variant][0]:.1f} CPU min, {costs[variant][1]:.1f} min', flush=True)
  evaluator = evaluators.DigitsEvaluator()
  rows = []
  with jax.numpy_dtype_promotion('standard'):
    for sampler, steps, spacing in TEACHER_ROWS:
      config = digits_runs.load_config('digits', None)
      config.sample.update(sampler=sampler, num_steps=steps, spacing=spacing)
      rows.append(('teacher', sampler, digits_runs.evaluate(config, teacher, args.samples, evaluator)))
      print(rows[-1], flush=True)
    for variant in args.students.split(','):
      for steps in STUDENTS[variant]:
        config = digits_runs.load_config('digits_distill', variant)
        config.distill.teacher_workdir = str(teacher)
        config.sample.num_steps = steps
        rows.append((variant, config.sample.sampler, digits_runs.evaluate(config, root / variant, args.samples, evaluator)))
        print(rows[-1], flush=True)
  text = table(rows, costs, args)
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text)


if __name__ == '__main__':
  main()
