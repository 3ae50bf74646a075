"""Static activation ranges and integer inference against the paper's dynamic ranges.

  .venv/bin/python benchmarks/static_ranges.py --seeds=3 \
      --out=results/static_ranges_fmnist.md

For each method (default FT-Q and DTQ) the demo config is trained with
``quant.act_ranges='static'``: training itself is the paper's (dynamic
ranges), and the run also keeps running (EMA) input ranges of every quantized
convolution. Each seed's final student is then exported twice, with those
EMA ranges and with ranges calibrated afterwards (min/max over the whole
training split, BatchNorm in inference mode), and ``export.check`` evaluates
on all test images:

- dynamic fake quantization (the paper's evaluation),
- static-range fake quantization with the exported ranges,
- integer inference of the exported file (``int_inference``),

and the share of test images whose top-1 prediction agrees between integer and
static fake quantization. Runs live under --workdir (finished ones are
reused), exports in --workdir/exports.
"""

import argparse
import os
import sys
import time

import bench_util

bench_util.add_repo_to_path()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging
import jax
import numpy as np

from configs import fmnist
from dtq_jax import config_validation
from dtq_jax import datasets
from dtq_jax import experiment
from dtq_jax import export

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


def measure(workdir, seed, source, data, exports):
  """Exports one seed's student with one range source and checks it."""
  path = os.path.join(exports, f'{os.path.basename(workdir)}-seed{seed}-'
                      f'{source}.dtq')
  manifest = export.export_run(workdir, path, seed=seed,
                               recalibrate=source == 'calibrated', data=data,
                               verbose=False)
  start = time.time()
  report = export.check(path, workdir=workdir, data=data, verbose=False)
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
      check_s=time.time() - start)


def mean_std(rows, key):
  values = np.array([r[key] for r in rows])
  return f'{values.mean():.2f} ± {values.std():.2f}'


def summary_table(records, methods):
  lines = ['| method | ranges | dynamic (paper) | static fake quant | '
           'integer | same top-1, integer vs static (%) | same top-1, static '
           'vs dynamic (%) |', '|---|---|---|---|---|---|---|']
  for method in methods:
    for source in RANGE_SOURCES:
      rows = [r for r in records
              if r['method'] == method and r['ranges'] == source]
      lines.append(
          f'| {method} | {source} | {mean_std(rows, "dynamic")} | '
          f'{mean_std(rows, "static")} | {mean_std(rows, "integer")} | '
          f'{min(r["same_top1_int_vs_static"] for r in rows):.2f} (min) | '
          f'{mean_std(rows, "same_top1_static_vs_dynamic")} |')
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  out = args.out or os.path.join(
      'results', f'static_ranges_fmnist_{jax.default_backend()}.md')
  exports = os.path.join(args.workdir, 'exports')
  os.makedirs(exports, exist_ok=True)
  info = bench_util.machine_info(jax=jax.__version__,
                                 device=jax.devices()[0].device_kind)
  start = time.time()
  records, data, teacher = [], None, None
  for method in args.methods:
    config = run_config(method, args.bits, args.seeds)
    experiment.enable_compilation_cache(config)
    data = data or datasets.load(config)
    teacher = teacher or experiment.load_teacher(config, data)
    workdir = os.path.join(args.workdir, f'{method}-{args.bits}bit')
    experiment.run_single(config, workdir, data, teacher)
    for seed in sorted(export.seed_dirs(workdir)):
      for source in RANGE_SOURCES:
        record = dict(method=method, bits=args.bits, seed=seed,
                      **measure(workdir, seed, source, data, exports))
        bench_util.emit(record)
        records.append(record)
  info['total_s'] = round(time.time() - start)
  notes = [
      'Accuracies in % on all test images, mean ± population std over the '
      'seeds; evaluation batch = the config\'s eval_batch_size (dynamic '
      'ranges depend on it). "ema": ranges kept during training '
      '(quant.range_stat=ema, momentum 0.9); "calibrated": min/max over the '
      'whole training split after training, no augmentation.',
      f'Export size: {records[0]["file_bytes"]:,} bytes against '
      f'{records[0]["float32_same_tensors_bytes"]:,} for the same tensors in '
      'float32.',
  ]
  bench_util.write_report(
      out, f'Static ranges and integer inference, Fashion-MNIST demo, '
      f'{args.bits}/{args.bits} bits', info,
      summary_table(records, args.methods), records, notes)
  return 0


if __name__ == '__main__':
  sys.exit(main())
