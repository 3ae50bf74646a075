"""benchmarks/accelerator_check.py runs where TensorFlow is not installed."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Runs a script with TensorFlow unimportable, as on an accelerator machine
# that has only jax, flax, optax and orbax: ``import tensorflow`` then raises
# ImportError.
_WITHOUT_TF = textwrap.dedent('''
    import runpy, sys
    sys.modules['tensorflow'] = None
    sys.path.insert(0, 'benchmarks')
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name='__main__')
''')


def test_step_path_does_not_import_tensorflow():
  code = ('import sys, dtq_jax.method.step, dtq_jax.method.networks, dtq_jax.data.augment; '
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'")
  subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True,
                 timeout=120)


def test_smoke_run_without_tensorflow(tmp_path):
  out = tmp_path / 'accelerator.md'
  proc = subprocess.run(
      [sys.executable, '-c', _WITHOUT_TF, 'benchmarks/accelerator_check.py',
       '--smoke', f'--out={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      # Two devices: the step is partitioned, as on a multi-GPU host.
      env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=(
          os.environ.get('XLA_FLAGS', '') +
          ' --xla_force_host_platform_device_count=2').strip()))
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = out.read_text()
  assert '- tensorflow_imported: False' in report
  rows = [line for line in report.splitlines()
          if line.startswith('| small_resnet b8 float32 w4a4')]
  assert len(rows) == 2, report  # the float-input step and the uint8 one
  # XLA counts one device's program: the mesh computes twice that.
  records = [json.loads(line) for line in report.splitlines()
             if line.startswith('{') and '"gflop_per_step_global"' in line]
  assert records, report
  for r in records:
    assert r['devices'] == 2
    assert r['gflop_per_step_global'] == pytest.approx(
        2 * r['gflop_per_step_per_device'], abs=0.01)
  assert 'On-device augmentation, small_resnet batch 8' in report
  # The training loop, fed with NumPy where TensorFlow is missing, against
  # the grid's uint8 step.
  assert ('- Training loop small_resnet batch 8 float32 w4a4 '
          '(`train.train_and_evaluate`; feed: numpy; on-device augmentation: '
          'on; prefetch_batches 1): ') in report, report
  assert 'so the loop runs at x' in report, report
  assert 'No accelerator: this run is on the CPU' in report
