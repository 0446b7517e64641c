"""Cloud TPU VM pod slices through ``gcloud``: create, copy and install the code on every worker, run, delete.

  python launch/tpu_vm.py all --name diffax-v4 --zone us-central2-b --accelerator-type v4-32 -- \
      python -m diffax.main --config configs/digits.py --workdir gs://BUCKET/workdirs/digits

Subcommands: ``create`` (``gcloud compute tpus tpu-vm create``, ``--spot`` or ``--preemptible`` optional),
``install`` (pack the checkout -- tracked and untracked files git does not ignore, so uncommitted edits travel
-- and ``scp`` it to every worker, or ``--source git`` to clone a pushed ``--ref``; then a Python 3.11 venv
with ``pip install -e . jax[tpu]`` via uv on every worker), ``run`` (``ssh --worker=all`` starts the same
command on every host at once; JAX detects the pod, so no distributed variables are set; every line comes
back prefixed with its worker's hostname and is also appended to ``--log``), ``delete``, and ``all``
(create, install, run, then delete even when the run failed, unless ``--keep``). ``--dry-run`` prints the
exact commands. Every host writes checkpoints, so the workdir must be on GCS (``gs://``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[1]
TARBALL = 'diffax-src.tar.gz'
UV_INSTALL = 'command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh'


def _gcloud(args: argparse.Namespace, verb: str) -> list[str]:
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, args.name, f'--zone={args.zone}',
          *([f'--project={args.project}'] if args.project else [])]


def create_command(args: argparse.Namespace) -> list[str]:
  command = [*_gcloud(args, 'create'), f'--accelerator-type={args.accelerator_type}', f'--version={args.version}']
  return command + ['--spot'] * args.spot + ['--preemptible'] * args.preemptible


def delete_command(args: argparse.Namespace) -> list[str]:
  return [*_gcloud(args, 'delete'), '--quiet']


def ssh_command(args: argparse.Namespace, remote: str) -> list[str]:
  """``remote`` (a shell string) run on every worker of the slice at once."""
  return [*_gcloud(args, 'ssh'), '--worker=all', f'--command={remote}']


def install_commands(args: argparse.Namespace) -> list[list[str]]:
  """Copy (or clone) the code into ``--remote-dir`` on every worker and install it into ``.venv`` there."""
  d = shlex.quote(args.remote_dir)
  if args.source == 'local':
    local = os.path.join(tempfile.gettempdir(), TARBALL)
    pack = ['bash', '-c', f'cd {shlex.quote(str(REPO))} && git ls-files -z -co --exclude-standard | '
            f'tar -czf {shlex.quote(local)} --ignore-failed-read --null -T -']
    scp = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', local, f'{args.name}:{TARBALL}', '--worker=all',
           f'--zone={args.zone}', *([f'--project={args.project}'] if args.project else [])]
    fetch = f'rm -rf {d} && mkdir -p {d} && tar -xzf {TARBALL} -C {d}'
    steps = [pack, scp]
  else:
    fetch = (f'(test -d {d}/.git || git clone {shlex.quote(args.repo)} {d}) && cd {d} && '
             f'git fetch origin {shlex.quote(args.ref)} && git checkout --detach FETCH_HEAD && cd ~')
    steps = []
  install = (f'{fetch} && export PATH=$HOME/.local/bin:$PATH && ({UV_INSTALL}) && cd {d} && '
             f'uv venv --python {args.python} .venv && uv pip install --python .venv/bin/python -e . "jax[tpu]"')
  return steps + [ssh_command(args, install)]


def run_remote(args: argparse.Namespace, command: Sequence[str], *, prelude: str = '') -> str:
  """What every worker's login shell (bash) runs: venv, ``--env`` exports, ``prelude``, the command.

  Output lines are prefixed with the worker's hostname; ``pipefail`` keeps the command's exit status.
  """
  parts = [f'cd {shlex.quote(args.remote_dir)}', 'source .venv/bin/activate']
  parts += [f'export {k}={shlex.quote(v)}' for k, _, v in (e.partition('=') for e in args.env)]
  parts += [prelude] * bool(prelude) + [shlex.join(command)]
  return f'set -o pipefail; ({" && ".join(parts)}) 2>&1 | sed -u "s/^/[$(hostname)] /"'


def run_command(args: argparse.Namespace, command: Sequence[str], *, prelude: str = '') -> list[str]:
  return ssh_command(args, run_remote(args, command, prelude=prelude))


def stream(command: Sequence[str], log: str = '') -> int:
  """Runs ``command`` here, copying its output to stdout and (appending) to ``log``; returns its exit status."""
  proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  with open(log, 'ab') if log else open('/dev/null', 'wb') as f:
    for line in proc.stdout:
      sys.stdout.buffer.write(line)
      sys.stdout.flush()
      f.write(line)
  return proc.wait()


def add_options(p: argparse.ArgumentParser) -> None:
  """The slice's options (shared with ``experiments/sweep.py --launcher tpu_vm -- <options>``)."""
  p.add_argument('--name', required=True, help='TPU VM (slice) name')
  p.add_argument('--zone', required=True, help='e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p)')
  p.add_argument('--project', default='', help='default: gcloud config get project')
  p.add_argument('--env', action='append', default=[], metavar='KEY=VALUE', help='exported on every worker (repeat)')
  p.add_argument('--remote-dir', default='diffax', help='checkout on every worker, relative to the home directory')
  p.add_argument('--log', default='', help='also append the streamed output to this local file')


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage='%(prog)s [options] -- python -m diffax.main ...')
  p.add_argument('action', choices=('create', 'install', 'run', 'delete', 'all'))
  add_options(p)
  p.add_argument('--accelerator-type', default='v4-8', help='e.g. v4-32, v5litepod-16, v5p-32, v6e-16')
  p.add_argument('--version', default='tpu-ubuntu2204-base',
                 help='runtime: tpu-ubuntu2204-base (v4, v5e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)')
  capacity = p.add_mutually_exclusive_group()
  capacity.add_argument('--spot', action='store_true', help='Spot capacity (cheaper, can be pre-empted)')
  capacity.add_argument('--preemptible', action='store_true', help='legacy pre-emptible capacity')
  p.add_argument('--source', choices=('local', 'git'), default='local',
                 help='local: pack this checkout (uncommitted edits included); git: clone --repo at --ref')
  p.add_argument('--repo', default='', help='git URL for --source git')
  p.add_argument('--ref', default='main', help='branch, tag or commit for --source git')
  p.add_argument('--python', default='3.11', help='Python version of the venv on the workers')
  p.add_argument('--keep', action='store_true', help='all: keep the slice after the run')
  p.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
  return p


def main(argv: Sequence[str] | None = None) -> int:
  p = parser()
  argv = list(sys.argv[1:] if argv is None else argv)
  split = argv.index('--') if '--' in argv else len(argv)
  args, command = p.parse_args(argv[:split]), argv[split + 1:]
  if args.action in ('run', 'all') and not command:
    p.error('give the command after --, e.g. -- python -m diffax.main --config ... --workdir gs://...')
  if args.source == 'git' and not args.repo and args.action in ('install', 'all'):
    p.error('--source git needs --repo URL')
  plan = {'create': [create_command(args)], 'install': install_commands(args), 'delete': [delete_command(args)]}
  if command:
    plan['run'] = [run_command(args, command)]
  actions = ['create', 'install', 'run'] if args.action == 'all' else [args.action]
  cleanup = [delete_command(args)] if args.action == 'all' and not args.keep else []
  if args.dry_run:
    for step in [c for a in actions for c in plan[a]] + cleanup:
      print(shlex.join(step))
    return 0
  try:
    for step in (c for a in actions for c in plan[a]):
      print(f'+ {shlex.join(step)}', flush=True)
      status = stream(step, args.log)
      if status:
        print(f'Failed with exit status {status}: {shlex.join(step)}', file=sys.stderr)
        return status
    return 0
  finally:
    for step in cleanup:
      print(f'+ {shlex.join(step)}', flush=True)
      subprocess.run(step, check=False)


if __name__ == '__main__':
  sys.exit(main())
