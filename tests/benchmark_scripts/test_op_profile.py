"""benchmarks/op_profile.py: the step's pieces, their counts and the report."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import op_profile  # pylint: disable=g-import-not-at-top,wrong-import-position


def run_side(python, framework, tmp_path, model='resnet18', steps=0):
  """Runs one side on a tiny batch; returns its JSON record."""
  out = tmp_path / f'{framework}.json'
  proc = subprocess.run(
      [python, 'benchmarks/op_profile.py', f'--framework={framework}',
       f'--model={model}', '--batch=2', '--image_size=32', '--reps=1',
       f'--steps={steps}', f'--json={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=900,
      env={k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text())


def test_conv_signature_names_kernel_stride_groups_size_and_channels():
  assert op_profile.conv_signature(3, 3, 2, 1, 56, 64, 128) == (
      '3x3/s2 56px 64->128')
  assert op_profile.conv_signature(1, 1, 1, 1, 7, 512, 2048) == (
      '1x1 7px 512->2048')
  assert op_profile.conv_signature(3, 3, 1, 32, 112, 32, 32) == (
      '3x3 dw 112px 32->32')


def test_group_counts_in_first_seen_order():
  pieces = [('b', 1), ('a', 2), ('b', 3), ('c', 4), ('b', 5)]
  assert op_profile.group(pieces) == [('b', 1, 3), ('a', 2, 1), ('c', 4, 1)]


def _record(framework, step_ms):
  return {
      'framework': framework,
      'convs': [
          {'sig': '7x7/s2 32px 3->64', 'stem': True, 'count': 1,
           'fwd_ms': 2.0, 'dx_ms': 100.0, 'dw_ms': 3.0},
          {'sig': '3x3 8px 64->64', 'stem': False, 'count': 4,
           'fwd_ms': 1.0, 'dx_ms': 1.5, 'dw_ms': 0.5}],
      'bns': [{'shape': [2, 16, 16, 64], 'count': 5, 'ms': 0.2}],
      'quants': [{'what': 'input', 'shape': [2, 8, 8, 64], 'count': 4,
                  'ms': 0.25},
                 {'what': 'kernel', 'shape': [3, 3, 64, 64], 'count': 4,
                  'ms': 0.1}],
      'step_ms': step_ms}


def test_totals_count_each_piece_once_per_use_and_the_stem_has_no_dx():
  t = op_profile.totals(_record('jax', 40.0), 'dtq')
  assert t['conv fwd (student)'] == pytest.approx(2 + 4 * 1.0)
  assert t['conv fwd (teacher)'] == pytest.approx(6.0)
  assert t['conv dx'] == pytest.approx(4 * 1.5)  # not the stem's 100
  assert t['conv dw'] == pytest.approx(3 + 4 * 0.5)
  assert t['BatchNorm fwd+bwd'] == pytest.approx(1.0)
  assert t['quantization fwd+bwd'] == pytest.approx(4 * 0.35)
  pieces = 6 + 6 + 6 + 5 + 1 + 1.4
  assert t['the rest'] == pytest.approx(40 - pieces)
  assert t['whole step'] == 40.0
  # FT-Q runs no teacher.
  assert op_profile.totals(_record('jax', 40.0), 'ft')[
      'conv fwd (teacher)'] == 0.0


def test_report_sets_the_sides_side_by_side():
  table, tj, tt = op_profile.report(_record('jax', 40.0),
                                    _record('torch', 80.0), 'dtq')
  assert tt['whole step'] / tj['whole step'] == 2.0
  assert '| whole step | 40 | 80 | 2.00 | 100% |' in table
  assert '| 7x7/s2 32px 3->64 (stem) | 1 | 2.0 | 2.0 |' in table


def test_merge_needs_one_file_per_framework(tmp_path):
  path = tmp_path / 'jax.json'
  rec = _record('jax', 40.0)
  rec.update(args={}, command='x', info={})
  path.write_text(json.dumps(rec))
  with pytest.raises(SystemExit, match='one jax and one torch'):
    op_profile.main([f'--merge={path},{path}'])
  with pytest.raises(SystemExit):  # argparse: neither side nor --merge
    op_profile.main([])


def test_jax_side_finds_every_convolution_of_resnet18(tmp_path):
  rec = run_side(sys.executable, 'jax', tmp_path)
  convs = rec['convs']
  # ResNet-18: the stem, 16 block convolutions, 3 downsampling ones.
  assert sum(c['count'] for c in convs) == 20
  assert [c['sig'] for c in convs if c['stem']] == ['7x7/s2 32px 3->64']
  assert sum(c['count'] for c in rec['bns']) == 20
  # Each quantized convolution (all but the stem): its input and its kernel.
  quants = {w: sum(q['count'] for q in rec['quants'] if q['what'] == w)
            for w in ('input', 'kernel')}
  assert quants == {'input': 19, 'kernel': 19}
  # Timed as the default student quantizes: the fused backward pass.
  assert rec['info']['fused_vjp'] is True
  for c in convs:
    assert min(c['fwd_ms'], c['dx_ms'], c['dw_ms']) > 0
  assert 'step_ms' not in rec  # --steps=0
