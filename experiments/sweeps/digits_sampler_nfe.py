"""Sampler x number of steps for one trained checkpoint: the quality / model-evaluation trade-off.

  python -m diffax.main --config configs/digits.py --workdir workdirs/digits          # the source, if not yet trained
  python experiments/sweep.py experiments/sweeps/digits_sampler_nfe.py --root workdirs/digits_sampler_nfe
  python experiments/collect.py workdirs/digits_sampler_nfe --plot workdirs/digits_sampler_nfe.png

An eval-only sweep: every run evaluates the newest checkpoint of ``workdirs/digits`` (its ``checkpoints`` is a
symlink there, see ``sweeps_lib.spec.Sweep.source``) on 500 samples with one sampler (DDPM ancestral, DDIM, Heun
on the probability-flow ODE, DPM-Solver++(2M)) at 5, 10, 20 or 50 steps, and writes its metrics to its own
workdir.
The collector's table has the true number of model evaluations (``nfe``; Heun makes two per step but one on the
last) and its plot draws each metric against ``sample.num_steps``, one line per sampler.

Measured on this shared 2-core CPU: 20-62 s per run, 8 minutes for the 16. Source: the cosine / v run of
``digits_schedule_prediction.py`` (1,000 steps; the model and loss of ``configs/digits.py``), guidance 1.5, no x0
clipping, 500 samples. digits_fd (digits_accuracy is 0.98-1.0 everywhere but for Heun: 0.02, 0.26, 0.97, 0.99):

  sampler      5 steps  10 steps  20 steps  50 steps
  ddpm         16.5     12.1      10.4      8.9
  ddim         12.2     10.2       9.4      8.8
  edm_heun     31741    256       11.2       9.2     (NFE 9, 19, 39, 99)
  dpm_solver   19.2     10.3       9.5      8.8

The deterministic first-order DDIM is the best at 5 steps; DPM-Solver++(2M) catches up by 10; second-order Heun
overshoots without clipping until ~20 steps (as in ``experiments/results/sampler_accuracy.md``).
"""

from sweeps_lib import spec

SWEEP = spec.Sweep(
    config='configs/digits.py',
    source='workdirs/digits',
    overrides=spec.product(spec.grid('sample.sampler', ['ddpm', 'ddim', 'edm_heun', 'dpm_solver']),
                           spec.grid('sample.num_steps', [5, 10, 20, 50])),
    fixed={'eval.num_samples': 500},
)
