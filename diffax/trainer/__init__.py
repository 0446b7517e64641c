"""The trainer behind ``python -m diffax.main``: configs in, checkpoints, metrics and samples out.

Only this package reads ``ml_collections`` ConfigDicts, writes Orbax checkpoints and CLU metrics; the library
(:mod:`diffax.diffusion`, :mod:`diffax.models`) never imports it.
"""
