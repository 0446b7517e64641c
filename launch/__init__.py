"""Launchers for ``python -m diffax.main``: local processes, SLURM jobs, Cloud TPU VM pod slices.

Standard library only. Each module is a script (``python launch/<name>.py --help``) and a small API that
``experiments/sweep.py`` reuses.
"""
