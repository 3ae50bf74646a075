"""Faults: kills, interrupts, damaged checkpoints, NaNs, bad workdirs, images.

The program runs in subprocesses on a tiny config (a config file written into
the test's temporary folder), is stopped from outside at chosen points by
watching what it writes (metrics.jsonl, orbax's checkpoint folders), resumed,
and compared with an uninterrupted run: the same final metrics and the same
final parameters. Every run shares one XLA compilation cache, so only the
first run of each program compiles.
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs import mit67
from dtq_jax.data import input_pipeline
from dtq_jax.data import splits
from dtq_jax.infra import errors
from dtq_jax.infra import files
from dtq_jax.run import checkpoints
from dtq_jax.run import config_validation
from dtq_jax.run import experiment
from dtq_jax.run import launch
from dtq_jax.run import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 600
TMP_CHECKPOINT = re.compile(r'^(\d+)\.orbax-checkpoint-tmp')

_TINY = '''
from configs import mit67


def get_config(arg=None):
  """mit67's ':quick' variant, tinier: 2 epochs x 3 steps, 4..8 channels.

  Full-precision fine-tuning ('fp'): the loop, checkpoints and signals do
  not depend on the method, and without fake quantization a run starts in
  about 60% of the time.
  """
  c = mit67.get_config('quick')
  c.model = 'small_resnet'
  c.model_kwargs = dict(widths=(4, 8, 8, 8))
  c.method = 'fp'
  c.pretrained = 'none'
  c.dataset.root = {root!r}
  c.dataset.train_per_class = 6
  c.dataset.test_per_class = 4
  c.checkpoint_every_steps = 1
  c.keep_checkpoints = 3
  c.cache_dir = {cache!r}
  return c
'''


def _write_png(path, pixels):
  tf.io.write_file(str(path), tf.io.encode_png(pixels))


@pytest.fixture(scope='module')
def env(tmp_path_factory, class_images):
  """An image folder, the tiny config file and a shared cache folder.

  Each class has exactly the 10 readable images the config uses (6 train,
  4 test), some of them grayscale, gray + alpha or RGBA, which the pipeline
  converts to RGB; three unreadable files (random bytes, a truncated PNG, an
  empty file) are skipped.
  """
  base = tmp_path_factory.mktemp('faults')
  root = base / 'folder'
  class_images(root, 10, 40)
  rng = np.random.RandomState(1)
  gray = rng.randint(0, 255, (40, 40, 1)).astype(np.uint8)
  alpha = np.full((40, 40, 1), 128, np.uint8)
  _write_png(root / 'class0' / '0.png', gray)
  _write_png(root / 'class1' / '1.png',
             np.concatenate([rng.randint(0, 255, (40, 40, 3)).astype(
                 np.uint8), alpha], -1))
  _write_png(root / 'class2' / '2.png', np.concatenate([gray, alpha], -1))
  tf.io.write_file(str(root / 'class2' / '3.jpg'), tf.io.encode_jpeg(gray))
  os.remove(root / 'class2' / '3.png')
  (root / 'class0' / 'corrupt.jpg').write_bytes(rng.bytes(300))
  good = (root / 'class1' / '2.png').read_bytes()
  (root / 'class1' / 'truncated.png').write_bytes(good[:len(good) // 2])
  (root / 'class2' / 'empty.png').write_bytes(b'')
  config = base / 'tiny.py'
  config.write_text(_TINY.format(root=str(root), cache=str(base / 'cache')))
  return {'base': base, 'root': str(root), 'config': str(config)}


def _args(env, workdir, overrides):
  return [sys.executable, 'main.py', f'--config={env["config"]}',
          f'--workdir={workdir}', *overrides]


def _env():
  # Unbuffered: what a killed run printed is all in its output.
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu',
              PYTHONUNBUFFERED='1')


def run_main(env, workdir, *overrides, **kwargs):
  """Runs main.py to the end; returns the CompletedProcess."""
  return subprocess.run(_args(env, workdir, overrides), cwd=ROOT,
                        capture_output=True, text=True, timeout=TIMEOUT,
                        env=_env(), **kwargs)


_STARTED = []


@pytest.fixture(autouse=True)
def _no_run_left_behind():
  yield
  while _STARTED:
    proc = _STARTED.pop()
    if proc.poll() is None:
      proc.kill()
      proc.wait()


class Started:
  """main.py in the background, its output in files (no pipe can fill)."""

  def __init__(self, env, workdir, *overrides):
    self.workdir = str(workdir)
    logs = os.path.dirname(self.workdir)
    os.makedirs(self.workdir, exist_ok=True)
    # pylint: disable=consider-using-with
    self._out = open(os.path.join(logs, 'stdout.txt'), 'w+')
    self._err = open(os.path.join(logs, 'stderr.txt'), 'w+')
    self.proc = subprocess.Popen(_args(env, workdir, overrides), cwd=ROOT,
                                 stdout=self._out, stderr=self._err,
                                 env=_env())
    _STARTED.append(self.proc)

  def wait_for(self, condition, timeout=TIMEOUT):
    """Polls ``condition()`` every 2 ms while the process lives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if condition():
        return True
      if self.proc.poll() is not None:
        return condition()
      time.sleep(0.002)
    raise TimeoutError(f'condition not met in {timeout}s')

  def finish(self, timeout=TIMEOUT):
    """Waits for the exit; returns (returncode, stdout, stderr)."""
    code = self.proc.wait(timeout)
    texts = []
    for f in (self._out, self._err):
      f.seek(0)
      texts.append(f.read())
      f.close()
    return code, texts[0], texts[1]


def _seed_dir(workdir):
  return os.path.join(str(workdir), 'seed_1')


def _ckpt_dir(workdir):
  return os.path.join(_seed_dir(workdir), 'checkpoints')


def metrics_step(workdir):
  """The last step in metrics.jsonl (0 if none)."""
  try:
    with open(os.path.join(_seed_dir(workdir), 'metrics.jsonl')) as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return 0
  steps = [0]
  for line in lines:
    try:
      steps.append(json.loads(line)['step'])
    except ValueError:  # A line being written.
      pass
  return max(steps)


def finished_checkpoints(workdir):
  try:
    names = os.listdir(_ckpt_dir(workdir))
  except FileNotFoundError:
    return []
  return sorted(int(n) for n in names if n.isdigit())


def checkpoints_being_written(workdir):
  try:
    names = os.listdir(_ckpt_dir(workdir))
  except FileNotFoundError:
    return []
  return sorted(int(m.group(1)) for m in map(TMP_CHECKPOINT.match, names)
                if m)


def _result(workdir):
  with open(os.path.join(_seed_dir(workdir), 'result.json')) as f:
    return json.load(f)


def _summary(workdir):
  with open(os.path.join(str(workdir), 'summary.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def baseline_run(env):
  """An uninterrupted run (it also fills the compilation cache)."""
  workdir = env['base'] / 'baseline'
  proc = run_main(env, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


@pytest.fixture
def baseline(baseline_run):
  return baseline_run[0]


def assert_same_as_baseline(workdir, baseline):
  """Same final metrics, history and final parameters as the baseline."""
  got, want = _result(workdir), _result(baseline)
  for key in ('final_test_accuracy', 'best_test_accuracy', 'best_epoch',
              'steps', 'evaluations', 'nonfinite_steps', 'history'):
    assert got[key] == want[key], key
  for key in ('final_test_accuracy', 'best_test_accuracy'):
    assert _summary(workdir)[key] == _summary(baseline)[key]
  for best in (False, True):
    a = checkpoints.restore_params(_seed_dir(workdir), best=best)
    b = checkpoints.restore_params(_seed_dir(baseline), best=best)
    jax.tree.map(np.testing.assert_array_equal, a, b)
  # Nothing half-written is left behind.
  assert not glob.glob(os.path.join(str(workdir), '**', '*.tmp*'),
                       recursive=True)


# ---------------------------------------------------------------------------
# Interrupts and kills, each resumed and compared with the uninterrupted run.


@pytest.mark.parametrize('signum,moment,overrides', [
    # Checkpoints only at epoch ends (steps 3 and 6): the stop writes its own.
    (signal.SIGTERM, 'between_steps', ('--config.checkpoint_every_steps=0',)),
    (signal.SIGINT, 'checkpoint_write', ()),
])
def test_signal_checkpoints_and_resumes(env, baseline, tmp_path, signum,
                                        moment, overrides):
  workdir = tmp_path / 'run'
  run = Started(env, workdir, *overrides)
  if moment == 'between_steps':
    assert run.wait_for(lambda: metrics_step(workdir) >= 2)
  else:
    assert run.wait_for(lambda: checkpoints_being_written(workdir))
  run.proc.send_signal(signum)
  code, _, err = run.finish()
  assert code == 128 + signum, err[-3000:]
  stopped = int(re.search(r'stopped after step (\d+)', err).group(1))
  assert 1 <= stopped < 6
  # The step it names is the last checkpoint, complete.
  assert finished_checkpoints(workdir)[-1] == stopped
  assert not checkpoints_being_written(workdir)
  assert 'Traceback' not in err
  assert 'resume' in err and f'--workdir={workdir}' in err
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))

  proc = run_main(env, workdir, *overrides)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'at step {stopped}' in proc.stdout
  assert_same_as_baseline(workdir, baseline)


def test_sigkill_between_steps_and_during_a_checkpoint_write_resumes(
    env, baseline, tmp_path):
  workdir = tmp_path / 'run'
  # 1. Killed once checkpoint 2 is complete: the loop is on step 3 or 4.
  run = Started(env, workdir)
  assert run.wait_for(lambda: 2 in finished_checkpoints(workdir))
  run.proc.kill()
  code, _, _ = run.finish()
  assert code == -signal.SIGKILL
  resumed = max(finished_checkpoints(workdir))
  assert resumed < 6

  # 2. Resumed, and killed while a later checkpoint is being written: orbax
  # writes step N under N.orbax-checkpoint-tmp* and renames it when it is
  # complete.
  run = Started(env, workdir)
  assert run.wait_for(
      lambda: any(s > resumed for s in checkpoints_being_written(workdir)))
  run.proc.kill()
  code, out, _ = run.finish()
  assert code == -signal.SIGKILL
  assert f'at step {resumed}' in out
  assert checkpoints_being_written(workdir), (
      'the kill came after the checkpoint was complete')
  assert not os.path.exists(os.path.join(_seed_dir(workdir), 'result.json'))

  # 3. Resumed to the end: the same as a run never interrupted.
  proc = run_main(env, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Resuming' in proc.stdout
  assert_same_as_baseline(workdir, baseline)
  assert not checkpoints_being_written(workdir)


def test_second_sigint_aborts_at_once():
  previous = signal.getsignal(signal.SIGINT)
  with train._StopRequest() as stop:  # pylint: disable=protected-access
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # Python runs the handler between bytecodes.
    assert stop.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  assert signal.getsignal(signal.SIGINT) is previous


def test_sigterm_outside_the_loop_aborts_like_ctrl_c():
  # main.py's handler (launch's) while data load, a teacher trains or
  # between seeds.
  previous = signal.signal(signal.SIGTERM, launch._abort_on_sigterm)  # pylint: disable=protected-access
  try:
    with pytest.raises(launch._Aborted) as e:  # pylint: disable=protected-access
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(1)
    assert e.value.signum == signal.SIGTERM
    # Inside the loop its own handler takes over, and gives main's back.
    with train._StopRequest() as stop:  # pylint: disable=protected-access
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.01)
      assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is launch._abort_on_sigterm  # pylint: disable=protected-access
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_signal_while_logging_stops_with_a_checkpoint_of_that_step(
    tiny_folder, tmp_path, monkeypatch):
  # A signal that arrives after the loop decided not to checkpoint a step
  # (here: while step 2 is logged) must not end the run claiming that step's
  # checkpoint: the loop stops after the next step, with its checkpoint.
  root, make_config = tiny_folder
  config = make_config(root, 'quick,fp')  # one step an epoch
  config.num_epochs = 4
  config.eval_every_epochs = 4
  config.checkpoint_every_steps = 0  # checkpoints: at step 4 and on a stop
  config.log_every_steps = 1
  write = files.MetricsLog.write  # pylint: disable=protected-access

  def write_then_signal(self, step, scalars):
    write(self, step, scalars)
    if step == 2 and 'train/loss_ce' in scalars:
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.01)  # Python runs the handler between bytecodes.

  monkeypatch.setattr(files.MetricsLog, 'write', write_then_signal)  # pylint: disable=protected-access
  workdir = tmp_path / 'run'
  with pytest.raises(train.Interrupted) as e:
    experiment.run(config_validation.validate(config), str(workdir))
  assert e.value.signum == signal.SIGTERM
  assert 'SIGTERM: stopped after step 3 ' in str(e.value)
  assert finished_checkpoints(workdir) == [3]


def test_resumed_logs_drop_what_was_logged_after_the_checkpoint(tmp_path):
  # A killed attempt logged steps 4 and 5 (and half of 6) after its last
  # checkpoint, step 3; the resumed run trains them again.
  logger = files.MetricsLog(str(tmp_path), True)  # pylint: disable=protected-access
  for step in range(1, 6):
    logger.write(step, {'train/loss_ce': float(step)})
  logger.close()
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 6, "train/lo')
  logger = files.MetricsLog(str(tmp_path), True, start_step=3)  # pylint: disable=protected-access
  logger.write(4, {'train/loss_ce': 40.0})
  logger.close()
  with open(tmp_path / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  assert [(r['step'], r['train/loss_ce']) for r in records] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
  # TensorBoard hides the first attempt's events from step 4 on.
  starts = []
  for path in glob.glob(str(tmp_path / 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      if event.HasField('session_log'):
        starts.append((event.step, event.session_log.status))
  assert (4, tf.compat.v1.SessionLog.START) in starts


# ---------------------------------------------------------------------------
# Damaged checkpoints.


def _largest_array_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, 'state', '**', '*'),
                                recursive=True)
           if os.path.isfile(f) and os.sep + 'd' + os.sep in f]
  return max(files, key=os.path.getsize)


def test_truncated_and_corrupt_checkpoints_fall_back(env, baseline, tmp_path):
  """Step 6 truncated, step 5 with flipped bytes: resumes from step 4."""
  workdir = tmp_path / 'run'
  shutil.copytree(baseline, workdir)
  os.remove(workdir / 'summary.json')
  os.remove(os.path.join(_seed_dir(workdir), 'result.json'))
  assert finished_checkpoints(workdir) == [4, 5, 6]
  truncated = _largest_array_file(os.path.join(_ckpt_dir(workdir), '6'))
  os.truncate(truncated, os.path.getsize(truncated) // 2)
  # Bytes that still decode are caught by the checksum in the meta.
  flipped = _largest_array_file(os.path.join(_ckpt_dir(workdir), '5'))
  with open(flipped, 'r+b') as f:
    size = os.path.getsize(flipped)
    for offset in (size // 4, size // 2, 3 * size // 4):
      f.seek(offset)
      byte = f.read(1)[0]
      f.seek(offset)
      f.write(bytes([byte ^ 0x55]))

  proc = run_main(env, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for step in (6, 5):
    assert re.search(rf'checkpoint \S+/{step} is unreadable', proc.stdout), (
        proc.stdout)
  assert 'at step 4' in proc.stdout
  assert finished_checkpoints(workdir) == [4, 5, 6]
  assert_same_as_baseline(workdir, baseline)
  # The unreadable steps were moved aside, not deleted.
  aside = os.listdir(os.path.join(_seed_dir(workdir), 'unreadable_checkpoints'))
  assert sorted(name.split('-')[0] for name in aside) == ['5', '6']


# ---------------------------------------------------------------------------
# Non-finite losses.


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(env,
                                                                 tmp_path):
  workdir = tmp_path / 'run'
  proc = run_main(env, workdir, '--config.optim.lr=1e30')
  assert proc.returncode == 1, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1, proc.stderr[-3000:]
  match = re.search(r'non-finite (loss_\w+|gradient).* at step (\d+)',
                    errors[0])
  assert match, errors[0]
  bad_step = int(match.group(2))
  assert 'Traceback' not in proc.stderr
  # Every checkpoint is from before the bad step, complete and finite.
  steps = finished_checkpoints(workdir)
  assert steps and steps[-1] == bad_step - 1
  assert not checkpoints_being_written(workdir)
  restored = checkpoints.restore_params(_seed_dir(workdir))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored))
  assert not os.path.exists(os.path.join(_seed_dir(workdir), 'result.json'))


def test_nonfinite_steps_can_be_skipped(env, tmp_path):
  workdir = tmp_path / 'run'
  proc = run_main(env, workdir, '--config.optim.lr=1e30',
                  '--config.on_nonfinite=skip',
                  '--config.max_nonfinite_fraction=1.0')
  assert proc.returncode == 0, proc.stderr[-3000:]
  skipped = _result(workdir)['nonfinite_steps']
  assert 1 <= skipped <= 5
  assert 'warning: skipped' in proc.stdout + proc.stderr
  with open(os.path.join(_seed_dir(workdir), 'metrics.jsonl')) as f:
    logged = [json.loads(l).get('train/nonfinite_steps') for l in f]
  assert max(x for x in logged if x is not None) == skipped


# ---------------------------------------------------------------------------
# Workdirs: finished ones, and ones that cannot be written.


def test_finished_workdir_is_not_overwritten(env, baseline):
  before = {p: os.path.getmtime(p) for p in glob.glob(
      os.path.join(str(baseline), '**', '*'), recursive=True)}
  proc = run_main(env, baseline)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'is finished; not overwriting it' in proc.stdout
  after = {p: os.path.getmtime(p) for p in glob.glob(
      os.path.join(str(baseline), '**', '*'), recursive=True)}
  assert after == before


@pytest.mark.parametrize('kind', ['read_only', 'file_in_the_way'])
def test_unwritable_workdir_is_one_line_exit_2(env, tmp_path, kind):
  if kind == 'read_only':
    workdir = tmp_path / 'run'
    os.makedirs(workdir)
    os.chmod(workdir, 0o555)
    if os.access(workdir, os.W_OK):
      pytest.skip('permissions do not apply to this user (root)')
  else:
    (tmp_path / 'file').write_text('')
    workdir = tmp_path / 'file' / 'run'
  proc = run_main(env, workdir)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and str(workdir) in errors[0], proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr


def test_full_disk_during_checkpoint_is_one_line_exit_2(env, baseline,
                                                        tmp_path):
  del baseline  # Only its compiled programs (the cache) are needed.
  workdir = tmp_path / 'run'
  # No file over 32 KiB can be written (the first checkpoint has larger
  # ones): a disk that fills up during the run. SIGXFSZ is ignored, so
  # writes fail with EFBIG instead of killing the process.
  args = _args(env, workdir, [])
  proc = subprocess.run(
      ['bash', '-c', 'trap "" XFSZ; ulimit -f 32; exec "$@"', 'bash', *args],
      cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: cannot write the run in'), proc.stderr[-3000:]
  assert 'File too large' in last
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))


# ---------------------------------------------------------------------------
# Inputs: images, datasets and pretrained files.


def test_odd_and_corrupt_images_are_converted_or_skipped(env, baseline_run):
  workdir, proc = baseline_run
  # All 3 x 4 test images were decoded (gray, gray + alpha and RGBA ones
  # among them) and evaluated; the 3 unreadable files were skipped.
  assert _result(workdir)['history'][-1]['test']['count'] == 12
  assert re.search(r'Skipped 3 unreadable image\(s\) of 33', proc.stderr), (
      proc.stderr[-3000:])
  train_split, test_split = splits.image_folder_splits(
      env['root'], 6, 4)
  assert sorted(os.path.basename(p) for p in train_split.skipped) == [
      'corrupt.jpg', 'empty.png', 'truncated.png']
  images = np.concatenate([b['image'] for b in input_pipeline.eval_batches(
      test_split, 4, image_size=32, resize_to=36)])
  assert images.shape == (12, 32, 32, 3) and np.isfinite(images).all()


def test_missing_dataset_or_pretrained_file_is_a_config_error(env, tmp_path):
  config = mit67.get_config('quick')
  config.dataset.root = str(tmp_path / 'missing')
  with pytest.raises(errors.ConfigError, match='dataset.root'):
    config_validation.validate(config)
  config.dataset.root = env['root']
  config.pretrained = str(tmp_path / 'missing.safetensors')
  with pytest.raises(errors.ConfigError, match='pretrained'):
    config_validation.validate(config)


# ---------------------------------------------------------------------------
# Static checks of the product's code.


def _product_sources():
  paths = [os.path.join(ROOT, 'main.py')]
  for folder in ('dtq_jax', 'configs'):
    paths += glob.glob(os.path.join(ROOT, folder, '**', '*.py'),
                       recursive=True)
  return {os.path.relpath(p, ROOT): open(p).read() for p in paths}


def test_no_unsafe_deserialisation():
  unsafe = re.compile(r'\b(pickle|cPickle|dill|cloudpickle|joblib|shelve|'
                      r'marshal)\.loads?\(|allow_pickle\s*=\s*True|'
                      r'yaml\.(unsafe_)?load\(|\bimport\s+(pickle|dill|'
                      r'shelve|marshal)\b')
  for name, text in _product_sources().items():
    if name == 'dtq_jax/weights/torch_archive.py':
      # The one unpickler: restricted to the globals a state_dict needs
      # (tests/weights/test_torch_archive.py tries malicious pickles on it).
      assert re.search(r'class _Unpickler\(pickle\.Unpickler\)', text)
      assert 'def find_class' in text
      text = text.replace('import pickle', '')
    assert not unsafe.search(text), (name, unsafe.search(text).group(0))
    for call in re.finditer(r'torch\.load\(', text):
      args = text[call.end():text.index(')', call.end())]
      assert 'weights_only=True' in args, name


def test_files_are_written_under_a_temporary_name():
  """Every file the product and the benchmarks write goes to a temporary
  name first."""
  # Paths only: os.fdopen wraps an open descriptor (main.py: stderr).
  writes = re.compile(r"(?<!fd)open\(([^,()]+(?:\([^()]*\))?),\s*'[wx]b?'")
  sources = _product_sources()
  for path in glob.glob(os.path.join(ROOT, 'benchmarks', '*.py')):
    # input_pipeline.py's synthetic images go to a scratch folder.
    if os.path.basename(path) != 'input_pipeline.py':
      sources[os.path.relpath(path, ROOT)] = open(path).read()
  assert 'benchmarks/bench_util.py' in sources
  for name, text in sources.items():
    for call in writes.finditer(text):
      target = call.group(1)
      assert 'tmp' in target or 'devnull' in target, (name, call.group(0))


def test_missing_config_file_is_one_line_exit_2(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'main.py', f'--config={tmp_path}/missing.py',
       f'--workdir={tmp_path}/run'], cwd=ROOT, capture_output=True,
      text=True, timeout=TIMEOUT, env=_env())
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'missing.py' in errors[0], proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
