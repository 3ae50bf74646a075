"""Runs DTQ (or a baseline) as a config describes.

  python main.py                                   # the offline demo
  python main.py --config=configs/mit67.py --workdir=runs/mit67
  python main.py --config=configs/mit67.py:mobilenet_v2,5bit --config.repeats=5

Rerunning with the same --workdir resumes an unfinished run and only prints
the summary of a finished one.
"""

import datetime
import errno
import os
import shlex
import signal
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from dtq_jax import config_validation
from dtq_jax import errors
from dtq_jax import distributed
from dtq_jax import experiment
from dtq_jax import train

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/fmnist.py', 'Config file (FILE or FILE:VARIANTS).',
    lock_config=True)
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


def _allocator_note(config):
  """Advises a caching allocator for large-image runs on XLA:CPU.

  glibc returns the step's large buffers to the system after every step, so
  the next step faults them in again: with tcmalloc preloaded, the ResNet-50
  DTQ step at 224 px took 4.6 s instead of 6.5 s (benchmarks/README.md).
  """
  if (jax.default_backend() != 'cpu' or jax.process_index() != 0 or
      config.dataset.image_size < 96 or
      any(a in os.environ.get('LD_PRELOAD', '') for a in _CACHING_ALLOCATORS)):
    return
  print('note: on CPU this run is faster with tcmalloc (Debian/Ubuntu package '
        'libtcmalloc-minimal4): LD_PRELOAD=/usr/lib/x86_64-linux-gnu/'
        'libtcmalloc_minimal.so.4 python main.py ...', file=sys.stderr)


def _default_workdir():
  name = os.path.splitext(os.path.basename(
      flags.FLAGS['config'].config_filename))[0]
  return os.path.join('runs', datetime.datetime.now().strftime(
      f'{name}-%Y%m%d-%H%M%S'))


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
  if not flags.FLAGS['verbosity'].present:
    # Orbax and TensorFlow log every checkpoint step at INFO.
    logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value or _default_workdir()
  try:
    config = _load_config()
    if distributed.maybe_initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                                    _PROCESS_ID.value) and not _WORKDIR.value:
      raise errors.UserError(
          'a multi-process run needs an explicit --workdir shared by all '
          'processes.')
    config_validation.validate(config)
    experiment.enable_compilation_cache(config)
    _allocator_note(config)
    experiment.run(config, workdir)
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
  except train.NonFiniteLossError as e:
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
  except flags.Error as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    message = lines[0]
    if 'Traceback' in str(e):
      # A config file that raised (e.g. an unknown ':variant'): its exception,
      # the last line, is what the user needs; the traceback is not.
      message = f'{message} {lines[-1]}'
    print(f'error: {message}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
