"""Quiet commands: the libraries' notes hidden unless ``--verbosity`` is given.

main.py and ``python -m dtq_jax.export`` print one line per thing the user
should know; TensorFlow's start-up banners and orbax's notes ask nothing of
the user, so both commands hide them by default and show them with
``--verbosity``.
"""

import contextlib
import logging
import os
import sys


@contextlib.contextmanager
def native_logs_hidden(hide=True):
  """Sends what C++ libraries print to stderr meanwhile to /dev/null.

  TensorFlow's import prints its start-up banners (oneDNN, CPU instructions;
  twice) through C++ logging that TF_CPP_MIN_LOG_LEVEL does not reach. A
  Python exception raised meanwhile is still shown, after stderr is back.

  Args:
    hide: False makes this a no-op (``--verbosity`` given).

  Yields:
    Nothing; stderr is restored on exit.
  """
  if not hide:
    yield
    return
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  os.close(devnull)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def hide_orbax_notes(record):
  """A logging filter that drops orbax's records below ERROR.

  Its notes (e.g. "Given directory is read only" when a checkpoint is opened
  read-only on purpose, for the cached teacher or an export) ask nothing of
  the user.

  Args:
    record: a ``logging.LogRecord``.

  Returns:
    Whether the record is shown.
  """
  return (record.levelno >= logging.ERROR or
          f'{os.sep}orbax{os.sep}' not in record.pathname)
