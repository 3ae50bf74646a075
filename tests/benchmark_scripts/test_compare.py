"""benchmarks/compare.py: cells are checked before anything trains."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_cell_with_another_config_is_one_line_before_anything_loads(
    tmp_path):
  workdir = tmp_path / 'sweep'
  # The second cell of the sweep was run with another learning rate (a
  # config.json holds only what it was run with; fields it lacks are the
  # defaults of their time, so one field is enough to differ).
  cell = workdir / 'dtq-4bit-30shots'
  cell.mkdir(parents=True)
  (cell / 'config.json').write_text(json.dumps({'optim': {'lr': 123.0}}))
  out = tmp_path / 'table.md'
  cmd = [sys.executable, 'benchmarks/compare.py', '--sweep=shots',
         '--shots=30', '--methods=ft,dtq', '--seeds=1',
         '--config=configs/fmnist.py:quick',
         # Data that does not exist: reading it would fail differently.
         '--config.dataset.data_dir=/nonexistent/fashion-mnist',
         f'--workdir={workdir}', f'--out={out}']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1, proc.stderr[-2000:]
  assert errors[0].startswith('error: config.optim.lr=')
  assert f'{cell} holds an unfinished run with a different config' in (
      errors[0])
  assert 'Traceback' not in proc.stderr
  # Nothing was trained or written.
  assert sorted(os.listdir(workdir)) == ['dtq-4bit-30shots']
  assert not out.exists()
