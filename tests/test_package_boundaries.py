"""The library never reaches into the trainer: importing ``diffax``, ``diffax.diffusion`` and ``diffax.models``
loads no trainer module, no ml_collections, Orbax or CLU (checked in a fresh interpreter, where nothing else
has imported them)."""

import json
import subprocess
import sys

import pytest

FORBIDDEN = ('diffax.trainer', 'ml_collections', 'orbax', 'clu')
LIBRARY = ('diffax', 'diffax.diffusion', 'diffax.diffusion.samplers', 'diffax.diffusion.likelihood',
           'diffax.models', 'diffax.testing')


def _modules_after_import(module: str) -> list[str]:
  code = f'import json, sys, importlib; importlib.import_module({module!r}); print(json.dumps(sorted(sys.modules)))'
  out = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('module', LIBRARY)
def test_library_imports_no_trainer(module):
  loaded = _modules_after_import(module)
  assert module in loaded
  bad = [m for m in loaded if any(m == f or m.startswith(f + '.') for f in FORBIDDEN)]
  assert not bad, f'{module} pulls in {bad[:5]}'


def test_the_check_sees_trainer_imports():
  """The same check on the trainer finds what it forbids, so an empty list above means something."""
  loaded = _modules_after_import('diffax.trainer.train')
  assert {'diffax.trainer.config', 'ml_collections', 'clu'} <= set(loaded)
  assert any(m.startswith('orbax') for m in loaded)


def test_short_module_names_are_the_library_modules():
  import diffax  # pylint: disable=import-outside-toplevel
  import diffax.losses  # noqa: F401  (the import statement itself is under test)
  import diffax.samplers  # noqa: F401
  import diffax.schedules  # noqa: F401
  assert diffax.samplers is diffax.diffusion.samplers
  assert diffax.losses is diffax.diffusion.losses and diffax.schedules is diffax.diffusion.schedules
  from diffax.samplers import ddim_sample  # pylint: disable=import-outside-toplevel
  assert ddim_sample is diffax.diffusion.samplers.ddim.ddim_sample
