"""Ablation sweeps: one base config, a list or product of overrides, one workdir per run.

A sweep file (``experiments/sweeps/<name>.py``) is data::

  import sweep

  SWEEP = sweep.Sweep(
      config='configs/digits.py',
      overrides=sweep.product(sweep.grid('diffusion.schedule', ['linear', 'cosine']),
                              sweep.grid('diffusion.prediction', ['eps', 'v'])),
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
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
import concurrent.futures
import dataclasses
import datetime
import difflib
import hashlib
import importlib.util
import itertools
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
EVAL_SECTIONS = ('sample.', 'eval.', 'mesh.')
"""What an eval-only sweep may vary: the checkpoint fixes everything else."""

Overrides = dict[str, Any]


class SweepError(ValueError):
  """A sweep that cannot run; the message names the run and the key."""


_PRINT_LOCK = threading.Lock()


def _say(message: str) -> None:
  """One whole line to stdout, also from worker threads."""
  with _PRINT_LOCK:
    sys.stdout.write(message + '\n')
    sys.stdout.flush()


def grid(key: str, values: Iterable[Any]) -> list[Overrides]:
  """One axis: ``[{key: v} for v in values]``."""
  return [{key: v} for v in values]


def product(*axes: Sequence[Mapping[str, Any]]) -> list[Overrides]:
  """Every combination of the axes (the last varies fastest), e.g. ``product(grid(a, ...), grid(b, ...))``."""
  runs = []
  for combination in itertools.product(*axes):
    merged = {}
    for part in combination:
      if clash := merged.keys() & part.keys():
        raise SweepError(f'product: {sorted(clash)} set by two axes.')
      merged.update(part)
    runs.append(merged)
  return runs


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sweep:
  """A base config and the runs' overrides.

  Attributes:
    config: ``configs/<name>.py`` or ``configs/<name>.py:<arg>`` (repository-relative).
    overrides: one mapping per run (``grid`` / ``product`` / a list); these name the runs.
    fixed: overrides shared by every run (not part of the names).
    eval: after training, run ``--mode eval`` (with ``eval_overrides`` added).
    eval_overrides: overrides of the eval command only, e.g. ``{'eval.num_samples': 10_000}``.
    source: an eval-only sweep: the trained workdir whose checkpoints every run evaluates. Each run's
      ``checkpoints`` is a symlink to ``<source>/checkpoints``: the trainer stays unchanged, no weights are
      copied, every run's events and ``eval/step_<n>.json`` land in its own directory, and the runs may vary
      only ``sample.*``, ``eval.*`` and ``mesh.*`` (``config`` and ``fixed`` must rebuild the trained model).
      Pin ``eval.checkpoint_step`` in ``fixed`` to compare one checkpoint while the source is still training.
  """

  config: str
  overrides: Sequence[Mapping[str, Any]] = ({},)
  fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  eval: bool = False
  eval_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  source: str = ''


@dataclasses.dataclass(frozen=True)
class Run:
  """One run: its name, its own overrides and the ``(mode, all overrides)`` of each command it runs."""

  name: str
  overrides: Overrides
  steps: tuple[tuple[str, Overrides], ...]


def _slug(value: Any) -> str:
  if isinstance(value, bool):
    text = str(value).lower()
  elif isinstance(value, (tuple, list)):
    text = '+'.join(_slug(v) for v in value)
  else:
    text = value if isinstance(value, str) else repr(value)
  return re.sub(r'[^A-Za-z0-9._+-]', '_', text)


def short_keys(keys: Iterable[str]) -> dict[str, str]:
  """Each key's last part (``diffusion.schedule`` -> ``schedule``), or the full key where two would clash."""
  keys = list(dict.fromkeys(keys))
  last = [k.rsplit('.', 1)[-1] for k in keys]
  return {k: s if last.count(s) == 1 else k for k, s in zip(keys, last)}


def run_name(overrides: Mapping[str, Any], short: Mapping[str, str]) -> str:
  """``key=value,key=value`` from the short keys; ``base`` for no overrides; long names end in a hash."""
  name = ','.join(f'{short[k]}={_slug(v)}' for k, v in overrides.items()) or 'base'
  if len(name) > 120:
    name = f'{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}'
  return name


def flag_value(value: Any) -> str:
  """``value`` as ``--config.KEY=`` text that ml_collections parses back to it."""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, str):
    return value
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return repr(value)


def expand(sweep: Sweep) -> list[Run]:
  """The sweep's runs, named, in order; two runs with the same name are an error."""
  short = short_keys(k for o in sweep.overrides for k in o)
  runs = []
  for own in sweep.overrides:
    own = dict(own)
    every = {**sweep.fixed, **own}
    if sweep.source:
      steps = (('eval', {**every, **sweep.eval_overrides}),)
    else:
      steps = (('train', every),) + ((('eval', {**every, **sweep.eval_overrides}),) if sweep.eval else ())
    runs.append(Run(run_name(own, short), own, steps))
  names = [r.name for r in runs]
  if dupes := sorted({n for n in names if names.count(n) > 1}):
    raise SweepError(f'runs share the workdir name(s) {dupes}; make their overrides differ.')
  return runs


def select(runs: Sequence[Run], only: Sequence[str]) -> list[Run]:
  """The runs matching every ``KEY=VALUE`` of ``only`` (full or short key; one key given twice matches either)."""
  wanted: dict[str, set[str]] = {}
  for item in only:
    key, sep, value = item.partition('=')
    if not sep:
      raise SweepError(f'--only {item!r}: expected KEY=VALUE.')
    wanted.setdefault(key, set()).add(value)
  short = short_keys(k for r in runs for k in r.overrides)

  def matches(run: Run) -> bool:
    named = {**{short[k]: v for k, v in run.overrides.items()}, **run.overrides}
    return all(k in named and ({_slug(named[k]), flag_value(named[k])} & values) for k, values in wanted.items())

  return [r for r in runs if matches(r)]


def command(config: str, workdir: str, mode: str, overrides: Mapping[str, Any], *,
            python: str = sys.executable) -> list[str]:
  """``python -m diffax.main --config=... --workdir=... --mode=... --config.KEY=VALUE ...``."""
  return [python, '-m', 'diffax.main', f'--config={config}', f'--workdir={workdir}', f'--mode={mode}',
          *(f'--config.{k}={flag_value(v)}' for k, v in overrides.items())]


def load(path: str | os.PathLike) -> Sweep:
  """The ``SWEEP`` of a sweep file (which may ``import sweep``)."""
  sys.modules.setdefault('sweep', sys.modules[__name__])
  spec = importlib.util.spec_from_file_location(f'sweep_file_{pathlib.Path(path).stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  value = getattr(module, 'SWEEP', None)
  if not isinstance(value, Sweep):
    raise SweepError(f'{path} defines no SWEEP = sweep.Sweep(...).')
  return value


def _config_path(config: str) -> str:
  path, sep, arg = config.partition(':')
  return f'{REPO / path}{sep}{arg}'


def parse_config(config: str, overrides: Mapping[str, Any]):
  """The ConfigDict ``python -m diffax.main --config=CONFIG --config.KEY=VALUE ...`` builds (not validated)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  argv = ['diffax.main', f'--config={_config_path(config)}', *(f'--config.{k}={flag_value(v)}'
                                                               for k, v in overrides.items())]
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', None, flag_values=flag_values, lock_config=False,
                                           accept_new_attributes=True, sys_argv=argv)
  flag_values(argv)
  return holder.value


def _check_key(base, key: str, leaves: Sequence[str]) -> None:
  """``key`` exists in ``base``, or is new in an open (unlocked) section such as ``sample.kwargs``."""
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top

  node, parts = base, key.split('.')
  for i, part in enumerate(parts):
    last = i == len(parts) - 1
    if isinstance(node, ConfigDict) and part in node:
      node = node[part]
    elif isinstance(node, ConfigDict) and last and not node.is_locked:
      return
    else:
      close = difflib.get_close_matches(key, leaves, n=1)
      raise SweepError(f'unknown config key {key!r}' + (f' (did you mean {close[0]!r}?)' if close else '') + '.')
  if isinstance(node, ConfigDict):
    raise SweepError(f'{key!r} is a section; override its keys ({key}.<name>=...).')


def _leaves(config, prefix: str = '') -> list[str]:
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top

  out = []
  for k, v in config.items():
    out += _leaves(v, f'{prefix}{k}.') if isinstance(v, ConfigDict) else [f'{prefix}{k}']
  return out


def validate(sweep: Sweep, runs: Sequence[Run]) -> dict[str, int]:
  """Checks every command of every run like the trainer would; returns each run's ``train.num_steps``."""
  from diffax.trainer import config as config_lib  # pylint: disable=g-import-not-at-top

  base = parse_config(sweep.config, {})
  leaves = _leaves(base)
  num_steps = {}
  for run in runs:
    if sweep.source and (bad := [k for k in run.overrides if not k.startswith(EVAL_SECTIONS)]):
      raise SweepError(f'run {run.name}: an eval-only sweep reads the checkpoints of {sweep.source}, so only '
                       f'{", ".join(s + "*" for s in EVAL_SECTIONS)} may vary; got {bad}.')
    for mode, overrides in run.steps:
      try:
        for key in overrides:
          _check_key(base, key, leaves)
        config = parse_config(sweep.config, overrides)
        config_lib.validate(config)
      except Exception as error:  # noqa: BLE001 -- flag parsing raises many types; all mean "this run cannot start"
        raise SweepError(f'run {run.name} ({mode}): {error}') from error
      if mode == 'train':
        num_steps[run.name] = int(config.train.num_steps)
  return num_steps


@dataclasses.dataclass
class Job:
  """A run placed under a root: its workdir, what a launcher executes, and how success is recognised."""

  index: int
  run: Run
  workdir: str
  commands: list[list[str]]
  spec: dict[str, Any]
  final_checkpoint: str  # must exist after training ('' for eval-only runs)
  source_checkpoints: str  # the symlink target for eval-only runs ('' otherwise)
  log: pathlib.Path

  def marker(self) -> dict[str, Any]:
    return {'spec': self.spec, 'commands': [shlex.join(c) for c in self.commands]}

  def link_line(self) -> str:
    """Shell: link ``<workdir>/checkpoints`` to the source's (eval-only runs on remote launchers), else ''."""
    if not self.source_checkpoints:
      return ''
    return (f'mkdir -p {shlex.quote(self.workdir)} && ln -sfn {_shell_path(self.source_checkpoints)} '
            f'{shlex.quote(self.workdir + "/checkpoints")}')

  def marker_line(self) -> str:
    """Shell: write ``DONE`` if training reached its final checkpoint (run after the commands succeeded)."""
    write = f"printf '%s\\n' {shlex.quote(json.dumps(self.marker()))} > {shlex.quote(self.workdir + '/DONE')}"
    return f'test -d {shlex.quote(self.final_checkpoint)} && {write}' if self.final_checkpoint else write

  def shell_line(self) -> str:
    """The commands as one shell line that also links the source and writes ``DONE`` (remote launchers)."""
    parts = [self.link_line()] if self.source_checkpoints else []
    return ' && '.join(parts + [shlex.join(c) for c in self.commands] + [self.marker_line()])


def _shell_path(path: str) -> str:
  return shlex.quote(path) if os.path.isabs(path) or '://' in path else f'"$PWD"/{shlex.quote(path)}'


def _path(path: str):
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path)


def make_jobs(sweep: Sweep, runs: Sequence[Run], num_steps: Mapping[str, int], *, root: str, python: str,
              logs: str) -> list[Job]:
  source = sweep.source
  if source and '://' in root + source:
    raise SweepError('eval-only sweeps link checkpoints with symlinks: root and source must be filesystem paths.')
  jobs = []
  for index, run in enumerate(runs):
    workdir = f'{root.rstrip("/")}/{run.name}'
    commands = [command(sweep.config, workdir, mode, o, python=python) for mode, o in run.steps]
    spec = {'config': sweep.config, 'steps': [[mode, o] for mode, o in run.steps], 'source': source}
    final = '' if source else f'{workdir}/checkpoints/{num_steps[run.name]}'
    target = f'{source.rstrip("/")}/checkpoints' if source else ''
    jobs.append(Job(index, run, workdir, commands, json.loads(json.dumps(spec)), final, target,
                    pathlib.Path(logs or root) / run.name / 'log.txt'))
  return jobs


def state(job: Job) -> str:
  """``'done'``, ``'resume from step N'`` or ``'new'``."""
  workdir = _path(job.workdir)
  done = workdir / 'DONE'
  if done.exists() and json.loads(done.read_text()).get('spec') == job.spec:
    return 'done'
  checkpoints = workdir / 'checkpoints'
  if not job.source_checkpoints and checkpoints.exists():
    steps = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()]
    if steps:
      return f'resume from step {max(steps)}'
  return 'new'


class Executor:
  """Runs jobs here (``--parallel`` at a time), each command a subprocess logging to the job's ``log.txt``."""

  def __init__(self, *, parallel: int, link_sources: bool = True, env: Mapping[str, str] | None = None):
    self.parallel = parallel
    self.link_sources = link_sources
    self.env = dict(os.environ if env is None else env)
    self.children: set[subprocess.Popen] = set()
    self.lock = threading.Lock()
    self.stopping = False

  def stop(self, signum=None, frame=None) -> None:
    """No new runs; the running trainers get SIGTERM (they checkpoint and stop)."""
    del frame
    self.stopping = True
    with self.lock:
      for proc in self.children:
        if proc.poll() is None:
          os.killpg(proc.pid, signal.SIGTERM)
    if signum is not None:
      _say(f'Signal {signum}: stopping the running trainers (they checkpoint); DONE is not written.')

  def execute(self, job: Job) -> tuple[str, float]:
    """``('finished' | 'failed (...)' | 'stopped', seconds)``."""
    start = time.perf_counter()
    workdir = _path(job.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'run.json').write_text(json.dumps({'name': job.run.name, 'overrides': job.run.overrides,
                                                  **job.marker()}, indent=2, default=list))
    if self.link_sources and job.source_checkpoints and not os.path.lexists(f'{job.workdir}/checkpoints'):
      os.symlink(os.path.abspath(REPO / job.source_checkpoints), f'{job.workdir}/checkpoints')
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with job.log.open('a') as log:
      for argv in job.commands:
        log.write(f'\n=== {datetime.datetime.now().isoformat(timespec="seconds")}: {shlex.join(argv)}\n')
        log.flush()
        with self.lock:  # stop() holds it while signalling, so no process starts unseen
          if self.stopping:
            return 'stopped', time.perf_counter() - start
          proc = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
          self.children.add(proc)
        code = proc.wait()
        with self.lock:
          self.children.discard(proc)
        if code:
          return f'failed (exit {code})', time.perf_counter() - start
    if self.stopping:
      return 'stopped', time.perf_counter() - start
    if job.final_checkpoint and not _path(job.final_checkpoint).exists():
      return f'failed (no final checkpoint {job.final_checkpoint}: pre-empted?)', time.perf_counter() - start
    seconds = time.perf_counter() - start
    marker = {**job.marker(), 'returncode': 0, 'seconds': round(seconds, 1),
              'finished': datetime.datetime.now().isoformat(timespec='seconds')}
    (workdir / 'DONE').write_text(json.dumps(marker, indent=2))
    return 'finished', seconds

  def run_all(self, jobs: Sequence[Job], total: int) -> int:
    """Runs the jobs; prints one line per start and end; returns the number of runs that did not finish."""
    failures = 0

    def one(job: Job) -> tuple[Job, str, float]:
      if self.stopping:
        return job, 'stopped', 0.0
      _say(f'[{job.index + 1}/{total}] {job.run.name}: started, log {job.log}')
      return (job, *self.execute(job))

    with concurrent.futures.ThreadPoolExecutor(self.parallel) as pool:
      for future in concurrent.futures.as_completed([pool.submit(one, job) for job in jobs]):
        job, outcome, seconds = future.result()
        failures += outcome != 'finished'
        hint = f'; see {job.log}' if outcome.startswith('failed') else ''
        _say(f'[{job.index + 1}/{total}] {job.run.name}: {outcome} after {seconds:.0f} s{hint}')
    return failures


def _launcher_options(name: str, argv: Sequence[str]) -> argparse.Namespace | None:
  if name in ('local', 'print'):
    if argv:
      raise SweepError(f'--launcher {name} takes no options after --; got {list(argv)}.')
    return None
  sys.path.insert(0, str(REPO))
  from launch import slurm, tpu_vm  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog=f'sweep.py --launcher {name} --')
  {'slurm': slurm, 'tpu_vm': tpu_vm}[name].add_options(p)
  return p.parse_args(argv)


def _submit_slurm(jobs: Sequence[Job], options: argparse.Namespace, sweep_name: str, dry_run: bool) -> int:
  from launch import slurm  # pylint: disable=g-import-not-at-top
  for job in jobs:
    workdir = _path(job.workdir)
    submitted = workdir / 'SUBMITTED'
    if submitted.exists() and not dry_run:
      job_id = json.loads(submitted.read_text())['job_id']
      queued = subprocess.run(['squeue', '-h', '-j', job_id, '-o', '%T'], capture_output=True, text=True,
                              check=False).stdout.strip()
      if queued:
        print(f'{job.run.name}: job {job_id} is {queued.lower()}, not resubmitted.')
        continue
    script = slurm.script_from_args(options, job.commands, job_name=f'{sweep_name}:{job.run.name}',
                                    output=f'{job.workdir}/slurm-%j.out', epilogue=[job.marker_line()],
                                    setup=[*options.setup, *[job.link_line()] * bool(job.source_checkpoints)])
    path = f'{job.workdir}/job.sbatch'
    if dry_run:
      print(f'# {path}\n{script}# then: sbatch --parsable {shlex.quote(path)}\n')
      continue
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'job.sbatch').write_text(script)
    job_id = slurm.submit(path)
    submitted.write_text(json.dumps({'job_id': job_id, 'script': path}))
    print(f'{job.run.name}: submitted job {job_id} (log {job.workdir}/slurm-{job_id}.out).')
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
  sweep = load(args.sweep_file)
  options = _launcher_options(args.launcher, launcher_argv)
  runs = expand(sweep)
  selected = select(runs, args.only)
  if not selected:
    raise SweepError(f'--only {args.only} matches none of {[r.name for r in runs]}.')
  num_steps = validate(sweep, selected)
  root = args.root if '://' in args.root else os.path.abspath(args.root)
  if args.launcher != 'local' and args.parallel != 1:
    raise SweepError(f'--parallel is for --launcher local (got --launcher {args.launcher}).')
  logs = args.logs or (f'logs/{sweep_name}' if '://' in root else '')
  local = args.launcher == 'local'
  jobs = make_jobs(sweep, selected, num_steps, root=root, python=sys.executable if local else 'python', logs=logs)
  if args.launcher == 'tpu_vm':
    from launch import tpu_vm  # pylint: disable=g-import-not-at-top
    for job in jobs:
      job.commands = [tpu_vm.run_command(options, c, prelude=job.link_line()) for c in job.commands]
  states = {job.run.name: state(job) for job in jobs}
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
  return _run_here(args, sweep, runs, jobs, states, root=root, sweep_name=sweep_name)


def _run_here(args: argparse.Namespace, sweep: Sweep, runs: Sequence[Run], jobs: Sequence[Job],
              states: Mapping[str, str], *, root: str, sweep_name: str) -> int:
  """The local and tpu_vm launchers: writes ``<root>/sweep.json``, runs the pending jobs, prints a summary."""
  local = args.launcher == 'local'
  if local and sweep.source and not (REPO / sweep.source / 'checkpoints').is_dir():
    raise SweepError(f'source {sweep.source}: no checkpoints/ there; train it first.')
  manifest = _path(root) / 'sweep.json'
  _path(root).mkdir(parents=True, exist_ok=True)
  previous = json.loads(manifest.read_text())['runs'] if manifest.exists() else {}
  manifest.write_text(json.dumps({
      'sweep_file': os.path.abspath(args.sweep_file), 'config': sweep.config, 'fixed': dict(sweep.fixed),
      'source': sweep.source, 'eval': sweep.eval, 'runs': {**previous, **{r.name: r.overrides for r in runs}}},
      indent=2, default=list))
  done = [job for job in jobs if states[job.run.name] == 'done']
  for job in done:
    _say(f'[{job.index + 1}/{len(jobs)}] {job.run.name}: done, skipped')
  pending = [job for job in jobs if states[job.run.name] != 'done']
  executor = Executor(parallel=args.parallel, link_sources=local)
  previous_handlers = {s: signal.signal(s, executor.stop) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    failures = executor.run_all(pending, len(jobs))
  finally:
    for s, handler in previous_handlers.items():
      signal.signal(s, handler)
  _say(f'Sweep {sweep_name}: {len(pending) - failures} finished, {len(done)} skipped, {failures} not finished.')
  return 1 if failures else 0

if __name__ == '__main__':
  # Sweep files ``import sweep``: run the importable module, so there is one ``Sweep`` class.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
  import sweep as _sweep  # pylint: disable=g-import-not-at-top
  try:
    sys.exit(_sweep.main())
  except _sweep.SweepError as error:
    sys.exit(f'sweep: {error}')
