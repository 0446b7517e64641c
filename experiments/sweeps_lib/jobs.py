"""Runs placed under a root: each one's workdir, the commands a launcher executes, and how success is recognised.

A run's workdir is ``<root>/<run name>``. It is done once its ``DONE`` marker records the run's current spec
(config and every command's overrides); a marker is written only after every command succeeded and training
reached its final checkpoint, so any other run starts again and the trainer resumes it from its newest checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import json
import os
import pathlib
import shlex
import sys
from typing import Any

from etils import epath

from sweeps_lib import spec


def command(config: str, workdir: str, mode: str, overrides: Mapping[str, Any], *,
            python: str = sys.executable) -> list[str]:
  """``python -m diffax.main --config=... --workdir=... --mode=... --config.KEY=VALUE ...``."""
  return [python, '-m', 'diffax.main', f'--config={config}', f'--workdir={workdir}', f'--mode={mode}',
          *(f'--config.{k}={spec.flag_value(v)}' for k, v in overrides.items())]


def _shell_path(path: str) -> str:
  return shlex.quote(path) if os.path.isabs(path) or '://' in path else f'"$PWD"/{shlex.quote(path)}'


@dataclasses.dataclass
class Job:
  """A run placed under a root: its workdir, what a launcher executes, and how success is recognised."""

  index: int
  run: spec.Run
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


def make_jobs(sweep: spec.Sweep, runs: Sequence[spec.Run], num_steps: Mapping[str, int], *, root: str,
              python: str, logs: str) -> list[Job]:
  """One job per run under ``root`` (a directory or ``gs://``), its ``log.txt`` under ``logs`` (default: the root).

  ``num_steps`` (from ``validation.validate``) gives each training run's final checkpoint; ``python`` starts
  the commands (``sys.executable`` here, ``python`` on remote machines).
  """
  source = sweep.source
  if source and '://' in root + source:
    raise spec.SweepError('eval-only sweeps link checkpoints with symlinks: root and source must be filesystem '
                          'paths.')
  jobs = []
  for index, run in enumerate(runs):
    workdir = f'{root.rstrip("/")}/{run.name}'
    commands = [command(sweep.config, workdir, mode, o, python=python) for mode, o in run.steps]
    job_spec = {'config': sweep.config, 'steps': [[mode, o] for mode, o in run.steps], 'source': source}
    final = '' if source else f'{workdir}/checkpoints/{num_steps[run.name]}'
    target = f'{source.rstrip("/")}/checkpoints' if source else ''
    jobs.append(Job(index, run, workdir, commands, json.loads(json.dumps(job_spec)), final, target,
                    pathlib.Path(logs or root) / run.name / 'log.txt'))
  return jobs


def state(job: Job) -> str:
  """``'done'``, ``'resume from step N'`` or ``'new'``."""
  workdir = epath.Path(job.workdir)
  done = workdir / 'DONE'
  if done.exists() and json.loads(done.read_text()).get('spec') == job.spec:
    return 'done'
  checkpoints = workdir / 'checkpoints'
  if not job.source_checkpoints and checkpoints.exists():
    steps = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()]
    if steps:
      return f'resume from step {max(steps)}'
  return 'new'
