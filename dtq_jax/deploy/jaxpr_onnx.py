"""Converts a JAX function to an ONNX model, one jaxpr primitive at a time.

``onnx_export`` writes the zoo's networks by hand; a user's own Flax
classifier has no such description, only its code. ``convert`` traces
``fn(variables, images)`` to a jaxpr with a symbolic batch size and writes
each equation as standard ONNX operators (the rules of jaxpr_onnx_ops.py),
inlining nested jaxprs (``jit``, ``custom_jvp_call``, ``custom_vjp_call``
-- the fake quantizers' forward --, ``remat2``, ``closed_call``). Every leaf of
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

from dtq_jax.deploy import jaxpr_onnx_ops as ops
from dtq_jax.deploy import onnx_export
from dtq_jax.infra import errors

# Sub-jaxprs run inline: their parameter holding the jaxpr, by primitive.
_INLINE = ('jit', 'pjit', 'closed_call', 'core_call', 'custom_jvp_call',
           'custom_vjp_call', 'custom_vjp_call_jaxpr', 'remat2', 'checkpoint')
_JAXPR_PARAMS = ('jaxpr', 'call_jaxpr', 'fun_jaxpr')
# Constants are folded up to this many elements (or their inputs' size), so
# that a broadcast literal does not become a large initializer.
_MAX_FOLD = 1024

# Raised for the first equation with no translation (one line).
UnsupportedOperation = ops.UnsupportedOperation


def _join(outer, inner):
  # Name stacks inside a sub-jaxpr are relative to the equation calling it.
  return '/'.join(s for s in (outer, str(inner)) if s)


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
    elif eqn.primitive.name not in ops.RULES:
      raise ops.refuse(eqn.primitive.name, where)


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
        self.name,
        other.name if isinstance(other, _Sym) else ops.i64([other])]))

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
    return onnx_export.unique_name(name, self.used)

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
    if ops.is_static(d):
      return self.const(np.array([d], np.int64))
    if self._batch is None:
      self._batch = self.node('Shape', [self.input_name], start=0, end=1)
    try:  # pylint: disable-next=protected-access
      out = d._evaluate({self.batch_dim: _Sym(self, self._batch)})
    except Exception as e:  # Any other dimension variable or operation.
      raise ops.refuse(self.prim, self.stack, f' with the size {d}') from e
    return out.name if isinstance(out, _Sym) else self.dim(int(out))

  def dims(self, shape):
    """``shape`` as an int64 1-D tensor, computed at run time if symbolic."""
    if all(ops.is_static(d) for d in shape):
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
        outs = ops.RULES[eqn.primitive.name](self, eqn, *ins)
        outs = outs if isinstance(outs, list) else [outs]
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _foldable(eqn, ins):
  shapes = [v.aval.shape for v in eqn.outvars]
  limit = max([_MAX_FOLD] + [np.size(x) for x in ins])
  return ins and all(isinstance(x, np.ndarray) for x in ins) and all(
      ops.is_static(d) for s in shapes for d in s) and all(
          np.prod(s, dtype=np.int64) <= limit for s in shapes)



SUPPORTED = tuple(sorted(set(ops.RULES) | set(_INLINE)))


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
      outs[0].aval.shape) != 2 or not ops.is_static(outs[0].aval.shape[1]) or (
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
