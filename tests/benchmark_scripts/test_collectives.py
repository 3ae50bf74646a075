"""benchmarks/collectives.py counts the step's cross-device collectives."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import collectives  # pylint: disable=g-import-not-at-top,wrong-import-position

HLO = '''
  %a = f32[] all-reduce(f32[] %x), replica_groups={}, to_apply=%max, metadata={op_name="jit(train_step)/jvp(ResNet)/conv/reduce_max"}
  %b = (f32[64]{0}, f32[3,3,4,8]{3,2,1,0}) all-reduce(f32[64]{0} %y, f32[3,3,4,8]{3,2,1,0} %z), to_apply=%add, metadata={op_name="jit(train_step)/transpose(jvp(ResNet))/conv/add"}
  ROOT %c = bf16[2,2] all-gather(bf16[1,2] %w), dimensions={0}
  %d = f32[8] add(f32[8] %p, f32[8] %q)
'''


def test_collectives_are_read_from_the_hlo_text():
  found = collectives.collectives(HLO)
  assert [c['op'] for c in found] == ['all-reduce', 'all-reduce',
                                      'all-gather']
  assert [c['backward'] for c in found] == [False, True, False]
  assert found[1]['arrays'] == [('f32', (64,)), ('f32', (3, 3, 4, 8))]
  assert [c['bytes'] for c in found] == [4, 4 * (64 + 288), 8]
  summary = collectives.summarize(found)
  assert summary['instructions'] == 3 and summary['arrays'] == 4
  assert (summary['scalar_arrays'], summary['vector_arrays'],
          summary['larger_arrays']) == (1, 1, 2)
  assert summary['forward_instructions'] == 2
  assert summary['ops'] == {'all-reduce': 2, 'all-gather': 1}


@pytest.mark.parametrize('model', ['small_resnet'])
def test_per_device_statistics_leave_no_collective_in_the_forward_pass(
    model, tmp_path):
  out = tmp_path / 'collectives.md'
  proc = subprocess.run(
      [sys.executable, 'benchmarks/collectives.py', f'--model={model}',
       '--batch=8', '--devices=2', f'--out={out}'],
      # The suite's XLA flags pass through; the script adds its device count.
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines()
          if line.startswith('{')]
  batch, per_device = rows
  # Batch statistics: every quantized input's min and max and every
  # BatchNorm's moments cross the devices in the forward pass.
  assert batch['forward_instructions'] > 0 and batch['scalar_arrays'] > 20
  # Per device: none in the forward pass; the gradients remain.
  assert per_device['forward_instructions'] == 0
  assert 0 < per_device['instructions'] < batch['instructions']
  assert 'per-device statistics (stats_group_size=4)' in out.read_text()
