"""Up-front checks of a run config, before anything heavy is built.

Every problem is reported as one ``ConfigError`` whose message names the field,
the bad value and what is allowed; ``main.py`` prints it and exits with 2.
"""

import collections.abc
import dataclasses
import math
import numbers
import os
import re

import jax

from dtq_jax.data import tfds_tasks
from dtq_jax.infra.errors import ConfigError
from dtq_jax.infra.errors import UserError
from dtq_jax import layers
from dtq_jax.method import attention
from dtq_jax.method import delta
from dtq_jax.method import losses
from dtq_jax.models import MODEL_NAMES
from dtq_jax.models import own_network
from dtq_jax import quant

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


def _get(config, field, default=None):
  """``config``'s dotted ``field``; ``default`` if given and it is missing."""
  value = config
  try:
    for part in field.split('.'):
      value = value[part]
  except (KeyError, AttributeError, TypeError):
    if default is None:
      raise
    return default
  return value


@dataclasses.dataclass(frozen=True)
class Range:
  """Numbers a field allows: an interval, optionally integers only."""
  low: float = -math.inf
  high: float = math.inf
  low_open: bool = False
  high_open: bool = False
  integer: bool = False

  def problem(self, value, config):
    """None if ``value`` is allowed, else what is allowed."""
    del config
    if _is_number(value) and (not self.integer or isinstance(
        value, numbers.Integral)) and self._inside(value):
      return None
    return f'allowed: {self.describe()}.'

  def _inside(self, value):
    above = value > self.low if self.low_open else value >= self.low
    below = value < self.high if self.high_open else value <= self.high
    return math.isfinite(value) and above and below

  def describe(self):
    kind = 'an integer' if self.integer else 'a number'
    if math.isinf(self.high):
      return f'{kind} {">" if self.low_open else ">="} {self.low:g}'
    return (f'{kind} x with {self.low:g} {"<" if self.low_open else "<="} x '
            f'{"<" if self.high_open else "<="} {self.high:g}')


@dataclasses.dataclass(frozen=True)
class PerChannel:
  """``dataset.mean`` / ``dataset.std``: 1 value or one per image channel."""
  positive: bool = False

  def problem(self, value, config):
    channels = _channels(config.dataset.name)
    counts = '1' if channels == 1 else f'1 or {channels}'
    kind = 'numbers > 0' if self.positive else 'finite numbers'
    allowed = (f'allowed: {counts} {kind} for the {channels}-channel images '
               f'of dataset.name={config.dataset.name!r}.')
    if isinstance(value, (str, bytes)) or not isinstance(
        value, collections.abc.Sequence) or len(value) not in (1, channels):
      return allowed
    if not all(_is_number(v) and math.isfinite(v) and (
        v > 0 or not self.positive) for v in value):
      return allowed
    return None


@dataclasses.dataclass(frozen=True)
class ZeroOrAtLeast:
  """An integer that is 0 (off) or at least another field's value."""
  other: str

  def problem(self, value, config):
    least = _get(config, self.other)
    if (_is_number(value) and isinstance(value, numbers.Integral) and
        (value == 0 or value >= least)):
      return None
    return f'allowed: 0 (off) or an integer >= {self.other}={least!r}.'


@dataclasses.dataclass(frozen=True)
class EachValue:
  """A dict field each of whose values follows ``rule``."""
  rule: Range


def _is_number(value):
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _channels(dataset_name):
  """Image channels of a dataset kind: files and TFDS images are RGB."""
  return 1 if dataset_name == 'fashion_mnist' else 3


_COUNT = Range(0, integer=True)  # 0 often means "all" or "off"
_AT_LEAST_1 = Range(1, integer=True)
_POSITIVE = Range(0, low_open=True)
_NON_NEGATIVE = Range(0)
_MOMENTUM = Range(0, 1, high_open=True)
_FACTOR = Range(0, 1, low_open=True)  # a decay: 0 < x <= 1
_FRACTION = Range(0, 1)

_OPTIM_RULES = {
    'optim.lr': _POSITIVE,
    'optim.momentum': _MOMENTUM,
    'optim.head_weight_decay': _NON_NEGATIVE,
    'optim.lr_drop_epoch_fraction': _FRACTION,
    'optim.lr_drop_factor': _FACTOR,
}
# Every numeric field of a run config and what it allows (the bit widths,
# checked by quant.check_bits, aside). NaN and infinities are refused for all
# of them and anywhere else in the config.
NUMERIC_RULES = {
    'seed': _COUNT,
    'repeats': _AT_LEAST_1,
    'batch_size': _AT_LEAST_1,
    'eval_batch_size': _AT_LEAST_1,
    'total_steps': _AT_LEAST_1,
    'num_epochs': _COUNT,
    'steps_per_epoch': _COUNT,
    'max_eval_batches': _COUNT,
    'log_every_steps': _AT_LEAST_1,
    'eval_every_epochs': _AT_LEAST_1,
    'checkpoint_every_steps': _COUNT,
    'prefetch_batches': _COUNT,
    # 0 would delete every checkpoint as soon as it is written.
    'keep_checkpoints': _AT_LEAST_1,
    'max_nonfinite_fraction': _FACTOR,
    'dataset.image_size': _AT_LEAST_1,
    'dataset.resize_to': ZeroOrAtLeast('dataset.image_size'),
    'dataset.crop_padding': _COUNT,
    'dataset.val_fraction': Range(0, 1, high_open=True),
    'dataset.mean': PerChannel(),
    'dataset.std': PerChannel(positive=True),
    'dataset.train_per_class': _COUNT,
    'dataset.test_per_class': _COUNT,
    'dataset.data_seed': _COUNT,
    'dataset.shots_per_class': _AT_LEAST_1,
    **_OPTIM_RULES,
    # 0: the value of dtq.temperature_by_model for the model (see validate).
    'dtq.temperature': _NON_NEGATIVE,
    'dtq.temperature_by_model': EachValue(_POSITIVE),
    'dtq.kl_weight': _NON_NEGATIVE,
    'dtq.afa_weight': _NON_NEGATIVE,
    'dtq.attention_entropy_weight': _NON_NEGATIVE,
    'l2.alpha': _NON_NEGATIVE,
    'l2.beta': _NON_NEGATIVE,
    'l2sp.alpha': _NON_NEGATIVE,
    'l2sp.beta': _NON_NEGATIVE,
    'delta.alpha': _NON_NEGATIVE,
    'delta.beta': _NON_NEGATIVE,
    'delta.head_epochs': _AT_LEAST_1,
    'delta.head_lr': _POSITIVE,
    'delta.head_momentum': _MOMENTUM,
    'delta.head_weight_decay': _NON_NEGATIVE,
    'delta.head_lr_decay_epochs': _POSITIVE,
    'delta.head_lr_decay_factor': _FACTOR,
    'delta.num_batches': _AT_LEAST_1,
    # 0: the run's batch_size.
    'delta.batch_size': _COUNT,
    # 0: statistics over the whole batch (see _check_stats_groups).
    'stats_group_size': _COUNT,
    'delta.temperature': _POSITIVE,
    'quant.range_momentum': _MOMENTUM,
    'quant.lsq_lr_scale': _POSITIVE,
    # The demo teacher's budget (configs/fmnist.py); its optim fields
    # replace those of optim.
    'pretrain.batch_size': _AT_LEAST_1,
    'pretrain.num_epochs': _AT_LEAST_1,
    'pretrain.steps_per_epoch': _COUNT,
    'pretrain.seed': _COUNT,
    **{f'pretrain.{field}': rule for field, rule in _OPTIM_RULES.items()},
}
# Fields that only some configs have (newer fields, the demo's teacher, the
# Fashion-MNIST task); the others must be there.
OPTIONAL_FIELDS = frozenset(
    ['max_nonfinite_fraction', 'dataset.shots_per_class',
     'dtq.temperature_by_model', 'dtq.attention_entropy_weight',
     'quant.range_momentum', 'quant.lsq_lr_scale', 'delta.batch_size',
     'stats_group_size'] +
    [f for f in NUMERIC_RULES if f.startswith('pretrain.')])
_MISSING = object()


def check_numbers(config):
  """Raises ``ConfigError`` for a numeric field outside ``NUMERIC_RULES``.

  Also refuses NaN and infinities in any field.

  Args:
    config: the run config.
  """
  _check_finite(config)
  for field, rule in NUMERIC_RULES.items():
    value = _get(config, field, _MISSING)
    if value is _MISSING:
      if field in OPTIONAL_FIELDS:
        continue
      raise UserError(f'config.{field} is missing; every run config has it '
                      '(see configs/common.py).')
    if isinstance(rule, EachValue):
      checks = [(f'{field}.{key}', value[key], rule.rule) for key in value]
    else:
      checks = [(field, value, rule)]
    for name, item, item_rule in checks:
      problem = item_rule.problem(item, config)
      if problem:
        raise ConfigError(name, _plain(item), problem)


def _check_finite(node, prefix=''):
  for key, value in node.items():
    field = f'{prefix}{key}'
    if hasattr(value, 'items'):
      _check_finite(value, f'{field}.')
      continue
    values = value if isinstance(value, (list, tuple)) else (value,)
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
      raise ConfigError(field, _plain(value),
                        'allowed: finite numbers only (no NaN or inf).')


def _plain(value):
  """Tuples instead of lists, for messages."""
  return tuple(value) if isinstance(value, list) else value


def validate(config, device_count=None, check_devices=True):
  """Raises ``ConfigError`` for the first invalid field of ``config``.

  Args:
    config: the run config (ConfigDict).
    device_count: devices the batch is split over (default: all of them).
    check_devices: False skips ``check_device_split``, which needs the JAX
      backend: main.py validates before JAX's distributed runtime starts
      and checks the split after.

  Returns:
    ``config`` unchanged.
  """
  _check_model(config)
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
  check_numbers(config)
  if check_devices:
    check_device_split(config, device_count or jax.device_count())
  _check_choice(config, 'dtq.attention', attention.VARIANTS)
  _check_choice(config, 'dtq.afa_normalization', losses.AFA_NORMALIZATIONS)
  by_model = config.dtq.get('temperature_by_model') or {}
  uses_dtq = 'dtq' in (config.method,) + tuple(
      config.get('compare_methods') or ())
  # check_numbers checked the values; here, that 0 has one to take.
  if config.dtq.temperature == 0 and uses_dtq and config.model not in by_model:
    raise ConfigError('dtq.temperature', 0.0,
                      f'0 takes the value for model={config.model!r} from '
                      'dtq.temperature_by_model, which has none; allowed: a '
                      'number > 0, or 0 with one of '
                      f'{", ".join(sorted(by_model)) or "(none)"}.')
  _check_choice(config, 'compute_dtype', ('float32', 'bfloat16'))
  if 'head_batch_norm' in config.delta:
    _check_choice(config, 'delta.head_batch_norm', delta.BATCH_NORM_MODES)
  _check_stats_groups(config)
  if 'head_dropout' in config:
    _check_choice(config, 'head_dropout', ('shared', 'independent'))
  if 'cpu_convolutions' in config:
    _check_choice(config, 'cpu_convolutions', CPU_CONVOLUTIONS)
  if 'act_ranges' in config.quant:
    _check_choice(config, 'quant.act_ranges', layers.ACT_RANGES)
    _check_choice(config, 'quant.range_stat', layers.RANGE_STATS)
  _check_quant_method(config)
  _check_choice(config, 'on_nonfinite', ('stop', 'skip'))
  _check_dataset(config)
  pretrained = config.pretrained
  own = own_network.is_import_path(config.model)
  # A user's network's orbax checkpoint is a folder.
  exists = os.path.exists if own else os.path.isfile
  if pretrained not in SPECIAL_PRETRAINED and not exists(pretrained):
    raise ConfigError('pretrained', pretrained,
                      f'allowed: {", ".join(SPECIAL_PRETRAINED)}, or an '
                      + ('existing orbax folder or .msgpack/.safetensors '
                         'file.' if own else 'existing .pth/.safetensors '
                         'file.'))
  if pretrained == 'source_task' and config.dataset.name != 'fashion_mnist':
    raise ConfigError('pretrained', pretrained,
                      'source_task needs dataset.name=fashion_mnist.')
  return config


# Settings that only a user's own network reads, and their defaults.
_OWN_NETWORK_FIELDS = {'quant.keep_float': (), 'quant.quantize_dense': False,
                       'dtq.taps': (), 'dtq.source_classifier': ''}


def _check_model(config):
  """A zoo name, or an importable Flax classifier and its settings."""
  if not own_network.is_import_path(config.model):
    _check_choice(config, 'model', MODEL_NAMES)
    for field, default in _OWN_NETWORK_FIELDS.items():
      value = _get(config, field, default)
      if _plain(value) != default:
        raise ConfigError(field, _plain(value),
                          f'it applies to a network of your own '
                          f"(model='package.module:Class'), not to the zoo's "
                          f'{config.model}; leave it at {default!r}.')
    return
  try:
    own_network.load_class(config.model)
  except own_network.NetworkError as e:
    raise ConfigError('model', config.model, str(e)) from e
  for field in ('quant.keep_float', 'dtq.taps'):
    for pattern in _get(config, field, ()):
      try:
        re.compile(pattern)
      except (re.error, TypeError) as e:
        raise ConfigError(field, _plain(_get(config, field, ())),
                          f'{pattern!r} is not a regular expression '
                          f'({e}).') from e


def _check_dataset(config):
  d = config.dataset
  _check_choice(config, 'dataset.name', DATASETS)
  if d.name == 'image_folder' and not os.path.isdir(d.root):
    raise ConfigError('dataset.root', d.root,
                      'no such directory; point it at <root>/<class>/<image> '
                      'or <root>/{train,test}/<class>/<image> (see '
                      'docs/paper_settings.md, "Your own data").')
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


def _check_quant_method(config):
  """``quant.method``, and the min-max-only settings it excludes."""
  if 'method' not in config.quant:
    return
  _check_choice(config, 'quant.method', layers.QUANT_METHODS)
  method = config.quant.method
  if method == 'minmax':
    return
  if config.quant.get('quantize_dense', False):
    # A user's Dense layers are quantized through their promote_dtype hook,
    # which has no parameters of its own to learn.
    raise ConfigError('quant.quantize_dense', True,
                      f'quantized Dense layers use the min-max quantizer; '
                      f'with quant.method={method!r} leave it False.')
  # Settings of the min-max quantizer that a learned one has no use for:
  # silently ignoring them would run something else than the config says.
  # (quant.fused_vjp, a choice of kernel for the min-max quantizer's
  # gradient, not of maths, is on by default and simply unused here.)
  for field, paper in (('act_ranges', 'dynamic'), ('range_grad', True)):
    value = config.quant.get(field, paper)
    if value != paper:
      raise ConfigError(f'quant.{field}', value,
                        f"it applies to quant.method='minmax' only; with "
                        f'{method!r} (learned ranges) leave it at '
                        f'{paper!r}.')


def _check_stats_groups(config):
  # Per-replica statistics cut every training and evaluation batch into
  # groups of stats_group_size examples (step.apply_in_groups).
  size = config.get('stats_group_size', 0)
  if not size:
    return
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % size:
      raise ConfigError('stats_group_size', size,
                        f'must divide {field}={config[field]} (statistics '
                        'over groups of that many examples); 0: over the '
                        'whole batch.')


def check_device_split(config, device_count):
  """Raises ``ConfigError`` unless the batches split evenly over the devices.

  Args:
    config: the run config.
    device_count: devices the batches are split over (all processes').
  """
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] % device_count:
      raise ConfigError(field, config[field],
                        f'must be divisible by the {device_count} devices.')
