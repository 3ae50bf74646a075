"""Reads a task's raw images and labels: image folders, TFDS, Fashion-MNIST.

Every reader returns whole ``Split``s (images + int32 labels + class names)
in a stable order: an image folder (Caltech-256, MIT Indoor 67, ...), a TFDS
dataset (CUB-200-2011, Stanford Dogs, Food-101; ``tfds_tasks``) or the
Fashion-MNIST idx files of the offline demo. Dividing them (per-class
subsets, validation and transfer splits) is ``splits``' job, turning them
into batches ``input_pipeline``'s.

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

Unreadable files are found once, when the ``Split`` is built (every image is
decoded once; JPEGs at 1/8 scale, which still reads all their entropy-coded
data), then dropped and listed in ``Split.skipped``; the pipelines therefore
never fail mid-epoch.
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

from dtq_jax.data import tfds_tasks

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


def _one_line(text):
  return ' '.join(str(text).split())


# --------------------------------------------------------------------------
# Validation of encoded images.


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


def list_classes(root):
  """Class subfolder names of ``root``, sorted (hidden ones ignored)."""
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


def read_folder(root, classes, validate):
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


def read_tfds(name, data_dir=None, train_split=None, test_split=None, *,
              validate=True):
  """The whole train and test Splits of a TFDS image classification dataset.

  Images are kept encoded in memory (see the module docstring); the record
  files are read once, in their stored order, so indices are stable.

  Args:
    name: TFDS name, e.g. one of ``tfds_tasks.TFDS_DATASETS``.
    data_dir: TFDS data directory (None: TFDS's default). If the dataset is
      not prepared there, TFDS tries to download it.
    train_split: TFDS split for training; None: from ``TFDS_DATASETS``, else
      'train'.
    test_split: TFDS split for testing; None: from ``TFDS_DATASETS`` (e.g.
      'validation' for food101), else 'test'.
    validate: decode every image once and drop unreadable ones.

  Returns:
    (train, test) Splits whose images are encoded bytes.

  Raises:
    FileNotFoundError: the dataset is neither prepared nor downloadable.
    ValueError: unknown dataset, empty split.
  """
  spec = tfds_tasks.TFDS_DATASETS.get(
      name, tfds_tasks.TfdsDataset('train', 'test', name))
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
  return tuple(splits)


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

