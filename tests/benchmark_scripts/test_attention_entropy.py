"""benchmarks/attention_entropy.py: the entropy table of compare.py's runs."""

import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import attention_entropy  # pylint: disable=g-import-not-at-top,wrong-import-position


def _write_seed(folder, entropies, afa, ce, accuracy, finished=True):
  """A seed's metrics.jsonl: two train logs (steps 20, 40), a test record;
  and its result.json if ``finished``."""
  os.makedirs(folder)
  if finished:
    with open(os.path.join(folder, 'result.json'), 'w') as f:
      json.dump({'final_test_accuracy': accuracy}, f)
  with open(os.path.join(folder, 'metrics.jsonl'), 'w') as f:
    for step, hs in zip((20, 40), entropies):
      record = {'step': step, 'train/loss_ce': ce, 'train/loss_afa': afa}
      record.update({f'train/attention_entropy_{k}': h
                     for k, h in enumerate(hs)})
      f.write(json.dumps(record) + '\n')
      afa, ce = afa / 2, ce / 2  # only the first log is reported
    f.write(json.dumps({'step': 40, 'test/accuracy': accuracy}) + '\n')
    f.write('{"step": 41, "cut short by a ki')  # a killed writer's line


def _sweep(root):
  workdir = os.path.join(root, 'sweep')
  _write_seed(os.path.join(workdir, 'dtq-4bit-30shots', 'seed_1'),
              [(2.5, 3.4), (1.0, 3.3)], afa=1.2, ce=1.8, accuracy=83.0)
  _write_seed(os.path.join(workdir, 'dtq-4bit-30shots', 'seed_2'),
              [(2.3, 3.2), (2.0, 3.1)], afa=1.4, ce=2.0, accuracy=84.0)
  uniform = (np.log(16), np.log(32))
  _write_seed(os.path.join(workdir, 'dtq_uniform-4bit-30shots', 'seed_1'),
              [uniform, uniform], afa=1.0, ce=1.5, accuracy=83.5)
  # A seed still training, a cell with none finished, DTQ at other shots,
  # another method: all left out.
  _write_seed(os.path.join(workdir, 'dtq-4bit-30shots', 'seed_3'),
              [(0.0, 0.0), (0.0, 0.0)], afa=9.0, ce=9.0, accuracy=10.0,
              finished=False)
  _write_seed(os.path.join(workdir, 'dtq_entropy-4bit-30shots', 'seed_1'),
              [(0.0, 0.0), (0.0, 0.0)], afa=9.0, ce=9.0, accuracy=10.0,
              finished=False)
  _write_seed(os.path.join(workdir, 'dtq-4bit-10shots', 'seed_1'),
              [(0.0, 0.0), (0.0, 0.0)], afa=9.0, ce=9.0, accuracy=10.0)
  _write_seed(os.path.join(workdir, 'ft-4bit-30shots', 'seed_1'),
              [(0.0, 0.0), (0.0, 0.0)], afa=9.0, ce=9.0, accuracy=10.0)
  return workdir


def test_table_has_mean_and_std_over_seeds_per_map(tmp_path):
  workdir = _sweep(str(tmp_path))
  out = tmp_path / 'entropy.md'
  assert attention_entropy.main([f'--split=in_domain={workdir}',
                                 f'--out={out}']) == 0
  text = out.read_text()
  rows = [l for l in text.splitlines() if l.startswith('| dtq')]
  # dtq first; seeds 1 and 2: map 0 starts at 2.5 and 2.3 (2.40 ± 0.10),
  # ends at 1.0 and 2.0 (1.50 ± 0.50); AFA/CE from the first log only.
  assert rows == [
      '| dtq | 2 | 83.50 ± 0.50 | 2.40 ± 0.10 / 1.50 ± 0.50 | '
      '3.30 ± 0.10 / 3.20 ± 0.10 | '
      '1.300 ± 0.100 / 1.900 ± 0.100 (step 20) |',
      '| dtq_uniform | 1 | 83.50 | 2.77 / 2.77 | 3.47 / 3.47 | '
      '1.000 / 1.500 (step 20) |']
  assert 'map 0 2.77 (16 channels), map 1 3.47 (32 channels)' in text
  with open(tmp_path / 'entropy.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_diverging_run_gets_a_row_per_logged_step(tmp_path):
  workdir = _sweep(str(tmp_path))
  out = tmp_path / 'entropy.md'
  run = os.path.join(workdir, 'dtq-4bit-30shots', 'seed_1')
  assert attention_entropy.main([f'--split=a={workdir}', f'--out={out}',
                                 f'--diverging_run={run}',
                                 '--diverging_command=python main.py']) == 0
  text = out.read_text().split('## Diverging run')[1]
  assert 'Command: `python main.py`' in text
  assert '| 20 | 1.2 | 1.8 | - | 2.5 | 3.4 |' in text
  assert '| 40 | 0.6 | 0.9 | - | 1 | 3.3 |' in text


def test_a_folder_without_dtq_cells_is_one_line_exit_2(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  proc = subprocess.run(
      [sys.executable, 'benchmarks/attention_entropy.py',
       f'--split=x={empty}', f'--out={tmp_path / "t.md"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f'error: {empty}: no DTQ cell at 4 bits and 30 shots '
      '(dtq*-4bit-30shots/seed_N/metrics.jsonl)']
  assert not (tmp_path / 't.md').exists()


def test_a_diverging_run_that_is_not_a_seed_folder_is_named(tmp_path):
  workdir = _sweep(str(tmp_path))
  assert attention_entropy.main([
      f'--split=a={workdir}', f'--out={tmp_path / "t.md"}',
      f'--diverging_run={workdir}']) == 2
  assert not (tmp_path / 't.md').exists()
