"""Data sources and tf.data input pipelines for the target tasks.

Two layers:

* **Sources** build a ``Split`` (images + int32 labels + class names) for a
  train or test set: an image folder (Caltech-256, MIT Indoor 67, ...), a TFDS
  dataset (CUB-200-2011, Stanford Dogs, Food-101) or the Fashion-MNIST idx
  files of the offline demo. Per-class subsampling (Caltech 256-30/60, the
  10/20/40 ablation, few-shot targets) is index arithmetic on ``Split.labels``
  and never touches pixels.
* **Pipelines** (``train_batches``, ``eval_batches``) turn a ``Split`` into an
  iterator of numpy batches through tf.data on the host.

``Split.images`` has one of three forms:

* ``list[str]``: image file paths, read and decoded in the pipeline;
* ``np.ndarray`` of dtype ``object`` holding ``bytes``: encoded image files
  kept in memory. TFDS datasets are loaded this way (``SkipDecoding``): it
  costs about the dataset's size on disk in host memory (CUB ~1.1 GB, Stanford
  Dogs ~0.8 GB, Food-101 ~4.7 GB, plus one more copy while a pipeline holds it
  as a tf.string tensor) but, unlike a reference to the TFDS record files,
  gives random access, so subsets, reshuffling and exact resume work by index
  exactly as for folders, and nothing is ever decoded into full-size pixels;
* ``np.ndarray`` of dtype ``uint8``, shape ``(N, H, W, C)``: decoded pixels
  (Fashion-MNIST).

Images read from files or bytes are always delivered as 3-channel RGB (the
pretrained networks are RGB): grayscale is replicated and alpha dropped, as
PIL's ``convert('RGB')`` in the authors' loader does. Unreadable files are
found once, when the ``Split`` is built (every image is decoded once; JPEGs at
1/8 scale, which still reads all their entropy-coded data), then dropped and
listed in ``Split.skipped``; the pipelines therefore never fail mid-epoch.

The training stream is a pure function of ``(seed, position)``: epoch ``e`` is
a permutation drawn from ``(seed, e)``, and the random crop and flip of the
example at stream position ``p`` use stateless ops seeded with ``(seed, p)``.
``start_step`` therefore resumes exactly where a checkpoint stopped, skipping
on the index level without decoding anything, and slicing a global batch
across processes changes nothing about its content.
"""

import dataclasses
import functools
import gzip
import math
import os
import socket
import struct
import urllib.parse
import urllib.request
import zlib
from typing import Union

from absl import logging
import numpy as np
import tensorflow as tf

# Per-channel statistics on the 0..1 scale that the pretrained torchvision
# networks were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pixel mean and standard deviation of the 60000 Fashion-MNIST training
# images on the 0..1 scale (computed from train-images-idx3-ubyte.gz; the
# demo's networks are trained from scratch on the source classes, so the
# whole-dataset statistics are used for source and target alike).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                         'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
_FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
# idx magic numbers: 0x08 = unsigned byte data, then the number of dimensions.
_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
# How many skipped file names go into the log line.
_MAX_LOGGED_PATHS = 5

# Tags that keep the random streams of different purposes independent even
# when they share the user's seed.
_SHUFFLE_STREAM = 1
_CLASS_SPLIT_STREAM = 2
_VALIDATION_STREAM = 3
_AUGMENT_STREAM = 4


@dataclasses.dataclass(frozen=True)
class TfdsDataset:
  """How one TFDS dataset maps onto the paper's train/test splits."""
  train_split: str
  test_split: str
  description: str


# The paper's TFDS-hosted target tasks. Food-101 calls its test split
# 'validation'; the others use the official train/test split.
TFDS_DATASETS = {
    'caltech_birds2011': TfdsDataset('train', 'test',
                                     'CUB-200-2011, official 5994 / 5794'),
    'stanford_dogs': TfdsDataset('train', 'test',
                                 'Stanford Dogs 120, official 12000 / 8580'),
    'food101': TfdsDataset('train', 'validation',
                           'Food-101, official 750 / 250 per class'),
}

Images = Union[list, np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One labelled set of images (see the module docstring for ``images``).

  Attributes:
    images: file paths, encoded image bytes (object array) or uint8 pixels
      (N, H, W, C).
    labels: (N,) int32 class indices into ``class_names``.
    class_names: the names of all classes of the task (also those that a
      subset may lack).
    skipped: files (or TFDS records) dropped because they could not be
      decoded.
  """
  images: Images
  labels: np.ndarray
  class_names: list
  skipped: tuple = ()

  def __post_init__(self):
    labels = np.asarray(self.labels)
    if labels.ndim != 1 or (labels.size and
                            not np.issubdtype(labels.dtype, np.integer)):
      raise ValueError(f'labels must be a 1-D integer array, got dtype '
                       f'{labels.dtype} shape {labels.shape}')
    # Frozen: assign the normalised fields through object.__setattr__.
    object.__setattr__(self, 'labels', labels.astype(np.int32))
    object.__setattr__(self, 'class_names', list(self.class_names))
    object.__setattr__(self, 'skipped', tuple(self.skipped))
    if isinstance(self.images, np.ndarray):
      if self.images.dtype == np.uint8:
        if self.images.ndim != 4:
          raise ValueError(f'uint8 images must be (N, H, W, C), got shape '
                           f'{self.images.shape}')
      elif self.images.dtype != object or self.images.ndim != 1:
        raise ValueError(f'images must be uint8 (N, H, W, C) or a 1-D object '
                         f'array of encoded bytes, got {self.images.dtype} '
                         f'{self.images.shape}')
    elif isinstance(self.images, (list, tuple)):
      object.__setattr__(self, 'images', [str(p) for p in self.images])
    else:
      raise ValueError(f'images must be a list of paths or a numpy array, got '
                       f'{type(self.images).__name__}')
    if len(self.images) != len(self.labels):
      raise ValueError(f'{len(self.images)} images but {len(self.labels)} '
                       f'labels')
    if self.labels.size and not (
        0 <= self.labels.min() and self.labels.max() < len(self.class_names)):
      raise ValueError(f'labels must lie in 0..{len(self.class_names) - 1}, '
                       f'got {self.labels.min()}..{self.labels.max()}')

  def __len__(self):
    return len(self.labels)

  @property
  def num_classes(self):
    return len(self.class_names)

  @property
  def is_encoded(self):
    """Whether images are decoded in the pipeline (paths or bytes)."""
    return not (isinstance(self.images, np.ndarray) and
                self.images.dtype == np.uint8)

  @property
  def channels(self):
    """Channels the pipelines deliver: RGB for files and bytes."""
    return 3 if self.is_encoded else int(self.images.shape[-1])

  @functools.cached_property
  def images_tensor(self):
    """The images as one tf.Tensor (uint8 pixels or tf.string paths/bytes).

    Converted once per Split and shared by all its pipelines, so that e.g.
    evaluating every epoch does not copy Food-101's test bytes again.
    """
    if self.is_encoded:
      return tf.constant(self.images, tf.string)
    return tf.constant(self.images)

  def subset(self, indices):
    """Returns the examples at ``indices`` (in that order) as a new Split.

    Args:
      indices: integer indices into this split.

    Returns:
      A Split with the same class names; ``skipped`` is kept.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if isinstance(self.images, np.ndarray):
      images = self.images[indices]
    else:
      images = [self.images[i] for i in indices]
    return Split(images, self.labels[indices], self.class_names, self.skipped)


def _rng(*keys):
  """A numpy Generator keyed by non-negative integers (purpose, seed, ...)."""
  return np.random.default_rng([int(k) % 2**63 for k in keys])


def _one_line(text):
  return ' '.join(str(text).split())


# --------------------------------------------------------------------------
# Per-class sampling.


def _class_permutations(labels, seed, stream):
  """Maps each class present in ``labels`` to its indices, shuffled.

  Each class has its own random stream keyed by (stream, seed, class), so a
  class's draw does not depend on which other classes exist or how big they
  are.
  """
  labels = np.asarray(labels)
  perms = {}
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    perms[int(c)] = idx[_rng(stream, seed, c).permutation(len(idx))]
  return perms


def per_class_subset(labels, per_class, seed):
  """Draws ``per_class`` examples of every class present in ``labels``.

  The draw for a class is the first ``per_class`` entries of a per-class
  permutation that depends only on (seed, class), so with one seed the
  10/20/30/40/60-per-class training sets are nested.

  Args:
    labels: (N,) integer labels.
    per_class: examples to take from each class, >= 1.
    seed: non-negative integer.

  Returns:
    Sorted int64 indices into ``labels``, ``per_class`` per class.

  Raises:
    ValueError: if per_class < 1 or a class has fewer examples.
  """
  if int(per_class) < 1:
    raise ValueError(f'per_class must be >= 1, got {per_class}')
  chosen = []
  for c, perm in _class_permutations(labels, seed, _CLASS_SPLIT_STREAM).items():
    if len(perm) < per_class:
      raise ValueError(f'class {c} has {len(perm)} examples, fewer than '
                       f'per_class={per_class}')
    chosen.append(perm[:per_class])
  if not chosen:
    return np.zeros((0,), np.int64)
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def split_validation(split, fraction, seed):
  """Holds out a stratified validation set from ``split``.

  Every class gives ``max(1, round(fraction * n_class))`` examples to the
  validation set and keeps at least one for training.

  Args:
    split: the Split to divide.
    fraction: in (0, 1).
    seed: non-negative integer.

  Returns:
    (train, val) Splits, each in the original order.

  Raises:
    ValueError: for a fraction outside (0, 1) or a class with fewer than two
      examples.
  """
  if not 0 < fraction < 1:
    raise ValueError(f'fraction must be in (0, 1), got {fraction}')
  train_idx, val_idx = [], []
  perms = _class_permutations(split.labels, seed, _VALIDATION_STREAM)
  for c, perm in perms.items():
    n_val = max(1, int(round(fraction * len(perm))))
    if len(perm) - n_val < 1:
      raise ValueError(f'class {c} ({split.class_names[c]}) has {len(perm)} '
                       f'example(s), too few to hold out a validation example')
    val_idx.append(perm[:n_val])
    train_idx.append(perm[n_val:])
  return (split.subset(np.sort(np.concatenate(train_idx))),
          split.subset(np.sort(np.concatenate(val_idx))))


# --------------------------------------------------------------------------
# Decoding and validation of encoded images.


def _decode_rgb(encoded):
  """Decodes one image file's bytes to uint8 (H, W, 3) RGB.

  JPEGs use the accurate integer DCT (as PIL does) and let libjpeg/TF
  convert grayscale and CMYK to RGB. Other formats go through
  ``decode_image`` (first frame of a GIF) and are converted as PIL's
  ``convert('RGB')`` does: gray replicated, alpha dropped.
  """

  def other():
    img = tf.io.decode_image(encoded, expand_animations=False)
    # 1 (gray) or 2 (gray + alpha) channels: replicate gray; 3 or 4: RGB(A).
    return tf.cond(tf.shape(img)[-1] >= 3, lambda: img[..., :3],
                   lambda: tf.tile(img[..., :1], [1, 1, 3]))

  img = tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3,
                                dct_method='INTEGER_ACCURATE'),
      other)
  img.set_shape([None, None, 3])
  return img


def _check_decodable(encoded):
  """Decodes cheaply enough to validate a whole dataset up front."""
  # JPEG at 1/8 scale skips most of the inverse DCT but still parses all the
  # entropy-coded data, so truncation and corruption are caught.
  return tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.shape(tf.io.decode_jpeg(encoded, ratio=8)),
      lambda: tf.shape(tf.io.decode_image(encoded, expand_animations=False)))


def _readable_mask(images):
  """Returns a bool mask of the paths/bytes in ``images`` that decode."""
  n = len(images)
  ok = np.zeros(n, bool)
  if not n:
    return ok
  is_paths = isinstance(images, list)
  data = tf.data.Dataset.from_tensor_slices(
      (np.arange(n, dtype=np.int64),
       np.asarray(images, dtype=object if not is_paths else str)))

  def check(i, source):
    encoded = tf.io.read_file(source) if is_paths else source
    shape = _check_decodable(encoded)
    # A zero-sized image would decode but cannot be resized.
    with tf.control_dependencies(
        [tf.debugging.assert_positive(tf.reduce_prod(shape[:2]))]):
      return tf.identity(i)

  # Any error (unreadable file, corrupt data) drops that element; the
  # survivors' indices are the readable images. Order does not matter here.
  data = data.map(check, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=False)
  data = data.ignore_errors(log_warning=False).batch(4096)
  for good in data.as_numpy_iterator():
    ok[good] = True
  return ok


def _drop_unreadable(images, labels, what):
  """Validates encoded images; returns (images, labels, skipped names)."""
  ok = _readable_mask(images)
  if ok.all():
    return images, labels, ()
  bad = np.flatnonzero(~ok)
  if isinstance(images, list):
    skipped = tuple(images[i] for i in bad)
    images = [p for p, good in zip(images, ok) if good]
  else:
    skipped = tuple(f'{what}[{i}]' for i in bad)
    images = images[ok]
  logging.warning('Skipped %d unreadable image(s) of %d in %s, e.g. %s',
                  len(bad), len(ok), what,
                  ', '.join(skipped[:_MAX_LOGGED_PATHS]))
  if not len(images):
    raise ValueError(f'no readable images left in {what} '
                     f'({len(bad)} unreadable)')
  return images, labels[ok], skipped


# --------------------------------------------------------------------------
# Image folders.


def _list_classes(root):
  classes = sorted(e.name for e in os.scandir(root)
                   if e.is_dir() and not e.name.startswith('.'))
  if not classes:
    raise ValueError(f'image folder {root} has no class subfolders')
  return classes


def _list_images(class_dir):
  """Image files directly inside ``class_dir`` (subfolders are ignored)."""
  return sorted(
      e.path for e in os.scandir(class_dir)
      if e.is_file() and not e.name.startswith('.') and
      os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)


def _read_folder(root, classes, validate):
  """Reads ``root/<class>/<image>`` for the given classes into a Split."""
  paths, labels = [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(root, name)
    if not os.path.isdir(class_dir):
      raise FileNotFoundError(f'class folder {class_dir} is missing')
    files = _list_images(class_dir)
    paths.extend(files)
    labels.extend([label] * len(files))
  labels = np.asarray(labels, np.int32)
  skipped = ()
  if validate:
    paths, labels, skipped = _drop_unreadable(paths, labels, root)
  counts = np.bincount(labels, minlength=len(classes))
  for label, name in enumerate(classes):
    if not counts[label]:
      raise ValueError(f'class folder {os.path.join(root, name)} has no '
                       f'readable images ({"/".join(IMAGE_EXTENSIONS)})')
  return Split(paths, labels, list(classes), skipped)


def _check_class_sizes(split, root, needed, what):
  counts = np.bincount(split.labels, minlength=split.num_classes)
  for label, name in enumerate(split.class_names):
    if counts[label] < needed:
      raise ValueError(f'class folder {os.path.join(root, name)} has '
                       f'{counts[label]} readable images, fewer than {what} '
                       f'= {needed}')


def image_folder_splits(root, train_per_class=None, test_per_class=None,
                        seed=0, *, validate=True):
  """Train and test Splits from an image folder.

  Two layouts:

  * ``root/<class>/<image>``: each class is split at random (keyed by seed
    and class): train takes the first ``train_per_class`` images of the
    class's permutation, test the *last* ``test_per_class`` (all the
    remaining ones if None), the rest is unused. Taking test from the end
    keeps the test set fixed when only ``train_per_class`` changes
    (Caltech 256-10/20/30/40/60 with one seed share their 20 test images per
    class, and their training sets are nested).
  * ``root/train/<class>/...`` and ``root/test/<class>/...`` (the layout is
    detected by ``root/train`` and ``root/test`` both being folders): the
    official split; ``train_per_class`` / ``test_per_class`` subsample each
    side per class.

  Classes are the subfolder names, sorted; images are files with the
  extensions in ``IMAGE_EXTENSIONS`` (any case) directly inside a class
  folder. Unreadable images are skipped (logged, listed in ``skipped``)
  before any counting or splitting.

  Args:
    root: the folder.
    train_per_class: training images per class; None: all (official layout)
      or all but the test images.
    test_per_class: test images per class; None: all (official layout) or
      all that are not training images.
    seed: non-negative integer for the per-class draws.
    validate: decode every image once to find unreadable ones (set False
      only for data known to be clean; a corrupt file then fails the
      pipeline when it is reached).

  Returns:
    (train, test) Splits of file paths.

  Raises:
    FileNotFoundError: root (or an official-layout class folder) is missing.
    ValueError: no classes, a class without readable images, a class with
      too few images for the requested counts, mismatched train/test classes.
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'image folder {root} does not exist')
  train_dir, test_dir = os.path.join(root, 'train'), os.path.join(root, 'test')
  if os.path.isdir(train_dir) and os.path.isdir(test_dir):
    classes = _list_classes(train_dir)
    test_classes = _list_classes(test_dir)
    if test_classes != classes:
      diff = sorted(set(classes) ^ set(test_classes))
      raise ValueError(f'{train_dir} and {test_dir} have different classes, '
                       f'e.g. {diff[0]}')
    train = _read_folder(train_dir, classes, validate)
    test = _read_folder(test_dir, classes, validate)
    if train_per_class is not None:
      _check_class_sizes(train, train_dir, train_per_class, 'train_per_class')
      train = train.subset(per_class_subset(train.labels, train_per_class,
                                            seed))
    if test_per_class is not None:
      _check_class_sizes(test, test_dir, test_per_class, 'test_per_class')
      test = test.subset(per_class_subset(test.labels, test_per_class, seed))
    return train, test

  if train_per_class is None and test_per_class is None:
    raise ValueError(f'image folder {root} has no train/ and test/ '
                     f'subfolders, so train_per_class or test_per_class must '
                     f'be given to split it')
  for name, value in (('train_per_class', train_per_class),
                      ('test_per_class', test_per_class)):
    if value is not None and int(value) < 1:
      raise ValueError(f'{name} must be >= 1, got {value}')
  data = _read_folder(root, _list_classes(root), validate)
  n_train, n_test = train_per_class or 0, test_per_class or 0
  # Each side needs at least one image when its count is left open.
  needed = max(n_train, 1) + max(n_test, 1)
  what = (f'{"train_per_class" if train_per_class else "1"} + '
          f'{"test_per_class" if test_per_class else "1"}')
  _check_class_sizes(data, root, needed, what)
  train_idx, test_idx = [], []
  for perm in _class_permutations(data.labels, seed,
                                  _CLASS_SPLIT_STREAM).values():
    train_end = n_train if train_per_class else len(perm) - n_test
    test_start = len(perm) - n_test if test_per_class else n_train
    train_idx.append(perm[:train_end])
    test_idx.append(perm[test_start:])
  return (data.subset(np.sort(np.concatenate(train_idx))),
          data.subset(np.sort(np.concatenate(test_idx))))


# --------------------------------------------------------------------------
# TFDS.


def _tfds_builder(name, data_dir):
  """A prepared TFDS builder, or a one-line error saying how to get one."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'cannot open TFDS dataset {name!r}: '
                     f'{_one_line(e)[:200]}') from e
  if not builder.is_prepared():
    try:
      # Offline, TFDS's downloader retries each file for minutes before it
      # gives up; a failed connection to the download hosts says so at once.
      _check_reachable(builder.url_infos or {})
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      where = data_dir or 'the default TFDS data dir'
      raise FileNotFoundError(
          f'TFDS dataset {name!r} is not prepared in {where} and could not be '
          f'downloaded ({type(e).__name__}: {_one_line(e)[:160]}); prepare it '
          f'on a machine with internet (tfds build {name} --data_dir DIR), '
          f'copy DIR here and pass it as --config.dataset.data_dir') from e
  return builder


def _check_reachable(urls, timeout=10.0):
  """Raises ConnectionError unless a TCP connection to each URL's host opens.

  Skipped when a proxy is configured (the hosts may then be reachable only
  through it).

  Args:
    urls: download URLs.
    timeout: seconds per connection attempt.
  """
  if urllib.request.getproxies():
    return
  hosts = {}
  for url in urls:
    parts = urllib.parse.urlsplit(url)
    if parts.hostname:
      hosts[parts.hostname] = parts.port or (
          443 if parts.scheme == 'https' else 80)
  for host, port in hosts.items():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
      raise ConnectionError(f'cannot reach {host}:{port} (offline?): '
                            f'{_one_line(e)[:80]}') from e


def _tfds_read(builder, split, encoded=True):
  """Reads one TFDS split as (images, int32 labels), in stored order.

  Args:
    builder: a prepared TFDS builder.
    split: split name.
    encoded: keep images as encoded bytes (object array); else decode them
      (fixed-size images only) into a uint8 array.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # Only image and label are read: other features (CUB's segmentation masks,
  # Dogs' boxes) are never decoded.
  decoders = tfds.decode.PartialDecoding(
      {'image': True, 'label': True},
      decoders={'image': tfds.decode.SkipDecoding()} if encoded else None)
  data = builder.as_dataset(split=split, decoders=decoders,
                            shuffle_files=False)
  images, labels = [], []
  # Batches rather than batch_size=-1 (one huge get_single_element), which
  # also keeps the peak memory of large splits down.
  for batch in tfds.as_numpy(data.batch(1024)):
    images.append(np.asarray(batch['image'],
                             dtype=object if encoded else np.uint8))
    labels.append(batch['label'])
  if not images:
    raise ValueError(f'TFDS split {builder.name}/{split} is empty')
  return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def tfds_splits(name, data_dir=None, train_split=None, test_split=None,
                train_per_class=None, seed=0, *, validate=True):
  """Train and test Splits of a TFDS image classification dataset.

  Images are kept encoded in memory (see the module docstring); the record
  files are read once, in their stored order, so indices are stable.

  Args:
    name: TFDS name, e.g. one of ``TFDS_DATASETS``.
    data_dir: TFDS data directory (None: TFDS's default). If the dataset is
      not prepared there, TFDS tries to download it.
    train_split: TFDS split for training; None: from ``TFDS_DATASETS``, else
      'train'.
    test_split: TFDS split for testing; None: from ``TFDS_DATASETS`` (e.g.
      'validation' for food101), else 'test'.
    train_per_class: if given, subsample the training split per class.
    seed: non-negative integer for the subsample.
    validate: decode every image once and drop unreadable ones.

  Returns:
    (train, test) Splits whose images are encoded bytes.

  Raises:
    FileNotFoundError: the dataset is neither prepared nor downloadable.
    ValueError: unknown dataset, empty split, too few images per class.
  """
  spec = TFDS_DATASETS.get(name, TfdsDataset('train', 'test', name))
  builder = _tfds_builder(name, data_dir)
  class_names = list(builder.info.features['label'].names)
  splits = []
  for split in (train_split or spec.train_split,
                test_split or spec.test_split):
    images, labels = _tfds_read(builder, split)
    skipped = ()
    if validate:
      images, labels, skipped = _drop_unreadable(images, labels,
                                                 f'tfds:{name}/{split}')
    splits.append(Split(images, labels, class_names, skipped))
  train, test = splits
  if train_per_class is not None:
    train = train.subset(per_class_subset(train.labels, train_per_class, seed))
  return train, test


# --------------------------------------------------------------------------
# Fashion-MNIST.


def _read_idx(path, magic, dims):
  """Reads a gzipped idx file, checking magic number and sizes."""
  try:
    with gzip.open(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise ValueError(f'{path} is not a readable gzip file '
                     f'({_one_line(e)})') from e
  header = 4 + 4 * dims
  if len(data) < header:
    raise ValueError(f'{path} is truncated: {len(data)} bytes, shorter than '
                     f'the {header}-byte idx header')
  (found,) = struct.unpack('>I', data[:4])
  if found != magic:
    raise ValueError(f'{path} has idx magic number 0x{found:08x}, expected '
                     f'0x{magic:08x}')
  shape = struct.unpack(f'>{dims}I', data[4:header])
  size = math.prod(shape)
  if len(data) - header != size:
    raise ValueError(f'{path} holds {len(data) - header} data bytes but its '
                     f'header declares shape {shape} ({size} bytes)')
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _fashion_mnist_idx(data_dir):
  """Reads the four idx files; returns None if none of them exists."""
  paths = {part: [os.path.join(data_dir, f) for f in files]
           for part, files in _FASHION_MNIST_FILES.items()}
  exist = [os.path.exists(p) for ps in paths.values() for p in ps]
  if not any(exist):
    return None
  if not all(exist):
    missing = [p for ps in paths.values() for p in ps if not os.path.exists(p)]
    raise FileNotFoundError(f'Fashion-MNIST file {missing[0]} is missing '
                            f'(the folder needs all four idx .gz files)')
  out = {}
  for part, (image_path, label_path) in paths.items():
    images = _read_idx(image_path, _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(label_path, _IDX_LABELS_MAGIC, 1)
    if images.shape[1:] != (28, 28):
      raise ValueError(f'{image_path} holds {images.shape[1]}x'
                       f'{images.shape[2]} images, expected 28x28')
    if len(images) != len(labels):
      raise ValueError(f'{label_path} has {len(labels)} labels but '
                       f'{image_path} has {len(images)} images')
    if labels.size and labels.max() > 9:
      raise ValueError(f'{label_path} has label {labels.max()}, expected '
                       f'0..9')
    out[part] = Split(images[..., None].copy(), labels.astype(np.int32),
                      list(FASHION_MNIST_CLASSES))
  return out


def _fashion_mnist_tfds(data_dir):
  builder = _tfds_builder('fashion_mnist', data_dir)
  out = {}
  for part in ('train', 'test'):
    images, labels = _tfds_read(builder, part, encoded=False)
    out[part] = Split(images, labels, list(FASHION_MNIST_CLASSES))
  return out


def fashion_mnist_arrays(data_dir=None, *, tfds_data_dir=None):
  """Fashion-MNIST train and test images in memory.

  Reads the four idx .gz files from ``data_dir``; if none of them is there,
  falls back to TFDS ``fashion_mnist`` (prepared in ``tfds_data_dir`` or
  downloaded).

  Args:
    data_dir: folder with the idx files (None: ``FASHION_MNIST_DIR``, the
      Debian package's location).
    tfds_data_dir: TFDS data directory for the fallback.

  Returns:
    {'train': Split, 'test': Split} with uint8 (N, 28, 28, 1) images and
    int32 labels.

  Raises:
    ValueError: a corrupt or truncated idx file (named).
    FileNotFoundError: one of the four files is missing, or neither the
      files nor TFDS are available.
  """
  data_dir = os.fspath(data_dir or FASHION_MNIST_DIR)
  arrays = _fashion_mnist_idx(data_dir)
  if arrays is not None:
    return arrays
  logging.info('No Fashion-MNIST idx files in %s; trying TFDS.', data_dir)
  try:
    return _fashion_mnist_tfds(tfds_data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise FileNotFoundError(
        f'Fashion-MNIST not found: no idx files in {data_dir} and TFDS failed '
        f'({type(e).__name__}); install them (apt-get install '
        f'dataset-fashion-mnist), pass a folder with the four idx .gz files '
        f'as --config.dataset.data_dir, or let TFDS download fashion_mnist '
        f'once with internet') from e


def _check_classes(field, classes):
  classes = list(classes)
  if not classes:
    raise ValueError(f'{field} must not be empty')
  for c in classes:
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not (
        0 <= c <= 9):
      raise ValueError(f'{field} must hold class indices in 0..9, got {c!r}')
  if len(set(classes)) != len(classes):
    raise ValueError(f'{field} has duplicates: {classes}')
  return [int(c) for c in classes]


def _remap(split, classes):
  """Examples of ``classes`` (in data order), labels renumbered 0..k-1."""
  lookup = np.full(split.num_classes, -1, np.int32)
  lookup[classes] = np.arange(len(classes), dtype=np.int32)
  keep = np.flatnonzero(lookup[split.labels] >= 0)
  return Split(split.images[keep], lookup[split.labels[keep]],
               [split.class_names[c] for c in classes])


def fashion_mnist_transfer_splits(data_dir, source_classes, target_classes,
                                  shots_per_class, seed, *, tfds_data_dir=None):
  """The offline demo's source and few-shot target tasks from Fashion-MNIST.

  Args:
    data_dir: see ``fashion_mnist_arrays``.
    source_classes: Fashion-MNIST class indices (0..9) of the source task;
      label i of the result is source_classes[i].
    target_classes: class indices of the target task, disjoint from the
      source classes; label i is target_classes[i].
    shots_per_class: training images per target class, drawn with ``seed``.
    seed: non-negative integer.
    tfds_data_dir: see ``fashion_mnist_arrays``.

  Returns:
    {'source_train', 'source_test', 'target_train', 'target_test'}: Splits
    with uint8 (N, 28, 28, 1) images. The source splits and target_test hold
    all images of their classes.

  Raises:
    ValueError: invalid classes or shots (the message names the field).
  """
  source = _check_classes('source_classes', source_classes)
  target = _check_classes('target_classes', target_classes)
  overlap = sorted(set(source) & set(target))
  if overlap:
    raise ValueError(f'target_classes must be disjoint from source_classes, '
                     f'both contain {overlap}')
  if isinstance(shots_per_class, bool) or not isinstance(
      shots_per_class, (int, np.integer)) or shots_per_class < 1:
    raise ValueError(f'shots_per_class must be an integer >= 1, got '
                     f'{shots_per_class!r}')
  data = fashion_mnist_arrays(data_dir, tfds_data_dir=tfds_data_dir)
  target_train = _remap(data['train'], target)
  available = np.bincount(target_train.labels, minlength=len(target)).min()
  if shots_per_class > available:
    raise ValueError(f'shots_per_class={shots_per_class} exceeds the '
                     f'{available} training images of the smallest target '
                     f'class')
  return {
      'source_train': _remap(data['train'], source),
      'source_test': _remap(data['test'], source),
      'target_train': target_train.subset(
          per_class_subset(target_train.labels, shots_per_class, seed)),
      'target_test': _remap(data['test'], target),
  }


# --------------------------------------------------------------------------
# Pipelines.


def steps_per_epoch(num_examples, batch_size, drop_remainder=True):
  """Global batches that ``train_batches`` yields per epoch.

  Args:
    num_examples: size of the training split.
    batch_size: global batch size.
    drop_remainder: as in ``train_batches``.

  Returns:
    floor(N / B) if drop_remainder else ceil(N / B).
  """
  if drop_remainder:
    return num_examples // batch_size
  return -(-num_examples // batch_size)


def eval_num_batches(num_examples, batch_size, pad_to_multiple=1):
  """Batches that ``eval_batches`` yields (on every process)."""
  batches = -(-num_examples // batch_size)
  return -(-batches // pad_to_multiple) * pad_to_multiple


def _local_rows(batch_size, process_index, process_count):
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'need 0 <= process_index < process_count, got '
                     f'{process_index} and {process_count}')
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} must be a positive multiple of '
                     f'process_count {process_count}')
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def _stream_key(seed, stream):
  """A stateless-RNG key for one purpose (shuffle or augmentation)."""
  if not 0 <= seed < 2**63:
    raise ValueError(f'seed must be in [0, 2**63), got {seed}')
  return tf.constant([seed, stream], tf.int64)


def _batch_layout(num_examples, batch_size, num_batches, rows):
  """Places (0..N-1) of each global batch's rows, and which rows are real.

  Row r of batch k holds place k * B + r; places past the end (a short last
  batch) repeat the batch's first place and are marked invalid. Only this
  process's ``rows`` are returned.
  """
  where = np.arange(num_batches * batch_size).reshape(num_batches, batch_size)
  valid = where < num_examples
  where = np.where(valid, where, where[:, :1])
  return where[:, rows], valid[:, rows]


def _train_index_data(num_examples, batch_size, seed, start_step,
                      drop_remainder, rows):
  """Index batches of the training stream, from global step ``start_step``.

  Epoch e visits the examples in a permutation keyed by (seed, e); the place
  of an example in the whole stream, e * N + place in its epoch, is its
  ``position`` and seeds its augmentation. Everything is computed in TF (no
  Python in the loop), and skipping to ``start_step`` touches indices only.
  """
  spe = steps_per_epoch(num_examples, batch_size, drop_remainder)
  start_epoch, first_step = divmod(start_step, spe)
  where, valid = _batch_layout(num_examples, batch_size, spe, rows)
  shuffle_key = _stream_key(seed, _SHUFFLE_STREAM)

  def epoch_data(epoch):
    perm = tf.random.experimental.stateless_shuffle(
        tf.range(num_examples, dtype=tf.int64),
        seed=tf.random.experimental.stateless_fold_in(shuffle_key, epoch))
    data = tf.data.Dataset.from_tensor_slices({
        'index': tf.gather(perm, where),
        'position': epoch * num_examples + where,
        'valid': valid})
    # Only the first epoch starts part-way.
    return data.skip(tf.cast(tf.where(epoch == start_epoch, first_step, 0),
                             tf.int64))

  return tf.data.Dataset.counter(start_epoch).flat_map(epoch_data)


def _eval_index_data(num_examples, batch_size, pad_to_multiple, rows):
  """Index batches of one ordered pass, padded to full global batches.

  Padding rows repeat the batch's first example (so that the batch holds no
  new values: with the per-batch activation ranges of the dynamic quantizer,
  the real examples' outputs are then exactly those of the unpadded batch);
  all-padding batches repeat example 0.
  """
  num_batches = eval_num_batches(num_examples, batch_size, pad_to_multiple)
  where, valid = _batch_layout(num_examples, batch_size, num_batches, rows)
  where = np.where(where < num_examples, where, 0)
  return tf.data.Dataset.from_tensor_slices(
      {'index': where, 'position': where, 'valid': valid})


def _normalizer(mean, std, channels):
  mean = np.asarray(mean, np.float32).reshape(-1)
  std = np.asarray(std, np.float32).reshape(-1)
  if mean.size not in (1, channels) or std.size not in (1, channels):
    raise ValueError(f'mean and std need {channels} value(s) (or 1) for '
                     f'{channels}-channel images, got {mean.size} and '
                     f'{std.size}')
  # (x / 255 - mean) / std as one multiply-add.
  scale = 1.0 / (255.0 * std)
  offset = mean / std
  return lambda x: x * scale - offset


def _loader(split):
  """Returns index -> uint8 (H, W, C) image tensor for the split's images."""
  images = split.images_tensor
  if not split.is_encoded:
    return lambda i: tf.gather(images, i)
  if isinstance(split.images, list):
    return lambda i: _decode_rgb(tf.io.read_file(tf.gather(images, i)))
  return lambda i: _decode_rgb(tf.gather(images, i))


def _check_sizes(split, image_size, resize_to, crop_padding):
  """Static checks, so that no crop can fail mid-epoch."""
  if resize_to is None and split.is_encoded:
    raise ValueError('resize_to is required for images read from files or '
                     'bytes (their sizes vary)')
  if resize_to is not None:
    height = width = resize_to
  else:
    height, width = split.images.shape[1:3]
  if min(height, width) + 2 * crop_padding < image_size:
    raise ValueError(f'image_size {image_size} is larger than the '
                     f'{height}x{width} images (+ padding {crop_padding})')
  return height, width


def _centre_crop(img, height, width, size):
  # torchvision's CenterCrop offsets (Python round).
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return img[top:top + size, left:left + size]


def _pipeline(split, index_data, local_batch, image_size, resize_to,
              crop_padding, augment, seed, mean, std, output):
  """index batches -> per-example load/preprocess -> numpy batches."""
  height, width = _check_sizes(split, image_size, resize_to, crop_padding)
  channels = split.channels
  normalize = _normalizer(mean, std, channels)
  load = _loader(split)
  labels = tf.constant(split.labels, tf.int32)
  augment_key = _stream_key(seed, _AUGMENT_STREAM)

  def preprocess(example):
    img = tf.cast(load(example['index']), tf.float32)
    if resize_to is not None:
      # Bilinear with antialiasing, as PIL's resize in torchvision.
      img = tf.image.resize(img, [resize_to, resize_to], method='bilinear',
                            antialias=True)
    if augment:
      if crop_padding:
        img = tf.pad(img, [[crop_padding] * 2, [crop_padding] * 2, [0, 0]])
      crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(
          tf.random.experimental.stateless_fold_in(augment_key,
                                                   example['position']), 2))
      img = tf.image.stateless_random_crop(
          img, [image_size, image_size, channels], seed=crop_seed)
      img = tf.image.stateless_random_flip_left_right(img, seed=flip_seed)
    else:
      img = _centre_crop(img, height, width, image_size)
    img = tf.ensure_shape(normalize(img), [image_size, image_size, channels])
    return {'image': img, 'label': tf.gather(labels, example['index']),
            'valid': example['valid']}

  data = index_data.unbatch()
  data = data.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)
  # Every index batch is full-size (short ones are padded), so re-batching
  # restores exactly the index batches' boundaries.
  data = data.batch(local_batch, drop_remainder=True)
  data = data.map(output)
  options = tf.data.Options()
  options.deterministic = True
  # One thread per op: the parallelism is across examples.
  options.threading.max_intra_op_parallelism = 1
  return data.with_options(options).prefetch(tf.data.AUTOTUNE)


def train_batches(split, batch_size, image_size, seed, *, resize_to=None,
                  augment=True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  start_step=0, drop_remainder=True, crop_padding=0,
                  process_index=0, process_count=1):
  """An endless, reshuffled-every-epoch stream of training batches.

  Preprocessing (per example): resize to resize_to x resize_to (aspect ratio
  not kept; skipped if None), zero-pad by crop_padding, random crop
  image_size x image_size, random horizontal flip, then
  (x / 255 - mean) / std. With augment=False: resize and centre crop, as in
  evaluation. Paper (ImageNet-size images): resize_to=256, image_size=224.
  Fashion-MNIST demo: resize_to=None, image_size=28, crop_padding=2,
  FASHION_MNIST_MEAN/STD.

  The stream is a pure function of (split, seed, step): the permutation of
  epoch e is drawn from (seed, e) and the crop/flip of stream position p from
  (seed, p). Global step s is epoch s // spe, batch s % spe of that epoch
  (spe = ``steps_per_epoch``).

  Args:
    split: the training Split.
    batch_size: global batch size.
    image_size: side of the output crops.
    seed: non-negative integer.
    resize_to: resize side before cropping; required for file/bytes images.
    augment: random crop and flip (else centre crop).
    mean: per-channel mean on the 0..1 scale (1 or C values).
    std: per-channel standard deviation on the 0..1 scale.
    start_step: first global step to yield; resuming from a checkpoint at
      step s with start_step=s continues the identical stream (skipped steps
      cost nothing: no image is read).
    drop_remainder: True: every epoch yields N // B full batches (the
      remainder differs every epoch). False: ceil(N / B) batches, the last
      one of each epoch short (PyTorch's drop_last=False); only with one
      process.
    crop_padding: zero padding on each side before the random crop.
    process_index: this process's index.
    process_count: number of processes; each yields rows
      [i * B / P, (i + 1) * B / P) of every global batch.

  Returns:
    An iterator of {'image': float32 (b, S, S, C), 'label': int32 (b,)}, b =
    batch_size // process_count.

  Raises:
    ValueError: inconsistent sizes, a split smaller than one batch with
      drop_remainder=True, bad process arguments.
  """
  rows = _local_rows(batch_size, process_index, process_count)
  num_examples = len(split)
  if drop_remainder and num_examples < batch_size:
    raise ValueError(f'the split has {num_examples} examples, fewer than '
                     f'batch_size {batch_size}; use drop_remainder=False or '
                     f'a smaller batch')
  if not num_examples:
    raise ValueError('the split is empty')
  if not drop_remainder and process_count > 1:
    raise ValueError('drop_remainder=False would give processes batches of '
                     'different sizes; use drop_remainder=True')
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}')
  index_data = _train_index_data(num_examples, batch_size, seed, start_step,
                                 drop_remainder, rows)

  def output(batch):
    if drop_remainder:
      return {'image': batch['image'], 'label': batch['label']}
    # Short last batch of an epoch: drop the padding rows.
    return {'image': tf.boolean_mask(batch['image'], batch['valid']),
            'label': tf.boolean_mask(batch['label'], batch['valid'])}

  data = _pipeline(split, index_data, rows.stop - rows.start, image_size,
                   resize_to, crop_padding, augment, seed, mean, std, output)
  return data.as_numpy_iterator()


def eval_batches(split, batch_size, image_size, *, resize_to=None,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, pad_to_multiple=1,
                 process_index=0, process_count=1):
  """One pass over ``split`` in order, in fixed-shape batches.

  Preprocessing: resize to resize_to x resize_to (if given), centre crop
  image_size, (x / 255 - mean) / std. The last batch is padded to
  batch_size with rows whose 'mask' is 0 (they repeat the batch's first
  example, see below), so a jitted step sees one shape.

  Why padding repeats a real example: the quantized student computes its
  activation ranges over the whole batch, also in evaluation, so rows of
  zeros could change the real rows' predictions; duplicates of an example
  already in the batch leave every range, and so every real output, exactly
  as for the unpadded short batch. (Evaluation results still depend on the
  batch size and order for the same reason.)

  Args:
    split: the Split to evaluate.
    batch_size: global batch size.
    image_size: side of the centre crop.
    resize_to: resize side; required for file/bytes images.
    mean: per-channel mean on the 0..1 scale.
    std: per-channel standard deviation on the 0..1 scale.
    pad_to_multiple: pad the number of batches with all-padding batches up
      to a multiple of this (e.g. for a step that consumes several batches).
    process_index: this process's index.
    process_count: number of processes; each gets its rows of every global
      batch and all processes get the same number of batches.

  Returns:
    An iterator of {'image': float32 (b, S, S, C), 'label': int32 (b,),
    'mask': float32 (b,)} over ``eval_num_batches(...)`` batches, b =
    batch_size // process_count; over all processes every example has mask 1
    exactly once.
  """
  rows = _local_rows(batch_size, process_index, process_count)
  if pad_to_multiple < 1:
    raise ValueError(f'pad_to_multiple must be >= 1, got {pad_to_multiple}')
  if not len(split):
    raise ValueError('the split is empty')
  index_data = _eval_index_data(len(split), batch_size, pad_to_multiple,
                               rows)

  def output(batch):
    return {'image': batch['image'], 'label': batch['label'],
            'mask': tf.cast(batch['valid'], tf.float32)}

  data = _pipeline(split, index_data, rows.stop - rows.start, image_size,
                   resize_to, 0, False, 0, mean, std, output)
  return data.as_numpy_iterator()
