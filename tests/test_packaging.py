"""Tests that pyproject.toml builds a wheel of dtq_jax and nothing else.

The wheel is built offline from a copy of the repository with the installed
setuptools (``--no-build-isolation``; tensorflow-cpu depends on setuptools,
and on wheel through astunparse, so requirements.txt brings both). Its base
dependencies are a light install (the quantizer, layers, models and loading
an export; no TensorFlow), the training stack is the ``train`` extra.
"""

import ast
import email.parser
import importlib.metadata
import json
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

from packaging.requirements import Requirement
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# What a checkout holds besides the package: copied so the wheel can be shown
# to leave it out.
_COPIED = ('pyproject.toml', 'README.md', 'main.py', 'dtq_jax', 'tests',
           'configs', 'benchmarks', 'examples')


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


def _name(name):
  """A distribution's normalized name (PEP 503)."""
  return re.sub(r'[-_.]+', '-', name).lower()


@pytest.fixture(name='metadata', scope='module')
def metadata_fixture(tmp_path_factory):
  """``(wheel path, its file names, its METADATA)``, built once."""
  wheel = _build_wheel(tmp_path_factory.mktemp('packaging'))
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    metadata_file = next(n for n in names if n.endswith('.dist-info/METADATA'))
    metadata = email.parser.Parser().parsestr(z.read(metadata_file).decode())
  return wheel, names, metadata


def _dependencies(metadata):
  """``{None: base, extra: ...}``, each ``{name: Requirement}``."""
  groups = {None: {}}
  extras = metadata.get_all('Provides-Extra') or []
  for line in metadata.get_all('Requires-Dist'):
    req = Requirement(line)
    if req.marker is None:
      groups[None][_name(req.name)] = req
      continue
    (extra,) = [e for e in extras if req.marker.evaluate({'extra': e})]
    groups.setdefault(extra, {})[_name(req.name)] = req
  return groups


def _requirements_txt(name='requirements.txt'):
  """``{name: specifier}`` of requirements.txt (or another such file)."""
  reqs = {}
  for line in (ROOT / name).read_text().splitlines():
    line = line.split('#', 1)[0].strip()
    if line:
      req = Requirement(line)
      reqs[_name(req.name)] = str(req.specifier)
  return reqs


def test_wheel_holds_the_package_and_matches_requirements(metadata):
  wheel, names, metadata = metadata
  assert wheel.name.startswith('dtq_jax-0.1.0-')

  # Every module of the package, subpackages included, and nothing else.
  expected = {p.relative_to(ROOT).as_posix()
              for p in (ROOT / 'dtq_jax').rglob('*.py')
              if '__pycache__' not in p.parts}
  assert 'dtq_jax/models/resnet.py' in expected
  packaged = {n for n in names if '.dist-info/' not in n}
  assert packaged == expected

  assert metadata['Name'] == 'dtq-jax'
  assert metadata['Requires-Python'] == '>=3.11'
  groups = _dependencies(metadata)
  # The base and the extras keep requirements.txt's ranges; it installs
  # them all (the `make` path), but torch (requirements-torch.txt). 'all'
  # names the other extras only.
  declared = {}
  for extra, reqs in groups.items():
    for name, req in reqs.items():
      if name != 'dtq-jax':
        assert name not in declared, f'{name} is in two groups'
        declared[name] = str(req.specifier)
  assert declared == {**_requirements_txt(),
                      **_requirements_txt('requirements-torch.txt')}
  assert {'pytest', 'pytest-xdist', 'chex'} == set(groups['test'])


def test_base_install_is_light_and_train_has_tensorflow(metadata):
  groups = _dependencies(metadata[2])
  base = set(groups[None])
  assert {'jax', 'flax', 'safetensors'} <= base
  # Issue #29: TensorFlow (a 2.4 GB environment) only with the training
  # stack; the other large libraries only with their extras.
  heavy = {n for n in base if n.startswith(('tensorflow', 'tfds', 'onnx',
                                            'matplotlib', 'torch', 'keras'))}
  assert not heavy, heavy
  assert {'tensorflow-cpu', 'tensorflow-datasets', 'optax'} <= set(
      groups['train'])
  assert set(groups['onnx']) == {'onnx', 'onnxruntime'}
  assert set(groups['plot']) == {'matplotlib'}
  (everything,) = groups['all'].values()
  assert _name(everything.name) == 'dtq-jax'
  assert {'train', 'onnx', 'plot'} <= everything.extras


def _closure(names):
  """The installed distributions ``names`` need, themselves included."""
  seen, todo = set(), [_name(n) for n in names]
  while todo:
    name = todo.pop()
    if name in seen:
      continue
    seen.add(name)
    for line in importlib.metadata.requires(name) or []:
      req = Requirement(line)
      # Extras' requirements carry an 'extra' marker: false for ''.
      if req.marker is None or req.marker.evaluate({'extra': ''}):
        todo.append(_name(req.name))
  return seen


# The library a user of the base install imports.
_LIBRARY = ('dtq_jax.quant', 'dtq_jax.layers', 'dtq_jax.models',
            'dtq_jax.export', 'dtq_jax.pretrained')


def test_the_library_imports_only_the_base_dependencies(metadata):
  code = textwrap.dedent(f"""
      import importlib, json, sys
      for name in {_LIBRARY!r}:
        importlib.import_module(name)
      print(json.dumps({{n: getattr(m, '__file__', None)
                        for n, m in sys.modules.items()}}))
      """)
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  modules = json.loads(proc.stdout.splitlines()[-1])
  imported = {n.split('.')[0] for n in modules}
  assert not imported & {'tensorflow', 'tensorflow_datasets', 'onnx',
                         'onnxruntime', 'matplotlib', 'optax', 'torch'}
  # What the package's loaded modules import at their top comes with the
  # base dependencies (their own dependencies included).
  base = _closure(_dependencies(metadata[2])[None])
  providers = importlib.metadata.packages_distributions()
  missing = {}
  for name, path in modules.items():
    if name.split('.')[0] != 'dtq_jax' or not path:
      continue
    for node in ast.parse(pathlib.Path(path).read_text()).body:
      if isinstance(node, ast.Import):
        tops = [a.name.split('.')[0] for a in node.names]
      elif isinstance(node, ast.ImportFrom) and not node.level:
        tops = [node.module.split('.')[0]]
      else:
        continue
      for top in tops:
        if top in sys.stdlib_module_names or top == 'dtq_jax':
          continue
        dists = {_name(d) for d in providers.get(top, [top])}
        if not dists & base:
          missing.setdefault(top, []).append(name)
  assert not missing, missing
