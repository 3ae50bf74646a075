"""Fake quantization: the paper's min-max asymmetric uniform quantizer.

Pure functions of arrays; this module imports only jax so it can be reused
outside Flax (see ../shared/METHOD.md, "Quantizer").

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

import jax
import jax.numpy as jnp

FULL_PRECISION = 32
ALLOWED_BITS = tuple(range(2, 17)) + (FULL_PRECISION,)


@jax.custom_vjp
def round_ste(x):
  """Rounds half to even, with the identity as its gradient.

  Args:
    x: array.

  Returns:
    ``jnp.round(x)``; its vector-Jacobian product passes the cotangent through
    unchanged (straight-through estimator).
  """
  return jnp.round(x)


def _round_ste_fwd(x):
  return jnp.round(x), None


def _round_ste_bwd(_, g):
  return (g,)


round_ste.defvjp(_round_ste_fwd, _round_ste_bwd)


def check_bits(bits, name='bits'):
  """Raises ValueError unless ``bits`` is an allowed bit width.

  Args:
    bits: the bit width to check.
    name: how the value is called in the error message (e.g. a config field).

  Returns:
    ``bits`` unchanged.
  """
  if isinstance(bits, bool) or not isinstance(bits, int) or (
      bits not in ALLOWED_BITS):
    raise ValueError(
        f'{name}={bits!r} is not supported; allowed: 2..16, or 32 for full '
        'precision.')
  return bits


def _clip_identity_grad(x, lo, hi):
  # The clip is a no-op on the tensor's own range. The authors' framework
  # passed the identity gradient to every element, the bounds included, and no
  # gradient to lo/hi through the clip; jnp.clip would give only half of it to
  # elements equal to a bound.
  return x + jax.lax.stop_gradient(jnp.clip(x, lo, hi) - x)


def fake_quant(x, bits, *, axis=None, range_grad=True):
  """Quantizes ``x`` to ``bits`` bits and maps it back to floats.

  Args:
    x: floating-point array (float32 or bfloat16; the range is computed in
      float32 whatever the input dtype).
    bits: 2..16, or 32 for the identity. Must be a Python int.
    axis: ``None`` (paper: one range for the whole tensor) or an int or tuple
      of ints naming the axes that keep their own range (e.g. ``-1`` for the
      output channels of an HWIO convolution kernel). Opt-in.
    range_grad: whether gradient flows into the range ends ``lo``/``hi``
      (paper: True). False stops it, leaving the pure straight-through
      estimator. Opt-in.

  Returns:
    Array of the same shape and dtype as ``x`` with at most ``2**bits``
    distinct values per range. A constant tensor (or slice, with ``axis``) is
    returned unchanged.

  Raises:
    ValueError: if ``bits`` is not allowed.
  """
  check_bits(bits)
  if bits == FULL_PRECISION:
    return x
  dtype = x.dtype
  xf = x.astype(jnp.float32)
  if axis is None:
    reduce_axes = None
  else:
    keep = {a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)}
    reduce_axes = tuple(a for a in range(x.ndim) if a not in keep)
  lo = jnp.min(xf, axis=reduce_axes, keepdims=True)
  hi = jnp.max(xf, axis=reduce_axes, keepdims=True)
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

