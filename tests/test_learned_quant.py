"""Tests for dtq_jax.learned_quant: LSQ, LSQ+ and PACT fake quantizers.

Expected values are written out by hand or computed with NumPy from the
formulas of docs/method.md ("Learned quantizers"), never by calling the
implementation. Exact tables use steps that are powers of two and inputs
whose grid positions are far from ties (or exactly on them, which every
IEEE float rounds alike); random data is drawn away from ties and range ends
and compared with tolerances.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtq_jax import learned_quant as lq


def _np(x):
  return np.asarray(x, dtype=np.float32)


def _levels(bits, signed):
  # Written out here, not taken from lq.levels.
  if signed:
    return -2**(bits - 1), 2**(bits - 1) - 1
  return 0, 2**bits - 1


def _grid_positions(seed, shape, qn, qp):
  """Positions ``u`` on the grid, at least 0.05 from a tie or a range end.

  Codes from three below ``qn`` to three above ``qp`` plus a fraction in
  +-[0.05, 0.45]: whichever way a float rounds ``x / s``, the code, the
  clip and every case of the gradients stay the same.
  """
  rng = np.random.default_rng(seed)
  k = rng.integers(qn - 3, qp + 4, size=shape)
  f = rng.uniform(0.05, 0.45, size=shape) * rng.choice([-1.0, 1.0], shape)
  return k + f


def _sum_to(t, shape):
  """NumPy: sum ``t`` over the axes an array of ``shape`` broadcasts along."""
  lead = t.ndim - len(shape)
  t = t.sum(axis=tuple(range(lead)))
  ones = tuple(i for i, d in enumerate(shape) if d == 1)
  return t.sum(axis=ones, keepdims=True).reshape(shape)


def _np_lsq_grads(x, s, beta, g, qn, qp, grad_scale):
  """NumPy reference of the LSQ / LSQ+ gradients (float64).

  u = (x - beta) / s; dx = g on [qn, qp]; the step gets round(u) - u
  strictly inside and the bound's code at and beyond it; beta gets 1 at and
  beyond the bounds; both summed to their shapes and times grad_scale.
  """
  x, s, beta, g = (np.asarray(a, np.float64) for a in (x, s, beta, g))
  u = (x - beta) / s
  below, above = u <= qn, u >= qp
  dx = np.where((u >= qn) & (u <= qp), g, 0.0)
  r = np.where(below, qn, np.where(above, qp, np.round(u) - u))
  ds = grad_scale * _sum_to(g * r, s.shape)
  db = grad_scale * _sum_to(g * (below | above), beta.shape)
  return dx, ds, db


def _np_lsq_values(x, s, beta, qn, qp):
  """NumPy reference quantizer in float32, and the grid positions u."""
  x, s, beta = _np(x), _np(s), _np(beta)
  u = (x - beta) / s
  return np.clip(np.round(u), qn, qp) * s + beta, u


def _assert_levels_match(actual, expected, u, step):
  """Equal up to float32 rounding, except where ``u`` is within 1e-3 of a tie.

  Away from ties every float rounds ``u`` to the same code; at a tie a
  different (equally correct) rounding of ``x / s`` may pick the other
  neighbour.
  """
  frac = np.abs(u - np.floor(u) - 0.5)
  clear = frac > 1e-3
  assert clear.mean() > 0.95
  expected = np.asarray(expected, np.float32)
  # A few float32 ulps of the largest level, far below one step.
  atol = 1e-6 * float(np.max(np.abs(expected)) + np.max(step))
  assert atol < 1e-3 * float(np.min(step))
  np.testing.assert_allclose(np.asarray(actual, np.float32)[clear],
                             expected[clear], rtol=0, atol=atol)


# Jitted once per (shape, options): eager JAX compiles every primitive of
# the backward pass separately, which would dominate the test time.
_lsq = jax.jit(lq.lsq_fake_quant, static_argnames=('bits', 'signed'))
_lsq_plus = jax.jit(lq.lsq_plus_fake_quant, static_argnames=('bits',))
_pact = jax.jit(lq.pact_fake_quant, static_argnames=('bits',))
_lsq_codes = jax.jit(lq.lsq_codes, static_argnames=('bits', 'signed'))
_lsq_plus_codes = jax.jit(lq.lsq_plus_codes, static_argnames=('bits',))
_lsq_init_step = jax.jit(lq.lsq_init_step,
                         static_argnames=('bits', 'signed', 'axis'))
_lsq_plus_init = jax.jit(lq.lsq_plus_init,
                         static_argnames=('bits', 'method', 'tails'))


@functools.partial(jax.jit, static_argnames=('bits', 'signed'))
def _lsq_grads(x, step, g, bits, signed, grad_scale=None):
  return jax.grad(lambda v, s: jnp.sum(g * lq.lsq_fake_quant(
      v, s, bits, signed=signed, grad_scale=grad_scale)), argnums=(0, 1))(
          x, step)


@functools.partial(jax.jit, static_argnames=('bits',))
def _lsq_plus_grads(x, step, offset, g, bits, grad_scale=None):
  return jax.grad(lambda v, s, b: jnp.sum(g * lq.lsq_plus_fake_quant(
      v, s, b, bits, grad_scale=grad_scale)), argnums=(0, 1, 2))(
          x, step, offset)


@functools.partial(jax.jit, static_argnames=('bits',))
def _pact_grads(x, alpha, g, bits):
  return jax.grad(lambda v, a: jnp.sum(g * lq.pact_fake_quant(v, a, bits)),
                  argnums=(0, 1))(x, alpha)


# --------------------------------------------------------------------------
# Exact code tables, by hand.
# --------------------------------------------------------------------------

# (bits, signed, step, x, expected q). Steps are powers of two, so every
# level c * s is exact; u = x / s is written in each comment.
_LSQ_TABLES = [
    # Codes -2..1, s = 0.5: levels -1, -0.5, 0, 0.5.
    # u = [-4, -2, -1.52, -0.48, 0, 0.5 (tie), 0.6, 1, 1.48, 6].
    (2, True, 0.5,
     [-2.0, -1.0, -0.76, -0.24, 0.0, 0.25, 0.3, 0.5, 0.74, 3.0],
     [-1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5]),
    # Codes 0..3, s = 2. u = [-0.5 (tie), 0.45, 0.55, 1.5, 2.5, 3.5, 4.5]:
    # round half to even gives [0, 0, 1, 2, 2, 4, 4], clipped to 3.
    (2, False, 2.0,
     [-1.0, 0.9, 1.1, 3.0, 5.0, 7.0, 9.0],
     [0.0, 0.0, 2.0, 4.0, 4.0, 6.0, 6.0]),
    # Codes -4..3, s = 0.25: levels -1 .. 0.75.
    # u = [-12, -4, -3.6, -1.496, 0.504, 1.5 (tie), 2.5 (tie), 2.8, 8].
    (3, True, 0.25,
     [-3.0, -1.0, -0.9, -0.374, 0.126, 0.375, 0.625, 0.7, 2.0],
     [-1.0, -1.0, -1.0, -0.25, 0.25, 0.5, 0.5, 0.75, 0.75]),
    # Codes 0..7, s = 1. u = x; 0.5 -> 0, 2.5 -> 2, 6.5 -> 6, 7.5 -> 8 -> 7.
    (3, False, 1.0,
     [-0.5, 0.5, 1.5, 2.5, 3.49, 6.5, 7.5, 100.0],
     [0.0, 0.0, 2.0, 2.0, 3.0, 6.0, 7.0, 7.0]),
    # Codes -8..7, s = 0.0625: levels -0.5 .. 0.4375.
    # u = [-16, -8, -7.52, -0.5 (tie), 0.48, 1.5 (tie), 6.4, 7.04, 8].
    (4, True, 0.0625,
     [-1.0, -0.5, -0.47, -0.03125, 0.03, 0.09375, 0.4, 0.44, 0.5],
     [-0.5, -0.5, -0.5, 0.0, 0.0, 0.125, 0.375, 0.4375, 0.4375]),
    # Codes 0..15, s = 0.125: levels 0 .. 1.875.
    # u = [-8, -0.48, 0, 0.48, 0.5 (tie), 1.52, 8, 14.96, 15.2, 32].
    (4, False, 0.125,
     [-1.0, -0.06, 0.0, 0.06, 0.0625, 0.19, 1.0, 1.87, 1.9, 4.0],
     [0.0, 0.0, 0.0, 0.0, 0.0, 0.25, 1.0, 1.875, 1.875, 1.875]),
]


@pytest.mark.parametrize('bits,signed,step,x,expected', _LSQ_TABLES)
def test_lsq_table_by_hand(bits, signed, step, x, expected):
  x, expected = jnp.asarray(_np(x)), _np(expected)
  np.testing.assert_array_equal(_lsq(x, step, bits=bits, signed=signed),
                                expected)
  codes = _lsq_codes(x, step, bits=bits, signed=signed)
  assert codes.dtype == jnp.int32
  np.testing.assert_array_equal(codes, (expected / step).astype(np.int32))


def test_lsq_per_channel_table_by_hand():
  # Two channels (columns) with steps 0.5 and 0.125; 3 bits signed, codes
  # -4..3. Column 0: u = [-6, 1.4, 2.4] -> [-4, 1, 2]. Column 1:
  # u = [-2.4, 1.6, 8] -> [-2, 2, 3].
  x = jnp.asarray(_np([[-3.0, -0.3], [0.7, 0.2], [1.2, 1.0]]))
  step = jnp.asarray(_np([[0.5, 0.125]]))
  expected = _np([[-2.0, -0.25], [0.5, 0.25], [1.0, 0.375]])
  np.testing.assert_array_equal(_lsq(x, step, bits=3, signed=True),
                                expected)
  np.testing.assert_array_equal(_lsq_codes(x, step, bits=3, signed=True),
                                [[-4, -2], [1, 2], [2, 3]])


# (bits, step, offset, x, expected q); codes 0..2**bits - 1.
_LSQ_PLUS_TABLES = [
    # s = 0.5, beta = -0.75: levels -0.75, -0.25, 0.25, 0.75.
    # u = (x + 0.75) / 0.5 = [-2.5, 0, 0.3, 0.5 (tie), 0.9, 1.5 (tie),
    #                         2.5 (tie), 3.02, 7.5].
    (2, 0.5, -0.75,
     [-2.0, -0.75, -0.6, -0.5, -0.3, 0.0, 0.5, 0.76, 3.0],
     [-0.75, -0.75, -0.75, -0.75, -0.25, 0.25, 0.25, 0.75, 0.75]),
    # s = 0.25, beta = -1: levels -1 .. 0.75.
    # u = (x + 1) / 0.25 = [-2, 0, 0.4, 2, 3.48, 4, 6.2, 7.2, 8].
    (3, 0.25, -1.0,
     [-1.5, -1.0, -0.9, -0.5, -0.13, 0.0, 0.55, 0.8, 1.0],
     [-1.0, -1.0, -1.0, -0.5, -0.25, 0.0, 0.5, 0.75, 0.75]),
    # s = 0.125, beta = -0.5: levels -0.5 .. 1.375.
    # u = (x + 0.5) / 0.125 = [-0.8, 0, 0.5 (tie), 2, 4, 6.4, 15, 15.2, 20].
    (4, 0.125, -0.5,
     [-0.6, -0.5, -0.4375, -0.25, 0.0, 0.3, 1.375, 1.4, 2.0],
     [-0.5, -0.5, -0.5, -0.25, 0.0, 0.25, 1.375, 1.375, 1.375]),
]


@pytest.mark.parametrize('bits,step,offset,x,expected', _LSQ_PLUS_TABLES)
def test_lsq_plus_table_by_hand(bits, step, offset, x, expected):
  x, expected = jnp.asarray(_np(x)), _np(expected)
  np.testing.assert_array_equal(_lsq_plus(x, step, offset, bits=bits),
                                expected)
  codes = _lsq_plus_codes(x, step, offset, bits=bits)
  assert codes.dtype == jnp.int32
  np.testing.assert_array_equal(
      codes, ((expected - offset) / step).astype(np.int32))


# (bits, alpha, x, expected q); s = alpha / (2**bits - 1) is a power of two.
_PACT_TABLES = [
    # alpha = 3, s = 1: y = clip(x, 0, 3) = [0, 0, .4, .5, 1.5, 2.6, 3, 3].
    (2, 3.0,
     [-1.0, 0.0, 0.4, 0.5, 1.5, 2.6, 3.0, 5.0],
     [0.0, 0.0, 0.0, 0.0, 2.0, 3.0, 3.0, 3.0]),
    # alpha = 1.75, s = 0.25: u = [0, .4, .5 (tie), 1.2, 3.6, 6.8, 7, 7].
    (3, 1.75,
     [-0.3, 0.1, 0.125, 0.3, 0.9, 1.7, 1.75, 2.0],
     [0.0, 0.0, 0.0, 0.25, 1.0, 1.75, 1.75, 1.75]),
    # alpha = 1.875, s = 0.125: u = [0, .4, .5 (tie), 1.6, 8, 14.4, 15, 15].
    (4, 1.875,
     [-1.0, 0.05, 0.0625, 0.2, 1.0, 1.8, 1.875, 3.0],
     [0.0, 0.0, 0.0, 0.25, 1.0, 1.75, 1.875, 1.875]),
]


@pytest.mark.parametrize('bits,alpha,x,expected', _PACT_TABLES)
def test_pact_table_by_hand(bits, alpha, x, expected):
  np.testing.assert_array_equal(_pact(jnp.asarray(_np(x)), alpha, bits=bits),
                                _np(expected))


def test_levels():
  assert lq.levels(2, signed=True) == (-2, 1)
  assert lq.levels(4, signed=True) == (-8, 7)
  assert lq.levels(4, signed=False) == (0, 15)
  assert lq.levels(8, signed=False) == (0, 255)


# --------------------------------------------------------------------------
# NumPy reference quantizers on random data.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('bits,signed', [(2, True), (3, False), (4, True),
                                         (8, False)])
def test_lsq_matches_numpy_reference(bits, signed):
  rng = np.random.default_rng(bits)
  w = _np(rng.normal(size=(3, 3, 4, 5)))
  qn, qp = _levels(bits, signed)
  # Per tensor, then one step per output channel of the HWIO kernel.
  for step in (_np(2.5 / (qp - qn)),
               _np(rng.uniform(0.5, 3.0, size=(1, 1, 1, 5)) / (qp - qn))):
    expected, u = _np_lsq_values(w, step, 0.0, qn, qp)
    actual = _lsq(jnp.asarray(w), jnp.asarray(step), bits=bits, signed=signed)
    _assert_levels_match(actual, expected, u, step)


@pytest.mark.parametrize('bits', [2, 3, 4, 8])
def test_lsq_plus_matches_numpy_reference(bits):
  rng = np.random.default_rng(bits)
  # A Swish-like activation: mostly positive, a short negative tail.
  x = _np(rng.normal(size=(4, 6, 6, 3)))
  x = x / (1.0 + np.exp(-x))
  step = _np(1.5 / (2**bits - 1))
  offset = _np(-0.3)
  expected, u = _np_lsq_values(x, step, offset, 0, 2**bits - 1)
  actual = _lsq_plus(jnp.asarray(x), step, offset, bits=bits)
  _assert_levels_match(actual, expected, u, step)


@pytest.mark.parametrize('bits', [2, 4, 8])
def test_pact_matches_numpy_reference(bits):
  rng = np.random.default_rng(bits)
  x = _np(rng.normal(size=(64, 9)))
  alpha = _np(1.3)
  s = _np(alpha / _np(2**bits - 1))
  u = np.clip(x, 0, alpha) / s
  expected = np.round(u) * s
  _assert_levels_match(_pact(jnp.asarray(x), alpha, bits=bits), expected, u,
                       s)


# --------------------------------------------------------------------------
# Gradients.
# --------------------------------------------------------------------------


def test_lsq_grad_by_hand():
  # 3 bits signed (codes -4..3), s = 0.5, upstream G = [0, 1, 2, 3, 4, 5].
  x = jnp.asarray(_np([-2.3, -0.6, 0.2, 0.74, 1.3, 5.0]))
  g = jnp.arange(6.0)
  dx, ds = _lsq_grads(x, jnp.float32(0.5), g, 3, True)
  # u = [-4.6, -1.2, 0.4, 1.48, 2.6, 10]: the first below -4, the last above
  # 3; x's gradient is G inside only.
  np.testing.assert_array_equal(dx, [0.0, 1.0, 2.0, 3.0, 4.0, 0.0])
  # Step terms r = [-4, 0.2, -0.4, -0.48, 0.4, 3]; sum G * r
  #   = 0 + 0.2 - 0.8 - 1.44 + 1.6 + 15 = 14.56, times g = 1/sqrt(6 * 3).
  np.testing.assert_allclose(ds, 14.56 / math.sqrt(18.0), rtol=1e-5)


def test_lsq_plus_grad_by_hand():
  # 2 bits (codes 0..3), s = 0.5, beta = -0.75, G = [1, 2, 3, 4, 5].
  x = jnp.asarray(_np([-1.2, -0.3, 0.1, 0.6, 2.0]))
  g = jnp.arange(1.0, 6.0)
  dx, ds, db = _lsq_plus_grads(x, jnp.float32(0.5), jnp.float32(-0.75), g, 2)
  # u = (x + 0.75) / 0.5 = [-0.9, 0.9, 1.7, 2.7, 5.5].
  np.testing.assert_array_equal(dx, [0.0, 2.0, 3.0, 4.0, 0.0])
  # r = [0, 0.1, 0.3, 0.3, 3]: sum G * r = 0.2 + 0.9 + 1.2 + 15 = 17.3;
  # beta gets G of the two clipped elements, 1 + 5; g = 1/sqrt(5 * 3).
  np.testing.assert_allclose(ds, 17.3 / math.sqrt(15.0), rtol=1e-5)
  np.testing.assert_allclose(db, 6.0 / math.sqrt(15.0), rtol=1e-6)


def test_pact_grad_by_hand():
  x = jnp.asarray(_np([-0.5, 0.3, 1.2, 2.0, 2.5]))
  g = jnp.arange(1.0, 6.0)
  dx, da = _pact_grads(x, jnp.float32(2.0), g, 4)
  # Inside [0, 2): the 2nd and 3rd; at or above alpha: the last two.
  np.testing.assert_array_equal(dx, [0.0, 2.0, 3.0, 0.0, 0.0])
  np.testing.assert_array_equal(da, 4.0 + 5.0)


def test_gradients_exactly_on_the_range_ends():
  g = jnp.asarray(_np([2.0, 3.0]))
  # LSQ, 2 bits signed, s = 1: x on the codes -2 and 1. x keeps its
  # gradient on the closed range; the step gets the bound codes.
  dx, ds = _lsq_grads(jnp.asarray(_np([-2.0, 1.0])), jnp.float32(1.0), g, 2,
                      True, grad_scale=1.0)
  np.testing.assert_array_equal(dx, g)
  np.testing.assert_array_equal(ds, 2.0 * -2 + 3.0 * 1)
  # LSQ+, 2 bits, s = 1, beta = 0.5: u = 0 and u = 3; beta gets both.
  dx, ds, db = _lsq_plus_grads(jnp.asarray(_np([0.5, 3.5])), jnp.float32(1.0),
                               jnp.float32(0.5), g, 2, grad_scale=1.0)
  np.testing.assert_array_equal(dx, g)
  np.testing.assert_array_equal(ds, 3.0 * 3)
  np.testing.assert_array_equal(db, 5.0)
  # PACT: x = 0 is inside, x = alpha goes to alpha.
  dx, da = _pact_grads(jnp.asarray(_np([0.0, 1.5])), jnp.float32(1.5), g, 2)
  np.testing.assert_array_equal(dx, [2.0, 0.0])
  np.testing.assert_array_equal(da, 3.0)


@pytest.mark.parametrize('bits,signed,per_channel',
                         [(2, True, False), (3, False, False),
                          (4, True, True), (8, False, True)])
def test_lsq_grads_match_formula(bits, signed, per_channel):
  qn, qp = _levels(bits, signed)
  shape = (3, 3, 2, 4)
  rng = np.random.default_rng(bits)
  step = (_np(rng.uniform(0.05, 0.2, size=(1, 1, 1, 4))) if per_channel
          else _np(0.1))
  x = _np(_grid_positions(bits, shape, qn, qp) * step)
  g = _np(rng.normal(size=shape))
  dx, ds = _lsq_grads(jnp.asarray(x), jnp.asarray(step), jnp.asarray(g), bits,
                      signed)
  n = x.size // step.size
  ex_dx, ex_ds, _ = _np_lsq_grads(x, step, 0.0, g, qn, qp,
                                  1.0 / math.sqrt(n * qp))
  np.testing.assert_array_equal(dx, ex_dx)
  assert ds.shape == step.shape
  np.testing.assert_allclose(ds, ex_ds, rtol=1e-4, atol=1e-6)


def test_lsq_grad_scale_override():
  qn, qp = _levels(4, True)
  x = _np(_grid_positions(0, (50,), qn, qp) * 0.25)
  g = _np(np.random.default_rng(1).normal(size=x.shape))
  default = _lsq_grads(jnp.asarray(x), jnp.float32(0.25), jnp.asarray(g), 4,
                       True)
  unscaled = _lsq_grads(jnp.asarray(x), jnp.float32(0.25), jnp.asarray(g), 4,
                        True, grad_scale=1.0)
  _, ex_ds, _ = _np_lsq_grads(x, _np(0.25), 0.0, g, qn, qp, 1.0)
  np.testing.assert_allclose(unscaled[1], ex_ds, rtol=1e-5, atol=1e-6)
  # The default is LSQ's 1 / sqrt(N * Qp); x's gradient does not change.
  np.testing.assert_allclose(default[1],
                             ex_ds / math.sqrt(x.size * qp), rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_array_equal(default[0], unscaled[0])
  # The values do not depend on it either.
  np.testing.assert_array_equal(
      _lsq(jnp.asarray(x), 0.25, bits=4, signed=True, grad_scale=3.0),
      _lsq(jnp.asarray(x), 0.25, bits=4, signed=True))


@pytest.mark.parametrize('bits,per_channel', [(2, False), (3, False),
                                              (4, True)])
def test_lsq_plus_grads_match_formula(bits, per_channel):
  qp = 2**bits - 1
  shape = (4, 5, 3)
  rng = np.random.default_rng(bits)
  if per_channel:
    step = _np(rng.uniform(0.05, 0.2, size=(3,)))
    offset = _np(rng.uniform(-0.5, 0.0, size=(1, 1, 3)))
  else:
    step, offset = _np(0.125), _np(-0.3)
  x = _np(_grid_positions(bits, shape, 0, qp) * step + offset)
  g = _np(rng.normal(size=shape))
  dx, ds, db = _lsq_plus_grads(jnp.asarray(x), jnp.asarray(step),
                               jnp.asarray(offset), jnp.asarray(g), bits)
  n = x.size // step.size
  ex_dx, ex_ds, ex_db = _np_lsq_grads(x, step, offset, g, 0, qp,
                                      1.0 / math.sqrt(n * qp))
  np.testing.assert_array_equal(dx, ex_dx)
  assert ds.shape == step.shape and db.shape == offset.shape
  np.testing.assert_allclose(ds, ex_ds, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(db, ex_db, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('bits,per_channel', [(2, False), (4, True)])
def test_pact_grads_match_formula(bits, per_channel):
  n = 2**bits - 1
  shape = (6, 7, 3)
  rng = np.random.default_rng(bits)
  alpha = (_np(rng.uniform(0.5, 2.0, size=(3,))) if per_channel
           else _np(1.5))
  x = _np(_grid_positions(bits, shape, 0, n) * alpha / n)
  g = _np(rng.normal(size=shape))
  dx, da = _pact_grads(jnp.asarray(x), jnp.asarray(alpha), jnp.asarray(g),
                       bits)
  x64, g64 = x.astype(np.float64), g.astype(np.float64)
  np.testing.assert_array_equal(dx, np.where((x64 >= 0) & (x64 < alpha), g64,
                                             0.0))
  assert da.shape == alpha.shape
  np.testing.assert_allclose(
      da, _sum_to(np.where(x64 >= alpha, g64, 0.0), alpha.shape), rtol=1e-5,
      atol=1e-6)


# --------------------------------------------------------------------------
# Integer codes round-trip exactly.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('bits,signed', [(2, True), (4, False), (5, True),
                                         (8, False)])
def test_lsq_codes_round_trip(bits, signed):
  qn, qp = _levels(bits, signed)
  x = jnp.asarray(_np(np.random.default_rng(bits).normal(size=(6, 3, 4))))
  # Dyadic steps (one per channel too): every c * s is exact, so the
  # comparison is exact whatever the order or fusion of the arithmetic.
  for step in (_np(2.0**-4), _np([[2.0**-3, 2.0**-5, 2.0**-6, 1.0]])):
    codes = np.asarray(_lsq_codes(x, step, bits=bits, signed=signed))
    assert codes.dtype == np.int32
    assert codes.min() >= qn and codes.max() <= qp
    q = _lsq(x, jnp.asarray(step), bits=bits, signed=signed)
    np.testing.assert_array_equal(codes.astype(np.float32) * step, q)
  # Any positive step: equal up to float32 rounding of c * s.
  step = _np(0.0917)
  codes = np.asarray(_lsq_codes(x, step, bits=bits, signed=signed))
  np.testing.assert_allclose(codes.astype(np.float32) * step,
                             _lsq(x, step, bits=bits, signed=signed),
                             rtol=1e-6, atol=0)


@pytest.mark.parametrize('bits', [2, 4, 8])
def test_lsq_plus_codes_round_trip(bits):
  x = jnp.asarray(_np(np.random.default_rng(bits).normal(size=(5, 7))))
  # s = 2**-5 and beta = -13/16: c * s + beta is exact in float32.
  step, offset = _np(2.0**-5), _np(-0.8125)
  codes = np.asarray(_lsq_plus_codes(x, step, offset, bits=bits))
  assert codes.dtype == np.int32
  assert codes.min() >= 0 and codes.max() <= 2**bits - 1
  np.testing.assert_array_equal(
      codes.astype(np.float32) * step + offset,
      _lsq_plus(x, step, offset, bits=bits))
  step, offset = _np(0.0917), _np(-0.613)
  codes = np.asarray(_lsq_plus_codes(x, step, offset, bits=bits))
  np.testing.assert_allclose(codes.astype(np.float32) * step + offset,
                             _lsq_plus(x, step, offset, bits=bits),
                             rtol=0, atol=1e-6)


# --------------------------------------------------------------------------
# Bit widths, inputs and the step's sign.
# --------------------------------------------------------------------------


def test_bits_32_is_identity():
  x = jnp.asarray(_np(np.random.default_rng(0).normal(size=(5, 7))))
  g = jnp.arange(35.0).reshape(5, 7)
  np.testing.assert_array_equal(lq.lsq_fake_quant(x, 0.1, 32, signed=True), x)
  np.testing.assert_array_equal(lq.lsq_plus_fake_quant(x, 0.1, -1.0, 32), x)
  np.testing.assert_array_equal(lq.pact_fake_quant(x, 1.0, 32), x)
  dx, ds = jax.grad(lambda v, s: jnp.sum(g * lq.lsq_fake_quant(
      v, s, 32, signed=True)), argnums=(0, 1))(x, 0.1)
  np.testing.assert_array_equal(dx, g)
  assert ds == 0.0
  dx, da = jax.grad(lambda v, a: jnp.sum(g * lq.pact_fake_quant(v, a, 32)),
                    argnums=(0, 1))(x, 1.0)
  np.testing.assert_array_equal(dx, g)
  assert da == 0.0


_ALL = {
    'lsq_fake_quant': lambda x, b: lq.lsq_fake_quant(x, 0.1, b, signed=True),
    'lsq_plus_fake_quant': lambda x, b: lq.lsq_plus_fake_quant(x, 0.1, 0.0, b),
    'pact_fake_quant': lambda x, b: lq.pact_fake_quant(x, 1.0, b),
    'lsq_codes': lambda x, b: lq.lsq_codes(x, 0.1, b, signed=False),
    'lsq_plus_codes': lambda x, b: lq.lsq_plus_codes(x, 0.1, 0.0, b),
    'lsq_init_step': lambda x, b: lq.lsq_init_step(x, b, signed=True),
    'lsq_plus_init': lq.lsq_plus_init,
}


@pytest.mark.parametrize('name', sorted(_ALL))
@pytest.mark.parametrize('bits', [0, 1, 17, 33, 4.0, True, None])
def test_bad_bits_raise(name, bits):
  with pytest.raises(ValueError, match=r'is not supported; allowed: 2\.\.16'):
    _ALL[name](jnp.arange(4.0), bits)


@pytest.mark.parametrize('name', sorted(_ALL))
def test_traced_bits_and_integer_inputs_are_type_errors(name):
  x = jnp.arange(4.0)
  with pytest.raises(TypeError, match='bits must be a Python int'):
    jax.jit(_ALL[name])(x, 4)
  with pytest.raises(TypeError, match=f'{name} needs a floating-point array'):
    _ALL[name](jnp.arange(4), 4)


@pytest.mark.parametrize('name', ['lsq_codes', 'lsq_plus_codes',
                                  'lsq_init_step', 'lsq_plus_init'])
def test_codes_and_inits_need_bits_below_32(name):
  with pytest.raises(ValueError, match='needs bits < 32'):
    _ALL[name](jnp.arange(4.0), 32)


def test_parameters_must_broadcast_to_x():
  x = jnp.ones((3, 4))
  with pytest.raises(ValueError, match=r'step of shape \(3,\) must broadcast'):
    lq.lsq_fake_quant(x, jnp.ones((3,)), 4, signed=True)
  with pytest.raises(ValueError, match=r'step of shape \(2, 3, 4\)'):
    lq.lsq_codes(x, jnp.ones((2, 3, 4)), 4, signed=True)
  with pytest.raises(ValueError, match='offset of shape'):
    lq.lsq_plus_fake_quant(x, 0.1, jnp.ones((5,)), 4)
  with pytest.raises(ValueError, match='alpha of shape'):
    lq.pact_fake_quant(x, jnp.ones((4, 1, 1)), 4)
  with pytest.raises(TypeError, match='needs a floating-point array'):
    lq.lsq_fake_quant(x, jnp.asarray(1), 4, signed=True)


def test_zero_and_negative_steps_are_safe():
  x = jnp.asarray(_np([-1.3, -0.2, 0.4, 0.9, 2.2]))
  g = jnp.asarray(_np([1.0, -2.0, 0.5, 3.0, 1.5]))
  for step in (0.0, -0.0):
    q = _lsq(x, step, bits=4, signed=True)
    dx, ds = _lsq_grads(x, jnp.float32(step), g, 4, True)
    assert np.all(np.isfinite(q)) and np.all(np.isfinite(dx))
    # Every element is clipped, so the step gets the bound codes and can
    # grow again: not stuck at 0.
    assert np.isfinite(ds) and ds != 0.0
  # A negative step acts as its magnitude; its gradient has the sign flipped.
  np.testing.assert_array_equal(_lsq(x, -0.25, bits=4, signed=True),
                                _lsq(x, 0.25, bits=4, signed=True))
  _, ds_neg = _lsq_grads(x, jnp.float32(-0.25), g, 4, True)
  _, ds_pos = _lsq_grads(x, jnp.float32(0.25), g, 4, True)
  np.testing.assert_allclose(ds_neg, -ds_pos, rtol=1e-6)
  q = _pact(x, 0.0, bits=4)
  _, da = _pact_grads(x, jnp.float32(0.0), g, 4)
  assert np.all(np.isfinite(q)) and np.isfinite(da)
  assert np.all(np.isfinite(_lsq_plus(x, 0.0, -0.2, bits=3)))


# --------------------------------------------------------------------------
# Transformations and dtypes.
# --------------------------------------------------------------------------


def test_jit_matches_eager():
  x = jnp.asarray(_np(np.random.default_rng(0).normal(size=(8, 8))))
  np.testing.assert_array_equal(_lsq(x, 0.25, bits=4, signed=True),
                                lq.lsq_fake_quant(x, 0.25, 4, signed=True))
  np.testing.assert_array_equal(_lsq_plus(x, 0.25, -0.5, bits=3),
                                lq.lsq_plus_fake_quant(x, 0.25, -0.5, 3))
  np.testing.assert_array_equal(_pact(x, 1.5, bits=2),
                                lq.pact_fake_quant(x, 1.5, 2))
  # Eager autodiff through the custom VJP (op by op; a small input keeps
  # its compilations few).
  x = x[:2, :3]
  g = jnp.ones_like(x)
  eager = jax.grad(lambda v, s: jnp.sum(lq.lsq_fake_quant(v, s, 4,
                                                          signed=True)),
                   argnums=(0, 1))(x, jnp.float32(0.25))
  jitted = _lsq_grads(x, jnp.float32(0.25), g, 4, True)
  np.testing.assert_array_equal(eager[0], jitted[0])
  np.testing.assert_allclose(eager[1], jitted[1], rtol=1e-5)


def test_vmap_gives_each_example_its_own_step_and_grad_scale():
  qn, qp = _levels(4, False)
  steps = _np([0.5, 0.25, 0.125])
  xs = _np(_grid_positions(3, (3, 5, 4), qn, qp)) * steps[:, None, None]
  gs = _np(np.random.default_rng(4).normal(size=xs.shape))
  q = jax.vmap(lambda v, s: lq.lsq_fake_quant(v, s, 4, signed=False))(
      jnp.asarray(xs), jnp.asarray(steps))
  dx, ds = jax.vmap(lambda v, s, g: _lsq_grads(v, s, g, 4, False))(
      jnp.asarray(xs), jnp.asarray(steps), jnp.asarray(gs))
  for i in range(3):
    np.testing.assert_array_equal(q[i], _lsq(xs[i], steps[i], bits=4,
                                             signed=False))
    # N is the example's 20 elements under vmap.
    ex_dx, ex_ds, _ = _np_lsq_grads(xs[i], steps[i], 0.0, gs[i], qn, qp,
                                    1.0 / math.sqrt(20 * qp))
    np.testing.assert_array_equal(dx[i], ex_dx)
    np.testing.assert_allclose(ds[i], ex_ds, rtol=1e-5, atol=1e-7)


def test_the_quantizers_are_custom_vjp_and_differentiate_twice():
  x = jnp.asarray(_np([-0.7, 0.1, 0.6, 1.9]))
  f = lambda v: jnp.sum(jnp.sin(lq.lsq_fake_quant(v, 0.25, 4, signed=True)))
  hvp = jax.jit(jax.grad(lambda v: jnp.sum(jax.grad(f)(v))))(x)
  assert np.all(np.isfinite(hvp))


@pytest.mark.parametrize('name', ['lsq', 'lsq_plus', 'pact'])
def test_bfloat16_keeps_its_dtype_and_matches_float32(name):
  fns = {
      'lsq': lambda v, p: lq.lsq_fake_quant(v, p, 4, signed=True),
      'lsq_plus': lambda v, p: lq.lsq_plus_fake_quant(v, p, -0.5, 4),
      'pact': lambda v, p: lq.pact_fake_quant(v, p, 4),
  }
  fn = fns[name]
  param = jnp.float32(1.875) if name == 'pact' else jnp.float32(0.125)
  x = jnp.asarray(_np(np.random.default_rng(0).normal(size=(16, 16)))).astype(
      jnp.bfloat16)
  q = fn(x, param)
  assert q.dtype == jnp.bfloat16
  # Quantized in float32 and cast back; levels k * 2**-3 with |k| < 16 are
  # exact in bfloat16.
  np.testing.assert_array_equal(
      np.asarray(q, np.float32),
      np.asarray(fn(x.astype(jnp.float32), param), np.float32))
  g = jnp.asarray(_np(np.random.default_rng(1).normal(size=x.shape)))
  grad = jax.jit(jax.grad(lambda v, p: jnp.sum(fn(v, p) * g),
                          argnums=(0, 1)))
  dx, dp = grad(x, param)
  assert dx.dtype == jnp.bfloat16 and dp.dtype == jnp.float32
  dx32, dp32 = grad(x.astype(jnp.float32), param)
  np.testing.assert_allclose(np.asarray(dx, np.float32), dx32,
                             atol=0.01 * np.abs(dx32).max())
  np.testing.assert_allclose(dp, dp32, rtol=0.02, atol=1e-3)
  # A bfloat16 parameter gets a bfloat16 gradient.
  assert grad(x, param.astype(jnp.bfloat16))[1].dtype == jnp.bfloat16


# --------------------------------------------------------------------------
# Initialisers.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('bits,signed', [(2, True), (4, False), (8, True)])
def test_lsq_init_step(bits, signed):
  _, qp = _levels(bits, signed)
  w = _np(np.random.default_rng(bits).normal(size=(3, 3, 4, 5)))
  w = w * np.arange(1.0, 6.0, dtype=np.float32)
  step = _lsq_init_step(jnp.asarray(w), bits=bits, signed=signed)
  assert step.shape == (1, 1, 1, 1)
  np.testing.assert_allclose(
      step, 2 * np.abs(w.astype(np.float64)).mean() / np.sqrt(qp), rtol=1e-5)
  per_channel = _lsq_init_step(jnp.asarray(w), bits=bits, signed=signed,
                               axis=-1)
  assert per_channel.shape == (1, 1, 1, 5)
  np.testing.assert_allclose(
      per_channel.ravel(),
      2 * np.abs(w.astype(np.float64)).mean(axis=(0, 1, 2)) / np.sqrt(qp),
      rtol=1e-5)
  # It broadcasts into the quantizer as one step per output channel.
  assert _lsq(jnp.asarray(w), per_channel, bits=bits,
              signed=signed).shape == w.shape


def test_lsq_plus_init_recovers_an_exact_grid():
  # Every level of s = 0.125, beta = -0.75 at 4 bits, each several times:
  # the min-max grid reproduces x exactly, so MSE 0 is the minimum.
  codes = np.random.default_rng(0).permutation(np.repeat(np.arange(16), 5))
  x = jnp.asarray(_np(codes * 0.125 - 0.75))
  for method in ('mse', 'minmax'):
    step, offset = _lsq_plus_init(x, bits=4, method=method)
    assert step.shape == () and offset.shape == ()
    np.testing.assert_array_equal(step, 0.125)
    np.testing.assert_array_equal(offset, -0.75)


def test_lsq_plus_init_mse_clips_outliers():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(20000,))
  x = x / (1.0 + np.exp(-x))  # Swish: a short negative tail.
  # One outlier stretches the min-max range sevenfold; among 20000 values
  # clipping it costs less squared error than the coarse grid would.
  x[7] = 25.0
  x = _np(x)

  def mse(step, offset):
    q, _ = _np_lsq_values(x, step, offset, 0, 15)
    return float(np.mean((q - x.astype(np.float64))**2))

  s_mm, b_mm = _lsq_plus_init(jnp.asarray(x), bits=4, method='minmax')
  np.testing.assert_allclose(s_mm, (x.max() - x.min()) / 15, rtol=1e-6)
  np.testing.assert_array_equal(b_mm, x.min())
  s_mse, b_mse = _lsq_plus_init(jnp.asarray(x), bits=4)
  # The outlier is clipped: a much finer grid, a much smaller error.
  assert s_mse < 0.25 * s_mm
  assert mse(s_mse, b_mse) < 0.25 * mse(s_mm, b_mm)
  # The result is the best candidate of the documented search: ranges
  # [quantile(a), quantile(1 - b)] for a, b in the tails.
  tails = lq.LSQ_PLUS_INIT_TAILS
  assert tails[0] == 0.0
  best = min(mse((np.quantile(x, 1 - b) - np.quantile(x, a)) / 15,
                 np.quantile(x, a)) for a in tails for b in tails)
  np.testing.assert_allclose(mse(s_mse, b_mse), best, rtol=1e-3)


def test_lsq_plus_init_bad_arguments():
  with pytest.raises(ValueError, match='method'):
    lq.lsq_plus_init(jnp.arange(4.0), 4, method='percentile')
  for tails in ((), (0.1, 0.0), (0.0, 0.5), (0.0, -0.1)):
    with pytest.raises(ValueError, match='tails'):
      lq.lsq_plus_init(jnp.arange(4.0), 4, tails=tails)


def test_pact_init_alpha():
  x = _np(np.random.default_rng(0).normal(size=(50, 20)))
  np.testing.assert_array_equal(lq.pact_init_alpha(jnp.asarray(x)), x.max())
  np.testing.assert_allclose(
      lq.pact_init_alpha(jnp.asarray(x), percentile=99.0),
      np.percentile(x, 99.0), rtol=1e-5)
  with pytest.raises(ValueError, match='percentile'):
    lq.pact_init_alpha(jnp.asarray(x), percentile=0.0)
  # With alpha = max(x) >= 0, PACT clips nothing: the grid spans [0, max].
  relu = jnp.maximum(jnp.asarray(x), 0.0)
  alpha = lq.pact_init_alpha(relu)
  _, da = _pact_grads(relu, alpha, jnp.ones_like(relu), 4)
  assert da == 1.0  # Only the maximum itself is at alpha.


def test_pact_range_is_zero_to_the_effective_level():
  lo, hi = lq.pact_range(np.float32(-0.5), 4)
  assert float(lo) == 0.0 and float(hi) == 0.5
  _, hi = lq.pact_range(np.float32(0.0), 4)
  assert float(hi) == np.float32(lq.EPS)
  with pytest.raises(ValueError, match='bits < 32'):
    lq.pact_range(np.float32(1.0), 32)
