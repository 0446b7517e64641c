"""Flow matching against the v-prediction default on the embedded digits, at equal training steps.

  nice python experiments/flow_digits.py [--steps 1500] [--samples 1000] [--out experiments/results/flow_digits.md]

Trains ``configs/digits.py`` (cosine schedule, v-prediction, the v-MSE) and ``configs/digits.py:flow`` (rectified
flow: the linear interpolant, velocity prediction, the conditional flow-matching loss with t ~ U(0, 1)) with the
real ``python -m diffax.main`` for the same number of steps (the default's 1,500; same U-Net, optimizer, batch,
EMA and label dropout), then reads each run's EMA weights (``diffax.trainer.restore.restore_ema_params``) and
evaluates ``--samples`` guided samples (scale 1.5, as both configs) with the digits classifier
(``diffax.evaluation``: ``digits_accuracy``, ``digits_fd``) at 10 / 25 / 50 model evaluations for each sampler:
the model's own (DPM-Solver++(2M) for the default, flow Euler for the flow model), the other family's through the
parameterisation conversions, and flow Heun (``2 N - 1`` evaluations: 9 / 25 / 49). Printed and written: the
table, with the CPU minutes each training run and each evaluation cost (user + system time of the processes), and
with ``--spread K`` the digits_fd of each model's own sampler at the middle NFE over K sampling seeds (the noise of
the metric at this sample size). ``--reuse`` evaluates finished runs under ``--root`` again without training.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

import jax

from diffax.evaluation import evaluators
from diffax.trainer import restore

import digits_runs  # experiments/, this script's directory, is on sys.path

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODELS = (('v-prediction (digits default)', ''), ('flow (digits:flow)', 'flow'))
SAMPLERS = {'': ('dpm_solver', 'flow_euler'), 'flow': ('flow_euler', 'flow_heun', 'dpm_solver')}


def load_config(arg: str, **overrides):
  return digits_runs.load_config('digits', arg or None, **overrides)


def train(arg: str, workdir: pathlib.Path, steps: int, *, reuse: bool) -> tuple[float, float] | None:
  """Runs the real trainer (no evaluation during training); returns (CPU minutes, wall minutes), or None for a
  finished run that ``reuse`` keeps."""
  if (workdir / 'checkpoints').exists():
    if reuse and steps in restore.checkpoint_steps(str(workdir)):
      return None
    raise FileExistsError(f'{workdir} holds a run already (its cost would not be measured); pass another --root '
                          'or --reuse.')
  config = f'{ROOT}/configs/digits.py' + (f':{arg}' if arg else '')
  command = [sys.executable, '-m', 'diffax.main', f'--config={config}', f'--workdir={workdir}',
             f'--config.train.num_steps={steps}', '--config.train.eval_every=0',
             f'--config.train.checkpoint_every={steps}', f'--config.optim.warmup_steps={min(100, steps)}']
  cpu, wall = digits_runs.children_cpu_minutes(), time.perf_counter()
  proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'training {config} failed:\n{proc.stderr[-4000:]}')
  return digits_runs.children_cpu_minutes() - cpu, (time.perf_counter() - wall) / 60


def evaluate(arg: str, workdir: pathlib.Path, sampler: str, nfe: int, num_samples: int,
             evaluator: evaluators.DigitsEvaluator, seed: int = 0) -> dict[str, float]:
  """digits metrics of ``num_samples`` guided samples of the run's EMA weights with ``sampler`` at ``nfe``; the
  sampling seed is the trainer's evaluation seed (``sample.seed + 1``) plus ``seed``."""
  num_steps = (nfe + 1) // 2 if sampler == 'flow_heun' else nfe
  config = load_config(arg, **{'sample.sampler': sampler, 'sample.num_steps': num_steps})
  return digits_runs.evaluate(config, workdir, num_samples, evaluator, seed=seed)


def table(trained: dict, rows: list, nfes: list[int], args, guidance: float, spread: dict) -> str:
  lines = [f'# Flow matching vs the v-prediction default on the digits ({args.steps} training steps each)', '',
           f'`python experiments/flow_digits.py --steps {args.steps} --samples {args.samples}`; {args.samples} '
           f'samples (guidance scale {guidance:g}) per cell, digits classifier metrics (`diffax.evaluation.digits`; '
           'real test digits score digits_fd ~3.6). CPU minutes are user + system time of the processes (2 shared '
           f'cores; load average {" / ".join(f"{v:.1f}" for v in os.getloadavg())} at the end).', '',
           '## Training', '', '| model | CPU min | wall min |', '|---|---|---|']
  for name, cost in trained.items():
    lines.append(f'| {name} | {cost[0]:.1f} | {cost[1]:.1f} |' if cost else f'| {name} | (reused) | (reused) |')
  head = ' | '.join(f'NFE {n}: acc / FD' for n in nfes)
  lines += ['', '## Samples', '', f'| model | sampler | {head} | eval CPU min |',
            '|---|---|' + '---|' * len(nfes) + '---|']
  for name, sampler, cells in rows:
    shown = ' | '.join(f'{c["digits_accuracy"]:.3f} / {c["digits_fd"]:.2f}' + (
        f' ({c["nfe"]})' if c['nfe'] != n else '') for n, c in zip(nfes, cells))
    lines.append(f'| {name} | {sampler} | {shown} | {sum(c["cpu_min"] for c in cells):.1f} |')
  if spread:
    lines += ['', f'## Sampling noise: digits_fd of the same model and sampler at NFE {nfes[len(nfes) // 2]} over '
              f'{len(next(iter(spread.values())))} sampling seeds', '', '| model | sampler | digits_fd per seed |',
              '|---|---|---|']
    lines += [f'| {name} | {sampler} | {" ".join(f"{fd:.2f}" for fd in fds)} |' for (name, sampler), fds in
              spread.items()]
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=1500)
  parser.add_argument('--samples', type=int, default=1000)
  parser.add_argument('--nfe', default='10,25,50')
  parser.add_argument('--root', default=str(ROOT / 'workdirs' / 'flow_digits'))
  parser.add_argument('--out', default='')
  parser.add_argument('--runlocal', action='store_true', help='the configs\' runlocal variants (a smoke run)')
  parser.add_argument('--reuse', action='store_true', help='evaluate finished runs under --root without training')
  parser.add_argument('--spread', type=int, default=0, help='sampling seeds for the noise of digits_fd (0 = off)')
  args = parser.parse_args()
  nfes = [int(n) for n in args.nfe.split(',')]
  root = pathlib.Path(args.root)
  trained = {}
  models = [(name, ','.join(filter(None, (arg, 'runlocal' if args.runlocal else '')))) for name, arg in MODELS]
  for name, arg in models:
    workdir = root / (arg or 'default')
    trained[name] = train(arg, workdir, args.steps, reuse=args.reuse)
    if trained[name]:
      print(f'trained {name}: {trained[name][0]:.1f} CPU min, {trained[name][1]:.1f} min', flush=True)
  evaluator = evaluators.DigitsEvaluator()
  rows = []
  with jax.numpy_dtype_promotion('standard'):
    for (name, arg), (_, family) in zip(models, MODELS):
      for sampler in SAMPLERS[family]:
        cells = [evaluate(arg, root / (arg or 'default'), sampler, n, args.samples, evaluator) for n in nfes]
        rows.append((name, sampler, cells))
        print(name, sampler, [(c['nfe'], round(c['digits_accuracy'], 3), round(c['digits_fd'], 2)) for c in cells],
              flush=True)
    spread = {}  # the model's own sampler at the middle NFE, over --spread sampling seeds
    for (name, arg), (_, family) in zip(models, MODELS):
      sampler = SAMPLERS[family][0]
      spread[name, sampler] = [evaluate(arg, root / (arg or 'default'), sampler, nfes[len(nfes) // 2], args.samples,
                                        evaluator, seed)['digits_fd'] for seed in range(args.spread)]
    spread = {key: fds for key, fds in spread.items() if fds}
  text = table(trained, rows, nfes, args, load_config(models[0][1]).sample.guidance_scale, spread)
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text)


if __name__ == '__main__':
  main()
