"""Size and CPU inference speed of an exported student: ONNX against JAX.

  .venv/bin/python main.py --config=configs/fmnist.py:quick \
      --config.quant.act_ranges=static --workdir=/tmp/fmnist_static
  .venv/bin/python benchmarks/export_speed.py \
      --workdir=/tmp/fmnist_static/dtq --out=results/export_speed_cpu.md

Exports the run's student (``--workdir``: one method's folder) as ONNX and as
``.dtq``, and reports the ONNX file's size against the same tensors in
float32, then images per second on this machine's CPU of

- the ONNX model in onnxruntime (CPUExecutionProvider, default session
  options),
- the JAX integer path of the ``.dtq`` (``export.load_integer_model``),
- the float fake-quant network with the same static ranges (JAX, jitted),

each over the same ``--images`` test images in batches of ``--batch_size``
(after one warm-up pass; the median of ``--rounds`` passes), with the top-1
agreement of ONNX and the fake-quant network on them.
"""

import argparse
import os
import sys
import tempfile
import time

import bench_util

bench_util.add_repo_to_path()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging
import jax
import numpy as np
import onnxruntime

from dtq_jax.data import datasets
from dtq_jax.deploy import dtq_format
from dtq_jax.deploy import export
from dtq_jax.deploy import onnx_export
from dtq_jax.deploy import runs
from dtq_jax import layers
from dtq_jax.method import networks
from dtq_jax.method import static_ranges
# pylint: enable=g-import-not-at-top,wrong-import-position


def _passes(fn, batches, rounds):
  """Median seconds of ``rounds`` passes over ``batches`` (after a warm-up)."""
  for b in batches:
    np.asarray(fn(b))
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for b in batches:
      np.asarray(fn(b))
    times.append(time.perf_counter() - start)
  return bench_util.median(times)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True,
                      help='one method\'s run folder (config.json, seed_N/)')
  parser.add_argument('--out', default='results/export_speed_cpu.md')
  parser.add_argument('--images', type=int, default=1000)
  parser.add_argument('--batch_size', type=int, default=100)
  parser.add_argument('--rounds', type=int, default=5)
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.ERROR)

  config = runs.load_config(args.workdir)
  data = datasets.load(config)
  with tempfile.TemporaryDirectory() as tmp:
    onnx_path = os.path.join(tmp, 'model.onnx')
    dtq_path = os.path.join(tmp, 'model.dtq')
    manifest = export.export_run(args.workdir, onnx_path, data=data,
                                 verbose=False)
    export.export_run(args.workdir, dtq_path, data=data, verbose=False)
    onnx_bytes = os.path.getsize(onnx_path)
    dtq_bytes = os.path.getsize(dtq_path)
    session = onnxruntime.InferenceSession(
        onnx_path, providers=['CPUExecutionProvider'])
    _, predict_int = export.load_integer_model(dtq_path)
    _, exported = dtq_format.read(dtq_path)

  src = manifest['source']
  nets, variables, head, _, _ = runs.restore_run(
      config, runs.seed_dirs(args.workdir)[src['seed']],
      src['checkpoint'] == 'best')
  static_vars = dict(variables,
                     **{layers.RANGES: exported[layers.RANGES]['backbone']})
  static = networks.make_predict(
      static_ranges.with_act_ranges(nets.student, 'static'), nets.head)

  batches, n = [], 0
  for batch in data.eval_batches(data.test, args.batch_size):
    if n >= args.images:
      break
    keep = min(int(batch['mask'].sum()), args.images - n)
    batches.append(np.asarray(batch['image'][:keep], np.float32))
    n += keep
  paths = {
      'ONNX, onnxruntime CPU': lambda x: session.run(
          [onnx_export.OUTPUT], {onnx_export.INPUT: x})[0],
      'JAX integer path (.dtq)': predict_int,
      'JAX float fake quant, static ranges': lambda x: static(
          static_vars, head, x),
  }
  first = {k: np.concatenate([np.asarray(fn(b)) for b in batches]).argmax(-1)
           for k, fn in paths.items()}
  agreement = float(np.mean(first['ONNX, onnxruntime CPU'] == first[
      'JAX float fake quant, static ranges']))
  rows, records = [], []
  for name, fn in paths.items():
    seconds = _passes(fn, batches, args.rounds)
    record = dict(path=name, images=n, batch_size=args.batch_size,
                  seconds=seconds, images_per_s=n / seconds)
    bench_util.emit(record)
    records.append(record)
    rows.append(dict(path=name, images_per_s=f'{n / seconds:,.0f}',
                     ms_per_batch=f'{1000 * seconds / len(batches):.1f}'))
  s = manifest['sizes']
  size_rows = [
      dict(file='ONNX (this export)', bytes=f'{onnx_bytes:,}', ratio='1.00'),
      dict(file='.dtq (packed codes)', bytes=f'{dtq_bytes:,}',
           ratio=f'{dtq_bytes / onnx_bytes:.2f}'),
      dict(file='the same tensors in float32',
           bytes=f'{s["float32_same_tensors_bytes"]:,}',
           ratio=f'{s["float32_same_tensors_bytes"] / onnx_bytes:.2f}'),
  ]
  records.append(dict(onnx_bytes=onnx_bytes, dtq_bytes=dtq_bytes,
                      float32_same_tensors_bytes=s[
                          'float32_same_tensors_bytes'],
                      top1_agreement_onnx_vs_static=agreement))
  table = '\n\n'.join([
      bench_util.markdown_table(size_rows, (('file', 'file'), ('bytes', 'bytes'),
                                            ('x ONNX file', 'ratio'))),
      bench_util.markdown_table(rows, (('inference path', 'path'),
                                       ('images/s', 'images_per_s'),
                                       ('ms per batch', 'ms_per_batch')))])
  m = manifest['model']
  info = bench_util.machine_info(
      jax=jax.__version__, onnxruntime=onnxruntime.__version__,
      workdir=os.path.abspath(args.workdir),
      model=f'{m["name"]} {m["kwargs"]}, {m["bits_w"]}/{m["bits_a"]} bits',
      images=n, batch_size=args.batch_size, rounds=args.rounds)
  notes = [
      f'Top-1 agreement, ONNX vs JAX static fake quant, on these {n} '
      f'images: {100 * agreement:.2f}%.',
      'Sizes: "x ONNX file" is bytes / the ONNX file\'s. The ONNX file stores 4-bit '
      'weight codes as uint4 (two per byte) and keeps BatchNorm, the stem '
      'and the classifiers in float32.',
      'Speeds: median of the rounds, after one warm-up pass; the machine is '
      'shared with other jobs (see the load averages), so the numbers are '
      'indicative, not a controlled measurement.',
  ]
  bench_util.write_report(args.out, 'Exported model: size and CPU inference '
                          'speed', info, table, records, notes)
  return 0


if __name__ == '__main__':
  sys.exit(main())
