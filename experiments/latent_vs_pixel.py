"""Training and sampling cost per image on this machine: the pixel digits default vs the latent demo.

  python experiments/latent_vs_pixel.py [--steps 30] [--autoencoder workdirs/autoencoder_digits] [--out ...md]

Three runs of the same network and recipe (``configs/digits.py`` and ``configs/digits_latent.py``): pixels (8x8x1),
latents cached once at start (4x4x4), and latents encoded in every step from the frozen autoencoder. Printed per
run: the seconds to build the run (the cached one encodes the 1,438 training digits then), the train step's
milliseconds and images per second at batch 64 (mean over ``--steps`` steps after 3 warm-up steps, compiled as the
trainer compiles it), and the sampler's milliseconds per image at 100 samples (DPM-Solver++(2M) 25 steps with
guidance; the latent runs include decoding).
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import jax

from diffax.trainer import config as config_lib, sharding, train
from diffax.trainer.experiment import Experiment

REPO = pathlib.Path(__file__).resolve().parents[1]


def measure(config, steps: int) -> dict[str, float]:
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    exp = Experiment(config, workdir)
    build = time.perf_counter() - start
    iterator = exp.data_iterator()
    state = exp.restore_or_init(iterator)
    compiled = train.compile_train_step(exp)
    for i in range(steps + 3):
      if i == 3:
        jax.block_until_ready(state)
        start = time.perf_counter()
      state, _ = compiled(state, sharding.global_batch(exp.model_batch(next(iterator)), exp.mesh))
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - start) / steps
    generate = exp.generate_fn(config.sample.num_samples)
    labels = exp.grid_labels(config.sample.num_samples)
    jax.block_until_ready(generate(exp.sample_params(state), jax.random.PRNGKey(0), labels))
    start = time.perf_counter()
    jax.block_until_ready(generate(exp.sample_params(state), jax.random.PRNGKey(1), labels))
    sample_s = time.perf_counter() - start
    exp.checkpointer.close()
  return {'build': build, 'step_ms': 1e3 * step_s, 'images_s': config.train.batch_size / step_s,
          'sample_ms': 1e3 * sample_s / config.sample.num_samples}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--autoencoder', default=str(REPO / 'workdirs' / 'autoencoder_digits'))
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  runs = {'pixels 8x8x1': config_lib.load_file(REPO / 'configs' / 'digits.py')}
  for mode in ('cached', 'on_the_fly'):
    c = config_lib.load_file(REPO / 'configs' / 'digits_latent.py')
    c.data.latents.autoencoder = args.autoencoder
    c.data.latents.mode = mode
    runs[f'latents 4x4x4, {mode}'] = c
  lines = ['| run | build s | train step ms (batch 64) | train images / s | sampling ms / image |',
           '|---|---:|---:|---:|---:|']
  for name, config in runs.items():
    r = measure(config, args.steps)
    lines.append(f'| {name} | {r["build"]:.1f} | {r["step_ms"]:.1f} | {r["images_s"]:.0f} | {r["sample_ms"]:.2f} |')
    print(lines[-1], flush=True)
  table = '\n'.join([f'unet_tiny, {jax.devices()[0].platform}, {args.steps} timed steps per run.', '', *lines])
  print(table)
  if args.out:
    pathlib.Path(args.out).write_text(f'`python experiments/latent_vs_pixel.py --steps {args.steps}`\n\n{table}\n')


if __name__ == '__main__':
  main()
