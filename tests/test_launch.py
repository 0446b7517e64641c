"""Launchers: dry-run commands and scripts for SLURM and Cloud TPU VMs; the local launcher runs for real.

The dry runs are checked as parsed commands (``shlex``) and, for shell text, by ``bash -n``; the TPU worker script
is also executed here against a stand-in checkout. The local launcher runs the real trainer as 2 processes x 2 CPU
devices, and is checked for failure propagation and signal handling with tiny Python processes.
"""

import argparse
import io
import json
import os
import shlex
import subprocess
import sys
import time

import pytest

import trainer_runs

sys.path.insert(0, str(trainer_runs.REPO))
from launch import local, slurm, tpu_vm  # noqa: E402

COMMAND = ['python', '-m', 'diffax.main', '--config=configs/digits.py', '--workdir=gs://bucket/w d']


def _bash_syntax_ok(text: str) -> bool:
  return subprocess.run(['bash', '-n', '-c', text], check=False).returncode == 0


# ---------------------------------------------------------------------------------------------------- local


def test_local_dry_run(capsys, monkeypatch):
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  assert local.main(['--num-processes', '3', '--devices-per-process', '2', '--port', '4321', '--dry-run', '--',
                     *COMMAND]) == 0
  lines = [shlex.split(l) for l in capsys.readouterr().out.splitlines()]
  assert lines == [['env', 'JAX_COORDINATOR_ADDRESS=localhost:4321', 'JAX_NUM_PROCESSES=3', f'JAX_PROCESS_ID={i}',
                    'JAX_PLATFORMS=cpu', 'XLA_FLAGS=--xla_force_host_platform_device_count=2', *COMMAND]
                   for i in range(3)]


def test_local_env_keeps_other_xla_flags_and_slices_gpus():
  env = local.process_env(1, num_processes=2, devices_per_process=4, platform='cpu', address='h:1',
                          base={'XLA_FLAGS': '--xla_cpu_foo=1 --xla_force_host_platform_device_count=8'})
  assert env['XLA_FLAGS'] == '--xla_cpu_foo=1 --xla_force_host_platform_device_count=4'
  gpu = dict(num_processes=2, devices_per_process=2, platform='gpu', address='h:1')
  assert local.process_env(1, **gpu, base={})['CUDA_VISIBLE_DEVICES'] == '2,3'
  assert local.process_env(1, **gpu, base={'CUDA_VISIBLE_DEVICES': '4,5,6,7'})['CUDA_VISIBLE_DEVICES'] == '6,7'
  assert 'JAX_PLATFORMS' not in local.process_env(0, **gpu, base={})
  with pytest.raises(ValueError, match='CUDA_VISIBLE_DEVICES'):
    local.process_env(0, **gpu, base={'CUDA_VISIBLE_DEVICES': '0,1,2'})


def test_local_failure_stops_the_others():
  """Process 1 fails at once; process 0 (which ignores SIGTERM) is killed after the grace period."""
  script = ('import os, signal, sys, time\n'
            'i = int(os.environ["JAX_PROCESS_ID"])\n'
            'print("hello from", i, os.environ["JAX_NUM_PROCESSES"], flush=True)\n'
            'if i == 1: sys.exit(7)\n'
            'signal.signal(signal.SIGTERM, signal.SIG_IGN)\n'
            'time.sleep(60)\n')
  out = io.StringIO()
  start = time.monotonic()
  status = local.launch([sys.executable, '-c', script], num_processes=2, devices_per_process=1, grace=1.0, out=out)
  assert status == 7 and time.monotonic() - start < 30
  lines = out.getvalue().splitlines()
  assert '[p0] hello from 0 2' in lines and '[p1] hello from 1 2' in lines
  assert '[launch] process 1 exited with status 7; stopping the others.' in lines


def test_local_forwards_sigterm():
  script = ('import signal, sys, time\n'
            'signal.signal(signal.SIGTERM, lambda *_: sys.exit(143 - 100))\n'
            'print("ready", flush=True)\n'
            'time.sleep(60)\n')
  proc = subprocess.Popen([sys.executable, str(trainer_runs.REPO / 'launch' / 'local.py'), '--num-processes', '2',
                           '--', sys.executable, '-c', script], stdout=subprocess.PIPE, text=True)
  ready = [proc.stdout.readline(), proc.stdout.readline()]
  assert sorted(ready) == ['[p0] ready\n', '[p1] ready\n']
  proc.terminate()
  assert proc.wait(timeout=30) == 43  # each process's own SIGTERM handler ran


# ---------------------------------------------------------------------------------------------------- slurm


def _sbatch_options(script: str) -> dict[str, str]:
  options = {}
  for line in script.splitlines():
    if line.startswith('#SBATCH '):
      key, _, value = line[len('#SBATCH '):].partition('=')
      options[key] = value
  return options


@pytest.mark.parametrize('per, tasks', [('gpu', 4), ('node', 1)])
def test_slurm_script(per, tasks):
  script = slurm.sbatch_script([COMMAND], job_name='ddpm', nodes=3, gpus_per_node=4, per=per, time='1-00:00:00',
                               partition='a100', account='lab', cpus_per_task=8, requeue=True,
                               env=['XLA_PYTHON_CLIENT_MEM_FRACTION=0.9', 'NOTE=a b'],
                               setup=['source .venv/bin/activate'])
  assert script.startswith('#!/bin/bash\n') and _bash_syntax_ok(script)
  assert _sbatch_options(script) == {
      '--job-name': 'ddpm', '--nodes': '3', '--ntasks-per-node': str(tasks), '--gpus-per-node': '4',
      '--time': '1-00:00:00', '--output': 'slurm-%x-%j.out', '--partition': 'a100', '--account': 'lab',
      '--cpus-per-task': '8', '--requeue': ''}
  lines = script.splitlines()
  body = lines[lines.index('set -euo pipefail') + 1:]
  assert body[0] == 'source .venv/bin/activate'
  assert [shlex.split(l) for l in body[1:3]] == [['export', 'XLA_PYTHON_CLIENT_MEM_FRACTION=0.9'],
                                                 ['export', 'NOTE=a b']]
  assert [shlex.split(l) for l in body[3:]] == [['srun', '--nodes=3', f'--ntasks-per-node={tasks}',
                                                 '--kill-on-bad-exit=1', *COMMAND]]
  assert not any('gpus-per-task' in l or 'gpu-bind' in l for l in lines)  # every task sees all GPUs of its node


def test_slurm_cli(tmp_path, capsys):
  args = ['--nodes', '2', '--gpus-per-node', '8', '--partition', 'gpu', '--time', '12:00:00']
  assert slurm.main([*args, '--dry-run', '--', *COMMAND]) == 0
  printed = capsys.readouterr().out
  assert printed.splitlines()[-1] == '# then: sbatch --parsable diffax.sbatch'
  path = tmp_path / 'job.sbatch'
  assert slurm.main([*args, '--script', str(path), '--', *COMMAND]) == 0
  assert path.read_text() + '# then: sbatch --parsable diffax.sbatch\n' == printed
  srun = shlex.split(path.read_text().splitlines()[-1])
  assert srun[:3] == ['srun', '--nodes=2', '--ntasks-per-node=8'] and srun[4:] == COMMAND


def test_slurm_submit_once(tmp_path, capsys, monkeypatch):
  """With stand-in ``sbatch`` / ``squeue``: a job still queued is left alone, one that left the queue is resubmitted."""
  bin_dir, queue = tmp_path / 'bin', tmp_path / 'queue'
  bin_dir.mkdir()
  calls = tmp_path / 'calls'
  (bin_dir / 'sbatch').write_text(f'#!/bin/bash\necho "$*" >> {calls}\necho "4$(wc -l < {calls});cluster"\n')
  (bin_dir / 'squeue').write_text(f'#!/bin/bash\ncat {queue} 2>/dev/null\n')
  for tool in ('sbatch', 'squeue'):
    (bin_dir / tool).chmod(0o755)
  monkeypatch.setenv('PATH', str(bin_dir), prepend=os.pathsep)
  args = argparse.ArgumentParser()
  slurm.add_options(args)
  options = args.parse_args(['--setup', 'module load cuda'])
  workdir = str(tmp_path / 'run')
  submit = dict(workdir=workdir, job_name='s:run', label='run', setup=['cd x'], epilogue=['touch done'])
  slurm.submit_once(options, [COMMAND], **submit, dry_run=True)
  printed = capsys.readouterr().out
  assert printed.startswith(f'# {workdir}/job.sbatch\n#!/bin/bash\n') and not (tmp_path / 'run').exists()
  slurm.submit_once(options, [COMMAND], **submit)
  script = (tmp_path / 'run' / 'job.sbatch').read_text()
  assert printed == f'# {workdir}/job.sbatch\n{script}# then: sbatch --parsable {workdir}/job.sbatch\n\n'
  lines = script.splitlines()
  assert _sbatch_options(script)['--output'] == f'{workdir}/slurm-%j.out' and _bash_syntax_ok(script)
  assert lines[lines.index('set -euo pipefail') + 1:][:2] == ['module load cuda', 'cd x'] and lines[-1] == 'touch done'
  queue.write_text('RUNNING\n')
  slurm.submit_once(options, [COMMAND], **submit)
  queue.write_text('')
  slurm.submit_once(options, [COMMAND], **submit)
  assert capsys.readouterr().out.splitlines() == [f'run: submitted job 41 (log {workdir}/slurm-41.out).',
                                                  'run: job 41 is running, not resubmitted.',
                                                  f'run: submitted job 42 (log {workdir}/slurm-42.out).']
  assert json.loads((tmp_path / 'run' / 'SUBMITTED').read_text()) == {'job_id': '42',
                                                                      'script': f'{workdir}/job.sbatch'}
  assert calls.read_text() == f'--parsable {workdir}/job.sbatch\n' * 2


# ---------------------------------------------------------------------------------------------------- TPU VM

TPU = ['--name', 'diffax-v4', '--zone', 'us-central2-b', '--project', 'my-proj']


def _tpu_dry_run(capsys, *args: str) -> list[list[str]]:
  assert tpu_vm.main(['--dry-run', *args]) == 0
  return [shlex.split(l) for l in capsys.readouterr().out.splitlines()]


def test_tpu_all_dry_run(capsys):
  create, pack, scp, install, run, delete = _tpu_dry_run(
      capsys, 'all', *TPU, '--accelerator-type', 'v4-32', '--spot', '--env', 'TFDS_DATA_DIR=gs://b/tfds', '--',
      *COMMAND)
  target = ['diffax-v4', '--zone=us-central2-b', '--project=my-proj']
  assert create == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', *target, '--accelerator-type=v4-32',
                    '--version=tpu-ubuntu2204-base', '--spot']
  assert pack[:2] == ['bash', '-c'] and 'git ls-files -z -co --exclude-standard' in pack[2]
  assert _bash_syntax_ok(pack[2]) and f'-czf {tpu_vm.tempfile.gettempdir()}/diffax-src.tar.gz' in pack[2]
  assert scp == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', f'{tpu_vm.tempfile.gettempdir()}/diffax-src.tar.gz',
                 'diffax-v4:diffax-src.tar.gz', '--worker=all', '--zone=us-central2-b', '--project=my-proj']
  for ssh in (install, run):
    assert ssh[:9] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', *target, '--worker=all']
    assert len(ssh) == 10 and ssh[9].startswith('--command=') and _bash_syntax_ok(ssh[9][len('--command='):])
  assert 'tar -xzf diffax-src.tar.gz -C diffax' in install[9] and 'uv pip install' in install[9]
  assert '-e . "jax[tpu]"' in install[9]
  assert f'export TFDS_DATA_DIR=gs://b/tfds && {shlex.join(COMMAND)}' in run[9]
  assert delete == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', *target, '--quiet']


def test_tpu_single_actions(capsys):
  [create] = _tpu_dry_run(capsys, 'create', *TPU[:4], '--accelerator-type', 'v5litepod-16', '--preemptible')
  assert create[5:] == ['diffax-v4', '--zone=us-central2-b', '--accelerator-type=v5litepod-16',
                        '--version=tpu-ubuntu2204-base', '--preemptible']
  [install] = _tpu_dry_run(capsys, 'install', *TPU, '--source', 'git', '--repo', 'https://github.com/me/diffax',
                           '--ref', 'v0.1')
  assert install[-1].startswith('--command=(test -d diffax/.git || git clone https://github.com/me/diffax diffax)')
  assert 'git fetch origin v0.1 && git checkout --detach FETCH_HEAD' in install[-1]
  assert _tpu_dry_run(capsys, 'all', *TPU, '--keep', '--', *COMMAND)[-1][4] == 'ssh'  # no delete
  for bad in (['all', *TPU], ['run', *TPU], ['install', *TPU, '--source', 'git'],
              ['create', *TPU, '--spot', '--preemptible']):
    with pytest.raises(SystemExit):
      tpu_vm.main([*bad, '--dry-run'])


def test_tpu_worker_script_runs(tmp_path):
  """The string every worker runs, run here: venv activated, env exported, lines prefixed, exit status kept."""
  (tmp_path / '.venv' / 'bin').mkdir(parents=True)
  (tmp_path / '.venv' / 'bin' / 'activate').write_text('export ACTIVATED=yes\n')
  args = tpu_vm.parser().parse_args(['run', *TPU, '--remote-dir', str(tmp_path), '--env', 'GREETING=hi there'])
  script = 'import os, sys; print(os.getcwd(), os.environ["ACTIVATED"], os.environ["GREETING"]); sys.exit(3)'
  remote = tpu_vm.run_remote(args, [sys.executable, '-c', script])
  proc = subprocess.run(['bash', '-c', remote], capture_output=True, text=True, check=False)
  host = subprocess.run(['hostname'], capture_output=True, text=True, check=True).stdout.strip()
  assert proc.returncode == 3 and proc.stdout == f'[{host}] {tmp_path} yes hi there\n'
