"""Images/s of the real training loop, fed by its input pipeline, against its step.

Runs ``train.train_and_evaluate``, the loop that main.py runs (the device
prefetch of ``config.prefetch_batches``, metrics kept on the device between
logs, the final evaluation and checkpoints), for ``--steps`` DTQ steps on
random weights and random uint8 images, and reads the loop's own images/s
from its metrics log: ``train/images_per_s`` is the wall time between two
logs, so it includes every wait for input, dispatch and transfer. The first
log interval, which compiles the step, is left out. Then the same step,
compiled alone (``train_step.Variant``) on one batch that stays on the
device, is timed the way ``train_step.py`` times it: the ratio of the two is
what feeding the step and running the loop cost.

The images are an in-memory uint8 array at the pre-crop size (256 px for the
paper's networks): what the image cache holds after its first pass, so the
host does per batch exactly what a cached run does from its second epoch on.
The feed (``--feed``):

  tf     the product's ``datasets.Data`` and its tf.data pipeline, which
         crops, flips and normalises on the host, or only gathers uint8 rows
         for a step that augments them on the device
         (``dataset.augment_on_device``, 'auto': on for accelerators);
  numpy  for a machine without TensorFlow (the GPU machine the accelerator
         check runs on): the same rows gathered with NumPy in the same
         per-epoch order (a permutation from the seed and the epoch), with
         on-device augmentation only, since there the host's whole work per
         batch is that gather;
  auto   tf where TensorFlow imports, else numpy.

  python benchmarks/train_loop.py --model=small_resnet --batch=64 --steps=60
  python benchmarks/train_loop.py --model=resnet50 --batch=128 \\
      --dtype=bfloat16 --steps=60 --out=results/train_loop_<device>.md

``benchmarks/accelerator_check.py --loop`` runs the same measurement next to
its grid of steps.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import types

import bench_util

bench_util.add_repo_to_path()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

import train_step  # pylint: disable=wrong-import-position
from dtq_jax.data import augment  # pylint: disable=wrong-import-position
from dtq_jax.run import train  # pylint: disable=wrong-import-position

FEEDS = ('auto', 'tf', 'numpy')


def loop_config(model, batch, dtype, steps, log_every, augment_on_device):
  """The DTQ 4/4 run config of the loop: one epoch of ``steps`` steps.

  One evaluation batch and the checkpoints at the end, as every epoch of a
  run ends; updates with a non-finite loss (random weights diverge) are
  skipped and counted, not fatal, since they cost the same work.
  """
  image_size = train_step.task(model)[0]
  config = train_step.make_config(model, 'dtq', (4, 4), dtype, {}, batch,
                                  image_size)
  config.steps_per_epoch, config.num_epochs = steps, 1
  config.log_every_steps = log_every
  config.eval_every_epochs, config.max_eval_batches = 1, 1
  config.eval_batch_size = batch
  config.checkpoint_every_steps = 0
  config.on_nonfinite, config.max_nonfinite_fraction = 'skip', 1.0
  config.dataset.augment_on_device = augment_on_device
  return config


class RowData:
  """A task of uint8 pixel rows fed with NumPy: ``datasets.Data``'s interface
  as ``train.train_and_evaluate`` uses it, for a step that augments on the
  device (the host only gathers each batch's rows).

  Attributes:
    train: (images uint8 (N, R, R, C), labels int32 (N,)).
    test: the same for evaluation.
    val: None (no held-out split).
    on_device: True: batches are uint8 pre-crop rows.
  """

  val = None
  on_device = True

  def __init__(self, train_split, test_split, image_size, num_classes):
    self.train, self.test = train_split, test_split
    self._image_size, self.num_classes = image_size, num_classes

  @property
  def num_train(self):
    return len(self.train[1])

  @property
  def image_shape(self):
    return (self._image_size, self._image_size, self.train[0].shape[-1])

  def steps_per_epoch(self, batch_size):
    return self.num_train // batch_size

  def train_batches(self, batch_size, *, seed, start_step=0, process_index=0,
                    process_count=1, on_device=True):
    """Endless batches of this process's rows, epoch by epoch in a
    permutation drawn from ``(seed, epoch)``, from ``start_step`` on."""
    del on_device  # Always uint8 rows.
    images, labels = self.train
    local = batch_size // process_count
    rows = slice(process_index * local, (process_index + 1) * local)
    steps = self.steps_per_epoch(batch_size)
    step = start_step
    while True:
      epoch, in_epoch = divmod(step, steps)
      order = np.random.default_rng((seed, epoch)).permutation(len(labels))
      index = order[in_epoch * batch_size:][:batch_size][rows]
      yield {'image': images[index], 'label': labels[index]}
      step += 1

  def eval_batches(self, split, batch_size, *, process_index=0,
                   process_count=1, on_device=True):
    """One pass over ``split`` in fixed-shape batches, the last one padded
    with its first row (mask 0), as the tf.data pipeline pads."""
    del on_device
    images, labels = split
    local = batch_size // process_count
    for start in range(0, len(labels), batch_size):
      index = np.arange(start, start + batch_size)
      valid = index < len(labels)
      index = np.where(valid, index, start)
      rows = slice(process_index * local, (process_index + 1) * local)
      yield {'image': images[index[rows]], 'label': labels[index[rows]],
             'mask': valid[rows].astype(np.float32)}


def resolve_feed(feed):
  """'tf' or 'numpy' for ``feed`` ('auto': tf where TensorFlow imports)."""
  if feed not in FEEDS:
    raise ValueError(f'feed {feed!r}; allowed: {", ".join(FEEDS)}')
  if feed != 'auto':
    return feed
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except ImportError:
    return 'numpy'
  return 'tf'


def make_data(config, num_train, num_classes, channels, feed, seed=0):
  """The loop's task of random uint8 images, as the ``feed`` delivers it.

  Args:
    config: the loop's config (``dataset``: sizes, statistics,
      ``augment_on_device``).
    num_train: training examples (the test split has one batch of them).
    num_classes: classes of the task.
    channels: image channels.
    feed: 'tf' or 'numpy' (``resolve_feed``).
    seed: seed of the pixels and labels.

  Returns:
    A ``datasets.Data`` ('tf') or a ``RowData`` ('numpy').

  Raises:
    ValueError: the numpy feed without on-device augmentation.
  """
  d = config.dataset
  side = train_step.pre_crop_side(d)
  rs = np.random.RandomState(seed)
  num_test = config.eval_batch_size

  def split(n):
    return (rs.randint(0, 256, (n, side, side, channels)).astype(np.uint8),
            rs.randint(0, num_classes, (n,)).astype(np.int32))

  train_split, test_split = split(num_train), split(num_test)
  on_device = augment.runs_on_device(d)
  if feed == 'numpy':
    if not on_device:
      raise ValueError('the numpy feed delivers uint8 rows for on-device '
                       'augmentation only; dataset.augment_on_device is off '
                       f'here ({d.augment_on_device!r} on '
                       f'{jax.default_backend()}): use --feed=tf')
    return RowData(train_split, test_split, d.image_size, num_classes)
  # TensorFlow only here, so that the numpy feed runs without it.
  from dtq_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from dtq_jax.data import sources  # pylint: disable=g-import-not-at-top
  names = [str(c) for c in range(num_classes)]
  # No resize: the rows are the image cache's pre-crop images already.
  preprocessing = datasets.Preprocessing(
      image_size=d.image_size, mean=tuple(d.mean), std=tuple(d.std),
      crop_padding=d.crop_padding)
  return datasets.Data(sources.Split(*train_split, names),
                       sources.Split(*test_split, names), None, preprocessing,
                       on_device=on_device)


def time_loop(config, data, teacher, seed=0):
  """Runs the loop once in a fresh folder; its images/s and wall time.

  Args:
    config: ``loop_config``'s config.
    data: ``make_data``'s task.
    teacher: the teacher's variables.
    seed: the run's seed.

  Returns:
    ``{'loop_img_per_s'`` (median over the log intervals after the first),
    ``'loop_intervals_img_per_s'`` (every interval, the first compiling),
    ``'loop_wall_s'``, ``'loop_steps'``, ``'on_device'``,
    ``'prefetch_batches'}``.

  Raises:
    ValueError: fewer than two log intervals (``steps < 2 * log_every``).
  """
  if config.steps_per_epoch < 2 * config.log_every_steps:
    raise ValueError(f'{config.steps_per_epoch} steps give fewer than two '
                     f'log intervals of {config.log_every_steps}: the first '
                     'compiles, so nothing would be timed')
  with tempfile.TemporaryDirectory(prefix='train_loop_') as workdir:
    t = time.perf_counter()
    result = train.train_and_evaluate(config, workdir, seed, data, teacher)
    wall = time.perf_counter() - t
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rates = [r['train/images_per_s'] for r in map(json.loads, f)
               if 'train/images_per_s' in r]
  return {'loop_img_per_s': round(float(np.median(rates[1:])), 3),
          'loop_intervals_img_per_s': [round(r, 3) for r in rates],
          'loop_wall_s': round(wall, 1), 'loop_steps': result['steps'],
          'on_device': bool(data.on_device),
          'prefetch_batches': config.prefetch_batches}


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='small_resnet',
                 choices=sorted(train_step.MODELS))
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--dtype', default='float32',
                 choices=('float32', 'bfloat16'))
  p.add_argument('--steps', type=int, default=60,
                 help='loop steps (one epoch); the first log interval, '
                 'which compiles, is not timed')
  p.add_argument('--log_every', type=int, default=10)
  p.add_argument('--feed', default='auto', choices=FEEDS)
  p.add_argument('--augment_on_device', default='auto',
                 choices=('auto', 'on', 'off'))
  p.add_argument('--step_steps', type=int, default=10,
                 help='steps the step alone is timed for')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default=None, help='Markdown report (atomic)')
  return p.parse_args(argv)


def step_alone(args, config, teacher):
  """train_step.py's record of the loop's step alone, its batch on the
  device (uint8 pre-crop when the loop's step augments)."""
  image_size, channels, classes, source = train_step.task(args.model)
  on_device = augment.runs_on_device(config.dataset)
  pre_crop = train_step.pre_crop_size(args.model)
  spec = train_step.VariantSpec(
      'step alone', 'dtq', (4, 4), {}, None,
      (lambda: train_step.uint8_batches(pre_crop)) if on_device else None)
  v = train_step.Variant(
      types.SimpleNamespace(batch=args.batch, dtype=args.dtype,
                            seed=args.seed, lr=None, warmup=args.warmup,
                            dump_hlo=None, image_size=None),
      args.model, spec, teacher, image_size, channels, classes, source)
  v.warm_up()
  v.time_steps(args.step_steps)
  return v.record()


COLUMNS = [
    ('what', 'what'),
    ('img/s', 'img_per_s'),
    ('x step alone', 'x_step'),
    ('feed', 'feed'),
    ('on-device augmentation', 'on_device'),
    ('steps timed', 'steps'),
]


def main(argv=None):
  args = parse_args(argv)
  # As main.py: glibc keeps freed memory ($DTQ_ALLOCATOR overrides).
  allocator = bench_util.configure_allocator('keep')
  feed = resolve_feed(args.feed)
  info = bench_util.machine_info(
      jax=jax.__version__, backend=jax.default_backend(),
      device_kind=jax.devices()[0].device_kind, feed=feed,
      allocator=allocator)
  print('# ' + ', '.join(f'{k}={v}' for k, v in info.items()),
        file=sys.stderr, flush=True)
  config = loop_config(args.model, args.batch, args.dtype, args.steps,
                       args.log_every, args.augment_on_device)
  _, channels, classes, source = train_step.task(args.model)
  teacher = train_step.make_teacher(
      types.SimpleNamespace(seed=args.seed, dtype='float32',
                            batch=args.batch),
      args.model, train_step.task(args.model)[0], channels, classes, source)
  data = make_data(config, 4 * args.batch, classes, channels, feed,
                   args.seed)
  loop = time_loop(config, data, teacher, args.seed)
  alone = step_alone(args, config, teacher)
  base = {'model': args.model, 'batch': args.batch, 'dtype': args.dtype,
          'feed': feed, 'on_device': loop['on_device']}
  records = [
      dict(base, what='training loop (train_and_evaluate)',
           img_per_s=loop['loop_img_per_s'],
           x_step=round(loop['loop_img_per_s'] / alone['img_per_s'], 3),
           steps=args.steps - args.log_every, **loop),
      dict(base, what='step alone (batch on the device)',
           img_per_s=alone['img_per_s'], x_step=1.0, steps=alone['steps'],
           step_ms=alone['step_ms'], compile_s=alone['compile_s']),
  ]
  for rec in records:
    bench_util.emit(rec)
  table = bench_util.markdown_table(records, COLUMNS)
  print(table)
  if args.out:
    bench_util.write_report(
        args.out, f'DTQ training loop against its step ({args.model}, batch '
        f'{args.batch}, {args.dtype}, {jax.default_backend()})', info, table,
        records, [
            f'Loop: median of the loop\'s own images/s over its log '
            f'intervals of {args.log_every} steps after the first (which '
            'compiles), from its metrics.jsonl; the intervals: '
            f'{loop["loop_intervals_img_per_s"]}. Step alone: '
            'train_step.py\'s timing (steps dispatched back to back, one '
            'batch on the device).'])


if __name__ == '__main__':
  main()
