"""Tests of dtq_jax.weights.conversion: torchvision state_dicts -> Flax variables.

The state_dicts come from a hand-written generator of torchvision's names and
shapes below (not from the converter's table), with random values, so a wrong
rule in the converter cannot hide itself. tests/weights/test_pretrained.py uses the
same generator for the files, the cache and the parity with torchvision.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtq_jax import models
from dtq_jax.weights import conversion

# --- A hand-written generator of torchvision's state_dict names -------------
# Each entry is (torch key, torch shape, expected Flax path or None). It
# follows torchvision/models/resnet.py and mobilenetv2.py directly.


def _conv(key, out_ch, in_ch, k, flax):
  return [(f'{key}.weight', (out_ch, in_ch, k, k),
           ('params',) + flax + ('kernel',))]


def _bn(key, ch, flax):
  return [
      (f'{key}.weight', (ch,), ('params',) + flax + ('scale',)),
      (f'{key}.bias', (ch,), ('params',) + flax + ('bias',)),
      (f'{key}.running_mean', (ch,), ('batch_stats',) + flax + ('mean',)),
      (f'{key}.running_var', (ch,), ('batch_stats',) + flax + ('var',)),
      (f'{key}.num_batches_tracked', (), None),
  ]


def _linear(key, out_f, in_f, flax):
  return [(f'{key}.weight', (out_f, in_f), ('params',) + flax + ('kernel',)),
          (f'{key}.bias', (out_f,), ('params',) + flax + ('bias',))]


def resnet_entries(stage_sizes, bottleneck, widths=(64, 128, 256, 512),
                   stem_kernel=7, num_classes=1000):
  """torchvision ResNet keys (stem_kernel=3: the demo's small ResNet)."""
  expansion = 4 if bottleneck else 1
  entries = _conv('conv1', widths[0], 3, stem_kernel, ('conv1',))
  entries += _bn('bn1', widths[0], ('bn1',))
  inplanes = widths[0]
  for i, (blocks, planes) in enumerate(zip(stage_sizes, widths)):
    for j in range(blocks):
      key, flax = f'layer{i + 1}.{j}', (f'layer{i + 1}_{j}',)
      if bottleneck:
        shapes = [(planes, inplanes, 1), (planes, planes, 3),
                  (planes * 4, planes, 1)]
      else:
        shapes = [(planes, inplanes, 3), (planes, planes, 3)]
      for n, (o, c, k) in enumerate(shapes, start=1):
        entries += _conv(f'{key}.conv{n}', o, c, k, flax + (f'conv{n}',))
        entries += _bn(f'{key}.bn{n}', o, flax + (f'bn{n}',))
      stride = 2 if i > 0 and j == 0 else 1
      if stride != 1 or inplanes != planes * expansion:
        entries += _conv(f'{key}.downsample.0', planes * expansion, inplanes,
                         1, flax + ('downsample_0',))
        entries += _bn(f'{key}.downsample.1', planes * expansion,
                       flax + ('downsample_1',))
      inplanes = planes * expansion
  return entries + _linear('fc', num_classes, inplanes, ('fc',))


TORCHVISION_RESNETS = {
    'resnet18': ((2, 2, 2, 2), False),
    'resnet34': ((3, 4, 6, 3), False),
    'resnet50': ((3, 4, 6, 3), True),
    'resnet101': ((3, 4, 23, 3), True),
    'resnet152': ((3, 8, 36, 3), True),
}


def mobilenet_v2_entries(num_classes=1000):
  """torchvision MobileNetV2 (width 1.0) keys."""
  setting = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3),
             (6, 160, 3), (6, 320, 1)]  # (t, c, n); strides don't matter
  entries = _conv('features.0.0', 32, 3, 3, ('features_0_0',))
  entries += _bn('features.0.1', 32, ('features_0_1',))
  in_ch, idx = 32, 1
  for t, c, n in setting:
    for _ in range(n):
      hidden, key, flax = in_ch * t, f'features.{idx}.conv', (
          f'features_{idx}',)
      j = 0
      if t != 1:  # expansion 1x1
        entries += _conv(f'{key}.0.0', hidden, in_ch, 1, flax + ('conv_0_0',))
        entries += _bn(f'{key}.0.1', hidden, flax + ('conv_0_1',))
        j = 1
      # Depthwise: torch (C, 1, 3, 3).
      entries += _conv(f'{key}.{j}.0', hidden, 1, 3, flax + (f'conv_{j}_0',))
      entries += _bn(f'{key}.{j}.1', hidden, flax + (f'conv_{j}_1',))
      entries += _conv(f'{key}.{j + 1}', c, hidden, 1,
                       flax + (f'conv_{j + 1}',))
      entries += _bn(f'{key}.{j + 2}', c, flax + (f'conv_{j + 2}',))
      in_ch, idx = c, idx + 1
  entries += _conv(f'features.{idx}.0', 1280, in_ch, 1, (f'features_{idx}_0',))
  entries += _bn(f'features.{idx}.1', 1280, (f'features_{idx}_1',))
  return entries + _linear('classifier.1', num_classes, 1280, ('classifier_1',))


def torchvision_entries(name):
  if name == 'mobilenet_v2':
    return mobilenet_v2_entries()
  if name == 'small_resnet':
    return resnet_entries((1, 1, 1, 1), False, widths=(16, 32, 64, 128),
                          stem_kernel=3)
  return resnet_entries(*TORCHVISION_RESNETS[name])


def random_state_dict(entries, seed=0):
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape, _ in entries:
    if key.endswith('num_batches_tracked'):
      state[key] = np.array(rng.integers(1, 10_000), dtype=np.int64)
    elif key.endswith('running_var'):
      state[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      state[key] = rng.standard_normal(shape, dtype=np.float32)
  return state


def state_dict(name, seed=0):
  """A random state_dict of torchvision's network ``name``."""
  return random_state_dict(torchvision_entries(name), seed)


def to_flax_layout(array):
  """The expected Flax value, written out per rank (not the converter's)."""
  if array.ndim == 4:  # conv (O, I, H, W) -> (H, W, I, O)
    return np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 2:  # linear (out, in) -> (in, out)
    return array.T
  return array


def flat_paths(tree):
  return {tuple(getattr(k, 'key', k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def model_shapes(name):
  """Leaf shapes of the model itself, from jax.eval_shape (no FLOPs)."""
  model = models.create_model(name, num_classes=1000)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                         train=False))
  return {p: tuple(v.shape) for p, v in flat_paths(dict(variables)).items()}


def assert_converted(variables, name, entries, state):
  """``variables`` hold ``state``'s tensors where ``entries`` say, as float32.

  Args:
    variables: converted variables of ``create_model(name, 1000)``.
    name: the model.
    entries: ``torchvision_entries(name)``.
    state: the state_dict they were converted from.
  """
  flat = flat_paths(variables)
  assert {p: v.shape for p, v in flat.items()} == model_shapes(name)
  for key, _, path in entries:
    if path is not None:
      assert flat[path].dtype == np.float32, key
      np.testing.assert_array_equal(flat[path], to_flax_layout(state[key]),
                                    err_msg=f'{key} -> {path}')


# --- Conversion -------------------------------------------------------------


@pytest.mark.parametrize('name', ['resnet34', 'resnet101', 'resnet152',
                                  'small_resnet'])
def test_plan_covers_every_key(name):
  """Names and shapes only, so the big models cost no memory."""
  entries = torchvision_entries(name)
  plan = conversion.plan_conversion(name, {k: s for k, s, _ in entries})
  assert [a.torch_key for a in plan] == [k for k, _, _ in entries]
  for a, (_, shape, path) in zip(plan, entries):
    assert a.flax_path == path
    if path is not None:
      assert a.flax_shape == to_flax_layout(np.empty(shape)).shape
  assert ({a.flax_path: a.flax_shape for a in plan if a.flax_path} ==
          model_shapes(name))


def test_converted_resnet18_runs(tmp_path):
  state = state_dict('resnet18')
  variables = conversion.convert_state_dict('resnet18', state)
  model = models.create_model('resnet18')
  logits, features = model.apply(variables, jnp.ones((1, 32, 32, 3)),
                                 train=False)
  assert logits.shape == (1, 1000) and np.isfinite(logits).all()
  assert [t.shape[-1] for t in features['taps']] == [64, 128, 256, 512]


def _shapes(name):
  return {k: s for k, s, _ in torchvision_entries(name)}


def test_missing_tensor_is_named():
  shapes = _shapes('resnet18')
  del shapes['layer2.1.bn1.running_var']
  with pytest.raises(conversion.ConversionError,
                     match=r'missing layer2\.1\.bn1\.running_var'):
    conversion.plan_conversion('resnet18', shapes)


def test_extra_tensors_are_named():
  shapes = _shapes('resnet18')
  shapes['fc2.weight'] = (10, 512)
  shapes['layer1.0.conv1.lora'] = (3,)
  shapes['layer1.0.conv1.num_batches_tracked'] = ()  # not a BatchNorm
  with pytest.raises(conversion.ConversionError) as e:
    conversion.plan_conversion('resnet18', shapes)
  message = str(e.value)
  assert message.startswith('3 problem(s)')
  for key in ('fc2.weight', 'layer1.0.conv1.lora',
              'layer1.0.conv1.num_batches_tracked'):
    assert key in message


def test_misshaped_tensor_is_named():
  shapes = _shapes('resnet18')
  shapes['fc.weight'] = (10, 512)  # a 10-class head into a 1000-class model
  shapes['layer1.0.conv1.weight'] = (64, 64, 1, 1)
  with pytest.raises(conversion.ConversionError) as e:
    conversion.plan_conversion('resnet18', shapes)
  message = str(e.value)
  assert message.startswith('2 problem(s)')
  assert 'mis-shaped fc.weight' in message
  assert 'mis-shaped layer1.0.conv1.weight' in message


def test_wrong_model_lists_problems():
  with pytest.raises(conversion.ConversionError, match='and .* more'):
    conversion.plan_conversion('resnet18', _shapes('resnet50'))


# --- Values that cannot be trusted ------------------------------------------


@pytest.mark.parametrize('key,value,problem', [
    ('layer1.0.conv1.weight', np.nan, r'has 1 NaN/Inf value\(s\)'),
    ('fc.bias', np.inf, r'has 1 NaN/Inf value\(s\)'),
    ('layer2.0.bn1.running_var', 0.0, r'a running variance\) has 1 value'),
    ('bn1.running_var', -1.0, r'a running variance\) has 1 value'),
    ('layer3.0.bn2.running_mean', 1e39, r'has 1 NaN/Inf'),  # > float32 max
])
def test_untrustworthy_values_are_named(key, value, problem):
  state = state_dict('small_resnet')
  state[key] = state[key].astype(np.float64)
  state[key].flat[0] = value
  with pytest.raises(conversion.ConversionError) as e:
    conversion.convert_state_dict('small_resnet', state)
  first_line = str(e.value).splitlines()[0]
  assert first_line.startswith('1 problem(s)')
  assert re.search(re.escape(key) + '.*' + problem, first_line), first_line


def test_non_float_tensor_is_named():
  state = state_dict('small_resnet')
  state['layer1.0.conv2.weight'] = state['layer1.0.conv2.weight'].astype(
      np.int32)
  state['bn1.running_mean'] = state['bn1.running_mean'] > 0  # bool
  with pytest.raises(conversion.ConversionError) as e:
    conversion.convert_state_dict('small_resnet', state)
  first_line = str(e.value).splitlines()[0]
  assert first_line.startswith('2 problem(s)')
  assert 'layer1.0.conv2.weight is int32, not floating point' in first_line
  assert 'bn1.running_mean is bool, not floating point' in first_line
