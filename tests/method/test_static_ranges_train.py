"""Training with act_ranges='static': ranges collected, checkpointed, used."""

import json
import os

import pytest

from dtq_jax.deploy import export
from dtq_jax.deploy import export_check
from dtq_jax.method import static_ranges
from dtq_jax.run import checkpoints
from dtq_jax.run import config_validation
from dtq_jax.run import experiment


def test_static_run_collects_evaluates_and_exports(tmp_path, tiny_folder):
  root, config = tiny_folder
  c = config(root)
  c.quant.act_ranges = 'static'
  workdir = str(tmp_path / 'run')
  summary = experiment.run(config_validation.validate(c), workdir)
  with open(os.path.join(workdir, 'seed_1', 'result.json')) as f:
    result = json.load(f)
  assert 'final_test_accuracy_dynamic' in result
  assert 'test_dynamic' in result['history'][-1]
  assert summary['final_test_accuracy'] == result['final_test_accuracy']
  state, step = checkpoints.restore_state(os.path.join(workdir, 'seed_1'))
  ranges = static_ranges.layer_ranges(state['quant_ranges'])
  assert len(ranges) == 11
  assert all(int(r['count']) == step for r in ranges.values())
  manifest = export.export_run(workdir, str(tmp_path / 'm.dtq'),
                               verbose=False)
  assert manifest['activation_ranges']['source'] == 'training'
  report = export_check.check(str(tmp_path / 'm.dtq'), workdir,
                              verbose=False)
  assert report['agreement_int_vs_static'] == 1.0
  assert report['static_fake_quant']['accuracy'] == pytest.approx(
      result['final_test_accuracy'])
  assert report['dynamic_fake_quant']['accuracy'] == pytest.approx(
      result['final_test_accuracy_dynamic'])
