"""Tests that pyproject.toml builds a wheel of dtq_jax and nothing else.

The wheel is built offline from a copy of the repository with the installed
setuptools (``--no-build-isolation``; tensorflow-cpu depends on setuptools,
and on wheel through astunparse, so requirements.txt brings both).
"""

import email.parser
import pathlib
import shutil
import subprocess
import sys
import zipfile

from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What a checkout holds besides the package: copied so the wheel can be shown
# to leave it out.
_COPIED = ('pyproject.toml', 'README.md', 'main.py', 'dtq_jax', 'tests',
           'configs', 'benchmarks')


def _build_wheel(tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  for name in _COPIED:
    path = ROOT / name
    if path.is_dir():
      shutil.copytree(path, src / name,
                      ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    else:
      shutil.copy2(path, src / name)
  out = tmp_path / 'wheel'
  result = subprocess.run(
      [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-index',
       '--no-build-isolation', '--quiet', '--wheel-dir', str(out), str(src)],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stdout + result.stderr
  wheels = list(out.glob('*.whl'))
  assert len(wheels) == 1, wheels
  return wheels[0]


def _requirements_txt():
  """``{name: specifier}`` of requirements.txt."""
  reqs = {}
  for line in (ROOT / 'requirements.txt').read_text().splitlines():
    line = line.split('#', 1)[0].strip()
    if line:
      req = Requirement(line)
      reqs[req.name.lower().replace('_', '-')] = str(req.specifier)
  return reqs


def test_wheel_holds_the_package_and_matches_requirements(tmp_path):
  wheel = _build_wheel(tmp_path)
  assert wheel.name.startswith('dtq_jax-0.1.0-')
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    metadata_file = next(n for n in names if n.endswith('.dist-info/METADATA'))
    metadata = email.parser.Parser().parsestr(z.read(metadata_file).decode())

  # Every module of the package, subpackages included, and nothing else.
  expected = {p.relative_to(ROOT).as_posix()
              for p in (ROOT / 'dtq_jax').rglob('*.py')
              if '__pycache__' not in p.parts}
  assert 'dtq_jax/models/resnet.py' in expected
  packaged = {n for n in names if '.dist-info/' not in n}
  assert packaged == expected

  assert metadata['Name'] == 'dtq-jax'
  assert metadata['Requires-Python'] == '>=3.11'
  runtime, extras = {}, {}
  for line in metadata.get_all('Requires-Dist'):
    req = Requirement(line)
    name = req.name.lower().replace('_', '-')
    if req.marker is None:
      runtime[name] = str(req.specifier)
    else:
      extras[name] = str(req.specifier)
  assert {'jax', 'flax', 'tensorflow-cpu'} <= set(runtime)
  assert 'pytest' not in runtime and 'pytest' in extras
  # Runtime and extras keep requirements.txt's ranges (pytest, chex: test).
  pinned = _requirements_txt()
  for name, spec in runtime.items():
    assert pinned.get(name) == spec, (name, spec, pinned.get(name))
  for name, spec in pinned.items():
    assert {**runtime, **extras}.get(name) == spec, (name, spec)
