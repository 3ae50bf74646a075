"""End-to-end runs of the program on tiny data the tests make themselves."""

import glob
import importlib
import json
import os
import shlex
import subprocess
import sys

import chex
import ml_collections
import numpy as np
import pytest

from configs import food101
from configs import mit67
from dtq_jax.data import input_pipeline
from dtq_jax.infra import errors
from dtq_jax.method import step as step_lib
from dtq_jax.run import checkpoints
from dtq_jax.run import config_validation
from dtq_jax.run import experiment
from dtq_jax.run import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory, class_images):
  """3 classes x 10 random 40x40 RGB images, <root>/<class>/<image>."""
  root = tmp_path_factory.mktemp('folder')
  class_images(root, 10, 40)
  return str(root)


def tiny(config, method='ft'):
  """Shrinks a paper config's ':quick' variant further for tests."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = 'small_resnet'
  config.dtq.temperature = 60.0  # the paper's ResNet-50 value
  config.model_kwargs = dict(widths=(4, 8, 8, 8))
  config.method = method
  config.pretrained = 'none'
  config.cache_dir = ''
  return config


def folder_config(root, method='ft', **overrides):
  c = tiny(mit67.get_config('quick'), method)
  c.dataset.root = root
  c.dataset.train_per_class = 6
  c.dataset.test_per_class = 4
  c.update(overrides)
  return config_validation.validate(c)


def _assert_run_outputs(workdir, summary, method):
  """A finished run's summary, checkpoints, events and metrics are there."""
  for key in ('final_test_accuracy', 'best_test_accuracy', 'final_test_std',
              'best_test_std', 'wall_time_s', 'config'):
    assert key in summary
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f)['final_test_accuracy'] == summary[
        'final_test_accuracy']
  run = os.path.join(workdir, 'seed_1')
  assert glob.glob(os.path.join(run, 'events.out.tfevents.*'))
  assert os.listdir(os.path.join(run, 'checkpoints'))
  assert os.listdir(os.path.join(run, 'best'))
  lines = [json.loads(l) for l in open(os.path.join(run, 'metrics.jsonl'))]
  assert any('test/accuracy' in l for l in lines)
  assert any('train/loss_ce' in l for l in lines)
  if method == 'dtq':
    assert any('train/loss_afa' in l and 'train/attention_entropy_3' in l
               for l in lines)


@pytest.mark.parametrize('method', ['ft', 'dtq'])
def test_run_writes_checkpoints_events_and_summary(image_folder, tmp_path,
                                                    method, monkeypatch):
  # The train step of a whole run (all epochs and evaluations) compiles once.
  chex.clear_trace_counter()
  make_step = step_lib.make_train_step
  monkeypatch.setattr(step_lib, 'make_train_step', lambda *a: (
      chex.assert_max_traces(make_step(*a), n=1)))
  workdir = str(tmp_path / 'run')
  summary = experiment.run(folder_config(image_folder, method), workdir)
  _assert_run_outputs(workdir, summary, method)
  # A finished run is never overwritten: rerunning returns the stored summary.
  mtime = os.path.getmtime(os.path.join(workdir, 'summary.json'))
  assert experiment.run(folder_config(image_folder, method),
                        workdir) == summary
  assert os.path.getmtime(os.path.join(workdir, 'summary.json')) == mtime


def test_relative_workdir(image_folder, tmp_path, monkeypatch):
  # main.py's default workdir (runs/<config>-<time>) is relative; orbax
  # accepts only absolute checkpoint paths.
  monkeypatch.chdir(tmp_path)
  summary = experiment.run(folder_config(image_folder), os.path.join(
      'runs', 'relative'))
  assert summary['final_test_accuracy'] >= 0
  run = tmp_path / 'runs' / 'relative' / 'seed_1'
  assert os.listdir(run / 'checkpoints') and os.listdir(run / 'best')


def test_resume_after_interruption_matches_uninterrupted(
    image_folder, tmp_path, monkeypatch):
  config = folder_config(image_folder, 'dtq', checkpoint_every_steps=1)
  full = experiment.run(config, str(tmp_path / 'full'))

  original = input_pipeline.train_batches

  def crash_after_four_batches(*args, **kwargs):
    for i, batch in enumerate(original(*args, **kwargs)):
      if i == 4:
        raise KeyboardInterrupt('simulated crash')
      yield batch

  monkeypatch.setattr(input_pipeline, 'train_batches',
                      crash_after_four_batches)
  workdir = str(tmp_path / 'resumed')
  with pytest.raises(KeyboardInterrupt):
    experiment.run(config, workdir)
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))
  monkeypatch.setattr(input_pipeline, 'train_batches', original)
  resumed = experiment.run(config, workdir)
  for key in ('final_test_accuracy', 'best_test_accuracy'):
    assert resumed[key] == full[key]
  a = checkpoints.restore_params(os.path.join(tmp_path, 'full', 'seed_1'))
  b = checkpoints.restore_params(os.path.join(workdir, 'seed_1'))
  np.testing.assert_allclose(a['params']['head']['fc']['kernel'],
                             b['params']['head']['fc']['kernel'], rtol=1e-6)
  # The logs read as the uninterrupted run's: what the crashed attempt
  # logged after its last checkpoint is not there twice.
  def logged(run):
    with open(os.path.join(tmp_path, run, 'seed_1', 'metrics.jsonl')) as f:
      return [(r['step'], sorted(r)) for r in map(json.loads, f)]
  assert logged('resumed') == logged('full')


def test_resume_refuses_a_different_config(image_folder, tmp_path,
                                           monkeypatch):
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  experiment._check_same_config(folder_config(image_folder), workdir)
  with pytest.raises(errors.ConfigError, match='optim.lr'):
    experiment._check_same_config(
        folder_config(image_folder, optim=dict(lr=0.5)), workdir)


def test_repeats_and_validation_split(image_folder, tmp_path):
  config = folder_config(image_folder, repeats=2)
  config.dataset.val_fraction = 0.34  # 2 of the 6 training images per class.
  summary = experiment.run(config, str(tmp_path / 'run'))
  result = json.load(open(tmp_path / 'run' / 'seed_1' / 'result.json'))
  assert all(r['val']['count'] == 6 for r in result['history'])
  assert 'test_accuracy_at_best_val' in result
  finals = summary['final_test_accuracy_per_repeat']
  assert summary['seeds'] == [1, 2]
  assert summary['final_test_accuracy'] == pytest.approx(np.mean(finals))
  assert summary['final_test_std'] == pytest.approx(np.std(finals))


@pytest.mark.parametrize('method', ['ft', 'dtq'])
def test_tfds_dataset_with_mock_data(tmp_path, method):
  tfds = pytest.importorskip('tensorflow_datasets')
  c = tiny(food101.get_config('quick'), method)
  c.batch_size = 4
  c.eval_batch_size = 4
  workdir = str(tmp_path / 'run')
  with tfds.testing.mock_data(num_examples=12):
    summary = experiment.run(config_validation.validate(c), workdir)
  assert 0 <= summary['final_test_accuracy'] <= 100
  _assert_run_outputs(workdir, summary, method)


# tiny()'s shrunk ':quick' run as a config file, for main.py.
_TINY_CONFIG_FILE = """
from configs import mit67

def get_config():
  c = mit67.get_config('quick')
  c.model = 'small_resnet'
  c.model_kwargs = dict(widths=(4, 8, 8, 8))
  c.method = 'ft'
  c.pretrained = 'none'
  c.dataset.root = {root!r}
  c.dataset.train_per_class = 6
  c.dataset.test_per_class = 4
  return c
"""


def test_a_finished_run_prints_an_export_command_that_works(image_folder,
                                                            tmp_path):
  # From a directory other than the repository's, as a user may run it.
  config = tmp_path / 'tiny.py'
  config.write_text(_TINY_CONFIG_FILE.format(root=image_folder))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'main.py'), f'--config={config}',
       '--workdir=runs/tiny'], cwd=tmp_path, capture_output=True, text=True,
      timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [l for l in proc.stdout.splitlines() if l.startswith('Export: ')]
  assert len(lines) == 1, proc.stdout
  command = lines[0][len('Export: '):]
  assert sys.executable in shlex.split(command)
  assert f'--workdir {tmp_path}/runs/tiny ' in command
  proc = subprocess.run(command, shell=True, cwd=tmp_path,
                        capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / 'ft.dtq').is_file()


@pytest.mark.parametrize('field, value', [
    ('method', 'magic'),
    ('bits_w', 17),
    ('bits_a', 1),
    ('optim.lr', -1.0),
    ('batch_size', 0),
    ('dataset.name', 'imagenet21k'),
    ('cpu_convolutions', 'onednn'),
])
def test_invalid_config_names_the_field_and_allowed_values(tmp_path, field,
                                                           value):
  # main.py prints a ConfigError as one line with exit code 2 (the
  # subprocess cases below); here, the message of each check.
  config = mit67.get_config('quick')
  config.dataset.root = str(tmp_path)
  *parents, leaf = field.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  with pytest.raises(errors.ConfigError) as e:
    config_validation.validate(config, device_count=1)
  message = str(e.value)
  assert message.startswith(f'config.{field}={value!r} is invalid;')
  assert 'allowed' in message and '\n' not in message


@pytest.mark.parametrize('override, field', [
    ('--config.model=resnet7', 'model'),
    ('--config.bits_w=3.5', 'bits_w'),  # rejected by the flag parser
    ('--config.dataset.root=/no/such/dir', 'dataset.root'),
])
def test_invalid_config_is_one_line_exit_2(tmp_path, override, field):
  config = 'configs/mit67.py:quick'
  args = [sys.executable, 'main.py', f'--config={config}',
          f'--workdir={tmp_path}/run', override]
  if field != 'dataset.root':
    args.append(f'--config.dataset.root={tmp_path}')
  proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and f'config.{field}=' in lines[0], proc.stderr
  assert 'Traceback' not in proc.stderr


def test_unknown_config_variant_is_one_line_exit_2(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/mit67.py:resnet9000',
       f'--workdir={tmp_path}/run'], cwd=ROOT, capture_output=True,
      text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1, proc.stderr
  assert 'unknown config variant resnet9000; allowed:' in lines[0]
  assert 'mobilenet_v2' in lines[0] and 'Traceback' not in proc.stderr


PAPER_CONFIGS = ('mit67', 'caltech256_30', 'caltech256_60', 'cub200',
                 'stanford_dogs', 'food101')


@pytest.mark.parametrize('name', PAPER_CONFIGS)
@pytest.mark.parametrize('arg', ['', 'mobilenet_v2,5bit', 'quick', 'ft,32bit'])
def test_paper_configs_load_and_validate(name, arg, tmp_path):
  config = importlib.import_module(f'configs.{name}').get_config(arg)
  if config.dataset.name == 'image_folder':
    config.dataset.root = str(tmp_path)
  config_validation.validate(config, device_count=1)
  mobilenet = 'mobilenet_v2' in arg
  assert config.model == ('mobilenet_v2' if mobilenet else 'resnet50')
  assert config.bits_w == config.bits_a == (
      5 if '5bit' in arg else 32 if '32bit' in arg else 4)
  assert config.method == ('ft' if 'ft' in arg else 'dtq')
  # docs/method.md: T = 60 for ResNet-50, 30 for MobileNetV2.
  assert step_lib.kl_temperature(config) == (30.0 if mobilenet else 60.0)


def test_temperature_follows_a_model_override(tmp_path):
  config = mit67.get_config()
  config.dataset.root = str(tmp_path)
  assert step_lib.kl_temperature(config) == 60.0
  config.model = 'mobilenet_v2'  # as --config.model=mobilenet_v2 does
  assert step_lib.kl_temperature(config) == 30.0
  config.dtq.temperature = 12.0  # an explicit value wins
  assert step_lib.kl_temperature(config) == 12.0
  config.dtq.temperature = 0.0
  config.model = 'resnet18'  # no paper value: an error where DTQ runs
  config.method = 'ft'
  config_validation.validate(config, device_count=1)
  config.method = 'dtq'
  with pytest.raises(errors.ConfigError,
                     match=r'config\.dtq\.temperature=0\.0 .*resnet50'):
    config_validation.validate(config, device_count=1)


def test_missing_tfds_data_dir(tmp_path):
  config = food101.get_config('quick')
  config.dataset.data_dir = str(tmp_path / 'nosuch')
  with pytest.raises(errors.ConfigError,
                     match=r'config\.dataset\.data_dir=.*no such directory'):
    config_validation.validate(config, device_count=1)
  assert not (tmp_path / 'nosuch').exists()


def test_batch_not_divisible_by_devices(image_folder):
  with pytest.raises(errors.ConfigError, match='batch_size'):
    config_validation.validate(folder_config(image_folder, batch_size=12),
                               device_count=8)


def test_allocator_note_for_large_images_on_cpu_without_tcmalloc(
    monkeypatch, capsys):
  monkeypatch.delenv('LD_PRELOAD', raising=False)
  # Memory kept (main.py's default): nothing to advise.
  launch._allocator_note(mit67.get_config(), 'keep (mallopt: ...)')
  assert not capsys.readouterr().err
  launch._allocator_note(mit67.get_config(), 'default')  # 224 px
  err = capsys.readouterr().err
  assert 'LD_PRELOAD=' in err and 'DTQ_ALLOCATOR' in err
  launch._allocator_note(mit67.get_config('quick'), 'default')  # 32 px
  assert not capsys.readouterr().err
  monkeypatch.setenv('LD_PRELOAD',
                     '/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4')
  launch._allocator_note(mit67.get_config(), 'default')
  assert not capsys.readouterr().err
