"""QuantConv with learned quantizers (quant.method='lsq' or 'pact', #27).

The references are written here: the expected convolution quantizes its
operands with a NumPy LSQ / LSQ+ / PACT quantizer (docs/method.md, "Learned
quantizers") and convolves them with ``lax``; the starts are LSQ's and
LSQ+'s rules applied by hand to the tensors the student computes.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtq_jax import layers
from dtq_jax import learned_quant
from dtq_jax import quant
from dtq_jax.method import learned_params


def _np_lsq(x, step, bits, signed, offset=0.0):
  """NumPy LSQ (LSQ+ with ``offset``): clip(round((x - b) / s)) * s + b."""
  qn, qp = ((-2**(bits - 1), 2**(bits - 1) - 1) if signed else
            (0, 2**bits - 1))
  x, step, offset = (np.asarray(a, np.float32) for a in (x, step, offset))
  return np.clip(np.round((x - offset) / step), qn, qp) * step + offset


def _np_pact(x, alpha, bits):
  """NumPy PACT: round(clip(x, 0, a) / s) * s with s = a / (2**bits - 1)."""
  x, alpha = np.asarray(x, np.float32), np.float32(alpha)
  s = alpha / np.float32(2**bits - 1)
  return np.round(np.clip(x, 0, alpha) / s) * s


def _conv(x, kernel):
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _lsq_conv(features=4, bits=4, per_channel=False, method='lsq', **kwargs):
  return layers.QuantConv(
      features, (3, 3), use_bias=False, bits_w=bits, bits_a=bits,
      method=method, weight_range_axis=-1 if per_channel else None, **kwargs)


class _TwoConvs(nn.Module):
  """A signed input (the raw images) into conv_a, a ReLU'd one into conv_b."""
  bits: int = 4
  per_channel: bool = False
  method: str = 'lsq'

  @nn.compact
  def __call__(self, x, train=False):
    del train
    x = _lsq_conv(4, self.bits, self.per_channel, self.method,
                  name='conv_a')(x)
    return _lsq_conv(3, self.bits, self.per_channel, self.method,
                     name='conv_b')(nn.relu(x))


def test_minmax_is_the_default_and_has_no_learned_params():
  assert layers.QuantSettings().method == 'minmax'
  conv = layers.QuantConv(4, (3, 3), bits_w=4, bits_a=4)
  params = conv.init(jax.random.PRNGKey(0), jnp.ones((1, 5, 5, 2)))['params']
  assert set(params) == {'kernel', 'bias'}
  settings = layers.QuantSettings(method='lsq')
  assert settings.as_conv_kwargs()['method'] == 'lsq'
  assert settings.kernels_only().method == 'minmax'


@pytest.mark.parametrize('per_channel', [False, True])
def test_model_init_gives_unsigned_placeholders_and_none_at_32_bits(
    per_channel):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 2))
  params = _lsq_conv(per_channel=per_channel).init(
      jax.random.PRNGKey(1), x)['params']
  assert set(params) == {'kernel', layers.STEP_W, layers.STEP_A}
  assert params[layers.STEP_W].shape == ((1, 1, 1, 4) if per_channel else ())
  assert params[layers.STEP_A].shape == ()
  np.testing.assert_allclose(
      params[layers.STEP_W],
      learned_quant.lsq_init_step(params['kernel'], 4, signed=True,
                                  axis=-1 if per_channel else None).reshape(
                                      params[layers.STEP_W].shape))
  weights_only = layers.QuantConv(4, (3, 3), bits_w=4, method='lsq')
  assert set(weights_only.init(jax.random.PRNGKey(1), x)['params']) == {
      'kernel', 'bias', layers.STEP_W}
  teacher = layers.QuantConv(4, (3, 3), method='lsq')
  assert set(teacher.init(jax.random.PRNGKey(1), x)['params']) == {
      'kernel', 'bias'}


@pytest.mark.parametrize('bits', [2, 3, 4])
@pytest.mark.parametrize('per_channel', [False, True])
@pytest.mark.parametrize('with_offset', [False, True])
def test_lsq_conv_matches_reference(bits, per_channel, with_offset):
  rng = np.random.default_rng(bits)
  x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  if not with_offset:
    x = np.abs(x)  # unsigned LSQ is for non-negative inputs.
  kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  step_w = (rng.uniform(0.1, 0.3, size=(1, 1, 1, 4)) if per_channel else
            np.float32(0.2)).astype(np.float32)
  params = {'kernel': kernel, layers.STEP_W: step_w,
            layers.STEP_A: np.float32(0.3)}
  offset = 0.0
  if with_offset:
    offset = np.float32(-0.7)
    params[layers.OFFSET_A] = offset
  got = _lsq_conv(bits=bits, per_channel=per_channel).apply(
      {'params': params}, x)
  expected = _conv(_np_lsq(x, 0.3, bits, signed=False, offset=offset),
                   _np_lsq(kernel, step_w, bits, signed=True))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_every_learned_param_gets_a_finite_nonzero_gradient():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  params = {'kernel': rng.normal(size=(3, 3, 3, 4)).astype(np.float32),
            layers.STEP_W: np.float32(0.3), layers.STEP_A: np.float32(0.2),
            layers.OFFSET_A: np.float32(-0.5)}
  conv = _lsq_conv()
  grads = jax.grad(lambda p: jnp.sum(conv.apply({'params': p}, x)**2))(params)
  for name in (layers.STEP_W, layers.STEP_A, layers.OFFSET_A):
    assert np.isfinite(grads[name]) and grads[name] != 0, name
  # PACT's level: its gradient is the sum over the clipped elements.
  params = {'kernel': params['kernel'], layers.STEP_W: np.float32(0.3),
            layers.ALPHA_A: np.float32(0.8)}
  conv = _lsq_conv(method='pact')
  grads = jax.grad(lambda p: jnp.sum(conv.apply({'params': p}, x)**2))(params)
  for name in (layers.STEP_W, layers.ALPHA_A):
    assert np.isfinite(grads[name]) and grads[name] != 0, name


@pytest.mark.parametrize('bits', [2, 4])
def test_pact_conv_matches_reference(bits):
  rng = np.random.default_rng(bits)
  x = np.abs(rng.normal(size=(2, 6, 6, 3))).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  params = {'kernel': kernel, layers.STEP_W: np.float32(0.2),
            layers.ALPHA_A: np.float32(1.1)}  # clips part of x.
  got = _lsq_conv(bits=bits, method='pact').apply({'params': params}, x)
  expected = _conv(_np_pact(x, 1.1, bits),
                   _np_lsq(kernel, 0.2, bits, signed=True))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_pact_starts_at_the_inputs_maximum_and_exports_as_its_range():
  bits = 3
  model = _TwoConvs(bits, method='pact')
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 6, 2))
  pretrained = learned_params.without_learned(
      model.init(jax.random.PRNGKey(1), images)['params'])
  params = learned_params.init_learned_quant(
      model, {'params': pretrained}, images)['params']
  a, b = params['conv_a'], params['conv_b']
  # The raw images are negative somewhere: LSQ+ as with 'lsq'; after the
  # ReLU: PACT's clipping level instead of LSQ's step.
  assert set(a) == {'kernel', layers.STEP_W, layers.STEP_A, layers.OFFSET_A}
  assert set(b) == {'kernel', layers.STEP_W, layers.ALPHA_A}
  step, offset = learned_quant.lsq_plus_init(images, bits)
  hidden = np.maximum(_conv(
      _np_lsq(images, step, bits, signed=False, offset=offset),
      _np_lsq(a['kernel'], a[layers.STEP_W], bits, signed=True)), 0)
  np.testing.assert_allclose(b[layers.ALPHA_A], hidden.max(), rtol=1e-5)
  lo, hi = learned_params.learned_ranges(params, bits, bits)['conv_b'][
      'input']
  assert float(lo) == 0.0 and float(hi) == float(b[layers.ALPHA_A])
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (512,))) * 2
  same = np.isclose(quant.fake_quant_range(x, bits, lo, hi),
                    learned_quant.pact_fake_quant(x, b[layers.ALPHA_A], bits),
                    atol=1e-5)
  assert same.mean() >= 0.999


def test_lsq_refuses_static_ranges_and_unknown_methods():
  x = jnp.ones((1, 5, 5, 2))
  with pytest.raises(ValueError, match='learns its ranges'):
    _lsq_conv(act_ranges='static').init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="method='bogus'"):
    layers.QuantConv(4, (3, 3), bits_w=4, method='bogus').init(
        jax.random.PRNGKey(0), x)


@pytest.mark.parametrize('per_channel', [False, True])
def test_init_learned_quant_starts_each_quantizer_from_its_tensors(
    per_channel):
  bits = 3
  model = _TwoConvs(bits, per_channel)
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 6, 2))
  pretrained = jax.tree.map(
      np.asarray, learned_params.without_learned(model.init(
          jax.random.PRNGKey(1), images)['params']))
  assert set(pretrained['conv_a']) == {'kernel'}
  variables = learned_params.init_learned_quant(
      model, {'params': pretrained}, images)
  a, b = variables['params']['conv_a'], variables['params']['conv_b']
  # The raw images are negative somewhere: LSQ+; after the ReLU: unsigned.
  assert set(a) == {'kernel', layers.STEP_W, layers.STEP_A, layers.OFFSET_A}
  assert set(b) == {'kernel', layers.STEP_W, layers.STEP_A}
  axis = -1 if per_channel else None
  for layer in (a, b):
    np.testing.assert_array_equal(layer['kernel'],
                                  pretrained['conv_a' if layer is a
                                             else 'conv_b']['kernel'])
    expected = 2 * np.mean(np.abs(layer['kernel']), axis=(
        (0, 1, 2) if per_channel else None)) / np.sqrt(2**(bits - 1) - 1)
    np.testing.assert_allclose(np.reshape(layer[layers.STEP_W], -1),
                               np.reshape(expected, -1), rtol=1e-6)
  step, offset = learned_quant.lsq_plus_init(images, bits)
  np.testing.assert_allclose(a[layers.STEP_A], step, rtol=1e-6)
  np.testing.assert_allclose(a[layers.OFFSET_A], offset, rtol=1e-6)
  # conv_b's input is what the student computes with conv_a's starts.
  hidden = np.maximum(_conv(
      _np_lsq(images, step, bits, signed=False, offset=offset),
      _np_lsq(a['kernel'], a[layers.STEP_W], bits, signed=True)), 0)
  np.testing.assert_allclose(
      b[layers.STEP_A], 2 * np.mean(hidden) / np.sqrt(2**bits - 1),
      rtol=1e-5)
  # The template has the same structure, with placeholders.
  template = learned_params.learned_quant_template(model, {'params':
                                                           pretrained},
                                                   images)
  assert (jax.tree.structure(template) ==
          jax.tree.structure(variables['params']))


@pytest.mark.parametrize('bits', [2, 3, 4])
def test_learned_ranges_are_the_same_quantizer_as_minmax_on_that_range(bits):
  rng = np.random.default_rng(bits)
  x = rng.normal(size=(64, 8)).astype(np.float32) * 2
  cases = [
      # (step, offset or None (LSQ), signed)
      (np.float32(0.25), None, True),  # powers of two: exact.
      (np.float32(0.125), np.float32(-1.5), False),
      (np.float32(0.1731), None, True),
      (np.float32(0.0937), None, False),
      (np.float32(0.2113), np.float32(-0.913), False),
      (rng.uniform(0.05, 0.4, size=(8,)).astype(np.float32), None, True),
  ]
  for step, offset, signed in cases:
    if offset is None:
      learned = learned_quant.lsq_fake_quant(x, step, bits, signed=signed)
      lo, hi = learned_quant.lsq_range(step, bits, signed=signed)
    else:
      learned = learned_quant.lsq_plus_fake_quant(x, step, offset, bits)
      lo, hi = learned_quant.lsq_plus_range(step, offset, bits)
    minmax = np.asarray(quant.fake_quant_range(x, bits, lo, hi))
    learned = np.asarray(learned)
    # Up to float rounding: the same level nearly everywhere, and where a
    # grid position sits on a tie the neighbouring level.
    same = np.isclose(minmax, learned, rtol=0, atol=1e-5)
    assert same.mean() >= 0.999, (step, offset, signed)
    assert np.all(np.abs(minmax - learned) <= np.max(step) * 1.0001)
    if np.all(np.log2(step) == np.round(np.log2(step))):
      np.testing.assert_array_equal(minmax, learned)


def test_learned_ranges_of_a_network_reproduce_its_quantizers():
  model = _TwoConvs(bits=3, per_channel=True)
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 6, 6, 2))
  pretrained = learned_params.without_learned(
      model.init(jax.random.PRNGKey(1), images)['params'])
  params = learned_params.init_learned_quant(
      model, {'params': pretrained}, images)['params']
  ranges = learned_params.learned_ranges(params, 3, 3)
  assert set(ranges) == {'conv_a', 'conv_b'}
  a = params['conv_a']
  lo, hi = ranges['conv_a']['weight']
  assert lo.shape == hi.shape == (1, 1, 1, 4)
  np.testing.assert_allclose(
      quant.fake_quant_range(a['kernel'], 3, lo, hi),
      learned_quant.lsq_fake_quant(a['kernel'], a[layers.STEP_W], 3,
                                   signed=True), atol=1e-6)
  lo, hi = ranges['conv_a']['input']
  np.testing.assert_allclose(lo, a[layers.OFFSET_A])
  same = np.isclose(
      quant.fake_quant_range(images, 3, lo, hi),
      learned_quant.lsq_plus_fake_quant(images, a[layers.STEP_A],
                                        a[layers.OFFSET_A], 3), atol=1e-5)
  assert same.mean() >= 0.999
  lo, hi = ranges['conv_b']['input']
  assert float(lo) == 0.0
  np.testing.assert_allclose(hi, 7 * params['conv_b'][layers.STEP_A],
                             rtol=1e-6)
