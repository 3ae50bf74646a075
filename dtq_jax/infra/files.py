"""Writing the project's files atomically, and the run's metrics log.

Every file the project writes (results, summaries, tables, exports, weights,
figures) goes through ``atomic_path``: it is written under a temporary name in
the same folder and renamed over the final name only when complete, so a
reader (or a rerun after a kill) sees either the old file or the whole new
one, never a part. Checkpoints are orbax's, which renames its own.
"""

import contextlib
import errno
import json
import os
import re
import tempfile

import tensorboardX

# Errors of writing a file that mean the disk or the folder (full, over a
# quota or a size limit, read-only, not a folder), not a bug.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES,
                errno.EPERM, errno.EROFS, errno.ENOTDIR)
# The files of a run folder, by name.
CONFIG = 'config.json'  # the run's config, checked when it resumes
RESULT = 'result.json'  # one seed's result; marks that seed finished
SUMMARY = 'summary.json'  # a method's summary over seeds; marks it finished
COMPARISON = 'comparison.md'  # a comparison's table of methods

# Temporary files are named ``<name>.tmp.<random>``, so a later start can
# recognise (and remove) what a killed writer left behind.
_TMP_NAME = re.compile(r'.\.tmp\.\w+$')
# What a plain ``open`` creates, before the umask; tempfile creates 0600.
_OPEN_MODE = 0o666


@contextlib.contextmanager
def atomic_path(path, mode=None):
  """Yields a temporary path to write; renames it to ``path`` on success.

  On an exception the temporary file is removed and ``path`` is untouched.

  Args:
    path: the final file name.
    mode: the file's permissions; None: what ``open`` would give it (0666
      less the umask).

  Yields:
    The temporary file name, in the same folder (a rename within one file
    system is atomic).
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f'{os.path.basename(path)}.tmp.',
                             dir=folder)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, _OPEN_MODE & ~_umask() if mode is None else mode)
    with open(tmp, 'rb') as f:
      # The data reaches the disk before the rename makes it visible, so a
      # power cut cannot leave an empty file under the final name.
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_text(path, text, mode=None):
  """Writes ``text`` (str or bytes) to ``path`` atomically (``mode``: as in
  ``atomic_path``)."""
  with atomic_path(path, mode) as tmp:
    with open(tmp, 'wb' if isinstance(text, bytes) else 'w') as f:
      f.write(text)


def write_json(path, obj):
  """Writes ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float))


def read_json(path):
  """What ``write_json`` wrote to ``path``."""
  with open(path) as f:
    return json.load(f)


def remove_stale_temporaries(folder):
  """Removes temporary files that a killed writer left in ``folder``.

  Args:
    folder: a folder the project writes into (missing: nothing to do).

  Returns:
    The names removed.
  """
  if not os.path.isdir(folder):
    return []
  removed = []
  for name in os.listdir(folder):
    if _TMP_NAME.search(name) and os.path.isfile(os.path.join(folder, name)):
      with contextlib.suppress(OSError):
        os.remove(os.path.join(folder, name))
        removed.append(name)
  return removed


def truncate_jsonl(path, last_step):
  """Keeps the records of a JSON-lines log up to ``last_step`` (atomically).

  Args:
    path: a ``metrics.jsonl`` (missing: nothing to do).
    last_step: the last step to keep.
  """
  if not os.path.exists(path):
    return
  with open(path, 'rb') as f:
    lines = f.read().splitlines(keepends=True)
  kept = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= last_step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # A line cut short by a kill, or not a record at all.
  if len(kept) < len(lines):
    write_text(path, b''.join(kept))


class MetricsLog:
  """TensorBoard events, ``metrics.jsonl`` and nothing else, from one process.

  Opening the log of a run that resumes after ``start_step`` drops what an
  earlier attempt logged after that step (the steps after its last
  checkpoint, which this run trains again), so a resumed run's logs read as
  an uninterrupted run's.
  """

  def __init__(self, workdir, enabled, start_step=0):
    """Opens the logs.

    Args:
      workdir: the run's folder.
      enabled: whether this process logs (process 0 of a run).
      start_step: the restored checkpoint's step (0: a fresh start).
    """
    self.enabled = enabled
    if enabled:
      path = os.path.join(workdir, 'metrics.jsonl')
      truncate_jsonl(path, start_step)
      # tensorboardX writes TensorBoard event files without TensorFlow's
      # tensorboard package; purge_step makes TensorBoard hide the earlier
      # attempt's events from that step on.
      self._writer = tensorboardX.SummaryWriter(workdir,
                                                purge_step=start_step + 1)
      self._jsonl = open(path, 'a')

  def write(self, step, scalars):
    """Logs ``{name: number}`` at ``step``."""
    if not self.enabled:
      return
    for k, v in scalars.items():
      self._writer.add_scalar(k, float(v), global_step=step)
    self._writer.flush()
    self._jsonl.write(json.dumps(dict(step=step, **{
        k: float(v) for k, v in scalars.items()})) + '\n')
    self._jsonl.flush()

  def close(self):
    if self.enabled:
      self._writer.close()
      self._jsonl.close()
