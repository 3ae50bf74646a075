"""The offline demo's pipeline on the real Fashion-MNIST files, a few steps."""

import json
import os

import pytest

from configs import fmnist
from dtq_jax.data import datasets
from dtq_jax.data import sources
from dtq_jax.run import config_validation
from dtq_jax.run import experiment
from dtq_jax.run import teacher as teacher_lib
from dtq_jax.run import train

_FILES = os.path.join(sources.FASHION_MNIST_DIR, 'train-images-idx3-ubyte.gz')


@pytest.mark.skipif(
    not os.path.exists(_FILES),
    reason=f'{_FILES} is absent (apt-get install dataset-fashion-mnist)')
def test_quick_demo_end_to_end(tmp_path, monkeypatch):
  config = fmnist.get_config('quick')
  config.cache_dir = str(tmp_path / 'cache')
  config.model_kwargs.widths = (8, 16, 16, 16)
  # This narrower teacher needs more than the quick config's 40 steps: with
  # 40 it stayed at chance (9.2%) on an AMD EPYC Zen 3, and DTQ, learning
  # from it, below this test's bound; 80 steps gave it 52.9% there.
  config.pretrain.steps_per_epoch = 80
  # One evaluation per method, on 1000 of the 10000 test images: the whole
  # pipeline runs, in less of the suite's time.
  config.eval_every_epochs = 1000
  config.max_eval_batches = 2
  config_validation.validate(config)
  workdir = str(tmp_path / 'demo')
  summaries = experiment.run(config, workdir)

  assert set(summaries) == {'fp', 'ft', 'dtq'}
  for method, summary in summaries.items():
    # Ten target classes (in domain): chance is 10%.
    assert summary['final_test_accuracy'] > 25, (method, summary)
    run = os.path.join(workdir, method, 'seed_1')
    assert os.listdir(os.path.join(run, 'checkpoints'))
    with open(os.path.join(workdir, method, 'summary.json')) as f:
      assert json.load(f)['method'] == method
  assert summaries['fp']['bits_w'] == 32 and summaries['dtq']['bits_w'] == 4
  with open(os.path.join(workdir, 'comparison.md')) as f:
    table = f.read()
  assert '| dtq | 4/4 |' in table and '| fp | 32/32 |' in table
  assert len(os.listdir(os.path.join(tmp_path, 'cache', 'teachers'))) == 1
  # The cached teacher is reused: loading it again trains nothing.
  monkeypatch.setattr(train, 'train_and_evaluate', _must_not_train)
  teacher = teacher_lib.load_teacher(config, datasets.load(config))
  assert 'fc' in teacher['params']


def _must_not_train(*args, **kwargs):
  raise AssertionError('the cached teacher was trained again')
