"""main.py's command line: one-line errors, quiet start-up, any directory.

Each case runs main.py in a subprocess that stops before training (a few
seconds each), from a directory other than the repository's.
"""

import os
import socket
import subprocess
import sys

import pytest

from dtq_jax.infra import quiet
from dtq_jax.run import distributed
from dtq_jax.run import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, 'main.py')


def _main(cwd, *args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  for var in ('TF_CPP_MIN_LOG_LEVEL', 'JAX_COORDINATOR_ADDRESS',
              'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(var, None)
  return subprocess.run([sys.executable, MAIN, *args], cwd=cwd,
                        capture_output=True, text=True, timeout=timeout,
                        env=env)


def _only_error_line(proc):
  """The process's stderr is exactly one ``error:`` line; returns it."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  return lines[0]


@pytest.mark.parametrize('override, expected', [
    ('--config.metod=dtq',
     "error: --config.metod: no field 'metod' in the config; did you mean "
     "'method'?"),
    ('--config.optim.lrr=0.1',
     "error: --config.optim.lrr: no field 'lrr' in config.optim; did you "
     "mean 'lr'?"),
])
def test_a_misspelled_field_is_one_line_with_a_suggestion(tmp_path, override,
                                                          expected):
  # Without --config (the default config, found next to main.py) and with
  # one: config_flags applies the overrides at different times.
  proc = _main(tmp_path, override, f'--workdir={tmp_path}/run')
  assert _only_error_line(proc) == expected
  proc = _main(tmp_path, f'--config={ROOT}/configs/fmnist.py:quick', override,
               f'--workdir={tmp_path}/run')
  assert _only_error_line(proc) == expected


def test_from_another_directory_an_invalid_config_is_only_its_error_line(
    tmp_path):
  # The default config is found although the cwd has no configs/; what
  # TensorFlow prints when it starts does not reach the user; the rejected
  # run leaves no config.json, so the corrected command is not refused.
  proc = _main(tmp_path, '--config.keep_checkpoints=0', '--workdir=run')
  assert _only_error_line(proc) == (
      'error: config.keep_checkpoints=0 is invalid; allowed: an integer >= 1.')
  assert not list(tmp_path.rglob('config.json'))


def test_a_config_refused_when_the_data_loads_names_the_workdir(tmp_path):
  proc = _main(tmp_path, f'--config={ROOT}/configs/fmnist.py:quick',
               '--config.batch_size=1000', '--workdir=run')
  assert proc.returncode == 2, proc.stderr[-3000:]
  # The demo's target: 10 classes x 30 shots (in domain).
  assert proc.stderr.splitlines() == [
      'error: config.batch_size=1000 is invalid; the training split has only '
      '300 images; use a batch size at most that.'], proc.stderr
  assert f'Workdir: {tmp_path / "run"}' in proc.stdout.splitlines()
  assert not list(tmp_path.rglob('config.json'))


@pytest.mark.parametrize('override, expected', [
    ('--config.batch_size=4.5',
     'error: --config.batch_size=4.5: expected an int'),
    ('--config.optim.lr=fast',
     'error: --config.optim.lr=fast: expected a float (a number)'),
])
def test_an_override_of_the_wrong_type_is_one_line_naming_the_field(
    tmp_path, override, expected):
  proc = _main(tmp_path, f'--config={ROOT}/configs/fmnist.py:quick', override,
               f'--workdir={tmp_path}/run')
  assert _only_error_line(proc) == expected
  assert not (tmp_path / 'run').exists()


def test_a_run_refused_at_start_leaves_no_workdir_and_named_its_weights(
    tmp_path):
  # Refused when the data loads, after the workdir was made and locked.
  proc = _main(tmp_path, f'--config={ROOT}/configs/fmnist.py:quick',
               '--config.batch_size=1000', '--workdir=runs/refused')
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Weights: the teacher trained on the source task' in proc.stdout
  assert not (tmp_path / 'runs').exists()


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_a_process_alone_stops_at_the_init_timeout_with_one_line(tmp_path):
  address = f'127.0.0.1:{_free_port()}'
  # No wall-clock threshold (start-up time is the machine's): the process
  # must end within the subprocess limit of 240 s, below the default wait of
  # 300 s, so it cannot have waited the default; the message names the 3 s.
  proc = _main(tmp_path, f'--config={ROOT}/configs/fmnist.py:quick',
               f'--workdir={tmp_path}/run', f'--coordinator_address={address}',
               '--num_processes=2', '--process_id=0', '--init_timeout_s=3',
               timeout=240)
  assert _only_error_line(proc) == (
      f'error: process 0 of 2 waited 3 s (--init_timeout_s) at the '
      f'coordinator {address}: process 1 did not join; start every process '
      'with the same --coordinator_address and --num_processes, each with its '
      'own --process_id.')


def test_a_multi_process_run_is_checked_before_it_connects(tmp_path):
  # No process 0 exists: the errors come without waiting for it.
  address = f'127.0.0.1:{_free_port()}'
  multi = [f'--coordinator_address={address}', '--num_processes=2',
           '--process_id=1', '--init_timeout_s=120']
  proc = _main(tmp_path, *multi, timeout=60)
  assert _only_error_line(proc) == (
      'error: a multi-process run needs an explicit --workdir shared by all '
      'processes.')
  proc = _main(tmp_path, *multi, '--workdir=run', '--config.repeats=0',
               timeout=60)
  assert _only_error_line(proc) == (
      'error: config.repeats=0 is invalid; allowed: an integer >= 1.')


def test_process_k_names_a_coordinator_nobody_answers_at(monkeypatch):
  address = f'127.0.0.1:{_free_port()}'
  assert distributed._timeout_message(address, 3, 2, 10) == (
      f'process 2 of 3 waited 10 s (--init_timeout_s) at the coordinator '
      f'{address}: nothing answers there (process 0 has not started, or the '
      'address is wrong); start every process with the same '
      '--coordinator_address and --num_processes, each with its own '
      '--process_id.')
  monkeypatch.setattr(distributed, '_answers', lambda address: True)
  assert ': not all of processes 1, 3 joined;' in (
      distributed._timeout_message(address, 4, 2, 10))


def test_launched_needs_no_runtime(monkeypatch):
  for var in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES',
              'JAX_PROCESS_ID', 'OMPI_COMM_WORLD_SIZE',
              'SLURM_STEP_NUM_TASKS', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(var, raising=False)
  assert not distributed.launched()
  assert distributed.launched('10.0.0.1:1234', 2, 1)
  assert not distributed.launched('10.0.0.1:1234', 1, 0)
  monkeypatch.setenv('SLURM_STEP_NUM_TASKS', '4')
  assert distributed.launched()


def test_orbax_notes_are_hidden_but_not_its_errors():
  import logging  # pylint: disable=g-import-not-at-top

  def record(level, path):
    return logging.LogRecord('absl', level, path, 1, 'note', (), None)

  orbax = os.path.join(os.sep, 'site-packages', 'orbax', 'checkpoint',
                       'checkpoint_manager.py')
  assert not quiet.hide_orbax_notes(record(logging.WARNING, orbax))
  assert quiet.hide_orbax_notes(record(logging.ERROR, orbax))
  assert quiet.hide_orbax_notes(record(logging.WARNING, os.path.join(
      ROOT, 'dtq_jax', 'sources.py')))


def test_command_line_tools_spell_flags_with_underscores():
  # One style for every tool: main.py's absl flags are --like_this, so the
  # argparse tools' (export, pretrained, plot, benchmarks) are too.
  import glob  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  first_long = re.compile(r"add_argument\(\s*'(--[^']+)'")
  found = {}
  # Subpackages too: the tools' parsers live where their code does (the
  # pretrained command's in dtq_jax/weights/).
  for path in glob.glob(os.path.join(ROOT, 'dtq_jax', '**', '*.py'),
                        recursive=True) + glob.glob(
                            os.path.join(ROOT, 'benchmarks', '*.py')):
    with open(path) as f:
      for flag in first_long.findall(f.read()):
        found[flag] = os.path.relpath(path, ROOT)
  assert '--cache_dir' in found and '--workdir' in found
  assert not {f: p for f, p in found.items() if '-' in f[2:]}
