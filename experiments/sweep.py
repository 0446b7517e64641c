"""Ablation sweeps: one base config, a list or product of overrides, one workdir per run.

A sweep file (``experiments/sweeps/<name>.py``) is data (``experiments/sweeps_lib/spec.py``)::

  from sweeps_lib import spec

  SWEEP = spec.Sweep(
      config='configs/digits.py',
      overrides=spec.product(spec.grid('diffusion.schedule', ['linear', 'cosine']),
                             spec.grid('diffusion.prediction', ['eps', 'v'])),
      fixed={'train.num_steps': 1500})

and this script runs it, from the repository root::

  python experiments/sweep.py experiments/sweeps/<name>.py --root workdirs/<name> [--parallel N]
      [--launcher local|print|slurm|tpu_vm] [--dry-run] [--only KEY=VALUE ...] [-- LAUNCHER OPTIONS]

Every run gets the workdir ``<root>/<run name>``, named from its own overrides (``schedule=linear,prediction=eps``:
the last part of each key, or the whole key where two would clash), holding ``run.json`` (config, overrides,
commands) and ``log.txt`` (stdout and stderr of every attempt). All overrides are checked before anything starts,
exactly as ``python -m diffax.main`` parses ``--config.KEY=VALUE`` followed by ``diffax.trainer.config.validate``, so a
misspelt key fails at once with the key named. Paths in a sweep file (``config``, ``source``) are relative to
the repository root; commands run there.

Launchers: ``local`` runs each run's commands as subprocesses, ``--parallel`` runs at a time; a run's ``DONE``
marker is written once every command succeeded (and training reached its final checkpoint), and later
invocations skip such runs; any other run is started again and the trainer resumes it from its newest checkpoint.
Failures name the run's log and do not stop the others. SIGINT / SIGTERM reach the trainers as SIGTERM (they
checkpoint and stop). ``print`` prints one shell line per pending run (the line writes ``DONE`` itself), for a
job queue or GNU parallel; ``slurm`` submits one sbatch job per run (``launch/slurm.py`` options after ``--``);
``tpu_vm`` runs the runs one after another on an existing slice (``launch/tpu_vm.py`` options after ``--``).
``--dry-run`` prints what each launcher would do and runs nothing.

This file is the command line only: ``sweeps_lib/`` holds the spec, the validation, the jobs and the executor.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import os
import pathlib
import shlex
import sys

from sweeps_lib import executor
from sweeps_lib import jobs as jobs_lib
from sweeps_lib import spec
from sweeps_lib import validation


def _launcher_options(name: str, argv: Sequence[str]) -> argparse.Namespace | None:
  if name in ('local', 'print'):
    if argv:
      raise spec.SweepError(f'--launcher {name} takes no options after --; got {list(argv)}.')
    return None
  sys.path.insert(0, str(spec.REPO))
  from launch import slurm, tpu_vm  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog=f'sweep.py --launcher {name} --')
  {'slurm': slurm, 'tpu_vm': tpu_vm}[name].add_options(p)
  return p.parse_args(argv)


def _submit_slurm(jobs: Sequence[jobs_lib.Job], options: argparse.Namespace, sweep_name: str, dry_run: bool) -> int:
  from launch import slurm  # pylint: disable=g-import-not-at-top
  for job in jobs:
    slurm.submit_once(options, job.commands, workdir=job.workdir, job_name=f'{sweep_name}:{job.run.name}',
                      label=job.run.name, setup=[job.link_line()] * bool(job.source_checkpoints),
                      epilogue=[job.marker_line()], dry_run=dry_run)
  return 0


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage='%(prog)s SWEEP_FILE --root DIR [options] [-- launcher options]')
  p.add_argument('sweep_file')
  p.add_argument('--root', required=True, help='directory (or gs://) that holds one workdir per run')
  p.add_argument('--parallel', type=int, default=1, help='local: runs at a time')
  p.add_argument('--launcher', choices=('local', 'print', 'slurm', 'tpu_vm'), default='local')
  p.add_argument('--dry-run', action='store_true', help='print what would run; run nothing')
  p.add_argument('--only', action='append', default=[], metavar='KEY=VALUE', help='run the matching runs only')
  p.add_argument('--logs', default='', help='local directory for log.txt files (default: the root)')
  return p


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  split = argv.index('--') if '--' in argv else len(argv)
  args, launcher_argv = parser().parse_args(argv[:split]), argv[split + 1:]
  sweep_name = pathlib.Path(args.sweep_file).stem
  sweep = spec.load(args.sweep_file)
  options = _launcher_options(args.launcher, launcher_argv)
  runs = spec.expand(sweep)
  selected = spec.select(runs, args.only)
  if not selected:
    raise spec.SweepError(f'--only {args.only} matches none of {[r.name for r in runs]}.')
  num_steps = validation.validate(sweep, selected)
  root = args.root if '://' in args.root else os.path.abspath(args.root)
  if args.launcher != 'local' and args.parallel != 1:
    raise spec.SweepError(f'--parallel is for --launcher local (got --launcher {args.launcher}).')
  logs = args.logs or (f'logs/{sweep_name}' if '://' in root else '')
  local = args.launcher == 'local'
  jobs = jobs_lib.make_jobs(sweep, selected, num_steps, root=root, python=sys.executable if local else 'python',
                            logs=logs)
  if args.launcher == 'tpu_vm':
    from launch import tpu_vm  # pylint: disable=g-import-not-at-top
    for job in jobs:
      job.commands = [tpu_vm.run_command(options, c, prelude=job.link_line()) for c in job.commands]
  states = {job.run.name: jobs_lib.state(job) for job in jobs}
  pending = [job for job in jobs if states[job.run.name] != 'done']
  counts = {s: sum(v.startswith(s) for v in states.values()) for s in ('done', 'resume', 'new')}
  print(f'Sweep {sweep_name}: {len(jobs)} of {len(runs)} runs under {root} ({counts["done"]} done, '
        f'{counts["resume"]} to resume, {counts["new"]} new).', file=sys.stderr if args.launcher == 'print' else None,
        flush=True)
  if args.launcher == 'print':
    for job in pending:
      print(job.shell_line())
    return 0
  if args.launcher == 'slurm':
    return _submit_slurm(pending, options, sweep_name, args.dry_run)
  if args.dry_run:
    for job in jobs:
      print(f'[{job.index + 1}/{len(jobs)}] {job.run.name}: {states[job.run.name]}')
      if states[job.run.name] != 'done':
        for argv_ in job.commands:
          print(f'  {shlex.join(argv_)}')
    return 0
  return executor.run_here(sweep, runs, jobs, states, root=root, sweep_file=args.sweep_file, sweep_name=sweep_name,
                           parallel=args.parallel, link_sources=local)


if __name__ == '__main__':
  try:
    sys.exit(main())
  except spec.SweepError as error:
    sys.exit(f'sweep: {error}')
