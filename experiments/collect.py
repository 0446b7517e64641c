"""A sweep's results as a table, a CSV and a plot: one row / line per run, its overrides as columns / labels.

  python experiments/collect.py workdirs/<sweep> [more roots or runs] [--metrics train/loss eval/digits_fd]
      [--csv results.csv] [--plot results.png] [--x sample.num_steps] [--smooth 5]

A run is a directory with ``run.json`` (written by ``experiments/sweep.py``) or TensorBoard event files; a
directory without either is searched one level down. Scalars come from the CLU event files
(``diffax.trainer.events.read_scalars``); evaluation metrics come from ``eval/step_<n>_<sampling>.json`` where it exists
(full precision, plus the protocol's ``nfe``), else from the ``eval/*`` events. A workdir evaluated under
several sampling settings gives one row per setting (its ``sampling`` column tells them apart).

Per metric the table gives the final value -- for ``train/loss`` the mean of the last ``--smooth`` logged
values, each already a mean over ``train.log_every`` steps -- and the best (lowest; highest for accuracy,
confidence, Inception score, precision and recall) with its step (CSV only). The plot has one panel per metric:
value against training step, or, when every run has a single evaluation (an eval-only sweep), against the
numeric override ``--x`` (default: the numeric override with the most distinct values), one line per setting of
the other overrides.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
import csv
import dataclasses
import json
import pathlib
import sys
from typing import Any

import numpy as np

from diffax.trainer import events

HIGHER_IS_BETTER = ('accuracy', 'confidence', 'inception_score', 'precision', 'recall')


@dataclasses.dataclass
class RunResult:
  """What one run left: its name, overrides, scalar series ``{tag: [(step, value)]}`` and last eval protocol."""

  name: str
  path: pathlib.Path
  overrides: dict[str, Any]
  series: dict[str, list[tuple[int, float]]]
  protocol: dict[str, Any]
  sampling: str = ''


def _is_run(path: pathlib.Path) -> bool:
  return (path / 'run.json').exists() or any(path.glob('events.out.tfevents.*'))


def find_runs(paths: Sequence[str | pathlib.Path]) -> list[pathlib.Path]:
  """Run directories: each path itself if it is a run, else its sub-directories that are runs, in the sweep's
  order (``sweep.json``), then by name."""
  runs = []
  for path in map(pathlib.Path, paths):
    if _is_run(path):
      runs.append(path)
      continue
    manifest = path / 'sweep.json'
    order = list(json.loads(manifest.read_text())['runs']) if manifest.exists() else []
    found = [p for p in path.iterdir() if p.is_dir() and _is_run(p)]
    runs += sorted(found, key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
  return runs


def load_run(path: pathlib.Path) -> list[RunResult]:
  """The run's results: one per sampling setting of its eval JSON files (one, without any)."""
  meta = json.loads((path / 'run.json').read_text()) if (path / 'run.json').exists() else {}
  name, overrides = meta.get('name', path.name), meta.get('overrides', {})
  scalars = events.read_scalars(str(path))
  settings: dict[str, tuple[dict[str, dict[int, float]], dict[str, Any]]] = {}
  for file in sorted((path / 'eval').glob('step_*.json')):
    record = json.loads(file.read_text())
    sampling = file.stem.split('_', 2)[2] if file.stem.count('_') >= 2 else ''
    evals, _ = settings.setdefault(sampling, ({}, {}))
    settings[sampling] = (evals, record.get('protocol', {}))
    for metric, value in record['metrics'].items():
      evals.setdefault(f'eval/{metric}', {})[int(record['step'])] = float(value)
  if not settings:
    return [RunResult(name, path, overrides, scalars, {})]
  results = []
  for sampling, (evals, protocol) in settings.items():
    # The eval/* events of a workdir hold every setting at once; only the JSON files tell them apart.
    series = {t: v for t, v in scalars.items() if not t.startswith('eval/') or len(settings) == 1}
    for tag, values in evals.items():
      series[tag] = sorted({**dict(series.get(tag, [])), **values}.items())
    label = f'{name} [{sampling}]' if len(settings) > 1 else name
    results.append(RunResult(label, path, overrides, series, protocol, sampling))
  return results


def higher_is_better(tag: str) -> bool:
  return any(word in tag for word in HIGHER_IS_BETTER)


def default_metrics(results: Sequence[RunResult]) -> list[str]:
  """``train/loss`` and every ``eval/*`` metric (without ``*_std``) that some run has."""
  tags = sorted({t for r in results for t in r.series})
  return ['train/loss'] * ('train/loss' in tags) + [t for t in tags if t.startswith('eval/') and not t.endswith('_std')]


def summarize(results: Sequence[RunResult], metrics: Sequence[str], *, smooth: int = 5
              ) -> tuple[list[str], list[dict[str, Any]]]:
  """Columns and one row per run: ``run``, the overrides, ``steps``, ``nfe``, then final / best / best step."""
  keys = list(dict.fromkeys(k for r in results for k in r.overrides))
  with_nfe = any('nfe' in r.protocol for r in results)
  with_sampling = any(r.sampling for r in results)
  columns = ['run', *keys, *(['sampling'] * with_sampling), 'steps', *(['nfe'] * with_nfe)]
  for tag in metrics:
    columns += [f'{tag} final', f'{tag} best', f'{tag} best step']
  rows = []
  for r in results:
    steps = [s for values in r.series.values() for s, _ in values]
    row = {'run': r.name, **{k: r.overrides.get(k, '') for k in keys}, 'steps': max(steps) if steps else ''}
    if with_sampling:
      row['sampling'] = r.sampling
    if with_nfe:
      row['nfe'] = r.protocol.get('nfe', '')
    for tag in metrics:
      values = r.series.get(tag, [])
      if not values:
        row.update({f'{tag} final': '', f'{tag} best': '', f'{tag} best step': ''})
        continue
      window = values[-smooth:] if tag == 'train/loss' else values[-1:]
      best = (max if higher_is_better(tag) else min)(values, key=lambda sv: sv[1])
      row.update({f'{tag} final': float(np.mean([v for _, v in window])), f'{tag} best': best[1],
                  f'{tag} best step': best[0]})
    rows.append(row)
  return columns, rows


def _cell(value: Any) -> str:
  return f'{value:.4g}' if isinstance(value, float) else str(value)


def format_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
  """A Markdown table (numbers to 4 significant digits; the ``best step`` columns are left to the CSV)."""
  columns = [c for c in columns if not c.endswith(' best step')]
  cells = [[_cell(row[c]) for c in columns] for row in rows]
  widths = [max([len(c), *(len(line[i]) for line in cells)]) for i, c in enumerate(columns)]
  lines = ['| ' + ' | '.join(c.ljust(w) for c, w in zip(columns, widths)) + ' |',
           '|' + '|'.join('-' * (w + 2) for w in widths) + '|']
  lines += ['| ' + ' | '.join(v.ljust(w) for v, w in zip(line, widths)) + ' |' for line in cells]
  return '\n'.join(lines)


def write_csv(path: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
  """Full precision (``repr`` of every float)."""
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows([{c: repr(v) if isinstance(v, float) else v for c, v in row.items()} for row in rows])


def _label(overrides: Mapping[str, Any], skip: str = '') -> str:
  return ', '.join(f'{k.rsplit(".", 1)[-1]}={v}' for k, v in overrides.items() if k != skip) or 'base'


def x_key(results: Sequence[RunResult]) -> str:
  """The numeric override (other than seeds) with the most distinct values ('' if none)."""
  best, count = '', 1
  for key in dict.fromkeys(k for r in results for k in r.overrides if not k.endswith('seed')):
    values = [r.overrides.get(key) for r in results]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and len(set(values)) > count:
      best, count = key, len(set(values))
  return best


def plot(results: Sequence[RunResult], metrics: Sequence[str], path: str, *, x: str = '') -> None:
  """One panel per metric; curves over training steps, or metric vs override ``x`` for single evaluations."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
  for ax, tag in zip(axes[0], metrics):
    single = all(len(r.series.get(tag, [])) <= 1 for r in results)
    key = x or (x_key(results) if single and tag != 'train/loss' else '')
    if key:
      groups: dict[str, list[tuple[float, float]]] = {}
      for r in results:
        if r.series.get(tag) and key in r.overrides:
          groups.setdefault(_label(r.overrides, skip=key), []).append((r.overrides[key], r.series[tag][-1][1]))
      for label, points in groups.items():
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker='o', label=label)
      ax.set_xlabel(key)
      xs = sorted({p[0] for g in groups.values() for p in g})
      if xs and xs[0] > 0:
        ax.set_xscale('log')
      ax.set_xticks(xs, [f'{v:g}' for v in xs])
      ax.minorticks_off()
    else:
      for r in results:
        if r.series.get(tag):
          steps, values = zip(*r.series[tag])
          ax.plot(steps, values, marker='o' if len(steps) < 20 else None, label=_label(r.overrides))
      ax.set_xlabel('step')
    if all(v > 0 for r in results for _, v in r.series.get(tag, [])) and not higher_is_better(tag):
      ax.set_yscale('log')
    ax.set_title(tag)
    ax.grid(True, alpha=0.3)
    if ax.has_data():
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('dirs', nargs='+', help='sweep roots and/or run workdirs')
  p.add_argument('--metrics', nargs='+', default=None, help='tags (default: train/loss and every eval/*)')
  p.add_argument('--csv', default='', help='write the table as CSV here')
  p.add_argument('--plot', default='', help='write the curves as PNG here')
  p.add_argument('--x', default='', help='x-axis override for single-evaluation runs (default: automatic)')
  p.add_argument('--smooth', type=int, default=5, help='final train/loss = mean of the last N logged values')
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  paths = find_runs(args.dirs)
  if not paths:
    sys.exit(f'collect: no runs (run.json or event files) under {args.dirs}.')
  results = [r for p in paths for r in load_run(p)]
  metrics = [m if '/' in m else f'eval/{m}' for m in args.metrics] if args.metrics else default_metrics(results)
  columns, rows = summarize(results, metrics, smooth=args.smooth)
  print(format_table(columns, rows))
  if args.csv:
    write_csv(args.csv, columns, rows)
    print(f'Wrote {args.csv}.')
  if args.plot:
    plot(results, metrics, args.plot, x=args.x)
    print(f'Wrote {args.plot}.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
