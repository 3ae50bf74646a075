"""Tests of dtq_jax.input_pipeline: sources, splits and tf.data pipelines.

Everything runs offline on small data the tests write themselves (image
folders, idx files, mocked TFDS); the real Fashion-MNIST files are read only
where the Debian package put them.
"""

import base64
import gzip
import itertools
import os
import socket
import struct

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dtq_jax import input_pipeline as ip

# Normalisation that keeps pixels on the 0..1 scale, so tests can read the
# original pixel values back from a batch.
IDENTITY = {'mean': (0.0,), 'std': (1.0,)}
IDENTITY3 = {'mean': (0.0,) * 3, 'std': (1.0,) * 3}
PER_CLASS = 8  # readable images per class in the folder fixture


def _assert_one_line(excinfo, *fragments):
  message = str(excinfo.value)
  assert '\n' not in message
  for fragment in fragments:
    assert str(fragment) in message


def _rgb(rng, height, width):
  return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def _jpeg(image):
  return tf.io.encode_jpeg(image).numpy()


def _png(image):
  return tf.io.encode_png(image).numpy()


def _make_class(folder, count, rng, first=0):
  """Writes ``count`` random PNG/JPEG images of varied sizes."""
  for i in range(first, first + count):
    image = _rgb(rng, int(rng.integers(20, 50)), int(rng.integers(20, 50)))
    if i % 2:
      _write(os.path.join(folder, f'img{i:03d}.png'), _png(image))
    else:
      # Upper-case extension: matching is case-insensitive.
      _write(os.path.join(folder, f'img{i:03d}.JPG'), _jpeg(image))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """root/{ant,bee,cat}: 8 readable images each, plus junk to be skipped."""
  root = str(tmp_path_factory.mktemp('folder'))
  rng = np.random.default_rng(0)
  for name in ('ant', 'bee', 'cat'):
    _make_class(os.path.join(root, name), PER_CLASS, rng)
  # A grayscale and an RGBA image replace one of bee's and one of cat's.
  os.remove(os.path.join(root, 'bee', 'img000.JPG'))
  _write(os.path.join(root, 'bee', 'gray.png'),
         _png(rng.integers(0, 256, (30, 24, 1), dtype=np.uint8)))
  os.remove(os.path.join(root, 'cat', 'img001.png'))
  _write(os.path.join(root, 'cat', 'rgba.png'),
         _png(rng.integers(0, 256, (26, 30, 4), dtype=np.uint8)))
  os.remove(os.path.join(root, 'cat', 'img002.JPG'))
  _write(os.path.join(root, 'cat', 'gray.jpg'),
         _jpeg(rng.integers(0, 256, (28, 33, 1), dtype=np.uint8)))
  # Unreadable: random bytes and a truncated JPEG, both in ant.
  _write(os.path.join(root, 'ant', 'corrupt.jpg'), rng.bytes(500))
  _write(os.path.join(root, 'ant', 'truncated.jpeg'),
         _jpeg(_rgb(rng, 40, 40))[:300])
  # Ignored: other extensions, hidden files, nested folders.
  _write(os.path.join(root, 'ant', 'notes.txt'), b'not an image')
  _write(os.path.join(root, 'ant', '.hidden.png'), _png(_rgb(rng, 8, 8)))
  _make_class(os.path.join(root, 'cat', 'nested'), 2, rng)
  return root


def _index_split(num, size=8, channels=1, num_classes=3):
  """Constant images whose pixel value is the example's index."""
  images = np.broadcast_to(
      np.arange(num, dtype=np.uint8)[:, None, None, None],
      (num, size, size, channels)).copy()
  return ip.Split(images, np.arange(num) % num_classes,
                  [f'c{i}' for i in range(num_classes)])


def _ids(batch):
  """Example indices of an _index_split batch (normalised with IDENTITY)."""
  return np.rint(batch['image'][:, 0, 0, 0] * 255).astype(int)


def _take(iterator, count):
  return list(itertools.islice(iterator, count))


# ---------------------------------------------------------------------------
# Per-class sampling.


def test_per_class_subset_is_deterministic_and_nested():
  labels = np.repeat(np.arange(4), 10)[np.random.default_rng(1).permutation(40)]
  small = ip.per_class_subset(labels, 3, seed=5)
  assert np.array_equal(small, np.sort(small))
  assert np.array_equal(np.bincount(labels[small]), [3, 3, 3, 3])
  assert np.array_equal(small, ip.per_class_subset(labels, 3, seed=5))
  assert not np.array_equal(small, ip.per_class_subset(labels, 3, seed=6))
  assert set(small) <= set(ip.per_class_subset(labels, 6, seed=5))
  with pytest.raises(ValueError) as e:
    ip.per_class_subset(labels, 11, seed=0)
  _assert_one_line(e, 'per_class=11')


def test_split_validation_is_stratified():
  split = _index_split(30)
  train, val = ip.split_validation(split, 0.2, seed=0)
  assert np.array_equal(np.bincount(val.labels), [2, 2, 2])
  assert np.array_equal(np.bincount(train.labels), [8, 8, 8])
  ids = np.concatenate([train.images[:, 0, 0, 0], val.images[:, 0, 0, 0]])
  assert sorted(ids) == list(range(30))
  with pytest.raises(ValueError):
    ip.split_validation(_index_split(3), 0.5, seed=0)


# ---------------------------------------------------------------------------
# Image folders.


def test_folder_random_split(folder):
  train, test = ip.image_folder_splits(folder, 3, 2, seed=0)
  assert train.class_names == ['ant', 'bee', 'cat']
  assert np.array_equal(np.bincount(train.labels), [3, 3, 3])
  assert np.array_equal(np.bincount(test.labels), [2, 2, 2])
  assert not set(train.images) & set(test.images)
  assert sorted(os.path.basename(p) for p in train.skipped) == [
      'corrupt.jpg', 'truncated.jpeg']
  for path, label in zip(train.images + test.images,
                         np.concatenate([train.labels, test.labels])):
    assert os.path.basename(os.path.dirname(path)) == train.class_names[label]
    assert 'nested' not in path and not path.endswith('.txt')

  again, _ = ip.image_folder_splits(folder, 3, 2, seed=0)
  assert again.images == train.images
  other, _ = ip.image_folder_splits(folder, 3, 2, seed=1)
  assert other.images != train.images
  # The test set does not depend on train_per_class and training sets nest.
  bigger, same_test = ip.image_folder_splits(folder, 5, 2, seed=0)
  assert same_test.images == test.images
  assert set(train.images) <= set(bigger.images)
  # Without test_per_class, every remaining image is a test image.
  train, rest = ip.image_folder_splits(folder, 3, seed=0)
  assert np.array_equal(np.bincount(rest.labels), [PER_CLASS - 3] * 3)
  assert not set(train.images) & set(rest.images)


def test_folder_official_layout(tmp_path):
  rng = np.random.default_rng(2)
  for part, count in (('train', 6), ('test', 3)):
    for name in ('x', 'y'):
      _make_class(str(tmp_path / part / name), count, rng)
  train, test = ip.image_folder_splits(str(tmp_path))
  assert np.array_equal(np.bincount(train.labels), [6, 6])
  assert np.array_equal(np.bincount(test.labels), [3, 3])
  assert all('/train/' in p for p in train.images)
  assert all('/test/' in p for p in test.images)
  sub, test2 = ip.image_folder_splits(str(tmp_path), train_per_class=4, seed=3)
  assert np.array_equal(np.bincount(sub.labels), [4, 4])
  assert set(sub.images) <= set(train.images) and test2.images == test.images
  again, _ = ip.image_folder_splits(str(tmp_path), 4, seed=3)
  assert sub.images == again.images


def test_folder_errors(tmp_path, folder):
  missing = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError) as e:
    ip.image_folder_splits(missing, 1, 1)
  _assert_one_line(e, missing)

  (tmp_path / 'empty_root').mkdir()
  with pytest.raises(ValueError) as e:
    ip.image_folder_splits(str(tmp_path / 'empty_root'), 1, 1)
  _assert_one_line(e, 'no class subfolders')

  rng = np.random.default_rng(3)
  _make_class(str(tmp_path / 'data' / 'full'), 3, rng)
  _write(str(tmp_path / 'data' / 'void' / 'readme.txt'), b'x')
  with pytest.raises(ValueError) as e:
    ip.image_folder_splits(str(tmp_path / 'data'), 1, 1)
  _assert_one_line(e, os.path.join(str(tmp_path / 'data'), 'void'),
                   'no readable images')

  with pytest.raises(ValueError) as e:
    ip.image_folder_splits(folder, 6, 3)
  _assert_one_line(e, 'train_per_class + test_per_class = 9', 'has 8')

  with pytest.raises(ValueError) as e:
    ip.image_folder_splits(folder)
  _assert_one_line(e, 'train_per_class or test_per_class')


def test_folder_left_empty_by_skipping_is_an_error(tmp_path):
  _write(str(tmp_path / 'a' / 'bad.png'), b'\x89PNG broken')
  with pytest.raises(ValueError) as e:
    ip.image_folder_splits(str(tmp_path), 1, 1)
  _assert_one_line(e, 'no readable images')


def test_folder_pipeline_decodes_gray_and_rgba(folder):
  part1, part2 = ip.image_folder_splits(folder, PER_CLASS // 2, seed=0)
  train = ip.Split(part1.images + part2.images,
                   np.concatenate([part1.labels, part2.labels]),
                   part1.class_names)
  names = [os.path.basename(p) for p in train.images]
  rgba = names.index('rgba.png')
  batches = list(ip.eval_batches(train, 8, 32, resize_to=40, **IDENTITY3))
  images = np.concatenate([b['image'] for b in batches])
  masks = np.concatenate([b['mask'] for b in batches])
  assert images.shape == (24, 32, 32, 3) and images.dtype == np.float32
  assert masks.sum() == 24
  assert images.min() >= 0 and images.max() <= 1
  # Gray is replicated into R, G and B; RGBA keeps its colour channels.
  for gray in (names.index('gray.png'), names.index('gray.jpg')):
    assert np.array_equal(images[gray, ..., 0], images[gray, ..., 2])
  assert not np.array_equal(images[rgba, ..., 0], images[rgba, ..., 2])
  # Training batches from files: ImageNet normalisation, random crops.
  batch = next(ip.train_batches(train, 8, 32, seed=0, resize_to=40))
  assert batch['image'].shape == (8, 32, 32, 3)
  assert batch['label'].dtype == np.int32
  assert batch['image'].min() < -1 and batch['image'].max() > 1.5


def _bmp(image):
  """A 24-bit BMP file of an RGB uint8 image (TF cannot encode BMP)."""
  height, width, _ = image.shape
  pad = b'\0' * ((-width * 3) % 4)
  rows = b''.join(image[y, :, ::-1].tobytes() + pad
                  for y in range(height - 1, -1, -1))  # bottom-up, BGR
  return (struct.pack('<2sIHHI', b'BM', 54 + len(rows), 0, 0, 54) +
          struct.pack('<IiiHHIIiiII', 40, width, height, 1, 24, 0, len(rows),
                      2835, 2835, 0, 0) + rows)


# The classic 1x1 GIF (TF cannot encode GIF either).
_GIF = base64.b64decode(
    'R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==')


def test_folder_reads_bmp_and_gif(tmp_path):
  image = np.random.default_rng(4).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  _write(str(tmp_path / 'x' / 'a.bmp'), _bmp(image))
  _write(str(tmp_path / 'x' / 'b.GIF'), _GIF)
  _write(str(tmp_path / 'x' / 'c.png'), _png(image))
  train, test = ip.image_folder_splits(str(tmp_path), test_per_class=1, seed=0)
  assert len(train) + len(test) == 3 and not train.skipped
  whole = ip.Split(sorted(train.images + test.images), [0, 0, 0], ['x'])
  batch = next(ip.eval_batches(whole, 3, 8, resize_to=8, **IDENTITY3))
  np.testing.assert_allclose(batch['image'][0] * 255, image, atol=1e-3)
  np.testing.assert_allclose(batch['image'][2] * 255, image, atol=1e-3)


def test_split_needs_resize_for_files(folder):
  train, _ = ip.image_folder_splits(folder, 2, 2, seed=0)
  with pytest.raises(ValueError) as e:
    ip.eval_batches(train, 4, 32)
  _assert_one_line(e, 'resize_to')


# ---------------------------------------------------------------------------
# Preprocessing.


def test_normalisation_and_centre_crop():
  image = np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1) * 3
  split = ip.Split(np.concatenate([image, image]), [0, 1], ['a', 'b'])
  batch = next(ip.eval_batches(split, 2, 4, mean=(0.5,), std=(0.25,)))
  expected = (image[0, 2:6, 2:6].astype(np.float32) / 255 - 0.5) / 0.25
  np.testing.assert_allclose(batch['image'][0], expected, atol=1e-6)
  rgb = ip.Split(np.full((2, 6, 6, 3), 255, np.uint8), [0, 0], ['a'])
  batch = next(ip.eval_batches(rgb, 2, 6))
  np.testing.assert_allclose(
      batch['image'][0, 0, 0],
      (1 - np.array(ip.IMAGENET_MEAN)) / np.array(ip.IMAGENET_STD), rtol=1e-6)


def test_resize_then_crop_shapes():
  split = ip.Split(np.random.default_rng(0).integers(
      0, 256, (4, 50, 40, 3), dtype=np.uint8), [0, 1, 0, 1], ['a', 'b'])
  train = next(ip.train_batches(split, 4, 32, seed=0, resize_to=40))
  evals = next(ip.eval_batches(split, 4, 32, resize_to=40))
  assert train['image'].shape == evals['image'].shape == (4, 32, 32, 3)
  with pytest.raises(ValueError):
    ip.train_batches(split, 4, 48, seed=0, resize_to=40)


def test_fashion_style_augmentation_pads_crops_and_flips():
  # A left-to-right ramp shows flips (reversed) and shifted crops.
  ramp = np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1))[None, :, :, None]
  split = ip.Split(np.repeat(ramp, 16, axis=0), np.zeros(16, int), ['a'])
  batch = next(ip.train_batches(split, 16, 28, seed=0, crop_padding=2,
                                **IDENTITY))
  rows = np.rint(batch['image'][:, 14, :, 0] * 255)
  assert batch['image'].shape == (16, 28, 28, 1)
  flipped = [np.all(np.diff(r[3:-3]) < 0) for r in rows]
  assert any(flipped) and not all(flipped)
  assert len({tuple(r) for r in rows}) > 2


# ---------------------------------------------------------------------------
# Training stream: determinism, epochs, resume, processes.


def test_train_stream_is_deterministic():
  split = _index_split(20)
  kwargs = dict(crop_padding=2, **IDENTITY)
  first = _take(ip.train_batches(split, 4, 8, seed=3, **kwargs), 12)
  again = _take(ip.train_batches(split, 4, 8, seed=3, **kwargs), 12)
  other = _take(ip.train_batches(split, 4, 8, seed=4, **kwargs), 12)
  for a, b in zip(first, again):
    assert np.array_equal(a['image'], b['image'])
    assert np.array_equal(a['label'], b['label'])
  assert any(not np.array_equal(a['image'], b['image'])
             for a, b in zip(first, other))


def test_train_epochs_are_reshuffled_permutations():
  split = _index_split(12)
  batches = _take(ip.train_batches(split, 4, 8, seed=0, **IDENTITY), 9)
  epochs = [np.concatenate([_ids(b) for b in batches[i:i + 3]])
            for i in (0, 3, 6)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(12))
  assert not np.array_equal(epochs[0], epochs[1])
  assert np.array_equal(batches[0]['label'], _ids(batches[0]) % 3)
  # drop_remainder=True drops a different remainder every epoch.
  split = _index_split(10)
  assert ip.steps_per_epoch(10, 4) == 2
  batches = _take(ip.train_batches(split, 4, 8, seed=0, **IDENTITY), 8)
  seen = [set(np.concatenate([_ids(b) for b in batches[i:i + 2]]))
          for i in range(0, 8, 2)]
  assert all(len(s) == 8 for s in seen) and len({frozenset(s)
                                                  for s in seen}) > 1


def test_train_without_drop_remainder_yields_short_batches():
  split = _index_split(10)
  assert ip.steps_per_epoch(10, 4, drop_remainder=False) == 3
  batches = _take(ip.train_batches(split, 4, 8, seed=0, drop_remainder=False,
                                   **IDENTITY), 6)
  assert [len(b['label']) for b in batches] == [4, 4, 2, 4, 4, 2]
  for start in (0, 3):
    ids = np.concatenate([_ids(b) for b in batches[start:start + 3]])
    assert sorted(ids) == list(range(10))
  with pytest.raises(ValueError):
    ip.train_batches(split, 4, 8, seed=0, drop_remainder=False,
                     process_count=2)
  with pytest.raises(ValueError) as e:
    ip.train_batches(split, 16, 8, seed=0)
  _assert_one_line(e, 'drop_remainder=False')


@pytest.mark.parametrize('drop_remainder', [True, False])
def test_train_resume_matches_uninterrupted_stream(drop_remainder):
  split = _index_split(10)
  kwargs = dict(seed=7, crop_padding=2, drop_remainder=drop_remainder,
                **IDENTITY)
  full = _take(ip.train_batches(split, 4, 8, **kwargs), 11)
  # 5 crosses an epoch boundary; 6 starts exactly on one for drop=False.
  for start in (1, 5, 6):
    resumed = _take(ip.train_batches(split, 4, 8, start_step=start, **kwargs),
                    11 - start)
    for a, b in zip(full[start:], resumed):
      assert np.array_equal(a['image'], b['image'])
      assert np.array_equal(a['label'], b['label'])


def test_train_resume_from_files(folder):
  train, _ = ip.image_folder_splits(folder, 4, seed=0)
  kwargs = dict(seed=1, resize_to=24, start_step=0)
  full = _take(ip.train_batches(train, 4, 16, **kwargs), 5)
  kwargs['start_step'] = 4
  resumed = next(ip.train_batches(train, 4, 16, **kwargs))
  assert np.array_equal(full[4]['image'], resumed['image'])


def test_process_slices_concatenate_to_global_batch():
  split = _index_split(24, channels=3)
  kwargs = dict(seed=2, crop_padding=1, start_step=3)
  whole = _take(ip.train_batches(split, 8, 8, **kwargs), 4)
  parts = [_take(ip.train_batches(split, 8, 8, process_index=i,
                                  process_count=4, **kwargs), 4)
           for i in range(4)]
  for step, batch in enumerate(whole):
    for key in ('image', 'label'):
      assert np.array_equal(
          batch[key], np.concatenate([p[step][key] for p in parts]))
  with pytest.raises(ValueError):
    ip.train_batches(split, 8, 8, seed=0, process_count=3)
  with pytest.raises(ValueError):
    ip.train_batches(split, 8, 8, seed=0, process_index=4, process_count=4)


# ---------------------------------------------------------------------------
# Evaluation.


def test_eval_covers_every_example_once():
  split = _index_split(10)
  batches = list(ip.eval_batches(split, 4, 8, **IDENTITY))
  assert len(batches) == ip.eval_num_batches(10, 4) == 3
  assert all(b['image'].shape == (4, 8, 8, 1) for b in batches)
  ids = np.concatenate([_ids(b) for b in batches])
  mask = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  assert mask.dtype == np.float32
  assert np.array_equal(ids[mask == 1], np.arange(10))
  assert np.array_equal(labels[mask == 1], np.arange(10) % 3)
  # Padding rows repeat the last batch's first example.
  assert np.array_equal(ids[mask == 0], [8, 8])
  padded = list(ip.eval_batches(split, 4, 8, pad_to_multiple=2, **IDENTITY))
  assert len(padded) == ip.eval_num_batches(10, 4, 2) == 4
  assert padded[3]['mask'].sum() == 0


def test_eval_process_slices():
  split = _index_split(10)
  whole = list(ip.eval_batches(split, 4, 8, **IDENTITY))
  parts = [list(ip.eval_batches(split, 4, 8, process_index=i, process_count=2,
                                **IDENTITY)) for i in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole)
  for step, batch in enumerate(whole):
    for key in ('image', 'label', 'mask'):
      assert np.array_equal(
          batch[key], np.concatenate([p[step][key] for p in parts]))


# ---------------------------------------------------------------------------
# TFDS (mocked: no download).


def _fake_tfds(requested, num=12, corrupt_index=None):
  """An ``as_dataset_fn`` for tfds.testing.mock_data that records splits."""

  def as_dataset(self, split, **unused_kwargs):
    requested.append((self.name, split))
    rng = np.random.default_rng(len(requested))
    images = [_png(_rgb(rng, 30 + i, 20 + i)) if i % 2 else _jpeg(
        _rgb(rng, 20 + i, 30)) for i in range(num)]
    if corrupt_index is not None:
      images[corrupt_index] = b'broken'
    return tf.data.Dataset.from_tensor_slices({
        'image': tf.constant(images, tf.string),
        'label': tf.constant(np.arange(num) % 3, tf.int64)})

  return as_dataset


def test_tfds_caltech_birds(tmp_path):
  requested = []
  with tfds.testing.mock_data(as_dataset_fn=_fake_tfds(requested,
                                                       corrupt_index=5)):
    train, test = ip.tfds_splits('caltech_birds2011', data_dir=str(tmp_path),
                                 train_per_class=3, seed=0)
  assert requested == [('caltech_birds2011', 'train'),
                       ('caltech_birds2011', 'test')]
  assert train.num_classes == 200
  assert train.images.dtype == object and isinstance(train.images[0], bytes)
  assert np.array_equal(np.bincount(train.labels), [3, 3, 3])
  assert train.skipped == ('tfds:caltech_birds2011/train[5]',)
  assert len(test) == 11
  batch = next(ip.eval_batches(test, 4, 24, resize_to=28))
  assert batch['image'].shape == (4, 24, 24, 3)


def test_tfds_food101_uses_validation_split():
  requested = []
  with tfds.testing.mock_data(as_dataset_fn=_fake_tfds(requested)):
    ip.tfds_splits('food101', validate=False)
  assert [split for _, split in requested] == ['train', 'validation']
  # The stock random mock data works as well.
  with tfds.testing.mock_data(num_examples=4):
    train, test = ip.tfds_splits('food101')
  assert len(train) == len(test) == 4 and train.num_classes == 101


def test_tfds_offline_error(tmp_path, monkeypatch):
  def no_network(*unused_args, **unused_kwargs):
    raise ConnectionError('no internet')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      no_network)
  with pytest.raises(FileNotFoundError) as e:
    ip.tfds_splits('stanford_dogs', data_dir=str(tmp_path))
  _assert_one_line(e, "'stanford_dogs'", str(tmp_path),
                   '--config.dataset.data_dir')


def test_tfds_offline_fails_fast_without_downloading(tmp_path, monkeypatch,
                                                    check_reachable):
  # Offline, TFDS's own downloader retries for minutes; the hosts are probed
  # first. No proxy, so the probe runs.
  for var in ('http_proxy', 'https_proxy', 'HTTP_PROXY', 'HTTPS_PROXY',
              'all_proxy', 'ALL_PROXY'):
    monkeypatch.delenv(var, raising=False)
  probed = []

  def no_dns(address, timeout=None):
    probed.append((address, timeout))
    raise socket.gaierror(-2, 'Name or service not known')

  def must_not_download(*unused_args, **unused_kwargs):
    raise AssertionError('download_and_prepare ran')

  monkeypatch.setattr(socket, 'create_connection', no_dns)
  monkeypatch.setattr(ip, '_check_reachable', check_reachable)
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      must_not_download)
  with pytest.raises(FileNotFoundError) as e:
    ip.tfds_splits('food101', data_dir=str(tmp_path))
  _assert_one_line(e, "'food101'", 'cannot reach data.vision.ee.ethz.ch:80',
                   '--config.dataset.data_dir')
  assert probed == [(('data.vision.ee.ethz.ch', 80), 10.0)]

  # Behind a proxy the direct probe would be wrong: TFDS downloads.
  monkeypatch.setenv('https_proxy', 'http://proxy.example:3128')
  monkeypatch.setenv('http_proxy', 'http://proxy.example:3128')
  with pytest.raises(FileNotFoundError, match='download_and_prepare ran'):
    ip.tfds_splits('food101', data_dir=str(tmp_path))
  assert len(probed) == 1


# ---------------------------------------------------------------------------
# Fashion-MNIST.


def _idx_bytes(array, magic):
  header = struct.pack('>I', magic) + struct.pack(f'>{array.ndim}I',
                                                  *array.shape)
  return header + array.astype(np.uint8).tobytes()


def _write_fashion(folder, per_class=(6, 3), seed=0):
  """Writes the four idx .gz files; pixel [0, 0] of image i holds i % 256."""
  rng = np.random.default_rng(seed)
  names = {'train': ('train-images-idx3-ubyte.gz',
                     'train-labels-idx1-ubyte.gz'),
           'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}
  arrays = {}
  os.makedirs(folder, exist_ok=True)
  for (part, (images_name, labels_name)), count in zip(names.items(),
                                                       per_class):
    labels = rng.permutation(np.repeat(np.arange(10), count))
    images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(len(labels)) % 256
    with gzip.open(os.path.join(folder, images_name), 'wb') as f:
      f.write(_idx_bytes(images, 0x803))
    with gzip.open(os.path.join(folder, labels_name), 'wb') as f:
      f.write(_idx_bytes(labels, 0x801))
    arrays[part] = (images, labels)
  return arrays


def test_fashion_mnist_idx_files(tmp_path):
  written = _write_fashion(str(tmp_path))
  data = ip.fashion_mnist_arrays(str(tmp_path))
  for part, (images, labels) in written.items():
    assert data[part].images.shape == (len(labels), 28, 28, 1)
    assert data[part].images.dtype == np.uint8
    assert data[part].labels.dtype == np.int32
    assert np.array_equal(data[part].images[..., 0], images)
    assert np.array_equal(data[part].labels, labels)
  assert data['train'].class_names[9] == 'Ankle boot'


@pytest.mark.parametrize('damage', ['magic', 'truncated', 'not_gzip',
                                    'missing'])
def test_fashion_mnist_corrupt_files(tmp_path, damage):
  _write_fashion(str(tmp_path))
  path = str(tmp_path / 't10k-labels-idx1-ubyte.gz')
  if damage == 'magic':
    with gzip.open(path, 'wb') as f:
      f.write(_idx_bytes(np.zeros(30), 0x803))
  elif damage == 'truncated':
    with gzip.open(path, 'wb') as f:
      f.write(_idx_bytes(np.zeros(30), 0x801)[:-5])
  elif damage == 'not_gzip':
    _write(path, b'plain bytes, not gzip')
  else:
    os.remove(path)
  error = FileNotFoundError if damage == 'missing' else ValueError
  with pytest.raises(error) as e:
    ip.fashion_mnist_arrays(str(tmp_path))
  _assert_one_line(e, path)


def test_fashion_mnist_falls_back_to_tfds(tmp_path, monkeypatch):
  with tfds.testing.mock_data(num_examples=5):
    data = ip.fashion_mnist_arrays(str(tmp_path))
  assert data['train'].images.shape == (5, 28, 28, 1)
  assert data['test'].labels.dtype == np.int32

  def no_network(*unused_args, **unused_kwargs):
    raise ConnectionError('no internet')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      no_network)
  with pytest.raises(FileNotFoundError) as e:
    ip.fashion_mnist_arrays(str(tmp_path),
                            tfds_data_dir=str(tmp_path / 'tfds'))
  _assert_one_line(e, 'apt-get install dataset-fashion-mnist', str(tmp_path))


def test_fashion_mnist_transfer_splits(tmp_path):
  written = _write_fashion(str(tmp_path))
  (train_images, train_labels), (_, test_labels) = (written['train'],
                                                    written['test'])
  splits = ip.fashion_mnist_transfer_splits(str(tmp_path), [7, 2], [4, 0, 9],
                                            shots_per_class=2, seed=0)
  source = splits['source_train']
  assert source.class_names == ['Sneaker', 'Pullover']
  assert np.array_equal(np.bincount(source.labels), [6, 6])
  assert np.array_equal(np.bincount(splits['source_test'].labels), [3, 3])
  # Each remapped image is the original one of its class.
  originals = train_labels[source.images[:, 0, 0, 0]]
  assert np.array_equal(originals, np.array([7, 2])[source.labels])
  target = splits['target_train']
  assert target.class_names == ['Coat', 'T-shirt/top', 'Ankle boot']
  assert np.array_equal(np.bincount(target.labels), [2, 2, 2])
  assert np.array_equal(train_labels[target.images[:, 0, 0, 0]],
                        np.array([4, 0, 9])[target.labels])
  assert np.array_equal(train_images[target.images[:, 0, 0, 0]],
                        target.images[..., 0])
  target_test = splits['target_test']
  assert len(target_test) == 9
  assert np.array_equal(test_labels[target_test.images[:, 0, 0, 0]],
                        np.array([4, 0, 9])[target_test.labels])
  again = ip.fashion_mnist_transfer_splits(str(tmp_path), [7, 2], [4, 0, 9],
                                           2, seed=0)
  assert np.array_equal(again['target_train'].images, target.images)
  other = ip.fashion_mnist_transfer_splits(str(tmp_path), [7, 2], [4, 0, 9],
                                           2, seed=1)
  assert not np.array_equal(other['target_train'].images, target.images)


@pytest.mark.parametrize('source,target,shots,field', [
    ([], [1], 1, 'source_classes'),
    ([0, 10], [1], 1, 'source_classes'),
    ([0, 0], [1], 1, 'source_classes'),
    ([0], [], 1, 'target_classes'),
    ([0, 1], [1, 2], 1, 'target_classes'),
    ([0], [1], 0, 'shots_per_class'),
    ([0], [1], 7, 'shots_per_class'),
])
def test_fashion_mnist_transfer_errors(tmp_path, source, target, shots, field):
  _write_fashion(str(tmp_path))
  with pytest.raises(ValueError) as e:
    ip.fashion_mnist_transfer_splits(str(tmp_path), source, target, shots, 0)
  _assert_one_line(e, field)


@pytest.mark.skipif(
    not os.path.exists(os.path.join(ip.FASHION_MNIST_DIR,
                                    'train-images-idx3-ubyte.gz')),
    reason=f'real Fashion-MNIST not installed in {ip.FASHION_MNIST_DIR} '
    '(apt-get install dataset-fashion-mnist)')
def test_real_fashion_mnist():
  data = ip.fashion_mnist_arrays()
  assert data['train'].images.shape == (60000, 28, 28, 1)
  assert data['test'].images.shape == (10000, 28, 28, 1)
  assert np.array_equal(np.bincount(data['train'].labels), [6000] * 10)
  mean = data['train'].images.mean() / 255
  std = data['train'].images.std() / 255
  np.testing.assert_allclose(mean, ip.FASHION_MNIST_MEAN[0], atol=1e-4)
  np.testing.assert_allclose(std, ip.FASHION_MNIST_STD[0], atol=1e-4)
