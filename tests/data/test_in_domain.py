"""The demo's in-domain split: the teacher's and the target's images apart.

Synthetic labels and idx files the tests write, plus the real Fashion-MNIST
labels when the Debian package is installed; nothing is trained.
"""

import os

import numpy as np
import pytest

import data_files
from data_files import assert_one_line
from configs import fmnist
from dtq_jax.data import datasets
from dtq_jax.data import sources
from dtq_jax.data import splits
from dtq_jax.infra import errors
from dtq_jax.run import config_validation
from dtq_jax.run import teacher as teacher_lib

_FILES = os.path.join(sources.FASHION_MNIST_DIR, 'train-labels-idx1-ubyte.gz')


def _labels(per_class=20, classes=10, seed=3):
  return np.random.default_rng(seed).permutation(
      np.repeat(np.arange(classes), per_class))


def test_indices_are_disjoint_and_counted():
  labels = _labels()
  teacher, target = splits.in_domain_indices(
      labels, range(10), [2, 5, 7], teacher_per_class=12, shots_per_class=5,
      seed=0)
  assert not set(teacher) & set(target)
  assert np.array_equal(np.bincount(labels[teacher], minlength=10),
                        [12] * 10)
  assert np.array_equal(np.bincount(labels[target], minlength=10),
                        [0, 0, 5, 0, 0, 5, 0, 5, 0, 0])
  assert np.array_equal(teacher, np.sort(teacher))
  # The teacher's part does not depend on the target's seed; the shots do,
  # and with one seed they are nested across shot counts.
  teacher_1, target_1 = splits.in_domain_indices(labels, range(10), [2, 5, 7],
                                                 12, 5, seed=1)
  assert np.array_equal(teacher_1, teacher)
  assert not np.array_equal(target_1, target)
  _, more = splits.in_domain_indices(labels, range(10), [2, 5, 7], 12, 8,
                                     seed=0)
  assert set(target) <= set(more) and not set(more) & set(teacher)
  teacher_other, _ = splits.in_domain_indices(labels, range(10), [2], 12, 5,
                                              seed=0, teacher_seed=1)
  assert not np.array_equal(teacher_other, teacher)


def test_indices_of_classes_outside_the_teacher():
  labels = _labels()
  teacher, target = splits.in_domain_indices(labels, [0, 1], [1, 9], 15, 5,
                                             seed=0)
  assert np.array_equal(np.bincount(labels[teacher], minlength=10),
                        [15, 15] + [0] * 8)
  assert np.array_equal(np.bincount(labels[target], minlength=10),
                        [0, 5] + [0] * 7 + [5])
  # Class 9 is not the teacher's: all its 20 images are free for the target.
  _, target = splits.in_domain_indices(labels, [0, 1], [9], 15, 20, seed=0)
  assert np.array_equal(np.bincount(labels[target], minlength=10),
                        [0] * 9 + [20])


@pytest.mark.parametrize('teacher,shots,field', [
    (0, 1, 'teacher_per_class'),
    (20, 1, 'teacher_per_class'),
    (5, 0, 'shots_per_class'),
    (5, 16, 'shots_per_class'),
    (True, 1, 'teacher_per_class'),
])
def test_indices_errors_name_the_field(teacher, shots, field):
  with pytest.raises(ValueError) as e:
    splits.in_domain_indices(_labels(), range(10), range(10), teacher, shots,
                             seed=0)
  assert_one_line(e, field)


def test_splits_from_idx_files(tmp_path):
  written = data_files.write_fashion(str(tmp_path), per_class=(20, 3))
  train_labels = written['train'][1]
  s = splits.fashion_mnist_in_domain_splits(
      str(tmp_path), range(10), [9, 4], teacher_per_class=15,
      shots_per_class=3, seed=0)
  # Pixel [0, 0] of each image holds its index in the training set (200
  # images, so the index is unique).
  teacher_ids = s['source_train'].images[:, 0, 0, 0]
  target_ids = s['target_train'].images[:, 0, 0, 0]
  assert not set(teacher_ids) & set(target_ids)
  assert np.array_equal(np.bincount(s['source_train'].labels), [15] * 10)
  assert np.array_equal(train_labels[teacher_ids], s['source_train'].labels)
  assert s['target_train'].class_names == ['Ankle boot', 'Coat']
  assert np.array_equal(np.bincount(s['target_train'].labels), [3, 3])
  assert np.array_equal(train_labels[target_ids],
                        np.array([9, 4])[s['target_train'].labels])
  assert len(s['source_test']) == 30 and len(s['target_test']) == 6


def _config(arg):
  config = fmnist.get_config(arg)
  config.dataset.data_dir = '/nonexistent'  # the teacher key reads no files.
  return config


def test_config_variant_composes_and_validates():
  config = fmnist.get_config('in_domain,quick')
  assert config.dataset.split == 'in_domain'
  assert tuple(config.dataset.source_classes) == tuple(range(10))
  assert config.total_steps == fmnist.get_config('quick').total_steps
  config_validation.validate(config)
  assert fmnist.get_config().dataset.split == 'in_domain'  # the default.
  out = fmnist.get_config('out_of_domain,quick')
  assert out.dataset.split == 'out_of_domain'
  assert tuple(out.dataset.target_classes) == (5, 6, 7, 8, 9)
  config_validation.validate(out)
  with pytest.raises(ValueError) as e:
    fmnist.get_config('in_domain,out_of_domain')
  assert_one_line(e, 'exclude each other')
  bad = fmnist.get_config('out_of_domain')
  bad.dataset.target_classes = (4, 5)
  with pytest.raises(errors.ConfigError) as e:
    config_validation.validate(bad)
  assert_one_line(e, 'dataset.target_classes')


def _key(config):
  return teacher_lib._teacher_key(teacher_lib.teacher_config(config),
                                  config.dataset)


def test_teacher_cache_key_follows_the_split():
  out, inside = _config('out_of_domain'), _config('in_domain')
  assert _key(out) != _key(inside)
  # Same classes, different split kind: still another teacher.
  inside.dataset.source_classes = out.dataset.source_classes
  assert _key(out) != _key(inside)
  other_part = _config('in_domain')
  other_part.dataset.teacher_seed = 1
  assert _key(other_part) != _key(_config('in_domain'))


def test_load_rejects_an_unknown_split(tmp_path):
  data_files.write_fashion(str(tmp_path))
  config = fmnist.get_config('in_domain')
  config.dataset.data_dir = str(tmp_path)
  config.dataset.split = 'sideways'
  with pytest.raises(errors.UserError) as e:
    datasets.load(config)
  assert_one_line(e, 'dataset.split')


@pytest.mark.skipif(
    not os.path.exists(_FILES),
    reason=f'{_FILES} is absent (apt-get install dataset-fashion-mnist)')
def test_demo_split_on_the_real_files():
  config = fmnist.get_config('in_domain')
  data = datasets.load(config)
  d = config.dataset
  assert np.array_equal(np.bincount(data.source.train.labels),
                        [d.teacher_per_class] * 10)
  assert np.array_equal(np.bincount(data.train.labels),
                        [d.shots_per_class] * 10)
  assert len(data.test) == 10000 and data.source.num_classes == 10
  # Disjoint by index into the official training set.
  labels = sources.fashion_mnist_arrays()['train'].labels
  teacher, target = splits.in_domain_indices(
      labels, d.source_classes, d.target_classes, d.teacher_per_class,
      d.shots_per_class, d.data_seed, d.teacher_seed)
  assert not set(teacher) & set(target)
  assert len(teacher) == 10 * d.teacher_per_class
