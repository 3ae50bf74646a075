"""benchmarks/train_step.py measures the step with either quantizer."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))


def test_lsq_and_minmax_steps_are_measured_side_by_side(tmp_path):
  out = tmp_path / 'train_step.md'
  proc = subprocess.run(
      [sys.executable, 'benchmarks/train_step.py', '--model=small_resnet',
       '--batch=4', '--steps=2', '--warmup=1', '--variants=dtq',
       '--quantizers=minmax,lsq', f'--out={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(line) for line in proc.stdout.splitlines()
             if line.startswith('{')]
  assert [(r['variant'], r['quant_method']) for r in records] == [
      ('dtq_w4a4', 'minmax'), ('dtq_w4a4_lsq', 'lsq')]
  assert all(r['finite'] and not r['nonfinite_steps'] for r in records)
  assert records[1]['learned_init_s'] > 0
  assert records[0]['learned_init_s'] is None
  report = out.read_text()
  assert ('small_resnet: learned steps (lsq) cost x' in report and
          '(dtq_w4a4_lsq vs dtq_w4a4)' in report), report


def test_a_full_precision_variant_is_listed_once_for_all_quantizers():
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import train_step  # pylint: disable=g-import-not-at-top
  args = train_step.parse_args(['--variants=dtq,dtq32,ft',
                                '--quantizers=minmax,lsq'])
  # dtq32 quantizes nothing: one variant, not one per quantizer.
  assert [(s.name, s.quantizer) for s in train_step.variant_list(args)] == [
      ('dtq_w4a4', 'minmax'), ('dtq_w4a4_lsq', 'lsq'),
      ('dtq_w32a32', 'minmax'), ('ft_w4a4', 'minmax'),
      ('ft_w4a4_lsq', 'lsq')]


def test_an_unknown_quantizer_is_a_usage_error():
  proc = subprocess.run(
      [sys.executable, 'benchmarks/train_step.py', '--quantizers=bogus'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "--quantizers: unknown 'bogus'" in proc.stderr


def test_each_compute_dtype_is_a_variant_and_compared_with_the_first():
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import train_step  # pylint: disable=g-import-not-at-top
  args = train_step.parse_args(['--variants=dtq,dtq32',
                                '--dtype=float32,bfloat16'])
  assert args.dtype == 'float32'  # the teacher's calibration uses the first
  assert [(s.name, s.dtype) for s in train_step.variant_list(args)] == [
      ('dtq_w4a4', 'float32'), ('dtq_w32a32', 'float32'),
      ('dtq_w4a4 bfloat16', 'bfloat16'), ('dtq_w32a32 bfloat16', 'bfloat16')]
  record = lambda name, bits, dtype, ms: {
      'model': 'resnet50', 'variant': name, 'method': 'dtq', 'bits_w': bits,
      'bits_a': bits, 'cpu_convolutions': 'eigen', 'dtype': dtype,
      'step_ms': ms, 'hlo_hash': name, **train_step.DEFAULT_SWITCHES}
  lines = train_step.summary_lines([
      record('dtq_w4a4', 4, 'float32', 300.0),
      record('dtq_w32a32', 32, 'float32', 200.0),
      record('dtq_w4a4 bfloat16', 4, 'bfloat16', 150.0),
      record('dtq_w32a32 bfloat16', 32, 'bfloat16', 120.0)])
  assert lines == [
      '- resnet50: quantization costs x1.50 (dtq_w4a4 vs dtq_w32a32)',
      '- resnet50 bfloat16: quantization costs x1.25 (dtq_w4a4 bfloat16 vs '
      'dtq_w32a32 bfloat16)',
      '- resnet50 (dtype=bfloat16): speeds dtq_w4a4 up x2.00 '
      '(dtq_w4a4 bfloat16)',
      '- resnet50 (dtype=bfloat16): speeds dtq_w32a32 up x1.67 '
      '(dtq_w32a32 bfloat16)']


def test_an_unknown_dtype_is_a_usage_error():
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import train_step  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as e:
    train_step.parse_args(['--dtype=float16'])
  assert e.value.code == 2


def test_warm_up_goes_on_until_steps_in_flight_fault_no_pages(monkeypatch):
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import types  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
  # Faults counted before and after each settling pair: the first two pairs
  # fault in new buffers (930,000 pages each), the third none.
  counts = iter([0, 930_000, 930_000, 1_860_000, 1_860_000, 1_860_005])
  monkeypatch.setattr(train_step, 'minor_faults', lambda: next(counts))
  fake = types.SimpleNamespace(args=types.SimpleNamespace(warmup=3),
                               state=0, metrics=0, steps=0)

  def step():
    fake.steps += 1
    return fake.metrics
  fake._step = step  # pylint: disable=protected-access
  train_step.Variant.warm_up(fake)
  assert fake.settle_steps == 6 and fake.steps == 3 + 6
  # Never more than MAX_SETTLE_PAIRS pairs, however many pages fault.
  monkeypatch.setattr(train_step, 'minor_faults',
                      iter(range(0, 10**9, 10**6)).__next__)
  fake.steps = 0
  train_step.Variant.warm_up(fake)
  assert fake.settle_steps == 2 * train_step.MAX_SETTLE_PAIRS
  # --warmup=0 times the first steps as they come.
  fake.args.warmup, fake.steps = 0, 0
  train_step.Variant.warm_up(fake)
  assert fake.settle_steps == 0 and fake.steps == 1


def test_the_product_switch_set_is_the_default_and_unmarked():
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import train_step  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  quant = common.paper_config(dict(name='image_folder', root='x')).quant
  product = {s: quant[s] for s in train_step.SWITCHES}
  # The product leaves depthwise_as_shifts to the platform (None).
  assert product['depthwise_as_shifts'] is None
  assert train_step.parse_args([]).speedups == [product]
  args = train_step.parse_args(['--variants=dtq', '--speedups=default,none'])
  assert [(s.name, s.switches) for s in train_step.variant_list(args)] == [
      ('dtq_w4a4', product),
      ('dtq_w4a4+none', {s: False for s in train_step.SWITCHES})]
  # Naming the switches that are on sets the others off, the platform's
  # choice included: another set than the product's, and named so.
  on = '+'.join(s for s in train_step.SWITCHES if product[s])
  assert train_step.switch_label(train_step.parse_switch_set(on)) == on
  # The same set named twice is refused.
  with pytest.raises(SystemExit):
    train_step.parse_args([f'--speedups=default,{on},default'])
  with pytest.raises(SystemExit):
    train_step.parse_args([f'--speedups={on},{on}'])
