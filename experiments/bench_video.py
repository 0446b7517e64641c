"""Train-step time and memory of the video U-Net and the video DiT against frames x resolution, with and without remat.

  python experiments/bench_video.py --out experiments/results/bench_video.md   # the recorded table (~10 min, 2 cores)
  python experiments/bench_video.py --models dit:dit3d_tiny --frames 4 --resolutions 16 --steps 1   # a quick look

For each backbone (``unet3d_tiny``: factorised space-time attention at half the resolution, temporal
convolutions; ``dit3d_tiny``: 2 x 4 x 4 tubelets, blocks alternating within and across frames), each clip shape
[T, R, R, 1] and each remat policy (``'none'`` or a key of :data:`diffax.models.layers.REMAT_POLICIES`, applied to
every ResBlock / attention block or DiT block), it compiles the adamw train step of ``bench_models.mse_train_step``
(MSE to a random target, parameters and optimiser state donated) on a batch of ``--batch`` clips and reports

  * XLA's buffer assignment of the compiled step (``compiled.memory_analysis()``): ``temp``, the scratch memory
    the step needs beyond its arguments and outputs (mostly the activations kept for the backward pass, what remat
    trades for recomputation), and ``peak`` as XLA reports it (on the CPU backend it is the arguments plus the
    outputs and leaves the temporaries out);
  * the FLOPs of the step from XLA's cost analysis (remat adds the recomputed forward passes);
  * the compile time and the median wall time of ``--steps`` steps after one warm-up step.

Wall times on a shared CPU vary with its load (printed in the header); the memory and FLOP columns do not. On the
CPU backend XLA recomputes the rematerialised blocks (the FLOPs grow) but schedules the recomputation early, so the
temporaries do not shrink: the memory effect of remat shows on accelerators only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import flax.linen as nn
import jax
import optax

from bench_models import mse_train_step
from diffax import models
from diffax.models import layers

BACKBONES = (('unet', 'unet3d_tiny'), ('dit', 'dit3d_tiny'))


def build(name: str, preset: str, resolution: int, remat: str):
  """The backbone for clips of ``resolution``; the U-Net's attention sits at its lower level (R / 2)."""
  extra = {'attn_resolutions': (resolution // 2,)} if name == 'unet' else {}
  return models.get_model(name, preset=preset, remat=remat, **extra)


def measure(model, shape: tuple[int, ...], batch: int, steps: int) -> dict[str, float]:
  """Parameters, memory of the compiled train step and its compile / step seconds on random clips ``shape``."""
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, *shape))
  t = jax.random.uniform(jax.random.PRNGKey(1), (batch,))
  cond = None  # unconditional: the class embedding costs the same at every clip shape
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), x, t, cond))['params'])()
  tx = optax.adamw(1e-4)
  opt_state = tx.init(params)
  target = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  start = time.perf_counter()
  compiled = jax.jit(mse_train_step(model, tx), donate_argnums=(0, 1)).lower(
      params, opt_state, jax.random.PRNGKey(2), x, t, cond, target).compile()
  compile_s = time.perf_counter() - start
  memory = compiled.memory_analysis()
  flops = float((compiled.cost_analysis() or {}).get('flops', 0.0))
  times = []
  for i in range(steps + 1):  # the first is the warm-up
    start = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, jax.random.PRNGKey(3 + i), x, t, cond, target)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - start)
  return {'params': sum(p.size for p in jax.tree.leaves(params)), 'temp': memory.temp_size_in_bytes,
          'peak': memory.peak_memory_in_bytes, 'flops': flops, 'compile_s': compile_s,
          'step_s': statistics.median(times[1:])}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--frames', default='4,8', help='comma-separated clip lengths T')
  parser.add_argument('--resolutions', default='16,32', help='comma-separated frame sizes R (frames R x R)')
  parser.add_argument('--remat', default='none,full', help="comma-separated remat policies ('none' = off)")
  parser.add_argument('--models', default=','.join(f'{n}:{p}' for n, p in BACKBONES), help="'model:preset' list")
  parser.add_argument('--batch', type=int, default=2, help='clips per train step')
  parser.add_argument('--steps', type=int, default=3, help='timed steps (median) after one warm-up step')
  parser.add_argument('--out', default=None, help='also write the markdown table to this file')
  args = parser.parse_args()
  policies = args.remat.split(',')
  for policy in policies:
    if policy != 'none' and policy not in layers.REMAT_POLICIES:
      raise SystemExit(f"Unknown remat policy {policy!r}; choose 'none' or among {sorted(layers.REMAT_POLICIES)}.")
  backbones = [tuple(item.split(':', 1)) for item in args.models.split(',')]

  header = ['model', 'clip T x R x R', 'remat', 'params (M)', 'temp (MiB)', 'peak (MiB)', 'GFLOPs / step',
            'compile (s)', 'step (ms)']
  lines = [f'Adamw train step on {args.batch} clips [T, R, R, 1], fp32, median of {args.steps} steps after a '
           f'warm-up, on {jax.devices()[0].device_kind} ({os.cpu_count()} cores, load average '
           f'{os.getloadavg()[0]:.1f} at the start).', '', '| ' + ' | '.join(header) + ' |',
           '|---|---|---|' + '---:|' * (len(header) - 3)]
  print('\n'.join(lines), flush=True)
  for name, preset in backbones:
    for frames in map(int, args.frames.split(',')):
      for resolution in map(int, args.resolutions.split(',')):
        for policy in policies:
          r = measure(build(name, preset, resolution, policy), (frames, resolution, resolution, 1), args.batch,
                      args.steps)
          lines.append(f'| {preset} | {frames} x {resolution} x {resolution} | {policy} | {r["params"] / 1e6:.2f} | '
                       f'{r["temp"] / 2**20:.1f} | {r["peak"] / 2**20:.1f} | {r["flops"] / 1e9:.3f} | '
                       f'{r["compile_s"]:.1f} | {1e3 * r["step_s"]:.0f} |')
          print(lines[-1], flush=True)
  lines += ['', f'Load average at the end: {os.getloadavg()[0]:.1f}.']
  print(lines[-1])
  if args.out:
    with open(args.out, 'w') as f:
      f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
