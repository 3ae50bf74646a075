"""Networks that are not in the zoo, end to end: every method, their weights.

The networks are examples/networks.py's, plain Flax written without dtq_jax,
named by import path as a user names theirs (configs/own_network.py); tiny
versions run a few steps on the demo's Fashion-MNIST files.
"""

import json
import os

import flax
import jax
import numpy as np
import pytest

from configs import own_network as own_config
from dtq_jax.data import datasets
from dtq_jax.data import sources
from dtq_jax.infra import errors
from dtq_jax.method import networks
from dtq_jax.run import config_validation
from dtq_jax.run import experiment
from dtq_jax.run import teacher as teacher_lib

_FILES = os.path.join(sources.FASHION_MNIST_DIR, 'train-images-idx3-ubyte.gz')
pytestmark = pytest.mark.skipif(
    not os.path.exists(_FILES),
    reason=f'{_FILES} is absent (apt-get install dataset-fashion-mnist)')

# Tiny versions of the example networks (a few thousand parameters).
TINY = {
    'vgg': dict(stage_widths=(4, 8, 8, 8)),
    'efficientnet': dict(stem_width=4, stage_widths=(4, 8, 8, 8),
                         blocks_per_stage=(1, 1, 1, 1), head_width=16),
    'convnext': dict(stage_widths=(4, 8, 8, 8)),
}


def _config(tmp_path, network, methods, pretrained='none'):
  config = own_config.get_config(f'{network},quick')
  config.cache_dir = str(tmp_path / 'cache')
  config.model_kwargs.update(TINY[network])
  config.compare_methods = methods
  config.pretrained = pretrained
  # One evaluation per method, on 16 test images: the pipeline runs.
  config.eval_every_epochs = 1000
  config.max_eval_batches = 2
  config.pretrain.num_epochs = 1
  config.pretrain.steps_per_epoch = 3
  return config_validation.validate(config)


def _check_summaries(summaries, workdir, methods):
  assert set(summaries) == set(methods)
  for method, summary in summaries.items():
    assert np.isfinite(summary['final_test_accuracy']), method
    assert summary['bits_w'] == 4
    with open(os.path.join(workdir, method, 'seed_1', 'result.json')) as f:
      assert json.load(f)['nonfinite_steps'] == 0


@pytest.mark.parametrize('network, methods, pretrained', [
    # BatchNorm, no residuals; the baselines that read the teacher's weights.
    ('vgg', ('ft', 'dtq', 'l2sp'), 'checkpoint'),
    # Depthwise convolutions, squeeze-and-excitation, dropout; the teacher
    # trained on the source task as the demo's is.
    ('efficientnet', ('ft', 'dtq'), 'source_task'),
    # No BatchNorm at all; DELTA's channel weights on its taps.
    ('convnext', ('dtq', 'delta'), 'none'),
])
def test_every_method_runs_on_a_network_outside_the_zoo(
    tmp_path, capsys, network, methods, pretrained):
  if pretrained == 'checkpoint':
    pretrained = str(tmp_path / 'teacher.msgpack')
    _write_teacher(_config(tmp_path, network, methods), pretrained)
  config = _config(tmp_path, network, methods, pretrained)
  workdir = str(tmp_path / 'run')
  summaries = experiment.run(config, workdir)
  _check_summaries(summaries, workdir, methods)
  out = capsys.readouterr().out
  # The student's layers are listed at the start of each method's run.
  assert f'Network: {config.model} (dtq), its layers as the student runs ' in (
      out)
  assert 'stem' in out or 'stage1' in out
  assert 'float (first convolution)' in out
  assert 'float (source classifier)' in out
  assert '4-bit weights, 4-bit inputs' in out
  assert 'taps (chosen: last module per resolution): stage1' in out


def _write_teacher(config, path):
  """A random teacher of ``config``'s network, as flax.serialization writes."""
  data = datasets.load(config)
  model = networks.create_backbone(config, 7, data.image_shape)
  variables = networks.init_variables(model, jax.random.PRNGKey(5),
                                      data.image_shape)
  with open(path, 'wb') as f:
    f.write(flax.serialization.to_bytes(variables))
  return variables


def test_teacher_from_a_checkpoint_is_sized_by_it(tmp_path):
  path = str(tmp_path / 'teacher.msgpack')
  config = _config(tmp_path, 'vgg', ('dtq',))
  written = _write_teacher(config, path)
  config.pretrained = path
  data = datasets.load(config)
  teacher = teacher_lib.load_teacher(config, data)
  # Seven source classes, as the checkpoint's classifier has.
  assert networks.source_classes(config, teacher, data.image_shape) == 7
  jax.tree.map(np.testing.assert_array_equal, teacher, written)
  # A checkpoint of another network is refused with one line per leaf.
  config.model_kwargs.stage_widths = (4, 8, 8, 16)
  with pytest.raises(errors.ConfigError, match=r'problem\(s\) with its '
                     r'variables') as e:
    teacher_lib.load_teacher(config, data)
  assert 'mis-shaped params/stage4/' in str(e.value)
  config.pretrained = 'torchvision'
  with pytest.raises(errors.ConfigError, match='torchvision has no weights'):
    teacher_lib.load_teacher(config, data)


@pytest.mark.parametrize('field, value, message', [
    ('model', 'examples.networks:Nothing', "has no 'Nothing'"),
    ('model', 'examples.nowhere:VGG', "cannot import 'examples.nowhere'"),
    ('dtq.taps', ('(',), 'is not a regular expression'),
])
def test_bad_network_settings_are_one_line_config_errors(field, value,
                                                         message):
  config = own_config.get_config('quick')
  section, _, name = field.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(errors.ConfigError, match=message) as e:
    config_validation.validate(config)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('field, value', [
    ('quant.keep_float', ('layer1_0/.*',)),
    ('quant.quantize_dense', True),
    ('dtq.taps', ('layer1_0',)),
    ('dtq.source_classifier', 'fc'),
])
def test_zoo_models_refuse_the_own_network_settings(field, value):
  from configs import fmnist  # pylint: disable=g-import-not-at-top
  config = fmnist.get_config('quick')
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(errors.ConfigError, match='applies to a network of your '
                     'own'):
    config_validation.validate(config)


def test_tap_that_matches_nothing_stops_the_run_before_training(tmp_path):
  config = _config(tmp_path, 'vgg', ('dtq',))
  config.dtq.taps = ('stage9',)
  data = datasets.load(config)
  with pytest.raises(ValueError, match="'stage9' matches 0 modules"):
    networks.build_networks(config, data.num_classes, 10, data.image_shape)
