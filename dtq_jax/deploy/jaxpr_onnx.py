"""Converts a JAX function to an ONNX model, one jaxpr primitive at a time.

``onnx_export`` writes the zoo's networks by hand; a user's own Flax
classifier has no such description, only its code. ``convert`` traces
``fn(variables, images)`` to a jaxpr with a symbolic batch size and writes
each equation as standard ONNX operators (the ``_RULES`` table), inlining
nested jaxprs (``jit``, ``custom_jvp_call``, ``custom_vjp_call`` -- the fake
quantizers' forward --, ``remat2``, ``closed_call``). Every leaf of
``variables`` becomes an initializer named by its dict path, in its own dtype
(integer weight codes stay integers; uint8 codes below 16 are stored as
UINT4), and the graph casts it where the jaxpr does. Equations whose inputs
are all known at conversion time (literals, ``iota``) are evaluated by JAX
itself, so their values are XLA's. The first equation with no translation
stops the export with one line naming it (``UnsupportedOperation``).

Numerics: float32 stays float32 and each operation is the ONNX operator of
the same arithmetic (Div, not a multiply by the reciprocal; Round ties to
even as XLA's), so the fake quantizers' rounding boundaries fall where XLA
puts them, up to the order of the sums in convolutions and reductions.
erfc, log1p and expm1 have no ONNX operator: 1 - Erf, Log(1 + x) and
Exp - 1 keep their absolute error (~1e-7), not their relative one near 0.
"""

import ml_dtypes
import numpy as np

import jax
from jax import export as jax_export
from jax.extend import core as jax_core

from dtq_jax.deploy import onnx_export
from dtq_jax.infra import errors

# Sub-jaxprs run inline: their parameter holding the jaxpr, by primitive.
_INLINE = ('jit', 'pjit', 'closed_call', 'core_call', 'custom_jvp_call',
           'custom_vjp_call', 'custom_vjp_call_jaxpr', 'remat2', 'checkpoint')
_JAXPR_PARAMS = ('jaxpr', 'call_jaxpr', 'fun_jaxpr')
# Constants are folded up to this many elements (or their inputs' size), so
# that a broadcast literal does not become a large initializer.
_MAX_FOLD = 1024
_INT64_MIN = np.iinfo(np.int64).min


class UnsupportedOperation(errors.UserError, ValueError):
  """A jaxpr operation with no ONNX translation here (a one-line message)."""


def _refuse(op, stack, detail=''):
  where = f' (in {stack})' if stack else ''
  return UnsupportedOperation(
      f"ONNX export: the operation '{op}'{where}{detail} has no ONNX "
      'translation here; export with --format stablehlo instead.')


def _join(outer, inner):
  # Name stacks inside a sub-jaxpr are relative to the equation calling it.
  return '/'.join(s for s in (outer, str(inner)) if s)


def _static(d):
  return isinstance(d, (int, np.integer))


def _sub_jaxpr(eqn):
  """``(jaxpr, consts)`` of an equation to inline, or None."""
  sub = next((eqn.params[k] for k in _JAXPR_PARAMS if k in eqn.params), None)
  if eqn.primitive.name not in _INLINE or sub is None:
    return None
  return (sub.jaxpr, sub.consts) if isinstance(
      sub, jax_core.ClosedJaxpr) else (sub, ())


def _first_unsupported(jaxpr, stack=''):
  """Raises UnsupportedOperation at the first untranslatable equation."""
  for eqn in jaxpr.eqns:
    where = _join(stack, eqn.source_info.name_stack)
    sub = _sub_jaxpr(eqn)
    if sub is not None:
      _first_unsupported(sub[0], where)
    elif eqn.primitive.name not in _RULES:
      raise _refuse(eqn.primitive.name, where)


class _Sym:
  """A symbolic dimension's value in the graph: an int64 tensor of shape [1].

  ``_DimExpr._evaluate`` computes a dimension from its variables with ``+``
  and ``*``; given this class for the batch size, it writes the graph that
  computes e.g. ``32*N`` at run time.
  """

  def __init__(self, c, name):
    self.c, self.name = c, name

  def _op(op):  # pylint: disable=no-self-argument
    return lambda self, other: _Sym(self.c, self.c.node(op, [
        self.name, other.name if isinstance(other, _Sym) else _i64([other])]))

  __add__ = __radd__ = _op('Add')
  __mul__ = __rmul__ = _op('Mul')


class _Converter:
  """The graph being written: nodes, initializers and unique names."""

  def __init__(self, helper, batch_dim, input_name, reserved):
    self.helper, self.batch_dim, self.input_name = helper, batch_dim, input_name
    self.nodes, self.inits, self.used = [], {}, set(reserved)
    self.stack, self.prim = '', ''
    self._consts, self._lazy, self._batch = {}, {}, None

  def unique(self, name):
    out, i = name, 1
    while out in self.used:
      out, i = f'{name}_{i}', i + 1
    self.used.add(out)
    return out

  def const(self, value):
    """An initializer holding ``value`` (one per distinct value)."""
    value = np.asarray(value)
    key = (value.dtype.str, value.shape, value.tobytes())
    if key not in self._consts:
      name = self.unique(f'{self.stack}/const' if self.stack else 'const')
      self._consts[key], self.inits[name] = name, value
    return self._consts[key]

  def leaf(self, path, value):
    """The initializer of a variable; returns the name the graph reads."""
    self.used.add(path)
    if value.dtype == np.uint8 and value.size and value.max() < 16:
      # Half the bytes. Read as uint8 through a Cast made on first use, or
      # cast straight to the jaxpr's type by convert_element_type.
      self.inits[path] = value.astype(ml_dtypes.uint4)
      alias = self.unique(f'{path}/uint8')
      self._lazy[alias] = path
      return alias
    self.inits[path] = value
    return path

  def name(self, value):
    """The graph name of a value: a name, or a constant made initializer."""
    if not isinstance(value, str):
      return self.const(value)
    if value in self._lazy:
      self.nodes.append(self.helper.make_node(
          'Cast', [self._lazy.pop(value)], [value], name=value,
          to=self.helper.np_dtype_to_tensor_dtype(np.dtype(np.uint8))))
    return value

  def node(self, op, inputs, n_out=1, **attrs):
    """Appends an ``op`` node; returns its output's name (n_out > 1: list)."""
    base = f'{self.stack}/{op}' if self.stack else op
    outs = [self.unique(base) for _ in range(n_out)]
    self.nodes.append(self.helper.make_node(
        op, [self.name(x) for x in inputs], outs, name=outs[0], **attrs))
    return outs[0] if n_out == 1 else outs

  def cast(self, x, dtype):
    return self.node('Cast', [x], to=self.helper.np_dtype_to_tensor_dtype(
        np.dtype(dtype)))

  def dim(self, d):
    """``d`` (an int or a symbolic size) as an int64 [1] tensor."""
    if _static(d):
      return self.const(np.array([d], np.int64))
    if self._batch is None:
      self._batch = self.node('Shape', [self.input_name], start=0, end=1)
    try:  # pylint: disable-next=protected-access
      out = d._evaluate({self.batch_dim: _Sym(self, self._batch)})
    except Exception as e:  # Any other dimension variable or operation.
      raise _refuse(self.prim, self.stack, f' with the size {d}') from e
    return out.name if isinstance(out, _Sym) else self.dim(int(out))

  def dims(self, shape):
    """``shape`` as an int64 1-D tensor, computed at run time if symbolic."""
    if all(_static(d) for d in shape):
      return self.const(np.array(shape, np.int64))
    return self.node('Concat', [self.dim(d) for d in shape], axis=0)

  def run(self, jaxpr, consts, args, stack):
    """Writes ``jaxpr``'s equations; returns its outputs' values."""
    env = dict(zip(jaxpr.constvars, (np.asarray(x) for x in consts)))
    env.update(zip(jaxpr.invars, args))

    def read(v):
      if isinstance(v, jax_core.Literal):
        return np.asarray(v.val, v.aval.dtype)
      return env[v]

    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      where = _join(stack, eqn.source_info.name_stack)
      sub = _sub_jaxpr(eqn)
      multiple = eqn.primitive.multiple_results
      if sub is not None:
        outs = self.run(sub[0], sub[1], ins, where)
      elif _foldable(eqn, ins):
        out = eqn.primitive.bind(*ins, **eqn.params)
        outs = [np.asarray(o) for o in (out if multiple else [out])]
      else:
        self.stack, self.prim = where, eqn.primitive.name
        outs = _RULES[eqn.primitive.name](self, eqn, *ins)
        outs = outs if isinstance(outs, list) else [outs]
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _foldable(eqn, ins):
  shapes = [v.aval.shape for v in eqn.outvars]
  limit = max([_MAX_FOLD] + [np.size(x) for x in ins])
  return ins and all(isinstance(x, np.ndarray) for x in ins) and all(
      _static(d) for s in shapes for d in s) and all(
          np.prod(s, dtype=np.int64) <= limit for s in shapes)


def _aval(eqn, i=0, out=False):
  return (eqn.outvars if out else eqn.invars)[i].aval


def _typed(value, eqn):
  return np.asarray(value, _aval(eqn, out=True).dtype)


def _transpose(c, x, perm):
  perm = [int(p) for p in perm]
  return x if perm == sorted(perm) else c.node('Transpose', [x], perm=perm)


def _i64(values):
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
    x = c.node('Unsqueeze', [x, _i64(new)])
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
  symbolic = [i for i, d in enumerate(sizes) if not _static(d)]
  if len(symbolic) <= 1:  # -1: the one size that follows the batch size.
    target = _i64([-1 if i in symbolic else d for i, d in enumerate(sizes)])
  else:
    target = c.dims(sizes)
  return c.node('Reshape', [x, target])


def _slice(c, e, x):
  p, shape = e.params, _aval(e).shape
  strides = p['strides'] or (1,) * len(shape)
  todo = [(i, s, l, st) for i, (s, l, st, d) in enumerate(zip(
      p['start_indices'], p['limit_indices'], strides, shape))
          if (s, st) != (0, 1) or l != d]
  if not all(_static(l) for _, _, l, _ in todo):
    raise _refuse(c.prim, c.stack, ' with a symbolic limit')
  if not todo:
    return x
  return c.node('Slice', [x] + [_i64(v) for v in zip(*[
      (s, l, i, st) for i, s, l, st in todo])])


def _pad(c, e, x, value):
  config = e.params['padding_config']
  if any(interior for _, _, interior in config):
    raise _refuse(c.prim, c.stack, ' with interior padding')
  pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
  if not any(pads):
    return x
  return c.node('Pad', [x, _i64(pads), value], mode='constant')


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
    y = c.node(op, [c.cast(x, np.int64) if wide else x, _i64(axes)],
               keepdims=0)
    return c.cast(y, dtype) if wide else y
  return rule


def _window(kind):
  """reduce_window_{max,min,sum} as MaxPool, -MaxPool(-x) or a ones Conv."""
  def rule(c, e, x):
    p, shape = e.params, _aval(e).shape
    if any(b != 1 for b in p['base_dilation']) or any(
        lo < 0 or hi < 0 for lo, hi in p['padding']):
      raise _refuse(c.prim, c.stack, ' with base dilation or negative padding')
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
    if kind == 'sum' and not _static(ch):
      raise _refuse(c.prim, c.stack, ' over a symbolic axis')
    perm = keep + spatial
    x = _transpose(c, x, perm)
    lead = [[0, 1], [1], []][len(keep)]
    if lead:
      x = c.node('Unsqueeze', [x, _i64(lead)])
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
      y = c.node('Squeeze', [y, _i64(lead)])
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
    raise _refuse(c.prim, c.stack, ' with this reduction')
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
    raise _refuse(c.prim, c.stack, f' with lhs_dilation={p["lhs_dilation"]} '
                  f'and batch_group_count={p["batch_group_count"]}')
  if any(lo < 0 or hi < 0 for lo, hi in p['padding']):
    raise _refuse(c.prim, c.stack, ' with negative padding')
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
    if not (_static(size) and _static(dim)):
      raise _refuse(c.prim, c.stack, ' over a symbolic axis')
    # XLA clamps the start so that the slice fits; ONNX would shorten it.
    if isinstance(start, np.ndarray):
      s = _i64([min(max(int(start), 0), dim - size)])
    else:
      s = c.node('Clip', [c.node('Unsqueeze', [c.cast(start, np.int64), _i64(
          [0])]), _i64(0), _i64(dim - size)])
    begin.append(s)
    end.append(c.node('Add', [s, _i64([size])]))
    axes.append(i)
  cat = lambda v: c.node('Concat', v, axis=0) if len(v) > 1 else v[0]
  return c.node('Slice', [x, cat(begin), cat(end), _i64(axes)]) if axes else x


def _gather(c, e, x, idx):
  """A gather with constant indices: a slice, or GatherND of whole rows."""
  dn, shape = e.params['dimension_numbers'], _aval(e).shape
  sizes, starts = e.params['slice_sizes'], dn.start_index_map
  if not isinstance(idx, np.ndarray) or dn.operand_batching_dims or not (
      idx.ndim == 1 or set(starts) == set(dn.collapsed_slice_dims)):
    raise _refuse(c.prim, c.stack, ' with computed or batched indices')
  limit = np.array([shape[i] - sizes[i] if _static(shape[i]) else 0
                    for i in starts])
  if 'FILL' in str(e.params['mode']) and np.any((idx < 0) | (idx > limit)):
    raise _refuse(c.prim, c.stack, ' out of bounds')
  idx = np.clip(idx, 0, limit)  # XLA clamps indices so the slice fits.
  if idx.ndim == 1:  # One slice (jnp's x[:, 0] under a symbolic batch).
    start = dict(zip(starts, idx.tolist()))
    y = _dynamic_slice(c, e.replace(params=dict(slice_sizes=sizes)), x, *[
        np.asarray(start.get(i, 0)) for i in range(len(shape))])
    collapsed = list(dn.collapsed_slice_dims)
    return c.node('Squeeze', [y, _i64(collapsed)]) if collapsed else y
  # Whole rows at index tuples (a strided slice under a symbolic batch):
  # indexed axes first, GatherND, then the rows' axes to offset_dims.
  rest = [i for i in range(len(shape)) if i not in starts]
  if any(sizes[i] != shape[i] for i in rest):
    raise _refuse(c.prim, c.stack, ' of partial rows')
  y = c.node('GatherND', [_transpose(c, x, list(starts) + rest), _i64(idx)])
  nb, offsets, batch = idx.ndim - 1, list(dn.offset_dims), iter(range(
      idx.ndim - 1))
  return _transpose(c, y, [nb + offsets.index(p) if p in offsets else next(
      batch) for p in range(nb + len(rest))])


def _iota(c, e):
  p = e.params
  if not all(_static(d) for d in p['shape']):
    raise _refuse(c.prim, c.stack, ' of a symbolic size')
  return np.indices(p['shape'])[p['dimension']].astype(p['dtype'])


_RULES = {
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
        'Squeeze', [x, _i64(e.params['dimensions'])]),
    'transpose': lambda c, e, x: _transpose(c, x, e.params['permutation']),
    'concatenate': lambda c, e, *xs: c.node(
        'Concat', list(xs), axis=int(e.params['dimension'])),
    'slice': _slice, 'pad': _pad,
    'rev': lambda c, e, x: c.node('Slice', [x] + [_i64(v) for v in zip(*[
        (-1, _INT64_MIN, d, -1) for d in e.params['dimensions']])]),
    'split': lambda c, e, x: c.node(
        'Split', [x, _i64(e.params['sizes'])], n_out=len(e.params['sizes']),
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
        c.dim(e.params['dim']), _i64([0])]), _aval(e, out=True).dtype),
}

SUPPORTED = tuple(sorted(set(_RULES) | set(_INLINE)))


def _path_name(path):
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(
      k, 'name', k)))) for k in path)


def convert(fn, variables, image_shape, *, input_name='images',
            output_name='logits', opset=21, graph_name='dtq_jax',
            batch_dim='N'):
  """The ONNX model of ``fn(variables, images)``, for any batch size.

  Args:
    fn: ``fn(variables, images) -> logits``, a JAX function (e.g. ``lambda
      v, x: model.apply(v, x, train=False)``).
    variables: nested dicts of arrays; each leaf becomes an initializer named
      by its '/'-joined path, in its own dtype.
    image_shape: ``(H, W, C)`` of one image; images are float32 NHWC.
    input_name: the graph's input.
    output_name: the graph's output, float32 ``(batch_dim, K)``.
    opset: the ONNX opset (21: every rule's operators exist there).
    graph_name: the ONNX graph's name.
    batch_dim: the symbolic batch size's name (the input's dim_param).

  Returns:
    An ``onnx.ModelProto`` that passes ``onnx.checker.check_model``.

  Raises:
    UnsupportedOperation: an operation has no translation (the first one,
      before anything is built).
    errors.UserError: onnx is missing, or ``fn`` returns something other
      than one float32 (N, K) array.
  """
  onnx = onnx_export.require('onnx', 'the ONNX export')
  helper = onnx_export.require('onnx.helper', 'the ONNX export')
  numpy_helper = onnx_export.require('onnx.numpy_helper', 'the ONNX export')
  flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
  arrays = [np.asarray(leaf) for _, leaf in flat]
  (batch,) = jax_export.symbolic_shape(batch_dim)
  try:  # Traced once for every batch size: the batch is a symbolic size.
    closed = jax.make_jaxpr(fn)(
        jax.tree_util.tree_unflatten(treedef, [
            jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]),
        jax.ShapeDtypeStruct((batch, *image_shape), np.float32))
  except jax_core.InconclusiveDimensionOperation as e:
    raise errors.UserError(
        'ONNX export: the function depends on the batch size in a way that '
        f'one graph cannot hold: {str(e).strip().splitlines()[0]}') from e
  outs = closed.jaxpr.outvars
  if len(outs) != 1 or outs[0].aval.dtype != np.float32 or len(
      outs[0].aval.shape) != 2 or not _static(outs[0].aval.shape[1]) or (
          outs[0].aval.shape[0] != batch):
    raise errors.UserError(
        'ONNX export: the function must return one float32 (N, K) array; it '
        f'returns {[str(v.aval) for v in outs]}.')
  _first_unsupported(closed.jaxpr)
  c = _Converter(helper, batch_dim, input_name,
                 [input_name, output_name] + [_path_name(p) for p, _ in flat])
  args = [c.leaf(_path_name(p), a) for (p, _), a in zip(flat, arrays)]
  (out,) = c.run(closed.jaxpr, closed.consts, args + [input_name], '')
  c.nodes.append(helper.make_node('Identity', [c.name(out)], [output_name],
                                  name=output_name))
  float_type = onnx.TensorProto.FLOAT
  graph = helper.make_graph(
      c.nodes, graph_name,
      [helper.make_tensor_value_info(input_name, float_type,
                                     [batch_dim, *image_shape])],
      [helper.make_tensor_value_info(
          output_name, float_type, [batch_dim, int(outs[0].aval.shape[1])])],
      [numpy_helper.from_array(v, k) for k, v in c.inits.items()])
  model = helper.make_model(
      graph, opset_imports=[helper.make_opsetid('', opset)],
      producer_name='dtq-jax', doc_string='Converted from a jaxpr by '
      'dtq_jax.deploy.jaxpr_onnx.')
  if opset <= 21:
    model.ir_version = 10  # What every onnxruntime with opset 21 reads.
  onnx.checker.check_model(model, full_check=True)
  return model
