"""Nothing silently wrong, nothing lost.

Runs that skipped most updates fail; finished runs and comparisons
refuse a changed config and keep every finished row; a failed checkpoint write
stops the run at once; two processes never share a workdir; errors give
advice that applies; leftovers of a killed writer go;
wall times add up over resumed invocations; the console reads well.

Runs are in-process on the tiny image folder (tests/conftest.py), a few steps
each; finished runs are shared between tests by module-scoped fixtures.
"""

import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
import orbax.checkpoint as ocp
import pytest

from dtq_jax.data import datasets
from dtq_jax.infra import errors
from dtq_jax.infra import files
from dtq_jax.run import checkpoints
from dtq_jax.run import config_validation
from dtq_jax.run import experiment
from dtq_jax.run import run_result
from dtq_jax.run import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(tiny_folder, **overrides):
  """The tiny folder config: full-precision fine-tuning, 3 steps an epoch."""
  root, make_config = tiny_folder
  c = make_config(root, 'quick,fp')
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config_validation.validate(c)


def _must_not_be_called(*args, **kwargs):
  raise AssertionError('called, but everything needed was finished')


# ---------------------------------------------------------------------------
# A run stopped (SIGTERM) after step 4 and resumed to its end (6 steps).


@pytest.fixture(scope='module')
def resumed(tiny_folder, tmp_path_factory):
  config = _config(tiny_folder, num_epochs=2, checkpoint_every_steps=1)
  workdir = str(tmp_path_factory.mktemp('resumed') / 'run')
  bars = []

  class RecordedBar(train.ProgressBar):

    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      bars.append(self)

  train_step = train._Run.train  # pylint: disable=protected-access

  def slow_then_stopped(self, batch):
    time.sleep(0.3)
    metrics = train_step(self, batch)
    if self.bar.n == 4:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.01)  # Python runs the handler between bytecodes.
    return metrics

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train._Run, 'train', slow_then_stopped)  # pylint: disable=protected-access
    with pytest.raises(train.Interrupted, match='stopped after step 4'):
      experiment.run(config, workdir)
  # What a writer killed mid-write (kill -9) leaves behind.
  stale = [os.path.join(workdir, 'summary.json.tmp.k9x'),
           os.path.join(workdir, 'seed_1', 'result.json.tmp.k9y')]
  for path in stale:
    with open(path, 'w') as f:  # tmp: a leftover, on purpose
      f.write('{"half')
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, 'ProgressBar', RecordedBar)
    summary = experiment.run(config, workdir)
  return dict(config=config, workdir=workdir, summary=summary, bars=bars,
              stale=stale)


def _result(workdir):
  return run_result.read(os.path.join(workdir, 'seed_1', files.RESULT))


def test_wall_time_adds_up_over_resumed_invocations(resumed):
  summary, result = resumed['summary'], _result(resumed['workdir'])
  # The first invocation trained (and checkpointed) 4 steps of >= 0.3 s.
  assert result['wall_time_s'] >= 1.2
  assert summary['run_wall_time_s'] == [result['wall_time_s']]
  assert summary['wall_time_s'] == pytest.approx(result['wall_time_s'])


def test_stale_temporaries_are_removed_at_start(resumed):
  for path in resumed['stale']:
    assert not os.path.exists(path), path
  assert not glob.glob(os.path.join(resumed['workdir'], '**', '*.tmp.*'),
                       recursive=True)


def test_progress_bar_times_from_the_second_step(resumed):
  bar, = resumed['bars']
  # Resumed at step 4: the rate and ETA count from the end of step 5, the
  # one that compiled (test_progress.py tests the bar itself).
  assert bar.initial == 4 and bar.clock[1] == 5 and bar.n == 6


def test_result_counts_evaluations_and_reads_old_files(resumed, tmp_path):
  result = _result(resumed['workdir'])
  assert result['evaluations'] == 2 and 'epochs' not in result
  old = dict(result)
  old['epochs'] = old.pop('evaluations')
  files.write_json(tmp_path / 'result.json', old)
  assert run_result.read(tmp_path / 'result.json') == result


def test_summary_counts_skipped_steps_and_one_seed_shows_no_spread(resumed):
  summary = resumed['summary']
  assert summary['nonfinite_steps'] == 0
  assert summary['nonfinite_steps_per_repeat'] == [0]
  table = experiment.format_table([('fp', summary)])
  assert '±' not in table and '| skipped steps |' in table
  assert f'| {summary["final_test_accuracy"]:.2f} |' in table
  two = dict(summary, repeats=2, final_test_std=1.5)
  assert '± 1.50' in experiment.format_table([('fp', two)])
  # A summary written before 'repeats' was counts its per-seed accuracies.
  old = {k: v for k, v in two.items() if k != 'repeats'}
  old['final_test_accuracy_per_repeat'] = [70.0, 72.0]
  assert '| fp | 32/32 | 2 | ' in experiment.format_table([('fp', old)])


def test_finished_run_refuses_a_changed_config(resumed, monkeypatch):
  monkeypatch.setattr(datasets, 'load', _must_not_be_called)
  # The same config: the stored summary, nothing loaded or trained.
  assert experiment.run(resumed['config'], resumed['workdir']) == (
      resumed['summary'])
  changed = ml_collections.ConfigDict(resumed['config'].to_dict())
  changed.optim.momentum = 0.5
  with pytest.raises(errors.ConfigError) as e:
    experiment.run(changed, resumed['workdir'])
  message = str(e.value)
  assert 'optim.momentum' in message and 'finished' in message
  assert 'use another --workdir' in message and '\n' not in message


def test_more_seeds_extend_a_finished_run_and_fewer_are_refused(
    resumed, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(resumed['workdir'], workdir)
  # A field the saved config lacks (added to the program later) stays
  # absent: extending the run records the new count only.
  config_path = os.path.join(workdir, files.CONFIG)
  with open(config_path) as f:
    saved = json.load(f)
  del saved['keep_checkpoints']
  files.write_json(config_path, saved)
  seed_1 = os.path.join(workdir, 'seed_1', files.RESULT)
  with open(seed_1, 'rb') as f:
    seed_1_bytes = f.read()
  more = ml_collections.ConfigDict(resumed['config'].to_dict())
  more.repeats = 2
  trained = []
  run_class = train._Run  # pylint: disable=protected-access

  def recorded_run(config, seed_workdir, seed, *args):
    trained.append(seed)
    return run_class(config, seed_workdir, seed, *args)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, '_Run', recorded_run)
    summary = experiment.run(more, workdir)
  # Only the new seed was trained; the finished one is read back unchanged.
  assert trained == [more.seed + 2]
  with open(seed_1, 'rb') as f:
    assert f.read() == seed_1_bytes
  assert summary['repeats'] == 2
  assert summary['seeds'] == [more.seed + 1, more.seed + 2]
  assert summary['final_test_accuracy_per_repeat'][0] == (
      resumed['summary']['final_test_accuracy'])
  with open(config_path) as f:
    assert json.load(f) == dict(saved, repeats=2)
  # The table counts the seeds of each row.
  assert '| fp | 32/32 | 2 | ' in experiment.format_table([('fp', summary)])
  # Rerunning with two seeds shows the finished run; one seed would leave
  # a finished seed out of its summary.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, '_Run', _must_not_be_called)
    assert experiment.run(more, workdir) == summary
    with pytest.raises(errors.ConfigError) as e:
      experiment.run(resumed['config'], workdir)
  message = str(e.value)
  assert message.startswith('config.repeats=1 is invalid;')
  assert 'it was run with repeats=2: ask for as many seeds or more' in message
  assert '\n' not in message


# ---------------------------------------------------------------------------
# Skipped updates.


def test_run_that_skipped_most_updates_fails_and_keeps_its_result(
    tiny_folder, tmp_path):
  config = _config(tiny_folder, **{'optim.lr': 1e30, 'on_nonfinite': 'skip'})
  workdir = str(tmp_path / 'run')
  with pytest.raises(run_result.NonFiniteLossError) as e:
    experiment.run(config, workdir)
  assert 'max_nonfinite_fraction=0.1' in str(e.value)
  result = _result(workdir)
  assert result['nonfinite_steps'] >= 1 and result['steps'] == 3
  assert not os.path.exists(os.path.join(workdir, files.SUMMARY))
  # A rerun fails the same way, without training again.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(train, '_Run', _must_not_be_called)
    with pytest.raises(run_result.NonFiniteLossError):
      experiment.run(config, workdir)


# ---------------------------------------------------------------------------
# Comparisons: every finished cell, one shared config, checks before data.


@pytest.fixture(scope='module')
def comparison(tiny_folder, tmp_path_factory):
  """fp and ft compared, every update after the first skipped (allowed).

  At 32 bits FT-Q's step is fp's (one compiled program for both).
  """
  config = _config(tiny_folder, compare_methods=('fp', 'ft'),
                   on_nonfinite='skip', max_nonfinite_fraction=1.0,
                   bits_w=32, bits_a=32, **{'optim.lr': 1e30})
  workdir = str(tmp_path_factory.mktemp('comparison') / 'compare')
  summaries = experiment.run(config, workdir)
  return config, workdir, summaries


def _table(workdir):
  """comparison.md as its header's cells and ``{method: row's cells}``."""
  with open(os.path.join(workdir, 'comparison.md')) as f:
    lines = [[c.strip() for c in line.strip('|').split('|')]
             for line in f.read().splitlines()]
  return lines[0], {row[0]: row for row in lines[2:]}


def test_comparison_lists_skipped_steps(comparison):
  _, workdir, summaries = comparison
  skipped = summaries['fp']['nonfinite_steps']
  assert skipped >= 1
  header, rows = _table(workdir)
  column = header.index('skipped steps')
  assert rows['fp'][column] == str(skipped)


def test_comparison_keeps_every_finished_cell(comparison, monkeypatch):
  config, workdir, summaries = comparison
  monkeypatch.setattr(datasets, 'load', _must_not_be_called)
  fewer = ml_collections.ConfigDict(config.to_dict())
  fewer.compare_methods = ('ft',)
  assert experiment.run(fewer, workdir) == {'ft': summaries['ft']}
  assert list(_table(workdir)[1]) == ['ft', 'fp']


def test_comparison_cells_share_one_config(comparison, monkeypatch):
  config, workdir, _ = comparison
  monkeypatch.setattr(datasets, 'load', _must_not_be_called)
  other = ml_collections.ConfigDict(config.to_dict())
  other.compare_methods = ('fp', 'l2')  # a new cell, another batch size
  other.batch_size = 4
  with pytest.raises(errors.ConfigError, match=r'config\.batch_size=4 .*'
                     r'fp, run with a different config.*another --workdir'):
    experiment.run(other, workdir)
  assert not os.path.exists(os.path.join(workdir, 'l2'))


# ---------------------------------------------------------------------------
# A checkpoint write that fails in the background.


def test_failed_checkpoint_write_stops_the_run_at_once(tiny_folder, tmp_path,
                                                       monkeypatch):
  # Checkpoints at the ends of epochs 1 and 2 (steps 3 and 6); the write of
  # step 3 fails (a full disk) in orbax's background thread.
  config = _config(tiny_folder, num_epochs=2, checkpoint_every_steps=0)
  finalize = ocp.CheckpointManager._finalize_checkpoint  # pylint: disable=protected-access

  def full_disk(self, step):
    if os.path.basename(str(self.directory)) == checkpoints.LATEST:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return finalize(self, step)

  save, train_step = train._Run.save, train._Run.train  # pylint: disable=protected-access
  trained = []

  def save_then_settle(self, step):
    save(self, step)
    # The write fails quickly, as on a full disk; training goes on meanwhile.
    deadline = time.monotonic() + 60
    while self.latest.is_saving_in_progress() and time.monotonic() < deadline:
      time.sleep(0.01)

  def counted_train(self, batch):
    trained.append(batch)
    return train_step(self, batch)

  monkeypatch.setattr(ocp.CheckpointManager, '_finalize_checkpoint',
                      full_disk)
  monkeypatch.setattr(train._Run, 'save', save_then_settle)  # pylint: disable=protected-access
  monkeypatch.setattr(train._Run, 'train', counted_train)  # pylint: disable=protected-access
  with pytest.raises(OSError) as e:
    experiment.run(config, str(tmp_path / 'run'))
  assert e.value.errno == errno.ENOSPC
  assert len(trained) == 3  # not a step more without its checkpoint


# ---------------------------------------------------------------------------
# Two processes on one workdir.

_HOLD = '''
import sys, time
sys.path.insert(0, {root!r})
from dtq_jax.infra import locks
with locks.workdir_lock({workdir!r}):
  print('held', flush=True)
  time.sleep(300)
'''

_TINY = '''
from configs import mit67

def get_config():
  c = mit67.get_config('quick,fp')
  c.model = 'small_resnet'
  c.model_kwargs = dict(widths=(4, 8, 8, 8))
  c.pretrained = 'none'
  c.dataset.root = {root!r}
  c.cache_dir = {cache!r}
  return c
'''


def test_second_process_on_a_workdir_exits_naming_the_first(tiny_folder,
                                                            tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  holder = subprocess.Popen(
      [sys.executable, '-c', _HOLD.format(root=ROOT, workdir=str(workdir))],
      stdout=subprocess.PIPE, text=True, env=env)
  try:
    assert holder.stdout.readline().strip() == 'held'
    config = tmp_path / 'tiny.py'
    config.write_text(_TINY.format(root=str(tiny_folder[0]),
                                   cache=str(tmp_path / 'cache')))
    proc = subprocess.run(
        [sys.executable, 'main.py', f'--config={config}',
         f'--workdir={workdir}'], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env=env)
  finally:
    holder.kill()
    holder.wait()
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert f'in use by process {holder.pid}' in lines[0]
  assert 'Traceback' not in proc.stderr
  # Refused before anything was trained or written besides the lock.
  assert sorted(os.listdir(workdir)) == ['run.lock', 'run.lock.pid']
