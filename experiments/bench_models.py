"""Backbone cost per preset: parameters, forward FLOPs, compile time and CPU train-step throughput.

  python experiments/bench_models.py                        # every preset; speed of the tiny ones (~4 min, 2 cores)
  python experiments/bench_models.py --presets dit:DiT-S/8,unet:ddpm_cifar10 --max-run-params 40e6 --batch 2

For every preset of both backbones (``diffax.models.PRESETS``) at its paper's input shape, it prints the parameter
count (``jax.eval_shape``, nothing allocated) and the forward FLOPs per example from XLA's cost analysis of the
lowered forward pass (batch 1, fp32; XLA counts a multiply-add as 2 FLOPs, so DiT's "Gflops" (Peebles & Xie 2023,
Table 4: multiply-adds) are half of this column). Presets up to ``--max-run-params`` parameters are also trained
for ``--steps`` steps at ``--batch`` on random data (MSE to a random target, optax.adamw, one jitted step with
parameters and optimiser state donated), in fp32 and bf16 compute: the table gives the compile time of that step
and images per second after one warm-up step. Larger presets (ADM-64, DiT-L/XL, ...) are marked "not run".
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from diffax import models

INPUT_SHAPES: dict[str, tuple[int, int, int]] = {
    'ddpm_cifar10': (32, 32, 3), 'ddpmpp_cifar10': (32, 32, 3), 'adm_imagenet64': (64, 64, 3),
    'unet_tiny': (8, 8, 1), 'unet_small': (8, 8, 1), 'dit_tiny': (16, 16, 1),
    **{name: (32, 32, 4) for name in models.DIT_PRESETS if name.startswith('DiT-')},  # 256x256 ImageNet latents
}
"""[H, W, C] each preset is built for (its paper's data; the digits' 8x8x1 for the small U-Nets)."""


def _inputs(model: nn.Module, shape: tuple[int, int, int], batch: int) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  key_x, key_t, key_y = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(key_x, (batch, *shape))
  t = jax.random.uniform(key_t, (batch,))
  num_classes = getattr(model, 'num_classes', None)
  cond = None if num_classes is None else jax.random.randint(key_y, (batch,), 0, num_classes + 1)
  return x, t, cond


def parameters_and_flops(model: nn.Module, shape: tuple[int, int, int]) -> tuple[int, float]:
  """Parameter count and forward FLOPs of one example, both without allocating or running anything."""
  x, t, cond = jax.eval_shape(lambda: _inputs(model, shape, 1))
  abstract = jax.eval_shape(lambda *a: nn.unbox(model.init(jax.random.PRNGKey(0), *a)), x, t, cond)
  count = sum(leaf.size for leaf in jax.tree.leaves(abstract))
  lowered = jax.jit(lambda v, x, t, cond: model.apply(v, x, t, cond)).lower(abstract, x, t, cond)
  return count, float(lowered.cost_analysis()['flops'])


def mse_train_step(model: nn.Module, tx: optax.GradientTransformation):
  """``(params, opt_state, rng, x, t, cond, target) -> (params, opt_state, loss)``: MSE of the model's output
  (dropout active) to ``target``, backward and one ``tx`` update; the step every speed benchmark times."""

  def train_step(params, opt_state, rng, x, t, cond, target):
    def loss_fn(p):
      out = model.apply({'params': p}, x, t, cond, train=True, rngs={'dropout': rng})
      return jnp.mean((out - target) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return train_step


def train_speed(model: nn.Module, shape: tuple[int, int, int], batch: int, steps: int) -> tuple[float, float]:
  """(compile seconds, images per second) of a jitted adamw train step on random data."""
  x, t, cond = _inputs(model, shape, batch)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), x, t, cond))['params'])()
  tx = optax.adamw(1e-4)
  opt_state = tx.init(params)
  train_step = mse_train_step(model, tx)
  target = jax.eval_shape(lambda p: model.apply({'params': p}, x, t, cond), params)
  target = jax.random.normal(jax.random.PRNGKey(1), target.shape)
  start = time.perf_counter()
  step = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt_state, jax.random.PRNGKey(2), x, t, cond,
                                                           target).compile()
  compile_s = time.perf_counter() - start
  params, opt_state, loss = step(params, opt_state, jax.random.PRNGKey(2), x, t, cond, target)  # warm-up
  jax.block_until_ready(loss)
  start = time.perf_counter()
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state, jax.random.PRNGKey(3 + i), x, t, cond, target)
  jax.block_until_ready(loss)
  return compile_s, batch * steps / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--presets', default='all',
                      help="comma-separated 'model:preset' (e.g. dit:DiT-S/8,unet:unet_tiny), or 'all'")
  parser.add_argument('--batch', type=int, default=4, help='train-step batch')
  parser.add_argument('--steps', type=int, default=3, help='timed train steps (after one warm-up step)')
  parser.add_argument('--max-run-params', type=float, default=1e6,
                      help='presets with more parameters get parameters and FLOPs only')
  parser.add_argument('--dtypes', default='float32,bfloat16', help='compute dtypes of the speed columns')
  parser.add_argument('--out', default=None, help='also write the markdown table to this file')
  args = parser.parse_args()

  if args.presets == 'all':
    selected = [(name, preset) for name in sorted(models.PRESETS) for preset in models.PRESETS[name]]
  else:
    selected = [tuple(item.split(':', 1)) for item in args.presets.split(',')]
  for item in selected:
    if len(item) != 2 or item[0] not in models.PRESETS or item[1] not in models.PRESETS[item[0]]:
      raise SystemExit(f"Unknown preset {':'.join(item)!r}; choose 'all' or among "
                       f"{[f'{n}:{p}' for n in sorted(models.PRESETS) for p in models.PRESETS[n]]}.")
    if item[1] not in INPUT_SHAPES:
      raise SystemExit(f'No input shape for preset {item[0]}:{item[1]}; add it to INPUT_SHAPES.')
  dtypes = args.dtypes.split(',')

  header = ['model', 'preset', 'input', 'params (M)', 'fwd GFLOPs / example']
  for dtype in dtypes:
    header += [f'compile {dtype} (s)', f'train img/s {dtype}']
  lines = [f'Train step: batch {args.batch}, {args.steps} timed steps, adamw, on {jax.devices()[0].device_kind} '
           f'({jax.device_count()} device).', '', '| ' + ' | '.join(header) + ' |',
           '|' + '---|' * 2 + '---|' + '---:|' * (len(header) - 3)]
  print('\n'.join(lines), flush=True)
  for name, preset in selected:
    shape = INPUT_SHAPES[preset]
    count, flops = parameters_and_flops(models.get_model(name, preset=preset), shape)
    row = [name, preset, 'x'.join(map(str, shape)), f'{count / 1e6:.2f}', f'{flops / 1e9:.3f}']
    for dtype in dtypes:
      if count > args.max_run_params:
        row += ['-', 'not run']
      else:
        compile_s, images_s = train_speed(models.get_model(name, preset=preset, dtype=dtype), shape, args.batch,
                                          args.steps)
        row += [f'{compile_s:.1f}', f'{images_s:.1f}']
    lines.append('| ' + ' | '.join(row) + ' |')
    print(lines[-1], flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      f.write('\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
