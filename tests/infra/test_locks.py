"""A workdir's lock: held by one process, its files removed only on request."""

import os

import pytest

from dtq_jax.infra import errors
from dtq_jax.infra import locks


def _lock_files(folder):
  return sorted(n for n in os.listdir(folder) if n.startswith('run.lock'))


def test_the_lock_names_its_holder_and_stays_after_a_normal_exit(tmp_path):
  with locks.workdir_lock(str(tmp_path), remove_if=lambda e: True):
    assert locks.holder(str(tmp_path / locks.WORKDIR_LOCK)) == os.getpid()
  assert _lock_files(tmp_path) == ['run.lock', 'run.lock.pid']


@pytest.mark.parametrize('remove', [True, False])
def test_remove_if_decides_on_the_files_after_an_exception(tmp_path, remove):
  seen = []
  def remove_if(e):
    seen.append(e)
    return remove
  with pytest.raises(KeyboardInterrupt):
    with locks.workdir_lock(str(tmp_path), remove_if=remove_if):
      raise KeyboardInterrupt
  assert isinstance(seen[0], KeyboardInterrupt)
  assert _lock_files(tmp_path) == ([] if remove else
                                   ['run.lock', 'run.lock.pid'])


def test_files_a_previous_holder_left_are_not_removed(tmp_path):
  with locks.workdir_lock(str(tmp_path)):
    pass
  with pytest.raises(errors.UserError):
    with locks.workdir_lock(str(tmp_path), remove_if=lambda e: True):
      raise errors.UserError('refused')
  assert _lock_files(tmp_path) == ['run.lock', 'run.lock.pid']
