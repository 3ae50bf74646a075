"""Tests that the README's quantizer example runs as written.

The fenced python block under "## Use the quantizer in your own code" is
extracted and run in a fresh interpreter outside the repository, so it checks
its own asserts with nothing but the package on the path.
"""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
HEADING = '## Use the quantizer in your own code'


def _section_code(heading):
  """The first ```python block of the README section under ``heading``."""
  lines = (ROOT / 'README.md').read_text().splitlines()
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
  blocks = re.findall(r'^```python\n(.*?)^```$', '\n'.join(section) + '\n',
                      re.S | re.M)
  assert blocks, f'no ```python block under {heading!r}'
  return blocks[0]


def test_quantizer_example_runs(tmp_path):
  code = _section_code(HEADING)
  # The example must check the gradients it shows, or passing means nothing.
  assert 'jax.grad' in code and 'assert' in code
  script = tmp_path / 'example.py'
  script.write_text(code)
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, str(script)], cwd=tmp_path,
                          env=env, capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]


def test_code_layout_names_every_module():
  text = (ROOT / 'README.md').read_text()
  section = text.split('## Code layout', 1)[1].split('\n## ', 1)[0]
  named = set(re.findall(r'`([\w/]+(?:\.py|/))`', section))
  modules = {p.name for p in (ROOT / 'dtq_jax').glob('*.py')
             if p.name != '__init__.py'}
  assert modules - named == set(), 'modules missing from README Code layout'
  assert 'models/' in named
