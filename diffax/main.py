"""``python -m diffax.main --config configs/digits.py --workdir DIR [--mode train|sample|eval]``.

Flags only: ``--config`` takes ``--config.section.key=value`` overrides (type-checked). With more than one
process (a launcher sets ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, or a Cloud
TPU / SLURM environment that JAX detects) the multi-process runtime is initialised first. The console shows
progress, warnings and a summary; INFO logs go to ``WORKDIR/diffax.log`` (:mod:`diffax.trainer.console`), and
compiled programs are cached on disk (``train.compilation_cache``, :mod:`diffax.trainer.compile_cache`).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', lock_config=False,
                                accept_new_attributes=True)  # default_config() locks all but the keyword sections
flags.DEFINE_string('workdir', None, 'Directory (local or gs://) for checkpoints, metrics and samples.')
flags.DEFINE_enum('mode', 'train', ['train', 'sample', 'eval', 'reference'], 'What to run.')
flags.mark_flags_as_required(['config', 'workdir'])


def _distributed_args() -> dict[str, object] | None:
  """``jax.distributed.initialize`` arguments, or None for a single process.

  A local or custom launcher sets ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``;
  on SLURM and Cloud TPU pods JAX detects everything itself (empty arguments).
  """
  env = os.environ
  if int(env.get('JAX_NUM_PROCESSES', '1')) > 1:
    return dict(coordinator_address=env['JAX_COORDINATOR_ADDRESS'], num_processes=int(env['JAX_NUM_PROCESSES']),
                process_id=int(env['JAX_PROCESS_ID']))
  if int(env.get('SLURM_NTASKS', '1')) > 1 or ',' in env.get('TPU_WORKER_HOSTNAMES', ''):
    if env.get('SLURM_NTASKS_PER_NODE') == '1' and env.get('CUDA_VISIBLE_DEVICES'):  # one process for all local GPUs
      return {'local_device_ids': list(range(len(env['CUDA_VISIBLE_DEVICES'].split(','))))}
    return {}
  return None


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top

  distributed = _distributed_args()
  if distributed is not None:
    jax.distributed.initialize(**distributed)
  from diffax.trainer import console  # pylint: disable=g-import-not-at-top

  console.setup_logging(FLAGS.workdir)
  from diffax.trainer import compile_cache, evaluate, train  # pylint: disable=g-import-not-at-top
  cache = compile_cache.enable(FLAGS.config.train.compilation_cache, FLAGS.workdir)
  # Every process prints this line, so a launcher's interleaved output shows that all of them came up.
  console.say(f'Process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} local / '
              f'{jax.device_count()} global devices; compilation cache {cache or "off"}.')
  run = {'train': train.train_and_evaluate, 'sample': train.sample, 'eval': evaluate.evaluate,
         'reference': evaluate.reference_stats}[FLAGS.mode]
  run(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
