"""Images/s of the training input pipeline at ImageNet resolution.

Generates ``--num_images`` JPEGs of about ``--src_size`` (default 500x400,
sizes jittered by up to 10%) in ``--classes`` class folders under a temporary
directory, reads them with ``splits.image_folder_splits`` (the
Caltech/MIT67 path of main.py, which decodes every image once to drop
unreadable ones) and times ``input_pipeline.train_batches`` with the paper's
preprocessing: resize to 256x256, random crop 224, random horizontal flip,
ImageNet normalisation, on tf.data's host threads.

Images are smooth random colour fields with mild noise (``--content smooth``,
default; roughly the JPEG size of a photo) or pure noise (``--content noise``:
the worst case for the JPEG decoder).

Output: one JSON line (images/s over the timed batches, median batch time,
time to the first batch, time to build the split) and a Markdown table;
``--out`` writes it with the command, commit and machine.

  python benchmarks/input_pipeline.py --batch=64 --num_images=256 --steps=20
"""

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time

import bench_util

bench_util.add_repo_to_path()

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from dtq_jax import input_pipeline  # pylint: disable=wrong-import-position
from dtq_jax import splits  # pylint: disable=wrong-import-position


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--num_images', type=int, default=256)
  p.add_argument('--classes', type=int, default=4)
  p.add_argument('--steps', type=int, default=20, help='timed batches')
  p.add_argument('--warmup', type=int, default=3,
                 help='untimed batches first (the first one is reported)')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--resize_to', type=int, default=256)
  p.add_argument('--src_size', default='500x400', help='WIDTHxHEIGHT')
  p.add_argument('--content', default='smooth', choices=('smooth', 'noise'))
  p.add_argument('--quality', type=int, default=90, help='JPEG quality')
  p.add_argument('--data_dir', default=None,
                 help='use/keep the images here instead of a temp dir')
  p.add_argument('--out', default=None, help='Markdown report path')
  args = p.parse_args(argv)
  w, h = args.src_size.lower().split('x')
  args.src_wh = (int(w), int(h))
  if args.num_images < args.batch:
    p.error('--num_images must be >= --batch')
  return args


def make_images(root, args):
  """Writes root/train/<class>/*.jpg (and one test image per class)."""
  rs = np.random.RandomState(0)
  w0, h0 = args.src_wh
  total_bytes = 0
  for split, count in (('train', args.num_images), ('test', args.classes)):
    for i in range(count):
      label = i % args.classes
      folder = os.path.join(root, split, f'class_{label}')
      os.makedirs(folder, exist_ok=True)
      w = int(w0 * rs.uniform(0.9, 1.1))
      h = int(h0 * rs.uniform(0.9, 1.1))
      if args.content == 'noise':
        img = rs.randint(0, 256, (h, w, 3)).astype(np.uint8)
      else:
        coarse = rs.uniform(0, 255, (1, 12, 16, 3)).astype(np.float32)
        img = tf.image.resize(coarse, [h, w], method='bicubic')[0].numpy()
        img = img + rs.normal(0, 8, img.shape)
        img = np.clip(img, 0, 255).astype(np.uint8)
      data = tf.io.encode_jpeg(img, quality=args.quality).numpy()
      with open(os.path.join(folder, f'{i:05d}.jpg'), 'wb') as f:
        f.write(data)
      if split == 'train':
        total_bytes += len(data)
  return total_bytes / args.num_images


def main(argv=None):
  args = parse_args(argv)
  info = bench_util.machine_info(tensorflow=tf.__version__)
  print('# ' + ', '.join(f'{k}={v}' for k, v in info.items()),
        file=sys.stderr, flush=True)
  root = args.data_dir or tempfile.mkdtemp(prefix='dtq_pipeline_bench_')
  try:
    t = time.perf_counter()
    mean_bytes = make_images(root, args)
    gen_s = time.perf_counter() - t
    print(f'# wrote {args.num_images} JPEGs ({mean_bytes / 1024:.0f} KiB '
          f'each on average) in {gen_s:.1f} s', file=sys.stderr, flush=True)

    t = time.perf_counter()
    train, _ = splits.image_folder_splits(root)
    split_s = time.perf_counter() - t

    t = time.perf_counter()
    batches = input_pipeline.train_batches(
        train, args.batch, args.image_size, seed=0, resize_to=args.resize_to)
    batch = next(batches)
    first_s = time.perf_counter() - t
    assert batch['image'].shape == (args.batch, args.image_size,
                                    args.image_size, 3), batch['image'].shape
    for _ in range(max(args.warmup - 1, 0)):
      next(batches)
    intervals = []
    start = last = time.perf_counter()
    for _ in range(args.steps):
      next(batches)
      now = time.perf_counter()
      intervals.append(now - last)
      last = now
    total_s = last - start
    # Stop tf.data's prefetching threads before the files go away.
    del batches
    gc.collect()
  finally:
    if not args.data_dir:
      shutil.rmtree(root, ignore_errors=True)

  record = {
      'benchmark': 'input_pipeline',
      'variant': f'folder_jpeg_{args.content}',
      'batch': args.batch,
      'num_images': args.num_images,
      'src_size': args.src_size,
      'jpeg_kib': round(mean_bytes / 1024, 1),
      'resize_to': args.resize_to,
      'image_size': args.image_size,
      'steps': args.steps,
      'img_per_s': round(args.batch * args.steps / total_s, 1),
      'batch_ms': round(bench_util.median(intervals) * 1e3, 1),
      'first_batch_s': round(first_s, 2),
      'split_s': round(split_s, 2),
      'cores_usable': bench_util.usable_cores(),
  }
  bench_util.emit(record)
  table = bench_util.markdown_table([record], [
      ('source', 'variant'), ('JPEG KiB', 'jpeg_kib'), ('batch', 'batch'),
      ('img/s', 'img_per_s'), ('batch ms (median)', 'batch_ms'),
      ('first batch s', 'first_batch_s'),
      ('image_folder_splits s', 'split_s')])
  notes = [
      f'Pipeline: decode JPEG ({args.src_size} +-10%), resize to '
      f'{args.resize_to}x{args.resize_to} (bilinear, antialias), random crop '
      f'{args.image_size}, random flip, normalise; tf.data with AUTOTUNE '
      f'parallelism on {bench_util.usable_cores()} cores. image_folder_splits '
      'includes decoding every image once (validation).']
  print()
  print(table)
  print('\n'.join(notes))
  if args.out:
    bench_util.write_report(
        args.out, f'Training input pipeline ({args.image_size} px, batch '
        f'{args.batch})', info, table, [record], notes)


if __name__ == '__main__':
  main()
