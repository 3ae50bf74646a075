"""Tests of dtq_jax.data.splits: per-class subsets, validation, transfer tasks.

Everything runs offline on small data the tests write themselves (image
folders, idx files); TFDS reads are replaced by an in-memory split.
"""

import os

import numpy as np
import pytest

import data_files
from data_files import assert_one_line
from dtq_jax.data import sources
from dtq_jax.data import splits

PER_CLASS = data_files.PER_CLASS


@pytest.fixture(name='folder', scope='module')
def folder_fixture(tmp_path_factory):
  return data_files.write_folder(str(tmp_path_factory.mktemp('folder')))


# ---------------------------------------------------------------------------
# Per-class sampling.


def test_per_class_subset_is_deterministic_and_nested():
  labels = np.repeat(np.arange(4), 10)[np.random.default_rng(1).permutation(40)]
  small = splits.per_class_subset(labels, 3, seed=5)
  assert np.array_equal(small, np.sort(small))
  assert np.array_equal(np.bincount(labels[small]), [3, 3, 3, 3])
  assert np.array_equal(small, splits.per_class_subset(labels, 3, seed=5))
  assert not np.array_equal(small, splits.per_class_subset(labels, 3, seed=6))
  assert set(small) <= set(splits.per_class_subset(labels, 6, seed=5))
  with pytest.raises(ValueError) as e:
    splits.per_class_subset(labels, 11, seed=0)
  assert_one_line(e, 'per_class=11')


def test_split_validation_is_stratified():
  split = data_files.index_split(30)
  train, val = splits.split_validation(split, 0.2, seed=0)
  assert np.array_equal(np.bincount(val.labels), [2, 2, 2])
  assert np.array_equal(np.bincount(train.labels), [8, 8, 8])
  ids = np.concatenate([train.images[:, 0, 0, 0], val.images[:, 0, 0, 0]])
  assert sorted(ids) == list(range(30))
  with pytest.raises(ValueError):
    splits.split_validation(data_files.index_split(3), 0.5, seed=0)


# ---------------------------------------------------------------------------
# Image folders.


def test_folder_random_split(folder):
  train, test = splits.image_folder_splits(folder, 3, 2, seed=0)
  assert train.class_names == ['ant', 'bee', 'cat']
  assert np.array_equal(np.bincount(train.labels), [3, 3, 3])
  assert np.array_equal(np.bincount(test.labels), [2, 2, 2])
  assert not set(train.images) & set(test.images)
  assert sorted(os.path.basename(p) for p in train.skipped) == [
      'corrupt.jpg', 'truncated.jpeg']
  for path, label in zip(train.images + test.images,
                         np.concatenate([train.labels, test.labels])):
    assert os.path.basename(os.path.dirname(path)) == train.class_names[label]

  again, _ = splits.image_folder_splits(folder, 3, 2, seed=0)
  assert again.images == train.images
  other, _ = splits.image_folder_splits(folder, 3, 2, seed=1)
  assert other.images != train.images
  # The test set does not depend on train_per_class and training sets nest.
  bigger, same_test = splits.image_folder_splits(folder, 5, 2, seed=0)
  assert same_test.images == test.images
  assert set(train.images) <= set(bigger.images)
  # Without test_per_class, every remaining image is a test image.
  train, rest = splits.image_folder_splits(folder, 3, seed=0)
  assert np.array_equal(np.bincount(rest.labels), [PER_CLASS - 3] * 3)
  assert not set(train.images) & set(rest.images)


def test_folder_official_layout(tmp_path):
  rng = np.random.default_rng(2)
  for part, count in (('train', 6), ('test', 3)):
    for name in ('x', 'y'):
      data_files.make_class(str(tmp_path / part / name), count, rng)
  train, test = splits.image_folder_splits(str(tmp_path))
  assert np.array_equal(np.bincount(train.labels), [6, 6])
  assert np.array_equal(np.bincount(test.labels), [3, 3])
  assert all('/train/' in p for p in train.images)
  assert all('/test/' in p for p in test.images)
  sub, test2 = splits.image_folder_splits(str(tmp_path), train_per_class=4,
                                          seed=3)
  assert np.array_equal(np.bincount(sub.labels), [4, 4])
  assert set(sub.images) <= set(train.images) and test2.images == test.images
  again, _ = splits.image_folder_splits(str(tmp_path), 4, seed=3)
  assert sub.images == again.images


def test_folder_count_errors(folder):
  with pytest.raises(ValueError) as e:
    splits.image_folder_splits(folder, 6, 3)
  assert_one_line(e, 'train_per_class + test_per_class = 9', 'has 8')

  with pytest.raises(ValueError) as e:
    splits.image_folder_splits(folder)
  assert_one_line(e, 'train_per_class or test_per_class')


# ---------------------------------------------------------------------------
# TFDS.


def test_tfds_splits_subsamples_the_training_split(monkeypatch):
  whole = data_files.index_split(12)
  calls = []

  def read_tfds(*args, **kwargs):
    calls.append((args, kwargs))
    return whole, whole

  monkeypatch.setattr(sources, 'read_tfds', read_tfds)
  train, test = splits.tfds_splits('food101', '/data', train_per_class=2,
                                   seed=4)
  assert calls == [(('food101', '/data', None, None), {'validate': True})]
  assert np.array_equal(np.bincount(train.labels), [2, 2, 2])
  assert np.array_equal(
      train.images, whole.images[splits.per_class_subset(whole.labels, 2, 4)])
  assert test is whole
  assert splits.tfds_splits('food101')[0] is whole


# ---------------------------------------------------------------------------
# The Fashion-MNIST demo's transfer split.


def test_fashion_mnist_transfer_splits(tmp_path):
  written = data_files.write_fashion(str(tmp_path))
  (train_images, train_labels), (_, test_labels) = (written['train'],
                                                    written['test'])
  s = splits.fashion_mnist_transfer_splits(str(tmp_path), [7, 2], [4, 0, 9],
                                           shots_per_class=2, seed=0)
  source = s['source_train']
  assert source.class_names == ['Sneaker', 'Pullover']
  assert np.array_equal(np.bincount(source.labels), [6, 6])
  assert np.array_equal(np.bincount(s['source_test'].labels), [3, 3])
  # Each remapped image is the original one of its class.
  originals = train_labels[source.images[:, 0, 0, 0]]
  assert np.array_equal(originals, np.array([7, 2])[source.labels])
  target = s['target_train']
  assert target.class_names == ['Coat', 'T-shirt/top', 'Ankle boot']
  assert np.array_equal(np.bincount(target.labels), [2, 2, 2])
  assert np.array_equal(train_labels[target.images[:, 0, 0, 0]],
                        np.array([4, 0, 9])[target.labels])
  assert np.array_equal(train_images[target.images[:, 0, 0, 0]],
                        target.images[..., 0])
  target_test = s['target_test']
  assert len(target_test) == 9
  assert np.array_equal(test_labels[target_test.images[:, 0, 0, 0]],
                        np.array([4, 0, 9])[target_test.labels])
  again = splits.fashion_mnist_transfer_splits(str(tmp_path), [7, 2],
                                               [4, 0, 9], 2, seed=0)
  assert np.array_equal(again['target_train'].images, target.images)
  other = splits.fashion_mnist_transfer_splits(str(tmp_path), [7, 2],
                                               [4, 0, 9], 2, seed=1)
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
  data_files.write_fashion(str(tmp_path))
  with pytest.raises(ValueError) as e:
    splits.fashion_mnist_transfer_splits(str(tmp_path), source, target, shots,
                                         0)
  assert_one_line(e, field)
