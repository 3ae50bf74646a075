"""Fake quantization: the paper's min-max asymmetric uniform quantizer.

Pure functions of arrays; this module imports only jax so it can be reused
outside Flax (see docs/method.md, "The quantizer").

For a tensor ``x`` and bit width ``k``::

  lo, hi = min(x), max(x)            # over the whole tensor
  s      = (hi - lo) / (2**k - 1)
  q(x)   = round((clip(x, lo, hi) - lo) / s) * s + lo

``round`` is the only non-differentiable op and gets the identity gradient
(straight-through estimator). ``lo`` and ``hi`` stay in the autodiff graph, so
the arg-min and arg-max elements receive, besides the identity term, gradient
through ``s`` weighted by the rounding residual ``round(u) - u``. This is what
the authors' PyTorch code computes, and it is the default here.
"""

import functools
import numbers

import jax
import jax.numpy as jnp

FULL_PRECISION = 32
ALLOWED_BITS = tuple(range(2, 17)) + (FULL_PRECISION,)


def round_half_even(x):
  """``jnp.round(x)`` (half to even), bit for bit, from fusible operations.

  XLA:CPU compiles ``round-nearest-even`` as a kernel of its own, so the
  quantizer's ``(x - lo) / s`` is written to memory, read back and rounded
  in a separate pass; ``floor``, compares and selects fuse into the
  surrounding elementwise loop. ``x - floor(x)`` is exact (Sterbenz) except
  for ``-1 < x < 0``, where its rounding can only land on ``0.5`` or above
  and the result (a zero) is still right. A zero result takes the sign of
  ``x * 0``, as ``jnp.round``'s does (``round(-0.3) == -0.0``): a multiply
  rather than ``copysign``, whose sign-bit test has no ONNX translation.
  Infinities and NaN pass through. Tested against NumPy's rounding, bit for
  bit, in tests/test_quant.py.

  Args:
    x: floating-point array.

  Returns:
    ``jnp.round(x)``.
  """
  r = jnp.floor(x)
  frac = x - r
  r_is_odd = r - 2 * jnp.floor(r * 0.5) == 1
  up = (frac > 0.5) | ((frac == 0.5) & r_is_odd)
  rounded = jnp.where(up, r + 1, r)
  return jnp.where(rounded == 0, x * 0, rounded)


@jax.custom_vjp
def round_ste(x):
  """Rounds half to even, with the identity as its gradient.

  Args:
    x: floating-point array.

  Returns:
    ``jnp.round(x)`` (computed by ``round_half_even``); its vector-Jacobian
    product passes the cotangent through unchanged (straight-through
    estimator).
  """
  return round_half_even(x)


def _round_ste_fwd(x):
  return round_half_even(x), None


def _round_ste_bwd(_, g):
  return (g,)


round_ste.defvjp(_round_ste_fwd, _round_ste_bwd)


def check_bits(bits, name='bits'):
  """Raises unless ``bits`` is an allowed bit width known at trace time.

  Args:
    bits: the bit width to check.
    name: how the value is called in the error message (e.g. a config field).

  Returns:
    ``bits`` unchanged.

  Raises:
    TypeError: if ``bits`` is a JAX array (e.g. a traced jit argument): the
      bit width selects Python branches and constants of the computation, so it
      must be a Python value when the function is traced.
    ValueError: if ``bits`` is not 2..16 or 32.
  """
  if isinstance(bits, jax.Array):
    # A tracer's repr says nothing useful to the caller; name the fix instead.
    raise TypeError(
        f'{name} must be a Python int known at trace time, not a JAX array '
        f'(got {bits.dtype}{list(bits.shape)}); pass it as a static argument, '
        "e.g. jax.jit(f, static_argnames='bits').")
  # Any integer type (NumPy's included, as configs loaded from arrays hold);
  # bool is an int subclass but never a bit width.
  if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or (
      bits not in ALLOWED_BITS):
    raise ValueError(
        f'{name}={bits!r} is not supported; allowed: 2..16, or 32 for full '
        'precision.')
  return bits


def check_float(x, name):
  """Raises TypeError unless ``x`` has a floating-point dtype.

  The quantizer's arithmetic (range, step, rounding) is defined on real
  values; on an integer array it would silently truncate the result back to
  integers, so integer (and bool, complex) inputs are refused.

  Args:
    x: array (or scalar) to check.
    name: the function that needs it, for the error message.

  Returns:
    ``x`` unchanged.
  """
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f'{name} needs a floating-point array (float32, bfloat16, '
                    f'...); got dtype {dtype}. Cast it first, e.g. '
                    'x.astype(jnp.float32).')
  return x


def _clip_identity_grad(x, lo, hi):
  # The clip is a no-op on the tensor's own range. The authors' framework
  # passed the identity gradient to every element, the bounds included, and no
  # gradient to lo/hi through the clip; jnp.clip would give only half of it to
  # elements equal to a bound.
  return x + jax.lax.stop_gradient(jnp.clip(x, lo, hi) - x)


def fake_quant(x, bits, *, axis=None, range_grad=True, fused_vjp=False):
  """Quantizes ``x`` to ``bits`` bits and maps it back to floats.

  Args:
    x: floating-point array (float32 or bfloat16; the range is computed in
      float32 whatever the input dtype).
    bits: 2..16, or 32 for the identity; an integer known at trace time
      (Python or NumPy int, not a traced value).
    axis: ``None`` (paper: one range for the whole tensor) or an int or tuple
      of ints naming the axes that keep their own range (e.g. ``-1`` for the
      output channels of an HWIO convolution kernel). Opt-in.
    range_grad: whether gradient flows into the range ends ``lo``/``hi``
      (paper: True). False stops it, leaving the pure straight-through
      estimator. Opt-in.
    fused_vjp: compute the paper's gradient (per-tensor range, ``range_grad``)
      with the hand-derived backward pass of ``fake_quant_fused`` instead of
      autodiff through the range: same values, same gradient up to float32
      rounding, fewer passes over the tensor and less saved memory. Ignored
      with ``axis`` or ``range_grad=False``. Opt-in.

  Returns:
    Array of the same shape and dtype as ``x`` with at most ``2**bits``
    distinct values per range. A constant tensor (or slice, with ``axis``) is
    returned unchanged.

  Raises:
    TypeError: if ``x`` is not floating-point or ``bits`` is traced.
    ValueError: if ``bits`` is not allowed.
  """
  check_bits(bits)
  check_float(x, 'fake_quant')
  if bits == FULL_PRECISION:
    return x
  if fused_vjp and axis is None and range_grad:
    return fake_quant_fused(x, bits)
  dtype = x.dtype
  xf = x.astype(jnp.float32)
  lo, hi = tensor_range(xf, axis)
  if not range_grad:
    lo = jax.lax.stop_gradient(lo)
    hi = jax.lax.stop_gradient(hi)
  scale = (hi - lo) / (2**bits - 1)
  # A constant tensor has scale 0: divide by 1 instead and return x itself, so
  # neither the value nor the gradient becomes NaN.
  degenerate = scale <= 0
  safe_scale = jnp.where(degenerate, 1.0, scale)
  u = (_clip_identity_grad(xf, lo, hi) - lo) / safe_scale
  q = round_ste(u) * safe_scale + lo
  return jnp.where(degenerate, xf, q).astype(dtype)


def fake_quant_fused(x, bits):
  """``fake_quant(x, bits)`` (per tensor, range gradient) with its own VJP.

  Autodiff through ``min``/``max`` and the scale keeps several intermediates
  of the tensor's size and walks it several times. The gradient docs/method.md
  specifies has a closed form: with ``u = (x - lo) / s``, ``n = 2**bits - 1``
  and ``t = sum(g * (round(u) - u))``::

    dx = g + t / n * ([x == hi] / #(x == hi) - [x == lo] / #(x == lo))

  (the identity for every element; the range term shared evenly among ties
  of the max and of the min, as ``jnp.max``'s own gradient does; the
  ``lo`` terms of the other elements cancel). The backward pass is then one
  reduction and one elementwise pass, saving only ``x`` and three scalars.

  Args:
    x: floating-point array (range and arithmetic in float32).
    bits: 2..16 (Python int).

  Returns:
    The values of ``fake_quant(x, bits)``.

  Raises:
    TypeError: if ``x`` is not floating-point or ``bits`` is traced.
    ValueError: if ``bits`` is not 2..16.
  """
  # Checked here, outside the custom_vjp: a traced bits would otherwise meet
  # JAX's own error about nondiff_argnums first.
  check_bits(bits)
  check_float(x, 'fake_quant_fused')
  return _fused(x, bits)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fused(x, bits):
  return _fused_fwd(x, bits)[0]


def _fused_fwd(x, bits):
  xf = x.astype(jnp.float32)
  lo, hi = jnp.min(xf), jnp.max(xf)
  scale = (hi - lo) / (2**bits - 1)
  degenerate = scale <= 0
  safe_scale = jnp.where(degenerate, 1.0, scale)
  # x lies in [lo, hi] by construction: no clip needed.
  q = jnp.where(degenerate, xf, round_half_even((xf - lo) / safe_scale) *
                safe_scale + lo)
  return q.astype(x.dtype), (x, lo, hi, safe_scale, degenerate)


def _fused_bwd(bits, residuals, g):
  x, lo, hi, safe_scale, degenerate = residuals
  xf, gf = x.astype(jnp.float32), g.astype(jnp.float32)
  u = (xf - lo) / safe_scale
  t = jnp.sum(gf * (round_half_even(u) - u))
  # Three separate sums. One sum over the three terms stacked wrote and read
  # less, but inside a training step on jaxlib 0.10's XLA:CPU it counted no
  # element equal to hi where a separate sum counted one (the gradient became
  # NaN); not explained (the reduction, or x recomputed in that fusion with
  # other rounding), so not used.
  is_hi, n_hi = _ties(xf, hi, None)
  is_lo, n_lo = _ties(xf, lo, None)
  c = jnp.where(degenerate, 0.0, t / (2**bits - 1))
  dx = gf + c * (is_hi / n_hi - is_lo / n_lo)
  return (dx.astype(g.dtype),)


_fused.defvjp(_fused_fwd, _fused_bwd)


# --------------------------------------------------------------------------
# Given ranges and integer codes (static activation ranges, export, integer
# inference). Same arithmetic as ``fake_quant``: the code of x is
# round((clip(x, lo, hi) - lo) / s), its value code * s + lo.


def tensor_range(x, axis=None):
  """``(lo, hi)``: float32 min and max of ``x``, as ``fake_quant`` takes them.

  Args:
    x: array.
    axis: ``None`` (one range for the tensor) or the axis/axes that keep their
      own range (as in ``fake_quant``).

  Returns:
    ``(lo, hi)`` with keepdims shapes (all ones for ``axis=None``).
  """
  xf = x.astype(jnp.float32)
  if axis is None:
    reduce_axes = None
  else:
    keep = {a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)}
    reduce_axes = tuple(a for a in range(x.ndim) if a not in keep)
  return (_extreme(xf, reduce_axes, False), _extreme(xf, reduce_axes, True))


def _ties(x, end, axes):
  """Where ``x`` equals its reduction ``end``, and how often (at least 1).

  At least one element equals its min (max) by construction, but XLA:CPU may
  recompute ``x``'s producers (BatchNorm, ReLU) inside a backward pass and
  round them otherwise than in the forward's reduction (seen with
  --xla_backend_optimization_level=0): then no element matches, and a count
  of 0 would make the whole step's gradient NaN. A count of at least 1 drops
  that end's range term instead.

  Args:
    x: float32 array.
    end: its min or max over ``axes``, keepdims.
    axes: the reduced axes (``None``: all).

  Returns:
    ``(mask, count)``: float32 ``x == end`` and its sum over ``axes``
    (keepdims), floored at 1.
  """
  mask = (x == end).astype(jnp.float32)
  return mask, jnp.maximum(jnp.sum(mask, axis=axes, keepdims=True), 1.0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _extreme(x, axes, largest):
  """``jnp.max`` (``largest``) or ``jnp.min`` of ``x`` over ``axes``, keepdims.

  Its derivative is JAX's own for ``max``/``min`` (the tangent shared evenly
  among the elements equal to the result; same operations, same values),
  except that no match gives 0 where JAX divides by a count of 0 (``_ties``).
  """
  return (jnp.max if largest else jnp.min)(x, axis=axes, keepdims=True)


@_extreme.defjvp
def _extreme_jvp(axes, largest, primals, tangents):
  (x,), (dx,) = primals, tangents
  end = _extreme(x, axes, largest)
  mask, count = _ties(x, end, axes)
  return end, jnp.sum(dx * mask, axis=axes, keepdims=True) / count


def range_scale(lo, hi, bits):
  """Step ``s = (hi - lo) / (2**bits - 1)`` (float32)."""
  return (jnp.asarray(hi, jnp.float32) - jnp.asarray(lo, jnp.float32)) / (
      2**bits - 1)


def quantize(x, bits, lo, hi):
  """Integer codes of ``x`` on the grid of ``[lo, hi]``.

  Args:
    x: floating-point array.
    bits: 2..16.
    lo: lower range end (broadcastable to ``x``).
    hi: upper range end; ``hi == lo`` (a constant range) gives code 0.

  Returns:
    int32 array ``round((clip(x, lo, hi) - lo) / s)`` in ``[0, 2**bits - 1]``
    (round half to even, as ``fake_quant``).

  Raises:
    TypeError: if ``x`` is not floating-point or ``bits`` is traced.
    ValueError: if ``bits`` is not 2..16.
  """
  check_bits(bits)
  check_float(x, 'quantize')
  if bits == FULL_PRECISION:
    raise ValueError('quantize needs bits < 32.')
  lo = jnp.asarray(lo, jnp.float32)
  hi = jnp.asarray(hi, jnp.float32)
  scale = range_scale(lo, hi, bits)
  safe_scale = jnp.where(scale <= 0, 1.0, scale)
  u = (jnp.clip(x.astype(jnp.float32), lo, hi) - lo) / safe_scale
  return jnp.clip(round_half_even(u), 0, 2**bits - 1).astype(jnp.int32)


def dequantize(codes, bits, lo, hi):
  """``codes * s + lo`` in float32 (``s`` as in ``quantize``)."""
  lo = jnp.asarray(lo, jnp.float32)
  return codes.astype(jnp.float32) * range_scale(lo, hi, bits) + lo


def fake_quant_range(x, bits, lo, hi):
  """Fake quantization with a given (static) range ``[lo, hi]``.

  The forward value is ``dequantize(quantize(x, bits, lo, hi), bits, lo,
  hi)``: values outside the range are clipped to it. Gradient: the
  straight-through estimator inside ``[lo, hi]`` (bounds included), zero
  outside; none reaches ``lo``/``hi`` (they are statistics, not parameters).

  Args:
    x: floating-point array.
    bits: 2..16, or 32 for the identity.
    lo: lower end, a scalar (or broadcastable array).
    hi: upper end; ``hi <= lo`` gives the constant ``lo``, without NaN.

  Returns:
    Array of the shape and dtype of ``x``.

  Raises:
    TypeError: if ``x`` is not floating-point or ``bits`` is traced.
    ValueError: if ``bits`` is not allowed.
  """
  check_bits(bits)
  check_float(x, 'fake_quant_range')
  if bits == FULL_PRECISION:
    return x
  dtype = x.dtype
  xf = x.astype(jnp.float32)
  lo = jax.lax.stop_gradient(jnp.asarray(lo, jnp.float32))
  hi = jax.lax.stop_gradient(jnp.asarray(hi, jnp.float32))
  scale = range_scale(lo, hi, bits)
  safe_scale = jnp.where(scale <= 0, 1.0, scale)
  inside = (xf >= lo) & (xf <= hi)
  clipped = jnp.where(inside, xf, jax.lax.stop_gradient(jnp.clip(xf, lo, hi)))
  u = (clipped - lo) / safe_scale
  q = round_ste(u) * safe_scale + lo
  return jnp.where(scale <= 0, lo, q).astype(dtype)
