"""Tests for dtq_jax.quant: the paper's min-max fake quantizer.

Expected values are written out by hand or computed with NumPy from the
formulas of docs/method.md ("The quantizer"), never by calling the
implementation.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtq_jax import quant


def _np(x):
  return np.asarray(x, dtype=np.float32)


def _normal(seed, shape):
  # NumPy, not jax.random: eager jax.random compiles one program per shape,
  # which costs more than the tests themselves on a small CPU.
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


def _assert_same_levels(actual, desired):
  """Equal up to float32 rounding of ``k * s + lo``, far below one step s.

  Eager, jitted and vmapped code may fuse ``round(u) * s + lo`` differently
  (e.g. into an FMA), which moves the result by an ulp; a different level
  would move it by a whole step.
  """
  desired = np.asarray(desired, np.float32)
  span = float(np.max(desired) - np.min(desired)) or 1.0
  np.testing.assert_allclose(actual, desired, rtol=0, atol=1e-5 * span)


# --------------------------------------------------------------------------
# Forward values.
# --------------------------------------------------------------------------


def test_4bit_table_by_hand():
  # lo = -3, hi = 4.5, s = 7.5 / 15 = 0.5 (a power of two, so every level
  # k * s + lo is exact in float32 and the table can be compared exactly).
  x = _np([[-3.0, -2.8, -2.7, 0.1],
           [0.26, 1.0, 3.74, 4.5]])
  # u = (x + 3) / 0.5 = [0, .4, .6, 6.2, 6.52, 8, 13.48, 15]
  # round(u)        = [0,  0,  1,   6,    7, 8,    13, 15]
  expected = _np([[-3.0, -3.0, -2.5, 0.0],
                  [0.5, 1.0, 3.5, 4.5]])
  np.testing.assert_array_equal(quant.fake_quant(jnp.asarray(x), 4), expected)


def test_5bit_table_by_hand():
  # lo = -1, hi = 2.875, s = 3.875 / 31 = 0.125.
  x = _np([-1.0, -0.95, -0.93, 0.0, 0.3, 1.06, 2.8, 2.875])
  # u = (x + 1) / 0.125 = [0, .4, .56, 8, 10.4, 16.48, 30.4, 31]
  # round(u)            = [0,  0,   1, 8,   10,    16,   30, 31]
  expected = _np([-1.0, -1.0, -0.875, 0.0, 0.25, 1.0, 2.75, 2.875])
  np.testing.assert_array_equal(quant.fake_quant(jnp.asarray(x), 5), expected)


def test_range_is_over_the_whole_tensor():
  # Each row alone would have a different range; the paper uses one range per
  # tensor: lo = 0, hi = 15, s = 1 at 4 bits, so values round to integers.
  x = _np([[0.0, 0.4, 0.7, 1.2],
           [3.3, 9.6, 14.2, 15.0]])
  expected = _np([[0.0, 0.0, 1.0, 1.0],
                  [3.0, 10.0, 14.0, 15.0]])
  np.testing.assert_array_equal(quant.fake_quant(jnp.asarray(x), 4), expected)


def test_rounds_half_to_even_like_torch_round():
  # torch.round (the authors' framework) rounds halves to even; s = 1 here.
  x = _np([0.0, 0.5, 1.5, 2.5, 3.5, 15.0])
  expected = _np([0.0, 0.0, 2.0, 2.0, 4.0, 15.0])
  np.testing.assert_array_equal(quant.fake_quant(jnp.asarray(x), 4), expected)


@pytest.mark.parametrize('bits', [2, 3, 4, 5, 8])
def test_idempotent(bits):
  x = _normal(bits, (64, 33))
  q1 = quant.fake_quant(x, bits)
  q2 = quant.fake_quant(q1, bits)
  # The range of q1 is that of x up to one rounding of k * s + lo, so the
  # second pass lands on the same levels up to float32 rounding.
  _assert_same_levels(q2, q1)


@pytest.mark.parametrize('bits', [2, 3, 4, 5, 6, 8])
def test_at_most_2_pow_bits_levels(bits):
  x = jnp.asarray(np.random.default_rng(0).uniform(-3.0, 2.0, (20000,)),
                  jnp.float32)
  levels = np.unique(np.asarray(quant.fake_quant(x, bits)))
  assert len(levels) <= 2**bits
  # With this many uniform samples every level is hit, which also shows the
  # levels are not fewer than intended.
  assert len(levels) == 2**bits
  # Min and max are levels themselves.
  assert levels[0] == np.min(x)
  np.testing.assert_allclose(levels[-1], np.max(x), rtol=1e-6)


def test_bits_32_is_identity():
  x = _normal(0, (5, 7))
  np.testing.assert_array_equal(quant.fake_quant(x, 32), x)
  g = _normal(1, x.shape)
  grad = jax.grad(lambda v: jnp.sum(g * quant.fake_quant(v, 32)))(x)
  np.testing.assert_array_equal(grad, g)


@pytest.mark.parametrize('bits', [0, 1, 17, 31, 33, 64, -4, 4.0, 32.0, True,
                                  False, '4', None])
def test_bad_bits_raise(bits):
  # The message names the value and the allowed ones.
  allowed = rf'{re.escape(repr(bits))} is not supported; allowed: 2\.\.16, or 32'
  with pytest.raises(ValueError, match=allowed):
    quant.check_bits(bits)
  with pytest.raises(ValueError, match=allowed):
    quant.fake_quant(jnp.ones((3,)), bits)


@pytest.mark.parametrize('bits', list(range(2, 17)) + [32])
def test_good_bits_accepted(bits):
  assert quant.check_bits(bits) == bits
  assert quant.fake_quant(jnp.arange(4.0), bits).shape == (4,)


def test_numpy_integer_bits_accepted():
  x = jnp.arange(6.0)
  assert quant.check_bits(np.int64(4)) == 4
  np.testing.assert_array_equal(quant.fake_quant(x, np.int32(4)),
                                quant.fake_quant(x, 4))


# --------------------------------------------------------------------------
# Gradients.
#
# Closed form (docs/method.md). With round's gradient the identity and the
# clip's gradient the identity for every element, q_j = round(u_j) * s + lo with
# u_j = (x_j - lo) / s gives
#   dq_j = du_j * s + round(u_j) ds + dlo
#        = (dx_j - dlo - u_j ds) + round(u_j) ds + dlo
#        = dx_j + (round(u_j) - u_j) ds,
# so the lo terms cancel and, for an upstream gradient g,
#   dL/dx_i = g_i + ds/dx_i * sum_j g_j (round(u_j) - u_j),
# where ds/dx_i = +1/(n - 1) / (#ties of the max) for the arg-max elements,
# -1/(n - 1) / (#ties of the min) for the arg-min ones, and 0 elsewhere.
# --------------------------------------------------------------------------


def _closed_form_grad(x, g, bits, range_grad=True):
  """NumPy reference of the quantizer's gradient (float64)."""
  x = np.asarray(x, np.float64)
  g = np.asarray(g, np.float64)
  n = 2**bits
  lo, hi = x.min(), x.max()
  s = (hi - lo) / (n - 1)
  u = (x - lo) / s
  residual_sum = np.sum(g * (np.round(u) - u))
  is_max = x == hi
  is_min = x == lo
  ds_dx = (is_max / is_max.sum() - is_min / is_min.sum()) / (n - 1)
  if not range_grad:
    ds_dx = np.zeros_like(x)
  return g + ds_dx * residual_sum


# Jitted once per (shape, bits, options): eager JAX compiles every primitive
# of the backward pass separately, which would dominate the test time.
@functools.partial(jax.jit,
                   static_argnames=('bits', 'axis', 'range_grad', 'fused_vjp'))
def _grad(x, g, bits, axis=None, range_grad=True, fused_vjp=False):
  return jax.grad(lambda v: jnp.sum(g * quant.fake_quant(
      v, bits, axis=axis, range_grad=range_grad, fused_vjp=fused_vjp)))(x)


_jit_fake_quant = jax.jit(
    quant.fake_quant,
    static_argnames=('bits', 'axis', 'range_grad', 'fused_vjp'))


@pytest.mark.parametrize('bits', [2, 4, 5, 8])
def test_grad_matches_closed_form(bits):
  x = _normal(bits, (6, 9))
  g = _normal(100 + bits, x.shape)
  expected = _closed_form_grad(x, g, bits)
  np.testing.assert_allclose(_grad(x, g, bits), expected, rtol=1e-5,
                             atol=1e-5)


def test_min_and_max_get_the_range_term():
  x = _np([0.13, -2.0, 0.97, 1.61, 4.0, -0.77, 2.37])
  g = _np([0.5, -1.0, 2.0, 0.25, 1.5, -0.75, 1.0])
  bits = 4
  grad = np.asarray(_grad(jnp.asarray(x), jnp.asarray(g), bits))
  # By hand: lo = -2, hi = 4, s = 6 / 15 = 0.4, u = (x + 2) / 0.4
  #   = [5.325, 0, 7.425, 9.025, 15, 3.075, 10.925]
  # round(u) - u = [-.325, 0, -.425, -.025, 0, -.075, .075]
  # sum_j g_j (round(u_j) - u_j)
  #   = -.1625 - .85 - .00625 + .05625 + .075 = -.8875
  residual_sum = -0.8875
  extra = grad - g
  i_min, i_max = 1, 4
  np.testing.assert_allclose(extra[i_max], residual_sum / 15, rtol=1e-5)
  np.testing.assert_allclose(extra[i_min], -residual_sum / 15, rtol=1e-5)
  # Every other element gets only the identity term (up to the float32
  # rounding of (g * s) / s).
  others = np.ones_like(x, bool)
  others[[i_min, i_max]] = False
  np.testing.assert_allclose(extra[others], 0.0, atol=1e-6)


def test_ties_share_the_range_term_evenly():
  # Two elements tie for the max and three for the min.
  x = _np([5.0, -1.0, 0.37, 5.0, -1.0, 2.71, -1.0, 1.13])
  g = _np([0.2, 0.4, 1.3, -0.7, 0.1, 0.9, -0.3, 1.7])
  bits = 4
  grad = np.asarray(_grad(jnp.asarray(x), jnp.asarray(g), bits))
  u = (x.astype(np.float64) + 1.0) / (6.0 / 15)
  residual_sum = np.sum(g * (np.round(u) - u))
  assert abs(residual_sum) > 0.05
  extra = grad - g
  np.testing.assert_allclose(extra[[0, 3]], residual_sum / 15 / 2, rtol=1e-5)
  np.testing.assert_allclose(extra[[1, 4, 6]], -residual_sum / 15 / 3,
                             rtol=1e-5)
  np.testing.assert_allclose(extra[[2, 5, 7]], 0.0, atol=1e-6)
  np.testing.assert_allclose(grad, _closed_form_grad(x, g, bits), rtol=1e-5,
                             atol=1e-6)


def test_every_element_gets_the_full_identity_term():
  # On the grid every residual is zero, so the gradient must be g itself,
  # including at the min and the max (jnp.clip would pass only g / 2 there).
  x = _np([0.0, 3.0, 15.0, 7.0, 0.0, 15.0, 12.0])
  g = _np([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
  grad = _grad(jnp.asarray(x), jnp.asarray(g), 4)
  np.testing.assert_array_equal(grad, g)


@pytest.mark.parametrize('bits', [2, 4, 5])
def test_range_grad_false_is_pure_ste(bits):
  x = _normal(bits, (4, 11))
  g = _normal(7, x.shape)
  grad = _grad(x, g, bits, range_grad=False)
  # Exactly g up to the float32 rounding of (g * s) / s.
  np.testing.assert_allclose(grad, g, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
      grad, _closed_form_grad(x, g, bits, range_grad=False), rtol=1e-6,
      atol=1e-7)
  # Forward values do not depend on the switch.
  np.testing.assert_array_equal(quant.fake_quant(x, bits, range_grad=False),
                                quant.fake_quant(x, bits))


@pytest.mark.parametrize('range_grad', [True, False])
def test_constant_tensor_unchanged_with_finite_grad(range_grad):
  x = jnp.full((3, 4), 0.7, jnp.float32)
  q = quant.fake_quant(x, 4, range_grad=range_grad)
  np.testing.assert_array_equal(q, x)
  g = jnp.arange(12.0).reshape(3, 4)
  grad = _grad(x, g, 4, range_grad=range_grad)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad, g)


# --------------------------------------------------------------------------
# Transformations, dtypes, per-channel ranges, round_ste.
# --------------------------------------------------------------------------


def test_jit_matches_eager():
  x = _normal(0, (8, 8))
  jitted = jax.jit(quant.fake_quant, static_argnames=('bits',))
  _assert_same_levels(jitted(x, bits=4), quant.fake_quant(x, 4))
  g = _normal(1, x.shape)
  # _grad is jitted; the eager gradient must agree with it.
  eager_grad = jax.grad(lambda v: jnp.sum(g * quant.fake_quant(v, 4)))(x)
  np.testing.assert_allclose(eager_grad, _grad(x, g, 4), rtol=1e-5,
                             atol=1e-6)


def test_vmap_gives_each_example_its_own_range():
  xs = _normal(0, (3, 5, 6))
  xs = xs * jnp.array([0.1, 1.0, 10.0])[:, None, None]
  q = jax.vmap(functools.partial(quant.fake_quant, bits=4))(xs)
  for i in range(3):
    _assert_same_levels(q[i], _jit_fake_quant(xs[i], bits=4))
  g = _normal(1, xs.shape)
  grads = jax.vmap(lambda x, g: _grad(x, g, 4))(xs, g)
  for i in range(3):
    np.testing.assert_allclose(grads[i], _closed_form_grad(xs[i], g[i], 4),
                               rtol=1e-5, atol=1e-5)


def test_second_order_grad_is_defined():
  # grad of grad runs (the STE makes the second derivative ~0, but it must
  # trace and be finite).
  x = _normal(0, (7,))
  f = lambda v: jnp.sum(jnp.sin(quant.fake_quant(v, 4)))
  hvp = jax.jit(jax.grad(lambda v: jnp.sum(jax.grad(f)(v))))(x)
  assert np.all(np.isfinite(hvp))


@pytest.mark.parametrize('bits', [2, 4, 5, 8])
def test_bfloat16_matches_float32_then_cast(bits):
  x = _normal(bits, (16, 16)).astype(jnp.bfloat16)
  q = quant.fake_quant(x, bits)
  assert q.dtype == jnp.bfloat16
  expected = quant.fake_quant(x.astype(jnp.float32), bits).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(q, np.float32),
                                np.asarray(expected, np.float32))
  # The autodiff gradient stays in bfloat16 and follows the float32 one.
  g = _normal(bits + 1, x.shape)
  grad = jax.grad(lambda v: jnp.sum(quant.fake_quant(v, bits) * g))
  dx = grad(x)
  assert dx.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(dx, np.float32)))
  dx32 = grad(x.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(dx, np.float32), dx32,
                             atol=0.05 * np.abs(dx32).max())


@pytest.mark.parametrize('axis', [-1, 0, (0, 3)])
def test_per_channel_axis_matches_per_slice_loop(axis):
  # An HWIO kernel; each kept slice has its own range.
  w = _normal(0, (3, 3, 4, 5))
  w = w * jnp.arange(1.0, 6.0)  # Different scales per output channel.
  g = _normal(1, w.shape)
  keep = (axis,) if isinstance(axis, int) else axis
  keep = tuple(a % w.ndim for a in keep)
  moved = jnp.moveaxis(w, keep, range(len(keep)))
  moved_g = jnp.moveaxis(g, keep, range(len(keep)))
  lead = moved.shape[:len(keep)]
  q = _jit_fake_quant(w, bits=4, axis=axis)
  grad = _grad(w, g, 4, axis=axis)
  q_moved = jnp.moveaxis(q, keep, range(len(keep)))
  grad_moved = jnp.moveaxis(grad, keep, range(len(keep)))
  for idx in np.ndindex(*lead):
    _assert_same_levels(q_moved[idx], _jit_fake_quant(moved[idx], bits=4))
    np.testing.assert_allclose(
        grad_moved[idx], _closed_form_grad(moved[idx], moved_g[idx], 4),
        rtol=1e-5, atol=1e-5)


def test_per_channel_constant_slice_unchanged():
  w = jnp.stack([jnp.full((3, 3), 2.0), jnp.arange(9.0).reshape(3, 3)], -1)
  q = _jit_fake_quant(w, bits=2, axis=-1)
  np.testing.assert_array_equal(q[..., 0], w[..., 0])
  g = jnp.arange(18.0).reshape(w.shape)
  grad = _grad(w, g, 2, axis=-1)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad[..., 0], g[..., 0])


def test_round_ste_is_custom_vjp_with_identity_grad():
  assert isinstance(quant.round_ste, jax.custom_vjp)
  x = _np([-1.5, -0.4, 0.5, 0.6, 1.5, 2.49])
  np.testing.assert_array_equal(quant.round_ste(jnp.asarray(x)),
                                _np([-2.0, -0.0, 0.0, 1.0, 2.0, 2.0]))
  g = _np([1.0, -2.0, 3.0, 0.5, 0.25, 7.0])
  grad = jax.grad(lambda v: jnp.sum(g * quant.round_ste(v)))(jnp.asarray(x))
  np.testing.assert_array_equal(grad, g)


def _rounding_cases(dtype):
  """Ties, their neighbours one ulp away, signed zeros, large and special
  values, and random values of both signs, in ``dtype``."""
  halves = np.arange(-40.0, 40.5, 0.5)
  rng = np.random.default_rng(0)
  info = np.finfo(dtype)
  values = np.concatenate([
      halves, rng.uniform(-300.0, 300.0, 20000), rng.uniform(-1, 1, 5000),
      [0.0, -0.0, np.inf, -np.inf, np.nan, float(info.max),
       -float(info.max), float(info.tiny), -float(info.tiny)],
      [v for v in (2.0**22 + 0.5, 2.0**23 - 0.5, 2.0**24)
       if v < float(info.max)]]).astype(dtype)
  neighbours = [np.nextafter(halves.astype(dtype), to).astype(dtype)
                for to in (np.asarray(np.inf, dtype), np.asarray(-np.inf,
                                                                 dtype))]
  return np.concatenate([values] + neighbours)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'float16'])
def test_round_half_even_is_numpy_round_bit_for_bit(dtype):
  # Bits compared, so that the sign of a zero (round(-0.3) == -0.0) and NaN
  # count; NumPy's rounding (half to even) is the reference.
  np_dtype = jnp.dtype(dtype)
  x = _rounding_cases(np_dtype)
  want = np.round(x.astype(np.float64)).astype(np_dtype)
  bits = lambda a: np.asarray(a).view(f'uint{8 * np_dtype.itemsize}')
  for fn in (quant.round_half_even, jax.jit(quant.round_half_even)):
    got = fn(jnp.asarray(x))
    assert got.dtype == np_dtype
    np.testing.assert_array_equal(bits(got), bits(want))


# --------------------------------------------------------------------------
# fused_vjp: the hand-derived backward pass (opt-in speed-up).
# --------------------------------------------------------------------------


@pytest.mark.parametrize('bits', [2, 4, 5, 8])
def test_fused_vjp_same_values_and_closed_form_grad(bits):
  x = _normal(bits, (6, 9))
  g = _normal(100 + bits, x.shape)
  np.testing.assert_array_equal(
      _jit_fake_quant(x, bits=bits, fused_vjp=True),
      _jit_fake_quant(x, bits=bits))
  fused = _grad(x, g, bits, fused_vjp=True)
  np.testing.assert_allclose(fused, _closed_form_grad(x, g, bits), rtol=1e-5,
                             atol=1e-5)
  # Autodiff differs only by float32 rounding (e.g. (g * s) / s).
  np.testing.assert_allclose(fused, _grad(x, g, bits), rtol=1e-5, atol=1e-5)


def test_fused_vjp_by_hand_with_ties():
  # The worked example of test_ties_share_the_range_term_evenly: two ties
  # for the max, three for the min.
  x = _np([5.0, -1.0, 0.37, 5.0, -1.0, 2.71, -1.0, 1.13])
  g = _np([0.2, 0.4, 1.3, -0.7, 0.1, 0.9, -0.3, 1.7])
  grad = np.asarray(_grad(jnp.asarray(x), jnp.asarray(g), 4, fused_vjp=True))
  u = (x.astype(np.float64) + 1.0) / (6.0 / 15)
  residual_sum = np.sum(g * (np.round(u) - u))
  extra = grad - g
  np.testing.assert_allclose(extra[[0, 3]], residual_sum / 15 / 2, rtol=1e-5)
  np.testing.assert_allclose(extra[[1, 4, 6]], -residual_sum / 15 / 3,
                             rtol=1e-5)
  np.testing.assert_array_equal(extra[[2, 5, 7]], 0.0)


def test_fused_vjp_range_end_matched_by_no_element_is_dropped_not_nan():
  # The backward pass given a residual max that no element of x equals (as
  # when XLA recomputes x with other rounding than the forward's max): the
  # max's share of the range term is dropped, the min's kept, nothing NaN.
  x = _np([-1.0, 0.37, 2.71, 1.13])
  g = _np([0.2, 1.3, 0.9, -0.3])
  lo, hi = -1.0, 2.71 + 1e-3
  scale = (hi - lo) / 15
  residuals = (jnp.asarray(x), jnp.float32(lo), jnp.float32(hi),
               jnp.float32(scale), jnp.asarray(False))
  (dx,) = quant._fused_bwd(4, residuals, jnp.asarray(g))  # pylint: disable=protected-access
  u = (x.astype(np.float64) - lo) / scale
  c = np.sum(g * (np.round(u) - u)) / 15
  np.testing.assert_allclose(dx, g - c * np.array([1.0, 0, 0, 0]), rtol=1e-5,
                             atol=1e-7)


@pytest.mark.parametrize('axis', [None, -1, (0, 3)])
def test_range_gradient_is_jax_min_max_rule_bit_for_bit(axis):
  # tensor_range's min and max carry their own JVP (for the guard below);
  # where elements match, it is jnp.min's and jnp.max's: the tangent shared
  # evenly among ties (many here), the same values bit for bit.
  x = np.random.default_rng(0).integers(-3, 4, (3, 4, 5, 6))
  x = jnp.asarray(x * 0.7, jnp.float32)
  keep = () if axis is None else {a % 4 for a in np.atleast_1d(axis)}
  reduce_axes = tuple(a for a in range(4) if a not in keep)

  def loss(lo, hi):
    return jnp.sum(jnp.sin(lo) * 3.0 + jnp.cos(hi) * 2.0)

  def ours(x):
    return loss(*quant.tensor_range(x, axis))

  def reference(x):
    return loss(jnp.min(x, axis=reduce_axes, keepdims=True),
                jnp.max(x, axis=reduce_axes, keepdims=True))

  for transform in (lambda f: f, jax.jit):
    np.testing.assert_array_equal(transform(jax.grad(ours))(x),
                                  transform(jax.grad(reference))(x))


def test_range_end_matched_by_no_element_counts_one_not_zero():
  # The autodiff path's guard (as the fused one's, above): a min or max that
  # no element equals once XLA recomputes x gets no tangent, not 0 / 0.
  x = jnp.asarray([[-1.0, 0.37], [2.71, 2.71]])
  mask, count = quant._ties(x, jnp.float32(3.0), None)  # pylint: disable=protected-access
  np.testing.assert_array_equal(mask, np.zeros((2, 2)))
  np.testing.assert_array_equal(count, [[1.0]])
  mask, count = quant._ties(x, jnp.max(x, axis=1, keepdims=True), 1)  # pylint: disable=protected-access
  np.testing.assert_array_equal(mask, [[0.0, 1.0], [1.0, 1.0]])
  np.testing.assert_array_equal(count, [[1.0], [2.0]])


def test_fused_vjp_constant_tensor_and_bfloat16():
  x = jnp.full((3, 4), 0.7, jnp.float32)
  g = jnp.arange(12.0).reshape(3, 4)
  np.testing.assert_array_equal(quant.fake_quant(x, 4, fused_vjp=True), x)
  np.testing.assert_array_equal(_grad(x, g, 4, fused_vjp=True), g)
  xb = _normal(3, (16, 16)).astype(jnp.bfloat16)
  q = quant.fake_quant(xb, 4, fused_vjp=True)
  assert q.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(q, np.float32),
                                np.asarray(quant.fake_quant(xb, 4), np.float32))
  gb = jax.grad(lambda v: jnp.sum(quant.fake_quant(v, 4, fused_vjp=True)))(xb)
  assert gb.dtype == jnp.bfloat16


def test_fused_vjp_under_vmap_and_ignored_where_it_does_not_apply():
  xs = _normal(0, (3, 5, 6)) * jnp.array([0.1, 1.0, 10.0])[:, None, None]
  g = _normal(1, xs.shape)
  grads = jax.vmap(lambda x, g: _grad(x, g, 4, fused_vjp=True))(xs, g)
  for i in range(3):
    np.testing.assert_allclose(grads[i], _closed_form_grad(xs[i], g[i], 4),
                               rtol=1e-5, atol=1e-5)
  # Per-channel ranges and range_grad=False keep the autodiff path.
  w = _normal(2, (3, 3, 4, 5))
  gw = _normal(4, w.shape)
  for kwargs in (dict(axis=-1), dict(range_grad=False)):
    np.testing.assert_array_equal(_grad(w, gw, 4, fused_vjp=True, **kwargs),
                                  _grad(w, gw, 4, **kwargs))


# --------------------------------------------------------------------------
# API edges: integer inputs and traced bit widths are refused clearly.
# --------------------------------------------------------------------------


_ARRAY_FUNCTIONS = {
    'fake_quant': lambda x, bits: quant.fake_quant(x, bits),
    'fake_quant_fused': quant.fake_quant_fused,
    'quantize': lambda x, bits: quant.quantize(x, bits, 0.0, 3.0),
    'fake_quant_range': lambda x, bits: quant.fake_quant_range(
        x, bits, 0.0, 3.0),
}


@pytest.mark.parametrize('name', sorted(_ARRAY_FUNCTIONS))
@pytest.mark.parametrize('dtype', [jnp.int32, jnp.uint8, jnp.bool_])
def test_non_float_input_is_a_type_error_naming_the_dtype(name, dtype):
  # Before this check, fake_quant(int array) returned the result cast back to
  # integers: truncated levels, no error.
  x = jnp.asarray([0, 1, 2, 3]).astype(dtype)
  message = (rf'{name} needs a floating-point array .*got dtype '
             rf'{np.dtype(dtype).name}')
  with pytest.raises(TypeError, match=message):
    _ARRAY_FUNCTIONS[name](x, 4)
  # Also when traced, and also at 32 bits (fake_quant would otherwise return
  # the integers unchanged under a float-only contract).
  with pytest.raises(TypeError, match=message):
    jax.jit(lambda v: _ARRAY_FUNCTIONS[name](v, 4))(x)
  if name in ('fake_quant', 'fake_quant_range'):
    with pytest.raises(TypeError, match=message):
      _ARRAY_FUNCTIONS[name](x, 32)


def test_python_and_numpy_float_inputs_still_accepted():
  x = np.asarray([0.0, 1.2, 3.0], np.float32)
  # NumPy float32 input: same levels as the jnp array (s = 0.2 at 4 bits).
  np.testing.assert_allclose(quant.fake_quant(x, 4), [0.0, 1.2, 3.0],
                             rtol=0, atol=1e-6)
  assert quant.fake_quant(jnp.asarray(x, jnp.float16), 4).dtype == jnp.float16


@pytest.mark.parametrize('name', sorted(_ARRAY_FUNCTIONS))
def test_traced_bits_names_the_fix_not_the_tracer(name):
  x = jnp.arange(4.0)
  with pytest.raises(TypeError) as info:
    jax.jit(_ARRAY_FUNCTIONS[name])(x, 4)
  message = str(info.value)
  assert 'bits must be a Python int known at trace time' in message
  assert 'static_argnames' in message
  # The old message printed the tracer ('Traced<ShapedArray...>').
  assert 'Traced' not in message and 'allowed' not in message


def test_concrete_jax_array_bits_is_the_same_type_error():
  with pytest.raises(TypeError, match=r'bits must be a Python int known at '
                     r'trace time, not a JAX array \(got int32\[\]\)'):
    quant.fake_quant(jnp.arange(4.0), jnp.int32(4))
  with pytest.raises(TypeError, match=r'config\.bits_w must be a Python int'):
    quant.check_bits(jnp.asarray(4), name='config.bits_w')


def test_static_bits_under_jit_still_work():
  x = _np([0.0, 0.4, 0.7, 15.0])
  f = jax.jit(lambda v, b: quant.fake_quant(v, b), static_argnums=1)
  np.testing.assert_array_equal(f(jnp.asarray(x), 4), _np([0, 0, 1, 15]))
