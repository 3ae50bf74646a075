"""Runs DTQ (or a baseline) as a config describes.

  python main.py                                   # the offline demo
  python main.py --config=configs/mit67.py --workdir=runs/mit67
  python main.py --config=configs/mit67.py:mobilenet_v2,5bit --config.repeats=5

Rerunning with the same --workdir resumes an unfinished run and only prints
the summary of a finished one (a larger --config.repeats adds seeds to it).
main.py runs from any directory; --config and --workdir paths are relative to
the current one.
"""

import contextlib
import datetime
import difflib
import errno
import logging as python_logging
import os
import shlex
import signal
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as config_files

from dtq_jax.infra import allocator
from dtq_jax.infra import errors
from dtq_jax.infra import files
from dtq_jax.run import config_validation
from dtq_jax.run import distributed
from dtq_jax.run import run_result
from dtq_jax.run import train

# Found next to this file, so that main.py runs from any directory.
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               'configs', 'fmnist.py')
_CONFIG_HELP = 'Config file (FILE or FILE:VARIANTS).'


def _unknown_field(argv):
  """The one-line message for a --config.FIELD override the config lacks.

  Args:
    argv: the command line.

  Returns:
    The message, or None if every override names an existing field (or the
    config cannot be loaded: its own error is then the one to show).
  """
  spec = next((a.split('=', 1)[1] for a in argv[1:]
               if a.startswith(('--config=', '-config='))), _DEFAULT_CONFIG)
  try:
    config = config_files.ConfigFileFlagParser(name='config').parse(spec)
  except Exception:  # pylint: disable=broad-except
    return None
  for arg in argv[1:]:
    if not arg.startswith('--config.'):
      continue
    path = arg.split('=', 1)[0][len('--config.'):]
    node, parts = config, path.split('.')
    for i, part in enumerate(parts):
      if not hasattr(node, 'keys'):
        return (f'--config.{path}: config.{".".join(parts[:i])}={node!r} '
                'is a single value, not a group of fields.')
      if part not in node:
        where = 'config.' + '.'.join(parts[:i]) if i else 'the config'
        near = difflib.get_close_matches(part, list(node.keys()), n=1)
        hint = (f"did you mean '{near[0]}'?" if near else
                f'its fields: {", ".join(sorted(node.keys()))}.')
        return f"--config.{path}: no field '{part}' in {where}; {hint}"
      node = node[part]
  return None


def _exit_with(message):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


try:
  _CONFIG = config_flags.DEFINE_config_file(
      'config', _DEFAULT_CONFIG, _CONFIG_HELP, lock_config=True)
except (AttributeError, KeyError):
  # Without --config, config_flags loads the default config here and applies
  # the --config.FIELD overrides to it: a misspelled field fails here.
  if _unknown_field(sys.argv) is None:
    raise
  _exit_with(_unknown_field(sys.argv))
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output folder (default: runs/<config>-<time>).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'Multi-process runs: host:port of process 0 (TPU pods, SLURM and Open MPI '
    'are detected without it).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Multi-process runs: process count.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'Multi-process runs: this process.')
_INIT_TIMEOUT = flags.DEFINE_float(
    'init_timeout_s', 300.0,
    'Multi-process runs: seconds to wait for every process to join; then '
    'the run stops with one line naming the processes that did not.')


def _load_config():
  """The parsed config; config_flags reports a file it cannot load lazily."""
  config = _CONFIG.value
  try:
    config.get('model')
  except OSError as e:
    reason = str(e).strip().splitlines()[-1].strip()
    raise errors.UserError(
        f'--config: cannot load {flags.FLAGS["config"].config_filename}: '
        f'{reason}') from e
  return config


# Preloaded allocators that keep freed memory for reuse.
_CACHING_ALLOCATORS = ('tcmalloc', 'jemalloc')


def _allocator_note(config, allocator_mode):
  """Advises keeping freed memory for large-image runs on XLA:CPU.

  glibc returns the step's large buffers to the system after every step, so
  the next step faults them in again (the ResNet-50 DTQ step at 224 px: 6.5 s
  instead of 4.6 s with a caching allocator, benchmarks/README.md).
  ``allocator.configure`` stops that by default; this note is for runs where
  it was turned off or could not act and no caching allocator is preloaded.

  Args:
    config: the run config.
    allocator_mode: what ``allocator.configure`` reported.
  """
  if (jax.default_backend() != 'cpu' or jax.process_index() != 0 or
      config.dataset.image_size < 96 or allocator_mode.startswith('keep') or
      any(a in os.environ.get('LD_PRELOAD', '') for a in _CACHING_ALLOCATORS)):
    return
  print(f'note: the allocator is {allocator_mode}: on CPU this run is faster '
        f'keeping freed memory (unset {allocator.ENV_VAR}) or with tcmalloc '
        '(Debian/Ubuntu libtcmalloc-minimal4: LD_PRELOAD=/usr/lib/'
        'x86_64-linux-gnu/libtcmalloc_minimal.so.4 python main.py ...).',
        file=sys.stderr)


def _default_workdir():
  name = os.path.splitext(os.path.basename(
      flags.FLAGS['config'].config_filename))[0]
  return os.path.join('runs', datetime.datetime.now().strftime(
      f'{name}-%Y%m%d-%H%M%S'))


@contextlib.contextmanager
def _native_logs_hidden(hide):
  """Sends what C++ libraries print to stderr meanwhile to /dev/null.

  TensorFlow's import prints start-up banners (oneDNN, CPU instructions)
  through C++ logging that TF_CPP_MIN_LOG_LEVEL does not reach; a Python
  exception of the import is still shown (after stderr is back).
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


def _hide_orbax_notes(record):
  """A logging filter that drops orbax's records below ERROR.

  Its notes (e.g. "Given directory is read only" when the cached teacher is
  restored) ask nothing of the user; --verbosity shows them again.

  Args:
    record: a ``logging.LogRecord``.

  Returns:
    Whether the record is shown.
  """
  return (record.levelno >= python_logging.ERROR or
          f'{os.sep}orbax{os.sep}' not in record.pathname)


def _print_results(workdir, summaries, config):
  """Where the results are, for process 0's (the only) stdout."""
  methods = tuple(config.get('compare_methods') or ())
  if methods:
    print(f'Comparison: {os.path.join(workdir, files.COMPARISON)}')
    for method in summaries:
      print(f'Summary of {method}: '
            f'{os.path.join(workdir, method, files.SUMMARY)}')
  else:
    print(f'Summary: {os.path.join(workdir, files.SUMMARY)}')


class _Aborted(BaseException):
  """SIGTERM outside the training loop (which checkpoints before it stops).

  A BaseException, as KeyboardInterrupt is: code that catches Exception must
  not swallow it.
  """

  def __init__(self, signum):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def _abort_on_sigterm(signum, frame):
  del frame
  raise _Aborted(signum)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  # While data load, a teacher trains or between seeds, SIGTERM stops the run
  # as Ctrl-C does, with a message instead of a silent kill; the training
  # loop installs its own handlers (finish the step, checkpoint, stop).
  signal.signal(signal.SIGTERM, _abort_on_sigterm)
  verbose = flags.FLAGS['verbosity'].present
  if not verbose:
    # Orbax and TensorFlow log every checkpoint step at INFO.
    logging.set_verbosity(logging.WARNING)
    # ABSLHandler passes records on without its own filters.
    logging.get_absl_handler().python_handler.addFilter(_hide_orbax_notes)
  workdir = os.path.abspath(_WORKDIR.value or _default_workdir())
  try:
    allocator_mode = allocator.configure()  # DTQ_ALLOCATOR=default: off
    config = _load_config()
    # Everything that needs no other process is checked before connecting
    # to them, so that a bad command fails at once in every process.
    processes = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    if distributed.launched(*processes) and not _WORKDIR.value:
      raise errors.UserError(_NEEDS_WORKDIR)
    if not _INIT_TIMEOUT.value > 0:
      raise errors.UserError(
          f'--init_timeout_s={_INIT_TIMEOUT.value:g}; allowed: seconds > 0.')
    config_validation.validate(config, check_devices=False)
    if distributed.maybe_initialize(
        *processes, timeout_s=_INIT_TIMEOUT.value) and not _WORKDIR.value:
      raise errors.UserError(_NEEDS_WORKDIR)  # a TPU pod, found by JAX
    config_validation.check_device_split(config, jax.device_count())
    with _native_logs_hidden(not verbose):
      # pylint: disable=g-import-not-at-top
      from dtq_jax.infra import caches
      from dtq_jax.run import experiment
      # pylint: enable=g-import-not-at-top
    caches.enable_compilation_cache(config)
    _allocator_note(config, allocator_mode)
    print(f'Workdir: {workdir}')
    summaries = experiment.run(config, workdir)
    _print_results(workdir, summaries, config)
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except OSError as e:
    if e.errno not in _WRITE_ERRORS:
      raise
    # A full disk or a workdir that became unwritable during the run.
    print(f'error: cannot write the run in {workdir}: {e}',
          file=_silence_stderr(), flush=True)
    sys.exit(2)
  except run_result.NonFiniteLossError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except train.Interrupted as e:
    print(f'{e}\nTo resume: {_resume_command(workdir)}', file=sys.stderr)
    sys.exit(128 + e.signum)
  except (KeyboardInterrupt, _Aborted) as e:
    # Outside the loop, or a second Ctrl-C inside it: nothing more is saved;
    # the last complete checkpoint (if any) is where a rerun resumes.
    signum = getattr(e, 'signum', signal.SIGINT)
    print(f'{signal.Signals(signum).name}: aborted; rerun the same command '
          f'to resume from the last checkpoint: {_resume_command(workdir)}',
          file=_silence_stderr(), flush=True)
    sys.exit(128 + signum)


_NEEDS_WORKDIR = ('a multi-process run needs an explicit --workdir shared by '
                  'all processes.')

# Errors of writing files that mean the disk or the workdir, not a bug.
_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES,
                 errno.EPERM, errno.EROFS, errno.ENOTDIR)


def _silence_stderr():
  """Sends what is still written to stderr to /dev/null; returns the real one.

  When a checkpoint write fails, orbax's other writes are still in flight in
  TensorStore's threads; as they fail too they print tracebacks ("Event loop
  is closed", "exception was never retrieved") until the process is gone.
  They would bury the one-line error, which already says all they would.

  Returns:
    A text stream on the original stderr.
  """
  sys.stderr.flush()
  original = os.fdopen(os.dup(2), 'w')
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  os.close(devnull)
  return original


def _resume_command(workdir):
  """This command, with --workdir named when it was the default one."""
  argv = [sys.executable] + sys.argv
  if not _WORKDIR.value:
    argv.append(f'--workdir={workdir}')
  return shlex.join(argv)


def _parse_flags(argv):
  """absl's flag parsing, with bad values as one-line errors (exit code 2)."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError):
    # config_flags applies --config.FIELD overrides: a misspelled field.
    if _unknown_field(argv) is None:
      raise
    _exit_with(_unknown_field(argv))
  except flags.Error as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    message = lines[0]
    if 'Traceback' in str(e):
      # A config file that raised (e.g. an unknown ':variant'): its exception,
      # the last line, is what the user needs; the traceback is not.
      message = f'{message} {lines[-1]}'
    _exit_with(message)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
