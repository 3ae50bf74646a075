"""dtq_jax.run.teacher: the demo teacher, trained once and cached, and checked.

The cache entry follows everything the teacher's training reads, stores the
config it was trained with, is built once when two callers need it at once,
and refuses (or falls back from) damaged files with advice that applies.
Runs are in-process on the tiny image folder (tests/conftest.py).
"""

import dataclasses
import errno
import glob
import json
import os
import shutil
import threading
import time

import jax
import ml_collections
import numpy as np
import pytest

import data_files
from configs import fmnist
from dtq_jax.data import datasets
from dtq_jax.infra import errors
from dtq_jax.infra import files
from dtq_jax.run import checkpoints
from dtq_jax.run import config_validation
from dtq_jax.run import run_result
from dtq_jax.run import teacher as teacher_lib
from dtq_jax.run import train


def _must_not_be_called(*args, **kwargs):
  raise AssertionError('called, but the cached teacher should have served')


def _teacher_setup(tiny_folder, cache, **pretrain_optim):
  """A teacher trained on the tiny folder itself as its source task."""
  root, make_config = tiny_folder
  c = make_config(root, 'quick,fp')
  c.cache_dir = str(cache)
  c.dataset.source_classes = (0, 1, 2)
  c.pretrain = ml_collections.ConfigDict(dict(
      num_epochs=2, batch_size=8, seed=0, steps_per_epoch=2,
      optim=dict(lr=0.05, **pretrain_optim)))
  c = config_validation.validate(c)
  data = datasets.load(c)
  return c, dataclasses.replace(data, source=data)


@pytest.fixture(scope='module')
def teacher(tiny_folder, tmp_path_factory):
  """Two threads need the same new entry at once: one trains, one waits."""
  cache = tmp_path_factory.mktemp('teacher_cache')
  config, data = _teacher_setup(tiny_folder, cache)
  calls = []
  train_and_evaluate = train.train_and_evaluate

  def recorded(pre, *args, **kwargs):
    calls.append(pre)
    return train_and_evaluate(pre, *args, **kwargs)

  results = {}

  def build(name):
    results[name] = teacher_lib.train_source_teacher(config, data)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, 'train_and_evaluate', recorded)
    first = threading.Thread(target=build, args=('first',))
    first.start()
    deadline = time.monotonic() + 120
    while not glob.glob(str(cache / 'teachers' / '*' / 'build.lock.pid')):
      assert time.monotonic() < deadline and first.is_alive()
      time.sleep(0.01)
    second = threading.Thread(target=build, args=('second',))
    second.start()
    first.join()
    second.join()
  entry, = glob.glob(str(cache / 'teachers' / '*'))
  return dict(config=config, data=data, calls=calls, results=results,
              entry=entry, cache=cache)


def test_one_cache_entry_is_built_once(teacher):
  assert len(teacher['calls']) == 1
  jax.tree.map(np.testing.assert_array_equal, teacher['results']['first'],
               teacher['results']['second'])


def test_teacher_config_is_stored_with_the_entry(teacher):
  with open(os.path.join(teacher['entry'], teacher_lib.TEACHER_CONFIG)) as f:
    stored = json.load(f)
  trained_with = teacher['calls'][0]
  assert stored == json.loads(trained_with.to_json_best_effort())
  assert trained_with.method == 'fp' and trained_with.optim.lr == 0.05


def test_teacher_key_follows_what_its_training_reads():
  base = fmnist.get_config('quick')

  def key(**changes):
    c = ml_collections.ConfigDict(base.to_dict())
    for field, value in changes.items():
      node = c
      *parents, leaf = field.split('.')
      for parent in parents:
        node = node[parent]
      node[leaf] = value
    return teacher_lib._teacher_key(  # pylint: disable=protected-access
        teacher_lib.teacher_config(c), c.dataset)

  reference = key()
  for field, value in [('optim.momentum', 0.5),
                       ('optim.head_weight_decay', 0.0),
                       ('optim.lr_drop_factor', 0.5),
                       ('dataset.crop_padding', 0),
                       ('compute_dtype', 'bfloat16'),
                       ('on_nonfinite', 'skip'),
                       ('pretrain.optim.lr', 0.2)]:
    assert key(**{field: value}) != reference, field
  # What only the students read shares the teacher.
  for field, value in [('bits_w', 5), ('dtq.kl_weight', 0.1),
                       ('dataset.shots_per_class', 10), ('repeats', 3),
                       ('method', 'ft'), ('cache_dir', '/elsewhere')]:
    assert key(**{field: value}) == reference, field


def test_damaged_cached_teacher_falls_back_or_names_the_folder(
    teacher, tmp_path, monkeypatch, capsys):
  cache = tmp_path / 'cache'
  shutil.copytree(teacher['cache'], cache)
  config = ml_collections.ConfigDict(teacher['config'].to_dict())
  config.cache_dir = str(cache)  # not part of the key: the same entry
  entry = os.path.join(cache, 'teachers', os.path.basename(teacher['entry']))
  folder = os.path.join(entry, 'run', checkpoints.LATEST)
  steps = sorted(int(s) for s in os.listdir(folder) if s.isdigit())
  assert steps == [2, 4]
  older = checkpoints._restore(  # pylint: disable=protected-access
      checkpoints.manager(folder, read_only=True), 2, None).state
  monkeypatch.setattr(train, 'train_and_evaluate', _must_not_be_called)

  # An entry whose stored config is not the one asked for is refused.
  stored = os.path.join(entry, teacher_lib.TEACHER_CONFIG)
  with open(stored) as f:
    text = f.read()
  files.write_text(stored, text.replace('"momentum": 0.9', '"momentum": 0.5'))
  with pytest.raises(errors.UserError, match='optim.momentum'):
    teacher_lib.train_source_teacher(config, teacher['data'])
  files.write_text(stored, text)

  data_files.change_checkpoint_value(os.path.join(folder, '4'))
  variables = teacher_lib.train_source_teacher(config, teacher['data'])
  assert f'checkpoint {folder}/4 is unreadable' in capsys.readouterr().out
  jax.tree.map(np.testing.assert_array_equal, variables['batch_stats'],
               older['batch_stats'])

  data_files.change_checkpoint_value(os.path.join(folder, '2'))
  with pytest.raises(errors.UserError) as e:
    teacher_lib.train_source_teacher(config, teacher['data'])
  message = str(e.value)
  assert f'the cached teacher in {entry} is damaged' in message
  assert 'delete that folder' in message and '\n' not in message


def test_nonfinite_teacher_names_its_own_learning_rate(tiny_folder, tmp_path):
  config, data = _teacher_setup(tiny_folder, tmp_path / 'cache')
  config.pretrain.optim.lr = 1e30
  with pytest.raises(run_result.NonFiniteLossError) as e:
    teacher_lib.train_source_teacher(config, data)
  message = str(e.value)
  assert '--config.pretrain.optim.lr' in message
  # Step 1's update makes step 2's loss non-finite, before the first
  # checkpoint (the end of epoch 1, step 2).
  assert 'no checkpoint was written before it' in message
  assert 'intact' not in message and '--workdir' not in message


def test_full_teacher_cache_names_the_cache(tiny_folder, tmp_path,
                                            monkeypatch):
  config, data = _teacher_setup(tiny_folder, tmp_path / 'cache')
  write_json = files.write_json

  def full(path, obj):
    if str(path).endswith(teacher_lib.TEACHER_CONFIG):
      raise OSError(errno.ENOSPC, 'No space left on device')
    return write_json(path, obj)

  monkeypatch.setattr(files, 'write_json', full)
  monkeypatch.setattr(train, 'train_and_evaluate', _must_not_be_called)
  with pytest.raises(errors.UserError,
                     match=r'cannot write the teacher cache in \S+'
                     r'teachers/small_resnet-\w+: .*No space left'):
    teacher_lib.train_source_teacher(config, data)
