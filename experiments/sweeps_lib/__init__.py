"""The sweep runner behind ``experiments/sweep.py``, one idea per module.

``spec``: the data a sweep file writes (``Sweep``, ``grid``, ``product``) and its runs (``expand``, ``run_name``,
``select``); ``validation``: every run's config parsed and checked as ``python -m diffax.main`` would; ``jobs``:
runs placed under a root (workdir, commands, ``DONE`` marker, state); ``executor``: the runs executed here as
subprocesses. A sweep file imports ``from sweeps_lib import spec``; ``experiments/`` is on ``sys.path`` when
``python experiments/sweep.py`` runs (the script's directory), and tests and notebooks add it.
"""
