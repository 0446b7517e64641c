"""Cost of evaluation: FID Inception feature extraction and the statistics computed from its features.

  python experiments/bench_eval.py                      # batch sizes 1, 8, 32; ~2 min on 2 CPU cores
  python experiments/bench_eval.py --batch-sizes 64,256 # on an accelerator

Inception throughput does not depend on the weights, so random weights of the right shapes are used (no weights
file needed); images are 32x32x3 and resized to 299x299 inside the network, as for CIFAR-10. The first table gives
the compile time and the steady-state images/s of the jitted network per batch size (median of ``--repeats`` timed
calls after one warm-up). The second gives the host-side statistics at D = 2048: ``FeatureStats.update`` per 1k
images, the Fréchet distance by both matrix square roots, the Inception Score of 50k logits, one KID subset
(the metric uses 100) and precision/recall on 1k vs 1k features.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffax.evaluation import inception
from diffax.evaluation import inception_weights
from diffax.evaluation import stats


def random_variables(seed: int = 0) -> dict:
  """He-normal kernels, unit BatchNorm statistics: activations stay O(1) through the 94 layers."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for name, shape in inception_weights.EXPECTED_SHAPES.items():
    if name.endswith('kernel'):
      arrays[name] = (rng.standard_normal(shape, np.float32) * np.sqrt(2.0 / np.prod(shape[:-1]))).astype(np.float32)
    else:
      arrays[name] = np.ones(shape, np.float32) if name.endswith(('scale', 'var')) else np.zeros(shape, np.float32)
  return inception_weights.unflatten(arrays)


def _timed(fn, repeats: int) -> float:
  """Median wall time of ``repeats`` calls."""
  return statistics.median(_once(fn)[0] for _ in range(repeats))


def _once(fn):
  """``(seconds, result)`` of one call."""
  start = time.perf_counter()
  result = fn()
  return time.perf_counter() - start, result


def bench_network(batch_sizes: list[int], image_size: int, repeats: int) -> list[str]:
  variables = jax.device_put(random_variables())
  apply_fn = jax.jit(inception.FIDInceptionV3().apply)
  rows = ['| batch | compile (s) | step (s) | images/s |', '|---:|---:|---:|---:|']
  print('\n'.join(rows), flush=True)
  for b in batch_sizes:
    images = jnp.asarray(np.random.default_rng(b).uniform(-1, 1, (b, image_size, image_size, 3)), jnp.float32)
    start = time.perf_counter()
    compiled = apply_fn.lower(variables, images).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(variables, images))
    run = lambda c=compiled, x=images: jax.block_until_ready(c(variables, x))
    step = _timed(run, repeats)
    rows.append(f'| {b} | {compile_s:.1f} | {step:.3f} | {b / step:.1f} |')
    print(rows[-1], flush=True)
  return rows


def bench_statistics(repeats: int) -> list[str]:
  d = 2048
  rng = np.random.default_rng(0)
  feats = rng.standard_normal((1000, d), np.float32)
  acc = stats.FeatureStats(dim=d)
  update_s = _timed(lambda: acc.update(feats), repeats)
  # Realistic covariances: ~N(0, I) features mixed through a random map (full rank, ill-conditioned-ish).
  mix = rng.standard_normal((d, d)) / np.sqrt(d)
  s1, s2 = (stats.FeatureStats(dim=d) for _ in range(2))
  for s, shift in ((s1, 0.0), (s2, 0.1)):
    for _ in range(3):
      s.update((rng.standard_normal((1000, d)) + shift) @ mix)
  rows = ['| statistic (D = 2048) | time (s) | value |', '|---|---:|---:|',
          f'| FeatureStats.update, 1k images (float64) | {update_s:.3f} | |']
  for method in ('eigh', 'sqrtm'):
    t, value = _once(lambda m=method: stats.frechet_distance(s1.mean, s1.cov, s2.mean, s2.cov, method=m))
    rows.append(f'| frechet_distance, {method} | {t:.2f} | {value:.6f} |')
  logits = rng.standard_normal((50_000, 1008), np.float32) * 3
  t, (is_mean, _) = _once(lambda: stats.inception_score(logits))
  rows.append(f'| inception_score, 50k x 1008 logits | {t:.2f} | {is_mean:.3f} |')
  f1, f2 = rng.standard_normal((1000, d)), rng.standard_normal((1000, d)) + 0.05
  t, (kid, _) = _once(lambda: stats.kernel_inception_distance(f1, f2, num_subsets=1))
  rows.append(f'| KID, one 1000-sample subset (x100 for the metric) | {t:.2f} | {kid:.5f} |')
  t, (precision, recall) = _once(lambda: stats.precision_recall(f1, f2))
  rows.append(f'| precision/recall, 1k vs 1k, k = 3 | {t:.2f} | {precision:.3f} / {recall:.3f} |')
  print('\n'.join(rows), flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch-sizes', default='1,8,32', help='comma-separated Inception batch sizes')
  parser.add_argument('--image-size', type=int, default=32, help='input side before the 299x299 resize')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default=None, help='also write the markdown tables to this file')
  args = parser.parse_args()
  load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
  header = (f'# Evaluation cost\n\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}, '
            f'{os.cpu_count()} CPU cores, load average {load:.1f} at start; random Inception weights\n')
  print(header)
  net = bench_network([int(b) for b in args.batch_sizes.split(',')], args.image_size, args.repeats)
  print()
  st = bench_statistics(args.repeats)
  text = '\n'.join([header, f'## FID Inception, {args.image_size}x{args.image_size} -> 299x299, float32', *net, '',
                    '## Statistics (host numpy, float64)', *st])
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
