"""An sbatch script that runs ``python -m diffax.main`` on a SLURM GPU cluster, one process per GPU or per node.

  python launch/slurm.py --nodes 2 --gpus-per-node 8 --time 12:00:00 --partition gpu --dry-run -- \
      python -m diffax.main --config configs/digits.py --workdir /shared/workdirs/digits

writes ``diffax.sbatch`` (``--script``), or prints it with ``--dry-run``; ``--submit`` also runs ``sbatch``. The
script starts one ``srun`` step: ``--ntasks-per-node`` = GPUs per node (``--per gpu``, JAX's recommended layout)
or 1 (``--per node``). JAX detects SLURM itself (``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``, ``SLURM_PROCID``,
``SLURM_LOCALID``): the coordinator is the step's first node, on a port derived from the job id, and with one
process per GPU each process takes the GPU at its ``SLURM_LOCALID``, so every task must see all of the node's
GPUs (the script never binds GPUs per task). ``--kill-on-bad-exit`` ends the step when one process fails.
The workdir must be on a filesystem every node shares; a resubmitted (or ``--requeue``-d) job resumes from
the newest checkpoint there. ``submit_once`` submits one job per workdir and never queues it twice: it is how
``experiments/sweep.py --launcher slurm`` submits one job per run.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import json
import pathlib
import shlex
import subprocess
import sys


def sbatch_script(commands: Sequence[Sequence[str]], *, job_name: str = 'diffax', nodes: int = 1,
                  gpus_per_node: int = 8, per: str = 'gpu', time: str = '04:00:00', partition: str = '',
                  account: str = '', cpus_per_task: int = 0, output: str = 'slurm-%x-%j.out', chdir: str = '',
                  requeue: bool = False, env: Sequence[str] = (), setup: Sequence[str] = (),
                  epilogue: Sequence[str] = (), sbatch_options: Sequence[str] = ()) -> str:
  """The script text: ``#SBATCH`` lines, ``setup`` shell lines, exports, one ``srun`` per command, ``epilogue``.

  Args:
    commands: argv lists run one after the other, each as a parallel step over every task.
    per: ``'gpu'`` (``gpus_per_node`` tasks per node) or ``'node'`` (one task per node that sees all its GPUs).
    env: ``KEY=VALUE`` exported before the steps.
    setup: shell lines run first on the batch node (``module load ...``, ``source .venv/bin/activate``).
    epilogue: shell lines run after every step succeeded (``set -e`` stops the script at a failure).
    sbatch_options: further ``--option=value`` strings, written as ``#SBATCH`` lines.
  """
  if per not in ('gpu', 'node'):
    raise ValueError(f"per must be 'gpu' or 'node', got {per!r}.")
  tasks_per_node = gpus_per_node if per == 'gpu' else 1
  options = [f'--job-name={job_name}', f'--nodes={nodes}', f'--ntasks-per-node={tasks_per_node}',
             f'--gpus-per-node={gpus_per_node}', f'--time={time}', f'--output={output}']
  options += [f'--partition={partition}'] * bool(partition) + [f'--account={account}'] * bool(account)
  options += [f'--cpus-per-task={cpus_per_task}'] * bool(cpus_per_task) + [f'--chdir={chdir}'] * bool(chdir)
  options += ['--requeue'] * requeue + list(sbatch_options)
  lines = ['#!/bin/bash', *(f'#SBATCH {o}' for o in options), 'set -euo pipefail', *setup]
  for assignment in env:
    key, _, value = assignment.partition('=')
    lines.append(f'export {key}={shlex.quote(value)}')
  srun = ['srun', f'--nodes={nodes}', f'--ntasks-per-node={tasks_per_node}', '--kill-on-bad-exit=1']
  lines += [shlex.join([*srun, *command]) for command in commands]
  lines += list(epilogue)
  return '\n'.join(lines) + '\n'


def add_options(p: argparse.ArgumentParser) -> None:
  """The job's options (shared with ``experiments/sweep.py --launcher slurm -- <options>``)."""
  p.add_argument('--job-name', default='diffax')
  p.add_argument('--nodes', type=int, default=1)
  p.add_argument('--gpus-per-node', type=int, default=8)
  p.add_argument('--per', choices=('gpu', 'node'), default='gpu', help='one process per GPU or per node')
  p.add_argument('--time', default='04:00:00', help='wall-clock limit, HH:MM:SS or D-HH:MM:SS')
  p.add_argument('--partition', default='')
  p.add_argument('--account', default='')
  p.add_argument('--cpus-per-task', type=int, default=0, help='0 = the cluster default')
  p.add_argument('--output', default='slurm-%x-%j.out', help='log file (sbatch patterns: %%x name, %%j job id)')
  p.add_argument('--chdir', default='', help='the repository checkout on the cluster (default: where sbatch runs)')
  p.add_argument('--requeue', action='store_true', help='let SLURM requeue the job after pre-emption / node failure')
  p.add_argument('--env', action='append', default=[], metavar='KEY=VALUE', help='exported before srun (repeat)')
  p.add_argument('--setup', action='append', default=[], metavar='LINE',
                 help="shell line run first, e.g. 'source .venv/bin/activate' (repeat)")
  p.add_argument('--sbatch', action='append', default=[], metavar='--OPTION=VALUE',
                 help='any further #SBATCH option (repeat)')


def script_from_args(args: argparse.Namespace, commands: Sequence[Sequence[str]], **overrides) -> str:
  kwargs = dict(job_name=args.job_name, nodes=args.nodes, gpus_per_node=args.gpus_per_node, per=args.per,
                time=args.time, partition=args.partition, account=args.account, cpus_per_task=args.cpus_per_task,
                output=args.output, chdir=args.chdir, requeue=args.requeue, env=args.env, setup=args.setup,
                sbatch_options=args.sbatch)
  return sbatch_script(commands, **{**kwargs, **overrides})


def submit(script_path: str) -> str:
  """Runs ``sbatch --parsable`` and returns the job id."""
  out = subprocess.run(['sbatch', '--parsable', script_path], check=True, capture_output=True, text=True).stdout
  return out.strip().split(';')[0]


def queue_state(job_id: str) -> str:
  """The job's state as ``squeue`` lists it (``PENDING``, ``RUNNING``, ...), or '' once it has left the queue."""
  return subprocess.run(['squeue', '-h', '-j', job_id, '-o', '%T'], capture_output=True, text=True,
                        check=False).stdout.strip()


def submit_once(args: argparse.Namespace, commands: Sequence[Sequence[str]], *, workdir: str, job_name: str,
                label: str, setup: Sequence[str] = (), epilogue: Sequence[str] = (), dry_run: bool = False) -> None:
  """Writes ``<workdir>/job.sbatch`` and submits it, unless the job ``<workdir>/SUBMITTED`` names is still queued.

  The job logs to ``<workdir>/slurm-<job id>.out``; ``SUBMITTED`` records its id, so submitting again (a sweep
  started again) leaves a pending or running job alone and resubmits a finished or failed one. Prints one line,
  starting with ``label``; ``dry_run`` prints the script and the ``sbatch`` command instead and touches nothing.

  Args:
    args: the job's options (``add_options``).
    setup: shell lines run after ``args.setup``.
    epilogue: shell lines run after every step succeeded (``sbatch_script``).
  """
  path = f'{workdir}/job.sbatch'
  submitted = pathlib.Path(workdir) / 'SUBMITTED'
  if submitted.exists() and not dry_run:
    job_id = json.loads(submitted.read_text())['job_id']
    if queued := queue_state(job_id):
      print(f'{label}: job {job_id} is {queued.lower()}, not resubmitted.')
      return
  script = script_from_args(args, commands, job_name=job_name, output=f'{workdir}/slurm-%j.out', epilogue=epilogue,
                            setup=[*args.setup, *setup])
  if dry_run:
    print(f'# {path}\n{script}# then: sbatch --parsable {shlex.quote(path)}\n')
    return
  pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
  pathlib.Path(path).write_text(script)
  job_id = submit(path)
  submitted.write_text(json.dumps({'job_id': job_id, 'script': path}))
  print(f'{label}: submitted job {job_id} (log {workdir}/slurm-{job_id}.out).')


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage='%(prog)s [options] -- python -m diffax.main ...')
  add_options(p)
  p.add_argument('--script', default='', help='where to write the script (default: <job-name>.sbatch)')
  p.add_argument('--submit', action='store_true', help='also run sbatch')
  p.add_argument('--dry-run', action='store_true', help='print the script and the sbatch command; write nothing')
  return p


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  split = argv.index('--') if '--' in argv else len(argv)
  args, command = parser().parse_args(argv[:split]), argv[split + 1:]
  if not command:
    parser().error('give the command after --, e.g. -- python -m diffax.main --config ... --workdir ...')
  script = script_from_args(args, [command])
  path = args.script or f'{args.job_name}.sbatch'
  if args.dry_run:
    print(script, end='')
    print(f'# then: {shlex.join(["sbatch", "--parsable", path])}')
    return 0
  with open(path, 'w') as f:
    f.write(script)
  print(f'Wrote {path}.')
  if args.submit:
    print(f'Submitted job {submit(path)}.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
