"""ONNX translations of jaxpr primitives: one rule per primitive.

``RULES[name](converter, eqn, *inputs)`` writes the ONNX nodes of one jaxpr
equation through the converter of jaxpr_onnx.py (``c.node``, ``c.cast``,
``c.dim``) and returns its output name(s). An input is a graph name (str) or
a NumPy constant. A case a rule cannot translate raises
``UnsupportedOperation`` (``refuse``), which the converter reports in one
line naming the operation and the Flax module.
"""

import jax
import numpy as np

from dtq_jax.infra import errors

_INT64_MIN = np.iinfo(np.int64).min


class UnsupportedOperation(errors.UserError, ValueError):
  """A jaxpr operation with no ONNX translation here (a one-line message)."""


def refuse(op, stack, detail=''):
  """The ``UnsupportedOperation`` for ``op`` in module ``stack``."""
  where = f' (in {stack})' if stack else ''
  return UnsupportedOperation(
      f"ONNX export: the operation '{op}'{where}{detail} has no ONNX "
      'translation here; export with --format stablehlo instead.')


def is_static(d):
  """Whether a dimension is a concrete integer (not symbolic)."""
  return isinstance(d, (int, np.integer))



def _aval(eqn, i=0, out=False):
  return (eqn.outvars if out else eqn.invars)[i].aval


def _typed(value, eqn):
  return np.asarray(value, _aval(eqn, out=True).dtype)


def _transpose(c, x, perm):
  perm = [int(p) for p in perm]
  return x if perm == sorted(perm) else c.node('Transpose', [x], perm=perm)


def i64(values):
  """``values`` as an int64 NumPy array (ONNX's shape and index type)."""
  return np.asarray(values, np.int64)


# --------------------------------------------------------------------------
# Translation rules: rule(converter, eqn, *inputs) -> output(s). An input is
# a graph name (str) or a NumPy constant; c.node accepts both.


def _op(op):
  return lambda c, e, *xs: c.node(op, list(xs))


def _logical(op):
  return lambda c, e, *xs: c.node(
      op if _aval(e).dtype == np.bool_ else f'Bitwise{op}', list(xs))


def _integer_pow(c, e, x):
  # Repeated squaring, in the order of jax's own lowering (_integer_pow).
  y = e.params['y']
  if y == 0:
    return c.node('Expand', [_typed(1, e), c.node('Shape', [x])])
  acc, n = None, abs(y)
  while n:
    if n & 1:
      acc = x if acc is None else c.node('Mul', [acc, x])
    n >>= 1
    if n:
      x = c.node('Mul', [x, x])
  return c.node('Div', [_typed(1, e), acc]) if y < 0 else acc


def _round(c, e, x):
  if int(e.params['rounding_method']) == int(
      jax.lax.RoundingMethod.TO_NEAREST_EVEN):
    return c.node('Round', [x])
  # Away from zero. ONNX Round ties to even, and floor(|x| + 0.5) rounds in
  # the addition (0.49999997 + 0.5 == 1): compare the exact fraction.
  a = c.node('Abs', [x])
  t = c.node('Floor', [a])
  up = c.node('GreaterOrEqual', [c.node('Sub', [a, t]), _typed(0.5, e)])
  r = c.node('Where', [up, c.node('Add', [t, _typed(1, e)]), t])
  return c.node('Mul', [c.node('Sign', [x]), r])


def _clamp(c, e, lo, x, hi):
  if _aval(e, 0).shape == () and _aval(e, 2).shape == ():
    return c.node('Clip', [x, lo, hi])
  return c.node('Min', [c.node('Max', [x, lo]), hi])


def _select_n(c, e, pred, *cases):
  if isinstance(pred, np.ndarray) and pred.size == 1:
    return cases[int(pred.reshape(()))]  # Decided at conversion time.
  out = cases[0]
  for i, case in enumerate(cases[1:], 1):
    cond = pred if _aval(e).dtype == np.bool_ else c.node(
        'Equal', [pred, np.asarray(i, _aval(e).dtype)])
    out = c.node('Where', [cond, case, out])
  return out


def _convert(c, e, x):
  if _aval(e).dtype == _aval(e, out=True).dtype:
    return x
  if isinstance(x, str) and x in c._lazy:  # pylint: disable=protected-access
    x = c._lazy[x]  # pylint: disable=protected-access  # UINT4 codes: one Cast.
  return c.cast(x, _aval(e, out=True).dtype)


def _broadcast_in_dim(c, e, x):
  shape, dims = e.params['shape'], e.params['broadcast_dimensions']
  new = [i for i in range(len(shape)) if i not in dims]
  if new:
    x = c.node('Unsqueeze', [x, i64(new)])
  have = [1] * len(shape)
  for i, d in zip(dims, _aval(e).shape):
    have[i] = d
  if all(h == s for h, s in zip(have, shape)):
    return x
  # Expand keeps a dimension where the target says 1.
  return c.node('Expand', [x, c.dims(
      [1 if h == s else s for h, s in zip(have, shape)])])


def _reshape(c, e, x):
  if e.params.get('dimensions') is not None:
    x = _transpose(c, x, e.params['dimensions'])
  sizes = e.params['new_sizes']
  symbolic = [i for i, d in enumerate(sizes) if not is_static(d)]
  if len(symbolic) <= 1:  # -1: the one size that follows the batch size.
    target = i64([-1 if i in symbolic else d for i, d in enumerate(sizes)])
  else:
    target = c.dims(sizes)
  return c.node('Reshape', [x, target])


def _slice(c, e, x):
  p, shape = e.params, _aval(e).shape
  strides = p['strides'] or (1,) * len(shape)
  todo = [(i, s, l, st) for i, (s, l, st, d) in enumerate(zip(
      p['start_indices'], p['limit_indices'], strides, shape))
          if (s, st) != (0, 1) or l != d]
  if not all(is_static(l) for _, _, l, _ in todo):
    raise refuse(c.prim, c.stack, ' with a symbolic limit')
  if not todo:
    return x
  return c.node('Slice', [x] + [i64(v) for v in zip(*[
      (s, l, i, st) for i, s, l, st in todo])])


def _pad(c, e, x, value):
  config = e.params['padding_config']
  if any(interior for _, _, interior in config):
    raise refuse(c.prim, c.stack, ' with interior padding')
  pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
  if not any(pads):
    return x
  return c.node('Pad', [x, i64(pads), value], mode='constant')


def _reduce(op):
  """Reduce<op>; and/or are min/max of 0/1 (ONNX reduces numbers only)."""
  def rule(c, e, x):
    axes, dtype = e.params['axes'], _aval(e).dtype
    if not axes:
      return x
    # onnxruntime reduces int32 and int64 only, of the integers; the int64
    # result cast back wraps around as the narrow type's own would.
    wide = dtype == np.bool_ or np.issubdtype(dtype, np.integer) and (
        dtype not in (np.int32, np.int64))
    y = c.node(op, [c.cast(x, np.int64) if wide else x, i64(axes)],
               keepdims=0)
    return c.cast(y, dtype) if wide else y
  return rule


def _window(kind):
  """reduce_window_{max,min,sum} as MaxPool, -MaxPool(-x) or a ones Conv."""
  def rule(c, e, x):
    p, shape = e.params, _aval(e).shape
    if any(b != 1 for b in p['base_dilation']) or any(
        lo < 0 or hi < 0 for lo, hi in p['padding']):
      raise refuse(c.prim, c.stack, ' with base dilation or negative padding')
    plain = [(w, s, tuple(pd), d) == (1, 1, (0, 0), 1) for w, s, pd, d in zip(
        p['window_dimensions'], p['window_strides'], p['padding'],
        p['window_dilation'])]
    if all(plain):
      return x
    # ONNX pools: (batch, channels, spatial...). The first and last axes
    # outside the window play batch and channels, other axes are spatial
    # with a window of 1; missing ones are added.
    keep = [i for i, pl in enumerate(plain) if pl]
    keep = keep[:1] + keep[1:][-1:]
    spatial = [i for i in range(len(plain)) if i not in keep]
    ch = shape[keep[1]] if len(keep) == 2 else 1
    if kind == 'sum' and not is_static(ch):
      raise refuse(c.prim, c.stack, ' over a symbolic axis')
    perm = keep + spatial
    x = _transpose(c, x, perm)
    lead = [[0, 1], [1], []][len(keep)]
    if lead:
      x = c.node('Unsqueeze', [x, i64(lead)])
    pick = lambda k: [int(p[k][i]) for i in spatial]
    attrs = dict(kernel_shape=pick('window_dimensions'),
                 strides=pick('window_strides'),
                 dilations=pick('window_dilation'),
                 pads=[int(p['padding'][i][0]) for i in spatial] +
                 [int(p['padding'][i][1]) for i in spatial])
    if kind == 'max':
      y = c.node('MaxPool', [x], **attrs)
    elif kind == 'min':
      y = c.node('Neg', [c.node('MaxPool', [c.node('Neg', [x])], **attrs)])
    else:  # A sum is a grouped convolution with ones: no division by the size.
      ones = np.ones([ch, 1] + attrs['kernel_shape'], _aval(e).dtype)
      y = c.node('Conv', [x, ones], group=int(ch), **attrs)
    if lead:
      y = c.node('Squeeze', [y, i64(lead)])
    return _transpose(c, y, np.argsort(perm))
  return rule


def _reduce_window(c, e, *args):
  """The generic reduce_window, where its body is max, min or add."""
  body = getattr(e.params['jaxpr'], 'jaxpr', e.params['jaxpr'])
  name = body.eqns[0].primitive.name if len(body.eqns) == 1 else None
  kind, init = dict(max=('max', -np.inf), min=('min', np.inf),
                    add=('sum', 0)).get(name, (None, None))
  if len(args) != 2 or kind is None or not isinstance(
      args[1], np.ndarray) or args[1] != init:
    raise refuse(c.prim, c.stack, ' with this reduction')
  return _window(kind)(c, e, args[0])


def _dot_general(c, e, x, y):
  (lc, rc), (lb, rb) = e.params['dimension_numbers']
  dtype = _aval(e, out=True).dtype
  x, y = [v if _aval(e, i).dtype == dtype else c.cast(v, dtype)
          for i, v in enumerate((x, y))]
  xr, yr = len(_aval(e, 0).shape), len(_aval(e, 1).shape)
  if not lb and tuple(lc) == (xr - 1,) and tuple(rc) == (0,) and yr == 2:
    return c.node('MatMul', [x, y])
  letters = iter('abcdefghijklmnopqrstuvwxyz')
  lhs = [next(letters) for _ in range(xr)]
  rhs = [None] * yr
  for i, j in list(zip(lb, rb)) + list(zip(lc, rc)):
    rhs[j] = lhs[i]
  rhs = [r or next(letters) for r in rhs]
  out = ([lhs[i] for i in lb] +
         [l for i, l in enumerate(lhs) if i not in lb and i not in lc] +
         [r for j, r in enumerate(rhs) if j not in rb and j not in rc])
  return c.node('Einsum', [x, y],
                equation=f'{"".join(lhs)},{"".join(rhs)}->{"".join(out)}')


def _conv(c, e, x, w):
  p = e.params
  if any(d != 1 for d in p['lhs_dilation']) or p['batch_group_count'] != 1:
    raise refuse(c.prim, c.stack, f' with lhs_dilation={p["lhs_dilation"]} '
                  f'and batch_group_count={p["batch_group_count"]}')
  if any(lo < 0 or hi < 0 for lo, hi in p['padding']):
    raise refuse(c.prim, c.stack, ' with negative padding')
  dtype = _aval(e, out=True).dtype
  x, w = [v if _aval(e, i).dtype == dtype else c.cast(v, dtype)
          for i, v in enumerate((x, w))]
  nd = len(_aval(e).shape)
  dn = p['dimension_numbers']
  specs = (dn.lhs_spec, dn.rhs_spec, dn.out_spec) if dn else (range(nd),) * 3
  # Transposes to ONNX's (N, C, spatial...) and (O, I, spatial...) and back.
  x, w = _transpose(c, x, specs[0]), _transpose(c, w, specs[1])
  y = c.node('Conv', [x, w], group=int(p['feature_group_count']),
             kernel_shape=[int(_aval(e, 1).shape[i]) for i in specs[1][2:]],
             strides=[int(s) for s in p['window_strides']],
             dilations=[int(d) for d in p['rhs_dilation']],
             pads=[int(lo) for lo, _ in p['padding']] +
             [int(hi) for _, hi in p['padding']])
  return _transpose(c, y, np.argsort(specs[2]))


def _dynamic_slice(c, e, x, *starts):
  begin, end, axes = [], [], []
  for i, (start, size, dim) in enumerate(zip(
      starts, e.params['slice_sizes'], _aval(e).shape)):
    if size == dim:
      continue  # The start is clamped to 0: the whole axis.
    if not (is_static(size) and is_static(dim)):
      raise refuse(c.prim, c.stack, ' over a symbolic axis')
    # XLA clamps the start so that the slice fits; ONNX would shorten it.
    if isinstance(start, np.ndarray):
      s = i64([min(max(int(start), 0), dim - size)])
    else:
      s = c.node('Clip', [c.node('Unsqueeze', [c.cast(start, np.int64), i64(
          [0])]), i64(0), i64(dim - size)])
    begin.append(s)
    end.append(c.node('Add', [s, i64([size])]))
    axes.append(i)
  cat = lambda v: c.node('Concat', v, axis=0) if len(v) > 1 else v[0]
  return c.node('Slice', [x, cat(begin), cat(end), i64(axes)]) if axes else x


def _gather(c, e, x, idx):
  """A gather with constant indices: a slice, or GatherND of whole rows."""
  dn, shape = e.params['dimension_numbers'], _aval(e).shape
  sizes, starts = e.params['slice_sizes'], dn.start_index_map
  if not isinstance(idx, np.ndarray) or dn.operand_batching_dims or not (
      idx.ndim == 1 or set(starts) == set(dn.collapsed_slice_dims)):
    raise refuse(c.prim, c.stack, ' with computed or batched indices')
  limit = np.array([shape[i] - sizes[i] if is_static(shape[i]) else 0
                    for i in starts])
  if 'FILL' in str(e.params['mode']) and np.any((idx < 0) | (idx > limit)):
    raise refuse(c.prim, c.stack, ' out of bounds')
  idx = np.clip(idx, 0, limit)  # XLA clamps indices so the slice fits.
  if idx.ndim == 1:  # One slice (jnp's x[:, 0] under a symbolic batch).
    start = dict(zip(starts, idx.tolist()))
    y = _dynamic_slice(c, e.replace(params=dict(slice_sizes=sizes)), x, *[
        np.asarray(start.get(i, 0)) for i in range(len(shape))])
    collapsed = list(dn.collapsed_slice_dims)
    return c.node('Squeeze', [y, i64(collapsed)]) if collapsed else y
  # Whole rows at index tuples (a strided slice under a symbolic batch):
  # indexed axes first, GatherND, then the rows' axes to offset_dims.
  rest = [i for i in range(len(shape)) if i not in starts]
  if any(sizes[i] != shape[i] for i in rest):
    raise refuse(c.prim, c.stack, ' of partial rows')
  y = c.node('GatherND', [_transpose(c, x, list(starts) + rest), i64(idx)])
  nb, offsets, batch = idx.ndim - 1, list(dn.offset_dims), iter(range(
      idx.ndim - 1))
  return _transpose(c, y, [nb + offsets.index(p) if p in offsets else next(
      batch) for p in range(nb + len(rest))])


def _iota(c, e):
  p = e.params
  if not all(is_static(d) for d in p['shape']):
    raise refuse(c.prim, c.stack, ' of a symbolic size')
  return np.indices(p['shape'])[p['dimension']].astype(p['dtype'])


RULES = {
    **{k: _op(v) for k, v in dict(
        neg='Neg', abs='Abs', sign='Sign', exp='Exp', log='Log', sqrt='Sqrt',
        tanh='Tanh', logistic='Sigmoid', erf='Erf', floor='Floor',
        ceil='Ceil', sin='Sin', cos='Cos', tan='Tan', asin='Asin',
        acos='Acos', atan='Atan', sinh='Sinh', cosh='Cosh', asinh='Asinh',
        acosh='Acosh', atanh='Atanh', add='Add', sub='Sub', mul='Mul',
        div='Div', pow='Pow', max='Max', min='Min', eq='Equal', lt='Less',
        le='LessOrEqual', gt='Greater', ge='GreaterOrEqual').items()},
    'ne': lambda c, e, x, y: c.node('Not', [c.node('Equal', [x, y])]),
    'rem': lambda c, e, x, y: c.node('Mod', [x, y], fmod=1),
    'square': lambda c, e, x: c.node('Mul', [x, x]),
    'rsqrt': lambda c, e, x: c.node('Div', [_typed(1, e), c.node('Sqrt', [x])]),
    'erfc': lambda c, e, x: c.node('Sub', [_typed(1, e), c.node('Erf', [x])]),
    'log1p': lambda c, e, x: c.node('Log', [c.node('Add', [x, _typed(1, e)])]),
    'expm1': lambda c, e, x: c.node('Sub', [c.node('Exp', [x]), _typed(1, e)]),
    'exp2': lambda c, e, x: c.node('Pow', [_typed(2, e), x]),
    'is_finite': lambda c, e, x: c.node('Not', [c.node('Or', [
        c.node('IsInf', [x]), c.node('IsNaN', [x])])]),
    **{k: _logical(k.capitalize()) for k in ('and', 'or', 'xor', 'not')},
    'integer_pow': _integer_pow, 'round': _round, 'clamp': _clamp,
    'select_n': _select_n, 'convert_element_type': _convert,
    # The value itself: gradient stops, copies, barriers.
    **{k: lambda c, e, *xs: list(xs) for k in (
        'stop_gradient', 'copy', 'copy_p', 'optimization_barrier',
        'sharding_constraint')},
    'broadcast_in_dim': _broadcast_in_dim, 'reshape': _reshape,
    'squeeze': lambda c, e, x: c.node(
        'Squeeze', [x, i64(e.params['dimensions'])]),
    'transpose': lambda c, e, x: _transpose(c, x, e.params['permutation']),
    'concatenate': lambda c, e, *xs: c.node(
        'Concat', list(xs), axis=int(e.params['dimension'])),
    'slice': _slice, 'pad': _pad,
    'rev': lambda c, e, x: c.node('Slice', [x] + [i64(v) for v in zip(*[
        (-1, _INT64_MIN, d, -1) for d in e.params['dimensions']])]),
    'split': lambda c, e, x: c.node(
        'Split', [x, i64(e.params['sizes'])], n_out=len(e.params['sizes']),
        axis=int(e.params['axis'])),
    'dynamic_slice': _dynamic_slice, 'gather': _gather,
    'reduce_sum': _reduce('ReduceSum'), 'reduce_max': _reduce('ReduceMax'),
    'reduce_min': _reduce('ReduceMin'), 'reduce_prod': _reduce('ReduceProd'),
    'reduce_and': _reduce('ReduceMin'), 'reduce_or': _reduce('ReduceMax'),
    **{k: lambda c, e, x, k=k: c.cast(c.node(
        f'Arg{k[3:].capitalize()}', [x], axis=int(e.params['axes'][0]),
        keepdims=0), e.params['index_dtype']) for k in ('argmax', 'argmin')},
    'reduce_window_max': _window('max'), 'reduce_window_min': _window('min'),
    'reduce_window_sum': _window('sum'), 'reduce_window': _reduce_window,
    'dot_general': _dot_general, 'conv_general_dilated': _conv,
    'iota': _iota,
    'dim_as_value': lambda c, e: c.cast(c.node('Squeeze', [
        c.dim(e.params['dim']), i64([0])]), _aval(e, out=True).dtype),
}
