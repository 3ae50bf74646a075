"""jaxpr_onnx: JAX functions as ONNX, run by onnxruntime against JAX."""

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from onnx import TensorProto
import onnxruntime
import pytest

from dtq_jax.deploy import jaxpr_onnx
from dtq_jax.infra import errors
from dtq_jax import quant
from examples import networks

SHAPE = (6, 6, 2)
_RNG = np.random.default_rng(0)
VARIABLES = {
    'params': {
        'dense': {'kernel': _RNG.normal(size=(72, 5)).astype(np.float32)},
        'conv': {'kernel': _RNG.normal(size=(3, 3, 2, 4)).astype(np.float32),
                 'grouped': _RNG.normal(size=(4, 1, 3, 3)).astype(
                     np.float32)},
        'proj': _RNG.normal(size=(3, 2)).astype(np.float32),
    },
}


def _session(model):
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # Not the notes on unused variables.
  return onnxruntime.InferenceSession(model.SerializeToString(), options,
                                      providers=['CPUExecutionProvider'])


def _images(n, shape=SHAPE, seed=1):
  return np.random.default_rng(seed).normal(size=(n, *shape)).astype(
      np.float32)


def _compare(fn, variables, shape=SHAPE, rtol=1e-5, atol=1e-5):
  """Converts ``fn`` and checks it against JAX at batch 1 and 3."""
  model = jaxpr_onnx.convert(fn, variables, shape)
  session, jitted = _session(model), jax.jit(fn)
  for n in (1, 3):
    x = _images(n, shape)
    (got,) = session.run(None, {'images': x})
    np.testing.assert_allclose(got, jitted(variables, x), rtol=rtol,
                               atol=atol, err_msg=f'batch {n}')
  return model


def _flat(f):
  """``f(v, x)`` returning any (N, ...) array(s), as (N, K) logits."""
  def fn(v, x):
    outs = f(v, x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return jnp.concatenate([o.reshape(x.shape[0], -1).astype(jnp.float32)
                            for o in outs], axis=1)
  return fn


def _halves(x):
  return jnp.round(x * 4) / 2  # Ties for every rounding mode.


CASES = {
    'unary': lambda v, x: (
        jnp.exp(x), jnp.log(jnp.abs(x) + 1), jnp.sqrt(jnp.abs(x)),
        lax.rsqrt(jnp.abs(x) + 1), jnp.tanh(x), jax.nn.sigmoid(x),
        lax.erf(x), lax.erfc(x), jnp.sign(x), -x, jnp.floor(x), jnp.ceil(x),
        jnp.square(x), x**3, (jnp.abs(x) + 1)**-3, jnp.abs(x)**2.5,
        jnp.log1p(jnp.abs(x)), jnp.expm1(x), jnp.sin(x), jnp.exp2(x),
        jnp.arctan(x)),
    'activations': lambda v, x: (
        jax.nn.gelu(x), jax.nn.gelu(x, approximate=False),
        jax.nn.softplus(x), jax.nn.relu(x), jax.nn.silu(x), jax.nn.relu6(x),
        jax.nn.softmax(x, axis=-1), jax.nn.log_softmax(x, axis=(1, 2))),
    'compare_select': lambda v, x: (
        jnp.where(x > 0.5, x, jnp.maximum(x, -0.5)), jnp.minimum(x, 0.2),
        ((x >= 0) & (x < 1)) | (x == x[:, :1]), x != 0.1, ~(x <= 0),
        jnp.clip(x, -1, 1), lax.clamp(jnp.broadcast_to(x[:, :1], x.shape), x,
                  jnp.broadcast_to(x[:, 1:2], x.shape) + 1),
        jnp.fmod(x, 0.7), jnp.isfinite(x / (x > 0)),
        lax.select_n((x > 0).astype(jnp.int32) + (x > 1), x, 2 * x, 3 * x)),
    'round': lambda v, x: (
        jnp.round(_halves(x)), lax.round(_halves(x),
                                         lax.RoundingMethod.AWAY_FROM_ZERO),
        lax.round(x, lax.RoundingMethod.AWAY_FROM_ZERO),
        quant.round_ste(_halves(x))),
    'integers': lambda v, x: (
        (x * 10).astype(jnp.int32) // 3, (x * 10).astype(jnp.int32) % 4,
        ((x * 10).astype(jnp.int32) & 7) | 1, ~(x * 10).astype(jnp.int8),
        (x * 10).astype(jnp.int32) ^ 5, (x > 0).astype(jnp.uint8) * 200),
    'reductions': lambda v, x: (
        x.sum((1, 2)), x.max(axis=(1, 3)), x.min(1), jnp.prod(x * 0.1 + 1, 2),
        x.mean(0, keepdims=True) + 0 * x, jnp.argmax(x, -1),
        jnp.argmin(x, 1), jnp.all(x > -1, axis=1), jnp.any(x > 2, axis=2),
        x * x.shape[0], x / x.size),
    'shapes': lambda v, x: (
        x.transpose(0, 3, 1, 2), jnp.concatenate([x, -x], 2),
        x[:, 1:5:2, ::3], lax.pad(x, 0.5, ((0, 0, 0), (1, -2, 0),
                                           (0, 0, 0), (2, 1, 0))),
        jnp.flip(x, (1, 3)), jnp.split(x, [1], axis=1)[1], x[:, 0],
        x[:, :, 2, 1], x[:, :1].squeeze(1), jnp.expand_dims(x, 2),
        x + jnp.arange(2.0), x.reshape(-1, 12).reshape(x.shape) * 2,
        jnp.broadcast_to(x[:, :, :1], x.shape),
        x.reshape(x.shape[0], 2, -1)),
    'dynamic_slice': lambda v, x: (
        lax.dynamic_slice_in_dim(x, (x.sum() > -1e9).astype(jnp.int32) * 5,
                                 3, axis=1),
        lax.dynamic_slice(x, (0, 1, 2, 0), (x.shape[0], 2, 2, 2))),
    'dot_general': lambda v, x: (
        x.reshape(x.shape[0], -1) @ v['params']['dense']['kernel'],
        jnp.einsum('nhwc,nhwd->ncd', x, x),
        jnp.einsum('nhwc,dc->nhwd', x, v['params']['proj']),
        nn.Dense(3).apply({'params': {'kernel': v['params']['proj'].T,
                                      'bias': jnp.ones(3)}}, x)),
    'conv': lambda v, x: (
        lax.conv_general_dilated(
            x, v['params']['conv']['kernel'], (2, 1), ((1, 0), (2, 1)),
            rhs_dilation=(1, 2), dimension_numbers=('NHWC', 'HWIO', 'NHWC')),
        lax.conv_general_dilated(
            x.transpose(0, 3, 1, 2), v['params']['conv']['grouped'], (1, 1),
            'SAME', feature_group_count=2,
            dimension_numbers=('NCHW', 'OIHW', 'NCHW')),
        nn.Conv(4, (3, 3), strides=2, feature_group_count=2).apply(
            {'params': {'kernel': v['params']['conv']['kernel'][:, :, :1],
                        'bias': jnp.arange(4.0)}}, x)),
    'pooling': lambda v, x: (
        nn.max_pool(x, (2, 2), strides=(2, 2)),
        nn.max_pool(x, (3, 3), padding='SAME'),
        nn.avg_pool(x, (2, 3), strides=(1, 2), padding=((1, 0), (0, 1))),
        lax.reduce_window(x, jnp.inf, lax.min, (1, 2, 2, 1), (1, 1, 2, 1),
                          ((0, 0), (1, 1), (0, 1), (0, 0))),
        lax.reduce_window(x, -jnp.inf, lambda a, b: jnp.maximum(a, b),
                          (1, 3, 1, 1), (1, 1, 1, 1), 'VALID'),
        lax.reduce_window(x[:, :, :, 0], 0.0, lax.add, (1, 2, 2), (1, 1, 1),
                          'SAME')),
    'nested': lambda v, x: jax.jit(lambda y: jax.checkpoint(
        lambda z: jnp.sin(z) * 2)(y) + jax.jit(jnp.cos)(y))(x),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_case_matches_jax(name):
  _compare(_flat(CASES[name]), VARIABLES)


def test_quantizers_rounding_converts_exactly():
  # quant.round_half_even on ties, their neighbours and values that round to
  # zero: ONNX Runtime must give XLA's values exactly. Not the sign of a
  # zero: ONNX Runtime's Where returns +0.0 for a selected -0.0 (the
  # quantizers add their range's lower end to it, which erases the sign).
  def fn(v, x):
    del v
    values = jnp.concatenate([_halves(x), x, 0.3 * x, _halves(x) + 2.0**-20,
                              _halves(x) - 2.0**-20], axis=1)
    return quant.round_half_even(values).reshape(x.shape[0], -1)

  session = _session(jaxpr_onnx.convert(fn, VARIABLES, SHAPE))
  x = _images(3)
  (got,) = session.run(None, {'images': x})
  want = np.asarray(jax.jit(fn)(VARIABLES, x))
  np.testing.assert_array_equal(got, want)


def test_nested_jit_is_inlined():
  model = _compare(_flat(CASES['nested']), VARIABLES)
  ops = {n.op_type for n in model.graph.node}
  assert {'Sin', 'Cos', 'Mul', 'Add'} <= ops


def test_batch_is_symbolic():
  model = _compare(_flat(CASES['reductions']), VARIABLES)
  (inp,) = model.graph.input
  (out,) = model.graph.output
  assert inp.name == 'images' and out.name == 'logits'
  assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim
         ] == ['N', *SHAPE]
  assert out.type.tensor_type.shape.dim[0].dim_param == 'N'
  names = {i.name for i in model.graph.initializer}
  assert {'params/dense/kernel', 'params/conv/kernel', 'params/proj'} <= names


@pytest.mark.parametrize('cls, kwargs', [
    (networks.VGG, dict(stage_widths=(4, 8), convs_per_stage=(1, 2))),
    (networks.EfficientNetLike, dict(
        stem_width=4, stage_widths=(4, 8), blocks_per_stage=(1, 2),
        stage_strides=(1, 2), expand_ratios=(1, 2), head_width=8)),
    (networks.ConvNeXtLike, dict(stage_widths=(4, 8), blocks_per_stage=(1, 1),
                                 layer_scale_init=0.5)),
])
def test_example_network_matches_jax(cls, kwargs):
  model = cls(num_classes=3, **kwargs)
  shape = (12, 12, 1)
  # Random values of the variables' shapes (model.init would compile for
  # seconds); BatchNorm's running variances positive, away from 1.
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))
  rng = np.random.default_rng(2)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, a: (rng.uniform(0.5, 2, a.shape) if path[-1].key == 'var'
                       else rng.normal(0, 0.5, a.shape)).astype(a.dtype),
      abstract)
  _compare(lambda v, x: model.apply(v, x, train=False), variables, shape,
           atol=1e-6)


def _quantized(v, x):
  """A 4-bit-weight, 8-bit-activation convolution from integer codes."""
  w = v['int_weights']['conv']
  kernel = quant.dequantize(w['codes'], 4, w['lo'], w['hi'])
  r = v['quant_ranges']['conv']
  x = quant.fake_quant_range(x, 8, r['lo'], r['hi'])
  y = lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                               dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return quant.fake_quant(jax.nn.relu(y), 8).reshape(x.shape[0], -1)


QUANT_VARIABLES = {
    'int_weights': {'conv': {
        'codes': _RNG.integers(0, 16, size=(3, 3, 2, 4)).astype(np.uint8),
        'lo': np.full((1, 1, 1, 4), -0.5, np.float32),
        'hi': np.linspace(0.1, 0.6, 4, dtype=np.float32).reshape(1, 1, 1, 4)}},
    'quant_ranges': {'conv': {'lo': np.float32(-1.5), 'hi': np.float32(2.0)}},
}


def test_fake_quantized_function_keeps_integer_codes():
  model = jaxpr_onnx.convert(_quantized, QUANT_VARIABLES, SHAPE)
  inits = {i.name: i for i in model.graph.initializer}
  # Codes below 16 are stored as UINT4, and cast to float32 in the graph.
  assert inits['int_weights/conv/codes'].data_type == TensorProto.UINT4
  casts = [n for n in model.graph.node if n.op_type == 'Cast' and
           n.input[0] == 'int_weights/conv/codes']
  assert [a.i for n in casts for a in n.attribute] == [TensorProto.FLOAT]
  session = _session(model)
  for n in (1, 3):
    x = _images(n)
    (got,) = session.run(None, {'images': x})
    want = np.asarray(jax.jit(_quantized)(QUANT_VARIABLES, x))
    # The graph is the jaxpr's arithmetic, float32 op for op. The
    # convolution sums in another order, so the dynamic range's ends (and
    # every value through them) may move by an ulp, and a value within an
    # ulp of a rounding tie could move one step: allowed for 1% of values,
    # never seen on these inputs (all agree to ~1e-6).
    differ = ~np.isclose(got, want, rtol=1e-5, atol=1e-5)
    assert differ.mean() <= 0.01, differ.sum()
    step = (want.max() - want.min()) / 255
    np.testing.assert_array_less(np.abs(got - want), step * 1.01 + 1e-5)


def test_uint8_codes_of_16_and_more_stay_uint8():
  variables = {'codes': np.arange(20, dtype=np.uint8).reshape(4, 5)}
  model = _compare(lambda v, x: x.reshape(x.shape[0], -1)[:, :5] + (
      v['codes'].astype(jnp.float32).sum(0) + (v['codes'] // 3).sum(0)),
                   variables)
  (init,) = model.graph.initializer[:1]
  assert init.name == 'codes' and init.data_type == TensorProto.UINT8


def test_uint4_codes_used_as_integers_get_a_uint8_cast():
  variables = {'codes': np.arange(10, dtype=np.uint8).reshape(2, 5)}
  model = _compare(lambda v, x: x.reshape(x.shape[0], -1)[:, :5] * (
      v['codes'] + 1).sum(0).astype(jnp.float32), variables)
  assert model.graph.initializer[0].data_type == TensorProto.UINT4


def test_unsupported_operation_is_refused_on_one_line():
  with pytest.raises(jaxpr_onnx.UnsupportedOperation) as e:
    jaxpr_onnx.convert(lambda v, x: lax.sort(x.reshape(x.shape[0], -1)),
                       {}, SHAPE)
  message = str(e.value)
  assert "the operation 'sort' has no ONNX translation" in message
  assert '\n' not in message and '--format stablehlo' in message
  assert isinstance(e.value, ValueError)


class _Block(nn.Module):

  @nn.compact
  def __call__(self, x):
    return jnp.cumsum(nn.Dense(3)(x), axis=1)


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(2, (3, 3), name='stem')(x).reshape(x.shape[0], -1)
    return nn.Sequential([_Block(name='block3')], name='features')(x)


def test_refusal_names_the_module():
  net = _Net()
  variables = net.init(jax.random.PRNGKey(0), jnp.zeros((1, *SHAPE)))
  with pytest.raises(jaxpr_onnx.UnsupportedOperation,
                     match=r"'cumsum' \(in \S*features/block3\)"):
    jaxpr_onnx.convert(net.apply, variables, SHAPE)


def test_first_unsupported_in_program_order():
  def fn(v, x):
    y = jnp.cumsum(x.reshape(x.shape[0], -1), axis=1)
    return lax.sort(y)
  with pytest.raises(jaxpr_onnx.UnsupportedOperation, match="'cumsum'"):
    jaxpr_onnx.convert(fn, {}, SHAPE)


def test_lhs_dilation_is_refused():
  def fn(v, x):
    y = lax.conv_general_dilated(x, v['k'], (1, 1), ((0, 0), (0, 0)),
                                 lhs_dilation=(2, 2),
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y.reshape(x.shape[0], -1)
  with pytest.raises(jaxpr_onnx.UnsupportedOperation,
                     match="'conv_general_dilated'.*lhs_dilation"):
    jaxpr_onnx.convert(fn, {'k': np.ones((2, 2, 2, 1), np.float32)}, SHAPE)


def test_output_must_be_batch_by_classes():
  with pytest.raises(errors.UserError, match='float32 \\(N, K\\)'):
    jaxpr_onnx.convert(lambda v, x: x, {}, SHAPE)


def test_batch_dependent_function_is_a_user_error():
  def fn(v, x):
    return x.reshape(x.shape[0], -1) if x.shape[0] > 2 else x[:, 0, 0]
  with pytest.raises(errors.UserError, match='batch size'):
    jaxpr_onnx.convert(fn, {}, SHAPE)
