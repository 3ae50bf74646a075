"""The package's layout: layers imported downwards only, the public names.

dtq_jax/__init__.py describes the cut: infra < quant, layers < models < data
< method < weights < run < deploy < the commands (export, plot, pretrained).
These tests read every module's imports (those inside functions too) with
``ast``, so a change that breaks the layering fails here, not in a review.
"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'dtq_jax'

# Top-level name (subpackage or module) -> its layer, bottom first.
LAYER = {
    'infra': 0,
    'quant': 1, 'learned_quant': 1, 'convolution': 1, 'layers': 1,
    'models': 2,
    'data': 3,
    'method': 4,
    'weights': 5,
    'run': 6,
    'deploy': 7,
    'export': 8, 'plot': 8, 'pretrained': 8,
}
MAX_MODULES_PER_FOLDER = 12


def _module_name(path):
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules():
  return {_module_name(p): p for p in PACKAGE.rglob('*.py')}


def _imports(path, modules):
  """The dtq_jax modules that ``path`` imports, anywhere in the file."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      # ``from dtq_jax.run import train`` imports dtq_jax.run.train.
      names = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in
               modules else node.module for a in node.names]
    else:
      continue
    found.update(n for n in names if n.startswith('dtq_jax.'))
  return found


def _top(name):
  """'dtq_jax.run.train' -> 'run'."""
  return name.split('.')[1]


def test_every_top_level_name_has_a_layer():
  tops = {_top(m) for m in _modules() if m != 'dtq_jax'}
  assert tops == set(LAYER), 'dtq_jax/__init__.py and LAYER must agree'


def test_imports_point_down_the_layers():
  modules = _modules()
  upward = []
  for name, path in modules.items():
    if name == 'dtq_jax':
      continue
    for target in _imports(path, modules):
      if LAYER[_top(target)] > LAYER[_top(name)]:
        upward.append(f'{name} imports {target}')
  assert not upward


def test_no_import_cycle():
  modules = _modules()
  graph = {name: {t for t in _imports(path, modules) if t in modules}
           for name, path in modules.items()}
  state = {}

  def visit(node, stack):
    state[node] = 'open'
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        pytest.fail('import cycle: ' + ' -> '.join(
            stack[stack.index(nxt):] + [nxt]))
      if nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = 'done'

  for name in sorted(graph):
    if name not in state:
      visit(name, [name])


def test_the_layer_check_sees_an_upward_import(tmp_path):
  # The checks above must be able to fail: a data module importing the
  # train loop is an upward import.
  fake = tmp_path / 'bad.py'
  fake.write_text('def f():\n  from dtq_jax.run import train\n')
  targets = _imports(fake, _modules())
  assert targets == {'dtq_jax.run.train'}
  assert LAYER[_top('dtq_jax.run.train')] > LAYER['data']


def test_folders_stay_small_and_say_what_they_hold():
  for folder in [PACKAGE] + [p for p in PACKAGE.iterdir() if p.is_dir() and
                             (p / '__init__.py').exists()]:
    modules = [p for p in folder.glob('*.py') if p.name != '__init__.py']
    assert len(modules) <= MAX_MODULES_PER_FOLDER, folder
    doc = ast.get_docstring(ast.parse((folder / '__init__.py').read_text()))
    assert doc and len(doc.splitlines()) >= 3, (
        f'{folder}/__init__.py must say what lives there')


def test_documented_python_names_import():
  # The names README.md documents for use from Python.
  from dtq_jax import export  # pylint: disable=g-import-not-at-top
  from dtq_jax import layers  # pylint: disable=g-import-not-at-top
  from dtq_jax import quant  # pylint: disable=g-import-not-at-top
  from dtq_jax.quant import fake_quant  # pylint: disable=g-import-not-at-top
  assert fake_quant is quant.fake_quant
  assert callable(layers.QuantConv)
  assert callable(export.load_integer_model)
  assert callable(export.integer_predictor)


@pytest.mark.parametrize('command', ['export', 'plot', 'pretrained'])
def test_documented_commands_start(command):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', f'dtq_jax.{command}', '--help'],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f'python -m dtq_jax.{command}' in proc.stdout
