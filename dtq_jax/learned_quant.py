"""Fake quantization with learned step sizes: LSQ, LSQ+ and PACT.

Pure functions of arrays that import only jax (and ``quant``'s checks). None
is the paper's quantizer (``quant.fake_quant``): they are opt-in
alternatives whose range parameters (a step, an offset, a clipping level)
are trained by gradient descent with the rest of the network (docs/method.md,
"Learned quantizers").

- LSQ: S. K. Esser, J. L. McKinstry, D. Bablani, R. Appuswamy, D. S. Modha,
  "Learned Step Size Quantization", ICLR 2020 (arXiv:1902.08153).
- LSQ+: Y. Bhalgat, J. Lee, M. Nagel, T. Blankevoort, N. Kwak, "LSQ+:
  Improving low-bit quantization through learnable offsets and better
  initialization", CVPR Workshops 2020 (arXiv:2004.09576).
- PACT: J. Choi, Z. Wang, S. Venkataramani, P. I-J. Chuang, V. Srinivasan,
  K. Gopalakrishnan, "PACT: Parameterized Clipping Activation for Quantized
  Neural Networks", arXiv:1805.06085, 2018.

Every quantizer is a ``jax.custom_vjp`` whose backward pass is the paper's
hand-derived gradient. Arithmetic is in float32 whatever the input dtype; the
result has the input's dtype. ``bits`` is a Python int known at trace time,
2..16, or 32 for the identity (``quant.check_bits``). Rounding is half to
even (``jnp.round``), as in ``quant``.
"""

import functools
import math

import jax
import jax.numpy as jnp

from dtq_jax import quant

# The learned step (and PACT's clipping level) is used as max(|p|, EPS): a
# step at 0 would divide by zero and a negative one has no meaning. EPS is
# far below any useful step yet keeps x / EPS finite in float32 for any
# activation or weight (|x| < 3e30).
EPS = 1e-8


def levels(bits, *, signed):
  """``(Qn, Qp)``: the lowest and highest integer code at ``bits`` bits.

  Args:
    bits: 2..16.
    signed: ``True``: ``[-2**(bits-1), 2**(bits-1) - 1]`` (weights, or
      activations that can be negative); ``False``: ``[0, 2**bits - 1]``.

  Returns:
    The two Python ints. (LSQ's paper writes the lower bound as ``-Q_N`` with
    ``Q_N >= 0``; here ``Qn`` is the code itself, ``<= 0``.)
  """
  if signed:
    return -2**(bits - 1), 2**(bits - 1) - 1
  return 0, 2**bits - 1


# --------------------------------------------------------------------------
# Helpers.


def _as_param(p, name):
  """A learned parameter as a floating-point array (Python floats allowed)."""
  p = jnp.asarray(p)
  quant.check_float(p, name)
  return p


def _check_broadcast(p, x, what, name):
  # The gradient of p is summed back to p's shape over the axes it is
  # broadcast along; a p that would enlarge x has no such reading.
  try:
    shape = jnp.broadcast_shapes(p.shape, x.shape)
  except ValueError:
    shape = None
  if shape != x.shape:
    raise ValueError(
        f'{name}: {what} of shape {p.shape} must broadcast to x of shape '
        f'{x.shape} (a scalar, or e.g. (1, 1, 1, C) for the output channels '
        'of an HWIO kernel).')


def _effective(p):
  """``max(|p|, EPS)`` in float32, and the sign its gradient is passed with.

  The gradient passes through the clamp at ``EPS`` (and through ``abs`` with
  the sign of ``p``, +1 at 0), so a step that collapsed to 0 still receives
  gradient and can grow again instead of staying dead.
  """
  pf = p.astype(jnp.float32)
  return jnp.maximum(jnp.abs(pf), EPS), jnp.where(pf < 0, -1.0, 1.0)


def _sum_to_shape(t, shape):
  """Sums ``t`` over the axes along which an array of ``shape`` broadcasts."""
  lead = t.ndim - len(shape)
  t = jnp.sum(t, axis=tuple(range(lead)))
  ones = tuple(i for i, d in enumerate(shape) if d == 1)
  return jnp.sum(t, axis=ones, keepdims=True).reshape(shape)


def _default_grad_scale(x, p, qp):
  # LSQ's g = 1 / sqrt(N * Qp), N the number of elements sharing one value
  # of p (one step per tensor: the tensor's size; one per output channel:
  # the channel's size).
  n = x.size // max(p.size, 1)
  return 1.0 / math.sqrt(n * qp)


# --------------------------------------------------------------------------
# LSQ and LSQ+: one core, q = clip(round((x - beta) / s), qn, qp) * s + beta.
# LSQ is the core with beta = 0 (its beta gradient is computed and dropped,
# which XLA removes under jit).


def _codes_f32(xf, s, beta, qn, qp):
  """Codes as float32: ``clip(round((x - beta) / s), qn, qp)``."""
  return jnp.clip(jnp.round((xf - beta) / s), qn, qp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lsq_core(x, step, offset, g, qn, qp):
  return _lsq_core_fwd(x, step, offset, g, qn, qp)[0]


def _lsq_core_fwd(x, step, offset, g, qn, qp):
  s, _ = _effective(step)
  beta = offset.astype(jnp.float32)
  q = _codes_f32(x.astype(jnp.float32), s, beta, qn, qp) * s + beta
  return q.astype(x.dtype), (x, step, offset, g)


def _lsq_core_bwd(qn, qp, residuals, ct):
  x, step, offset, g = residuals
  s, sign = _effective(step)
  beta = offset.astype(jnp.float32)
  gf = ct.astype(jnp.float32)
  u = (x.astype(jnp.float32) - beta) / s
  below = u <= qn
  above = u >= qp
  # x: the straight-through estimator on the closed range [qn, qp] (an
  # element on a bound keeps its gradient, as PyTorch's clamp passes it and
  # as quant.fake_quant_range does), nothing outside.
  dx = jnp.where((u >= qn) & (u <= qp), gf, 0.0)
  # s: LSQ's and LSQ+'s step gradient, round(u) - u strictly inside, the
  # bound's code at and beyond it.
  ds_el = jnp.where(below, float(qn),
                    jnp.where(above, float(qp), jnp.round(u) - u))
  # beta: LSQ+'s offset gradient, 0 strictly inside, 1 at and beyond the
  # bounds.
  db_el = (below | above).astype(jnp.float32)
  gs = g.astype(jnp.float32)
  ds = gs * sign * _sum_to_shape(gf * ds_el, step.shape)
  db = gs * _sum_to_shape(gf * db_el, offset.shape)
  return (dx.astype(ct.dtype), ds.astype(step.dtype), db.astype(offset.dtype),
          jnp.zeros_like(g))


_lsq_core.defvjp(_lsq_core_fwd, _lsq_core_bwd)


def lsq_fake_quant(x, step, bits, *, signed, grad_scale=None):
  """LSQ: fake quantization with a learned step size (Esser et al., 2020).

  Forward, with codes ``Qn..Qp`` (``levels``)::

    q = clip(round(x / s), Qn, Qp) * s

  Backward (``u = x / s``, upstream gradient ``G``), hand-derived with the
  straight-through estimator for ``round`` (LSQ's step gradient and its
  gradient scale)::

    dL/dx = G                      where Qn <= u <= Qp, else 0
    dL/ds = g * sum(G * r),        r = round(u) - u  where Qn < u < Qp,
                                       Qn            where u <= Qn,
                                       Qp            where u >= Qp,

  the sum taken over the elements that share one step value, and ``g`` the
  gradient scale, LSQ's ``1 / sqrt(N * Qp)`` with ``N`` the number of those
  elements (the paper's ``N_W`` for weights, ``N_F`` for activations; here
  ``N`` counts every element of ``x`` given to the call, the batch included
  for activations, and per example under ``vmap``).

  The step must be positive; the caller keeps it so (initialise it with
  ``lsq_init_step``). For robustness the quantizer uses ``max(|step|,
  EPS)``: no division by zero, and the gradient passes through the clamp
  (with the sign of ``step``) so a step that reached 0 can recover.

  Args:
    x: floating-point array (float32, bfloat16, ...).
    step: the learned step ``s``: a scalar, or an array broadcastable to
      ``x`` for one step per slice, e.g. shape ``(1, 1, 1, C_out)`` for the
      output channels of an HWIO kernel. Its gradient has its shape.
    bits: 2..16, or 32 for the identity.
    signed: codes ``[-2**(bits-1), 2**(bits-1) - 1]`` (weights) or
      ``[0, 2**bits - 1]`` (non-negative activations).
    grad_scale: the factor ``g`` on the step's gradient; ``None`` is LSQ's
      ``1 / sqrt(N * Qp)``, ``1.0`` the unscaled gradient.

  Returns:
    Array of the shape and dtype of ``x``.

  Raises:
    TypeError: if ``x`` or ``step`` is not floating-point or ``bits`` is
      traced.
    ValueError: if ``bits`` is not allowed or ``step`` does not broadcast to
      ``x``.
  """
  quant.check_bits(bits)
  quant.check_float(x, 'lsq_fake_quant')
  step = _as_param(step, 'lsq_fake_quant')
  x = jnp.asarray(x)
  _check_broadcast(step, x, 'step', 'lsq_fake_quant')
  if bits == quant.FULL_PRECISION:
    return x
  qn, qp = levels(bits, signed=signed)
  if grad_scale is None:
    grad_scale = _default_grad_scale(x, step, qp)
  return _lsq_core(x, step, jnp.zeros((), jnp.float32),
                   jnp.asarray(grad_scale, jnp.float32), qn, qp)


def lsq_plus_fake_quant(x, step, offset, bits, grad_scale=None):
  """LSQ+: learned step and offset, for activations that can be negative.

  Bhalgat et al., 2020: ``q = clip(round((x - beta) / s), n, p) * s +
  beta``. The paper writes it for a general code range ``[n, p]``; with a
  learned offset the signed range is redundant (it is the unsigned one with
  ``beta`` moved by ``2**(bits-1) * s``), so this uses the unsigned codes
  ``n = 0, p = 2**bits - 1``, as the paper does for its asymmetric
  activations. Forward::

    q = clip(round((x - beta) / s), 0, 2**bits - 1) * s + beta

  Backward (``u = (x - beta) / s``, ``p = 2**bits - 1``; LSQ+'s gradients)::

    dL/dx    = G                   where 0 <= u <= p, else 0
    dL/ds    = g * sum(G * r),     r = round(u) - u strictly inside,
                                       0 where u <= 0, p where u >= p
    dL/dbeta = g * sum(G * [u <= 0 or u >= p])

  Both parameter gradients carry LSQ's scale ``g = 1 / sqrt(N * p)``: LSQ+
  trains as LSQ does, and the offset, like the step, sums the gradient of
  ``N`` elements (``grad_scale`` sets another ``g``). ``step`` is used as
  ``max(|step|, EPS)`` as in ``lsq_fake_quant``.

  Args:
    x: floating-point array.
    step: the learned step ``s`` (scalar or broadcastable to ``x``).
    offset: the learned offset ``beta`` (scalar or broadcastable to ``x``;
      its gradient has its shape).
    bits: 2..16, or 32 for the identity.
    grad_scale: ``g``; ``None`` is LSQ's ``1 / sqrt(N * p)``, with ``N`` the
      number of elements per step value.

  Returns:
    Array of the shape and dtype of ``x``.

  Raises:
    TypeError: if an input is not floating-point or ``bits`` is traced.
    ValueError: if ``bits`` is not allowed or a parameter does not broadcast
      to ``x``.
  """
  quant.check_bits(bits)
  quant.check_float(x, 'lsq_plus_fake_quant')
  step = _as_param(step, 'lsq_plus_fake_quant')
  offset = _as_param(offset, 'lsq_plus_fake_quant')
  x = jnp.asarray(x)
  _check_broadcast(step, x, 'step', 'lsq_plus_fake_quant')
  _check_broadcast(offset, x, 'offset', 'lsq_plus_fake_quant')
  if bits == quant.FULL_PRECISION:
    return x
  qn, qp = levels(bits, signed=False)
  if grad_scale is None:
    grad_scale = _default_grad_scale(x, step, qp)
  return _lsq_core(x, step, offset, jnp.asarray(grad_scale, jnp.float32), qn,
                   qp)


# --------------------------------------------------------------------------
# PACT.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _pact_core(x, alpha, n):
  return _pact_core_fwd(x, alpha, n)[0]


def _pact_core_fwd(x, alpha, n):
  a, _ = _effective(alpha)
  s = a / n
  q = jnp.round(jnp.clip(x.astype(jnp.float32), 0.0, a) / s) * s
  return q.astype(x.dtype), (x, alpha)


def _pact_core_bwd(n, residuals, ct):
  del n  # The paper's gradients do not depend on the bit width.
  x, alpha = residuals
  a, sign = _effective(alpha)
  xf = x.astype(jnp.float32)
  gf = ct.astype(jnp.float32)
  # PACT's eq. 3: the STE inside [0, alpha), and alpha takes the gradient of
  # every element clipped at it (x >= alpha); the rounding inside is treated
  # as the identity, so alpha gets nothing from the interior.
  dx = jnp.where((xf >= 0.0) & (xf < a), gf, 0.0)
  da = sign * _sum_to_shape(jnp.where(xf >= a, gf, 0.0), alpha.shape)
  return dx.astype(ct.dtype), da.astype(alpha.dtype)


_pact_core.defvjp(_pact_core_fwd, _pact_core_bwd)


def pact_fake_quant(x, alpha, bits):
  """PACT: clip at a learned level ``alpha``, quantize ``[0, alpha]``.

  Choi et al., 2018, eqs. 1-3. With ``s = alpha / (2**bits - 1)``::

    y = clip(x, 0, alpha)
    q = round(y / s) * s              2**bits levels 0, s, ..., alpha

  Backward (the paper's straight-through estimator)::

    dL/dx     = G          where 0 <= x < alpha, else 0
    dL/dalpha = sum(G)     over the elements with x >= alpha

  ``alpha`` is used as ``max(|alpha|, EPS)`` (see ``lsq_fake_quant``); the
  paper regularises it with an L2 penalty, which is the caller's loss term.

  Args:
    x: floating-point array.
    alpha: the learned clipping level (scalar or broadcastable to ``x``).
    bits: 2..16, or 32 for the identity.

  Returns:
    Array of the shape and dtype of ``x``.

  Raises:
    TypeError: if an input is not floating-point or ``bits`` is traced.
    ValueError: if ``bits`` is not allowed or ``alpha`` does not broadcast to
      ``x``.
  """
  quant.check_bits(bits)
  quant.check_float(x, 'pact_fake_quant')
  alpha = _as_param(alpha, 'pact_fake_quant')
  x = jnp.asarray(x)
  _check_broadcast(alpha, x, 'alpha', 'pact_fake_quant')
  if bits == quant.FULL_PRECISION:
    return x
  return _pact_core(x, alpha, 2**bits - 1)


# --------------------------------------------------------------------------
# Initialisers (pure: statistics of the initial weights or of the first
# batch of activations).


def _reduce_axes(x, axis):
  if axis is None:
    return None
  keep = {a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)}
  return tuple(a for a in range(x.ndim) if a not in keep)


def lsq_init_step(x, bits, *, signed, axis=None):
  """LSQ's initial step: ``2 * mean(|x|) / sqrt(Qp)`` (Esser et al., 2020).

  Computed on the initial weights, or on the first batch of activations.

  Args:
    x: floating-point array.
    bits: 2..16.
    signed: as in ``lsq_fake_quant`` (sets ``Qp``).
    axis: ``None`` (one step for the tensor) or the axis/axes that keep their
      own step (e.g. ``-1`` for the output channels of an HWIO kernel), as
      in ``quant.fake_quant``; the mean is over all other axes.

  Returns:
    float32 step with keepdims shape (all ones for ``axis=None``), so it
    broadcasts against ``x``. An all-zero ``x`` gives 0, which the quantizer
    treats as ``EPS``.
  """
  quant.check_bits(bits)
  quant.check_float(x, 'lsq_init_step')
  if bits == quant.FULL_PRECISION:
    raise ValueError('lsq_init_step needs bits < 32.')
  _, qp = levels(bits, signed=signed)
  xf = jnp.abs(jnp.asarray(x).astype(jnp.float32))
  mean = jnp.mean(xf, axis=_reduce_axes(xf, axis), keepdims=True)
  return 2.0 * mean / math.sqrt(qp)


def _lsq_plus_mse(xf, s, beta, qp):
  s = jnp.maximum(s, EPS)
  q = _codes_f32(xf, s, beta, 0, qp) * s + beta
  return jnp.mean(jnp.square(q - xf))


# Tail fractions searched by lsq_plus_init('mse') at each end of the range:
# from no clipping (the min-max range) to clipping 30% of the batch, denser
# where single outliers sit.
LSQ_PLUS_INIT_TAILS = (0.0, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.02, 0.05, 0.1,
                       0.2, 0.3)


def lsq_plus_init(x, bits, *, method='mse', tails=LSQ_PLUS_INIT_TAILS):
  """LSQ+'s initial ``(step, offset)`` for activations (Bhalgat et al.).

  LSQ+ initialises an activation quantizer's range on the first batch
  (weights keep a symmetric quantizer, initialised from their statistics;
  here weights use LSQ and ``lsq_init_step``). Two rules for activations:

  - ``'minmax'``: ``s = (max(x) - min(x)) / (2**bits - 1)``,
    ``beta = min(x)``: the grid spans the batch's range (the paper's
    quantizer on its first batch); sensitive to outliers.
  - ``'mse'`` (the paper's choice, its "MSE-based initialization"): the
    ``(s, beta)`` minimising ``mean((q(x) - x)**2)``. The paper minimises it
    numerically; here by an exhaustive search over clipping ranges
    ``[quantile(x, a), quantile(x, 1 - b)]`` for ``a`` and ``b`` in
    ``tails`` (``len(tails)**2`` candidates; the first, with ``a = b = 0``,
    is the min-max range, and ties keep the earliest), with ``s`` and
    ``beta`` set from the range as above. Deterministic and scale-free (the
    candidates follow the data, outliers or not), with no step size to
    tune; it costs a sort of ``x`` and ``len(tails)**2`` passes over it,
    once.

  Args:
    x: floating-point array (the first batch of activations).
    bits: 2..16.
    method: ``'mse'`` or ``'minmax'``.
    tails: for ``'mse'``, the fractions of ``x`` a candidate may clip at
      each end, each in ``[0, 0.5)``, 0 first.

  Returns:
    ``(step, offset)``, float32 scalars. A constant ``x`` gives step 0
    (treated as ``EPS``) and offset ``x``'s value.

  Raises:
    ValueError: on an unknown ``method``, bad ``tails`` or ``bits`` not
      2..16.
  """
  quant.check_bits(bits)
  quant.check_float(x, 'lsq_plus_init')
  if bits == quant.FULL_PRECISION:
    raise ValueError('lsq_plus_init needs bits < 32.')
  if method not in ('mse', 'minmax'):
    raise ValueError(f"method={method!r}: use 'mse' or 'minmax'.")
  tails = tuple(tails)
  if not tails or tails[0] != 0 or not all(0 <= t < 0.5 for t in tails):
    raise ValueError(f'tails={tails!r}: fractions in [0, 0.5), 0 first.')
  _, qp = levels(bits, signed=False)
  xf = jnp.asarray(x).astype(jnp.float32)
  if method == 'minmax':
    lo, hi = jnp.min(xf), jnp.max(xf)
    return (hi - lo) / qp, lo
  q = jnp.asarray(tails, jnp.float32)
  los = jnp.quantile(xf, q)
  his = jnp.quantile(xf, 1.0 - q)
  # quantile(x, 0) and quantile(x, 1) are min(x) and max(x) exactly.
  los = jnp.repeat(los, len(tails))
  his = jnp.tile(his, len(tails))
  steps = (his - los) / qp
  # One candidate at a time: memory stays that of x whatever their number.
  errors = jax.lax.map(lambda c: _lsq_plus_mse(xf, c[0], c[1], qp),
                       jnp.stack([steps, los], axis=1))
  best = jnp.argmin(errors)
  return steps[best], los[best]


def pact_init_alpha(x, *, percentile=100.0):
  """Initial PACT clipping level: a percentile of the first batch.

  The default, the batch's maximum, makes PACT start as the paper's min-max
  quantizer on a non-negative (post-ReLU) activation: nothing clipped, the
  grid spanning ``[0, max]``, which is what DTQ's own quantizer does, and
  ``alpha`` then learns to clip. A lower percentile (e.g. 99.9) starts with
  outliers clipped. PACT's paper initialises ``alpha`` to the constant 10,
  chosen for its networks' unnormalised ReLU ranges; activation scales vary
  too much across networks for a constant to fit them all.

  Args:
    x: floating-point array (the first batch of activations).
    percentile: in (0, 100].

  Returns:
    float32 scalar. A non-positive result (an all-negative or all-zero batch)
    is used as ``EPS`` by ``pact_fake_quant``.
  """
  quant.check_float(x, 'pact_init_alpha')
  if not 0.0 < percentile <= 100.0:
    raise ValueError(f'percentile={percentile!r} must be in (0, 100].')
  xf = jnp.asarray(x).astype(jnp.float32)
  if percentile == 100.0:
    return jnp.max(xf)
  return jnp.percentile(xf, percentile)


# --------------------------------------------------------------------------
# Integer codes for export: the fake-quant value is codes * s (+ beta) in
# float32 (the forward pass computes it so), so an exporter stores integers
# plus the learned step (and offset).


def lsq_codes(x, step, bits, *, signed):
  """Integer codes of ``lsq_fake_quant``: ``q == codes * step``.

  Args:
    x: floating-point array.
    step: the learned step (scalar or broadcastable to ``x``), positive: the
      codes are those of ``max(|step|, EPS)``, and ``codes * step`` equals
      the fake-quant value for a step above ``EPS``.
    bits: 2..16.
    signed: as in ``lsq_fake_quant``.

  Returns:
    int32 array ``clip(round(x / step), Qn, Qp)`` of ``x``'s shape.

  Raises:
    TypeError, ValueError: as ``lsq_fake_quant``; ``bits`` must be < 32.
  """
  quant.check_bits(bits)
  quant.check_float(x, 'lsq_codes')
  step = _as_param(step, 'lsq_codes')
  x = jnp.asarray(x)
  _check_broadcast(step, x, 'step', 'lsq_codes')
  if bits == quant.FULL_PRECISION:
    raise ValueError('lsq_codes needs bits < 32.')
  qn, qp = levels(bits, signed=signed)
  s, _ = _effective(step)
  return _codes_f32(x.astype(jnp.float32), s, 0.0, qn, qp).astype(jnp.int32)


def lsq_plus_codes(x, step, offset, bits):
  """Integer codes of ``lsq_plus_fake_quant``: ``q == codes * step + offset``.

  In float32, as the forward pass computes it: bit for bit where the
  arithmetic is exact (a power-of-two step, an offset on a coarse grid),
  otherwise up to the last-bit rounding of the multiply-add (a compiler may
  fuse it into one rounding).

  Args:
    x: floating-point array.
    step: the learned step, positive (see ``lsq_codes``).
    offset: the learned offset.
    bits: 2..16.

  Returns:
    int32 array ``clip(round((x - offset) / step), 0, 2**bits - 1)``.

  Raises:
    TypeError, ValueError: as ``lsq_plus_fake_quant``; ``bits`` must be < 32.
  """
  quant.check_bits(bits)
  quant.check_float(x, 'lsq_plus_codes')
  step = _as_param(step, 'lsq_plus_codes')
  offset = _as_param(offset, 'lsq_plus_codes')
  x = jnp.asarray(x)
  _check_broadcast(step, x, 'step', 'lsq_plus_codes')
  _check_broadcast(offset, x, 'offset', 'lsq_plus_codes')
  if bits == quant.FULL_PRECISION:
    raise ValueError('lsq_plus_codes needs bits < 32.')
  qn, qp = levels(bits, signed=False)
  s, _ = _effective(step)
  return _codes_f32(x.astype(jnp.float32), s, offset.astype(jnp.float32), qn,
                    qp).astype(jnp.int32)


# --------------------------------------------------------------------------
# Static ranges: the min-max quantizer's range that gives the same function.
# On a range [lo, hi] the paper's quantizer (quant.fake_quant_range) has the
# step (hi - lo) / (2**bits - 1) and the grid lo + codes * step. With
# lo = beta + Qn * s and hi = beta + Qp * s that grid is LSQ's (LSQ+'s), the
# clip is the same, and round((x - lo) / s) = round((x - beta) / s) - Qn
# because Qn is an even integer (half to even rounds alike): the two
# quantizers agree up to the float32 rounding of the step and of x - lo.


def lsq_range(step, bits, *, signed):
  """``(lo, hi)`` of ``lsq_fake_quant``: ``Qn * s`` and ``Qp * s``.

  Args:
    step: the learned step (scalar or per-channel array); used as
      ``max(|step|, EPS)``, as the quantizer uses it.
    bits: 2..16.
    signed: as in ``lsq_fake_quant``.

  Returns:
    float32 ``(lo, hi)`` of ``step``'s shape: ``quant.fake_quant_range(x,
    bits, lo, hi)`` equals ``lsq_fake_quant(x, step, bits, signed=signed)``
    up to float32 rounding.
  """
  quant.check_bits(bits)
  if bits == quant.FULL_PRECISION:
    raise ValueError('lsq_range needs bits < 32.')
  qn, qp = levels(bits, signed=signed)
  s, _ = _effective(_as_param(step, 'lsq_range'))
  return qn * s, qp * s


def lsq_plus_range(step, offset, bits):
  """``(lo, hi)`` of ``lsq_plus_fake_quant``: ``beta`` and ``beta + p * s``.

  Args:
    step: the learned step, used as ``max(|step|, EPS)``.
    offset: the learned offset ``beta``.
    bits: 2..16.

  Returns:
    float32 ``(lo, hi)``: ``quant.fake_quant_range(x, bits, lo, hi)`` equals
    ``lsq_plus_fake_quant(x, step, offset, bits)`` up to float32 rounding.
  """
  quant.check_bits(bits)
  if bits == quant.FULL_PRECISION:
    raise ValueError('lsq_plus_range needs bits < 32.')
  _, qp = levels(bits, signed=False)
  s, _ = _effective(_as_param(step, 'lsq_plus_range'))
  beta = _as_param(offset, 'lsq_plus_range').astype(jnp.float32)
  return beta, beta + qp * s


def pact_range(alpha, bits):
  """``(lo, hi)`` of ``pact_fake_quant``: ``0`` and ``alpha``.

  Args:
    alpha: the learned clipping level, used as ``max(|alpha|, EPS)``.
    bits: 2..16.

  Returns:
    float32 ``(lo, hi)``: ``quant.fake_quant_range(x, bits, 0, alpha)``
    equals ``pact_fake_quant(x, alpha, bits)`` up to float32 rounding.
  """
  quant.check_bits(bits)
  if bits == quant.FULL_PRECISION:
    raise ValueError('pact_range needs bits < 32.')
  a, _ = _effective(_as_param(alpha, 'pact_range'))
  return jnp.zeros_like(a), a
