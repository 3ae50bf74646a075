"""main.py's start-up (launch.py), in-process: no subprocess, no training.

tests/test_cli.py runs main.py itself for the same behaviour end to end.
"""

import errno
import os
import shlex
import signal
import sys
import time

from absl import flags
from absl import logging
from ml_collections import config_flags
import pytest

from configs import mit67
from dtq_jax.infra import allocator
from dtq_jax.infra import caches
from dtq_jax.infra import quiet
from dtq_jax.run import distributed
from dtq_jax.run import experiment
from dtq_jax.run import launch
from dtq_jax.run import run_result
from dtq_jax.run import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(ROOT, 'configs', 'fmnist.py')

# A config with a field of each overridable scalar type.
_TYPED_CONFIG = """
import ml_collections

def get_config():
  return ml_collections.ConfigDict(dict(
      steps=3, lr=0.5, flag=True, name='a',
      optim=ml_collections.ConfigDict(dict(lr=0.1))))
"""


def _parse(argv):
  """``launch.parse_flags`` on fresh flags, as main.py defines --config."""
  flag_values = flags.FlagValues()
  try:
    config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'help',
                                    flag_values=flag_values, lock_config=True,
                                    sys_argv=argv)
  except (AttributeError, KeyError):
    # Without --config the default config's overrides are applied here.
    launch.exit_if_unknown_field(argv, DEFAULT_CONFIG)
    raise
  launch.parse_flags(argv, DEFAULT_CONFIG, flag_values)
  return flag_values


@pytest.fixture(name='typed_config')
def typed_config_fixture(tmp_path):
  path = tmp_path / 'typed.py'
  path.write_text(_TYPED_CONFIG)
  return f'--config={path}'


@pytest.mark.parametrize('override, expected', [
    ('--config.steps=4.5', '--config.steps=4.5: expected an int'),
    ('--config.steps=', '--config.steps=: expected an int'),
    ('--config.lr=fast', '--config.lr=fast: expected a float (a number)'),
    ('--config.optim.lr=1e-3x',
     '--config.optim.lr=1e-3x: expected a float (a number)'),
    ('--config.flag=maybe',
     '--config.flag=maybe: expected a bool (true or false)'),
])
def test_an_override_of_the_wrong_type_names_the_field_and_type(
    typed_config, capsys, override, expected):
  with pytest.raises(SystemExit) as e:
    _parse(['main.py', typed_config, override])
  assert e.value.code == 2
  assert capsys.readouterr().err == f'error: {expected}\n'


def test_an_override_given_as_two_arguments_is_named_with_its_value(
    typed_config, capsys):
  with pytest.raises(SystemExit):
    _parse(['main.py', typed_config, '--config.steps', '2.5'])
  assert capsys.readouterr().err == (
      'error: --config.steps=2.5: expected an int\n')


def test_overrides_of_the_right_type_parse(typed_config):
  parsed = _parse(['main.py', typed_config, '--config.steps=4',
                   '--config.lr=1', '--config.flag=false', '--config.name=4.5'])
  assert (parsed.config.steps, parsed.config.lr) == (4, 1.0)
  assert parsed.config.flag is False and parsed.config.name == '4.5'


def test_the_default_config_reports_a_wrong_type_too(capsys):
  # Without --config, config_flags reads the overrides of the default one.
  with pytest.raises(SystemExit):
    _parse(['main.py', '--config.batch_size=4.5'])
  assert capsys.readouterr().err == (
      'error: --config.batch_size=4.5: expected an int\n')


@pytest.mark.parametrize('config', [[], [f'--config={DEFAULT_CONFIG}']])
def test_a_misspelled_field_is_its_one_line(capsys, config):
  # With --config, config_flags applies the overrides when the flags parse.
  with pytest.raises(SystemExit) as e:
    _parse(['main.py', *config, '--config.batch_sise=4'])
  assert e.value.code == 2
  assert capsys.readouterr().err == (
      "error: --config.batch_sise: no field 'batch_sise' in the config; did "
      "you mean 'batch_size'?\n")


def test_other_flag_errors_keep_their_first_line(capsys):
  flag_values = flags.FlagValues()
  flags.DEFINE_integer('num', 1, 'help', flag_values=flag_values)
  argv = ['main.py', '--num=x']
  with pytest.raises(SystemExit):
    launch.parse_flags(argv, DEFAULT_CONFIG, flag_values)
  err = capsys.readouterr().err
  assert err.startswith('error: flag --num=x: ') and err.count('\n') == 1


@pytest.fixture(name='quiet_start')
def quiet_start_fixture(monkeypatch):
  """A start-up that leaves this process as it was.

  No allocator tuning, no compilation cache of the run's, no multi-process
  environment, absl's logging restored after; ``experiment.run`` is each
  test's to replace.
  """
  monkeypatch.setattr(allocator, 'configure', lambda: 'keep (test)')
  monkeypatch.setattr(caches, 'enable_compilation_cache', lambda config: None)
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
              'JAX_PROCESS_ID', 'OMPI_COMM_WORLD_SIZE',
              'SLURM_STEP_NUM_TASKS', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(var, raising=False)
  # Where the abort and write-error paths send their line (the real stderr's
  # descriptor otherwise goes to /dev/null for the rest of the process).
  monkeypatch.setattr(launch, '_silence_stderr', lambda: sys.stderr)
  handler = logging.get_absl_handler().python_handler
  monkeypatch.setattr(handler, 'filters', list(handler.filters))
  verbosity = logging.get_verbosity()
  yield
  logging.set_verbosity(verbosity)


def _command(tmp_path, config=None, **kwargs):
  if config is None:
    config = mit67.get_config('quick')
    config.dataset.root = str(tmp_path)
    config.pretrained = 'none'
  kwargs.setdefault('workdir', str(tmp_path / 'run'))
  return launch.Command(config=config, config_file='configs/mit67.py',
                        argv=('main.py', '--config=configs/mit67.py:quick'),
                        **kwargs)


def _summary_of(config, workdir):
  del config, workdir
  return {'final_test_accuracy': 50.0}


def test_a_run_prints_its_workdir_weights_results_and_export(
    tmp_path, quiet_start, monkeypatch, capsys):
  del quiet_start
  monkeypatch.setattr(experiment, 'run', _summary_of)
  monkeypatch.chdir(ROOT)  # Where python -m dtq_jax.export needs no path.
  assert launch.run(_command(tmp_path)) == 0
  workdir = tmp_path / 'run'
  assert capsys.readouterr().out.splitlines() == [
      f'Workdir: {workdir}',
      "Weights: random (config.pretrained='none')",
      f'Summary: {workdir / "summary.json"}',
      f'Export: {sys.executable} -m dtq_jax.export --workdir {workdir} --out '
      'dtq.dtq --check']


def test_an_invalid_config_is_one_line_and_makes_no_workdir(
    tmp_path, quiet_start, capsys):
  del quiet_start
  command = _command(tmp_path)
  command.config.keep_checkpoints = 0
  assert launch.run(command) == 2
  captured = capsys.readouterr()
  assert captured.err == ('error: config.keep_checkpoints=0 is invalid; '
                          'allowed: an integer >= 1.\n')
  assert not captured.out and not (tmp_path / 'run').exists()


def test_a_multi_process_run_needs_a_workdir_before_it_connects(
    tmp_path, quiet_start, monkeypatch, capsys):
  del quiet_start
  def connect(*args, **kwargs):
    raise AssertionError('connected before the checks')
  monkeypatch.setattr(distributed, 'maybe_initialize', connect)
  command = _command(tmp_path, workdir=None,
                     coordinator_address='127.0.0.1:1', num_processes=2,
                     process_id=1)
  assert launch.run(command) == 2
  assert capsys.readouterr().err == (
      'error: a multi-process run needs an explicit --workdir shared by all '
      'processes.\n')
  assert launch.run(_command(tmp_path, init_timeout_s=0.0)) == 2
  assert capsys.readouterr().err == (
      'error: --init_timeout_s=0; allowed: seconds > 0.\n')


def test_an_interrupted_run_prints_how_to_resume(tmp_path, quiet_start,
                                                 monkeypatch, capsys):
  del quiet_start
  def interrupted(config, workdir):
    raise train.Interrupted('SIGTERM: stopped at step 3.', signal.SIGTERM)
  monkeypatch.setattr(experiment, 'run', interrupted)
  monkeypatch.chdir(tmp_path)
  # The default workdir (runs/<config>-<time>) is named in the command.
  assert launch.run(_command(tmp_path, workdir=None)) == 128 + signal.SIGTERM
  err = capsys.readouterr().err.splitlines()
  assert err[0] == 'SIGTERM: stopped at step 3.'
  resume = shlex.split(err[1][len('To resume: '):])
  assert resume[:3] == [sys.executable, 'main.py',
                        '--config=configs/mit67.py:quick']
  assert resume[3].startswith(f'--workdir={tmp_path}/runs/mit67-')


def test_sigterm_outside_the_loop_aborts_with_the_resume_command(
    tmp_path, quiet_start, monkeypatch, capsys):
  del quiet_start
  def killed(config, workdir):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # Python runs the handler between bytecodes.
    raise AssertionError('SIGTERM did not stop the run')
  monkeypatch.setattr(experiment, 'run', killed)
  previous = signal.getsignal(signal.SIGTERM)
  assert launch.run(_command(tmp_path)) == 128 + signal.SIGTERM
  err = capsys.readouterr().err
  assert err.startswith('SIGTERM: aborted; rerun the same command to resume')
  assert '--config=configs/mit67.py:quick' in err
  assert signal.getsignal(signal.SIGTERM) is previous


@pytest.mark.parametrize('error, status, line', [
    (run_result.NonFiniteLossError('loss is nan at step 2'), 1,
     'error: loss is nan at step 2'),
    (OSError(errno.ENOSPC, 'No space left on device'), 2,
     'error: cannot write the run in {workdir}: [Errno 28] No space left on '
     'device'),
])
def test_how_a_failed_run_ends(tmp_path, quiet_start, monkeypatch, capsys,
                               error, status, line):
  del quiet_start
  def fail(config, workdir):
    raise error
  monkeypatch.setattr(experiment, 'run', fail)
  assert launch.run(_command(tmp_path)) == status
  assert capsys.readouterr().err == line.format(
      workdir=tmp_path / 'run') + '\n'


def test_an_os_error_that_is_no_write_error_is_a_bug(tmp_path, quiet_start,
                                                     monkeypatch):
  del quiet_start
  def fail(config, workdir):
    raise OSError(errno.EBADF, 'Bad file descriptor')
  monkeypatch.setattr(experiment, 'run', fail)
  with pytest.raises(OSError, match='Bad file descriptor'):
    launch.run(_command(tmp_path))


def test_logs_are_quiet_unless_verbose(tmp_path, quiet_start, monkeypatch):
  del quiet_start
  seen = {}
  def record_logging(config, workdir):
    seen['verbosity'] = logging.get_verbosity()
    seen['filters'] = list(
        logging.get_absl_handler().python_handler.filters)
    return {}
  monkeypatch.setattr(experiment, 'run', record_logging)
  logging.set_verbosity(logging.DEBUG)
  assert launch.run(_command(tmp_path, verbose=True)) == 0
  assert seen['verbosity'] == logging.DEBUG
  assert quiet.hide_orbax_notes not in seen['filters']
  assert launch.run(_command(tmp_path)) == 0
  assert seen['verbosity'] == logging.WARNING
  assert quiet.hide_orbax_notes in seen['filters']


def test_the_weights_line_names_what_the_run_starts_from(tmp_path):
  config = mit67.get_config('quick')
  config.cache_dir = str(tmp_path / 'cache')
  config.pretrained = 'none'
  assert launch.weights_line(config) == (
      "Weights: random (config.pretrained='none')")
  config.pretrained = 'torchvision'
  assert launch.weights_line(config) == (
      f'Weights: torchvision IMAGENET1K_V1 (resnet50; cached in '
      f'{tmp_path}/cache/pretrained, downloaded there once)')
  config.pretrained = 'source_task'
  assert launch.weights_line(config) == (
      "Weights: the teacher trained on the source task (config.pretrained="
      f"'source_task'; trained once, cached in {tmp_path}/cache/teachers)")
  weights = tmp_path / 'resnet50.pth'
  weights.write_bytes(b'')
  config.pretrained = os.path.relpath(weights)
  assert launch.weights_line(config) == f'Weights: {weights}'


def test_the_export_command_names_the_method_folder(tmp_path, monkeypatch):
  config = mit67.get_config('quick')
  monkeypatch.chdir(ROOT)
  assert shlex.split(launch.export_command(config, '/runs/a b')) == [
      sys.executable, '-m', 'dtq_jax.export', '--workdir', '/runs/a b',
      '--out', 'dtq.dtq', '--check']
  config.compare_methods = ('fp', 'ft', 'dtq')
  assert shlex.split(launch.export_command(config, '/runs/c'))[4] == (
      '/runs/c/dtq')
  config.compare_methods = ('fp', 'ft')
  words = shlex.split(launch.export_command(config, '/runs/c'))
  assert (words[4], words[6]) == ('/runs/c/ft', 'ft.dtq')
  # Elsewhere python -m finds the package through PYTHONPATH.
  monkeypatch.chdir(tmp_path)
  words = shlex.split(launch.export_command(config, '/runs/c'))
  assert words[0] == f'PYTHONPATH={ROOT}' and words[1] == sys.executable
