"""Tests of dtq_jax.data.sources: reading image folders, TFDS and Fashion-MNIST.

Everything runs offline on small data the tests write themselves (image
folders, idx files, mocked TFDS); the real Fashion-MNIST files are read only
where the Debian package put them.
"""

import gzip
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

import data_files
from data_files import assert_one_line
from dtq_jax.data import input_pipeline
from dtq_jax.data import sources
from dtq_jax.data import splits
from dtq_jax.data import tfds_tasks
from dtq_jax.run import config_validation


@pytest.fixture(name='folder', scope='module')
def folder_fixture(tmp_path_factory):
  return data_files.write_folder(str(tmp_path_factory.mktemp('folder')))


# ---------------------------------------------------------------------------
# Image folders.


def test_read_folder_skips_unreadable_and_ignores_other_files(folder):
  classes = sources.list_classes(folder)
  assert classes == ['ant', 'bee', 'cat']
  split = sources.read_folder(folder, classes, validate=True)
  assert np.array_equal(np.bincount(split.labels), [data_files.PER_CLASS] * 3)
  assert sorted(os.path.basename(p) for p in split.skipped) == [
      'corrupt.jpg', 'truncated.jpeg']
  assert split.images == sorted(split.images)
  for path, label in zip(split.images, split.labels):
    assert os.path.basename(os.path.dirname(path)) == classes[label]
    assert 'nested' not in path and not path.endswith('.txt')
    assert not os.path.basename(path).startswith('.')
  unchecked = sources.read_folder(folder, classes, validate=False)
  assert len(unchecked) == len(split) + 2 and not unchecked.skipped


def test_folder_errors(tmp_path):
  missing = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError) as e:
    splits.image_folder_splits(missing, 1, 1)
  assert_one_line(e, missing)

  (tmp_path / 'empty_root').mkdir()
  with pytest.raises(ValueError) as e:
    splits.image_folder_splits(str(tmp_path / 'empty_root'), 1, 1)
  assert_one_line(e, 'no class subfolders')

  rng = np.random.default_rng(3)
  data_files.make_class(str(tmp_path / 'data' / 'full'), 3, rng)
  data_files.write(str(tmp_path / 'data' / 'void' / 'readme.txt'), b'x')
  with pytest.raises(ValueError) as e:
    splits.image_folder_splits(str(tmp_path / 'data'), 1, 1)
  assert_one_line(e, os.path.join(str(tmp_path / 'data'), 'void'),
                  'no readable images')


def test_folder_left_empty_by_skipping_is_an_error(tmp_path):
  data_files.write(str(tmp_path / 'a' / 'bad.png'), b'\x89PNG broken')
  with pytest.raises(ValueError) as e:
    splits.image_folder_splits(str(tmp_path), 1, 1)
  assert_one_line(e, 'no readable images')


# ---------------------------------------------------------------------------
# TFDS (mocked: no download).


def test_tfds_names_are_defined_once_without_tensorflow():
  assert config_validation.TFDS_DATASETS == tuple(tfds_tasks.TFDS_DATASETS)
  # Config validation runs before anything heavy is imported.
  subprocess.run(
      [sys.executable, '-c', 'import sys, dtq_jax.run.config_validation; '
       "assert 'tensorflow' not in sys.modules"],
      check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
          os.path.abspath(__file__)))), timeout=120)


def test_tfds_caltech_birds(tmp_path):
  requested = []
  with tfds.testing.mock_data(as_dataset_fn=data_files.fake_tfds(
      requested, corrupt_index=5)):
    train, test = sources.read_tfds('caltech_birds2011',
                                    data_dir=str(tmp_path))
  assert requested == [('caltech_birds2011', 'train'),
                       ('caltech_birds2011', 'test')]
  assert train.num_classes == 200
  assert train.images.dtype == object and isinstance(train.images[0], bytes)
  assert np.array_equal(train.labels, np.delete(np.arange(12) % 3, 5))
  assert train.skipped == ('tfds:caltech_birds2011/train[5]',)
  assert len(test) == 11
  batch = next(input_pipeline.eval_batches(test, 4, 24, resize_to=28))
  assert batch['image'].shape == (4, 24, 24, 3)


def test_tfds_food101_uses_validation_split():
  requested = []
  with tfds.testing.mock_data(as_dataset_fn=data_files.fake_tfds(requested)):
    sources.read_tfds('food101', validate=False)
  assert [split for _, split in requested] == ['train', 'validation']
  # The stock random mock data works as well.
  with tfds.testing.mock_data(num_examples=4):
    train, test = sources.read_tfds('food101')
  assert len(train) == len(test) == 4 and train.num_classes == 101


def test_tfds_offline_error(tmp_path, monkeypatch):
  def no_network(*unused_args, **unused_kwargs):
    raise ConnectionError('no internet')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      no_network)
  with pytest.raises(FileNotFoundError) as e:
    sources.read_tfds('stanford_dogs', data_dir=str(tmp_path))
  assert_one_line(e, "'stanford_dogs'", str(tmp_path),
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
  monkeypatch.setattr(sources, '_check_reachable', check_reachable)
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      must_not_download)
  with pytest.raises(FileNotFoundError) as e:
    sources.read_tfds('food101', data_dir=str(tmp_path))
  assert_one_line(e, "'food101'", 'cannot reach data.vision.ee.ethz.ch:80',
                  '--config.dataset.data_dir')
  assert probed == [(('data.vision.ee.ethz.ch', 80), 10.0)]

  # Behind a proxy the direct probe would be wrong: TFDS downloads.
  monkeypatch.setenv('https_proxy', 'http://proxy.example:3128')
  monkeypatch.setenv('http_proxy', 'http://proxy.example:3128')
  with pytest.raises(FileNotFoundError, match='download_and_prepare ran'):
    sources.read_tfds('food101', data_dir=str(tmp_path))
  assert len(probed) == 1


# ---------------------------------------------------------------------------
# Fashion-MNIST.


def test_fashion_mnist_idx_files(tmp_path):
  written = data_files.write_fashion(str(tmp_path))
  data = sources.fashion_mnist_arrays(str(tmp_path))
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
  data_files.write_fashion(str(tmp_path))
  path = str(tmp_path / 't10k-labels-idx1-ubyte.gz')
  if damage == 'magic':
    with gzip.open(path, 'wb') as f:
      f.write(data_files.idx_bytes(np.zeros(30), 0x803))
  elif damage == 'truncated':
    with gzip.open(path, 'wb') as f:
      f.write(data_files.idx_bytes(np.zeros(30), 0x801)[:-5])
  elif damage == 'not_gzip':
    data_files.write(path, b'plain bytes, not gzip')
  else:
    os.remove(path)
  error = FileNotFoundError if damage == 'missing' else ValueError
  with pytest.raises(error) as e:
    sources.fashion_mnist_arrays(str(tmp_path))
  assert_one_line(e, path)


def test_fashion_mnist_falls_back_to_tfds(tmp_path, monkeypatch):
  with tfds.testing.mock_data(num_examples=5):
    data = sources.fashion_mnist_arrays(str(tmp_path))
  assert data['train'].images.shape == (5, 28, 28, 1)
  assert data['test'].labels.dtype == np.int32

  def no_network(*unused_args, **unused_kwargs):
    raise ConnectionError('no internet')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      no_network)
  with pytest.raises(FileNotFoundError) as e:
    sources.fashion_mnist_arrays(str(tmp_path),
                                 tfds_data_dir=str(tmp_path / 'tfds'))
  assert_one_line(e, 'apt-get install dataset-fashion-mnist', str(tmp_path))


@pytest.mark.skipif(
    not os.path.exists(os.path.join(sources.FASHION_MNIST_DIR,
                                    'train-images-idx3-ubyte.gz')),
    reason=f'real Fashion-MNIST not installed in {sources.FASHION_MNIST_DIR} '
    '(apt-get install dataset-fashion-mnist)')
def test_real_fashion_mnist():
  data = sources.fashion_mnist_arrays()
  assert data['train'].images.shape == (60000, 28, 28, 1)
  assert data['test'].images.shape == (10000, 28, 28, 1)
  assert np.array_equal(np.bincount(data['train'].labels), [6000] * 10)
  # The normalisation constants of the pipeline are this data's statistics.
  mean = data['train'].images.mean() / 255
  std = data['train'].images.std() / 255
  np.testing.assert_allclose(mean, input_pipeline.FASHION_MNIST_MEAN[0],
                             atol=1e-4)
  np.testing.assert_allclose(std, input_pipeline.FASHION_MNIST_STD[0],
                             atol=1e-4)
