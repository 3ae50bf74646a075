"""Builds the ONNX graph of an exported student (export.py's tensors).

The graph is written with ``onnx.helper`` from the same manifest and
variables as a ``.dtq`` file (``dtq_format.read``), in standard operators of
opset 21, and computes what the project's static-range fake-quant network
computes (``static_ranges.with_act_ranges(student, 'static')``):

* input ``images``: float32 (N, H, W, C), NHWC as ``export.load_integer_model``
  takes them (``(pixels / 255 - mean) / std`` after resizing and centre
  cropping, see the ``preprocess`` metadata); one Transpose to NCHW;
* quantized kernels are stored as their integer codes ``c`` (uint4 for
  1..4 bits, packed two per byte by ONNX; uint8 holding the exact 5..8-bit
  values; uint16 above) and become ``DequantizeLinear(c, s, 0) + lo``, i.e.
  ``c * s + lo`` with the kernel's own range (per tensor, or per output
  channel with ``axis=0``). ``DequantizeLinear`` alone cannot express it: the
  project's zero point ``-lo / s`` is not an integer in general;
* the input of a quantized convolution is fake-quantized with its static
  range ``[lo, hi]`` as in ``quant.fake_quant_range``:
  ``round((clip(x, lo, hi) - lo) / s) * s + lo``, round half to even. Where
  ``lo == 0`` (the input follows a ReLU) that is exactly
  ``DequantizeLinear(QuantizeLinear(Clip(x, 0, hi), s, 0), s, 0)``
  (QuantizeLinear divides by ``s`` and rounds half to even), and the graph
  says so with those operators; elsewhere it spells out Clip, Sub, Div,
  Round, Mul, Add. A constant range (``hi <= lo``) gives ``lo``, as in
  training;
* convolutions (stem, depthwise and grouped included) are float Conv,
  BatchNorm is BatchNormalization (inference), ReLU/ReLU6 are Relu/Clip,
  global average pooling and the target classifier (Gemm) close the graph;
  output ``logits``: float32 (N, num_classes), classes as in the
  ``class_names`` metadata.

Initializers are named as the ``.dtq`` tensors (``int_weights/backbone/
<conv>/codes``, ``quant_ranges/backbone/<conv>/{lo,hi}``, ...), so
``ranges`` reads the activation ranges back. The model's ``metadata_props``
hold ``input``, ``output``, ``class_names`` and ``preprocess`` (JSON) and the
whole ``dtq_manifest``.
"""

import importlib
import json

from flax import traverse_util
import flax.linen as nn
import ml_dtypes
import numpy as np

from dtq_jax import convolution
from dtq_jax.deploy import int_inference
from dtq_jax.infra import errors
from dtq_jax import layers
from dtq_jax import quant
# Classes, not modules: dtq_jax.models exports a function named ``resnet``.
from dtq_jax.models.mobilenet_v2 import INVERTED_RESIDUAL_SETTING
from dtq_jax.models.mobilenet_v2 import MobileNetV2
from dtq_jax.models.resnet import Bottleneck
from dtq_jax.models.resnet import ResNet

OPSET = 21
INPUT = 'images'
OUTPUT = 'logits'
MANIFEST_KEY = 'dtq_manifest'
# onnx and onnxruntime are an extra: imported where used (``require``), so
# that .dtq exports work without them and an ONNX one says what to install.
EXTRA_HINT = "pip install 'dtq-jax[onnx]'"


def require(module='onnx', what='the ONNX export'):
  """Imports ``module`` (onnx, onnxruntime or one of theirs) for ``what``.

  Args:
    module: the module's name, e.g. 'onnx.helper' or 'onnxruntime'.
    what: what needs it, for the error.

  Returns:
    The module.

  Raises:
    errors.UserError: it is not installed (one line naming the extra).
  """
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise errors.UserError(f'{what} needs {module.split(".")[0]}: '
                           f'{EXTRA_HINT}') from e


def code_dtype(bits):
  """The narrowest ONNX-storable unsigned type holding ``bits``-bit codes."""
  if bits <= 4:
    return ml_dtypes.uint4
  return np.uint8 if bits <= 8 else np.uint16


def unique_name(name, used):
  """``name``, or ``name_1``, ``name_2``... the first not in ``used``.

  Args:
    name: the wanted graph name.
    used: the names taken so far; the returned one is added.

  Returns:
    A name unique in the graph.
  """
  out, i = name, 1
  while out in used:
    out, i = f'{name}_{i}', i + 1
  used.add(out)
  return out


class _Graph:
  """Accumulates nodes and initializers with unique, readable names."""

  def __init__(self):
    self.nodes, self.initializers, self._names = [], [], set()
    self._helper = require('onnx.helper')
    self._numpy_helper = require('onnx.numpy_helper')

  def _unique(self, name):
    return unique_name(name, self._names)

  def const(self, name, array):
    name = self._unique(name)
    self.initializers.append(self._numpy_helper.from_array(np.asarray(array),
                                                           name))
    return name

  def node(self, op, inputs, name, **attrs):
    name = self._unique(name)
    self.nodes.append(self._helper.make_node(op, list(inputs), [name],
                                             name=name, **attrs))
    return name


class _Builder:
  """Emits the student's layers, reading tensors by their .dtq names."""

  def __init__(self, graph, flat, modules):
    self.g, self.flat, self.modules = graph, flat, modules

  def tensor(self, name):
    if name not in self.flat:
      raise ValueError(f'no tensor {name} in the export.')
    return np.asarray(self.flat[name])

  def act_quant(self, x, path, bits):
    """Fake-quantizes ``x`` with the static range of conv ``path``."""
    lo = np.float32(self.tensor(f'{layers.RANGES}/backbone/{path}/lo'))
    hi = np.float32(self.tensor(f'{layers.RANGES}/backbone/{path}/hi'))
    scale = np.float32(quant.range_scale(lo, hi, bits))
    prefix = f'{layers.RANGES}/backbone/{path}'
    if scale <= 0:
      # quant.fake_quant_range returns lo; with hi := lo and a unit step
      # the chain below computes exactly that.
      hi, scale = lo, np.float32(1)
    g = self.g
    lo_name = g.const(f'{prefix}/lo', lo)
    x = g.node('Clip', [x, lo_name, g.const(f'{prefix}/hi', hi)],
               f'{path}/input_clip')
    if lo == 0:
      s = g.const(f'{prefix}/scale', scale)
      zero = g.const(f'{prefix}/zero_point', np.zeros((), code_dtype(
          max(bits, 5))))  # uint8/uint16: QuantizeLinear's usual code types.
      q = g.node('QuantizeLinear', [x, s, zero], f'{path}/input_codes')
      return g.node('DequantizeLinear', [q, s, zero], f'{path}/input_fq')
    s = g.const(f'{prefix}/scale', scale)
    u = g.node('Div', [g.node('Sub', [x, lo_name], f'{path}/input_sub'), s],
               f'{path}/input_div')
    r = g.node('Round', [u], f'{path}/input_codes')
    return g.node('Add', [g.node('Mul', [r, s], f'{path}/input_mul'),
                          lo_name], f'{path}/input_fq')

  def kernel(self, path, module):
    """The OIHW kernel: a float initializer, or dequantized codes."""
    g = self.g
    if module.bits_w == quant.FULL_PRECISION:
      kernel = self.tensor(f'params/backbone/{path}/kernel')
      return g.const(f'params/backbone/{path}/kernel',
                     np.transpose(kernel, (3, 2, 0, 1)).astype(np.float32))
    prefix = f'{int_inference.INT_WEIGHTS}/backbone/{path}'
    codes = np.transpose(self.tensor(f'{prefix}/codes'), (3, 2, 0, 1))
    lo = self.tensor(f'{prefix}/lo').astype(np.float32)
    hi = self.tensor(f'{prefix}/hi').astype(np.float32)
    scale = np.asarray(quant.range_scale(lo, hi, module.bits_w), np.float32)
    dtype = code_dtype(module.bits_w)
    attrs = {}
    if lo.ndim:  # One range per output channel: axis 0 of OIHW.
      attrs['axis'] = 0
      lo = lo.reshape(-1, 1, 1, 1)
    w = g.node('DequantizeLinear', [
        g.const(f'{prefix}/codes', codes.astype(dtype)),
        g.const(f'{prefix}/scale', scale),
        g.const(f'{prefix}/zero_point', np.zeros(scale.shape, dtype))],
               f'{path}/kernel_dq', **attrs)
    return g.node('Add', [w, g.const(f'{prefix}/lo', lo)], f'{path}/kernel')

  def conv(self, x, path):
    module = self.modules[path]
    if tuple(convolution.pair(module.kernel_dilation, 'kernel_dilation')) != (
        1, 1) or tuple(convolution.pair(module.input_dilation,
                                   'input_dilation')) != (1, 1):
      raise ValueError(f'{path}: dilated convolutions are not exported.')
    if module.bits_a != quant.FULL_PRECISION:
      x = self.act_quant(x, path, module.bits_a)
    size = tuple(module.kernel_size)
    strides = convolution.pair(module.strides, 'strides')
    pads = convolution.normalize_padding(module.padding, 2)
    if pads in ('SAME', 'SAME_LOWER'):
      # XLA's SAME puts the odd pixel of padding after the image, as ONNX's
      # SAME_UPPER does (SAME_LOWER before it, in both); both follow the
      # input's size at run time.
      padding = dict(auto_pad='SAME_UPPER' if pads == 'SAME' else
                     'SAME_LOWER')
    elif pads == 'VALID':
      padding = dict(pads=[0, 0, 0, 0])
    elif isinstance(pads, str):
      raise ValueError(f'{path}: padding {pads!r} is not exported.')
    else:
      (top, bottom), (left, right) = pads
      padding = dict(pads=[top, left, bottom, right])
    inputs = [x, self.kernel(path, module)]
    if module.use_bias:
      inputs.append(self.g.const(f'params/backbone/{path}/bias',
                                 self.tensor(f'params/backbone/{path}/bias')))
    return self.g.node('Conv', inputs, path, kernel_shape=list(size),
                       strides=list(strides), group=module.feature_group_count,
                       **padding)

  def bn(self, x, path):
    module = self.modules[path]
    g = self.g
    inputs = [x] + [
        g.const(f'{col}/backbone/{path}/{name}',
                self.tensor(f'{col}/backbone/{path}/{name}'))
        for col, name in (('params', 'scale'), ('params', 'bias'),
                          ('batch_stats', 'mean'), ('batch_stats', 'var'))]
    return g.node('BatchNormalization', inputs, path,
                  epsilon=float(module.epsilon))

  def relu(self, x, name):
    return self.g.node('Relu', [x], name)

  def relu6(self, x, name):
    return self.g.node('Clip', [x, self.g.const(f'{name}/min', np.float32(0)),
                                self.g.const(f'{name}/max', np.float32(6))],
                       name)


def _resnet(b, model, x):
  """torchvision's ResNet (and the demo's small one), as models/resnet.py."""
  x = b.relu(b.bn(b.conv(x, 'conv1'), 'bn1'), 'relu')
  if not model.small_stem:
    x = b.g.node('MaxPool', [x], 'maxpool', kernel_shape=[3, 3],
                 strides=[2, 2], pads=[1, 1, 1, 1])
  convs = (('conv1', 'bn1'), ('conv2', 'bn2'))
  if model.block_cls is Bottleneck:
    convs += (('conv3', 'bn3'),)
  for i, blocks in enumerate(model.stage_sizes):
    for j in range(blocks):
      block = f'layer{i + 1}_{j}'
      y = x
      for k, (conv, bn) in enumerate(convs):
        y = b.bn(b.conv(y, f'{block}/{conv}'), f'{block}/{bn}')
        if k < len(convs) - 1:
          y = b.relu(y, f'{block}/relu{k + 1}')
      shortcut = x
      if f'{block}/downsample_0' in b.modules:
        shortcut = b.bn(b.conv(x, f'{block}/downsample_0'),
                        f'{block}/downsample_1')
      x = b.relu(b.g.node('Add', [y, shortcut], f'{block}/add'),
                 f'{block}/relu')
  return x


def _mobilenet_v2(b, model, x):
  """torchvision's MobileNetV2, as models/mobilenet_v2.py."""
  del model  # Its layout is fixed.
  x = b.relu6(b.bn(b.conv(x, 'features_0_0'), 'features_0_1'), 'features_0')
  channels, index = 32, 1
  for t, c, n, s in INVERTED_RESIDUAL_SETTING:
    for i in range(n):
      block, y, k = f'features_{index}', x, 0
      if t != 1:
        y = b.relu6(b.bn(b.conv(y, f'{block}/conv_0_0'), f'{block}/conv_0_1'),
                    f'{block}/relu6_0')
        k = 1
      y = b.relu6(b.bn(b.conv(y, f'{block}/conv_{k}_0'),
                       f'{block}/conv_{k}_1'), f'{block}/relu6_{k}')
      y = b.bn(b.conv(y, f'{block}/conv_{k + 1}'), f'{block}/conv_{k + 2}')
      if (s if i == 0 else 1) == 1 and channels == c:
        y = b.g.node('Add', [x, y], f'{block}/add')
      x, channels, index = y, c, index + 1
  return b.relu6(b.bn(b.conv(x, f'features_{index}_0'),
                      f'features_{index}_1'), f'features_{index}')


def build_model(manifest, variables):
  """The ONNX model of an exported student.

  Args:
    manifest: the export manifest (``dtq_format.read``, or as ``export_run``
      builds it).
    variables: the exported variables with unpacked codes, as
      ``dtq_format.read`` returns them.

  Returns:
    An ``onnx.ModelProto`` that passes ``onnx.checker.check_model``.
  """
  onnx = require('onnx')
  helper = require('onnx.helper')
  m = manifest['model']
  student, _ = int_inference.build(manifest)
  image_shape = tuple(m['image_shape'])
  # The layers' attributes, from the same network with QuantConv: IntConv
  # only reads exported variables, so it cannot be traced without them.
  modules = layers.modules_called(student.clone(conv=layers.QuantConv),
                                  image_shape, (layers.QuantConv, nn.BatchNorm))
  graph = _Graph()
  flat = traverse_util.flatten_dict(variables, sep='/')
  b = _Builder(graph, flat, modules)
  x = graph.node('Transpose', [INPUT], 'to_nchw', perm=[0, 3, 1, 2])
  if isinstance(student, ResNet):
    x = _resnet(b, student, x)
  elif isinstance(student, MobileNetV2):
    x = _mobilenet_v2(b, student, x)
  else:
    raise ValueError(f'model {m["name"]!r} has no ONNX export.')
  pooled = graph.node('Flatten', [graph.node('GlobalAveragePool', [x],
                                             'avgpool')], 'pooled')
  head = variables['params']['head']['fc']
  logits = graph.node('Gemm', [
      pooled, graph.const('params/head/fc/kernel', head['kernel']),
      graph.const('params/head/fc/bias', head['bias'])], OUTPUT)
  del logits  # Named OUTPUT, the graph's output.
  h, w, c = image_shape
  num_classes = m['num_classes']
  onnx_graph = helper.make_graph(
      graph.nodes, f'dtq_{m["name"]}_w{m["bits_w"]}a{m["bits_a"]}',
      [helper.make_tensor_value_info(INPUT, onnx.TensorProto.FLOAT,
                                     ['N', h, w, c])],
      [helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT,
                                     ['N', num_classes])],
      graph.initializers)
  model = helper.make_model(
      onnx_graph, opset_imports=[helper.make_opsetid('', OPSET)],
      producer_name='dtq-jax', doc_string=(
          f'{m["name"]} student, {m["bits_w"]}-bit weights, {m["bits_a"]}-bit '
          'activations (static ranges), from dtq_jax.deploy.export.'))
  # onnxruntime releases name the IR versions they read; opset 21's own
  # (10) is the one every release with opset 21 takes.
  model.ir_version = 10
  helper.set_model_props(model, metadata(manifest))
  onnx.checker.check_model(model, full_check=True)
  return model


def metadata(manifest):
  """``metadata_props`` of the ONNX model (string values, JSON inside)."""
  m = manifest['model']
  h, w, c = m['image_shape']
  return {
      'input': json.dumps(dict(name=INPUT, dtype='float32', layout='NHWC',
                               shape=['N', h, w, c])),
      'output': json.dumps(dict(name=OUTPUT, dtype='float32',
                                shape=['N', m['num_classes']],
                                meaning='target-class logits')),
      'class_names': json.dumps(manifest.get('class_names')),
      'preprocess': json.dumps(manifest['preprocess']),
      MANIFEST_KEY: json.dumps(manifest, sort_keys=True),
  }


def read_manifest(model):
  """The export manifest stored in an ONNX model's metadata."""
  props = {p.key: p.value for p in model.metadata_props}
  if MANIFEST_KEY not in props:
    raise ValueError('the ONNX model has no dtq_manifest metadata; not a '
                     'dtq_jax export.')
  return json.loads(props[MANIFEST_KEY])


def ranges(model):
  """The static activation ranges held by an ONNX export.

  Args:
    model: an ``onnx.ModelProto`` from ``build_model``.

  Returns:
    The ``'quant_ranges'`` tree of the backbone (``{conv path: {'lo',
    'hi'}}`` nested), as the static-range student reads it.
  """
  prefix = f'{layers.RANGES}/backbone/'
  flat = {}
  for init in model.graph.initializer:
    name = init.name
    if name.startswith(prefix) and name.rsplit('/', 1)[-1] in ('lo', 'hi'):
      flat[name[len(prefix):]] = require('onnx.numpy_helper').to_array(init)
  return traverse_util.unflatten_dict(flat, sep='/')
