"""Two processes through JAX's distributed runtime match one process.

Two local processes with two CPU devices each (gloo collectives, coordinator
on 127.0.0.1) run ``main.py`` on the tiny folder config; a single process with
four CPU devices runs the same config. Each process dumps the parameters its
devices hold at the last evaluation (a wrapper around ``train.evaluate``);
the test then checks that every device of both processes holds the same
parameters, that they match the single-process run's, that the evaluation
results agree and count every test image once, that the multi-process
checkpoint restores in this (single-device) process, and that logs come from
process 0 only.
"""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf

from dtq_jax.infra import errors
from dtq_jax.run import checkpoints
from dtq_jax.run import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 900  # all three runs together; about 3 minutes on 2 cores.

# main.py, with train.evaluate wrapped to dump the parameters every local
# device holds when it is called (the last call is the final evaluation).
_DRIVER = '''
import os, runpy, sys
sys.path.insert(0, {root!r})
sys.argv[0] = os.path.join({root!r}, 'main.py')
import jax
import numpy as np
from dtq_jax.run import train

_evaluate = train.evaluate

def evaluate(eval_step, params, batch_stats, *args, **kwargs):
  leaves = jax.tree_util.tree_leaves_with_path(
      {{'params': params, 'batch_stats': batch_stats}})
  arrays = {{}}
  for path, leaf in leaves:
    shards = sorted(leaf.addressable_shards, key=lambda s: s.device.id)
    arrays[jax.tree_util.keystr(path)] = np.stack(
        [np.asarray(s.data) for s in shards])
  np.savez(os.environ['DTQ_TEST_DUMP'], **arrays)
  return _evaluate(eval_step, params, batch_stats, *args, **kwargs)

train.evaluate = evaluate
runpy.run_path(sys.argv[0], run_name='__main__')
'''

_CONFIG = '''
import sys
sys.path.insert(0, {root!r})
from configs import mit67

def get_config():
  c = mit67.get_config('quick,dtq')  # batch 8, 3 steps an epoch.
  c.num_epochs = 1  # 3 training steps, then one evaluation.
  c.model = 'small_resnet'
  c.dtq.temperature = 60.0  # the paper's ResNet-50 value
  c.model_kwargs = dict(widths=(4, 8, 8, 8))
  c.pretrained = 'none'
  c.cache_dir = {cache!r}
  c.dataset.root = {data!r}
  c.dataset.train_per_class = 6
  c.dataset.test_per_class = 4
  c.max_eval_batches = 0  # the whole test split (12 images, 2 batches).
  # The paper's theta = 0.01 on these random images makes the AFA term ~70
  # times the cross-entropy and gradient norms of 400-1000: a float-rounding
  # difference of the cross-device sums after step 1 then moves a value
  # across a 4-bit rounding boundary, and the runs end up to ~10% apart
  # after 3 steps (one process with 4 devices against 1 device alike, with
  # the image cache's inputs; 1e-6 apart with theta = 1e-4 or lr / 10).
  # With a term the size of the cross-entropy, what remains is the sums'
  # order.
  c.dtq.afa_weight = 1e-4
  return c
'''


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _image_folder(root):
  """3 classes x 10 random 40x40 RGB images, <root>/<class>/<image>."""
  rng = np.random.RandomState(0)
  for c in range(3):
    os.makedirs(os.path.join(root, f'class{c}'))
    for i in range(10):
      pixels = rng.randint(0, 255, (40, 40, 3)).astype(np.uint8)
      pixels[..., c] = 255 * (i % 2)
      tf.io.write_file(os.path.join(root, f'class{c}', f'{i}.png'),
                       tf.io.encode_png(pixels))


def _start(tmp, name, devices, extra_args=()):
  # Nothing of a cluster launcher the test itself may run under.
  env = {k: v for k, v in os.environ.items() if not k.startswith(
      ('JAX_COORDINATOR', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_',
       'OMPI_', 'PMI_', 'TPU_WORKER'))}
  env.update(JAX_PLATFORMS='cpu',
             XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_'
                        f'platform_device_count={devices}').strip(),
             DTQ_TEST_DUMP=str(tmp / f'{name}.npz'))
  log = open(tmp / f'{name}.log', 'w')
  # Own process group, so that cleanup also ends any child it started.
  proc = subprocess.Popen(
      [sys.executable, str(tmp / 'driver.py'), f'--config={tmp}/tiny.py',
       *extra_args], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
      start_new_session=True)
  proc.log_file = log
  return proc


def _write_inputs(tmp):
  """The image folder, the tiny config file and the driver, under ``tmp``."""
  _image_folder(str(tmp / 'data'))
  (tmp / 'tiny.py').write_text(_CONFIG.format(
      root=ROOT, cache=str(tmp / 'cache'), data=str(tmp / 'data')))
  (tmp / 'driver.py').write_text(_DRIVER.format(root=ROOT))


def _start_two_processes(procs, tmp, workdir, extra_args=()):
  """Starts processes 0 and 1 of one run (2 CPU devices each) into procs."""
  coordinator = f'127.0.0.1:{_free_port()}'
  for i in range(2):
    procs[f'process{i}'] = _start(
        tmp, f'process{i}', 2,
        [f'--workdir={workdir}', f'--coordinator_address={coordinator}',
         '--num_processes=2', f'--process_id={i}', *extra_args])


def _wait_all(procs, timeout_s):
  deadline = time.time() + timeout_s
  for name, proc in procs.items():
    try:
      proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
      pytest.fail(f'{name} did not finish in {timeout_s} s')


def _kill_all(procs):
  for proc in procs.values():
    if proc.poll() is None:
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    proc.wait()
    proc.log_file.close()


def _assert_trees_close(a, b, **tolerance):
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_allclose(a[key], b[key], err_msg=key, **tolerance)


def test_two_processes_match_one_process(tmp_path):
  _write_inputs(tmp_path)
  multi_dir, single_dir = tmp_path / 'multi', tmp_path / 'single'
  procs = {}
  try:
    _start_two_processes(procs, tmp_path, multi_dir)
    procs['single'] = _start(tmp_path, 'single', 4,
                             [f'--workdir={single_dir}'])
    _wait_all(procs, TIMEOUT_S)
  finally:
    _kill_all(procs)
  for name, proc in procs.items():
    log = (tmp_path / f'{name}.log').read_text()
    assert proc.returncode == 0, f'{name}:\n{log[-4000:]}'

  # The decoded-image cache is on (its default, 'auto'): its entry exists.
  assert glob.glob(str(tmp_path / 'cache' / 'images' / '*' / 'pixels.npy'))
  dumps = {}
  for name in procs:
    with np.load(tmp_path / f'{name}.npz') as f:
      dumps[name] = {k: f[k] for k in f.files}
  # Every device of both processes holds the same replicated state.
  for name in ('process0', 'process1'):
    for key, shards in dumps[name].items():
      assert shards.shape[0] == 2, key
      np.testing.assert_array_equal(shards[0], shards[1], err_msg=key)
  first = lambda d: {k: v[0] for k, v in d.items()}
  _assert_trees_close(first(dumps['process0']), first(dumps['process1']),
                      rtol=0, atol=0)
  # ... and the single-process four-device run's, up to the order of the
  # cross-device sums (after 3 steps differences stay below ~2e-5).
  assert all(v.shape[0] == 4 for v in dumps['single'].values())
  _assert_trees_close(first(dumps['process0']), first(dumps['single']),
                      rtol=1e-3, atol=1e-4)

  # Same evaluation: every test image counted once, same accuracy.
  results = {}
  for name, workdir in (('multi', multi_dir), ('single', single_dir)):
    with open(workdir / 'seed_1' / 'result.json') as f:
      results[name] = json.load(f)
  assert results['multi']['steps'] == results['single']['steps'] == 3
  for a, b in zip(results['multi']['history'], results['single']['history'],
                  strict=True):
    assert a['test']['count'] == b['test']['count'] == 12
    assert a['test']['accuracy'] == b['test']['accuracy']
    assert a['test']['loss'] == pytest.approx(b['test']['loss'], rel=1e-4)

  # The multi-process checkpoint restores in a single (one-device) process.
  restored = checkpoints.restore_params(str(multi_dir / 'seed_1'))
  flat = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in
          jax.tree_util.tree_leaves_with_path(restored)}
  _assert_trees_close(flat, first(dumps['process0']), rtol=0, atol=0)

  # Logs, events and summaries come from process 0 only.
  run = multi_dir / 'seed_1'
  assert len(glob.glob(str(run / 'events.out.tfevents.*'))) == 1
  records = lambda path: [json.loads(l) for l in open(path)]
  multi_log = records(run / 'metrics.jsonl')
  single_log = records(single_dir / 'seed_1' / 'metrics.jsonl')
  assert [r['step'] for r in multi_log] == [r['step'] for r in single_log]
  assert sum('train/loss_afa' in r for r in multi_log) == 3  # every step
  # Each loss term and attention entropy, step by step: with theta small,
  # an AFA or attention reduction gone wrong across processes would hide in
  # the parameters' tolerance, not here.
  for a, b in zip(multi_log, single_log):
    keys = [k for k in a if k.startswith(('train/loss', 'train/attention'))]
    assert sorted(keys) == sorted(
        k for k in b if k.startswith(('train/loss', 'train/attention')))
    for key in keys:
      assert a[key] == pytest.approx(b[key], rel=1e-4), (a['step'], key)
  assert os.path.exists(multi_dir / 'summary.json')
  assert os.path.exists(multi_dir / 'config.json')
  # Console output too (process 1 keeps stderr for errors).
  log0 = (tmp_path / 'process0.log').read_text()
  log1 = (tmp_path / 'process1.log').read_text()
  for text in ('epoch 1/1: test accuracy', 'final test acc.'):
    assert text in log0, log0[-2000:]
    assert text not in log1, log1[-2000:]


def test_a_signal_to_one_process_stops_all_with_one_checkpoint(tmp_path):
  # SIGTERM reaches process 1 only (a preempted worker): both processes
  # agree to stop at the same step, checkpoint it together and exit, where a
  # lone stop would leave process 0 waiting in the next collective forever.
  _write_inputs(tmp_path)
  workdir = tmp_path / 'multi'
  metrics = workdir / 'seed_1' / 'metrics.jsonl'
  procs = {}
  try:
    _start_two_processes(procs, tmp_path, workdir, [
        '--config.num_epochs=100', '--config.checkpoint_every_steps=0'])
    deadline = time.time() + TIMEOUT_S / 3
    while not (metrics.exists() and metrics.read_text().count('\n') >= 2):
      assert time.time() < deadline, 'no training steps logged'
      assert all(p.poll() is None for p in procs.values())
      time.sleep(0.05)
    procs['process1'].send_signal(signal.SIGTERM)
    _wait_all(procs, TIMEOUT_S / 3)
  finally:
    _kill_all(procs)
  logs = {name: (tmp_path / f'{name}.log').read_text() for name in procs}
  stopped = set()
  for name, proc in procs.items():
    assert proc.returncode == 128 + signal.SIGTERM, logs[name][-3000:]
    stopped.add(int(re.search(r'stopped after step (\d+)',
                              logs[name]).group(1)))
  assert 'SIGTERM on another process: stopped' in logs['process0']
  assert len(stopped) == 1
  step = stopped.pop()
  assert step < 300  # 100 epochs x 3 steps: it did stop early
  checkpoints = os.listdir(workdir / 'seed_1' / 'checkpoints')
  assert str(step) in checkpoints
  assert max(int(c) for c in checkpoints if c.isdigit()) == step


@pytest.fixture
def no_launcher(monkeypatch):
  for var in list(os.environ):
    if var.startswith(('JAX_COORDINATOR', 'JAX_NUM_PROCESSES',
                       'JAX_PROCESS_ID', 'SLURM_', 'OMPI_', 'TPU_WORKER')):
      monkeypatch.delenv(var)
  monkeypatch.setattr(distributed, '_on_cloud_tpu_vm', lambda: False)
  monkeypatch.setattr(jax.distributed, 'initialize', _must_not_initialize)


def _must_not_initialize(**kwargs):
  raise AssertionError(f'jax.distributed.initialize({kwargs}) was called')


def test_single_process_needs_no_distributed_runtime(no_launcher,
                                                     monkeypatch):
  assert not distributed.maybe_initialize()
  assert not distributed.maybe_initialize(num_processes=1, process_id=0)
  # A batch script's environment without srun: one process, not a hang
  # waiting for tasks that were never started.
  monkeypatch.setenv('SLURM_NTASKS', '8')
  monkeypatch.setenv('SLURM_PROCID', '0')
  assert not distributed.maybe_initialize()


def test_launchers_and_flags_start_the_distributed_runtime(no_launcher,
                                                           monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize',
                      lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(jax, 'process_index', lambda: 0)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  # Keeps this process's CPU backend as it is.
  monkeypatch.setattr(jax.config, 'update', lambda *args: None)
  monkeypatch.setattr(sys, 'stdout', sys.stdout)
  assert distributed.maybe_initialize('10.0.0.1:1234', 2, 0)
  monkeypatch.setenv('SLURM_STEP_NUM_TASKS', '2')  # srun
  assert distributed.maybe_initialize()
  assert calls == [
      dict(coordinator_address='10.0.0.1:1234', num_processes=2,
           process_id=0),
      dict(coordinator_address=None, num_processes=None, process_id=None)]


def test_process_flags_without_coordinator_are_a_user_error(no_launcher):
  with pytest.raises(errors.UserError, match='coordinator_address'):
    distributed.maybe_initialize(num_processes=2, process_id=1)
