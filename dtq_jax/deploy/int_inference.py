"""Integer inference of an exported student (see export.py for the format).

Every quantized convolution runs on unsigned integer codes: the input
``x`` becomes ``a = quantize(x, bits_a, lo_a, hi_a)`` with the layer's static
range, the kernel is stored as codes ``w`` with its own range (per tensor or
per output channel), and with ``s_a = (hi_a - lo_a) / (2**bits_a - 1)``,
``s_w`` likewise, the fake-quantized convolution of training is

  sum_k (s_a a_k + lo_a)(s_w w_k + lo_w)
    = s_a s_w A + s_a lo_w B + lo_a s_w C + lo_a lo_w D,

  A = sum_k a_k w_k      (the integer convolution, uint8 x uint8 -> int32)
  B = sum_k a_k          (window sums of the input codes)
  C = sum_k w_k          (over the taps that fall inside the image)
  D = sum_k 1            (number of taps inside the image)

where k runs over the kernel taps (and the input channels of the group) that
fall inside the image: zero padding pads the *dequantized* input with 0 in
training, which is no code in general, so B, C and D count only the valid
taps (C and D are convolutions of an all-ones image, which is what makes the
border exact). A, B, C, D are exact int32 sums (``preferred_element_type``);
the four products are formed in float32, then BatchNorm, ReLU, residual
additions, pooling, the full-precision stem and the classifiers run in
float32 on the dequantized outputs, as in training.

``build(manifest, integer=False)`` gives the same network computing in
float32 on the dequantized codes instead (``dequantize``, then the static
fake quantizer of the input, then a float convolution): the static-range
fake-quant network of training, with the kernels read from their codes. It
is what the portable exports trace (stablehlo_export.py, and the ONNX graph
of a user's network, jaxpr_onnx.py): float convolutions run on every
accelerator, int32 ones do not.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dtq_jax import convolution
from dtq_jax import layers
from dtq_jax.models import create_model
from dtq_jax.models import own_network
from dtq_jax.models.head import TargetHead
from dtq_jax import quant

INT_WEIGHTS = 'int_weights'
RANGES = layers.RANGES
# Widest codes the int32 integer convolution takes (uint8 operands).
MAX_INT_BITS = 8
_DIMS = ('NHWC', 'HWIO', 'NHWC')


def _conv(lhs, rhs, strides, padding, groups, preferred=None):
  return jax.lax.conv_general_dilated(
      lhs, rhs, window_strides=strides, padding=padding,
      dimension_numbers=_DIMS, feature_group_count=groups,
      preferred_element_type=preferred)


def int_conv_terms(codes_a, codes_w, strides, padding, groups=1):
  """The four exact int32 sums A, B, C, D of the module docstring.

  Args:
    codes_a: (N, H, W, Cin) unsigned input codes (uint8).
    codes_w: (kh, kw, Cin / groups, Cout) unsigned kernel codes (uint8).
    strides: (sh, sw).
    padding: 'SAME', 'VALID' or ((top, bottom), (left, right)).
    groups: feature groups (Cin for depthwise).

  Returns:
    ``(A, B, C, D)``: A (N, Ho, Wo, Cout), B (N, Ho, Wo, Cout), C (1, Ho, Wo,
    Cout), D (1, Ho, Wo, 1), all int32.
  """
  kh, kw, cin_g, cout = codes_w.shape
  n, h, w, cin = codes_a.shape
  codes_a = codes_a.astype(jnp.uint8)
  codes_w = codes_w.astype(jnp.uint8)
  a = _conv(codes_a, codes_w, strides, padding, groups, jnp.int32)
  # B: window sums of the input codes over each group's channels.
  group_sums = codes_a.astype(jnp.int32).reshape(n, h, w, groups, cin_g).sum(-1)
  b = _conv(group_sums, jnp.ones((kh, kw, 1, groups), jnp.int32), strides,
            padding, groups)
  b = jnp.repeat(b, cout // groups, axis=-1)
  valid = jnp.ones((1, h, w, cin), jnp.uint8)
  c = _conv(valid, codes_w, strides, padding, groups, jnp.int32)
  d = _conv(jnp.ones((1, h, w, 1), jnp.int32), jnp.ones((kh, kw, 1, 1),
                                                        jnp.int32),
            strides, padding, 1) * cin_g
  return a, b, c, d


def check_int32(kernel_shape, bits_a, bits_w):
  """Raises ValueError if A could overflow int32 for this layer."""
  kh, kw, cin_g, _ = kernel_shape
  worst = kh * kw * cin_g * (2**bits_a - 1) * (2**bits_w - 1)
  if worst >= 2**31:
    raise ValueError(f'a {kernel_shape} kernel at {bits_w}/{bits_a} bits can '
                     'overflow int32 accumulation.')


def int_conv(x, codes_w, lo_w, hi_w, bits_w, lo_a, hi_a, bits_a, strides,
             padding, groups=1):
  """Quantized convolution computed on integer codes, dequantized output.

  Args:
    x: (N, H, W, Cin) float input (quantized here with the static range).
    codes_w: kernel codes, HWIO.
    lo_w: kernel range lower end, scalar or (Cout,).
    hi_w: kernel range upper end, scalar or (Cout,).
    bits_w: kernel bits (2..8).
    lo_a: input range lower end (scalar).
    hi_a: input range upper end (scalar).
    bits_a: input bits (2..8).
    strides: (sh, sw).
    padding: as in ``int_conv_terms``.
    groups: feature groups.

  Returns:
    float32 (N, Ho, Wo, Cout): the convolution of the fake-quantized input
    and kernel, up to float32 rounding.
  """
  codes_a = quant.quantize(x, bits_a, lo_a, hi_a)
  a, b, c, d = int_conv_terms(codes_a, codes_w, strides, padding, groups)
  s_a = quant.range_scale(lo_a, hi_a, bits_a)
  s_w = quant.range_scale(lo_w, hi_w, bits_w)
  lo_a = jnp.asarray(lo_a, jnp.float32)
  lo_w = jnp.asarray(lo_w, jnp.float32)
  f = lambda t: t.astype(jnp.float32)
  return (s_a * s_w * f(a) + s_a * lo_w * f(b) + lo_a * s_w * f(c) +
          lo_a * lo_w * f(d))


class IntConv(layers.QuantConv):
  """Inference-only drop-in for ``QuantConv`` reading exported variables.

  A full-precision convolution (the stem) reads ``params/kernel``. A
  quantized one reads ``int_weights/{codes, lo, hi}`` and
  ``quant_ranges/{lo, hi}`` and runs ``int_conv``; with codes wider than 8
  bits, a full-precision input or ``integer=False`` it dequantizes the kernel
  and convolves in float32 instead.

  Attributes:
    integer: run the integer convolution where the bit widths allow it.
  """
  integer: bool = True

  @nn.compact
  def __call__(self, x):
    kernel_size = tuple(self.kernel_size)
    strides = convolution.pair(self.strides, 'strides')
    if (convolution.pair(self.input_dilation, 'input_dilation') != (1, 1) or
        convolution.pair(self.kernel_dilation, 'kernel_dilation') != (1, 1)):
      raise ValueError(f'{self.name}: integer inference covers undilated '
                       'convolutions only.')
    groups = self.feature_group_count
    padding = convolution.normalize_padding(self.padding, len(kernel_size))
    shape = kernel_size + (x.shape[-1] // groups, self.features)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    x = x.astype(jnp.float32)
    if self.bits_a != quant.FULL_PRECISION:
      lo_a = self._get(RANGES, 'lo')
      hi_a = self._get(RANGES, 'hi')
    if self.bits_w == quant.FULL_PRECISION:
      kernel = self.param('kernel', self.kernel_init, shape, self.param_dtype)
    else:
      codes = self._get(INT_WEIGHTS, 'codes')
      lo_w = self._get(INT_WEIGHTS, 'lo')
      hi_w = self._get(INT_WEIGHTS, 'hi')
      if tuple(codes.shape) != shape:
        raise ValueError(f'{self.name}: stored codes {codes.shape}, the '
                         f'layer needs {shape}.')
    integer = (self.integer and self.bits_w != quant.FULL_PRECISION and
               self.bits_a != quant.FULL_PRECISION and
               max(self.bits_w, self.bits_a) <= MAX_INT_BITS)
    if integer:
      check_int32(shape, self.bits_a, self.bits_w)
      y = int_conv(x, codes, lo_w, hi_w, self.bits_w, lo_a, hi_a, self.bits_a,
                   strides, padding, groups)
    else:
      if self.bits_w != quant.FULL_PRECISION:
        kernel = quant.dequantize(codes, self.bits_w, lo_w, hi_w)
      if self.bits_a != quant.FULL_PRECISION:
        x = quant.fake_quant_range(x, self.bits_a, lo_a, hi_a)
      y = _conv(x, kernel.astype(jnp.float32), strides, padding, groups)
    if bias is not None:
      y = y + bias
    return y

  def _get(self, collection, name):
    value = self.get_variable(collection, name)
    if value is None:
      raise ValueError(f'{"/".join(self.path)}: no {collection}/{name} in the '
                       'exported variables.')
    return value


def build(manifest, integer=True):
  """The integer student and the target head of an exported model.

  Args:
    manifest: the export manifest (``dtq_format.read``).
    integer: integer convolutions (False: float32 on the dequantized codes,
      see the module docstring).

  Returns:
    ``(student, head)``; ``student.apply(variables, images)`` with the
    exported ``params``, ``batch_stats``, ``int_weights`` and
    ``quant_ranges`` (``with_source_stub`` adds the source classifier).
  """
  m = manifest['model']
  settings = layers.QuantSettings(weight_range_axis=m['weight_range_axis'],
                                  act_ranges='static')
  conv = IntConv if integer else functools.partial(IntConv, integer=False)
  # The source classifier is not exported: a 1-output zero layer stands in
  # for it (its logits are unused).
  if own_network.is_import_path(m['name']):
    own = m.get('own_network') or {}
    student = own_network.create(
        m['name'], 1, tuple(m['image_shape']), bits_w=m['bits_w'],
        bits_a=m['bits_a'], conv_kwargs=settings.as_conv_kwargs(),
        model_kwargs=m['kwargs'], conv=conv,
        keep_float=tuple(own.get('keep_float', ())),
        quantize_dense=own.get('quantize_dense', False),
        taps=tuple(own.get('taps', ())),
        source_classifier=own.get('source_classifier', ''))
  else:
    student = create_model(m['name'], num_classes=1, bits_w=m['bits_w'],
                           bits_a=m['bits_a'], conv=conv,
                           conv_kwargs=settings.as_conv_kwargs(),
                           **m['kwargs'])
  return student, TargetHead(m['num_classes'])


def with_source_stub(variables, classifier_name, feature_dim):
  """Adds the zero 1-output source classifier that ``build`` expects.

  Args:
    variables: the exported backbone variables.
    classifier_name: the classifier's path in the params ('fc', 'a/b').
    feature_dim: its input width.

  Returns:
    The variables with ``params[classifier_name]`` set.
  """
  params = dict(variables['params'])
  node = params
  *parents, name = classifier_name.split(own_network.SEP)
  for key in parents:
    node[key] = dict(node.get(key, {}))
    node = node[key]
  node[name] = {'kernel': jnp.zeros((feature_dim, 1)),
                'bias': jnp.zeros((1,))}
  return dict(variables, params=params)


def predictor(manifest, integer=True):
  """``predict(variables, images) -> target logits`` of an export.

  Args:
    manifest: the export manifest.
    integer: integer convolutions (False: float32 on the dequantized codes).

  Returns:
    The (unjitted) function of the exported variables as
    ``dtq_format.read`` returns them (``{collection: {'backbone': ...,
    'head': ...}}``) and float32 NHWC images; the source classifier's stub
    is added inside it.
  """
  m = manifest['model']
  student, head = build(manifest, integer)

  def predict(variables, images):
    backbone = {col: tree['backbone'] for col, tree in variables.items()
                if 'backbone' in tree}
    backbone = with_source_stub(backbone, m['classifier_name'],
                                m['feature_dim'])
    _, feats = student.apply(backbone, images, train=False)
    return head.apply({'params': variables['params']['head']},
                      feats['pooled'])

  return predict
