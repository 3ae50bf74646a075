"""Static activation ranges and integer inference against the paper's dynamic ranges.

  .venv/bin/python benchmarks/static_ranges.py --seeds=3 \
      --out=results/static_ranges_fmnist.md

For each method (default FT-Q and DTQ) the demo config is trained with
``quant.act_ranges='static'``: training itself is the paper's (dynamic
ranges), and the run also keeps running (EMA) input ranges of every quantized
convolution. Each seed's final student is then exported twice, with those
EMA ranges and with ranges calibrated afterwards (min/max over the whole
training split, BatchNorm in inference mode), and ``export_check.check``
evaluates on all test images:

- dynamic fake quantization (the paper's evaluation),
- static-range fake quantization with the exported ranges,
- integer inference of the exported file (``int_inference``),

and the share of test images whose top-1 prediction agrees between integer and
static fake quantization. The same student and ranges are also exported as
ONNX (``--format onnx``) and checked the same way with onnxruntime: ONNX
accuracy, the share of images whose top-1 prediction agrees with static fake
quantization, and the accuracy difference between the two. Runs live under
--workdir (finished ones are reused), exports in --workdir/exports, and each
variant's measurement in --workdir/measurements (reused while the seed's
result.json is unchanged, so an interrupted benchmark resumes and methods can
be measured by separate processes: --methods=ft, --methods=dtq, then all).
"""

import argparse
import hashlib
import os
import sys
import time

import bench_util

bench_util.add_repo_to_path()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging
import jax
import numpy as np
import onnxruntime

from configs import fmnist
from dtq_jax.data import datasets
from dtq_jax.deploy import export
from dtq_jax.deploy import export_check
from dtq_jax.deploy import onnx_export
from dtq_jax.infra import caches
from dtq_jax.infra import files
from dtq_jax.run import config_validation
from dtq_jax.run import experiment
from dtq_jax.run import teacher as teacher_lib

RANGE_SOURCES = ('ema', 'calibrated')


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--methods', default='ft,dtq',
                      help='comma-separated config.method values')
  parser.add_argument('--bits', type=int, default=4, help='weights and '
                      'activations')
  parser.add_argument('--seeds', type=int, default=3, help='runs per method')
  parser.add_argument('--workdir', default='runs/static_ranges_fmnist')
  parser.add_argument('--out', default=None, help='Markdown report')
  args = parser.parse_args(argv)
  args.methods = [m for m in args.methods.split(',') if m]
  unknown = sorted(set(args.methods) - {'fp', 'ft', 'l2', 'l2sp', 'delta',
                                        'dtq'})
  if unknown or not args.methods:
    parser.error(f'--methods {unknown or args.methods}: allowed fp, ft, l2, '
                 'l2sp, delta, dtq')
  if args.seeds < 1:
    parser.error('--seeds must be >= 1')
  return args


def run_config(method, bits, seeds):
  """The demo config of one method, keeping EMA ranges in training."""
  config = fmnist.get_config()
  config.method = method
  config.compare_methods = ()
  config.bits_w = config.bits_a = bits
  config.repeats = seeds
  config.quant.act_ranges = 'static'
  return config_validation.validate(config)


def export_and_check(workdir, seed, source, data, exports, fmt):
  """Exports one seed's student as ``fmt``; checks it (export_check.check)."""
  path = os.path.join(exports, f'{os.path.basename(workdir)}-seed{seed}-'
                      f'{source}.{fmt}')
  manifest = export.export_run(workdir, path, seed=seed,
                               recalibrate=source == 'calibrated', data=data,
                               verbose=False, fmt=fmt)
  start = time.time()
  report = export_check.check(path, workdir=workdir, data=data,
                              verbose=False, fmt=fmt)
  return manifest, report, time.time() - start


def measure(workdir, seed, source, data, exports):
  """Exports one seed's student with one range source, .dtq and ONNX.

  Returns:
    The record of the table: accuracies in %, agreements in % of the test
    images; the ONNX entries compare onnxruntime with static fake
    quantization evaluated in the ONNX check itself.
  """
  manifest, report, check_s = export_and_check(workdir, seed, source, data,
                                               exports, 'dtq')
  onnx_manifest, onnx_report, onnx_check_s = export_and_check(
      workdir, seed, source, data, exports, 'onnx')
  onnx_static = onnx_report['static_fake_quant']['accuracy']
  return dict(
      ranges=source,
      range_info=manifest['activation_ranges'],
      test_images=report['test_images'],
      dynamic=report['dynamic_fake_quant']['accuracy'],
      static=report['static_fake_quant']['accuracy'],
      integer=report['int']['accuracy'],
      same_top1_int_vs_static=100 * report['agreement_int_vs_static'],
      same_top1_static_vs_dynamic=100 * report['agreement_static_vs_dynamic'],
      max_abs_logit_diff=report['max_abs_logit_diff_int_vs_static'],
      file_bytes=manifest['sizes']['file_bytes'],
      float32_same_tensors_bytes=manifest['sizes'][
          'float32_same_tensors_bytes'],
      check_s=check_s,
      onnx=onnx_report['onnx']['accuracy'],
      onnx_check_static=onnx_static,
      same_top1_onnx_vs_static=100 * onnx_report['agreement_onnx_vs_static'],
      abs_accuracy_diff_onnx_vs_static=abs(onnx_report['onnx']['accuracy'] -
                                           onnx_static),
      max_abs_logit_diff_onnx=onnx_report['max_abs_logit_diff_onnx_vs_static'],
      onnx_file_bytes=onnx_manifest['sizes']['file_bytes'],
      onnx_check_s=onnx_check_s)


def measure_once(workdir, seed, source, data, exports, measurements):
  """``measure``, or its stored result if the seed's run is unchanged.

  Returns:
    ``(record, reused)``.
  """
  with open(os.path.join(export.seed_dirs(workdir)[seed],
                         files.RESULT), 'rb') as f:
    run_sha256 = hashlib.sha256(f.read()).hexdigest()
  path = os.path.join(measurements, f'{os.path.basename(workdir)}-seed{seed}-'
                      f'{source}.json')
  if os.path.exists(path):
    stored = files.read_json(path)
    if stored.get('run_result_sha256') == run_sha256:
      return stored['record'], True
  record = measure(workdir, seed, source, data, exports)
  files.write_json(path, dict(run_result_sha256=run_sha256, record=record))
  return record, False


def summary_table(records, methods):
  lines = ['| method | ranges | dynamic (paper) | static fake quant | '
           'integer | same top-1, integer vs static (%) | same top-1, static '
           'vs dynamic (%) | ONNX (onnxruntime) | same top-1, ONNX vs static '
           '(%) | max abs accuracy difference, ONNX vs static (points) |',
           '|---|---|---|---|---|---|---|---|---|---|']
  for method in methods:
    for source in RANGE_SOURCES:
      rows = [r for r in records
              if r['method'] == method and r['ranges'] == source]
      cell = lambda key: bench_util.mean_std([r[key] for r in rows])
      lines.append(
          f'| {method} | {source} | {cell("dynamic")} | {cell("static")} | '
          f'{cell("integer")} | '
          f'{min(r["same_top1_int_vs_static"] for r in rows):.2f} (min) | '
          f'{cell("same_top1_static_vs_dynamic")} | {cell("onnx")} | '
          f'{min(r["same_top1_onnx_vs_static"] for r in rows):.2f} (min) | '
          f'{max(r["abs_accuracy_diff_onnx_vs_static"] for r in rows):.2f} |')
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  out = args.out or os.path.join(
      'results', f'static_ranges_fmnist_{jax.default_backend()}.md')
  exports = os.path.join(args.workdir, 'exports')
  measurements = os.path.join(args.workdir, 'measurements')
  os.makedirs(exports, exist_ok=True)
  os.makedirs(measurements, exist_ok=True)
  info = bench_util.machine_info(jax=jax.__version__,
                                 onnxruntime=onnxruntime.__version__,
                                 device=jax.devices()[0].device_kind)
  start = time.time()
  records, data, teacher, reused = [], None, None, 0
  for method in args.methods:
    config = run_config(method, args.bits, args.seeds)
    caches.enable_compilation_cache(config)
    data = data or datasets.load(config)
    teacher = teacher or teacher_lib.load_teacher(config, data)
    workdir = os.path.join(args.workdir, f'{method}-{args.bits}bit')
    experiment.run_single(config, workdir, data, teacher)
    for seed in sorted(export.seed_dirs(workdir)):
      for source in RANGE_SOURCES:
        measured, was_reused = measure_once(workdir, seed, source, data,
                                            exports, measurements)
        reused += was_reused
        record = dict(method=method, bits=args.bits, seed=seed, **measured)
        bench_util.emit(record)
        records.append(record)
  # A resumed benchmark's total_s leaves out the measurements it reused.
  info['total_s'] = round(time.time() - start)
  info['reused_measurements'] = reused
  notes = [
      f'Task: configs/fmnist.py (dataset.split={config.dataset.split}), '
      f'{records[0]["test_images"]:,} test images. Accuracies in %, '
      'mean ± population std over the seeds; evaluation batch = the '
      'config\'s eval_batch_size (dynamic ranges depend on it). "ema": '
      'ranges kept during training (quant.range_stat=ema, momentum 0.9); '
      '"calibrated": min/max over the whole training split after training, '
      'no augmentation.',
      f'Export size: {records[0]["file_bytes"]:,} bytes against '
      f'{records[0]["float32_same_tensors_bytes"]:,} for the same tensors in '
      f'float32; ONNX file ({args.bits}-bit codes as '
      f'{np.dtype(onnx_export.code_dtype(args.bits)).name}, opset '
      f'{onnx_export.OPSET}): {records[0]["onnx_file_bytes"]:,} bytes '
      f'({records[0]["onnx_file_bytes"] / records[0]["file_bytes"]:.2f}x the '
      '.dtq file).',
      'ONNX columns: the same checkpoint and ranges exported with --format '
      'onnx and run by onnxruntime (CPU) on all test images; "same top-1" and '
      'the accuracy difference compare it with static-range fake '
      'quantization evaluated in the same check; min / max over the seeds.',
  ]
  if reused:
    notes.append(
        f'{reused} of the {len(records)} measurements were made by earlier '
        'runs of this script (e.g. --methods=ft and --methods=dtq in '
        'parallel) and reused from --workdir/measurements, the seeds\' '
        'runs being unchanged; total_s leaves them out, their check_s and '
        'onnx_check_s are in the records.')
  bench_util.write_report(
      out, f'Static ranges and integer inference, Fashion-MNIST demo, '
      f'{args.bits}/{args.bits} bits', info,
      summary_table(records, args.methods), records, notes)
  return 0


if __name__ == '__main__':
  sys.exit(main())
