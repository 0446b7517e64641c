"""N local processes x D devices through JAX's multi-process runtime, the way a pod or a cluster runs them.

  python launch/local.py --num-processes 2 --devices-per-process 2 -- \
      python -m diffax.main --config configs/digits.py --workdir workdirs/digits_2x2

Every process gets ``JAX_COORDINATOR_ADDRESS`` (localhost and a free port), ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``, which ``diffax/main.py`` hands to ``jax.distributed.initialize``; on CPU also
``JAX_PLATFORMS=cpu`` and ``XLA_FLAGS=--xla_force_host_platform_device_count=D``, on GPU its own
``CUDA_VISIBLE_DEVICES`` slice. Output is streamed line by line with a ``[p<i>]`` prefix. When one process fails
the others are stopped (SIGTERM, then SIGKILL after ``--grace`` seconds) and its exit status is returned;
SIGINT / SIGTERM sent to the launcher are forwarded to every process. ``--dry-run`` prints the exact commands.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import TextIO

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def free_port() -> int:
  """A TCP port that was free a moment ago (the coordinator binds it)."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def process_env(process_id: int, *, num_processes: int, devices_per_process: int, platform: str, address: str,
                base: Mapping[str, str]) -> dict[str, str]:
  """The variables process ``process_id`` needs on top of ``base`` (only those that are set or changed)."""
  env = {'JAX_COORDINATOR_ADDRESS': address, 'JAX_NUM_PROCESSES': str(num_processes),
         'JAX_PROCESS_ID': str(process_id)}
  if platform == 'cpu':
    kept = [f for f in base.get('XLA_FLAGS', '').split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env['JAX_PLATFORMS'] = 'cpu'
    env['XLA_FLAGS'] = ' '.join([*kept, f'{DEVICE_COUNT_FLAG}={devices_per_process}'])
  else:
    visible = base.get('CUDA_VISIBLE_DEVICES', '')
    gpus = visible.split(',') if visible else [str(i) for i in range(num_processes * devices_per_process)]
    if len(gpus) < num_processes * devices_per_process:
      raise ValueError(f'{num_processes} x {devices_per_process} GPUs requested; CUDA_VISIBLE_DEVICES has {visible}.')
    first = process_id * devices_per_process
    env['CUDA_VISIBLE_DEVICES'] = ','.join(gpus[first:first + devices_per_process])
  return env


def commands(command: Sequence[str], *, num_processes: int, devices_per_process: int, platform: str, address: str,
             base: Mapping[str, str]) -> list[list[str]]:
  """One ``env K=V ... command`` line per process: exactly what :func:`launch` starts."""
  return [['env', *(f'{k}={v}' for k, v in process_env(i, num_processes=num_processes, base=base, address=address,
                                                          devices_per_process=devices_per_process,
                                                          platform=platform).items()), *command]
          for i in range(num_processes)]


def _stream(proc: subprocess.Popen, prefix: str, out: TextIO, lock: threading.Lock) -> None:
  for raw in proc.stdout:
    line = raw.decode(errors='replace')
    with lock:
      out.write(f'{prefix}{line}' if line.endswith('\n') else f'{prefix}{line}\n')
      out.flush()


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, signum)
    except ProcessLookupError:
      pass


def launch(command: Sequence[str], *, num_processes: int, devices_per_process: int, platform: str = 'cpu',
           port: int | None = None, env: Mapping[str, str] | None = None, cwd: str | None = None,
           out: TextIO = sys.stdout, grace: float = 10.0) -> int:
  """Runs ``command`` as ``num_processes`` coordinated processes; returns 0 or the first failure's exit status.

  A process killed by a signal counts as exit status ``128 + signal``. Each process runs in its own session, so
  a terminal's Ctrl-C reaches the launcher only, which forwards it once to every process.
  """
  base = dict(os.environ if env is None else env)
  address = f'localhost:{port or free_port()}'
  procs, threads, lock = [], [], threading.Lock()
  for i in range(num_processes):
    proc_env = {**base, **process_env(i, num_processes=num_processes, devices_per_process=devices_per_process,
                                      platform=platform, address=address, base=base)}
    proc = subprocess.Popen(list(command), env=proc_env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    procs.append(proc)
    threads.append(threading.Thread(target=_stream, args=(proc, f'[p{i}] ', out, lock), daemon=True))
    threads[-1].start()

  def forward(signum, frame):
    del frame
    for proc in procs:
      _signal_group(proc, signum)

  in_main_thread = threading.current_thread() is threading.main_thread()
  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
  try:
    status = 0
    while any(p.poll() is None for p in procs) and not status:
      time.sleep(0.1)
      failed = [p for p in procs if p.poll() not in (None, 0)]
      if failed:
        code = failed[0].returncode
        status = 128 - code if code < 0 else code
        with lock:
          out.write(f'[launch] process {procs.index(failed[0])} exited with status {status}; stopping the others.\n')
        for proc in procs:
          _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
          time.sleep(0.1)
        for proc in procs:
          _signal_group(proc, signal.SIGKILL)
    for proc in procs:
      proc.wait()
    for thread in threads:
      thread.join()
    if not status:
      codes = [p.returncode for p in procs]
      status = next((128 - c if c < 0 else c for c in codes if c), 0)
    return status
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage='%(prog)s [options] -- python -m diffax.main ...')
  p.add_argument('--num-processes', type=int, default=2)
  p.add_argument('--devices-per-process', type=int, default=1,
                 help='CPU: forced host devices per process; GPU: GPUs per process')
  p.add_argument('--platform', choices=('cpu', 'gpu'), default='cpu')
  p.add_argument('--port', type=int, default=0, help='coordinator port (default: a free one)')
  p.add_argument('--grace', type=float, default=10.0, help='seconds between SIGTERM and SIGKILL on failure')
  p.add_argument('--dry-run', action='store_true', help='print the commands, run nothing')
  return p


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  split = argv.index('--') if '--' in argv else len(argv)
  args, command = parser().parse_args(argv[:split]), argv[split + 1:]
  if not command:
    parser().error('give the command after --, e.g. -- python -m diffax.main --config ... --workdir ...')
  port = args.port or free_port()
  if args.dry_run:
    for line in commands(command, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
                         platform=args.platform, address=f'localhost:{port}', base=os.environ):
      print(shlex.join(line))
    return 0
  return launch(command, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
                platform=args.platform, port=port, grace=args.grace)


if __name__ == '__main__':
  sys.exit(main())
