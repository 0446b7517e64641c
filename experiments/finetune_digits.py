"""Fine-tuning the digits model: what full vs LoRA fine-tuning costs, how far LoRA moves the style, how well a
ControlNet's samples follow their control, and what DreamBooth's new label draws.

Usage (the base first; ``make run`` trains exactly it):
  python -m diffax.main --config configs/digits.py --workdir workdirs/digits
  python experiments/finetune_digits.py --base workdirs/digits --root /tmp/finetune_digits \\
      --out experiments/results/finetune_digits.md

Trains configs/digits_lora.py, digits_controlnet.py and digits_dreambooth.py as shipped on that base (only
read; runs already finished under ``--root`` are reused), then measures, with the runs' sampler (DPM-Solver++(2M),
25 steps, guidance 1.5) and ``--num-samples`` samples per model:

* cost: parameters that train, optimiser state (Adam's moments: bytes of ``opt_state``) and the median train
  step time (batch 64, after compilation) of full and LoRA fine-tuning;
* style: the digits classifier's accuracy on the class each sample was drawn for, the Fréchet distance of its
  features to the scanned test digits, and the mean ink ``mean((x + 1) / 2)`` of the samples, next to the
  scanned and the bold real test digits; the base with the adapter merged at weight 0.5 shows the weights work;
* control: the mean absolute error between the Sobel edge map of each sample and the edge map it was asked to
  follow (the edges of test digits, sample ``i`` of class ``i mod 10``), for the ControlNet at scales 1 and 0,
  the uncontrolled base, and another real test digit of the same class (what following the class alone gives);
* DreamBooth: for the instance label [V] and its class 7, the share of samples the classifier reads as 7 and
  their mean ink, next to the base's sevens and the five bold instance images.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffax.data import control as control_data
from diffax.data import load_digits
from diffax.evaluation import evaluators
from diffax.models import lora
from diffax.trainer import config as config_lib, finetune, restore, sharding, train
from diffax.trainer.experiment import Experiment

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, **overrides):
  """``configs/<name>.py`` as shipped, without its end-of-run evaluation (the samples are judged here)."""
  config = config_lib.load_file(REPO / 'configs' / f'{name}.py')
  config.train.eval_every = 0
  config.update_from_flattened_dict(overrides)
  return config


def restored(config, workdir) -> tuple[Experiment, object]:
  exp = Experiment(config, workdir)
  return exp, exp.restore_or_init()


def base_model(base: str, workdir: pathlib.Path, **overrides) -> tuple[Experiment, object]:
  """An experiment of configs/digits.py in an empty ``workdir`` and the base run's EMA weights read through
  :func:`restore.restore_ema_params` (the base workdir is only read)."""
  exp = Experiment(load_config('digits', **overrides), workdir)
  params = restore.restore_ema_params(base, exp.tuning.abstract_base)
  return exp, jax.device_put(params, exp.state_shardings.params)


def took(seconds: float) -> str:
  return f'{seconds:.0f} s to train' if np.isfinite(seconds) else 'trained by an earlier call'


def trained(config, workdir: pathlib.Path) -> float:
  """Trains ``config`` in ``workdir`` unless a finished run is there; returns the seconds it took."""
  if config.train.num_steps in restore.checkpoint_steps(str(workdir)):
    return float('nan')
  start = time.perf_counter()
  train.train_and_evaluate(config, str(workdir))
  return time.perf_counter() - start


def generate(exp: Experiment, params, labels: np.ndarray, *, seed: int) -> np.ndarray:
  """Samples [N, H, W, C] in [-1, 1] for ``labels`` [N], in batches of ``sample.num_samples``."""
  batch = exp.config.sample.num_samples
  fn = exp.generate_fn(batch)
  out = []
  for b in range(0, len(labels), batch):
    chunk = jax.device_put(jnp.asarray(labels[b:b + batch], jnp.int32), sharding.batch_sharding(exp.mesh))
    samples, _ = fn(params, jax.random.fold_in(jax.random.PRNGKey(seed), b), chunk)
    out.append(np.asarray(samples))
  return np.concatenate(out)


def judge(samples: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  evaluator = evaluators.DigitsEvaluator()
  evaluator.update(jnp.asarray(samples), jnp.asarray(labels))
  result = evaluator.result()
  return {'accuracy': result['digits_accuracy'], 'fd': result['digits_fd'],
          'ink': float(np.mean((samples + 1) / 2))}


def real(style: str) -> tuple[np.ndarray, np.ndarray]:
  images, labels = load_digits('test', style)
  return images.astype(np.float32) / 127.5 - 1.0, labels


def cost(base: str, root: pathlib.Path, *, steps: int) -> list[tuple]:
  rows = []
  for mode in ('full', 'lora'):
    exp, state = restored(load_config('digits_lora', **{'finetune.base_workdir': base, 'finetune.mode': mode}),
                          root / f'cost_{mode}')
    labels = finetune.trainable_labels(state.params, mode=mode)
    sizes = jax.tree.map(lambda p, l: p.size if l == 'trainable' else 0, state.params, labels)
    trainable, total = sum(jax.tree.leaves(sizes)), lora.num_params(state.params)
    moments = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    compiled = train.compile_train_step(exp)
    iterator = exp.data_iterator()
    times = []
    for i in range(steps + 3):
      batch = sharding.global_batch(exp.model_batch(next(iterator)), exp.mesh)
      t0 = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics['loss'])
      if i >= 3:
        times.append(time.perf_counter() - t0)
    rows.append((mode, trainable, total, moments, 1e3 * statistics.median(times)))
    exp.checkpointer.close()
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--base', default='workdirs/digits', help='workdir of the trained configs/digits.py run')
  parser.add_argument('--root', default='/tmp/finetune_digits', help='where the fine-tuning runs are written')
  parser.add_argument('--num-samples', type=int, default=500)
  parser.add_argument('--timing-steps', type=int, default=30)
  parser.add_argument('--out', default='', help='also write the tables to this markdown file')
  parser.add_argument('--skip-cost', action='store_true', help='leave out the full vs LoRA cost table')
  args = parser.parse_args()
  root = pathlib.Path(args.root).resolve()
  base = str(pathlib.Path(args.base).resolve())
  lines = [f'# Fine-tuning the digits model (base {args.base}, {args.num_samples} samples per model, '
           f'{jax.devices()[0].device_kind}, {jax.device_count()} device(s))', '']

  def emit(*text):
    for line in text:
      print(line, flush=True)
      lines.append(line)

  if not args.skip_cost:
    rows = cost(base, root, steps=args.timing_steps)
    emit('## Full vs LoRA fine-tuning (rank 4 on attention + ResBlock convs, batch 64)', '',
         '| mode | trainable params | of total | optimiser state | step time |', '|---|---|---|---|---|')
    for mode, trainable, total, moments, ms in rows:
      emit(f'| {mode} | {trainable:,} | {100 * trainable / total:.1f} % | {moments / 2**10:,.0f} KiB | {ms:.1f} ms |')

  n = args.num_samples
  labels = np.arange(n) % 10
  lora_dir = root / 'lora'
  lora_seconds = trained(load_config('digits_lora', **{'finetune.base_workdir': base}), lora_dir)
  exp_base, params_base = base_model(base, root / 'base_sampler')
  base_samples = generate(exp_base, params_base, labels, seed=1)
  exp_lora, state_lora = restored(load_config('digits_lora', **{'finetune.base_workdir': base}), lora_dir)
  lora_samples = generate(exp_lora, exp_lora.sample_params(state_lora), labels, seed=1)
  adapter = str(lora_dir / 'adapters' / 'lora.npz')
  exp_half, params_half = base_model(base, root / 'base_sampler_half', **{'finetune.adapters': (f'{adapter}:0.5',)})
  half_samples = generate(exp_half, params_half, labels, seed=1)
  (scanned, scanned_labels), (bold, bold_labels) = real(''), real('bold')
  emit('', f'## LoRA style shift to bold digits (configs/digits_lora.py, {took(lora_seconds)})', '',
       '| images | classifier accuracy | digits FD | mean ink |', '|---|---|---|---|')
  for name, x, y in (('real test digits, scanned', scanned, scanned_labels),
                     ('real test digits, bold', bold, bold_labels), ('base samples', base_samples, labels),
                     ('base + LoRA at weight 0.5', half_samples, labels),
                     ('base + LoRA (weight 1)', lora_samples, labels)):
    m = judge(x, y)
    emit(f'| {name} | {m["accuracy"]:.3f} | {m["fd"]:.1f} | {m["ink"]:.3f} |')

  control_dir = root / 'controlnet'
  control_config = load_config('digits_controlnet', **{'finetune.base_workdir': base})
  control_seconds = trained(control_config, control_dir)
  exp_c, state_c = restored(control_config, control_dir)
  requested = np.asarray(exp_c.tuning.controls)[np.arange(n) % len(exp_c.tuning.controls)]
  edges = lambda x: control_data.sobel_edges(np.asarray(x, np.float32))
  error = lambda x: float(np.mean(np.abs(edges(x) - requested)))
  controlled = generate(exp_c, exp_c.sample_params(state_c), labels, seed=1)
  exp_0, state_0 = restored(load_config('digits_controlnet', **{'finetune.base_workdir': base,
                                                                 'sample.control_scale': 0.0}), control_dir)
  scale0 = generate(exp_0, exp_0.sample_params(state_0), labels, seed=1)
  by_class = {c: np.flatnonzero(scanned_labels == c) for c in range(10)}
  k = len(exp_c.tuning.controls)  # sample i follows test digit (i mod k) // 10 of class i mod 10; take the next one
  other = np.stack([scanned[by_class[i % 10][((i % k) // 10 + 1) % len(by_class[i % 10])]] for i in range(n)])
  emit('', f'## ControlNet on Sobel edges (configs/digits_controlnet.py, {took(control_seconds)})', '',
       '| samples | edge-map error (mean abs) | classifier accuracy |', '|---|---|---|')
  for name, x in (('ControlNet, scale 1', controlled), ('ControlNet, scale 0 (= base)', scale0),
                  ('base (uncontrolled)', base_samples), ('another real digit of the class', other)):
    emit(f'| {name} | {error(x):.4f} | {judge(x, labels)["accuracy"]:.3f} |')

  db_dir = root / 'dreambooth'
  db_config = load_config('digits_dreambooth', **{'finetune.base_workdir': base})
  db_seconds = trained(db_config, db_dir)
  exp_d, state_d = restored(db_config, db_dir)
  m = db_config.sample.num_samples * max(n // db_config.sample.num_samples, 1)
  instance = generate(exp_d, exp_d.sample_params(state_d), np.full(m, 10), seed=1)
  sevens = generate(exp_d, exp_d.sample_params(state_d), np.full(m, 7), seed=1)
  base_sevens = base_samples[labels == 7]
  bold_train, train_labels = load_digits('train', 'bold')
  instances = bold_train[train_labels == 7][:5].astype(np.float32) / 127.5 - 1.0
  emit('', f'## DreamBooth: label 10 = five bold sevens (configs/digits_dreambooth.py, {took(db_seconds)})',
       '', '| images | read as 7 | mean ink |', '|---|---|---|')
  for name, x in (('the 5 instance images (bold sevens)', instances), ('base, label 7', base_sevens),
                  ('DreamBooth, label 7 (prior preserved)', sevens), ('DreamBooth, label 10 [V]', instance)):
    emit(f'| {name} | {judge(x, np.full(len(x), 7))["accuracy"]:.3f} | {float(np.mean((x + 1) / 2)):.3f} |')
  if args.out:
    pathlib.Path(args.out).write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
