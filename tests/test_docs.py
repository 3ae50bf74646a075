"""Static checks of README.md and the guides in docs/.

Cheap checks only (the commands' heavy runs are covered by the tests they
name): every guide is linked from the README and every relative link (and
anchor) resolves; every shell or Python block is either run by a named test
or marked with what it needs that the tests cannot have; every command names
a module, config, config field, make target or script that exists; every
repository path the README and the guides name exists. The Python block of
docs/export.md is run against a freshly exported demo student.
"""

import importlib
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / 'docs'
README = ROOT / 'README.md'
# docs/method.md is the method's specification (another owner); its links
# are checked, its paths and blocks are not this test's business.
SPEC = DOCS / 'method.md'
# One-off benchmark scripts removed from benchmarks/; no guide may tell a
# user to run them.
REMOVED_SCRIPTS = ('conv_profile.py', 'hlo_reductions.py', 'prototype_step.py',
                   'static_ranges.py')
FMNIST_FILES = '/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'


def _documents(include_spec=True):
  docs = sorted(DOCS.glob('*.md'))
  if not include_spec:
    docs = [d for d in docs if d != SPEC]
  return [README] + docs


def _ids(paths):
  return [str(p.relative_to(ROOT)) for p in paths]


def _fenced_blocks(text):
  """``(language, code, marker)`` of each fenced block.

  ``marker`` is the HTML comment on the line just above the fence
  (``<!-- needs: ... -->`` or ``<!-- tested: ... -->``), or None.
  """
  blocks = []
  for m in re.finditer(r'^```(\w*)\n(.*?)^```$', text, re.S | re.M):
    before = text[:m.start()].rstrip('\n').rsplit('\n', 1)[-1]
    marker = re.fullmatch(r'<!-- (needs|tested): (.+) -->', before.strip())
    blocks.append((m.group(1), m.group(2), marker))
  return blocks


def _prose(text):
  """The text without its fenced blocks."""
  return re.sub(r'^```\w*\n.*?^```$', '', text, flags=re.S | re.M)


def _commands(text):
  """Every command line: shell blocks' lines (continuations joined) and
  inline code spans of prose (which may wrap over lines)."""
  commands = []
  for language, code, _ in _fenced_blocks(text):
    if language in ('sh', 'bash', 'shell'):
      for line in code.replace('\\\n', ' ').splitlines():
        line = line.split(' # ', 1)[0].strip()
        if line and not line.startswith('#'):
          commands.append(line)
  for span in re.findall(r'`([^`]+)`', _prose(text)):
    commands.append(' '.join(span.split()))
  return commands


def _slug(heading):
  """GitHub's anchor of a Markdown heading."""
  heading = re.sub(r'[`*_]|\[([^\]]*)\]\([^)]*\)', r'\1', heading.strip())
  return re.sub(r'[^\w\- ]', '', heading.lower()).replace(' ', '-')


def _anchors(path):
  text = _prose(path.read_text())
  return {_slug(h) for h in re.findall(r'^#{1,6} (.+)$', text, re.M)}


def _links(path):
  """Relative link targets of a Markdown file (images included)."""
  targets = re.findall(r'\]\(([^)\s]+)\)', _prose(path.read_text()))
  return [t for t in targets if not re.match(r'[a-z]+:', t)]


def test_every_guide_is_linked_from_the_readme():
  linked = {os.path.normpath(t.split('#')[0]) for t in _links(README)}
  guides = {str(p.relative_to(ROOT)) for p in DOCS.glob('*.md')}
  assert {'docs/method.md', 'docs/results.md'} <= guides
  assert guides - linked == set(), 'guides the README does not link'


@pytest.mark.parametrize('path', _documents(), ids=_ids(_documents()))
def test_relative_links_resolve(path):
  for target in _links(path):
    file, _, anchor = target.partition('#')
    resolved = (path.parent / file).resolve() if file else path
    assert resolved.exists(), f'{path.name}: link to missing {target}'
    if anchor and resolved.suffix == '.md':
      assert anchor in _anchors(resolved), (
          f'{path.name}: {target}: no heading with that anchor')


@pytest.mark.parametrize('path', _documents(include_spec=False),
                         ids=_ids(_documents(include_spec=False)))
def test_every_command_block_is_tested_or_says_what_it_needs(path):
  for language, code, marker in _fenced_blocks(path.read_text()):
    if language not in ('sh', 'bash', 'shell', 'python'):
      continue
    assert marker, (f'{path.name}: a ```{language} block without a '
                    f'"<!-- needs: ... -->" or "<!-- tested: ... -->" line '
                    f'above it:\n{code[:200]}')
    if marker.group(1) == 'tested':
      for ref in marker.group(2).split(', '):
        file, _, name = ref.partition('::')
        test_file = ROOT / file
        assert test_file.is_file(), f'{path.name}: no test file {file}'
        assert f'def {name}(' in test_file.read_text(), (
            f'{path.name}: no test {name} in {file}')


def _existing_module(name):
  parts = name.split('.')
  base = ROOT.joinpath(*parts)
  return (base.with_suffix('.py').is_file()
          or (base / '__main__.py').is_file())


def _config(spec):
  """The config a --config=FILE[:ARG] names, built by its get_config."""
  file, _, arg = spec.partition(':')
  assert (ROOT / file).is_file(), f'no config file {file}'
  module = importlib.import_module(file[:-len('.py')].replace('/', '.'))
  return module.get_config(arg or None)


def _has_field(config, dotted):
  node = config
  for part in dotted.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      return False
    node = node[part]
  return True


def _make_targets():
  text = (ROOT / 'Makefile').read_text()
  return set(re.findall(r'^([\w-]+):', text, re.M))


@pytest.mark.parametrize('path', _documents(), ids=_ids(_documents()))
def test_commands_name_what_exists(path):
  targets = _make_targets()
  for command in _commands(path.read_text()):
    for module in re.findall(r'python -m (dtq_jax(?:\.\w+)*)', command):
      assert _existing_module(module), f'{path.name}: no module {module}'
    for script in re.findall(r'\bbenchmarks/(\w+\.py)', command):
      if re.search(r'python\S* +benchmarks/', command):
        assert script not in REMOVED_SCRIPTS, (
            f'{path.name}: benchmarks/{script} is removed: {command}')
        assert (ROOT / 'benchmarks' / script).is_file(), command
    for target in re.findall(r'^make ([\w-]+)', command):
      assert target in targets, f'{path.name}: no make target {target}'
    if (not re.search(r'\bmain\.py\b|benchmarks/compare\.py', command)
        or '--config' not in command):
      continue
    try:
      tokens = shlex.split(command)
    except ValueError:  # An inline span cut mid-quote: split it roughly.
      tokens = command.split()
    specs = [t.split('=', 1)[1] for t in tokens if t.startswith('--config=')]
    if specs and not re.fullmatch(r'configs/\w+\.py(:[\w,.-]+)?', specs[0]):
      continue  # a placeholder such as --config=...
    config = _config(specs[0] if specs else 'configs/fmnist.py')
    for token in tokens:
      field = re.match(r'--config\.([\w.]+)=', token)
      if field:
        assert _has_field(config, field.group(1)), (
            f'{path.name}: no field {field.group(1)} in the config of: '
            f'{command}')


_PATH = re.compile(r'(?<![\w/.])((?:dtq_jax|tests|configs|benchmarks|results)'
                   r'/[\w/.*{}<>-]*[\w*}>/])')


@pytest.mark.parametrize('path', _documents(include_spec=False),
                         ids=_ids(_documents(include_spec=False)))
def test_named_repository_paths_exist(path):
  text = path.read_text()
  for span in re.findall(r'`([^`]+)`', text) + [
      code for _, code, _ in _fenced_blocks(text)]:
    for name in _PATH.findall(span):
      if re.search(r'[<>{}*]', name) or name.startswith('results/accel'):
        continue  # a pattern, or a file a command writes.
      assert (ROOT / name).exists(), f'{path.name}: no {name} in the repository'


def _export_block():
  text = (DOCS / 'export.md').read_text()
  blocks = [c for lang, c, _ in _fenced_blocks(text) if lang == 'python']
  assert len(blocks) == 1
  return blocks[0]


@pytest.mark.skipif(not os.path.exists(FMNIST_FILES),
                    reason=f'{FMNIST_FILES} is absent')
def test_export_guide_python_block_runs(tmp_path):
  # A short FT-Q run of the demo's network, exported as the guide's commands
  # do (dtq.dtq, dtq.onnx, dtq.stablehlo), then the guide's Python block in
  # a fresh interpreter next to those files.
  from configs import fmnist  # pylint: disable=import-outside-toplevel
  from dtq_jax import export as export_cli  # pylint: disable=import-outside-toplevel
  from dtq_jax.run import config_validation  # pylint: disable=import-outside-toplevel
  from dtq_jax.run import experiment  # pylint: disable=import-outside-toplevel

  c = fmnist.get_config('quick')
  c.method = 'ft'
  c.compare_methods = ()
  c.pretrained = 'none'  # No teacher to train: the export is the subject.
  c.cache_dir = str(tmp_path / 'cache')
  c.model_kwargs.widths = (8, 16, 16, 16)
  c.total_steps = 4
  c.eval_every_epochs = 1000
  c.max_eval_batches = 1
  workdir = str(tmp_path / 'run')
  experiment.run(config_validation.validate(c), workdir)
  for out in ('dtq.dtq', 'dtq.onnx', 'dtq.stablehlo'):
    assert export_cli.main(['--workdir', workdir, '--out',
                            str(tmp_path / out), '--calibration_batches',
                            '1']) == 0
  script = tmp_path / 'example.py'
  script.write_text(_export_block() + '\nassert len(labels) == len('
                    'onnx_labels) == len(hlo_labels) == 8\n')
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path,
                          env=env, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
