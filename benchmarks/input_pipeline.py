"""Images/s of the training input pipeline: decoding, the image cache, uint8.

Generates ``--num_images`` JPEGs of about ``--src_size`` (default 500x375,
sizes jittered by up to 10%) in ``--classes`` class folders under a temporary
directory, reads them with ``splits.image_folder_splits`` (the Caltech/MIT67
path of main.py, which decodes every image once to drop unreadable ones) and
times the training batches that ``datasets.Data`` gives with the paper's
preprocessing (resize to 256x256, random crop 224, random horizontal flip,
ImageNet normalisation), in these variants (``--variants``):

  decode        no cache: every JPEG decoded and resized every epoch (the
                pipeline before the image cache)
  cache         dataset.cache='memory': decoded and resized once, then only
                cropped, flipped and normalised on the host
  cache_disk    dataset.cache='disk': the same, read from a memory-mapped file
  cache_device  the cache, uint8 pre-crop batches for a step that augments
                on the device (dtq_jax/data/augment.py): the host only gathers
  fmnist        Fashion-MNIST (the demo's 28 px pixel arrays: nothing to
                decode, so the cache does not apply): host pad-crop-flip
  fmnist_device Fashion-MNIST, uint8 batches for on-device augmentation

The variants are timed in turn, ``--rounds`` times (interleaving spreads the
load of a shared machine over all of them); each round starts a fresh
iterator at the next step and discards ``--warmup`` batches. The load
average is recorded around every timing.

Images are smooth random colour fields with mild noise (``--content smooth``,
default; roughly the JPEG size of a photo) or pure noise (``--content noise``:
the worst case for the JPEG decoder).

Output: one JSON line per variant (images/s and per usable core, median batch
time, load) and a Markdown table; ``--out`` writes it with the command,
commit and machine.

  python benchmarks/input_pipeline.py --batch=64 --num_images=512 --steps=10 \
      --rounds=3 --out=results/input_pipeline_cpu.md
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

from dtq_jax.data import datasets  # pylint: disable=wrong-import-position
from dtq_jax.data import input_pipeline  # pylint: disable=wrong-import-position
from dtq_jax.data import sources  # pylint: disable=wrong-import-position
from dtq_jax.data import splits  # pylint: disable=wrong-import-position

# name: (task, dataset.cache, on_device)
VARIANTS = {
    'decode': ('paper', 'none', False),
    'cache': ('paper', 'memory', False),
    'cache_disk': ('paper', 'disk', False),
    'cache_device': ('paper', 'memory', True),
    'fmnist': ('fmnist', 'none', False),
    'fmnist_device': ('fmnist', 'none', True),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--num_images', type=int, default=512)
  p.add_argument('--classes', type=int, default=4)
  p.add_argument('--steps', type=int, default=10, help='timed batches')
  p.add_argument('--rounds', type=int, default=3,
                 help='times every variant is timed, in turn')
  p.add_argument('--warmup', type=int, default=2,
                 help='untimed batches at the start of every round')
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--resize_to', type=int, default=256)
  p.add_argument('--src_size', default='500x375', help='WIDTHxHEIGHT')
  p.add_argument('--content', default='smooth', choices=('smooth', 'noise'))
  p.add_argument('--quality', type=int, default=90, help='JPEG quality')
  p.add_argument('--fmnist_dir', default=sources.FASHION_MNIST_DIR,
                 help='folder of the Fashion-MNIST idx files')
  p.add_argument('--variants', default=','.join(VARIANTS),
                 help='comma-separated subset of ' + ', '.join(VARIANTS))
  p.add_argument('--data_dir', default=None,
                 help='use/keep the images here instead of a temp dir')
  p.add_argument('--out', default=None, help='Markdown report path')
  args = p.parse_args(argv)
  w, h = args.src_size.lower().split('x')
  args.src_wh = (int(w), int(h))
  if args.num_images < args.batch:
    p.error('--num_images must be >= --batch')
  args.variants = [v.strip() for v in args.variants.split(',') if v.strip()]
  for v in args.variants:
    if v not in VARIANTS:
      p.error(f'--variants: unknown {v!r}; allowed: {", ".join(VARIANTS)}')
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


class Variant:
  """One way of feeding batches, with its timings."""

  def __init__(self, name, data, on_device, batch):
    self.name, self.data, self.on_device, self.batch = (name, data, on_device,
                                                        batch)
    self.task = VARIANTS[name][0]
    self.next_step = 0
    self.intervals, self.timed_s, self.timed = [], 0.0, 0
    self.loads = []

  def time_round(self, steps, warmup):
    """A fresh iterator from the next step; --warmup batches, then timed."""
    batches = self.data.train_batches(self.batch, seed=0,
                                      start_step=self.next_step,
                                      on_device=self.on_device)
    for _ in range(warmup):
      next(batches)
    load = bench_util.load_average()[0]
    start = last = time.perf_counter()
    for _ in range(steps):
      out = next(batches)
      now = time.perf_counter()
      self.intervals.append(now - last)
      last = now
    self.timed_s += last - start
    self.timed += steps
    self.next_step += warmup + steps
    self.loads.append((load, bench_util.load_average()[0]))
    self.shape, self.dtype = out['image'].shape, str(out['image'].dtype)
    # Stop tf.data's prefetching threads before the next variant runs.
    del batches
    gc.collect()

  def record(self, cores):
    img_s = self.batch * self.timed / self.timed_s
    return {
        'benchmark': 'input_pipeline',
        'variant': self.name,
        'task': self.task,
        'cache': self.data.cache,
        'on_device': self.on_device,
        'batch': self.batch,
        'image': f'{self.dtype} {"x".join(map(str, self.shape[1:]))}',
        'steps': self.timed,
        'img_per_s': round(img_s, 1),
        'img_per_s_per_core': round(img_s / cores, 1),
        'batch_ms': round(bench_util.median(self.intervals) * 1e3, 1),
        'load_1min': ' '.join(f'{a:.1f}-{b:.1f}' for a, b in self.loads),
        'cores_usable': cores,
    }


def paper_data(args, root, cache_dir, cache):
  train, _ = splits.image_folder_splits(root)
  preprocessing = datasets.Preprocessing(image_size=args.image_size,
                                         resize_to=args.resize_to)
  return datasets.Data(train, train, None, preprocessing, cache=cache,
                       cache_dir=cache_dir)


def fmnist_data(args):
  train = sources.fashion_mnist_arrays(args.fmnist_dir)['train']
  preprocessing = datasets.Preprocessing(
      image_size=28, crop_padding=2, mean=input_pipeline.FASHION_MNIST_MEAN,
      std=input_pipeline.FASHION_MNIST_STD)
  return datasets.Data(train, train, None, preprocessing)


def main(argv=None):
  args = parse_args(argv)
  info = bench_util.machine_info(tensorflow=tf.__version__)
  print('# ' + ', '.join(f'{k}={v}' for k, v in info.items()),
        file=sys.stderr, flush=True)
  root = args.data_dir or tempfile.mkdtemp(prefix='dtq_pipeline_bench_')
  cache_dir = tempfile.mkdtemp(prefix='dtq_pipeline_cache_')
  cores = bench_util.usable_cores()
  setup = {}
  try:
    paper = [v for v in args.variants if VARIANTS[v][0] == 'paper']
    if paper:
      t = time.perf_counter()
      mean_bytes = make_images(root, args)
      setup['jpeg_kib'] = round(mean_bytes / 1024, 1)
      print(f'# wrote {args.num_images} JPEGs ({mean_bytes / 1024:.0f} KiB '
            f'each on average) in {time.perf_counter() - t:.1f} s',
            file=sys.stderr, flush=True)
    variants = []
    for name in args.variants:
      task, cache, on_device = VARIANTS[name]
      t = time.perf_counter()
      if task == 'paper':
        data = paper_data(args, root, cache_dir, cache)
        # Builds the cache (once: 'cache_disk' and 'cache_device' find the
        # file 'cache' wrote, and only check it).
        data._prepared(data.train, 'benchmark')  # pylint: disable=protected-access
      else:
        data = fmnist_data(args)
      setup[f'{name}_setup_s'] = round(time.perf_counter() - t, 2)
      print(f'# {name}: set up in {setup[f"{name}_setup_s"]} s',
            file=sys.stderr, flush=True)
      variants.append(Variant(name, data, on_device, args.batch))
    for r in range(args.rounds):
      for v in variants:
        print(f'# {v.name}: round {r + 1}/{args.rounds}', file=sys.stderr,
              flush=True)
        v.time_round(args.steps, args.warmup)
    records = [v.record(cores) for v in variants]
    del variants
    gc.collect()
  finally:
    if not args.data_dir:
      shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(cache_dir, ignore_errors=True)

  base = next((r for r in records if r['variant'] == 'decode'), None)
  for r in records:
    bench_util.emit(r)
  table = bench_util.markdown_table(records, [
      ('variant', 'variant'), ('task', 'task'), ('host sends', 'image'),
      ('img/s', 'img_per_s'), ('img/s per core', 'img_per_s_per_core'),
      ('x decode', lambda r: (r['img_per_s'] / base['img_per_s']
                              if base and r['task'] == 'paper' else None)),
      ('batch ms (median)', 'batch_ms'),
      ('1-min load (start-end of each round)', 'load_1min')])
  notes = [
      f'Paper-style data: {args.num_images} JPEGs of {args.src_size} +-10% '
      f'({setup.get("jpeg_kib", "-")} KiB on average, quality '
      f'{args.quality}), resized to {args.resize_to}x{args.resize_to} '
      '(bilinear, antialias), random crop '
      f'{args.image_size}, random flip, ImageNet normalisation; batch '
      f'{args.batch}; tf.data with AUTOTUNE parallelism on {cores} usable '
      'cores. Fashion-MNIST: the 60000 training images, pad 2, random crop '
      '28, flip, normalisation.',
      'Setup seconds (image_folder_splits, which decodes every image once to '
      'validate it, plus building or checking the cache): ' + ', '.join(
          f'{k[:-8]} {v}' for k, v in setup.items() if k.endswith('_setup_s')),
      'The *_device variants measure the host side only: the crop, flip and '
      'normalisation then run in the jitted step (their cost there: '
      'results/accelerator_cpu.md).',
      'The machine is shared with other agents\' jobs: the load column '
      'gives the 1-minute load average when each round started and ended '
      f'({cores} cores); variants were timed in turn, {args.rounds} rounds '
      f'of {args.steps} batches each.']
  print()
  print(table)
  print('\n'.join(notes))
  if args.out:
    bench_util.write_report(
        args.out, f'Training input pipeline ({args.image_size} px, batch '
        f'{args.batch}): decoding, the image cache, on-device augmentation',
        dict(info, **setup), table, records, notes)


if __name__ == '__main__':
  main()
