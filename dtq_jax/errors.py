"""The project's error types: problems with the user's input, shown on one line.

``main.py`` (and the command-line tools) print a ``UserError`` as one line
and exit with status 2; any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A problem with the user's input; main.py prints it on one line, exit 2."""


def user_errors(what, kinds=(ValueError, OSError, ImportError)):
  """A context manager that re-raises ``kinds`` as one-line ``UserError``s.

  Args:
    what: what was being done, e.g. 'loading dataset.root=data/mit67'.
    kinds: exception types that mean bad input rather than a bug.

  Returns:
    The context manager.
  """
  return _UserErrors(what, kinds)


class _UserErrors:

  def __init__(self, what, kinds):
    self.what, self.kinds = what, kinds

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc is not None and isinstance(exc, self.kinds) and not isinstance(
        exc, UserError):
      first = str(exc).strip().splitlines()[0] if str(exc).strip() else ''
      raise UserError(f'{self.what}: {first or type(exc).__name__}') from exc
    return False


class ConfigError(UserError, ValueError):
  """A config field has a value the program cannot run with."""

  def __init__(self, field, value, allowed):
    super().__init__(f'config.{field}={value!r} is invalid; {allowed}')
    self.field = field
