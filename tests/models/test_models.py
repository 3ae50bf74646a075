"""Tests for dtq_jax.models: shapes, parameter layout, quantization placement.

Big models are only traced (``jax.eval_shape``), never run; numerical checks
use small images on ResNet-18, MobileNetV2 and the demo ResNet.
"""

import collections
import functools
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtq_jax import layers
from dtq_jax import models
from dtq_jax.models import mobilenet_v2

# The package exports a function named ``resnet``, which shadows the module
# of the same name for ``from dtq_jax.models import resnet``.
resnet = importlib.import_module('dtq_jax.models.resnet')


class FloatConv(nn.Conv):
  """``flax.linen.Conv`` that accepts (and ignores) the bit-width attributes.

  A model built with it is the plain full-precision network, the reference
  that a bits=32 model must reproduce exactly.
  """
  bits_w: int = 32
  bits_a: int = 32


def _random_variables(shapes, seed=0):
  """Fills ``init`` shapes with NumPy random values (fast, unlike eager init).

  Kernels get He scaling; BatchNorm gets non-trivial scales, offsets and
  running statistics so that eval-mode BatchNorm is not the identity.
  """
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = path[-1].key
    if name == 'kernel':
      fan_in = np.prod(s.shape[:-1])
      value = rng.normal(size=s.shape) * np.sqrt(2.0 / fan_in)
    elif name in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, size=s.shape)
    else:  # bias, mean
      value = rng.normal(scale=0.1, size=s.shape)
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _images(px, batch=2, seed=0):
  # NumPy, not jax.random: eager jax.random compiles one program per shape.
  return jnp.asarray(
      np.random.default_rng(seed).normal(size=(batch, px, px, 3)),
      jnp.float32)


def _shapes(model, x):
  return jax.eval_shape(functools.partial(model.init, train=False),
                        jax.random.key(0), x)


# --------------------------------------------------------------------------
# Structure, traced only: every model is traced once (``_trace``) and the
# tests below read the trace.
# --------------------------------------------------------------------------

# name -> (image size, [(tap size, tap channels)] * 4, pooled features).
EXPECTED_SHAPES = {
    'resnet18': (224, [(56, 64), (28, 128), (14, 256), (7, 512)], 512),
    'resnet34': (224, [(56, 64), (28, 128), (14, 256), (7, 512)], 512),
    'resnet50': (224, [(56, 256), (28, 512), (14, 1024), (7, 2048)], 2048),
    'resnet101': (224, [(56, 256), (28, 512), (14, 1024), (7, 2048)], 2048),
    'resnet152': (224, [(56, 256), (28, 512), (14, 1024), (7, 2048)], 2048),
    'mobilenet_v2': (224, [(28, 32), (14, 64), (14, 96), (7, 320)], 1280),
    'small_resnet': (32, [(32, 16), (16, 32), (8, 64), (4, 128)], 128),
}

# torchvision's parameter counts (sum of p.numel() over model.parameters()).
TORCHVISION_PARAM_COUNTS = {
    'resnet18': 11689512,
    'resnet34': 21797672,
    'resnet50': 25557032,
    'resnet101': 44549160,
    'resnet152': 60192808,
    'mobilenet_v2': 3504872,
}

# The layer whose output each tap is (docs/method.md, "Feature maps used for
# transfer"): ResNet conv3 (Bottleneck) / conv2 (BasicBlock) of the last block
# of each stage, before its BatchNorm; MobileNetV2 the projection BatchNorm
# (torchvision's index 3 inside .conv) of blocks 5, 9, 13, 17.
TAP_LAYERS = {
    'resnet18': [('layer1_1', 'conv2'), ('layer2_1', 'conv2'),
                 ('layer3_1', 'conv2'), ('layer4_1', 'conv2')],
    'resnet34': [('layer1_2', 'conv2'), ('layer2_3', 'conv2'),
                 ('layer3_5', 'conv2'), ('layer4_2', 'conv2')],
    'resnet50': [('layer1_2', 'conv3'), ('layer2_3', 'conv3'),
                 ('layer3_5', 'conv3'), ('layer4_2', 'conv3')],
    'resnet101': [('layer1_2', 'conv3'), ('layer2_3', 'conv3'),
                  ('layer3_22', 'conv3'), ('layer4_2', 'conv3')],
    'resnet152': [('layer1_2', 'conv3'), ('layer2_7', 'conv3'),
                  ('layer3_35', 'conv3'), ('layer4_2', 'conv3')],
    'mobilenet_v2': [('features_5', 'conv_3'), ('features_9', 'conv_3'),
                     ('features_13', 'conv_3'), ('features_17', 'conv_3')],
    'small_resnet': [('layer1_0', 'conv2'), ('layer2_0', 'conv2'),
                     ('layer3_0', 'conv2'), ('layer4_0', 'conv2')],
}

STEMS = {'mobilenet_v2': ('features_0_0',)}
CLASSIFIERS = {'mobilenet_v2': ('classifier_1',)}
# Convolutions in each network, the stem included.
CONV_COUNTS = {
    'resnet18': 1 + 8 * 2 + 3,
    'resnet34': 1 + 16 * 2 + 3,
    'resnet50': 1 + 16 * 3 + 4,
    'resnet101': 1 + 33 * 3 + 4,
    'resnet152': 1 + 50 * 3 + 4,
    'mobilenet_v2': 1 + 2 + 16 * 3 + 1,
    'small_resnet': 1 + 4 * 2 + 3,
}

Trace = collections.namedtuple(
    'Trace', 'logits features variables layers tap_sources')


@functools.lru_cache(maxsize=None)
def _trace(name):
  """Traces ``init`` of a quantized model (bits_w=4, bits_a=5); cached.

  Every convolution, dense and BatchNorm call is captured with Flax's method
  interception, and each tap is matched, by object identity, to the layer
  call that produced it.

  Args:
    name: model name.

  Returns:
    A ``Trace``: shapes of the logits, features and variables; ``layers``, a
    list of ``(path, module)`` in call order; ``tap_sources``, for each tap
    the paths of the layers whose output it is.
  """
  px = EXPECTED_SHAPES[name][0]
  # Different widths for weights and activations, and a conv option, to see
  # that each reaches the right convolutions.
  model = models.create_model(name, bits_w=4, bits_a=5,
                              conv_kwargs={'pointwise_as_dot': True})
  calls = []
  found = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and isinstance(
        context.module, (nn.Conv, layers.QuantConv, nn.Dense, nn.BatchNorm)):
      calls.append((context.module.path, context.module, out))
    return out

  def init(rng, x):
    with nn.intercept_methods(interceptor):
      (logits, features), variables = model.init_with_output(rng, x,
                                                             train=False)
    found['tap_sources'] = [[path for path, _, out in calls if out is tap]
                            for tap in features['taps']]
    return (logits, features), variables

  (logits, features), variables = jax.eval_shape(
      init, jax.random.key(0),
      jax.ShapeDtypeStruct((2, px, px, 3), jnp.float32))
  return Trace(logits, features, variables,
               [(path, module) for path, module, _ in calls],
               found['tap_sources'])


def test_every_model_is_covered():
  assert set(EXPECTED_SHAPES) == set(models.MODEL_NAMES)
  with pytest.raises(ValueError):
    models.create_model('resnet19')


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_output_and_tap_shapes(name):
  _, taps, pooled = EXPECTED_SHAPES[name]
  trace = _trace(name)
  assert trace.logits.shape == (2, 1000)
  assert trace.logits.dtype == jnp.float32
  assert trace.features['pooled'].shape == (2, pooled)
  assert [t.shape for t in trace.features['taps']] == [
      (2, size, size, c) for size, c in taps]


def test_num_classes():
  model = models.create_model('small_resnet', num_classes=257)
  (logits, _), _ = jax.eval_shape(
      functools.partial(model.init_with_output, train=False),
      jax.random.key(0), jax.ShapeDtypeStruct((2, 28, 28, 3), jnp.float32))
  assert logits.shape == (2, 257)


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_taps_are_the_documented_layer_outputs(name):
  assert _trace(name).tap_sources == [[path] for path in TAP_LAYERS[name]]


@pytest.mark.parametrize('name', sorted(TORCHVISION_PARAM_COUNTS))
def test_param_count_equals_torchvision(name):
  params = _trace(name).variables['params']
  count = sum(p.size for p in jax.tree.leaves(params))
  assert count == TORCHVISION_PARAM_COUNTS[name]


# Parameter names: torchvision's state_dict keys with '.' written as '_'.


def _bn_keys(prefix):
  return [f'{prefix}.{k}'
          for k in ('weight', 'bias', 'running_mean', 'running_var')]


def _torchvision_resnet_keys(stage_sizes, bottleneck):
  """state_dict keys of torchvision's ResNet (num_batches_tracked left out)."""
  keys = ['conv1.weight'] + _bn_keys('bn1')
  in_channels = 64
  for i, blocks in enumerate(stage_sizes):
    out_channels = 64 * 2**i * (4 if bottleneck else 1)
    for j in range(blocks):
      prefix = f'layer{i + 1}.{j}'
      for k in range(1, 4 if bottleneck else 3):
        keys += [f'{prefix}.conv{k}.weight'] + _bn_keys(f'{prefix}.bn{k}')
      stride = 2 if i > 0 and j == 0 else 1
      if stride != 1 or in_channels != out_channels:
        keys += ([f'{prefix}.downsample.0.weight'] +
                 _bn_keys(f'{prefix}.downsample.1'))
      in_channels = out_channels
  return keys + ['fc.weight', 'fc.bias']


def _torchvision_mobilenet_v2_keys():
  """state_dict keys of torchvision's mobilenet_v2."""
  keys = ['features.0.0.weight'] + _bn_keys('features.0.1')
  index = 1
  for t, _, n, _ in mobilenet_v2.INVERTED_RESIDUAL_SETTING:
    for _ in range(n):
      prefix = f'features.{index}.conv'
      k = 0
      if t != 1:
        keys += [f'{prefix}.0.0.weight'] + _bn_keys(f'{prefix}.0.1')
        k = 1
      keys += [f'{prefix}.{k}.0.weight'] + _bn_keys(f'{prefix}.{k}.1')
      keys += [f'{prefix}.{k + 1}.weight'] + _bn_keys(f'{prefix}.{k + 2}')
      index += 1
  keys += ['features.18.0.weight'] + _bn_keys('features.18.1')
  return keys + ['classifier.1.weight', 'classifier.1.bias']


_LEAF_TO_TORCH = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}


def _as_torch_keys(variables):
  """Flax variable paths renamed by the documented rule ('_' -> '.')."""
  keys = []
  for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]:
    names = [p.key for p in path]
    collection, modules, leaf = names[0], names[1:-1], names[-1]
    keys.append('.'.join([m.replace('_', '.') for m in modules] +
                         [_LEAF_TO_TORCH[(collection, leaf)]]))
  return keys


@pytest.mark.parametrize('name,expected_keys', [
    ('resnet18', _torchvision_resnet_keys((2, 2, 2, 2), bottleneck=False)),
    ('resnet34', _torchvision_resnet_keys((3, 4, 6, 3), bottleneck=False)),
    ('resnet50', _torchvision_resnet_keys((3, 4, 6, 3), bottleneck=True)),
    ('resnet101', _torchvision_resnet_keys((3, 4, 23, 3), bottleneck=True)),
    ('resnet152', _torchvision_resnet_keys((3, 8, 36, 3), bottleneck=True)),
    ('mobilenet_v2', _torchvision_mobilenet_v2_keys()),
])
def test_names_map_to_torchvision_keys(name, expected_keys):
  keys = _as_torch_keys(_trace(name).variables)
  assert len(keys) == len(set(keys))
  assert sorted(keys) == sorted(expected_keys)


def _get(tree, path):
  return functools.reduce(lambda d, k: d[k], path, tree)


def test_named_shapes_resnet50():
  params = _trace('resnet50').variables['params']
  expected = {
      ('conv1', 'kernel'): (7, 7, 3, 64),
      ('layer1_0', 'conv1', 'kernel'): (1, 1, 64, 64),
      ('layer1_0', 'conv2', 'kernel'): (3, 3, 64, 64),
      ('layer1_0', 'conv3', 'kernel'): (1, 1, 64, 256),
      ('layer1_0', 'downsample_0', 'kernel'): (1, 1, 64, 256),
      ('layer1_0', 'downsample_1', 'scale'): (256,),
      ('layer2_0', 'conv2', 'kernel'): (3, 3, 128, 128),
      ('layer2_0', 'downsample_0', 'kernel'): (1, 1, 256, 512),
      ('layer4_2', 'conv3', 'kernel'): (1, 1, 512, 2048),
      ('fc', 'kernel'): (2048, 1000),
      ('fc', 'bias'): (1000,),
  }
  for path, shape in expected.items():
    assert _get(params, path).shape == shape, path
  # Convolutions have no bias, as in torchvision.
  assert 'bias' not in params['layer1_0']['conv1']
  assert 'bias' not in params['conv1']


def test_named_shapes_mobilenet_v2():
  params = _trace('mobilenet_v2').variables['params']
  expected = {
      ('features_0_0', 'kernel'): (3, 3, 3, 32),
      ('features_0_1', 'scale'): (32,),
      ('features_1', 'conv_0_0', 'kernel'): (3, 3, 1, 32),  # Depthwise.
      ('features_1', 'conv_1', 'kernel'): (1, 1, 32, 16),
      ('features_1', 'conv_2', 'scale'): (16,),
      ('features_3', 'conv_0_0', 'kernel'): (1, 1, 24, 144),
      ('features_3', 'conv_1_0', 'kernel'): (3, 3, 1, 144),  # Depthwise.
      ('features_3', 'conv_2', 'kernel'): (1, 1, 144, 24),
      ('features_3', 'conv_3', 'scale'): (24,),
      ('features_18_0', 'kernel'): (1, 1, 320, 1280),
      ('classifier_1', 'kernel'): (1280, 1000),
  }
  for path, shape in expected.items():
    assert _get(params, path).shape == shape, path


# Which layers are quantized.


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_stem_and_classifier_full_precision_other_convs_quantized(name):
  calls = _trace(name).layers
  stem = STEMS.get(name, ('conv1',))
  classifier = CLASSIFIERS.get(name, ('fc',))
  convs = [(p, m) for p, m in calls
           if isinstance(m, (nn.Conv, layers.QuantConv))]
  dense = [(p, m) for p, m in calls if isinstance(m, nn.Dense)]
  assert len(convs) == CONV_COUNTS[name]
  # One full-precision fully connected layer (plain nn.Dense).
  assert [p for p, _ in dense] == [classifier]
  assert type(dense[0][1]) is nn.Dense  # pylint: disable=unidiomatic-typecheck
  assert convs[0][0] == stem  # The stem is the first convolution.
  for path, module in convs:
    assert isinstance(module, layers.QuantConv), path
    if path == stem:
      assert (module.bits_w, module.bits_a) == (32, 32), path
      assert not module.pointwise_as_dot
    else:
      assert (module.bits_w, module.bits_a) == (4, 5), path
      assert module.pointwise_as_dot
  assert sum(path == stem for path, _ in convs) == 1
  # The shortcut convolutions (and in MobileNetV2 the depthwise ones and the
  # final 1x1) are among the quantized ones.
  paths = [p for p, _ in convs]
  if name == 'mobilenet_v2':
    assert ('features_2', 'conv_1_0') in paths  # Depthwise.
    assert ('features_18_0',) in paths
  else:
    assert ('layer2_0', 'downsample_0') in paths


# --------------------------------------------------------------------------
# Numerics on small images.
# --------------------------------------------------------------------------

# (name, image size) of the models that are actually run.
RUN_MODELS = [('resnet18', 32), ('mobilenet_v2', 32), ('small_resnet', 28)]


@functools.lru_cache(maxsize=None)
def _run(name, px, variant):
  """Runs a model in inference mode on random variables; cached.

  Args:
    name: model name.
    px: image size.
    variant: 'quant32' (QuantConv at 32 bits), 'float' (FloatConv) or
      'quant4' (QuantConv at 4 bits).

  Returns:
    ``(logits, features)``.
  """
  kwargs = {
      'quant32': {},
      'float': {'conv': FloatConv},
      'quant4': {'bits_w': 4, 'bits_a': 4},
  }[variant]
  model = models.create_model(name, num_classes=10, **kwargs)
  x = _images(px)
  # The same variables for all variants: the param trees are identical.
  variables = _random_variables(
      _shapes(models.create_model(name, num_classes=10), x))
  return jax.jit(functools.partial(model.apply, train=False))(variables, x)


# Bottleneck blocks (ResNet-50/101/152) are only traced elsewhere; run one.
@pytest.mark.parametrize('name,px', RUN_MODELS + [('resnet50', 32)])
def test_bits_32_equals_full_precision_conv(name, px):
  logits, features = _run(name, px, 'quant32')
  ref_logits, ref_features = _run(name, px, 'float')
  assert np.all(np.isfinite(logits))
  np.testing.assert_array_equal(logits, ref_logits)
  np.testing.assert_array_equal(features['pooled'], ref_features['pooled'])
  for tap, ref_tap in zip(features['taps'], ref_features['taps']):
    np.testing.assert_array_equal(tap, ref_tap)


# resnet18 would add nothing to small_resnet (same blocks) but compile time.
@pytest.mark.parametrize('name,px', RUN_MODELS[1:])
def test_bits_4_differs(name, px):
  logits, features = _run(name, px, 'quant32')
  q_logits, q_features = _run(name, px, 'quant4')
  assert np.all(np.isfinite(q_logits))
  scale = np.max(np.abs(logits))
  assert np.max(np.abs(q_logits - logits)) > 1e-3 * scale
  # Already the first tap (after quantized convs) differs.
  assert np.max(np.abs(q_features['taps'][0] - features['taps'][0])) > 1e-3


@pytest.mark.parametrize('name,px', RUN_MODELS[1:])
def test_speed_switches_leave_the_network_unchanged(name, px):
  # pointwise_as_dot (1x1 and strided 1x1 shortcuts), depthwise_as_shifts
  # (MobileNetV2) and fused_vjp: same logits, same gradients.
  x = _images(px)
  switches = dict(pointwise_as_dot=True, depthwise_as_shifts=True,
                  fused_vjp=True)
  plain = models.create_model(name, num_classes=10, bits_w=4, bits_a=4)
  fast = models.create_model(name, num_classes=10, bits_w=4, bits_a=4,
                             conv_kwargs=switches)
  variables = _random_variables(_shapes(plain, x))

  def loss_and_grad(model):
    def loss(params):
      logits, _ = model.apply(dict(variables, params=params), x, train=False)
      return jnp.sum(logits * jnp.arange(10.0))
    return jax.jit(jax.value_and_grad(loss))(variables['params'])

  (value, grads), (fast_value, fast_grads) = map(loss_and_grad, (plain, fast))
  np.testing.assert_allclose(fast_value, value, rtol=1e-4)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=0, atol=1e-3 * scale), fast_grads, grads)


def test_train_updates_batch_stats():
  model = models.create_model('small_resnet', num_classes=10, bits_w=4,
                              bits_a=4)
  x = _images(28, batch=4)
  variables = _random_variables(_shapes(model, x))

  @jax.jit
  def train_step(variables, x):
    (_, _), state = model.apply(
        variables, x, train=True, mutable=['batch_stats', 'intermediates'],
        capture_intermediates=lambda m, _: m.path == ('conv1',))
    return state

  state = train_step(variables, x)
  new_stats = state['batch_stats']
  assert (jax.tree.structure(new_stats) ==
          jax.tree.structure(variables['batch_stats']))
  for old, new in zip(jax.tree.leaves(variables['batch_stats']),
                      jax.tree.leaves(new_stats)):
    assert not np.allclose(old, new)
  # PyTorch's momentum 0.1: new = 0.9 * old + 0.1 * batch mean (of the stem
  # convolution's output for bn1).
  (stem_out,) = state['intermediates']['conv1']['__call__']
  expected_mean = (0.9 * variables['batch_stats']['bn1']['mean'] +
                   0.1 * np.mean(stem_out, axis=(0, 1, 2)))
  np.testing.assert_allclose(new_stats['bn1']['mean'], expected_mean,
                             rtol=1e-5, atol=1e-6)


def test_mobilenet_v2_train_mode_traces_with_dropout_rng():
  model = models.create_model('mobilenet_v2', num_classes=10)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  shapes = _shapes(model, x)
  (logits, _), state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                               rngs={'dropout': jax.random.key(1)}),
      shapes, x)
  assert logits.shape == (2, 10)
  assert (jax.tree.structure(state['batch_stats']) ==
          jax.tree.structure(shapes['batch_stats']))
