"""Loads the task a config names: its Splits and preprocessing, as a ``Data``.

``load(config)`` turns ``config.dataset`` into a ``Data``: the train, test
(and validation) Splits that ``sources`` reads and ``splits`` divides, plus
the task's ``Preprocessing``. ``Data``'s methods give its batches through
``input_pipeline``, so the trainer never looks at dataset names nor imports
the pipeline. With ``dataset.cache`` on, the splits are decoded and resized
once (``image_cache``) on the first request for their batches; with
``dataset.augment_on_device`` on, ``Data.on_device`` tells the trainer to ask
for uint8 batches that its step crops, flips and normalises.
"""

import dataclasses
import os
from typing import Optional, Tuple

import jax

from dtq_jax.data import augment
from dtq_jax.data import image_cache
from dtq_jax.data import input_pipeline
from dtq_jax.data import sources
from dtq_jax.data import splits
from dtq_jax.infra import caches
from dtq_jax.infra import errors


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How a task's images become network inputs (see ``input_pipeline``).

  Attributes:
    image_size: side of the square crops the network sees.
    resize_to: side that images are resized to before cropping; None: no
      resize (fixed-size pixel arrays only).
    mean: per-channel mean on the 0..1 scale (1 or C values).
    std: per-channel standard deviation on the 0..1 scale.
    crop_padding: zero padding on each side before the random training crop.
  """
  image_size: int
  resize_to: Optional[int] = None
  mean: Tuple[float, ...] = input_pipeline.IMAGENET_MEAN
  std: Tuple[float, ...] = input_pipeline.IMAGENET_STD
  crop_padding: int = 0

  def __post_init__(self):
    # Frozen: assign the normalised fields through object.__setattr__.
    object.__setattr__(self, 'mean', tuple(self.mean))
    object.__setattr__(self, 'std', tuple(self.std))


@dataclasses.dataclass
class Data:
  """One task's splits and preprocessing, and the batches they give.

  Attributes:
    train: training Split.
    test: test Split.
    val: held-out validation Split (None under the paper's protocol).
    preprocessing: how the images become network inputs.
    source: the demo's source task (a ``Data``), else None.
    cache: ``image_cache`` mode of the splits: 'auto', 'memory', 'disk' or
      'none'.
    cache_dir: folder of the image cache files.
    on_device: whether the trainer's steps crop, flip and normalise (it then
      asks for batches with ``on_device=True``).
  """
  train: sources.Split
  test: sources.Split
  val: Optional[sources.Split]
  preprocessing: Preprocessing
  source: Optional['Data'] = None
  cache: str = 'none'
  cache_dir: str = ''
  on_device: bool = False
  # id(split) -> the split with its images decoded once (or itself).
  _decoded: dict = dataclasses.field(default_factory=dict, init=False,
                                     repr=False, compare=False)

  @property
  def num_train(self):
    return len(self.train)

  @property
  def num_classes(self):
    return self.train.num_classes

  @property
  def image_shape(self):
    size = self.preprocessing.image_size
    return (size, size, self.train.channels)

  def _prepared(self, split, what):
    """``split`` and its resize, through the image cache (once per split)."""
    resize_to = self.preprocessing.resize_to
    if self.cache == 'none' or not image_cache.needs_cache(split, resize_to):
      return split, resize_to
    if id(split) not in self._decoded:
      self._decoded[id(split)] = (split, image_cache.cached_split(
          split, resize_to, self.cache, self.cache_dir, what))
    decoded = self._decoded[id(split)][1]
    return decoded, None if decoded is not split else resize_to

  def train_batches(self, batch_size, *, seed, start_step=0, process_index=0,
                    process_count=1, on_device=False):
    """The endless, augmented training stream of ``train``.

    Args:
      batch_size: global batch size.
      seed: non-negative integer; with ``start_step`` it fixes every batch.
      start_step: first global step to yield (resumes the identical stream).
      process_index: this process's index.
      process_count: number of processes; each gets its rows of every global
        batch.
      on_device: uint8 pre-crop images for a step that augments them.

    Returns:
      An iterator of {'image': float32 (b, S, S, C), 'label': int32 (b,)},
      b = batch_size // process_count (see ``input_pipeline.train_batches``);
      the same images, order, crops and flips with or without the cache.
    """
    p = self.preprocessing
    split, resize_to = self._prepared(self.train, 'the training split')
    return input_pipeline.train_batches(
        split, batch_size, p.image_size, seed, resize_to=resize_to,
        mean=p.mean, std=p.std, start_step=start_step,
        crop_padding=p.crop_padding, process_index=process_index,
        process_count=process_count, on_device=on_device)

  def eval_batches(self, split, batch_size, *, process_index=0,
                   process_count=1, on_device=False):
    """One ordered pass over ``split`` in fixed-shape, masked batches.

    Args:
      split: one of this Data's Splits (``train``, ``val`` or ``test``).
      batch_size: global batch size.
      process_index: this process's index.
      process_count: number of processes.
      on_device: uint8 pre-crop images for a step that centre-crops them.

    Returns:
      An iterator of {'image', 'label', 'mask'} over
      ``num_eval_batches(split, batch_size)`` batches (see
      ``input_pipeline.eval_batches``).
    """
    p = self.preprocessing
    what = 'the test split' if split is self.test else 'an evaluation split'
    split, resize_to = self._prepared(split, what)
    return input_pipeline.eval_batches(
        split, batch_size, p.image_size, resize_to=resize_to, mean=p.mean,
        std=p.std, process_index=process_index, process_count=process_count,
        on_device=on_device)

  def steps_per_epoch(self, batch_size):
    """Full training batches per epoch: floor(num_train / batch_size)."""
    return input_pipeline.steps_per_epoch(self.num_train, batch_size)

  def num_eval_batches(self, split, batch_size):
    """Batches that ``eval_batches(split, batch_size)`` yields."""
    return input_pipeline.eval_num_batches(len(split), batch_size)


def _data(d, train, test, source=None, holdout=True):
  """Wraps splits with the preprocessing of ``config.dataset`` ``d``."""
  val = None
  if holdout and d.val_fraction:
    train, val = splits.split_validation(train, d.val_fraction, d.data_seed)
  preprocessing = Preprocessing(
      image_size=d.image_size, resize_to=d.resize_to or None,
      mean=tuple(d.mean), std=tuple(d.std), crop_padding=d.crop_padding)
  return Data(train, test, val, preprocessing, source)


def load(config):
  """Loads the splits of ``config.dataset``.

  Args:
    config: a validated run config.

  Returns:
    A ``Data``; for Fashion-MNIST, ``source`` holds the source task.

  Raises:
    ConfigError: the training split is smaller than one batch, or the images
      do not fit ``dataset.image_size`` / ``dataset.resize_to``.
  """
  cache, cache_dir, on_device = _speed_settings(config)
  with errors.user_errors(f'dataset {config.dataset.name}'):
    data = _load(config.dataset)
  for task in (data, data.source):
    if task is not None:
      _check_image_size(config.dataset, task)
      task.cache, task.cache_dir, task.on_device = cache, cache_dir, on_device
  if data.num_train < config.batch_size:
    raise errors.ConfigError(
        'batch_size', config.batch_size,
        f'the training split has only {data.num_train} images; use a batch '
        'size at most that.')
  return data


def _check_image_size(d, data):
  """The crops fit the images: a config error now, not at the first batch."""
  for split in (data.train, data.test, data.val):
    if split is None or d.resize_to:
      continue
    if split.is_encoded:
      raise errors.ConfigError(
          'dataset.resize_to', d.resize_to,
          f'the images of dataset.name={d.name!r} are files of varying '
          'sizes; allowed: an integer >= dataset.image_size.')
    height, width = split.images.shape[1:3]
    if min(height, width) < d.image_size:
      raise errors.ConfigError(
          'dataset.image_size', d.image_size,
          f'the images of dataset.name={d.name!r} are {height}x{width}; '
          f'allowed: at most {min(height, width)}, or set dataset.resize_to '
          '(>= image_size) to resize them first.')


def _speed_settings(config):
  """``(cache mode, cache folder, on_device)`` from ``config.dataset``.

  Raises:
    ConfigError: an unknown ``dataset.cache`` or ``augment_on_device``.
  """
  d = config.dataset
  cache = d.get('cache', 'none')
  if cache not in image_cache.MODES:
    raise errors.ConfigError('dataset.cache', cache,
                             f'allowed: {", ".join(image_cache.MODES)}.')
  if cache == 'auto' and jax.process_count() > 1:
    # Processes on one host (one per GPU) would each hold a copy in memory;
    # a memory-mapped file is one copy in the page cache that all share.
    cache = 'disk'
  cache_dir = d.get('cache_dir') or os.path.join(caches.root(config), 'images')
  return cache, cache_dir, augment.runs_on_device(d)


def _load(d):
  """Splits of ``config.dataset`` ``d``."""
  if d.name == 'fashion_mnist':
    kind = d.get('split', 'out_of_domain')
    if kind == 'in_domain':
      s = splits.fashion_mnist_in_domain_splits(
          d.data_dir or None, tuple(d.source_classes),
          tuple(d.target_classes), d.teacher_per_class, d.shots_per_class,
          d.data_seed, d.teacher_seed)
    elif kind == 'out_of_domain':
      s = splits.fashion_mnist_transfer_splits(
          d.data_dir or None, tuple(d.source_classes),
          tuple(d.target_classes), d.shots_per_class, d.data_seed)
    else:
      raise ValueError(f'dataset.split={kind!r}; allowed: out_of_domain, '
                       'in_domain')
    source = _data(d, s['source_train'], s['source_test'], holdout=False)
    data = _data(d, s['target_train'], s['target_test'], source=source)
  elif d.name == 'image_folder':
    train, test = splits.image_folder_splits(
        d.root, d.train_per_class or None, d.test_per_class or None,
        seed=d.data_seed)
    data = _data(d, train, test)
  else:
    train, test = splits.tfds_splits(
        d.name, data_dir=d.data_dir or None,
        train_per_class=d.train_per_class or None, seed=d.data_seed)
    data = _data(d, train, test)
  return data


def source_fingerprint(d):
  """Identifies the demo's image files (names, sizes, times) for caching."""
  root = d.data_dir or sources.FASHION_MNIST_DIR
  if not os.path.isdir(root):
    return 'tfds:fashion_mnist'
  return sorted((name, os.path.getsize(os.path.join(root, name)),
                 int(os.path.getmtime(os.path.join(root, name))))
                for name in os.listdir(root) if name.endswith('.gz'))
