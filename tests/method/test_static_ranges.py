"""Static activation ranges: collection, calibration, static evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtq_jax import layers
from dtq_jax.method import static_ranges
from dtq_jax.models import create_model
from dtq_jax import quant

TINY = dict(widths=(4, 8, 8, 8))


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale,
                     jnp.float32)


# --------------------------------------------------------------------------
# quant.fake_quant_range


def test_fake_quant_range_by_hand():
  # lo = -1, hi = 2.75, 4 bits: s = 0.25. Values outside are clipped.
  x = jnp.asarray([-3.0, -1.0, -0.9, 0.13, 1.0, 2.6, 2.75, 9.0])
  expected = np.float32([-1.0, -1.0, -1.0, 0.25, 1.0, 2.5, 2.75, 2.75])
  np.testing.assert_array_equal(quant.fake_quant_range(x, 4, -1.0, 2.75),
                                expected)
  np.testing.assert_array_equal(quant.quantize(x, 4, -1.0, 2.75),
                                [0, 0, 0, 5, 8, 14, 15, 15])


def test_fake_quant_range_with_the_tensor_range_is_fake_quant():
  x = _normal(0, (4, 5, 5, 3))
  lo, hi = quant.tensor_range(x)
  for bits in (2, 4, 5, 8):
    np.testing.assert_allclose(quant.fake_quant_range(x, bits, lo, hi),
                               quant.fake_quant(x, bits), rtol=0, atol=1e-6)


def test_fake_quant_range_gradient_and_constant_range():
  x = jnp.asarray([-2.0, -1.0, 0.3, 1.0, 2.0])
  g = jax.grad(lambda v: jnp.sum(quant.fake_quant_range(v, 4, -1.0, 1.0)))(x)
  # Straight through inside [lo, hi] (bounds included), zero outside.
  np.testing.assert_array_equal(g, [0.0, 1.0, 1.0, 1.0, 0.0])
  y = quant.fake_quant_range(x, 4, 0.5, 0.5)
  np.testing.assert_array_equal(y, np.full(5, 0.5, np.float32))
  g = jax.grad(lambda v: jnp.sum(quant.fake_quant_range(v, 4, 0.5, 0.5)))(x)
  assert np.all(np.isfinite(g))


# --------------------------------------------------------------------------
# QuantConv: defaults unchanged, collection, static mode.


def test_defaults_create_no_range_variables():
  x = _normal(1, (2, 6, 6, 3))
  variables = jax.eval_shape(
      layers.QuantConv(4, (3, 3), bits_w=4, bits_a=4).init,
      jax.random.PRNGKey(0), x)
  assert set(variables) == {'params'}
  assert set(variables['params']) == {'kernel', 'bias'}
  model = create_model('small_resnet', num_classes=3, bits_w=4, bits_a=4,
                       **TINY)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  assert set(variables) == {'params', 'batch_stats'}


@pytest.mark.parametrize('stat', ['minmax', 'mean', 'ema'])
def test_running_range_statistics(stat):
  conv = layers.QuantConv(2, (1, 1), bits_w=4, bits_a=4, range_stat=stat,
                          range_momentum=0.75)
  x0 = jnp.ones((1, 2, 2, 1))
  params = conv.init(jax.random.PRNGKey(0), x0)['params']
  batch_ranges = [(-1.0, 2.0), (-3.0, 1.0), (0.0, 4.0)]
  variables = {'params': params}
  for lo, hi in batch_ranges:
    x = jnp.asarray([lo, hi, 0.5 * (lo + hi), lo]).reshape(1, 2, 2, 1)
    _, state = conv.apply(variables, x, mutable=[layers.RANGES])
    variables = {'params': params, **state}
  r = variables[layers.RANGES]
  los = np.float32([b[0] for b in batch_ranges])
  his = np.float32([b[1] for b in batch_ranges])
  if stat == 'minmax':
    expected = (los.min(), his.max())
  elif stat == 'mean':
    expected = (los.mean(), his.mean())
  else:  # The first batch sets the range, then m * old + (1 - m) * new.
    ema = lambda v: (v[0] * 0.75 + v[1] * 0.25) * 0.75 + v[2] * 0.25
    expected = (ema(los), ema(his))
  np.testing.assert_allclose([r['lo'], r['hi']], expected, rtol=1e-6)
  assert int(r['count']) == 3


def test_full_precision_conv_keeps_no_range():
  x = _normal(2, (2, 4, 4, 3))
  conv = layers.QuantConv(4, (3, 3))
  params = conv.init(jax.random.PRNGKey(0), x)['params']
  _, state = conv.apply({'params': params}, x, mutable=[layers.RANGES])
  assert not state.get(layers.RANGES)


def test_static_mode_uses_the_stored_range():
  x = _normal(3, (2, 5, 5, 3))
  static = layers.QuantConv(4, (3, 3), bits_w=4, bits_a=4,
                            act_ranges='static')
  variables = static.init(jax.random.PRNGKey(0), x)
  assert set(variables[layers.RANGES]) == {'lo', 'hi'}
  params = variables['params']
  ranges = {'lo': jnp.float32(-0.5), 'hi': jnp.float32(1.0)}
  y = static.apply({'params': params, layers.RANGES: ranges}, x)
  ref = jax.lax.conv_general_dilated(
      quant.fake_quant_range(x, 4, -0.5, 1.0),
      quant.fake_quant(params['kernel'], 4), (1, 1), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5)
  # With the batch's own range, static equals the paper's dynamic quantizer.
  lo, hi = quant.tensor_range(x)
  dynamic = layers.QuantConv(4, (3, 3), bits_w=4, bits_a=4)
  np.testing.assert_allclose(
      static.apply({'params': params, layers.RANGES: {
          'lo': lo.reshape(()), 'hi': hi.reshape(())}}, x),
      dynamic.apply({'params': params}, x), rtol=0, atol=1e-5)
  with pytest.raises(Exception, match='lo'):
    static.apply({'params': params}, x)
  with pytest.raises(ValueError, match='act_ranges'):
    layers.QuantConv(4, (3, 3), bits_a=4, act_ranges='fixed').init(
        jax.random.PRNGKey(0), x)


# --------------------------------------------------------------------------
# Models: calibration and static evaluation.


def _apply(model, variables, x, **kwargs):
  # Jitted: eager model code compiles every op on its own.
  return jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, x)


@pytest.fixture(scope='module')
def tiny_model():
  model = create_model('small_resnet', num_classes=3, bits_w=4, bits_a=4,
                       **TINY)
  x = _normal(4, (6, 12, 12, 1))
  # Random variables of the right shapes, without compiling the init.
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(1), x)
  rng = np.random.default_rng(0)

  def fill(path, s):
    name = path[-1].key
    if name == 'var':
      return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), jnp.float32)
    if name == 'scale':
      return jnp.ones(s.shape, jnp.float32)
    return jnp.asarray(rng.normal(size=s.shape) * 0.3, jnp.float32)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  return model, variables, x


def test_calibrate_on_one_batch_reproduces_dynamic_evaluation(tiny_model):
  model, variables, x = tiny_model
  ranges = static_ranges.calibrate(model, variables, [{'image': x}])
  flat = static_ranges.layer_ranges(ranges)
  # Every quantized convolution (not the stem) has a range.
  assert len(flat) == 4 * 2 + 3 and 'conv1' not in flat
  assert all(int(r['count']) == 1 for r in flat.values())
  static = static_ranges.with_act_ranges(model, 'static')
  y_static, _ = _apply(static, dict(variables, quant_ranges=ranges), x)
  y_dynamic, _ = _apply(model, variables, x)
  np.testing.assert_allclose(y_static, y_dynamic, rtol=0, atol=1e-5)
  # On another batch the static ranges make the result batch-independent.
  both = jnp.concatenate([_normal(5, (6, 12, 12, 1)) * 3, x])
  y_both, _ = _apply(static, dict(variables, quant_ranges=ranges), both)
  np.testing.assert_allclose(y_both[6:], y_static, rtol=0, atol=1e-5)


def test_calibrate_mean_over_batches_and_padding_rows(tiny_model):
  model, variables, x = tiny_model
  # Padding rows (mask 0) are replaced by the first row: a huge value there
  # must not widen any range.
  padded = np.array(x)
  padded[-1] = 1e3
  mask = np.ones(6, np.float32)
  mask[-1] = 0
  ranges = static_ranges.calibrate(
      model, variables, [{'image': x}, {'image': padded, 'mask': mask},
                         {'image': x}], num_batches=2, range_stat='mean')
  stem = static_ranges.layer_ranges(ranges)['layer1_0/conv1']
  assert int(stem['count']) == 2
  assert float(stem['hi']) < 100.0


def test_empty_ranges_and_check(tiny_model):
  model, variables, _ = tiny_model
  empty = static_ranges.empty_ranges(model, variables, (12, 12, 1))
  flat = static_ranges.layer_ranges(empty)
  assert len(flat) == 11
  assert all(int(r['count']) == 0 for r in flat.values())
  assert not static_ranges.has_collected_ranges(empty)
  with pytest.raises(ValueError, match='calibrate'):
    static_ranges.check_ranges(empty)
  fp = create_model('small_resnet', num_classes=3, **TINY)
  fp_vars = jax.eval_shape(fp.init, jax.random.PRNGKey(0),
                           jnp.zeros((1, 12, 12, 1)))
  assert static_ranges.empty_ranges(fp, fp_vars, (12, 12, 1)) == {}


def test_training_apply_collects_ranges_and_batch_stats(tiny_model):
  model, variables, x = tiny_model
  collecting = static_ranges.with_act_ranges(model, 'dynamic', 'ema', 0.9)
  ranges = static_ranges.empty_ranges(model, variables, x.shape[1:])
  _, state = _apply(collecting, dict(variables, quant_ranges=ranges), x,
                    train=True, mutable=['batch_stats', 'quant_ranges'])
  assert set(state) == {'batch_stats', 'quant_ranges'}
  assert static_ranges.has_collected_ranges(state['quant_ranges'])


def test_collecting_leaves_the_gradient_unchanged():
  x = _normal(6, (2, 5, 5, 3))
  conv = layers.QuantConv(4, (3, 3), bits_w=4, bits_a=4)
  params = conv.init(jax.random.PRNGKey(0), x)['params']

  def collecting(params, x):
    y, state = conv.apply({'params': params}, x, mutable=[layers.RANGES])
    return jnp.sum(y ** 2), state

  def plain(params, x):
    return jnp.sum(conv.apply({'params': params}, x) ** 2)

  g_collect, state = jax.jit(jax.grad(collecting, (0, 1), has_aux=True))(
      params, x)
  g_plain = jax.jit(jax.grad(plain, (0, 1)))(params, x)
  assert int(state[layers.RANGES]['count']) == 1
  for a, b in zip(jax.tree.leaves(g_collect), jax.tree.leaves(g_plain)):
    np.testing.assert_array_equal(a, b)
