"""The range checks of every numeric config field, in-process."""

import math

import ml_collections
import numpy as np
import pytest

from configs import fmnist
from configs import mit67
from dtq_jax.data import datasets
from dtq_jax.data import sources
from dtq_jax.infra import errors
from dtq_jax.run import config_validation

# One out-of-range value for every row of config_validation.NUMERIC_RULES:
# a row removed from (or added to) the table without its case here fails
# test_every_rule_has_a_case.
BAD_VALUES = {
    'seed': -1,
    'repeats': 0,
    'batch_size': 0,
    'eval_batch_size': -8,
    'total_steps': 0,
    'num_epochs': -1,
    'steps_per_epoch': -3,
    'max_eval_batches': -1,
    'log_every_steps': 0,
    'eval_every_epochs': 0,
    'checkpoint_every_steps': -1,
    'prefetch_batches': -1,
    'keep_checkpoints': 0,
    'max_nonfinite_fraction': 0.0,
    'dataset.image_size': 0,
    'dataset.resize_to': 20,  # below image_size 28
    'dataset.crop_padding': -2,
    'dataset.val_fraction': 1.0,
    'dataset.mean': (0.5, 0.5, 0.5),  # Fashion-MNIST is 1-channel
    'dataset.std': (0.0,),
    'dataset.train_per_class': -1,
    'dataset.test_per_class': -1,
    'dataset.data_seed': -1,
    'dataset.shots_per_class': 0,
    'optim.lr': 0.0,
    'optim.momentum': 1.0,
    'optim.head_weight_decay': -1e-4,
    'optim.lr_drop_epoch_fraction': 1.5,
    'optim.lr_drop_factor': 0.0,
    'dtq.temperature': -4.0,
    'dtq.temperature_by_model': {'small_resnet': 0.0},
    'dtq.kl_weight': -0.5,
    'dtq.afa_weight': -1e-3,
    'dtq.attention_entropy_weight': -1.0,
    'l2.alpha': -0.01,
    'l2.beta': -0.01,
    'l2sp.alpha': -0.1,
    'l2sp.beta': -0.01,
    'delta.alpha': -0.01,
    'delta.beta': -0.01,
    'delta.head_epochs': 0,
    'delta.head_lr': 0.0,
    'delta.head_momentum': -0.9,
    'delta.head_weight_decay': -1.0,
    'delta.head_lr_decay_epochs': 0.0,
    'delta.head_lr_decay_factor': 2.0,
    'delta.num_batches': 0,
    'delta.batch_size': -32,
    'stats_group_size': -1,
    'delta.temperature': 0.0,
    'quant.range_momentum': 1.0,
    'quant.lsq_lr_scale': 0.0,
    'pretrain.batch_size': 0,
    'pretrain.num_epochs': 0,
    'pretrain.steps_per_epoch': -1,
    'pretrain.seed': -1,
    'pretrain.optim.lr': -0.1,
    'pretrain.optim.momentum': 1.5,
    'pretrain.optim.head_weight_decay': -1.0,
    'pretrain.optim.lr_drop_epoch_fraction': -0.5,
    'pretrain.optim.lr_drop_factor': 1.5,
}


def _demo_config():
  """The demo config with every optional numeric field present."""
  config = fmnist.get_config('quick')
  config.max_nonfinite_fraction = 0.1
  config.dtq.attention_entropy_weight = 0.0
  config.pretrain.optim.momentum = 0.9
  config.pretrain.optim.head_weight_decay = 1e-4
  config.pretrain.optim.lr_drop_factor = 0.1
  config.pretrain.steps_per_epoch = 0
  return config


def _set(config, field, value):
  *parents, leaf = field.split('.')
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value


def _error(config):
  with pytest.raises(errors.ConfigError) as e:
    config_validation.validate(config, device_count=1)
  message = str(e.value)
  assert '\n' not in message
  return message


def test_every_rule_has_a_case():
  assert set(BAD_VALUES) == set(config_validation.NUMERIC_RULES)


def test_the_demo_config_with_every_optional_field_is_valid():
  config = _demo_config()
  for field in config_validation.NUMERIC_RULES:
    assert config_validation._get(config, field, None) is not None, field
  config_validation.validate(config, device_count=1)


@pytest.mark.parametrize('field', sorted(BAD_VALUES))
def test_a_bad_value_names_the_field_value_and_what_is_allowed(field):
  config = _demo_config()
  _set(config, field, BAD_VALUES[field])
  message = _error(config)
  assert message.startswith(f'config.{field}'), message
  assert 'allowed' in message, message


@pytest.mark.parametrize('field', sorted(
    f for f, rule in config_validation.NUMERIC_RULES.items()
    if isinstance(rule, config_validation.Range) and not rule.integer))
@pytest.mark.parametrize('value', [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_refused(field, value):
  config = _demo_config()
  _set(config, field, value)
  assert _error(config).startswith(f'config.{field}={value!r} is invalid;')


def test_nan_anywhere_in_the_config_is_refused():
  config = _demo_config()
  config.dataset.mean = (math.nan,)
  assert _error(config).startswith('config.dataset.mean=(nan,) is invalid;')
  config = _demo_config()
  config.model_kwargs.scale = math.inf  # a field no rule knows
  assert 'config.model_kwargs.scale=inf' in _error(config)


def test_integer_fields_refuse_fractions_and_booleans():
  # A ConfigDict keeps each field's type; a config built without type
  # safety (or from JSON) need not.
  config = ml_collections.ConfigDict(_demo_config().to_dict(),
                                     type_safe=False)
  config.keep_checkpoints = 2.5
  assert 'an integer >= 1' in _error(config)
  config.keep_checkpoints = 2
  config.repeats = True
  assert _error(config).startswith('config.repeats=True is invalid;')


def test_mean_and_std_follow_the_channels_of_the_dataset(tmp_path):
  config = mit67.get_config('quick')  # RGB files: 1 or 3 values
  config.dataset.root = str(tmp_path)
  config_validation.validate(config, device_count=1)
  config.dataset.mean = (0.5,)
  config.dataset.std = (0.25,)
  config_validation.validate(config, device_count=1)
  config.dataset.std = (0.2, 0.2)
  assert '1 or 3 numbers > 0' in _error(config)
  config.dataset.std = (0.2, -0.2, 0.2)
  assert _error(config).startswith('config.dataset.std=(0.2, -0.2, 0.2)')
  config = _demo_config()  # 1-channel Fashion-MNIST: 1 value only
  config.dataset.mean = (0.1, 0.2, 0.3)
  assert '1 finite numbers for the 1-channel images' in _error(config)


def test_resize_to_is_off_or_at_least_the_image_size():
  config = _demo_config()
  config.dataset.resize_to = 28
  config_validation.validate(config, device_count=1)
  config.dataset.resize_to = 27
  assert 'allowed: 0 (off) or an integer >= dataset.image_size=28' in _error(
      config)


def test_a_missing_required_field_is_one_line():
  config = ml_collections.ConfigDict(_demo_config().to_dict())
  del config['keep_checkpoints']
  with pytest.raises(errors.UserError, match=r'^config\.keep_checkpoints is '
                     'missing;'):
    config_validation.validate(config, device_count=1)


def test_stats_groups_must_divide_both_batches():
  config = _demo_config()
  config.batch_size, config.eval_batch_size = 64, 512
  config.stats_group_size = 32
  config_validation.validate(config, device_count=1)
  config.eval_batch_size = 500
  assert _error(config) == (
      'config.stats_group_size=32 is invalid; must divide eval_batch_size=500 '
      '(statistics over groups of that many examples); 0: over the whole '
      'batch.')


def test_delta_head_batch_norm_is_a_choice():
  config = _demo_config()
  config.delta.head_batch_norm = 'eval'
  message = _error(config)
  assert message.startswith('config.delta.head_batch_norm') and (
      'train, frozen' in message), message


def test_device_split_is_checked_on_its_own():
  config = _demo_config()
  config.batch_size = 12
  config_validation.validate(config, check_devices=False)
  with pytest.raises(errors.ConfigError, match='batch_size=12'):
    config_validation.check_device_split(config, 8)


def _fake_fashion_mnist(monkeypatch, side):
  """Fashion-MNIST as ``side`` x ``side`` arrays, 20 images per class."""
  rng = np.random.RandomState(0)

  def arrays(data_dir=None, **kwargs):
    del data_dir, kwargs
    labels = np.repeat(np.arange(10), 20).astype(np.int32)
    images = rng.randint(0, 255, (200, side, side, 1)).astype(np.uint8)
    split = sources.Split(images, labels, [str(c) for c in range(10)])
    return {'train': split, 'test': split}

  monkeypatch.setattr(sources, 'fashion_mnist_arrays', arrays)


def test_image_size_larger_than_the_data_is_found_when_it_loads(
    monkeypatch, tiny_folder):
  config = _demo_config()
  config.dataset.image_size = 64
  config.dataset.shots_per_class = 5
  config.dataset.teacher_per_class = 10  # the fake data has 20 per class.
  config.batch_size = 8
  config_validation.validate(config, device_count=1)  # files not read yet
  _fake_fashion_mnist(monkeypatch, 28)
  with pytest.raises(errors.ConfigError) as e:
    datasets.load(config)
  assert str(e.value) == (
      "config.dataset.image_size=64 is invalid; the images of "
      "dataset.name='fashion_mnist' are 28x28; allowed: at most 28, or set "
      'dataset.resize_to (>= image_size) to resize them first.')
  root, folder_config = tiny_folder
  config = folder_config(root)
  config.dataset.resize_to = 0
  with pytest.raises(errors.ConfigError, match=r'^config\.dataset\.resize_to=0'
                     ' is invalid; the images .* files of varying sizes'):
    datasets.load(config)


@pytest.mark.parametrize('compare', [(), ('ft', 'dtq')])
def test_a_config_refused_when_the_data_loads_leaves_no_run_file(
    tiny_folder, tmp_path, compare):
  from dtq_jax.run import experiment  # pylint: disable=g-import-not-at-top
  root, folder_config = tiny_folder
  config = folder_config(root)
  config.compare_methods = compare
  config.batch_size = 64  # the training split has 15 images
  workdir = tmp_path / 'run'
  with pytest.raises(errors.ConfigError, match='batch_size=64'):
    experiment.run(config_validation.validate(config, device_count=1),
                   str(workdir))
  assert not list(workdir.rglob('config.json'))
  # Nothing is left of the refused run (not even its lock files).
  assert not workdir.exists()
  # The corrected rerun (which makes the folder again) is not refused as "a
  # different config".
  config.batch_size = 5
  workdir.mkdir()
  experiment._check_same_config(config, str(workdir))
