"""A sweep as data: one base config, a list or product of overrides, and the named runs they expand to.

A sweep file (``experiments/sweeps/<name>.py``) is::

  from sweeps_lib import spec

  SWEEP = spec.Sweep(
      config='configs/digits.py',
      overrides=spec.product(spec.grid('diffusion.schedule', ['linear', 'cosine']),
                             spec.grid('diffusion.prediction', ['eps', 'v'])),
      fixed={'train.num_steps': 1500})

Every run is named from its own overrides (``schedule=linear,prediction=eps``: the last part of each key, or the
whole key where two would clash); the name is its workdir under the sweep's root.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import dataclasses
import hashlib
import importlib.util
import itertools
import os
import pathlib
import re
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]
"""The repository root: paths in a sweep file (``config``, ``source``) are relative to it; commands run there."""

Overrides = dict[str, Any]


class SweepError(ValueError):
  """A sweep that cannot run; the message names the run and the key."""


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


def flag_value(value: Any) -> str:
  """``value`` as ``--config.KEY=`` text that ml_collections parses back to it."""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, str):
    return value
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return repr(value)


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


def load(path: str | os.PathLike) -> Sweep:
  """The ``SWEEP`` of a sweep file (which imports ``from sweeps_lib import spec``)."""
  module_spec = importlib.util.spec_from_file_location(f'sweep_file_{pathlib.Path(path).stem}', path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except AttributeError as error:
    if getattr(error.obj, '__name__', '') != 'sweep':
      raise
    raise SweepError(f'{path}: sweep files import `from sweeps_lib import spec` and write spec.Sweep(...), '
                     f'spec.grid(...), spec.product(...) (`import sweep` is the command line now).') from error
  value = getattr(module, 'SWEEP', None)
  if not isinstance(value, Sweep):
    raise SweepError(f'{path} defines no SWEEP = spec.Sweep(...).')
  return value
