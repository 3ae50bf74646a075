"""A user's own Flax image classifier as a dtq_jax model, its code untouched.

The zoo's networks take their quantized convolution as an injected ``conv``.
A network written without dtq_jax (a Flax Linen module with a ``num_classes``
attribute and ``__call__(x, train)`` returning logits) is reached instead with
Flax's method interception (``nn.intercept_methods``): every ``nn.Conv`` call
of the student runs as a ``layers.QuantConv`` with the same attributes and the
user's own kernel (the zoo's code path, so the numerics are the zoo's), an
``nn.Dense`` optionally as a fake-quantized Dense; the tapped feature maps are
read with Flax's intermediates mechanism (``capture_intermediates``) and the
source classifier's input with the interceptor. ``OwnNetwork`` wraps the
module with the zoo's interface: ``apply`` returns ``(logits, {'pooled',
'taps'})``, ``classifier_name`` names the source classifier's params.

Which layers are quantized, which maps are tapped and which Dense is the
source classifier are settled once, by tracing the network on abstract
inputs (``resolve``: no FLOPs, no memory), and listed by ``describe``.
"""

import dataclasses
import importlib
import inspect
import re
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dtq_jax import layers
from dtq_jax import quant
from dtq_jax.infra import errors

# The separator of module paths in names, patterns and the listing; the
# param tree of 'stage1/Conv_0' is params['stage1']['Conv_0'].
SEP = '/'
# Maps the AFA term aligns (the paper's four).
NUM_AUTO_TAPS = 4


class NetworkError(errors.UserError, ValueError):
  """The network, or a setting about it, cannot be used; one line."""


def is_import_path(name):
  """Whether ``config.model`` names a user's class ('package.module:Class')."""
  return isinstance(name, str) and ':' in name


def load_class(spec):
  """The Flax module class that ``'package.module:Class'`` names.

  Args:
    spec: the import path.

  Returns:
    The class.

  Raises:
    NetworkError: the module does not import, has no such attribute, or the
      attribute is not a Flax Linen module with ``num_classes`` and a
      ``__call__`` taking ``train``.
  """
  module_name, _, attr = spec.partition(':')
  if not module_name or not attr:
    raise NetworkError(f"model={spec!r}: write 'package.module:Class'.")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # pylint: disable=broad-except
    # Whatever the user's module raises on import (a SyntaxError included).
    raise NetworkError(f'model={spec!r}: cannot import {module_name!r} '
                       f'({type(e).__name__}: {e}).') from e
  cls = module
  for part in attr.split('.'):
    if not hasattr(cls, part):
      raise NetworkError(f'model={spec!r}: {module_name!r} has no {attr!r}.')
    cls = getattr(cls, part)
  if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
    raise NetworkError(f'model={spec!r} is not a flax.linen.Module class '
                       f'(it is {type(cls).__name__}).')
  fields = {f.name for f in dataclasses.fields(cls)}
  if 'num_classes' not in fields:
    raise NetworkError(f'model={spec!r} has no num_classes attribute (the '
                       "outputs of its classifier, set to the source task's "
                       'classes).')
  if 'train' not in inspect.signature(cls.__call__).parameters:
    raise NetworkError(f'model={spec!r}: its __call__ takes no train '
                       'argument; write __call__(self, x, train).')
  return cls


def build_module(spec, num_classes, model_kwargs=None, dtype=None):
  """The user's network, with its classifier sized to ``num_classes``.

  Args:
    spec: 'package.module:Class'.
    num_classes: outputs of the source classifier.
    model_kwargs: further attributes of the class, passed as they are.
    dtype: computation dtype (None: the class's own); set as the class's
      ``dtype`` attribute unless ``model_kwargs`` sets it.

  Returns:
    An unbound module.

  Raises:
    NetworkError: the class cannot be loaded, or rejects the attributes.
  """
  cls = load_class(spec)
  kwargs = dict(model_kwargs or {})
  fields = {f.name for f in dataclasses.fields(cls)}
  if dtype is not None and jnp.dtype(dtype) != jnp.float32:
    if 'dtype' not in fields:
      raise NetworkError(f'model={spec!r} has no dtype attribute, so it '
                         f'cannot compute in {jnp.dtype(dtype).name}.')
    kwargs.setdefault('dtype', dtype)
  try:
    return cls(num_classes=num_classes, **kwargs)
  except TypeError as e:
    raise NetworkError(f'model={spec!r} with model_kwargs={kwargs}: '
                       f'{e}.') from e


@dataclasses.dataclass(frozen=True)
class Layer:
  """A convolution or Dense layer of the network, as the student runs it.

  Attributes:
    path: module path ('stage1/Conv_0').
    kind: 'conv' or 'dense'.
    quantized: whether the student fake-quantizes it.
    reason: why it is kept in full precision ('' when quantized).
  """
  path: str
  kind: str
  quantized: bool
  reason: str = ''


@dataclasses.dataclass(frozen=True)
class Plan:
  """What ``resolve`` settled about one network.

  Attributes:
    layers: every Conv and Dense layer, in call order.
    taps: module paths whose outputs feed AFA (and DELTA).
    tap_shapes: each tap's output shape for one image (H, W, C).
    auto_taps: whether the taps were chosen by ``resolve``.
    classifier: module path of the source classifier.
    feature_dim: the width of its input (the target head's input).
    tap_filters: for each tap, the last Conv or Dense layer computed in it
      (the tap itself, or inside it) with as many outputs as the map has
      channels, or None: the filters DELTA's channel weights remove (for the
      zoo's networks, the convolution ``delta.tapped_convolutions`` names).
  """
  layers: Tuple[Layer, ...]
  taps: Tuple[str, ...]
  tap_shapes: Tuple[Tuple[int, ...], ...]
  auto_taps: bool
  classifier: str
  feature_dim: int
  tap_filters: Tuple[Optional[str], ...] = ()

  @property
  def quantized(self):
    """Paths of the fake-quantized layers."""
    return frozenset(l.path for l in self.layers if l.quantized)


def _path(module):
  return SEP.join(module.path)


def _trace(module, image_shape):
  """Every module call of one abstract forward pass, in completion order.

  Returns:
    ``(calls, logits)``: ``calls`` is a list of ``(path, module type, input,
    output)`` of each ``__call__`` (abstract arrays), ``logits`` the
    network's output.
  """
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and context.module.path:
      calls.append((_path(context.module), type(context.module),
                    args[0] if args else None, out))
    return out

  def forward(images):
    with nn.intercept_methods(record):
      variables = module.init(jax.random.key(0), images, train=False)
      calls.clear()  # Only the apply's calls, with their variables bound.
      logits = module.apply(variables, images, train=False)
    return logits, calls

  images = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  # Identity of the traced values is what links the logits to the Dense
  # that produced them, so trace with make_jaxpr's tracers kept in Python.
  result = {}

  def capture(images):
    logits, recorded = forward(images)
    result['calls'] = [(p, t, i, o) for p, t, i, o in recorded]
    result['logits'] = logits
    # The source classifier is the last Dense whose output is the logits.
    result['producer'] = [p for p, t, _, o in recorded
                          if issubclass(t, nn.Dense) and o is logits]
    return logits

  try:
    jax.eval_shape(capture, images)
  except NetworkError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise NetworkError(f'{type(module).__name__} fails on images of shape '
                       f'{tuple(image_shape)}: {type(e).__name__}: '
                       f'{str(e).splitlines()[0] if str(e) else ""}') from e
  shape = lambda x: tuple(getattr(x, 'shape', ()))
  calls = [(p, t, shape(i), shape(o)) for p, t, i, o in result['calls']]
  return calls, shape(result['logits']), result['producer']


def _fullmatch_any(patterns, path):
  return next((p for p in patterns if re.fullmatch(p, path)), None)


def resolve(module, image_shape, *, keep_float=(), quantize_dense=False,
            taps=(), source_classifier=''):
  """Settles the layers to quantize, the taps and the source classifier.

  Args:
    module: the user's network (unbound).
    image_shape: (H, W, C) of one input image.
    keep_float: regular expressions; a layer whose path matches one in full
      (``re.fullmatch``) stays in full precision. The first convolution
      and the source classifier always do (the paper's choice).
    quantize_dense: also quantize ``nn.Dense`` layers (not the classifier).
    taps: regular expressions each naming exactly one module whose output,
      a (B, H, W, C) map, feeds AFA; () picks, for each of the last four
      spatial resolutions, the last module that outputs a map of it.
    source_classifier: path of the final ``nn.Dense``; '' takes the last
      Dense whose output the network returns.

  Returns:
    A ``Plan``.

  Raises:
    NetworkError: a pattern that matches nothing, a tap that matches no or
      several modules or is not a map, a classifier that is not a Dense or
      does not produce the logits, or no convolution to quantize.
  """
  calls, logits_shape, producers = _trace(module, image_shape)
  if len(logits_shape) != 2:
    raise NetworkError(f'{type(module).__name__} returns shape '
                       f'{logits_shape} for one image; a classifier returns '
                       '(batch, classes) logits.')
  kinds = {}
  inputs = {}
  for path, cls, x, _ in calls:
    if issubclass(cls, nn.Conv):
      kinds.setdefault(path, 'conv')
    elif issubclass(cls, nn.Dense):
      kinds.setdefault(path, 'dense')
    inputs.setdefault(path, x)

  if source_classifier:
    if source_classifier not in inputs:
      raise NetworkError(f'source_classifier={source_classifier!r}: no module '
                         'of that path is called.')
    if kinds.get(source_classifier) != 'dense':
      raise NetworkError(f'source_classifier={source_classifier!r} is not an '
                         'nn.Dense.')
    if source_classifier not in producers:
      raise NetworkError(f'source_classifier={source_classifier!r} does not '
                         'produce the logits (the network must return its '
                         'output as it is).')
    classifier = source_classifier
  elif producers:
    classifier = producers[-1]
  else:
    raise NetworkError(f'{type(module).__name__}: no nn.Dense produces the '
                       'logits it returns; set dtq.source_classifier, and '
                       'return that layer\'s output as it is.')
  feature_shape = inputs[classifier]
  if len(feature_shape) != 2:
    raise NetworkError(f'source classifier {classifier!r} reads shape '
                       f'{feature_shape}; it must read pooled (batch, '
                       'features) vectors.')

  for pattern in keep_float:
    if not any(re.fullmatch(pattern, p) for p in kinds):
      raise NetworkError(f'quant.keep_float pattern {pattern!r} matches no '
                         f'Conv or Dense layer (paths look like '
                         f'{next(iter(kinds), "?")!r}).')
  convs = [p for p, k in kinds.items() if k == 'conv']
  if not convs:
    raise NetworkError(f'{type(module).__name__} has no nn.Conv to quantize.')
  plan_layers = []
  for path, kind in kinds.items():
    pattern = _fullmatch_any(keep_float, path)
    if path == convs[0]:
      reason = 'first convolution'
    elif path == classifier:
      reason = 'source classifier'
    elif pattern is not None:
      reason = f'keep_float {pattern!r}'
    elif kind == 'dense' and not quantize_dense:
      reason = 'Dense: quant.quantize_dense=False'
    else:
      reason = ''
    plan_layers.append(Layer(path, kind, not reason, reason))

  outputs = {}
  counts = {}
  for path, _, _, out in calls:
    counts[path] = counts.get(path, 0) + 1
    outputs[path] = out
  if taps:
    chosen = []
    for pattern in taps:
      matches = [p for p in outputs if re.fullmatch(pattern, p)]
      if len(matches) != 1:
        raise NetworkError(
            f'dtq.taps entry {pattern!r} matches {len(matches)} modules'
            f'{": " + ", ".join(matches[:4]) if matches else ""}; each must '
            'name exactly one.')
      path = matches[0]
      if counts[path] > 1:
        raise NetworkError(f'dtq.taps entry {path!r}: the module is called '
                           f'{counts[path]} times; tap a module called once.')
      if len(outputs[path]) != 4:
        raise NetworkError(f'dtq.taps entry {path!r} outputs shape '
                           f'{outputs[path]}; a tap is a (batch, H, W, C) '
                           'map.')
      chosen.append(path)
  else:
    chosen = _auto_taps(calls, counts)
  shapes = tuple(outputs[p][1:] for p in chosen)
  filters = tuple(_tap_filter(calls, kinds, p, outputs[p][-1]) for p in chosen)
  return Plan(tuple(plan_layers), tuple(chosen), shapes, not taps,
              classifier, feature_shape[-1], filters)


def _tap_filter(calls, kinds, tap, channels):
  """The last Conv/Dense at or inside ``tap`` with ``channels`` outputs."""
  found = None
  for path, _, _, out in calls:
    inside = path == tap or path.startswith(tap + SEP)
    if inside and path in kinds and out and out[-1] == channels:
      found = path
  return found


def _auto_taps(calls, counts):
  """The last module outputting each of the last four resolutions' maps.

  The network's own children (its stages, as a user names them) are looked
  at first; nested modules only when the children give fewer than four
  resolutions (a squeeze-and-excitation's 1x1 map inside a block is not a
  resolution of the network).
  """

  def choose(top_level_only):
    last, order = {}, []
    for path, _, _, out in calls:
      if len(out) != 4 or counts[path] > 1 or (top_level_only and
                                               SEP in path):
        continue
      resolution = out[1:3]
      if resolution not in last:
        order.append(resolution)
      last[resolution] = path
    return [last[r] for r in order[-NUM_AUTO_TAPS:]]

  chosen = choose(top_level_only=True)
  if len(chosen) < NUM_AUTO_TAPS:
    chosen = choose(top_level_only=False)
  if not chosen:
    raise NetworkError('no module outputs a (batch, H, W, C) map to tap.')
  return chosen


def describe(plan, bits_w, bits_a):
  """Lines listing the layers as the student runs them, and the taps.

  Args:
    plan: the network's ``Plan``.
    bits_w: weight bits of quantized layers.
    bits_a: input-activation bits of quantized layers.

  Returns:
    A list of strings.
  """
  width = max(len(l.path) for l in plan.layers)
  lines = []
  for l in plan.layers:
    how = (f'{bits_w}-bit weights, {bits_a}-bit inputs'
           if l.quantized and bits_w < quant.FULL_PRECISION
           else 'float' + (f' ({l.reason})' if l.reason else ''))
    lines.append(f'{l.path:<{width}}  {l.kind:<5}  {how}')
  source = 'chosen: last module per resolution' if plan.auto_taps else (
      'dtq.taps')
  lines.append(f'taps ({source}): ' + ', '.join(
      f'{p} {tuple(s)}' for p, s in zip(plan.taps, plan.tap_shapes)))
  lines.append(f'source classifier: {plan.classifier} '
               f'({plan.feature_dim} features)')
  return lines


# Attributes of nn.Conv that QuantConv takes as they are.
_CONV_FIELDS = ('features', 'kernel_size', 'strides', 'padding',
                'input_dilation', 'kernel_dilation', 'feature_group_count',
                'use_bias', 'dtype', 'param_dtype')


def _quant_conv(module, bits_w, bits_a, settings, conv=layers.QuantConv):
  """The ``conv`` (a ``layers.QuantConv``) that computes ``module``."""
  path = _path(module)
  unsupported = [name for name in ('mask', 'conv_general_dilated',
                                   'conv_general_dilated_cls', 'precision')
                 if getattr(module, name) is not None]
  if isinstance(module.padding, str) and module.padding.upper() in (
      'CIRCULAR', 'CAUSAL'):
    unsupported.append(f'padding={module.padding!r}')
  if unsupported:
    raise NetworkError(f'cannot quantize {path}: nn.Conv with '
                       f'{", ".join(unsupported)} is not supported; list it '
                       'in quant.keep_float.')
  attrs = {name: getattr(module, name) for name in _CONV_FIELDS}
  kernel_size = attrs['kernel_size']
  attrs['kernel_size'] = ((kernel_size,) * 2 if isinstance(kernel_size, int)
                          else tuple(kernel_size))
  if len(attrs['kernel_size']) != 2:
    raise NetworkError(f'cannot quantize {path}: only 2-D convolutions are; '
                       'list it in quant.keep_float.')
  for name in ('strides', 'input_dilation', 'kernel_dilation'):
    if attrs[name] is None:
      attrs[name] = 1
  return conv(bits_w=bits_w, bits_a=bits_a, **attrs,
              **settings.as_conv_kwargs())


def _dense_promote(bits_w, bits_a, settings):
  """``nn.Dense.promote_dtype`` that fake-quantizes inputs and kernel first.

  The zoo's order: the quantizers see the input and the float32 kernel, then
  both are cast to the computation dtype.
  """

  def promote(inputs, kernel, bias, dtype=None):
    inputs = quant.fake_quant(inputs, bits_a, range_grad=settings.range_grad,
                              fused_vjp=settings.fused_vjp)
    kernel = quant.fake_quant(kernel, bits_w, axis=settings.weight_range_axis,
                              range_grad=settings.range_grad,
                              fused_vjp=settings.fused_vjp)
    return nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=dtype)

  promote.quantizing = True
  return promote


def _run_quantized(module, x, bits_w, bits_a, settings, conv_cls):
  """Runs a Conv/Dense call of the user's network fake-quantized.

  The layer's own variables are read from its scope, and a ``conv_cls``
  (or a Dense with a quantizing ``promote_dtype``) computes with them; the
  static activation ranges, when kept, live in the layer's own scope, as do
  an export's integer weights (``int_inference.IntConv``).
  """
  if isinstance(module, nn.Dense):
    dense = module.clone(parent=None, promote_dtype=_dense_promote(
        bits_w, bits_a, settings))
    return dense.apply({'params': module.variables['params']}, x)
  conv = _quant_conv(module, bits_w, bits_a, settings, conv_cls)
  # Every collection the layer's scope holds: params (an exported one may
  # have none: its kernel is stored as integer codes; learned quantizer
  # steps sit beside the kernel), ranges, codes.
  variables = {col: tree for col, tree in module.variables.items()
               if col != 'intermediates'}
  # What the layer writes, kept in the user's layer's own scope: static
  # activation ranges, and the learned quantizers' probe and start passes
  # (method/learned_params.py).
  written = [c for c in _WRITTEN if module.is_mutable_collection(c)]
  if not written:
    return conv.apply(variables, x)
  y, state = conv.apply(variables, x, mutable=written)
  for collection in written:
    for name, value in state.get(collection, {}).items():
      module.put_variable(collection, name, value)
  return y


_WRITTEN = (layers.RANGES, layers.LSQ_PROBE, layers.LSQ_INIT)


@dataclasses.dataclass(frozen=True, eq=False)
class OwnNetwork:
  """A user's network with the zoo's interface (``init``, ``apply``).

  Attributes:
    module: the user's Flax module (unbound), its ``num_classes`` set.
    plan: what ``resolve`` settled for it.
    bits_w: weight bit width of the quantized layers (32 = float).
    bits_a: input-activation bit width of the quantized layers.
    conv_kwargs: the ``layers.QuantSettings`` of the quantized layers, as
      keyword arguments (the zoo models' attribute of the same name).
    conv: the class that computes a quantized ``nn.Conv`` (the zoo models'
      attribute of the same name: ``layers.QuantConv``, or the export's
      ``int_inference.IntConv``).
  """
  module: Any
  plan: Plan
  bits_w: int = quant.FULL_PRECISION
  bits_a: int = quant.FULL_PRECISION
  conv_kwargs: Optional[dict] = None
  conv: Any = layers.QuantConv
  # The features the source classifier reads already carry the network's
  # own dropout in training; the target head adds none ('shared').
  dropout_rate = 0.0

  @property
  def classifier_name(self):
    """The source classifier's path in the params tree ('a/b')."""
    return self.plan.classifier

  def clone(self, **changes):
    """A copy with ``changes`` (as ``flax.linen.Module.clone``)."""
    return dataclasses.replace(self, **changes)

  def _quantizes(self):
    return (self.bits_w < quant.FULL_PRECISION or
            self.bits_a < quant.FULL_PRECISION)

  def _interceptor(self, captured):
    settings = layers.QuantSettings(**(self.conv_kwargs or {}))
    quantized = self.plan.quantized if self._quantizes() else frozenset()
    classifier = self.plan.classifier

    def intercept(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name != '__call__' or getattr(
          getattr(module, 'promote_dtype', None), 'quantizing', False):
        return next_fun(*args, **kwargs)
      path = _path(module)
      if path == classifier:
        captured['pooled'] = args[0]
      if path not in quantized or module.is_initializing():
        return next_fun(*args, **kwargs)
      return _run_quantized(module, args[0], self.bits_w, self.bits_a,
                            settings, self.conv)

    return intercept

  def module_paths(self, rngs, x, train=False):
    """``{path: module}`` of the quantized convolutions the student runs.

    As ``flax.linen.Module.module_paths`` (which ``layers.modules_called``
    calls) for the layers that matter to an export: each quantized
    ``nn.Conv`` of the user's network as the ``conv`` that computes it, an
    unbound copy with its attributes; the other layers as the user's own
    modules. Traced on abstract inputs (no FLOPs).

    Args:
      rngs: unused (the layers are found by an abstract trace).
      x: images (their shape and dtype are used).
      train: training mode.

    Returns:
      ``{'a/b': module}`` in call order.
    """
    del rngs
    settings = layers.QuantSettings(**(self.conv_kwargs or {}))
    quantized = self.plan.quantized if self._quantizes() else frozenset()
    found = {}

    def record(next_fun, args, kwargs, context):
      module = context.module
      if context.method_name == '__call__' and module.path:
        path = _path(module)
        if path in quantized and isinstance(module, nn.Conv):
          found[path] = _quant_conv(module, self.bits_w, self.bits_a,
                                    settings, self.conv)
        elif path not in found:
          found[path] = module.clone(parent=None)
      return next_fun(*args, **kwargs)

    def forward(images):
      with nn.intercept_methods(record):
        return self.module.init(jax.random.key(0), images, train=train)

    jax.eval_shape(forward, jax.ShapeDtypeStruct(x.shape, x.dtype))
    return found

  def init(self, rngs, x, train=False, **kwargs):
    """The network's variables (as ``flax.linen.Module.init``)."""
    return self.module.init(rngs, x, train=train, **kwargs)

  def apply(self, variables, x, train=False, mutable=False, rngs=None):
    """Runs the network (as a zoo model's ``apply``).

    Args:
      variables: the network's variables.
      x: NHWC images.
      train: training mode (BatchNorm's batch statistics, dropout).
      mutable: collections to return updated, as ``Module.apply``.
      rngs: PRNG keys (``'dropout'``).

    Returns:
      ``(logits, features)`` with ``features = {'pooled': the source
      classifier's input, 'taps': [tapped maps]}``; with ``mutable``,
      ``((logits, features), updated collections)``.
    """
    captured = {}
    taps = set(self.plan.taps)
    capture = lambda mdl, name: name == '__call__' and _path(mdl) in taps
    with nn.intercept_methods(self._interceptor(captured)):
      logits, state = self.module.apply(
          variables, x, train=train, mutable=mutable or [], rngs=rngs,
          capture_intermediates=capture)
    state = dict(state)
    intermediates = state.pop('intermediates', {})
    for collection in (mutable if isinstance(mutable, (list, tuple)) else ()):
      # As a zoo model returns them, also when the network has none (no
      # BatchNorm): the steps read state['batch_stats'] for every network.
      state.setdefault(collection, {})
    maps = []
    for path in self.plan.taps:
      node = intermediates
      for key in path.split(SEP):
        node = node[key]
      maps.append(node['__call__'][0])
    features = {'pooled': captured['pooled'], 'taps': maps}
    if mutable:
      return (logits, features), state
    return logits, features


def create(spec, num_classes, image_shape, *, bits_w=quant.FULL_PRECISION,
           bits_a=quant.FULL_PRECISION, conv_kwargs=None, dtype=None,
           model_kwargs=None, keep_float=(), quantize_dense=False, taps=(),
           source_classifier='', conv=layers.QuantConv):
  """An ``OwnNetwork`` for the class that ``spec`` names.

  Args:
    spec: 'package.module:Class'.
    num_classes: outputs of the source classifier.
    image_shape: (H, W, C) of one input image.
    bits_w: weight bits of the quantized layers (32: float).
    bits_a: input-activation bits of the quantized layers.
    conv_kwargs: ``layers.QuantSettings`` keyword arguments.
    dtype: computation dtype.
    model_kwargs: further attributes of the class.
    keep_float: see ``resolve``.
    quantize_dense: see ``resolve``.
    taps: see ``resolve``.
    source_classifier: see ``resolve``.
    conv: the class that computes the quantized convolutions.

  Returns:
    The ``OwnNetwork``.

  Raises:
    NetworkError: see ``load_class`` and ``resolve``.
  """
  module = build_module(spec, num_classes, model_kwargs, dtype)
  plan = resolve(module, image_shape, keep_float=tuple(keep_float),
                 quantize_dense=quantize_dense, taps=tuple(taps),
                 source_classifier=source_classifier)
  return OwnNetwork(module, plan, bits_w, bits_a, conv_kwargs, conv)
