"""The train/test splits and preprocessing that a config names.

``load(config)`` turns ``config.dataset`` into a ``Data``: input_pipeline
Splits plus the keyword arguments of its train and eval pipelines, so the
trainer never looks at dataset names.
"""

import dataclasses
import os
from typing import Any, Optional

from dtq_jax import errors
from dtq_jax import input_pipeline


@dataclasses.dataclass
class Data:
  """One task's splits and preprocessing.

  Attributes:
    train: training Split.
    test: test Split.
    val: held-out validation Split (None under the paper's protocol).
    train_kwargs: keyword arguments of ``input_pipeline.train_batches``
      besides split, batch size and seed.
    eval_kwargs: keyword arguments of ``input_pipeline.eval_batches``.
    source: the demo's source task (a ``Data``), else None.
  """
  train: Any
  test: Any
  val: Optional[Any]
  train_kwargs: dict
  eval_kwargs: dict
  source: Optional['Data'] = None

  @property
  def num_train(self):
    return len(self.train)

  @property
  def num_classes(self):
    return self.train.num_classes

  @property
  def image_shape(self):
    size = self.eval_kwargs['image_size']
    return (size, size, self.train.channels)


def _data(d, train, test, source=None, holdout=True):
  """Wraps splits with the preprocessing of ``config.dataset`` ``d``."""
  val = None
  if holdout and d.val_fraction:
    train, val = input_pipeline.split_validation(train, d.val_fraction,
                                                 d.data_seed)
  common = dict(image_size=d.image_size, resize_to=d.resize_to or None,
                mean=tuple(d.mean), std=tuple(d.std))
  return Data(train, test, val, dict(common, crop_padding=d.crop_padding),
              common, source)


def load(config):
  """Loads the splits of ``config.dataset``.

  Args:
    config: a validated run config.

  Returns:
    A ``Data``; for Fashion-MNIST, ``source`` holds the source task.

  Raises:
    ConfigError: the training split is smaller than one batch.
  """
  with errors.user_errors(f'dataset {config.dataset.name}'):
    data = _load(config.dataset)
  if data.num_train < config.batch_size:
    raise errors.ConfigError(
        'batch_size', config.batch_size,
        f'the training split has only {data.num_train} images; use a batch '
        'size at most that.')
  return data


def _load(d):
  """Splits of ``config.dataset`` ``d``."""
  if d.name == 'fashion_mnist':
    s = input_pipeline.fashion_mnist_transfer_splits(
        d.data_dir or None, tuple(d.source_classes), tuple(d.target_classes),
        d.shots_per_class, d.data_seed)
    source = _data(d, s['source_train'], s['source_test'], holdout=False)
    data = _data(d, s['target_train'], s['target_test'], source=source)
  elif d.name == 'image_folder':
    train, test = input_pipeline.image_folder_splits(
        d.root, d.train_per_class or None, d.test_per_class or None,
        seed=d.data_seed)
    data = _data(d, train, test)
  else:
    train, test = input_pipeline.tfds_splits(
        d.name, data_dir=d.data_dir or None,
        train_per_class=d.train_per_class or None, seed=d.data_seed)
    data = _data(d, train, test)
  return data


def source_fingerprint(d):
  """Identifies the demo's image files (names, sizes, times) for caching."""
  root = d.data_dir or input_pipeline.FASHION_MNIST_DIR
  if not os.path.isdir(root):
    return 'tfds:fashion_mnist'
  return sorted((name, os.path.getsize(os.path.join(root, name)),
                 int(os.path.getmtime(os.path.join(root, name))))
                for name in os.listdir(root) if name.endswith('.gz'))
