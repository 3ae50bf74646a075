"""Keeps a split's images decoded and resized once: the decoded-image cache.

Decoding and resizing a JPEG costs far more than cropping it, and the paper's
runs go over the same few thousand images 75-107 times. ``cached_split``
decodes and resizes every image of a Split once, to uint8 at the pre-crop
size (the pipelines' own decoder and resize, ``input_pipeline
.resized_images``), stores the array in ``cache_dir`` as a ``.npy`` file and
returns a Split of those pixels, which the pipelines then only crop:

* 'memory': the array is read into RAM;
* 'disk': the array is memory-mapped (for sets larger than memory; the page
  cache keeps what fits);
* 'auto': 'memory' when the array takes under a quarter of the available RAM,
  else 'disk';
* 'none': no cache.

A cache file is named by a key over everything its pixels depend on: the
exact list of images (paths with their sizes and modification times, or a
digest of encoded bytes or pixels), in order, the resize, the channels, the
decoder's version and this module's format. A changed split or setting
therefore never reads a stale file. Each entry is a folder
``<cache_dir>/<key>/`` holding ``pixels.npy`` and ``pixels.json``, the
SHA-256 of the pixels, checked whenever the entry is opened: a damaged cache
is rebuilt with a warning. Building happens once under the entry's lock
(``locks.build_lock``: two processes never build the same entry, the second
one waits and reads it), and both files are written atomically
(``files.atomic_path``), the sidecar last.
"""

import hashlib
import json
import os

from absl import logging
import numpy as np
import tensorflow as tf

from dtq_jax.data import input_pipeline
from dtq_jax.data import sources
from dtq_jax.infra import files
from dtq_jax.infra import locks

MODES = ('auto', 'memory', 'disk', 'none')
# Part of every key: bump it when the stored pixels change meaning.
_FORMAT = 1
# 'auto' keeps the array in memory below this fraction of the available RAM.
_MEMORY_FRACTION = 0.25
# Bytes hashed per read when verifying (bounded memory for any file size).
_CHUNK_BYTES = 64 << 20


def needs_cache(split, resize_to):
  """Whether the pipelines would decode or resize ``split``'s images."""
  return split.is_encoded or resize_to is not None


def available_memory():
  """Bytes of RAM available to new allocations (MemAvailable on Linux)."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_AVPHYS_PAGES')


def resolve_mode(mode, nbytes, available=None):
  """'memory', 'disk' or 'none' for a cache of ``nbytes``.

  Args:
    mode: one of ``MODES``.
    nbytes: size of the decoded array.
    available: available RAM in bytes (default ``available_memory()``).

  Returns:
    The mode to use; 'auto' becomes 'memory' under a quarter of the
    available RAM, else 'disk'.

  Raises:
    ValueError: unknown mode.
  """
  if mode not in MODES:
    raise ValueError(f'unknown image cache mode {mode!r}; allowed: '
                     f'{", ".join(MODES)}')
  if mode != 'auto':
    return mode
  available = available_memory() if available is None else available
  return 'memory' if nbytes < _MEMORY_FRACTION * available else 'disk'


def _image_identity(split, digest):
  """Feeds what identifies ``split``'s images, in order, into ``digest``."""
  if isinstance(split.images, list):
    for path in split.images:
      st = os.stat(path)
      digest.update(f'{os.path.abspath(path)}\0{st.st_size}\0'
                    f'{st.st_mtime_ns}\n'.encode())
  elif split.is_encoded:
    for encoded in split.images:
      digest.update(len(encoded).to_bytes(8, 'little'))
      digest.update(encoded)
  else:
    digest.update(repr(split.images.shape).encode())
    digest.update(np.ascontiguousarray(split.images).data)


def cache_key(split, resize_to):
  """The name of ``split``'s cache file: a digest of all its pixels depend on.

  Args:
    split: a Split (paths, encoded bytes or pixels).
    resize_to: the pre-crop side (None: the images' own size).

  Returns:
    A hex string.
  """
  digest = hashlib.sha256()
  digest.update(json.dumps({
      'format': _FORMAT, 'resize_to': resize_to, 'channels': split.channels,
      'count': len(split), 'decoder': f'tensorflow-{tf.__version__}',
  }, sort_keys=True).encode())
  _image_identity(split, digest)
  return digest.hexdigest()[:32]


def _shape(split, resize_to):
  if resize_to is None:
    return tuple(split.images.shape)
  return (len(split), resize_to, resize_to, split.channels)


def _pixels_digest(array):
  """SHA-256 of a (possibly memory-mapped) array's bytes, read in chunks."""
  digest = hashlib.sha256()
  flat = array.reshape(-1)
  for start in range(0, flat.size, _CHUNK_BYTES):
    digest.update(np.ascontiguousarray(flat[start:start + _CHUNK_BYTES]).data)
  return digest.hexdigest()


def _paths(cache_dir, key):
  """The entry's folder, pixel file and checksum sidecar."""
  folder = os.path.join(cache_dir, key)
  return (folder, os.path.join(folder, 'pixels.npy'),
          os.path.join(folder, 'pixels.json'))


def _open_checked(cache_dir, key, shape):
  """The cached array memory-mapped read-only, or None (missing, damaged).

  A damaged file (unreadable, wrong shape, wrong checksum) is reported as a
  warning; the caller rebuilds it.
  """
  _, npy, meta_path = _paths(cache_dir, key)
  if not os.path.exists(meta_path):
    return None
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    array = np.load(npy, mmap_mode='r')
    if array.dtype != np.uint8 or tuple(array.shape) != tuple(shape):
      raise ValueError(f'holds {array.dtype} {array.shape}, expected uint8 '
                       f'{tuple(shape)}')
    if _pixels_digest(array) != meta['sha256']:
      raise ValueError('its checksum does not match')
    return array
  except (OSError, ValueError, KeyError, TypeError) as e:
    logging.warning('Image cache %s is damaged (%s); rebuilding it.', npy,
                    ' '.join(str(e).split())[:200])
    return None


def _build(split, resize_to, cache_dir, key, shape, what):
  """Decodes ``split`` into the entry's ``pixels.npy``, then its sidecar."""
  _, npy, meta_path = _paths(cache_dir, key)
  logging.info('Decoding %d images of %s into the image cache %s ...',
               len(split), what, npy)
  digest = hashlib.sha256()
  with files.atomic_path(npy) as tmp:
    array = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.uint8,
                                      shape=shape)
    start = 0
    for chunk in input_pipeline.resized_images(split, resize_to):
      array[start:start + len(chunk)] = chunk
      digest.update(np.ascontiguousarray(chunk).data)
      start += len(chunk)
    if start != shape[0]:
      raise RuntimeError(f'decoded {start} images of {what}, expected '
                         f'{shape[0]}')
    array.flush()
    del array
  files.write_json(meta_path, {
      'sha256': digest.hexdigest(), 'shape': list(shape), 'dtype': 'uint8',
      'resize_to': resize_to, 'what': what, 'format': _FORMAT})


def cached_array(split, resize_to, cache_dir, what='images'):
  """``split``'s decoded images, memory-mapped from the cache (built once).

  Args:
    split: a Split whose images need decoding or resizing.
    resize_to: the pre-crop side (None: fixed-size pixels kept as they are).
    cache_dir: folder of the cache files (created if needed).
    what: a name for log messages.

  Returns:
    A read-only ``np.memmap`` uint8 (N, R, R, C), in ``split``'s order.
  """
  key = cache_key(split, resize_to)
  shape = _shape(split, resize_to)
  array = _open_checked(cache_dir, key, shape)
  if array is not None:
    return array
  with locks.build_lock(_paths(cache_dir, key)[0],
                        f'the image cache of {what}'):
    # Another process may have built it while this one waited.
    array = _open_checked(cache_dir, key, shape)
    if array is None:
      _build(split, resize_to, cache_dir, key, shape, what)
      array = _open_checked(cache_dir, key, shape)
  if array is None:
    raise RuntimeError(f'the image cache of {what} in {cache_dir} failed its '
                       'check right after it was built')
  return array


def cached_split(split, resize_to, mode, cache_dir, what='images'):
  """``split`` with its images decoded and resized once, or ``split`` itself.

  Args:
    split: a Split.
    resize_to: the pre-crop side; None: the images' own size.
    mode: one of ``MODES``.
    cache_dir: folder of the cache files.
    what: a name for log messages.

  Returns:
    A Split with the same labels whose images are uint8 (N, R, R, C) pixels
    (an in-memory array for 'memory', a memory map for 'disk'); the pipelines
    then need no ``resize_to``. ``split`` unchanged for 'none' or when there
    is nothing to decode or resize.
  """
  if not needs_cache(split, resize_to):
    return split
  shape = _shape(split, resize_to)
  mode = resolve_mode(mode, int(np.prod(shape, dtype=np.int64)))
  if mode == 'none':
    return split
  array = cached_array(split, resize_to, cache_dir, what)
  if mode == 'memory':
    array = np.array(array)
  return sources.Split(array, split.labels, split.class_names, split.skipped)
