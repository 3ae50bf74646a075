"""Up-front checks of a run config, before anything heavy is built.

Every problem is reported as one ``ConfigError`` whose message names the field,
the bad value and what is allowed; ``main.py`` prints it and exits with 2.
"""

import os

import jax

from dtq_jax import quant
from dtq_jax import tfds_tasks
from dtq_jax.errors import ConfigError
from dtq_jax.models import MODEL_NAMES

METHODS = ('fp', 'ft', 'l2', 'l2sp', 'delta', 'dtq')
TFDS_DATASETS = tfds_tasks.TFDS_NAMES
DATASETS = ('image_folder', 'fashion_mnist') + TFDS_DATASETS
SPECIAL_PRETRAINED = ('torchvision', 'none', 'source_task')
# config.cpu_convolutions: XLA:CPU's kernels for convolutions (train.py).
CPU_CONVOLUTIONS = ('eigen', 'jaxlib_default')
DEFAULT_CPU_CONVOLUTIONS = 'eigen'


def _check_choice(config, field, choices):
  value = _get(config, field)
  if value not in choices:
    raise ConfigError(field, value, f'allowed: {", ".join(map(str, choices))}.')


def _check_positive(config, field):
  value = _get(config, field)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (
      value <= 0):
    raise ConfigError(field, value, 'allowed: a number > 0.')


def _get(config, field):
  value = config
  for part in field.split('.'):
    value = value[part]
  return value


def validate(config, device_count=None):
  """Raises ``ConfigError`` for the first invalid field of ``config``.

  Args:
    config: the run config (ConfigDict).
    device_count: devices the batch is split over (default: all of them).

  Returns:
    ``config`` unchanged.
  """
  device_count = device_count or jax.device_count()
  _check_choice(config, 'model', MODEL_NAMES)
  _check_choice(config, 'method', METHODS)
  for methods in (config.get('compare_methods') or ()):
    if methods not in METHODS:
      raise ConfigError('compare_methods', tuple(config.compare_methods),
                        f'allowed entries: {", ".join(METHODS)}.')
  for field in ('bits_w', 'bits_a'):
    try:
      quant.check_bits(config[field], name=f'config.{field}')
    except ValueError as e:
      raise ConfigError(field, config[field],
                        'allowed: 2..16, or 32 for full precision.') from e
  for field in ('optim.lr', 'batch_size', 'eval_batch_size', 'repeats',
                'log_every_steps', 'dataset.image_size'):
    _check_positive(config, field)
  if not 0 <= config.optim.momentum < 1:
    raise ConfigError('optim.momentum', config.optim.momentum,
                      'allowed: 0 <= momentum < 1.')
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % device_count:
      raise ConfigError(field, config[field],
                        f'must be divisible by the {device_count} devices.')
  _check_choice(config, 'dtq.attention', ('learned', 'uniform', 'reversed'))
  _check_choice(config, 'dtq.afa_normalization', ('final', 'mean'))
  by_model = config.dtq.get('temperature_by_model') or {}
  uses_dtq = 'dtq' in (config.method,) + tuple(
      config.get('compare_methods') or ())
  if config.dtq.temperature == 0 and config.model in by_model:
    _check_positive(config, f'dtq.temperature_by_model.{config.model}')
  elif config.dtq.temperature == 0 and uses_dtq:
    raise ConfigError('dtq.temperature', 0.0,
                      f'0 takes the value for model={config.model!r} from '
                      'dtq.temperature_by_model, which has none; allowed: a '
                      'number > 0, or 0 with one of '
                      f'{", ".join(sorted(by_model)) or "(none)"}.')
  elif config.dtq.temperature != 0:
    _check_positive(config, 'dtq.temperature')
  _check_choice(config, 'compute_dtype', ('float32', 'bfloat16'))
  if 'head_dropout' in config:
    _check_choice(config, 'head_dropout', ('shared', 'independent'))
  if 'cpu_convolutions' in config:
    _check_choice(config, 'cpu_convolutions', CPU_CONVOLUTIONS)
  if 'act_ranges' in config.quant:
    _check_choice(config, 'quant.act_ranges', ('dynamic', 'static'))
    _check_choice(config, 'quant.range_stat', ('ema', 'mean', 'minmax'))
    if not 0 <= config.quant.range_momentum < 1:
      raise ConfigError('quant.range_momentum', config.quant.range_momentum,
                        'allowed: 0 <= range_momentum < 1.')
  _check_choice(config, 'on_nonfinite', ('stop', 'skip'))
  if not 0 <= config.dataset.val_fraction < 1:
    raise ConfigError('dataset.val_fraction', config.dataset.val_fraction,
                      'allowed: 0 <= val_fraction < 1.')
  _check_dataset(config)
  pretrained = config.pretrained
  if pretrained not in SPECIAL_PRETRAINED and not os.path.isfile(pretrained):
    raise ConfigError('pretrained', pretrained,
                      f'allowed: {", ".join(SPECIAL_PRETRAINED)}, or an '
                      'existing .pth/.safetensors file.')
  if pretrained == 'source_task' and config.dataset.name != 'fashion_mnist':
    raise ConfigError('pretrained', pretrained,
                      'source_task needs dataset.name=fashion_mnist.')
  return config


def _check_dataset(config):
  d = config.dataset
  _check_choice(config, 'dataset.name', DATASETS)
  if d.name == 'image_folder' and not os.path.isdir(d.root):
    raise ConfigError('dataset.root', d.root,
                      'no such directory; point it at <root>/<class>/<image> '
                      'or <root>/{train,test}/<class>/<image> (see README).')
  if d.name in TFDS_DATASETS and d.data_dir and not os.path.isdir(d.data_dir):
    raise ConfigError('dataset.data_dir', d.data_dir,
                      'no such directory; create it (TFDS then downloads and '
                      "prepares the dataset there) or use '' for TFDS's "
                      'default data dir.')
  if d.name == 'fashion_mnist':
    classes = list(range(10))
    for field in ('source_classes', 'target_classes'):
      value = tuple(d[field])
      if not value or any(c not in classes for c in value) or len(
          set(value)) != len(value):
        raise ConfigError(f'dataset.{field}', value,
                          'allowed: distinct class ids in 0..9.')
    if d.get('split') != 'in_domain' and (
        set(d.source_classes) & set(d.target_classes)):
      raise ConfigError('dataset.target_classes', tuple(d.target_classes),
                        'must not overlap dataset.source_classes.')
    _check_positive(config, 'dataset.shots_per_class')
