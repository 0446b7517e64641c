"""The runs of a sweep executed here: each command a subprocess, ``--parallel`` runs at a time.

A run's commands log to its ``log.txt``; its ``DONE`` marker is written once every command succeeded and
training reached its final checkpoint. Failures name the run's log and do not stop the others. SIGINT / SIGTERM
reach the trainers as SIGTERM (they checkpoint and stop) and no new run starts. The ``local`` and ``tpu_vm``
launchers of ``experiments/sweep.py`` both run here (``tpu_vm`` with commands that run on the slice).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import concurrent.futures
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

from etils import epath

from sweeps_lib import jobs as jobs_lib
from sweeps_lib import spec

_PRINT_LOCK = threading.Lock()


def _say(message: str) -> None:
  """One whole line to stdout, also from worker threads."""
  with _PRINT_LOCK:
    sys.stdout.write(message + '\n')
    sys.stdout.flush()


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

  def execute(self, job: jobs_lib.Job) -> tuple[str, float]:
    """``('finished' | 'failed (...)' | 'stopped', seconds)``."""
    start = time.perf_counter()
    workdir = epath.Path(job.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'run.json').write_text(json.dumps({'name': job.run.name, 'overrides': job.run.overrides,
                                                  **job.marker()}, indent=2, default=list))
    if self.link_sources and job.source_checkpoints and not os.path.lexists(f'{job.workdir}/checkpoints'):
      os.symlink(os.path.abspath(spec.REPO / job.source_checkpoints), f'{job.workdir}/checkpoints')
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with job.log.open('a') as log:
      for argv in job.commands:
        log.write(f'\n=== {datetime.datetime.now().isoformat(timespec="seconds")}: {shlex.join(argv)}\n')
        log.flush()
        with self.lock:  # stop() holds it while signalling, so no process starts unseen
          if self.stopping:
            return 'stopped', time.perf_counter() - start
          proc = subprocess.Popen(argv, cwd=spec.REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
          self.children.add(proc)
        code = proc.wait()
        with self.lock:
          self.children.discard(proc)
        if code:
          return f'failed (exit {code})', time.perf_counter() - start
    if self.stopping:
      return 'stopped', time.perf_counter() - start
    if job.final_checkpoint and not epath.Path(job.final_checkpoint).exists():
      return f'failed (no final checkpoint {job.final_checkpoint}: pre-empted?)', time.perf_counter() - start
    seconds = time.perf_counter() - start
    marker = {**job.marker(), 'returncode': 0, 'seconds': round(seconds, 1),
              'finished': datetime.datetime.now().isoformat(timespec='seconds')}
    (workdir / 'DONE').write_text(json.dumps(marker, indent=2))
    return 'finished', seconds

  def run_all(self, jobs: Sequence[jobs_lib.Job], total: int) -> int:
    """Runs the jobs; prints one line per start and end; returns the number of runs that did not finish."""
    failures = 0

    def one(job: jobs_lib.Job) -> tuple[jobs_lib.Job, str, float]:
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


def run_here(sweep: spec.Sweep, runs: Sequence[spec.Run], jobs: Sequence[jobs_lib.Job], states: Mapping[str, str],
             *, root: str, sweep_file: str, sweep_name: str, parallel: int, link_sources: bool) -> int:
  """Writes ``<root>/sweep.json``, runs the pending jobs, prints a summary; 1 if a run did not finish, else 0.

  Args:
    runs: every run of the sweep (``sweep.json`` lists them all, also those ``--only`` left out).
    states: each job's ``jobs.state`` by run name; ``'done'`` ones are skipped.
    link_sources: link eval-only runs' ``checkpoints`` here (local runs; on a slice the command links them).
  """
  if link_sources and sweep.source and not (spec.REPO / sweep.source / 'checkpoints').is_dir():
    raise spec.SweepError(f'source {sweep.source}: no checkpoints/ there; train it first.')
  manifest = epath.Path(root) / 'sweep.json'
  epath.Path(root).mkdir(parents=True, exist_ok=True)
  previous = json.loads(manifest.read_text())['runs'] if manifest.exists() else {}
  manifest.write_text(json.dumps({
      'sweep_file': os.path.abspath(sweep_file), 'config': sweep.config, 'fixed': dict(sweep.fixed),
      'source': sweep.source, 'eval': sweep.eval, 'runs': {**previous, **{r.name: r.overrides for r in runs}}},
      indent=2, default=list))
  done = [job for job in jobs if states[job.run.name] == 'done']
  for job in done:
    _say(f'[{job.index + 1}/{len(jobs)}] {job.run.name}: done, skipped')
  pending = [job for job in jobs if states[job.run.name] != 'done']
  executor = Executor(parallel=parallel, link_sources=link_sources)
  previous_handlers = {s: signal.signal(s, executor.stop) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    failures = executor.run_all(pending, len(jobs))
  finally:
    for s, handler in previous_handlers.items():
      signal.signal(s, handler)
  _say(f'Sweep {sweep_name}: {len(pending) - failures} finished, {len(done)} skipped, {failures} not finished.')
  return 1 if failures else 0
