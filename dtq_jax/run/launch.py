"""main.py's start-up: from parsed flags to a run and its exit status.

main.py defines the flags and calls ``run(Command(...))``; everything between
is here, callable in-process (tests/run/test_launch.py): bad flags and
``--config.FIELD`` overrides as one-line errors (``parse_flags``), quiet logs,
the allocator, the multi-process start (checked before it connects), the
lines a run prints about itself (its workdir, weights, results, and the
commands that export or resume it), and the exit status of each way a run
ends: 0 finished, 1 a non-finite loss, 2 a one-line error, 128 + N a signal.
"""

import contextlib
import dataclasses
import datetime
import difflib
import os
import re
import shlex
import signal
import sys
from typing import Any, Optional, Sequence

from absl import flags
from absl import logging
import jax
from ml_collections.config_flags import config_flags as config_files

from dtq_jax.infra import allocator
from dtq_jax.infra import caches
from dtq_jax.infra import errors
from dtq_jax.infra import files
from dtq_jax.infra import quiet
from dtq_jax.run import config_validation
from dtq_jax.run import distributed
from dtq_jax.run import run_result
from dtq_jax.run import train

# The repository root, where ``python -m dtq_jax.export`` finds the package.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
_NEEDS_WORKDIR = ('a multi-process run needs an explicit --workdir shared by '
                  'all processes.')
# Preloaded allocators that keep freed memory for reuse.
_CACHING_ALLOCATORS = ('tcmalloc', 'jemalloc')
# How each override type's expected value is named, by absl's flag_type().
_EXPECTED = {'int': 'an int', 'float': 'a float (a number)',
             'bool': 'a bool (true or false)'}


def unknown_field(argv, default_config):
  """The one-line message for a --config.FIELD override the config lacks.

  Args:
    argv: the command line.
    default_config: the config file used without --config.

  Returns:
    The message, or None if every override names an existing field (or the
    config cannot be loaded: its own error is then the one to show).
  """
  spec = next((a.split('=', 1)[1] for a in argv[1:]
               if a.startswith(('--config=', '-config='))), default_config)
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


def exit_with(message):
  """Prints ``error: message`` to stderr and exits with status 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def exit_if_unknown_field(argv, default_config):
  """Exits with the one-line message if an override names no field.

  For main.py's ``DEFINE_config_file``: without --config, config_flags loads
  the default config when the flag is defined and applies the overrides to
  it, so a misspelled field fails there (with AttributeError or KeyError);
  when every field exists, the caller re-raises that error.

  Args:
    argv: the command line.
    default_config: the config file used without --config.
  """
  message = unknown_field(argv, default_config)
  if message is not None:
    exit_with(message)


def _given_value(argv, name):
  """The last value the command line gives the flag ``--name``."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith((f'--{name}=', f'-{name}=')):
      value = arg.split('=', 1)[1]
    elif arg in (f'--{name}', f'-{name}') and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def wrong_type(error, argv, flag_values):
  """The one-line message for an override of the wrong type, or None.

  ``--config.batch_size=4.5`` reaches absl's int parser, whose error
  ("invalid literal for int() with base 10") names neither the field nor
  what it takes.

  Args:
    error: the ``flags.Error`` that parsing the command line raised.
    argv: the command line.
    flag_values: the ``FlagValues`` that raised it (config_flags defines a
      flag per override, with the parser of the field's type).

  Returns:
    E.g. ``--config.batch_size=4.5: expected an int``; None when ``error``
    is not a --config.FIELD value its parser refused.
  """
  match = re.match(r'flag --(config\.[^=\s]+)=', str(error))
  if not isinstance(error, flags.IllegalFlagValueError) or not match:
    return None
  name = match.group(1)
  if name not in flag_values:
    return None
  expected = _EXPECTED.get(flag_values[name].parser.flag_type())
  if expected is None:
    return None
  return f'--{name}={_given_value(argv, name)}: expected {expected}'


def parse_flags(argv, default_config, flag_values=flags.FLAGS):
  """absl's flag parsing, with bad values as one-line errors (exit code 2).

  Args:
    argv: the command line.
    default_config: the config file used without --config.
    flag_values: the flags to parse (main.py's: absl's global ones).

  Returns:
    The arguments that are not flags (absl's ``flags_parser`` contract).
  """
  try:
    return flag_values(argv)
  except (AttributeError, KeyError):
    # config_flags applies --config.FIELD overrides: a misspelled field.
    exit_if_unknown_field(argv, default_config)
    raise
  except flags.Error as e:
    message = wrong_type(e, argv, flag_values)
    if message is None:
      lines = [l for l in str(e).splitlines() if l.strip()]
      message = lines[0]
      if 'Traceback' in str(e):
        # A config file that raised (e.g. an unknown ':variant'): its
        # exception, the last line, is what the user needs, not the trace.
        message = f'{message} {lines[-1]}'
    exit_with(message)


@dataclasses.dataclass(frozen=True)
class Command:
  """What main.py's command line asks for.

  Attributes:
    config: the parsed config (config_flags holds a file it could not load
      as an object that raises when read).
    config_file: --config's file (without its ':variants').
    workdir: --workdir, or None for the default ``runs/<config>-<time>``.
    argv: the command line, repeated in the resume command.
    coordinator_address: --coordinator_address.
    num_processes: --num_processes.
    process_id: --process_id.
    init_timeout_s: --init_timeout_s.
    verbose: --verbosity was given: logs are not filtered.
  """
  config: Any
  config_file: str
  workdir: Optional[str] = None
  argv: Sequence[str] = ()
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  init_timeout_s: float = 300.0
  verbose: bool = False


def _load_config(command):
  """The parsed config; config_flags reports a file it cannot load lazily."""
  try:
    command.config.get('model')
  except OSError as e:
    reason = str(e).strip().splitlines()[-1].strip()
    raise errors.UserError(
        f'--config: cannot load {command.config_file}: {reason}') from e
  return command.config


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


def default_workdir(config_file):
  """``runs/<config file's name>-<date>-<time>``, relative to the cwd."""
  name = os.path.splitext(os.path.basename(config_file))[0]
  return os.path.join('runs', datetime.datetime.now().strftime(
      f'{name}-%Y%m%d-%H%M%S'))


def _quiet_logs():
  """Warnings and errors only, and orbax's notes hidden (without --verbosity).

  Orbax and TensorFlow log every checkpoint step at INFO. Not undone when
  the run ends: orbax's threads may still log as the process exits.
  """
  logging.set_verbosity(logging.WARNING)
  # ABSLHandler passes records on without its own filters.
  logging.get_absl_handler().python_handler.addFilter(quiet.hide_orbax_notes)


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


@contextlib.contextmanager
def _sigterm_aborts():
  """SIGTERM raises ``_Aborted`` meanwhile (the previous handler after).

  While data load, a teacher trains or between seeds, SIGTERM stops the run
  as Ctrl-C does, with a message instead of a silent kill; the training loop
  installs its own handlers (finish the step, checkpoint, stop).
  """
  previous = signal.signal(signal.SIGTERM, _abort_on_sigterm)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def weights_line(config):
  """The line that says which weights the run starts from.

  Args:
    config: the validated run config.

  Returns:
    E.g. ``Weights: torchvision IMAGENET1K_V1 (resnet50; cached in DIR)``.
  """
  spec = config.pretrained
  if spec == 'none':
    return "Weights: random (config.pretrained='none')"
  if spec == 'torchvision':
    cache = os.path.join(caches.root(config), 'pretrained')
    return (f'Weights: torchvision IMAGENET1K_V1 ({config.model}; cached in '
            f'{cache}, downloaded there once)')
  if spec == 'source_task':
    cache = os.path.join(caches.root(config), 'teachers')
    return ('Weights: the teacher trained on the source task '
            f"(config.pretrained='source_task'; trained once, cached in "
            f'{cache})')
  return f'Weights: {os.path.abspath(os.path.expanduser(spec))}'


def export_command(config, workdir):
  """The command that exports the run's student, to run from the cwd.

  Args:
    config: the run config.
    workdir: the run's (absolute) workdir.

  Returns:
    The command line. Of a comparison it exports DTQ's student (else its
    last method's), from the method's folder; outside the repository root it
    names the root in PYTHONPATH, where ``-m dtq_jax.export`` is found.
  """
  methods = tuple(config.get('compare_methods') or ())
  method = config.method
  if methods:
    method = 'dtq' if 'dtq' in methods else methods[-1]
    workdir = os.path.join(workdir, method)
  command = shlex.join([sys.executable, '-m', 'dtq_jax.export', '--workdir',
                        workdir, '--out', f'{method}.dtq', '--check'])
  if os.path.realpath(os.getcwd()) != os.path.realpath(_ROOT):
    command = f'PYTHONPATH={shlex.quote(_ROOT)} {command}'
  return command


def _resume_command(command, workdir):
  """The run's command, with --workdir named when it was the default one."""
  argv = [sys.executable, *command.argv]
  if not command.workdir:
    argv.append(f'--workdir={workdir}')
  return shlex.join(argv)


def _print_results(workdir, summaries, config):
  """Where the results are, and how to export the student (process 0)."""
  methods = tuple(config.get('compare_methods') or ())
  if methods:
    print(f'Comparison: {os.path.join(workdir, files.COMPARISON)}')
    for method in summaries:
      print(f'Summary of {method}: '
            f'{os.path.join(workdir, method, files.SUMMARY)}')
  else:
    print(f'Summary: {os.path.join(workdir, files.SUMMARY)}')
  print(f'Export: {export_command(config, workdir)}')


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


def _start(command, workdir):
  """Checks the command, starts the processes and runs the experiment.

  Everything that needs no other process is checked before connecting to
  them, so that a bad command fails at once in every process.
  """
  allocator_mode = allocator.configure()  # DTQ_ALLOCATOR=default: off
  config = _load_config(command)
  processes = (command.coordinator_address, command.num_processes,
               command.process_id)
  if distributed.launched(*processes) and not command.workdir:
    raise errors.UserError(_NEEDS_WORKDIR)
  if not command.init_timeout_s > 0:
    raise errors.UserError(f'--init_timeout_s={command.init_timeout_s:g}; '
                           'allowed: seconds > 0.')
  config_validation.validate(config, check_devices=False)
  if distributed.maybe_initialize(
      *processes, timeout_s=command.init_timeout_s) and not command.workdir:
    raise errors.UserError(_NEEDS_WORKDIR)  # a TPU pod, found by JAX
  config_validation.check_device_split(config, jax.device_count())
  with quiet.native_logs_hidden(not command.verbose):
    # The data modules import TensorFlow, whose C++ start-up banners only
    # this hides. pylint: disable=g-import-not-at-top
    from dtq_jax.run import experiment
    # pylint: enable=g-import-not-at-top
  caches.enable_compilation_cache(config)
  _allocator_note(config, allocator_mode)
  print(f'Workdir: {workdir}')
  print(weights_line(config))
  summaries = experiment.run(config, workdir)
  _print_results(workdir, summaries, config)


def run(command):
  """Runs what the command line asks for; see the module docstring.

  Args:
    command: the parsed command line.

  Returns:
    The process's exit status.
  """
  workdir = os.path.abspath(command.workdir or
                            default_workdir(command.config_file))
  if not command.verbose:
    _quiet_logs()
  try:
    with _sigterm_aborts():
      _start(command, workdir)
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except OSError as e:
    if e.errno not in files.WRITE_ERRNOS:
      raise
    # A full disk or a workdir that became unwritable during the run.
    print(f'error: cannot write the run in {workdir}: {e}',
          file=_silence_stderr(), flush=True)
    return 2
  except run_result.NonFiniteLossError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except train.Interrupted as e:
    print(f'{e}\nTo resume: {_resume_command(command, workdir)}',
          file=sys.stderr)
    return 128 + e.signum
  except (KeyboardInterrupt, _Aborted) as e:
    # Outside the loop, or a second Ctrl-C inside it: nothing more is saved;
    # the last complete checkpoint (if any) is where a rerun resumes.
    signum = getattr(e, 'signum', signal.SIGINT)
    print(f'{signal.Signals(signum).name}: aborted; rerun the same command '
          f'to resume from the last checkpoint: '
          f'{_resume_command(command, workdir)}', file=_silence_stderr(),
          flush=True)
    return 128 + signum
  return 0
