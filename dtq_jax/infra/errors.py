"""The project's error types: problems with the user's input, shown on one line.

``main.py`` (and the command-line tools) print a ``UserError`` as one line
and exit with status 2; any other exception is a bug and keeps its traceback.
"""

import contextlib


class UserError(Exception):
  """A problem with the user's input; main.py prints it on one line, exit 2."""


@contextlib.contextmanager
def user_errors(what, kinds=(ValueError, OSError, ImportError)):
  """Re-raises ``kinds`` raised inside the block as one-line ``UserError``s.

  Args:
    what: what was being done, e.g. 'loading dataset.root=data/mit67'.
    kinds: exception types that mean bad input rather than a bug.

  Yields:
    Nothing; use as ``with user_errors('reading X'):``.
  """
  try:
    yield
  except UserError:
    raise
  except kinds as exc:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ''
    raise UserError(f'{what}: {first or type(exc).__name__}') from exc


class ConfigError(UserError, ValueError):
  """A config field has a value the program cannot run with."""

  def __init__(self, field, value, allowed):
    super().__init__(f'config.{field}={value!r} is invalid; {allowed}')
    self.field = field
