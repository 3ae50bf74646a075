"""Tests of dtq_jax.data.image_cache and of Data's batches through it: the same
stream as without the cache, keys that follow the data, checks, one build."""

import itertools
import json
import logging
import os
import threading

import numpy as np
import pytest

import data_files
from data_files import assert_one_line
from dtq_jax.data import datasets
from dtq_jax.data import image_cache
from dtq_jax.data import input_pipeline as ip
from dtq_jax.data import splits
from dtq_jax.infra import errors

IDENTITY3 = {'mean': (0.0,) * 3, 'std': (1.0,) * 3}
# A cached pixel is the uncached float resize rounded to uint8: within half a
# grey level (plus float rounding).
HALF_LEVEL = 0.5 / 255 + 1e-6


@pytest.fixture(name='train', scope='module')
def train_fixture(tmp_path_factory):
  root = data_files.write_folder(str(tmp_path_factory.mktemp('folder')))
  train, _ = splits.image_folder_splits(root, data_files.PER_CLASS // 2,
                                        seed=0)
  return train


def _data(train, cache, cache_dir, crop_padding=0):
  preprocessing = datasets.Preprocessing(image_size=32, resize_to=40,
                                         crop_padding=crop_padding,
                                         **IDENTITY3)
  return datasets.Data(train, train, None, preprocessing, cache=cache,
                       cache_dir=str(cache_dir))


def _take(iterator, count):
  return list(itertools.islice(iterator, count))


@pytest.mark.parametrize('mode,numpy_reads', [('memory', False),
                                              ('memory', True),
                                              ('disk', True)])
def test_cache_keeps_the_stream(train, tmp_path, monkeypatch, mode,
                                numpy_reads):
  if numpy_reads:  # the path of arrays larger than _CONSTANT_BYTES
    monkeypatch.setattr(ip, '_CONSTANT_BYTES', 0)
  plain = _data(train, 'none', tmp_path, crop_padding=3)
  cached = _data(train, mode, tmp_path, crop_padding=3)
  want = _take(plain.train_batches(8, seed=5), 6)
  got = _take(cached.train_batches(8, seed=5), 6)
  assert isinstance(cached._prepared(train, 'x')[0].images,
                    np.memmap) == (mode == 'disk')
  for a, b in zip(want, got):
    np.testing.assert_array_equal(a['label'], b['label'])
    # Same images, order, crops and flips: a one-pixel shift of these noise
    # images would change values by far more than half a grey level.
    np.testing.assert_allclose(a['image'], b['image'], rtol=0,
                               atol=HALF_LEVEL)
  # Resuming with the cache continues its own stream exactly.
  resumed = _take(cached.train_batches(8, seed=5, start_step=4), 2)
  for a, b in zip(got[4:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
  for a, b in zip(plain.eval_batches(train, 8), cached.eval_batches(train, 8)):
    np.testing.assert_allclose(a['image'], b['image'], rtol=0,
                               atol=HALF_LEVEL)
    np.testing.assert_array_equal(a['mask'], b['mask'])
  # uint8 batches for an augmenting step: the cached pixels, with or
  # without the cache.
  raw = next(cached.train_batches(8, seed=5, on_device=True))
  raw_plain = next(plain.train_batches(8, seed=5, on_device=True))
  assert raw['image'].dtype == np.uint8 and raw['image'].shape == (8, 40, 40,
                                                                     3)
  np.testing.assert_array_equal(raw['image'], raw_plain['image'])


def test_key_follows_files_order_and_resize(train, tmp_path):
  key = image_cache.cache_key(train, 40)
  assert image_cache.cache_key(train, 40) == key
  assert image_cache.cache_key(train, 48) != key
  assert image_cache.cache_key(train.subset(range(len(train))[::-1]),
                               40) != key
  assert image_cache.cache_key(train.subset(range(len(train) - 1)), 40) != key
  # A rewritten file (new mtime) changes the key, so no stale pixels.
  path = train.images[0]
  stat = os.stat(path)
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  try:
    assert image_cache.cache_key(train, 40) != key
  finally:
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  encoded = np.array([open(p, 'rb').read() for p in train.images],
                     dtype=object)
  as_bytes = type(train)(encoded, train.labels, train.class_names)
  changed = encoded.copy()
  changed[3] = changed[3] + b'\0'
  assert image_cache.cache_key(as_bytes, 40) != image_cache.cache_key(
      type(train)(changed, train.labels, train.class_names), 40)


def test_damaged_cache_is_rebuilt_with_a_warning(train, tmp_path, caplog):
  first = np.array(image_cache.cached_array(train, 40, str(tmp_path)))
  entry = tmp_path / image_cache.cache_key(train, 40)
  npy = entry / 'pixels.npy'
  data = bytearray(npy.read_bytes())
  data[-100] ^= 0xFF  # one pixel of the last image
  npy.write_bytes(bytes(data))
  with caplog.at_level(logging.WARNING):
    again = image_cache.cached_array(train, 40, str(tmp_path))
  assert 'damaged' in caplog.text and 'checksum' in caplog.text
  np.testing.assert_array_equal(again, first)
  meta = json.loads((entry / 'pixels.json').read_text())
  assert meta['shape'] == [len(train), 40, 40, 3]
  # A truncated file too.
  npy.write_bytes(npy.read_bytes()[:1000])
  np.testing.assert_array_equal(
      image_cache.cached_array(train, 40, str(tmp_path)), first)
  # Nothing but the pixels, their sidecar and the lock is left behind.
  assert os.listdir(tmp_path) == [entry.name]
  assert {'pixels.npy', 'pixels.json'} <= set(os.listdir(entry))
  assert all(n in ('pixels.npy', 'pixels.json') or n.startswith('build.lock')
             for n in os.listdir(entry))


def test_concurrent_builders_build_once(train, tmp_path, monkeypatch):
  """Two builders (separate locks on one file, as two processes hold) race;
  one decodes, the other waits and reads its file."""
  built = []
  build = image_cache._build  # pylint: disable=protected-access

  def slow_build(*args):
    built.append(args[3])
    threading.Event().wait(0.5)  # keeps the race window open
    build(*args)

  monkeypatch.setattr(image_cache, '_build', slow_build)
  results = [None, None]

  def run(i):
    results[i] = np.array(image_cache.cached_array(train, 40, str(tmp_path)))

  threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(built) == 1
  np.testing.assert_array_equal(results[0], results[1])


def test_resolve_mode():
  assert image_cache.resolve_mode('auto', 10, available=100) == 'memory'
  assert image_cache.resolve_mode('auto', 30, available=100) == 'disk'
  assert image_cache.resolve_mode('disk', 1, available=100) == 'disk'
  with pytest.raises(ValueError, match='allowed'):
    image_cache.resolve_mode('ram', 1)


def test_pixels_without_resize_need_no_cache(tmp_path):
  split = data_files.index_split(6)
  assert image_cache.cached_split(split, None, 'memory',
                                  str(tmp_path)) is split
  assert not os.listdir(tmp_path)


def test_load_reads_the_settings(tiny_folder, tmp_path):
  root, make_config = tiny_folder
  config = make_config(root)
  config.dataset.cache = 'disk'
  config.dataset.cache_dir = str(tmp_path / 'images')
  config.dataset.augment_on_device = 'on'
  data = datasets.load(config)
  assert (data.cache, data.cache_dir, data.on_device) == (
      'disk', str(tmp_path / 'images'), True)
  # By default the cache lives under the project's cache root.
  config.cache_dir = str(tmp_path / 'root')
  config.dataset.cache_dir = ''
  assert datasets.load(config).cache_dir == str(tmp_path / 'root' / 'images')
  config.dataset.cache = 'ram'
  with pytest.raises(errors.ConfigError) as e:
    datasets.load(config)
  assert_one_line(e, 'dataset.cache', 'memory')
