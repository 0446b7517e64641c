"""Sampler accuracy against exact Gaussian mixtures, and the samplers' own overhead.

  python experiments/sampler_accuracy.py            # the full table (NFE 5 ... 1000), ~15 min on 2 CPU cores
  python experiments/sampler_accuracy.py --quick    # NFE 10 and 50 only, a few minutes (what `make run` does)
  python experiments/sampler_accuracy.py --few-step --out experiments/results/sampler_accuracy_few_step.md
                                                    # 5-20 NFE: every few-step solver x grid (incl. one optimised
                                                    # for it) x final step x final order, ~30 min

Every sampler is driven by the exact denoiser of a 2-D ring mixture with unequal weights and of a 64-D
anisotropic mixture, so all error comes from the sampler. For each sampler and model-evaluation budget it prints
the gap of the mean negative log-likelihood to that of exact samples (nats/dim; negative = too sharp), the sliced
Wasserstein distance to exact samples (the floor row is two independent exact sets), the worst mode-weight error,
the sharpness (mean Mahalanobis^2 / D to the assigned mode: 1 is exact) and the wall time of the compiled run.
The overhead table measures each sampler's own work per model evaluation at batch 256, 32x32x3 (with a trivial
model, against the same number of bare calls in one compiled loop) and sets it against one call of a cheap
per-pixel MLP; a real backbone costs hundreds of times more than that MLP.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import dataclasses
import functools
import itertools
import os
import sys
import time

import jax
import jax.numpy as jnp

from diffax.diffusion import schedules
from diffax.diffusion.parameterization import Denoiser
from diffax.diffusion.samplers import ancestral, base, ddim, deis, dpm_solver, edm, grid_search, ode, pc, unipc
from diffax.testing import metrics, mixtures


@dataclasses.dataclass(frozen=True)
class Entry:
  """A sampler configuration: its schedule, parameterisation, and steps for a budget of model evaluations."""

  name: str
  schedule: schedules.Schedule
  prediction: str
  steps_for_nfe: Callable[[int], int]
  run: Callable[..., object]


def _entries() -> list[Entry]:
  linear, vp, karras = schedules.LinearSchedule(), schedules.VPSDE(), schedules.EDM()
  return [
      Entry('ddpm-ancestral', linear, 'eps', lambda n: n,
            lambda **kw: ancestral.ancestral_sample(spacing='linspace', **kw)),
      Entry('ddpm-ancestral (large var)', linear, 'eps', lambda n: n,
            lambda **kw: ancestral.ancestral_sample(spacing='linspace', variance='large', **kw)),
      Entry('ddim (trailing)', linear, 'eps', lambda n: n, lambda **kw: ddim.ddim_sample(spacing='trailing', **kw)),
      Entry('ddim (log-snr)', linear, 'eps', lambda n: n, lambda **kw: ddim.ddim_sample(spacing='log_snr', **kw)),
      Entry('pc (rev-diff + langevin)', vp, 'eps', lambda n: max((n - 1) // 2, 1), pc.pc_sample),
      Entry('heun-ode (vp)', vp, 'eps', lambda n: max((n + 1) // 2, 1), edm.edm_heun_sample),
      Entry('edm-heun', karras, 'edm', lambda n: max((n + 1) // 2, 2), edm.edm_heun_sample),
      Entry('edm-heun churn=40', karras, 'edm', lambda n: max((n + 1) // 2, 2),
            lambda **kw: edm.edm_heun_sample(s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003, **kw)),
      Entry('dpm-solver++(2m)', linear, 'eps', lambda n: n, dpm_solver.dpm_solver_sample),
      Entry('dpm-solver++(3m)', linear, 'eps', lambda n: n,
            lambda **kw: dpm_solver.dpm_solver_sample(order=3, **kw)),
      Entry('sde-dpm-solver++(2m)', linear, 'eps', lambda n: n,
            lambda **kw: dpm_solver.dpm_solver_sample(method='sde', **kw)),
      Entry('unipc', linear, 'eps', lambda n: n, unipc.unipc_sample),
      Entry('deis', linear, 'eps', lambda n: n, deis.deis_sample),
      Entry('ipndm', linear, 'eps', lambda n: n, deis.ipndm_sample),
  ]


FEW_STEP_SOLVERS = {
    'dpm-solver++(2m)': functools.partial(dpm_solver.dpm_solver_sample, order=2),
    'unipc-2 bh2': functools.partial(unipc.unipc_sample, order=2, variant='bh2'),
    'deis-3': functools.partial(deis.deis_sample, order=3),
    'ipndm-4': functools.partial(deis.ipndm_sample, order=4),
}
"""Few-step solvers, each crossed with the grids, final steps and final orders of :func:`few_step_table` (the
third-order DPM-Solver++(3M) and UniPC-3 overshoot below 15 NFE, sampler_accuracy.md, and are left out here)."""
GRIDS = ('log_snr', 'karras', 'linspace')
OPTIMISED = ('dpm-solver++(2m)', 'unipc-2 bh2')
"""Solvers that also run on a grid optimised for them (``grid_search.optimize_grid``) at each NFE, stopping at
t_min with ``lower_order_final``."""
BASELINES = (('dpm-solver++(2m)', 'linspace', True, True), ('unipc-2 bh2', 'linspace', True, True))
"""diffusers' DPMSolverMultistep and UniPC defaults: time-uniform 'linspace' integer grid, final sigma zero,
lower_order_final."""
FINAL = {True: 'jump', False: 'stop', None: 'AB to 0'}


def _few_step_grid(schedule, nfe: int, spacing: str, final: bool | None) -> jax.Array:
  if final is None:  # iPNDM: its own grid, always to t = 0
    return base.time_grid(schedule, nfe, spacing, convention='multistep')
  return base.solver_grid(schedule, nfe, spacing, denoise_to_zero=final)


def few_step_table(mixture: mixtures.GaussianMixture, label: str, nfes: list[int], n: int,
                   search_iterations: int) -> list[str]:
  """For each NFE: every solver x grid (log-SNR, Karras, diffusers' linspace, and for ``OPTIMISED`` a grid
  optimised for it on a calibration batch of 256 other starts) x final step (jump to the x0-prediction or stop at
  t_min) x ``lower_order_final`` (both where the steps stop at t_min, True before the jump) on LinearSchedule. A
  summary (the best configuration by sliced W2 next to the floor and diffusers' time-uniform baselines) and every
  configuration's SW / sharpness per NFE."""
  floor, reference = metrics.noise_floor(mixture, n, jax.random.PRNGKey(1))
  schedule = schedules.LinearSchedule()
  denoiser = mixture.denoiser(schedule)
  results = {}
  for name, solver in FEW_STEP_SOLVERS.items():
    finals = (None,) if name.startswith('ipndm') else (True, False)
    for nfe, final, lof in itertools.product(nfes, finals, (True, False)):
      if final and not lof:
        continue  # the jump is first order: for the order-2 solvers lower_order_final changes nothing there
      kwargs = {'lower_order_final': lof} | ({} if final is None else {'denoise_to_zero': final})
      # One compiled program per solver setting serves every grid: the times are an argument.
      fn = jax.jit(lambda rng, ts, f=solver, kw=kwargs, k=nfe: f(denoiser, rng, (n, mixture.dim), num_steps=k,
                                                                 spacing=ts, **kw))
      grids = {spacing: _few_step_grid(schedule, nfe, spacing, final) for spacing in GRIDS}
      if name in OPTIMISED and lof and not final:
        grids['optimised'] = grid_search.optimize_grid(denoiser, solver, jax.random.PRNGKey(7), (256, mixture.dim),
                                                       num_steps=nfe, sampler_kwargs=kwargs,
                                                       iterations=search_iterations)
      for spacing, ts in grids.items():
        report = metrics.mixture_report(fn(jax.random.PRNGKey(0), ts).samples, mixture, reference,
                                        jax.random.PRNGKey(2))
        results[name, spacing, final, lof, nfe] = report
    print(f'  {label}: {name} done', flush=True)
  cell = lambda r: f"{r['sw']:.4f} / {r['sharpness']:.2f}"
  rows = [f'\n### {label}: {min(nfes)}-{max(nfes)} NFE (n = {n}, LinearSchedule)\n',
          '| NFE | best: solver, grid, final step, lower_order_final | SW | sharpness | best on a named grid | '
          'diffusers dpm++(2m) linspace | diffusers unipc-2 linspace | floor SW |',
          '|---:|---|---:|---:|---:|---:|---:|---:|']
  for nfe in nfes:
    configs = [k for k in results if k[-1] == nfe]
    best = min(configs, key=lambda k: results[k]['sw'])
    named = min((k for k in configs if k[1] != 'optimised'), key=lambda k: results[k]['sw'])
    rows.append(f"| {nfe} | {best[0]}, {best[1]}, {FINAL[best[2]]}, lof={best[3]} | {results[best]['sw']:.4f} | "
                f"{results[best]['sharpness']:.3f} | {cell(results[named])} ({named[0]}, {named[1]}, "
                f"{FINAL[named[2]]}, lof={named[3]}) | {cell(results[(*BASELINES[0], nfe)])} | "
                f"{cell(results[(*BASELINES[1], nfe)])} | {floor['sw']:.4f} |")
  rows += [f'\n#### {label}: every configuration, SW / sharpness\n',
           '| solver | grid | final step | lower_order_final | ' + ' | '.join(f'NFE {k}' for k in nfes) + ' |',
           '|---|---|---|---|' + '---:|' * len(nfes)]
  for key in sorted({k[:-1] for k in results}, key=lambda k: (list(FEW_STEP_SOLVERS).index(k[0]), k[1], str(k[2]),
                                                               not k[3])):
    rows.append(f'| {key[0]} | {key[1]} | {FINAL[key[2]]} | {key[3]} | ' +
                ' | '.join(cell(results[(*key, k)]) for k in nfes) + ' |')
  rows.append('\nCells are sliced W2 / sharpness (1 is exact). "jump": the last step goes to t = 0 by the '
              'x0-prediction (denoise_to_zero=True); "stop": the steps end at t_min; "AB to 0": iPNDM extrapolates '
              'to rho = 0. "optimised": grid_search.optimize_grid for that solver setting and NFE '
              f'({search_iterations} Adam steps on 256 calibration starts, other seeds than the evaluated ones).')
  for r in rows:
    print(r, flush=True)
  return rows


def _timed(fn, *args):
  out = fn(*args)
  jax.block_until_ready(out)
  start = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(out)
  return out, time.perf_counter() - start


def accuracy_table(mixture: mixtures.GaussianMixture, label: str, nfes: list[int], n: int) -> list[str]:
  floor, reference = metrics.noise_floor(mixture, n, jax.random.PRNGKey(1))
  rows = [f'\n### {label} (n = {n})\n',
          '| sampler | schedule | NFE | nll gap | SW | mode-w err | sharpness | time (s) |',
          '|---|---|---:|---:|---:|---:|---:|---:|',
          f"| exact samples (floor) | - | - | 0 | {floor['sw']:.4f} | {floor['mode_weight_err']:.4f} | "
          f"{floor['sharpness']:.3f} | - |"]

  def add(name, schedule, out, seconds):
    report = metrics.mixture_report(out.samples, mixture, reference, jax.random.PRNGKey(2))
    rows.append(f"| {name} | {type(schedule).__name__} | {int(out.nfe)} | {report['nll'] - floor['nll']:+.4f} | "
                f"{report['sw']:.4f} | {report['mode_weight_err']:.4f} | {report['sharpness']:.3f} | "
                f'{seconds:.2f} |')
    print(rows[-1], flush=True)

  for entry in _entries():
    denoiser = mixture.denoiser(entry.schedule, entry.prediction)
    for nfe in nfes:
      if entry.name.startswith('ddpm') and nfe < 20:
        continue  # ancestral sampling is not a few-step sampler; its rows start at 20.
      fn = jax.jit(lambda rng, e=entry, s=entry.steps_for_nfe(nfe): e.run(
          denoiser=denoiser, rng=rng, shape=(n, mixture.dim), num_steps=s))
      out, seconds = _timed(fn, jax.random.PRNGKey(0))
      add(entry.name, entry.schedule, out, seconds)
  vp = schedules.VPSDE()
  fn = jax.jit(lambda rng: ode.adaptive_ode_sample(mixture.denoiser(vp), rng, (n, mixture.dim), rtol=1e-5,
                                                   atol=1e-5))
  out, seconds = _timed(fn, jax.random.PRNGKey(0))
  add('adaptive ode tsit5 (tol 1e-5)', vp, out, seconds)
  return rows


def overhead_table(num_steps: int = 50, batch: int = 256) -> list[str]:
  """Sampler time beyond its model calls on CIFAR-sized inputs [batch, 32, 32, 3].

  The sampler's own work (schedule arithmetic, parameterisation conversions, noise, the loop) is measured with
  a trivial model ``0.5 x`` as ``(sampler time - time of the same number of bare model calls) / NFE``, and set
  against one call of a cheap per-pixel MLP (3-64-3, ~0.8 kFLOP per pixel, far below any real backbone).
  """
  shape = (batch, 32, 32, 3)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  w1 = jax.random.normal(k1, (3, 64), jnp.float32) / 3.0
  w2 = jax.random.normal(k2, (64, 3), jnp.float32) / 8.0

  def trivial(x, t):
    del t
    return 0.5 * x

  def mlp(x, t):
    return jax.nn.silu(x @ w1 + t[:, None, None, None]) @ w2

  def bare(model_fn, x, nfe):
    def body(x, t):
      return model_fn(x, jnp.full((batch,), t)), None
    return jax.lax.scan(body, x, jnp.linspace(1.0, 0.01, nfe))[0]

  schedule = schedules.LinearSchedule()
  samplers = [('ddim', ddim.ddim_sample, schedule), ('ddpm-ancestral', ancestral.ancestral_sample, schedule),
              ('dpm-solver++(2m)', dpm_solver.dpm_solver_sample, schedule),
              ('edm-heun', edm.edm_heun_sample, schedules.EDM()), ('pc', pc.pc_sample, schedules.VPSDE())]
  rows = [f'\n### Overhead: batch {batch}, 32x32x3, {num_steps} steps\n',
          '| sampler | NFE | sampler, trivial model (s) | bare trivial calls (s) | overhead per NFE (ms) | '
          'one MLP call (ms) | overhead / MLP call |', '|---|---:|---:|---:|---:|---:|---:|']
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  for name, sampler, sched in samplers:
    fn = jax.jit(lambda rng, s=sampler, sc=sched: s(Denoiser(trivial, sc), rng, shape, num_steps=num_steps))
    out, t_sampler = _timed(fn, jax.random.PRNGKey(0))
    nfe = int(out.nfe)
    _, t_bare = _timed(jax.jit(functools.partial(bare, trivial), static_argnums=1), x, nfe)
    _, t_mlp = _timed(jax.jit(functools.partial(bare, mlp), static_argnums=1), x, nfe)
    per_nfe, mlp_call = (t_sampler - t_bare) / nfe, t_mlp / nfe
    rows.append(f'| {name} | {nfe} | {t_sampler:.3f} | {t_bare:.3f} | {1e3 * per_nfe:.2f} | '
                f'{1e3 * mlp_call:.2f} | {100 * per_nfe / mlp_call:.1f} % |')
    print(rows[-1], flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true', help='NFE 10 and 50 only, fewer samples')
  parser.add_argument('--nfe', type=int, nargs='+', default=None, help='model-evaluation budgets to tabulate')
  parser.add_argument('--samples', type=int, default=None, help='samples per run')
  parser.add_argument('--overhead-batch', type=int, default=256, help='batch of the overhead table')
  parser.add_argument('--out', default=None, help='also write the markdown tables to this file')
  parser.add_argument('--few-step', action='store_true', help='only the 5-20 NFE solver x grid x final-step table')
  parser.add_argument('--search-iterations', type=int, default=100, help='Adam steps of each optimised grid')
  parser.add_argument('--mixtures', nargs='+', default=['ring', 'aniso'], choices=['ring', 'aniso'],
                      help='mixtures of the few-step table')
  args = parser.parse_args()
  if args.few_step:
    nfes, n = args.nfe or [5, 6, 8, 10, 15, 20], args.samples or 2048
    header = (f"# Few-step sampler accuracy\n\n`python experiments/sampler_accuracy.py {' '.join(sys.argv[1:])}` on "
              f'{jax.devices()[0].platform.upper()}, jax {jax.__version__}, {time.strftime("%Y-%m-%d")}.\n')
    print(header)
    rows = []
    if 'ring' in args.mixtures:
      rows += few_step_table(mixtures.ring_mixture(), '2-D ring mixture', nfes, n, args.search_iterations)
    if 'aniso' in args.mixtures:
      rows += few_step_table(mixtures.anisotropic_mixture(), '64-D anisotropic mixture', nfes, n,
                             args.search_iterations)
    text = header + '\n'.join(rows)
    print(text)
    if args.out:
      with open(args.out, 'w') as f:
        f.write(text + '\n')
    return
  nfes = args.nfe or ([10, 50] if args.quick else [5, 10, 20, 50, 100, 1000])
  n = args.samples or (2048 if args.quick else 4096)
  header = (f"# Sampler accuracy\n\n`python experiments/sampler_accuracy.py {' '.join(sys.argv[1:])}` on "
            f'{jax.devices()[0].platform.upper()} ({jax.device_count()} device(s), {os.cpu_count()} cores), '
            f'jax {jax.__version__}, {time.strftime("%Y-%m-%d")}.\n')
  print(header)
  rows = accuracy_table(mixtures.ring_mixture(), '2-D ring mixture, 8 modes, weights 1:2:...:8', nfes, n)
  rows += accuracy_table(mixtures.anisotropic_mixture(), '64-D anisotropic mixture, 4 modes', nfes, n)
  rows += overhead_table(batch=args.overhead_batch)
  text = header + '\n'.join(rows)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
