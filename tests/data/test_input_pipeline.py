"""Tests of dtq_jax.data.input_pipeline (tf.data preprocessing and batching) and of
the batches that datasets.Data gives through it.

Everything runs offline on small data the tests write themselves.
"""

import base64
import itertools
import os
import struct

import numpy as np
import pytest

import data_files
from data_files import assert_one_line
from dtq_jax.data import datasets
from dtq_jax.data import input_pipeline as ip
from dtq_jax.data import sources
from dtq_jax.data import splits

# Normalisation that keeps pixels on the 0..1 scale, so tests can read the
# original pixel values back from a batch.
IDENTITY = {'mean': (0.0,), 'std': (1.0,)}
IDENTITY3 = {'mean': (0.0,) * 3, 'std': (1.0,) * 3}
PER_CLASS = data_files.PER_CLASS
_index_split = data_files.index_split


@pytest.fixture(name='folder', scope='module')
def folder_fixture(tmp_path_factory):
  return data_files.write_folder(str(tmp_path_factory.mktemp('folder')))


def _ids(batch):
  """Example indices of an _index_split batch (normalised with IDENTITY)."""
  return np.rint(batch['image'][:, 0, 0, 0] * 255).astype(int)


def _take(iterator, count):
  return list(itertools.islice(iterator, count))


# ---------------------------------------------------------------------------
# Decoding.


def test_folder_pipeline_decodes_gray_and_rgba(folder):
  part1, part2 = splits.image_folder_splits(folder, PER_CLASS // 2, seed=0)
  train = sources.Split(part1.images + part2.images,
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
  data_files.write(str(tmp_path / 'x' / 'a.bmp'), _bmp(image))
  data_files.write(str(tmp_path / 'x' / 'b.GIF'), _GIF)
  data_files.write(str(tmp_path / 'x' / 'c.png'), data_files.png(image))
  train, test = splits.image_folder_splits(str(tmp_path), test_per_class=1,
                                           seed=0)
  assert len(train) + len(test) == 3 and not train.skipped
  whole = sources.Split(sorted(train.images + test.images), [0, 0, 0], ['x'])
  batch = next(ip.eval_batches(whole, 3, 8, resize_to=8, **IDENTITY3))
  np.testing.assert_allclose(batch['image'][0] * 255, image, atol=1e-3)
  np.testing.assert_allclose(batch['image'][2] * 255, image, atol=1e-3)


def test_split_needs_resize_for_files(folder):
  train, _ = splits.image_folder_splits(folder, 2, 2, seed=0)
  with pytest.raises(ValueError) as e:
    ip.eval_batches(train, 4, 32)
  assert_one_line(e, 'resize_to')


# ---------------------------------------------------------------------------
# Preprocessing.


def test_normalisation_and_centre_crop():
  image = np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1) * 3
  split = sources.Split(np.concatenate([image, image]), [0, 1], ['a', 'b'])
  batch = next(ip.eval_batches(split, 2, 4, mean=(0.5,), std=(0.25,)))
  expected = (image[0, 2:6, 2:6].astype(np.float32) / 255 - 0.5) / 0.25
  np.testing.assert_allclose(batch['image'][0], expected, atol=1e-6)
  rgb = sources.Split(np.full((2, 6, 6, 3), 255, np.uint8), [0, 0], ['a'])
  batch = next(ip.eval_batches(rgb, 2, 6))
  np.testing.assert_allclose(
      batch['image'][0, 0, 0],
      (1 - np.array(ip.IMAGENET_MEAN)) / np.array(ip.IMAGENET_STD), rtol=1e-6)


def test_resize_then_crop_shapes():
  split = sources.Split(np.random.default_rng(0).integers(
      0, 256, (4, 50, 40, 3), dtype=np.uint8), [0, 1, 0, 1], ['a', 'b'])
  train = next(ip.train_batches(split, 4, 32, seed=0, resize_to=40))
  evals = next(ip.eval_batches(split, 4, 32, resize_to=40))
  assert train['image'].shape == evals['image'].shape == (4, 32, 32, 3)
  with pytest.raises(ValueError):
    ip.train_batches(split, 4, 48, seed=0, resize_to=40)


def test_fashion_style_augmentation_pads_crops_and_flips():
  # A left-to-right ramp shows flips (reversed) and shifted crops.
  ramp = np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1))[None, :, :, None]
  split = sources.Split(np.repeat(ramp, 16, axis=0), np.zeros(16, int), ['a'])
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
  assert_one_line(e, 'drop_remainder=False')


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
  train, _ = splits.image_folder_splits(folder, 4, seed=0)
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
# datasets.Data: its batches are the pipeline functions' batches.


def _same_batches(got, expected):
  assert len(got) == len(expected)
  for a, b in zip(got, expected):
    assert a.keys() == b.keys()
    for key in a:
      assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
      assert a[key].tobytes() == b[key].tobytes(), key


@pytest.mark.parametrize('files', [False, True])
def test_data_methods_give_the_pipeline_functions_batches(folder, files):
  if files:
    train, test = splits.image_folder_splits(folder, 5, seed=0)
    kwargs = dict(image_size=16, resize_to=20, mean=(0.4, 0.5, 0.6),
                  std=(0.2, 0.3, 0.25))
  else:
    train, test = _index_split(20), _index_split(10)
    kwargs = dict(image_size=8, resize_to=None, mean=(0.3,), std=(0.2,))
  data = datasets.Data(train, test, None,
                       datasets.Preprocessing(crop_padding=2, **kwargs))
  assert data.image_shape == (kwargs['image_size'],) * 2 + (train.channels,)
  assert data.steps_per_epoch(4) == ip.steps_per_epoch(len(train), 4)
  for start_step, process_index, process_count in ((0, 0, 1), (6, 1, 2)):
    got = data.train_batches(4, seed=3, start_step=start_step,
                             process_index=process_index,
                             process_count=process_count)
    expected = ip.train_batches(train, 4, seed=3, start_step=start_step,
                                crop_padding=2, process_index=process_index,
                                process_count=process_count, **kwargs)
    _same_batches(_take(got, 7), _take(expected, 7))
  for process_index, process_count in ((0, 1), (1, 2)):
    got = list(data.eval_batches(test, 4, process_index=process_index,
                                 process_count=process_count))
    expected = list(ip.eval_batches(test, 4, process_index=process_index,
                                    process_count=process_count, **kwargs))
    _same_batches(got, expected)
    assert len(got) == data.num_eval_batches(test, 4)


def test_load_gives_the_configs_splits_and_preprocessing(tiny_folder):
  root, make_config = tiny_folder
  config = make_config(root)
  config.dataset.val_fraction = 0.2
  config.dataset.crop_padding = 1
  config.batch_size = 4
  data = datasets.load(config)
  d = config.dataset
  assert data.preprocessing == datasets.Preprocessing(
      image_size=16, resize_to=18, mean=tuple(d.mean), std=tuple(d.std),
      crop_padding=1)
  train, test = splits.image_folder_splits(str(root), 5, 3, seed=d.data_seed)
  train, val = splits.split_validation(train, 0.2, d.data_seed)
  for got, expected in ((data.train, train), (data.val, val),
                        (data.test, test)):
    assert got.images == expected.images
    assert np.array_equal(got.labels, expected.labels)
  assert data.num_classes == 3 and data.image_shape == (16, 16, 3)
