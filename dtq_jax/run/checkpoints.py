"""A run's checkpoints: written with a checksum, restored only when intact.

Every checkpoint holds the ``TrainState`` and a JSON ``meta`` (the epoch
history, best accuracy, wall time, and the state's checksum). Orbax writes a
checkpoint under a temporary name and renames it when it is complete, so a
kill during a write leaves no partial step; a step damaged afterwards (a
truncated or corrupt file, or bytes that still decode but no longer match the
checksum) is never used: reading falls back to the newest intact step.
"""

import contextlib
import hashlib
import os
import re
import time
import zlib

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from dtq_jax.infra import errors

LATEST = 'checkpoints'
BEST = 'best'
# Checksum fields of ``meta``: sha256 over the arrays in path order (any
# container type), and the older CRC-32 in flattening order (checked only
# where the checkpoint is restored into a TrainState).
_DIGEST = 'state_sha256'
_LEGACY_CRC = 'state_crc32'


def _key_name(key):
  """A path entry's name, the same for a dataclass field and a dict key."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _local_copy(leaf):
  if isinstance(leaf, jax.Array):
    leaf = leaf.addressable_shards[0].data  # Replicated: the whole array.
  return np.ascontiguousarray(leaf)


def state_digest(state):
  """SHA-256 of every array of a state (this process's copy), by path.

  The same for a ``TrainState`` and for the nested dicts that orbax restores
  without a target, so any reader can check it. Written into each
  checkpoint's meta; damage that still decodes (a flipped byte in an array
  file) is caught as well.

  Args:
    state: a pytree of arrays.

  Returns:
    A hex digest.
  """
  leaves = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    leaves.append(('/'.join(_key_name(k) for k in path), _local_copy(leaf)))
  digest = hashlib.sha256()
  for name, array in sorted(leaves, key=lambda x: x[0]):
    digest.update(f'{name}:{array.dtype.str}:{array.shape};'.encode())
    digest.update(array.reshape(-1).view(np.uint8))
  return digest.hexdigest()


def _legacy_crc32(state):
  crc = 0
  for leaf in jax.tree.leaves(state):
    crc = zlib.crc32(_local_copy(leaf).reshape(-1).view(np.uint8), crc)
  return f'{crc:08x}'


def _verify(state, meta, with_target):
  """Raises ValueError when ``state`` does not match its saved checksum."""
  if _DIGEST in meta:
    ok = state_digest(state) == meta[_DIGEST]
  elif _LEGACY_CRC in meta and with_target:
    ok = _legacy_crc32(state) == meta[_LEGACY_CRC]
  else:
    ok = True  # Written before checksums: nothing to compare with.
  if not ok:
    raise ValueError('its arrays do not match the checksum saved with them')


def manager(directory, max_to_keep=None, read_only=False,
            barrier_prefix=None):
  """An orbax CheckpointManager of ``{'state', 'meta'}`` items.

  Args:
    directory: the checkpoint folder (made absolute: orbax needs that).
    max_to_keep: steps kept (None: all).
    read_only: open for reading only.
    barrier_prefix: a name of its own for orbax's multi-process barriers
      (two managers saving the same step at once must not share them).

  Returns:
    The manager.
  """
  kwargs = dict(max_to_keep=max_to_keep, read_only=read_only,
                create=not read_only)
  if barrier_prefix:
    kwargs['multiprocessing_options'] = ocp.options.MultiprocessingOptions(
        barrier_sync_key_prefix=barrier_prefix)
  return ocp.CheckpointManager(
      os.path.abspath(directory), item_names=('state', 'meta'),
      options=ocp.CheckpointManagerOptions(**kwargs))


def save(mngr, step, state, meta):
  """Starts writing ``state`` and ``meta`` (with the checksum) as ``step``.

  Args:
    mngr: a ``manager``.
    step: the step number.
    state: the TrainState.
    meta: a JSON-able dict.
  """
  saved_meta = dict(meta, **{_DIGEST: state_digest(state)})
  with write_errors(mngr.directory):
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(saved_meta)))


def wait(mngr):
  """Waits for the manager's writes; a failed one raises its OSError."""
  with write_errors(mngr.directory):
    mngr.wait_until_finished()


def check(mngr):
  """Raises the OSError of a background write that failed; never waits.

  Orbax writes a checkpoint in a background thread and reports its failure
  only when it is next waited for (at the next save, typically an epoch
  later); calling this after every step stops a run at the first failed
  write instead of training on without a checkpoint.

  Args:
    mngr: a ``manager``.
  """
  if not mngr.is_saving_in_progress():
    # No write in flight: this returns at once, raising a failed one's error.
    wait(mngr)


def _restore(mngr, step, target):
  if target is None:
    state_args = ocp.args.StandardRestore(
        # A checkpoint written on other devices (e.g. by a multi-process
        # run) restores onto this process's first device.
        fallback_sharding=jax.sharding.SingleDeviceSharding(
            jax.local_devices()[0]))
  else:
    state_args = ocp.args.StandardRestore(target)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=state_args, meta=ocp.args.JsonRestore()))
  _verify(restored.state, restored.meta, with_target=target is not None)
  return restored


def _first_line(e):
  text = str(e).strip()
  return f'{type(e).__name__}: {text.splitlines()[0][:200]}' if text else (
      type(e).__name__)


def restore_latest_good(mngr, target=None, move_bad=True):
  """Restores the newest intact checkpoint; steps that fail are moved aside.

  Args:
    mngr: a ``manager``.
    target: a state with the expected structure (None: nested dicts, on
      this process's first device).
    move_bad: move the newer steps that failed to
      ``<run>/unreadable_checkpoints/`` (not deleted: the failure may not
      have been damage) so that training writes them again. Readers that
      only look (export, the teacher cache) leave them in place.

  Returns:
    The restored Composite (``.state``, ``.meta``), or None if there is no
    checkpoint.

  Raises:
    UserError: checkpoints exist but none can be read.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  directory = os.fspath(mngr.directory)
  for i, step in enumerate(steps):
    try:
      restored = _restore(mngr, step, target)
    except Exception as e:  # pylint: disable=broad-except
      clear = '' if move_bad else (
          f' Move {directory}/{step} aside (or delete it) to stop this '
          'warning.')
      print(f'warning: checkpoint {directory}/{step} is unreadable or '
            f'damaged ({_first_line(e)}); trying the previous one.{clear}')
      continue
    if i and move_bad:
      aside = move_aside(mngr, steps[:i])
      print(f'Moved the unreadable checkpoint(s) '
            f'{", ".join(map(str, steps[:i]))} to {aside}; training writes '
            'them again.')
    return restored
  if steps:
    raise errors.UserError(
        f'no readable checkpoint in {directory} (steps '
        f'{", ".join(map(str, steps))} are damaged); move that folder away '
        'to train the run again.')
  return None


def move_aside(mngr, steps):
  """Moves checkpoint steps to ``<run>/unreadable_checkpoints/``.

  Args:
    mngr: the CheckpointManager.
    steps: the steps to move.

  Returns:
    The folder they are in now.
  """
  directory = os.fspath(mngr.directory)
  aside = os.path.join(os.path.dirname(directory.rstrip('/')),
                       'unreadable_checkpoints')
  if jax.process_index() == 0:
    os.makedirs(aside, exist_ok=True)
    stamp = time.strftime('%Y%m%d-%H%M%S')
    for step in steps:
      os.replace(os.path.join(directory, str(step)),
                 os.path.join(aside, f'{step}-{stamp}'))
  multihost_utils.sync_global_devices('dtq_jax unreadable checkpoints moved')
  mngr.reload()
  return aside


def restore_state(run_dir, best=False):
  """A run's newest intact training state, as nested dicts on the host.

  Damaged steps (unreadable, or not matching their checksum) are reported
  and skipped, not moved: readers only look.

  Args:
    run_dir: the folder of one trained run (a seed folder, or the cached
      teacher's run).
    best: take the best checkpoint instead of the latest.

  Returns:
    ``(state, step)``: ``state`` has ``params``, ``batch_stats`` and, if the
    run kept them, ``quant_ranges`` (and the optimizer's state).

  Raises:
    UserError: no checkpoint, or none that is intact.
  """
  folder = os.path.join(run_dir, BEST if best else LATEST)
  if not os.path.isdir(folder):
    raise errors.UserError(f'no checkpoints in {folder}.')
  mngr = manager(folder, read_only=True)
  restored = restore_latest_good(mngr, move_bad=False)
  if restored is None:
    raise errors.UserError(f'no checkpoints in {folder}.')
  state = jax.device_get(dict(restored.state))
  return state, int(state['step'])


def restore_params(run_dir, best=False):
  """Trained ``{'params', 'batch_stats'}`` of a run's newest intact state.

  Args:
    run_dir: as in ``restore_state``.
    best: take the best checkpoint instead of the latest.

  Returns:
    Nested dicts of arrays.

  Raises:
    UserError: no checkpoint, or none that is intact.
  """
  state, _ = restore_state(run_dir, best)
  return {k: state[k] for k in ('params', 'batch_stats')}


# Orbax and TensorStore report a failed write (a full disk, a read-only
# folder) as ValueError('... [os_error_code=28]').
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


@contextlib.contextmanager
def write_errors(directory):
  """Re-raises orbax's failed writes as the OSError they stand for."""
  try:
    yield
  except ValueError as e:
    match = _OS_ERROR_CODE.search(str(e))
    if match is None:
      raise
    code = int(match.group(1))
    raise OSError(code, f'{os.strerror(code)} (writing a checkpoint in '
                  f'{directory})') from e


def settle(managers, exc_type, exc, tb):
  """On an error, lets checkpoint writes in flight finish (or fail) first.

  The last good checkpoint is then complete, and no orbax thread is still
  writing while the interpreter shuts down. A second Ctrl-C
  (KeyboardInterrupt) does not wait. Use as an ``ExitStack.push`` callback.

  Returns:
    False: the exception is not suppressed.
  """
  del exc, tb
  if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
    for m in managers:
      try:
        m.wait_until_finished()
      except Exception:  # pylint: disable=broad-except
        pass  # The error being raised already says what went wrong.
  return False
