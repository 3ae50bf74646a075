"""Tests for dtq_jax.layers.QuantConv against references written here."""

import re
import warnings

import flax.linen as nn
import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np
import pytest

from dtq_jax import layers
from dtq_jax import quant

DIMS = ('NHWC', 'HWIO', 'NHWC')


def np_fake_quant(x, bits, axis=None):
  """Reference min-max quantizer of docs/method.md, in float32 NumPy.

  Args:
    x: array.
    bits: bit width (32: identity).
    axis: None for one range per tensor, or the axis that keeps its own range.

  Returns:
    ``round((x - lo) / s) * s + lo`` with ``s = (hi - lo) / (2**bits - 1)``;
    float32 arithmetic throughout, as the implementation uses.
  """
  x = np.asarray(x, np.float32)
  if bits == 32:
    return x
  if axis is None:
    reduce_axes = None
  else:
    reduce_axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
  lo = x.min(axis=reduce_axes, keepdims=True)
  hi = x.max(axis=reduce_axes, keepdims=True)
  s = (hi - lo) / np.float32(2**bits - 1)
  q = np.round((x - lo) / s) * s + lo
  return q.astype(np.float32)


def ref_conv(x, kernel, bias, strides, padding, groups):
  """Plain ``lax.conv_general_dilated`` (PyTorch-style symmetric int pad)."""
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  y = jax.lax.conv_general_dilated(
      jnp.asarray(x), jnp.asarray(kernel), window_strides=strides,
      padding=padding, dimension_numbers=DIMS, feature_group_count=groups)
  if bias is not None:
    y = y + bias
  return np.asarray(y)


def _inputs(shape=(2, 9, 9, 4), seed=0):
  # NumPy, not jax.random: eager jax.random compiles one program per shape.
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


def _random_variables(module, x, seed=1):
  """Variables of ``module`` filled with NumPy random values.

  Shapes come from ``jax.eval_shape``; the values are drawn in NumPy because
  Flax's eager initialisers compile one XLA program per shape, which would
  dominate the run time of these small tests. Kernels get a fan-in scale and
  biases are non-zero so that a missing bias would show.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)

  def draw(path, s):
    name = path[-1].key
    if name == 'kernel':
      fan_in = np.prod(s.shape[:-1])
      return (rng.normal(size=s.shape) / np.sqrt(fan_in)).astype(np.float32)
    return rng.normal(scale=0.5, size=s.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _init_apply(module, x, seed=1):
  variables = _random_variables(module, x, seed)
  return variables, module.apply(variables, x)


# (features, kernel, strides, padding, groups, use_bias, bits_w, bits_a)
QUANT_CASES = [
    (6, (3, 3), (1, 1), 1, 1, False, 4, 4),
    (6, (3, 3), (2, 2), 1, 1, True, 5, 4),
    (6, (1, 1), (1, 1), 0, 1, False, 4, 5),
    (6, (1, 1), (2, 2), 0, 1, False, 4, 4),
    (6, (3, 3), (2, 2), 'SAME', 1, True, 4, 4),
    (6, (3, 3), (1, 1), 'VALID', 1, False, 2, 8),
    (6, (3, 3), (1, 1), 32, 1, False, 4, 32),  # Replaced below: see ids.
    (4, (3, 3), (1, 1), 1, 4, False, 4, 4),  # Depthwise.
    (8, (3, 3), (2, 2), 1, 4, False, 5, 5),  # Depthwise, multiplier 2.
    (6, (3, 3), (1, 1), 1, 2, True, 4, 4),  # Grouped.
]
# A 32-bit kernel with quantized input (and vice versa) must still work.
QUANT_CASES[6] = (6, (3, 3), (1, 1), 1, 1, False, 32, 4)
QUANT_CASES.append((6, (3, 3), (1, 1), 1, 1, False, 4, 32))


@pytest.mark.parametrize(
    'features,kernel_size,strides,padding,groups,use_bias,bits_w,bits_a',
    QUANT_CASES)
def test_matches_reference_on_quantized_operands(
    features, kernel_size, strides, padding, groups, use_bias, bits_w,
    bits_a):
  x = _inputs()
  conv = layers.QuantConv(
      features, kernel_size, strides, padding, feature_group_count=groups,
      use_bias=use_bias, bits_w=bits_w, bits_a=bits_a)
  variables, y = _init_apply(conv, x)
  params = variables['params']
  expected = ref_conv(np_fake_quant(x, bits_a),
                      np_fake_quant(params['kernel'], bits_w),
                      params.get('bias'), strides, padding, groups)
  assert y.shape == expected.shape
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  if bits_w != 32 or bits_a != 32:
    # The quantization is visible (not silently skipped).
    unquantized = ref_conv(x, params['kernel'], params.get('bias'), strides,
                           padding, groups)
    assert np.max(np.abs(unquantized - expected)) > 1e-3


def test_per_output_channel_weight_range():
  x = _inputs()
  conv = layers.QuantConv(6, (3, 3), padding=1, use_bias=False, bits_w=3,
                          bits_a=4, weight_range_axis=-1)
  # Scale output channels differently so per-channel ranges matter.
  variables = _random_variables(conv, x)
  kernel = variables['params']['kernel'] * np.arange(1.0, 7.0, dtype=np.float32)
  variables = {'params': {'kernel': kernel}}
  y = conv.apply(variables, x)
  expected = ref_conv(np_fake_quant(x, 4), np_fake_quant(kernel, 3, axis=-1),
                      None, (1, 1), 1, 1)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  per_tensor = ref_conv(np_fake_quant(x, 4), np_fake_quant(kernel, 3), None,
                        (1, 1), 1, 1)
  assert np.max(np.abs(per_tensor - expected)) > 1e-3


def test_init_like_flax_conv():
  # Same names, shapes and, for the same rng, values as flax.linen.Conv.
  x = jnp.zeros((1, 8, 8, 4))
  rng = jax.random.key(3)
  # Eager, not jitted: the second init reuses the first one's compiled
  # primitives (same shapes), so only one initialisation is paid for.
  ours_vars = layers.QuantConv(6, (3, 3), bits_w=4, bits_a=4).init(rng, x)
  theirs_vars = nn.Conv(6, (3, 3)).init(rng, x)
  assert jax.tree.structure(ours_vars) == jax.tree.structure(theirs_vars)
  jax.tree.map(np.testing.assert_array_equal, ours_vars, theirs_vars)
  assert ours_vars['params']['kernel'].shape == (3, 3, 4, 6)
  assert ours_vars['params']['bias'].shape == (6,)


@pytest.mark.parametrize('features,kernel_size,groups,use_bias', [
    (6, (3, 3), 1, False),
    (8, (1, 1), 4, False),
    (4, (3, 3), 4, True),
    (5, (7, 7), 1, True),
])
def test_param_shapes_like_flax_conv(features, kernel_size, groups, use_bias):
  x = jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.float32)
  ours = layers.QuantConv(features, kernel_size, feature_group_count=groups,
                          use_bias=use_bias, bits_w=4, bits_a=4)
  theirs = nn.Conv(features, kernel_size, feature_group_count=groups,
                   use_bias=use_bias)
  rng = jax.random.key(3)
  ours_shapes = jax.eval_shape(ours.init, rng, x)
  assert ours_shapes == jax.eval_shape(theirs.init, rng, x)
  assert ours_shapes['params']['kernel'].shape == (
      kernel_size + (4 // groups, features))
  assert ('bias' in ours_shapes['params']) == use_bias


# (features, kernel, strides, padding, groups, use_bias)
FLOAT_CASES = [
    (6, (3, 3), (1, 1), 1, 1, True),
    (6, (3, 3), (2, 2), 1, 1, False),
    (6, (3, 3), (2, 2), 'SAME', 1, True),
    (6, (5, 5), (1, 1), 'VALID', 1, False),
    (6, (1, 1), (2, 2), 0, 1, False),
    (6, (3, 3), (1, 1), ((1, 2), (0, 1)), 1, True),
    (4, (3, 3), (2, 2), 1, 4, False),
]


@pytest.mark.parametrize('features,kernel_size,strides,padding,groups,use_bias',
                         FLOAT_CASES)
def test_bits_32_equals_flax_conv(features, kernel_size, strides, padding,
                                  groups, use_bias):
  x = _inputs()
  kwargs = dict(strides=strides, padding=padding, feature_group_count=groups,
                use_bias=use_bias)
  ours = layers.QuantConv(features, kernel_size, bits_w=32, bits_a=32,
                          **kwargs)
  theirs = nn.Conv(features, kernel_size, **kwargs)
  variables, y = _init_apply(ours, x)
  expected = theirs.apply(variables, x)
  np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize('args,kwargs', [
    ((6, (3, 3), 2), {}),  # strides as one int, as nn.Conv takes it
    ((6, (3, 3), (1, 1), 'SAME', 1, 2), {}),  # nn.Conv's positional order
    ((6, (3, 3)), dict(kernel_dilation=(2, 1), padding='VALID')),
    ((6, (3, 3)), dict(input_dilation=2, strides=2, padding=1)),
])
def test_drop_in_for_flax_conv_arguments(args, kwargs):
  x = _inputs()
  ours = layers.QuantConv(*args, bits_w=32, bits_a=32, **kwargs)
  theirs = nn.Conv(*args, **kwargs)
  variables, y = _init_apply(ours, x)
  np.testing.assert_array_equal(y, theirs.apply(variables, x))
  # Quantized, against lax on the quantized operands; the rewrites (asked
  # for) must step aside for dilated convolutions.
  quantized = layers.QuantConv(*args, bits_w=4, bits_a=5, pointwise_as_dot=True,
                               depthwise_as_shifts=True, **kwargs)
  variables, y = _init_apply(quantized, x)
  expected = theirs.apply(
      {'params': {'kernel': np_fake_quant(variables['params']['kernel'], 4),
                  'bias': variables['params']['bias']}},
      np_fake_quant(x, 5))
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_not_two_dimensional_is_an_error():
  with pytest.raises(ValueError, match=r'strides=\(1, 1, 1\).*2-D'):
    _init_apply(layers.QuantConv(6, (3, 3), strides=(1, 1, 1)), _inputs())


def _assert_same_function(module, rewritten, x, seed=1):
  """Same outputs, and same gradients for the input and every parameter."""
  variables, y = _init_apply(module, x, seed)
  np.testing.assert_allclose(rewritten.apply(variables, x), y, rtol=1e-5,
                             atol=1e-5)
  g = _inputs(y.shape, seed=seed + 1)

  def grads(m):
    return jax.jit(jax.grad(lambda v, x: jnp.sum(g * m.apply(v, x)),
                            argnums=(0, 1)))(variables, x)

  # Float32 summation order differs. The input's min and max elements also
  # get the range term, a sum over the whole tensor: there the difference
  # reaches ~1e-4 of the gradient's scale; a wrong rewrite is off by O(1).
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(
          a, b, rtol=1e-4, atol=1e-3 * float(np.max(np.abs(b)))),
      grads(rewritten), grads(module))


@pytest.mark.parametrize('bits,padding,use_bias,strides,size', [
    (4, 0, False, (1, 1), 7),
    (4, 'SAME', True, (1, 1), 7),
    (5, 'VALID', False, (1, 1), 7),
    (32, 0, True, (1, 1), 7),
    (4, ((0, 0), (0, 0)), False, (1, 1), 7),
    (4, 0, False, (2, 2), 8),  # ResNet's downsample shortcut.
    (4, 'SAME', False, (2, 2), 7),  # Odd size: ceil(7 / 2) outputs.
    (5, 'VALID', True, (2, 1), 7),
])
def test_pointwise_as_dot_matches_conv(bits, padding, use_bias, strides, size):
  x = _inputs((2, size, size, 16))
  kwargs = dict(padding=padding, use_bias=use_bias, bits_w=bits, bits_a=bits,
                strides=strides)
  _assert_same_function(
      layers.QuantConv(24, (1, 1), **kwargs),
      layers.QuantConv(24, (1, 1), pointwise_as_dot=True, **kwargs), x)


@pytest.mark.parametrize('kernel_size,padding,groups', [
    ((3, 3), 0, 1),  # Not 1x1.
    ((1, 1), 1, 1),  # Padded.
    ((1, 1), 0, 4),  # Grouped.
])
def test_pointwise_as_dot_leaves_other_convs_alone(kernel_size, padding,
                                                   groups):
  x = _inputs((2, 8, 8, 8))
  kwargs = dict(padding=padding, feature_group_count=groups,
                use_bias=False, bits_w=4, bits_a=4)
  conv = layers.QuantConv(8, kernel_size, **kwargs)
  dot = layers.QuantConv(8, kernel_size, pointwise_as_dot=True, **kwargs)
  variables, y = _init_apply(conv, x)
  np.testing.assert_array_equal(dot.apply(variables, x), y)


@pytest.mark.parametrize('kernel,strides,padding,size,bits,use_bias', [
    ((3, 3), (1, 1), 1, 8, 4, False),  # MobileNetV2's stride-1 blocks.
    ((3, 3), (2, 2), 1, 8, 4, False),  # Its stride-2 ones (even size).
    ((3, 3), (2, 2), 1, 7, 5, True),
    ((3, 3), (2, 2), 'SAME', 9, 4, False),
    ((5, 3), (1, 2), ((2, 1), (0, 1)), 9, 32, True),
    ((3, 3), (1, 1), 'VALID', 6, 4, False),
])
def test_depthwise_as_shifts_matches_grouped_conv(kernel, strides, padding,
                                                  size, bits, use_bias):
  x = _inputs((2, size, size, 6))
  kwargs = dict(strides=strides, padding=padding, feature_group_count=6,
                use_bias=use_bias, bits_w=bits, bits_a=bits)
  _assert_same_function(
      layers.QuantConv(6, kernel, **kwargs),
      layers.QuantConv(6, kernel, depthwise_as_shifts=True, **kwargs), x)


@pytest.mark.parametrize('features,groups', [
    (12, 6),  # Channel multiplier 2.
    (6, 3),  # Two channels per group.
    (6, 1),  # Not grouped.
])
def test_depthwise_as_shifts_leaves_other_convs_alone(features, groups):
  x = _inputs((2, 8, 8, 6))
  kwargs = dict(padding=1, feature_group_count=groups, use_bias=False,
                bits_w=4, bits_a=4)
  conv = layers.QuantConv(features, (3, 3), **kwargs)
  shifts = layers.QuantConv(features, (3, 3), depthwise_as_shifts=True,
                            **kwargs)
  variables, y = _init_apply(conv, x)
  np.testing.assert_array_equal(shifts.apply(variables, x), y)


def _grouped_convolutions(module, x, platform):
  """Grouped convolutions in the student's training step lowered for
  ``platform`` (forward and both gradients), by ``jax.export``."""
  variables, _ = _init_apply(module, x)
  step = jax.jit(jax.grad(lambda v, x: jnp.sum(module.apply(v, x) ** 2),
                          argnums=(0, 1)))
  text = jax_export.export(step, platforms=(platform,))(
      variables, x).mlir_module()
  return len(re.findall(r'feature_group_count = [2-9]', text))


def test_depthwise_platform_choice_is_the_shifts_on_a_cpu_only():
  x = _inputs((2, 9, 9, 6))
  kwargs = dict(strides=2, padding=1, feature_group_count=6, bits_w=4,
                bits_a=4)
  auto = layers.QuantConv(6, (3, 3), depthwise_as_shifts=None, **kwargs)
  # The same function as lax's grouped convolution, gradients included.
  _assert_same_function(layers.QuantConv(6, (3, 3), **kwargs), auto, x)
  # Lowered for a CPU: no grouped convolution is left (the shifts); for a
  # GPU or a TPU: lax's, forward and input gradient (the kernel gradient
  # is a convolution grouped over the batch).
  assert _grouped_convolutions(auto, x, 'cpu') == 0
  lax_count = _grouped_convolutions(layers.QuantConv(6, (3, 3), **kwargs), x,
                                    'cuda')
  assert lax_count >= 2
  for platform in ('cuda', 'tpu'):
    assert _grouped_convolutions(auto, x, platform) == lax_count
  assert _grouped_convolutions(
      layers.QuantConv(6, (3, 3), depthwise_as_shifts=True, **kwargs), x,
      'cuda') == 0


def test_depthwise_as_shifts_takes_true_false_or_none():
  with pytest.raises(ValueError, match=r"depthwise_as_shifts='auto'"):
    _init_apply(layers.QuantConv(6, (3, 3), feature_group_count=6,
                                 depthwise_as_shifts='auto'),
                _inputs((2, 9, 9, 6)))


def test_fused_vjp_conv_matches_autodiff():
  x = _inputs((2, 9, 9, 4))
  kwargs = dict(padding=1, bits_w=4, bits_a=4)
  _assert_same_function(layers.QuantConv(6, (3, 3), **kwargs),
                        layers.QuantConv(6, (3, 3), fused_vjp=True, **kwargs),
                        x)


@pytest.mark.parametrize('size,kernel,stride,pad', [
    (9, 3, 2, 1),
    (8, 3, 2, 1),
    (8, 3, 1, 1),
    (10, 7, 2, 3),
    (7, 1, 2, 0),
])
def test_int_padding_is_pytorch_symmetric(size, kernel, stride, pad):
  # Positive inputs: a quantizer that (wrongly) saw the zero padding would
  # get lo = 0 instead of the input's own minimum.
  x = jnp.asarray(np.random.default_rng(0).uniform(0.5, 2.0,
                                                   (2, size, size, 3)),
                  jnp.float32)
  bits = 4
  conv = layers.QuantConv(5, (kernel, kernel), (stride, stride), padding=pad,
                          use_bias=False, bits_w=bits, bits_a=bits)
  variables, y = _init_apply(conv, x)
  # PyTorch: out = floor((H + 2p - k) / s) + 1, zeros padded on both sides of
  # the (already quantized) input.
  out = (size + 2 * pad - kernel) // stride + 1
  assert y.shape == (2, out, out, 5)
  padded = np.pad(np_fake_quant(x, bits),
                  ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  expected = ref_conv(padded,
                      np_fake_quant(variables['params']['kernel'], bits), None,
                      (stride, stride), 'VALID', 1)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_int_padding_differs_from_same_when_asymmetric():
  # Stride 2 on an even size: 'SAME' pads (0, 1), PyTorch's padding=1 pads
  # (1, 1); same shape, different values.
  x = _inputs((1, 8, 8, 3))
  sym = layers.QuantConv(4, (3, 3), (2, 2), padding=1, use_bias=False)
  same = layers.QuantConv(4, (3, 3), (2, 2), padding='SAME', use_bias=False)
  variables, y_sym = _init_apply(sym, x)
  y_same = same.apply(variables, x)
  assert y_sym.shape == y_same.shape == (1, 4, 4, 4)
  assert np.max(np.abs(y_sym - y_same)) > 1e-3


def test_groups_must_divide_input_channels():
  with pytest.raises(ValueError):
    layers.QuantConv(6, (3, 3), feature_group_count=3).init(
        jax.random.key(0), jnp.zeros((1, 5, 5, 4)))


def test_modules_called_finds_each_convolution_by_its_variable_path():

  class Block(nn.Module):

    @nn.compact
    def __call__(self, x):
      y = layers.QuantConv(4, (3, 3), padding=1, bits_w=4, bits_a=4,
                           name='conv')(x)
      return nn.BatchNorm(use_running_average=True, name='bn')(y)

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x, train=True):
      assert not train  # the default the function passes
      x = layers.QuantConv(2, (1, 1), name='stem')(x)
      x = Block(name='block_0')(x)
      x = Block(name='block_1')(x)
      return nn.Dense(3, name='fc')(x.mean((1, 2)))

  found = layers.modules_called(Net(), (6, 6, 1), layers.QuantConv)
  assert list(found) == ['stem', 'block_0/conv', 'block_1/conv']
  assert found['block_1/conv'].bits_w == 4
  assert found['stem'].bits_w == quant.FULL_PRECISION
  both = layers.modules_called(Net(), (6, 6, 1),
                               (layers.QuantConv, nn.BatchNorm))
  assert list(both) == ['stem', 'block_0/conv', 'block_0/bn', 'block_1/conv',
                        'block_1/bn']
  # The paths are those of the variables.
  params = Net().init(jax.random.key(0), jnp.zeros((1, 6, 6, 1)),
                      train=False)['params']
  for path in found:
    node = params
    for name in path.split('/'):
      node = node[name]
    assert 'kernel' in node


def test_modules_called_with_static_ranges_records_no_variable_objects():
  # The range variables' helper is not a Flax-wrapped method, so the module
  # summary behind modules_called never sees Variable objects as outputs
  # (jax deprecates jnp.shape on them).

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x, train=False):
      del train
      return layers.QuantConv(4, (3, 3), padding=1, bits_w=4, bits_a=4,
                              act_ranges='static', name='conv')(x)

  with warnings.catch_warnings():
    warnings.simplefilter('error')
    found = layers.modules_called(Net(), (6, 6, 1), layers.QuantConv)
  assert list(found) == ['conv']
