"""Every run's config built and checked before anything starts, as the trainer's command line would.

``python -m diffax.main`` parses ``--config=CONFIG --config.KEY=VALUE ...`` with ml_collections' flag parser and
then runs ``diffax.trainer.config.validate``; ``validate`` does both for every command of every run, after checking
that each key exists, so a misspelt key fails at once with the run and the key named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import difflib
from typing import Any

from sweeps_lib import spec

EVAL_SECTIONS = ('sample.', 'eval.', 'mesh.')
"""What an eval-only sweep may vary: the checkpoint fixes everything else."""


def _config_path(config: str) -> str:
  path, sep, arg = config.partition(':')
  return f'{spec.REPO / path}{sep}{arg}'


def parse_config(config: str, overrides: Mapping[str, Any]):
  """The ConfigDict ``python -m diffax.main --config=CONFIG --config.KEY=VALUE ...`` builds (not validated)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  argv = ['diffax.main', f'--config={_config_path(config)}', *(f'--config.{k}={spec.flag_value(v)}'
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
      raise spec.SweepError(f'unknown config key {key!r}' + (f' (did you mean {close[0]!r}?)' if close else '')
                            + '.')
  if isinstance(node, ConfigDict):
    raise spec.SweepError(f'{key!r} is a section; override its keys ({key}.<name>=...).')


def _leaves(config, prefix: str = '') -> list[str]:
  from ml_collections import ConfigDict  # pylint: disable=g-import-not-at-top

  out = []
  for k, v in config.items():
    out += _leaves(v, f'{prefix}{k}.') if isinstance(v, ConfigDict) else [f'{prefix}{k}']
  return out


def validate(sweep: spec.Sweep, runs: Sequence[spec.Run]) -> dict[str, int]:
  """Checks every command of every run like the trainer would; returns each run's ``train.num_steps``."""
  from diffax.trainer import config as config_lib  # pylint: disable=g-import-not-at-top

  base = parse_config(sweep.config, {})
  leaves = _leaves(base)
  num_steps = {}
  for run in runs:
    if sweep.source and (bad := [k for k in run.overrides if not k.startswith(EVAL_SECTIONS)]):
      raise spec.SweepError(f'run {run.name}: an eval-only sweep reads the checkpoints of {sweep.source}, so only '
                            f'{", ".join(s + "*" for s in EVAL_SECTIONS)} may vary; got {bad}.')
    for mode, overrides in run.steps:
      try:
        for key in overrides:
          _check_key(base, key, leaves)
        config = parse_config(sweep.config, overrides)
        config_lib.validate(config)
      except Exception as error:  # noqa: BLE001 -- flag parsing raises many types; all mean "this run cannot start"
        raise spec.SweepError(f'run {run.name} ({mode}): {error}') from error
      if mode == 'train':
        num_steps[run.name] = int(config.train.num_steps)
  return num_steps
