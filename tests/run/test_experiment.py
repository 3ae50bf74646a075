"""A run refused at its start leaves its workdir as it found it.

In-process, with the data load, teacher and training replaced: only what
``experiment.run`` does with the workdir is tested here (tests/test_main.py
runs whole experiments).
"""

import os

import pytest

from configs import mit67
from dtq_jax.data import datasets
from dtq_jax.infra import errors
from dtq_jax.run import config_validation
from dtq_jax.run import experiment
from dtq_jax.run import teacher as teacher_lib
from dtq_jax.run import train


def _config(tmp_path, **overrides):
  config = mit67.get_config('quick')
  config.dataset.root = str(tmp_path)
  config.pretrained = 'none'
  config.method = 'ft'
  config.update(overrides)
  return config_validation.validate(config, device_count=1)


def _refuse(what):
  def refuse(*args, **kwargs):
    raise errors.UserError(f'{what} refused')
  return refuse


def _tree(folder):
  """Every path under ``folder`` with the contents of its files."""
  found = {}
  for root, dirs, names in os.walk(folder):
    for name in dirs:
      found[os.path.relpath(os.path.join(root, name), folder)] = None
    for name in names:
      with open(os.path.join(root, name), 'rb') as f:
        found[os.path.relpath(os.path.join(root, name), folder)] = f.read()
  return found


@pytest.fixture(name='refused')
def refused_fixture(request, monkeypatch):
  """The data load or the teacher (the weights) refuses the run."""
  if request.param == 'data':
    monkeypatch.setattr(datasets, 'load', _refuse('data'))
  else:
    monkeypatch.setattr(datasets, 'load', lambda config: object())
    monkeypatch.setattr(teacher_lib, 'load_teacher', _refuse('weights'))
  return request.param


@pytest.mark.parametrize('refused', ['data', 'weights'], indirect=True)
@pytest.mark.parametrize('compare', [(), ('ft', 'dtq')])
def test_a_refused_run_leaves_no_workdir(tmp_path, refused, compare):
  workdir = tmp_path / 'runs' / 'new'
  with pytest.raises(errors.UserError, match=refused):
    experiment.run(_config(tmp_path, compare_methods=compare), str(workdir))
  # runs/ too: the run made it.
  assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('refused', ['data'], indirect=True)
@pytest.mark.parametrize('compare', [(), ('ft', 'dtq')])
def test_a_refused_run_leaves_an_existing_workdir_as_it_was(
    tmp_path, refused, compare):
  workdir = tmp_path / 'run'
  (workdir / 'dtq').mkdir(parents=True)
  (workdir / 'notes.txt').write_text('mine')
  (workdir / 'run.lock').write_text('')  # a previous run's
  before = _tree(workdir)
  with pytest.raises(errors.UserError, match=refused):
    experiment.run(_config(tmp_path, compare_methods=compare), str(workdir))
  assert _tree(workdir) == before
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(errors.UserError, match=refused):
    experiment.run(_config(tmp_path, compare_methods=compare), str(empty))
  assert not os.listdir(empty)


def test_a_run_that_started_keeps_what_it_wrote(tmp_path, monkeypatch):
  monkeypatch.setattr(datasets, 'load', lambda config: object())
  monkeypatch.setattr(teacher_lib, 'load_teacher', lambda config, data: {})

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(train, 'train_and_evaluate', interrupted)
  workdir = tmp_path / 'run'
  with pytest.raises(KeyboardInterrupt):
    experiment.run(_config(tmp_path), str(workdir))
  # Its config (a rerun resumes against it) and the lock files stay.
  assert sorted(os.listdir(workdir)) == ['config.json', 'run.lock',
                                         'run.lock.pid']
