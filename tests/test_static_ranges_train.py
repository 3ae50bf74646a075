"""Training with act_ranges='static': ranges collected, checkpointed, used."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from configs import mit67
from dtq_jax import calibration
from dtq_jax import config_validation
from dtq_jax import experiment
from dtq_jax import export


def test_static_run_collects_evaluates_and_exports(tmp_path):
  root = tmp_path / 'folder'
  rng = np.random.RandomState(0)
  for c in range(3):
    os.makedirs(root / f'class{c}')
    for i in range(8):
      pixels = rng.randint(0, 255, (20, 20, 3)).astype(np.uint8)
      pixels[..., c] = 255 * (i % 2)
      tf.io.write_file(str(root / f'class{c}' / f'{i}.png'),
                       tf.io.encode_png(pixels))
  c = mit67.get_config('quick,ft')
  c.model = 'small_resnet'
  c.model_kwargs = dict(widths=(4, 8, 8, 8))
  c.pretrained = 'none'
  c.dataset.root = str(root)
  c.dataset.train_per_class = 5
  c.dataset.test_per_class = 3
  c.dataset.image_size = 16
  c.dataset.resize_to = 18
  c.num_epochs = 1
  c.max_eval_batches = 0
  c.quant.act_ranges = 'static'
  workdir = str(tmp_path / 'run')
  summary = experiment.run(config_validation.validate(c), workdir)
  with open(os.path.join(workdir, 'seed_1', 'result.json')) as f:
    result = json.load(f)
  assert 'final_test_accuracy_dynamic' in result
  assert 'test_dynamic' in result['history'][-1]
  assert summary['final_test_accuracy'] == result['final_test_accuracy']
  state, step = export.restore_state(os.path.join(workdir, 'seed_1'))
  ranges = calibration.layer_ranges(state['quant_ranges'])
  assert len(ranges) == 11
  assert all(int(r['count']) == step for r in ranges.values())
  manifest = export.export_run(workdir, str(tmp_path / 'm.dtq'),
                               verbose=False)
  assert manifest['activation_ranges']['source'] == 'training'
  report = export.check(str(tmp_path / 'm.dtq'), workdir, verbose=False)
  assert report['agreement_int_vs_static'] == 1.0
  assert report['static_fake_quant']['accuracy'] == pytest.approx(
      result['final_test_accuracy'])
  assert report['dynamic_fake_quant']['accuracy'] == pytest.approx(
      result['final_test_accuracy_dynamic'])
