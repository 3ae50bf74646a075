"""A paper setting at full resolution: MIT67's layout, torchvision weights.

``configs/mit67.py`` (and its ``:mobilenet_v2`` variant) as a user runs it:
an image folder in MIT67's ``train/`` / ``test/`` layout with JPEGs of the
usual sizes, a torchvision checkpoint (``.pth``, written by torch, random
weights) read by the torch-free reader, the paper's 224 px crop of a 256 px
resize, a handful of steps. The run is stopped after its first step (as a
SIGTERM does), resumed by a rerun, and finishes with its summary.

In the torch suite (``make test-torch``): torch writes the checkpoint.
"""

import json
import os
import signal

import numpy as np
import pytest

from configs import mit67
from dtq_jax.infra import files
from dtq_jax.run import config_validation
from dtq_jax.run import experiment
from dtq_jax.run import train

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')


def _write_mit67_layout(root, classes=3, train_per_class=3, test_per_class=1,
                        seed=0):
  """JPEGs of varied sizes around 300-500 px, as MIT67's images are."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(seed)
  for split, count in (('train', train_per_class), ('test', test_per_class)):
    for c in range(classes):
      folder = os.path.join(root, split, f'scene_{c}')
      os.makedirs(folder)
      for i in range(count):
        h, w = rng.randint(300, 501, size=2)
        pixels = rng.randint(0, 256, (h, w, 3), dtype=np.uint8)
        pixels[..., c] = 255 - pixels[..., c] // 4  # a class signal
        Image.fromarray(pixels).save(os.path.join(folder, f'{i}.jpg'),
                                     quality=90)


@pytest.fixture(scope='module')
def mit67_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('mit67'))
  _write_mit67_layout(root)
  return root


def _torchvision_checkpoint(name, path):
  torch.manual_seed(0)
  model = getattr(torchvision.models, name)(weights=None)
  torch.save(model.state_dict(), path)
  return path


def _config(variant, root, weights):
  config = mit67.get_config(variant)
  config.dataset.root = root
  config.pretrained = weights
  config.batch_size = 2
  config.eval_batch_size = 2
  config.num_epochs = 3
  config.steps_per_epoch = 1
  config.repeats = 1  # one seed; the paper configs run the authors' 5.
  config.log_every_steps = 1
  config.checkpoint_every_steps = 0
  # Random weights put the feature distances (AFA) in the millions; the
  # test is of the run's mechanics, not of learning.
  config.optim.lr = 1e-6
  return config_validation.validate(config)


@pytest.mark.parametrize('variant,torch_name', [
    ('', 'resnet50'),
    ('mobilenet_v2', 'mobilenet_v2'),
])
def test_paper_setting_runs_stops_and_resumes(variant, torch_name, mit67_root,
                                              tmp_path, monkeypatch):
  weights = _torchvision_checkpoint(torch_name, str(tmp_path / 'w.pth'))
  config = _config(variant, mit67_root, weights)
  assert (config.dataset.image_size, config.dataset.resize_to) == (224, 256)
  assert config.method == 'dtq' and (config.bits_w, config.bits_a) == (4, 4)
  # torch is here to write the file; the run must not need it to read it.
  monkeypatch.setitem(__import__('sys').modules, 'torch', None)
  workdir = str(tmp_path / 'run')

  # A SIGTERM while step 1 is logged stops the run after step 2.
  write = files.MetricsLog.write

  def write_then_signal(self, step, scalars):
    write(self, step, scalars)
    if step == 1 and 'train/loss_ce' in scalars:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(files.MetricsLog, 'write', write_then_signal)
  with pytest.raises(train.Interrupted, match='stopped after step 2'):
    experiment.run(config, workdir)
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))

  # The rerun resumes there and finishes.
  monkeypatch.setattr(files.MetricsLog, 'write', write)
  summary = experiment.run(config, workdir)
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f)['final_test_accuracy'] == summary[
        'final_test_accuracy']
  with open(os.path.join(workdir, 'seed_1', 'result.json')) as f:
    result = json.load(f)
  assert result['steps'] == 3
  # Each of the 3 test images was evaluated once per evaluation (epoch).
  assert [r['test']['count'] for r in result['history']] == [3, 3, 3]
  # The resumed run's log reads as an uninterrupted run's: each step once.
  with open(os.path.join(workdir, 'seed_1', 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert [r['step'] for r in records if 'train/loss' in r] == [1, 2, 3]
