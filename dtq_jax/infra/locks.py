"""Exclusive use of a folder by one process: a run's workdir, a cache entry.

A lock is an advisory ``flock`` on a file in the folder (the ``filelock``
library). The operating system releases it when its process ends, however it
ends (kill -9 included), so a lock is never stale and never needs removing by
hand. The holder writes its pid beside the lock file, so that another process
can say which process it gives way to or waits for.
"""

import contextlib
import os

import filelock

from dtq_jax.infra import errors
from dtq_jax.infra import files

WORKDIR_LOCK = 'run.lock'
# The file beside a lock that names its holder: the lock's name + PID.
PID = '.pid'


def holder(lock_path):
  """The pid written by the process that holds (or held) ``lock_path``.

  Args:
    lock_path: a lock file.

  Returns:
    An int, or None when no pid was written (yet).
  """
  try:
    with open(lock_path + PID) as f:
      return int(f.read().strip())
  except (OSError, ValueError):
    return None


def _process(pid):
  return f'process {pid}' if pid else 'another process'


def _write_pid(lock):
  files.write_text(lock.lock_file + PID, f'{os.getpid()}\n')


@contextlib.contextmanager
def workdir_lock(workdir, remove_if=None):
  """Holds ``workdir`` for this process, or fails at once if another has it.

  Two processes writing one run would interleave their metrics and
  checkpoints. Use it in process 0 of a run only: the other processes of a
  multi-process run share the workdir with it.

  Args:
    workdir: an existing folder.
    remove_if: None, or a function of the exception that ends the block: if
      it returns True, the lock files this call created (not those a
      previous holder left) are removed. That happens before the lock is
      released, so no other process holds the files meanwhile.

  Yields:
    Nothing; the lock is released on exit.

  Raises:
    UserError: another process holds the workdir (naming its pid).
  """
  path = os.path.join(workdir, WORKDIR_LOCK)
  created = [p for p in (path, path + PID) if not os.path.lexists(p)]
  lock = filelock.FileLock(path)
  try:
    lock.acquire(timeout=0)
  except filelock.Timeout:
    raise errors.UserError(
        f'{workdir} is in use by {_process(holder(path))} (lock file {path});'
        ' wait for it to finish, or use another --workdir.') from None
  try:
    _write_pid(lock)
    yield
  except BaseException as e:
    if remove_if is not None and remove_if(e):
      for p in created:
        with contextlib.suppress(FileNotFoundError):
          os.remove(p)
    raise
  finally:
    lock.release()


@contextlib.contextmanager
def build_lock(folder, what):
  """Holds a cache entry while this process builds it; waits for another.

  The second of two processes that need the same entry waits until the
  first has built it, and then finds it built.

  Args:
    folder: the cache entry's folder (created).
    what: what is being built, for the message printed while waiting.

  Yields:
    Nothing; the lock is released on exit.
  """
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, 'build.lock')
  lock = filelock.FileLock(path)
  try:
    lock.acquire(timeout=0)
  except filelock.Timeout:
    print(f'Waiting for {_process(holder(path))}, which is building {what} '
          f'in {folder}.', flush=True)
    lock.acquire()
  try:
    _write_pid(lock)
    yield
  finally:
    lock.release()
