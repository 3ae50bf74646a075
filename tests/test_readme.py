"""Tests of the README: its quantizer example runs, its layout is complete.

The fenced python block under "## Use the quantizer in your own code" is
extracted and run in a fresh interpreter outside the repository, so it checks
its own asserts with nothing but the package on the path. The checks that
apply to the README and the guides alike (links, commands) are in
tests/test_docs.py.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

from configs import fmnist

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / 'README.md'
HEADING = '## Use the quantizer in your own code'
MAX_LINES = 250


def _section(heading):
  """The README's lines under ``heading``, up to the next level-1/2 heading."""
  lines = README.read_text().splitlines()
  assert lines.count(heading) == 1, f'README has no single {heading!r}'
  section, in_fence = [], False
  for line in lines[lines.index(heading) + 1:]:
    if line.startswith('```'):
      in_fence = not in_fence
    # The next heading of level 1 or 2 ends the section; '#' lines inside
    # fenced blocks are comments.
    elif not in_fence and re.match(r'#{1,2} ', line):
      break
    section.append(line)
  return '\n'.join(section) + '\n'


def _section_code(heading, language='python'):
  """The ```language blocks of the README section under ``heading``."""
  blocks = re.findall(rf'^```{language}\n(.*?)^```$', _section(heading),
                      re.S | re.M)
  assert blocks, f'no ```{language} block under {heading!r}'
  return blocks


def test_quantizer_example_runs(tmp_path):
  code = _section_code(HEADING)[0]
  # The example must check the gradients it shows, or passing means nothing.
  assert 'jax.grad' in code and 'assert' in code
  script = tmp_path / 'example.py'
  script.write_text(code)
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path,
                          env=env, capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]


def test_readme_is_a_short_guide():
  lines = README.read_text().splitlines()
  assert len(lines) <= MAX_LINES, (
      f'README.md has {len(lines)} lines; move detail into a guide under '
      f'docs/ (at most {MAX_LINES}).')


def test_code_layout_names_every_subpackage_and_module():
  table = '\n'.join(line for line in _section('## Code layout').splitlines()
                    if line.startswith('|'))
  named = set(re.findall(r'`([\w/]+(?:\.py|/))`', table))
  package = ROOT / 'dtq_jax'
  modules = {p.name for p in package.glob('*.py') if p.name != '__init__.py'}
  subpackages = {p.name + '/' for p in package.iterdir()
                 if (p / '__init__.py').is_file()}
  assert {'infra/', 'run/', 'deploy/'} <= subpackages  # The scan works.
  missing = (modules | subpackages) - named
  assert not missing, f'README "Code layout" does not name {sorted(missing)}'
  # And names nothing that is gone.
  stale = {n for n in named if n.rstrip('/').replace('.py', '') not in
           {m.replace('.py', '') for m in modules} | {s.rstrip('/')
                                                       for s in subpackages}}
  assert not stale, f'README "Code layout" names {sorted(stale)}, not in dtq_jax'


def test_export_commands_find_the_demo_run():
  # The README's export commands must work after its demo command as
  # written: the demo is a comparison, which writes <workdir>/<method>/
  # (run/experiment.py), so --workdir of the export names one method's
  # folder below the demo's --workdir.
  code = _section_code('## Export a trained student', 'sh')[0]
  commands = [shlex.split(line) for line in code.splitlines()
              if line.strip() and not line.startswith('#')]
  demo = [c for c in commands if c[:2] == ['make', 'demo']]
  exports = [c for c in commands if 'dtq_jax.export' in c]
  assert len(demo) == 1 and exports
  demo_workdir = [a for a in demo[0] if a.startswith('ARGS=--workdir=')]
  assert demo_workdir, 'the demo command must fix its --workdir'
  demo_workdir = demo_workdir[0].split('=', 2)[2].rstrip('/')
  methods = tuple(fmnist.get_config().compare_methods)
  for command in exports:
    workdir = command[command.index('--workdir') + 1].rstrip('/')
    parent, method = os.path.split(workdir)
    assert parent == demo_workdir and method in methods, (
        f'{workdir} is not one method folder of the demo run {demo_workdir} '
        f'(methods {methods})')
