"""diffax against PyTorch + diffusers on the same U-Net layouts: forward and AdamW train-step images per second.

  pip install -e '.[bench]'    # torch and diffusers, for this benchmark only (never a runtime dependency)
  python experiments/bench_vs_torch.py                  # both layouts, 5 interleaved rounds (~15 min on 2 cores)
  python experiments/bench_vs_torch.py --layouts digits --rounds 3 --torch-python /tmp/torchenv/bin/python

Each framework runs in its own worker process (``--torch-python`` runs the PyTorch one, so torch may live in
another environment; diffax never imports it). Both workers build the layout, compile / warm up, and then
answer timing requests one at a time: every round times diffax and PyTorch back to back (alternating which goes
first), so load from other work on the machine hits both alike; the table gives the medians over rounds and the
ratio diffax / PyTorch (above 1: diffax is faster). On a machine shared with other work the wall-clock ratio says
more about how each runtime copes with preempted threads than about its kernels: the ratio of images per
CPU-second (user + system time of each worker over all its threads) is the figure to read there, and the header
gives the load average.

The layouts (:data:`LAYOUTS`) are the DDPM CIFAR-10 U-Net (``unet:ddpm_cifar10``, 35.7 M, batch 8, 32x32x3) and
the digits default's (``configs/digits.py``: ``unet:unet_tiny``, 10 classes + the null label, batch 64, 8x8x1),
mapped onto ``diffusers.UNet2DModel`` block by block (both parameter counts are printed). The train step is
``MSE(model(x, t, y), target)``, backward and one AdamW update (lr 1e-4, weight decay 1e-4 in both), fp32, with
dropout active; the forward is the model in inference mode (no dropout, no autograd). PyTorch gets
``--threads`` intra-op threads (default: every core, as XLA uses).

The diffax worker runs with the environment's ``XLA_FLAGS`` (to try XLA:CPU flags, e.g.
``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot``). Results:
``experiments/results/bench_vs_torch.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

LAYOUTS: dict[str, dict[str, Any]] = {
    # Ho et al. 2020: ch 128, mults (1, 2, 2, 2), 2 res blocks, single-head attention at 16x16, dropout 0.1.
    'ddpm_cifar10': dict(
        preset='ddpm_cifar10', shape=(32, 32, 3), batch=8, num_classes=None,
        diffusers=dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                       block_out_channels=(128, 256, 256, 256),
                       down_block_types=('DownBlock2D', 'AttnDownBlock2D', 'DownBlock2D', 'DownBlock2D'),
                       up_block_types=('UpBlock2D', 'UpBlock2D', 'AttnUpBlock2D', 'UpBlock2D'),
                       attention_head_dim=256, norm_num_groups=32, norm_eps=1e-6, dropout=0.1)),
    # configs/digits.py: unet_tiny (ch 16, mults (1, 2), 1 res block, 2-head attention at 4x4, 4 groups), labels.
    'digits': dict(
        preset='unet_tiny', shape=(8, 8, 1), batch=64, num_classes=10,
        diffusers=dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(16, 32), down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
                       up_block_types=('AttnUpBlock2D', 'UpBlock2D'), attention_head_dim=16, norm_num_groups=4,
                       norm_eps=1e-6, num_class_embeds=11)),
}
"""Layout name -> diffax preset, input [H, W, C], batch, classes (None: unconditional), UNet2DModel kwargs."""

LR, WEIGHT_DECAY = 1e-4, 1e-4


# ------------------------------------------------------------------------------------------------ workers
class _JaxWorker:
  """The diffax model of a layout with a jitted forward and a jitted, donated AdamW train step."""

  def __init__(self, layout: dict[str, Any]):
    import bench_models
    import flax.linen as nn
    import jax
    import optax

    from diffax import models

    self.jax = jax
    model = models.get_model('unet', preset=layout['preset'], num_classes=layout['num_classes'])
    batch, shape = layout['batch'], layout['shape']
    kx, kt, ky, kp, kg = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(kx, (batch, *shape))
    t = jax.random.uniform(kt, (batch,))
    cond = None if layout['num_classes'] is None else jax.random.randint(ky, (batch,), 0, layout['num_classes'] + 1)
    target = jax.random.normal(kg, (batch, *shape))
    params = jax.jit(lambda: nn.unbox(model.init(kp, x, t, cond))['params'])()
    tx = optax.adamw(LR, weight_decay=WEIGHT_DECAY)
    train_step = bench_models.mse_train_step(model, tx)

    start = time.perf_counter()
    self._forward = jax.jit(lambda p, x, t, cond: model.apply({'params': p}, x, t, cond)).lower(
        params, x, t, cond).compile()
    self._train = jax.jit(train_step, donate_argnums=(0, 1)).lower(
        params, tx.init(params), kp, x, t, cond, target).compile()
    self.compile_s = time.perf_counter() - start
    self.params_count = sum(a.size for a in jax.tree.leaves(params))
    self.state = (params, tx.init(params))
    self.inputs = (x, t, cond, target)
    self.step = 0
    self.version = f'jax {jax.__version__}, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}'

  def forward(self) -> None:
    x, t, cond, _ = self.inputs
    self.jax.block_until_ready(self._forward(self.state[0], x, t, cond))

  def train(self) -> None:
    x, t, cond, target = self.inputs
    self.step += 1
    *self.state, loss = self._train(*self.state, self.jax.random.PRNGKey(self.step), x, t, cond, target)
    self.jax.block_until_ready(loss)


class _TorchWorker:
  """The same layout as a ``diffusers.UNet2DModel`` with ``torch.optim.AdamW``."""

  def __init__(self, layout: dict[str, Any], threads: int):
    import diffusers
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    self.torch = torch
    self.model = diffusers.UNet2DModel(**layout['diffusers'])
    batch, (h, w, c) = layout['batch'], layout['shape']
    self.x = torch.randn(batch, c, h, w)
    self.t = torch.randint(0, 1000, (batch,))
    self.cond = None if layout['num_classes'] is None else torch.randint(0, layout['num_classes'] + 1, (batch,))
    self.target = torch.randn(batch, c, h, w)
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    self.params_count = sum(p.numel() for p in self.model.parameters())
    self.compile_s = 0.0
    self.version = f'torch {torch.__version__} ({torch.get_num_threads()} threads), diffusers {diffusers.__version__}'

  def forward(self) -> None:
    self.model.eval()
    with self.torch.inference_mode():
      self.model(self.x, self.t, self.cond)

  def train(self) -> None:
    self.model.train()
    loss = self.torch.nn.functional.mse_loss(self.model(self.x, self.t, self.cond).sample, self.target)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _timed(fn, min_seconds: float, min_calls: int = 2) -> tuple[int, float, float]:
  """Calls ``fn`` until both ``min_calls`` calls and ``min_seconds`` have passed -> (calls, wall seconds, CPU
  seconds of this process over all its threads)."""
  calls, start, cpu_start = 0, time.perf_counter(), _cpu_seconds()
  while calls < min_calls or time.perf_counter() - start < min_seconds:
    fn()
    calls += 1
  return calls, time.perf_counter() - start, _cpu_seconds() - cpu_start


def _serve(args: argparse.Namespace) -> None:
  """Worker loop: build and warm up, report, then answer ``forward S`` / ``train S`` lines (time at least S
  seconds) with the calls made and the seconds taken."""
  layout = LAYOUTS[args.layout]
  worker = _JaxWorker(layout) if args.worker == 'jax' else _TorchWorker(layout, args.threads)
  for kind in ('forward', 'train'):
    _timed(getattr(worker, kind), args.warmup_s)
  print(json.dumps(dict(params=worker.params_count, compile_s=worker.compile_s, version=worker.version)), flush=True)
  for line in sys.stdin:
    kind, seconds = line.split()
    calls, seconds, cpu_seconds = _timed(getattr(worker, kind), float(seconds))
    print(json.dumps(dict(calls=calls, seconds=seconds, cpu_seconds=cpu_seconds)), flush=True)


# ------------------------------------------------------------------------------------------------ driver
class _Client:
  def __init__(self, python: str, worker: str, args: argparse.Namespace, layout: str):
    command = [python, os.path.abspath(__file__), '--worker', worker, '--layout', layout, '--threads',
               str(args.threads), '--warmup-s', str(args.warmup_s)]
    self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.info = self._read()

  def _read(self) -> dict[str, Any]:
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f'worker {self.proc.args} exited with {self.proc.wait()}')
    return json.loads(line)

  def images_per_s(self, kind: str, seconds: float, batch: int) -> tuple[float, float]:
    """Images per wall second and per CPU second of the worker."""
    self.proc.stdin.write(f'{kind} {seconds}\n')
    self.proc.stdin.flush()
    reply = self._read()
    return batch * reply['calls'] / reply['seconds'], batch * reply['calls'] / reply['cpu_seconds']

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait()


def _bench_layout(name: str, args: argparse.Namespace) -> tuple[list[str], dict[str, Any]]:
  layout = LAYOUTS[name]
  clients = {'diffax': _Client(sys.executable, 'jax', args, name),
             'torch': _Client(args.torch_python, 'torch', args, name)}
  budget = {'forward': args.seconds / 2, 'train': args.seconds}
  samples = {(fw, kind): [] for fw in clients for kind in budget}
  per_cpu = {(fw, kind): [] for fw in clients for kind in budget}
  for r in range(args.rounds):
    order = ['diffax', 'torch'] if r % 2 == 0 else ['torch', 'diffax']
    for kind in budget:
      for fw in order:
        wall, cpu = clients[fw].images_per_s(kind, budget[kind], layout['batch'])
        samples[fw, kind].append(wall)
        per_cpu[fw, kind].append(cpu)
    print(f'  {name} round {r + 1}: ' + ', '.join(f'{fw} {kind} {v[-1]:.1f}' for (fw, kind), v in samples.items()),
          file=sys.stderr, flush=True)
  info = {fw: c.info for fw, c in clients.items()}
  for client in clients.values():
    client.close()
  med = {key: statistics.median(v) for key, v in samples.items()}
  med_cpu = {key: statistics.median(v) for key, v in per_cpu.items()}
  row = [name, f"{layout['batch']}", 'x'.join(map(str, layout['shape'])),
         f"{info['diffax']['params'] / 1e6:.3f} / {info['torch']['params'] / 1e6:.3f}"]
  for kind in budget:
    row += [f"{med['diffax', kind]:.1f}", f"{med['torch', kind]:.1f}",
            f"**{med['diffax', kind] / med['torch', kind]:.2f}**"]
  row.append(f"{med_cpu['diffax', 'train'] / med_cpu['torch', 'train']:.2f}")
  row.append(f"{info['diffax']['compile_s']:.0f}")
  return row, info


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--layouts', default=','.join(LAYOUTS), help=f'comma-separated among {sorted(LAYOUTS)}')
  parser.add_argument('--rounds', type=int, default=5, help='interleaved timing rounds (medians are reported)')
  parser.add_argument('--seconds', type=float, default=10.0,
                      help='each train timing runs at least this long (and 2 steps), each forward timing half')
  parser.add_argument('--warmup-s', type=float, default=5.0, help='untimed forwards, then train steps, per worker')
  parser.add_argument('--threads', type=int, default=os.cpu_count(), help='PyTorch intra-op threads')
  parser.add_argument('--torch-python', default=sys.executable, help='python with torch and diffusers installed')
  parser.add_argument('--out', default=None, help='also write the markdown table to this file')
  parser.add_argument('--worker', choices=('jax', 'torch'), help=argparse.SUPPRESS)
  parser.add_argument('--layout', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return _serve(args)
  names = args.layouts.split(',')
  for name in names:
    if name not in LAYOUTS:
      raise SystemExit(f'Unknown layout {name!r}; choose among {sorted(LAYOUTS)}.')

  header = ['layout', 'batch', 'input', 'params diffax / torch (M)', 'fwd img/s diffax', 'fwd img/s torch',
            'fwd ratio', 'train img/s diffax', 'train img/s torch', 'train ratio', 'train ratio per CPU-second',
            'diffax compile (s)']
  rows, infos = [], []
  for name in names:
    row, info = _bench_layout(name, args)
    rows.append('| ' + ' | '.join(row) + ' |')
    infos.append(info)
    print(rows[-1], flush=True)
  load = ', '.join(f'{x:.1f}' for x in os.getloadavg())
  lines = [f'fp32, medians of {args.rounds} interleaved rounds, {os.cpu_count()} CPU cores (load average at the '
           f'end {load}); '
           f"{infos[0]['diffax']['version']}; {infos[0]['torch']['version']}.", '',
           '| ' + ' | '.join(header) + ' |', '|---|---:|---|---|' + '---:|' * (len(header) - 4), *rows]
  print('\n'.join(lines))
  if args.out:
    with open(args.out, 'w') as f:
      f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
