"""Quantized convolution, a drop-in for ``flax.linen.Conv``.

Models take the convolution class as a ``conv`` attribute, so the same network
definition builds the full-precision teacher (``bits_w = bits_a = 32``) and the
quantized student.

The quantizer is the paper's min-max one (``method='minmax'``) or, opt-in,
LSQ with learned steps (``method='lsq'``, docs/method.md, "Learned
quantizers"): the convolution then owns its quantizer parameters as Flax
params beside its kernel (``lsq_step_w``, ``lsq_step_a`` and, for an input
that can be negative, LSQ+'s ``lsq_offset_a``).

Activation ranges (docs/method.md: dynamic, the paper's) can also be *static*,
opt-in: every quantized convolution keeps running statistics of its input's
min and max in the ``'quant_ranges'`` variable collection (``lo``, ``hi``,
``count``), updated whenever that collection is mutable (a training step or
a calibration pass, see static_ranges.py), and ``act_ranges='static'`` makes it
quantize with the stored range instead of the batch's.
"""

import dataclasses
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from dtq_jax import convolution
from dtq_jax import learned_quant
from dtq_jax import quant

# The variable collection of the static activation ranges.
RANGES = 'quant_ranges'
ACT_RANGES = ('dynamic', 'static')
RANGE_STATS = ('ema', 'mean', 'minmax')
# The quantizers: the paper's min-max one, LSQ (learned steps; LSQ+ with a
# learned offset for inputs that can be negative), or PACT (LSQ's weights and
# LSQ+ inputs, a learned clipping level for inputs that are never negative).
QUANT_METHODS = ('minmax', 'lsq', 'pact')
# LSQ's parameters, in the ``'params'`` collection of each quantized
# convolution: the kernel's step (a scalar, or (1, 1, 1, C_out) per output
# channel), the input's step and, where the input can be negative, its
# offset (scalars).
STEP_W = 'lsq_step_w'
STEP_A = 'lsq_step_a'
OFFSET_A = 'lsq_offset_a'
# PACT's clipping level of a non-negative input (a scalar), with 'pact'.
ALPHA_A = 'pact_alpha_a'
LEARNED_PARAMS = (STEP_W, STEP_A, OFFSET_A, ALPHA_A)
# Collections that, when mutable, switch an LSQ convolution into one of the
# two passes that start its parameters (method/learned_params.py): the probe
# computes at full precision and records the input's minimum (which decides
# LSQ+ or unsigned LSQ) and zero placeholders of the parameters' shapes; the
# initialisation pass computes the parameters' first values from the kernel
# and the input, quantizes with them and records them.
LSQ_PROBE = 'lsq_probe'
LSQ_INIT = 'lsq_init'

PaddingLike = Union[str, int, Sequence[Tuple[int, int]]]


@dataclasses.dataclass(frozen=True)
class QuantSettings:
  """How the quantized convolutions of one network quantize and compute.

  The ``QuantConv`` attributes that are the same for every convolution of a
  network (the bit widths are the model's own attributes). Built once from
  ``config.quant`` (``from_config``) and handed to a model as its
  ``conv_kwargs`` (``as_conv_kwargs``). Attributes as in ``QuantConv``.
  """
  weight_range_axis: Optional[int] = None
  range_grad: bool = True
  pointwise_as_dot: bool = False
  depthwise_as_shifts: Optional[bool] = False
  fused_vjp: bool = False
  act_ranges: str = 'dynamic'
  range_stat: str = 'ema'
  range_momentum: float = 0.9
  method: str = 'minmax'

  @classmethod
  def from_config(cls, quant_config):
    """The student's settings in training, from ``config.quant``.

    Training always quantizes activations with each batch's range (the
    paper's); with ``act_ranges='static'`` it also keeps the running ranges
    (``range_stat``, ``range_momentum``) that evaluation then uses
    (``with_act_ranges``).

    Args:
      quant_config: the run config's ``quant`` section.

    Returns:
      A ``QuantSettings``.
    """
    q = quant_config
    return cls(weight_range_axis=-1 if q.per_channel_weights else None,
               range_grad=q.range_grad,
               pointwise_as_dot=q.pointwise_as_dot,
               depthwise_as_shifts=q.depthwise_as_shifts,
               fused_vjp=q.fused_vjp,
               range_stat=q.get('range_stat', cls.range_stat),
               range_momentum=q.get('range_momentum', cls.range_momentum),
               method=q.get('method', cls.method))

  def kernels_only(self):
    """The same kernel choices, quantizer settings at their defaults.

    The full-precision teacher computes with the same kernels as the
    student; nothing else applies to it.
    """
    return QuantSettings(pointwise_as_dot=self.pointwise_as_dot,
                         depthwise_as_shifts=self.depthwise_as_shifts)

  def replace(self, **changes):
    """A copy with ``changes``."""
    return dataclasses.replace(self, **changes)

  def as_conv_kwargs(self):
    """The settings as ``QuantConv`` keyword arguments (a model's
    ``conv_kwargs``)."""
    return dataclasses.asdict(self)


class QuantConv(nn.Module):
  """2-D convolution whose kernel and input are fake-quantized.

  A drop-in for ``flax.linen.Conv`` on batched NHWC images: the first
  attributes have ``nn.Conv``'s names, order and meaning, and parameters are
  named like its (``kernel`` in HWIO layout, optional ``bias``), so
  checkpoints and weight conversion do not depend on the bit widths.
  ``nn.Conv``'s 1-D/3-D, unbatched, 'CIRCULAR'/'CAUSAL' and ``mask`` cases
  are not supported.

  Attributes:
    features: number of output channels.
    kernel_size: (height, width) of the kernel.
    strides: (height, width) strides, or one int for both.
    padding: 'SAME', 'VALID', an int (symmetric, as in PyTorch) or a sequence
      of (low, high) pairs.
    input_dilation: (height, width) dilation of the input, or one int
      (``lax.conv_general_dilated``'s ``lhs_dilation``).
    kernel_dilation: (height, width) dilation of the kernel (atrous
      convolution), or one int.
    feature_group_count: groups; equal to the input channels for depthwise.
    use_bias: whether to add a bias.
    bits_w: bit width of the kernel (32 = full precision).
    bits_a: bit width of the input activations (32 = full precision).
    weight_range_axis: ``None`` (paper: one range per kernel) or ``-1`` for one
      range per output channel (opt-in).
    range_grad: whether gradient reaches the range ends (paper: True).
    pointwise_as_dot: compute 1x1 convolutions without padding as a matrix
      product (strided ones: of the subsampled input) instead of
      ``lax.conv_general_dilated``. Same maths; on XLA:CPU several times
      faster (see benchmarks/). Off by default.
    depthwise_as_shifts: compute depthwise convolutions (one filter per
      input channel, as in MobileNetV2) as ``kh * kw`` shifted elementwise
      multiply-adds (True), with lax's grouped convolution (False), or as
      suits the platform the program is lowered for (None: the shifts on a
      CPU, lax's convolution on GPUs and TPUs; ``convolution.convolve``).
      Same maths; on XLA:CPU several times faster than its grouped
      convolution (docs/speed.md). False here; the run configs' default is
      None.
    fused_vjp: fake-quantize with ``quant.fake_quant_fused``'s hand-derived
      backward pass (same values and gradient). Off by default.
    act_ranges: 'dynamic' (paper: the input's range is its min and max over
      the whole batch) or 'static' (opt-in: the range stored in the
      ``'quant_ranges'`` collection, ``lo``/``hi``; inputs outside it are
      clipped; no gradient reaches the range).
    range_stat: how the stored range follows the batch ranges while the
      ``'quant_ranges'`` collection is mutable (in 'dynamic' mode): 'ema'
      (``lo <- m * lo + (1 - m) * batch_lo``, for training, where the weights
      move), 'mean' (average over the batches seen; for calibration) or
      'minmax' (the extreme over all batches seen). The first batch sets the
      range in all three; ``count`` counts the batches.
    range_momentum: ``m`` of 'ema'.
    method: the quantizer. 'minmax' (paper: ranges from each tensor's
      extremes, the attributes above) or 'lsq' (opt-in): the kernel with
      LSQ's learned step (per tensor, or per output channel with
      ``weight_range_axis=-1``; signed codes), the input with unsigned LSQ,
      or with LSQ+ (learned step and offset) when the params hold an
      ``lsq_offset_a`` (an input that can be negative; the choice is made
      from data by ``method/learned_params.py`` and is the params' structure,
      static under jit). 'lsq' ignores ``range_grad``, ``fused_vjp`` and the
      ``'quant_ranges'`` collection and refuses ``act_ranges='static'``.
      ``model.init`` gives placeholder steps (unsigned LSQ, from the
      initialising call's data); ``learned_params.init_learned_quant`` sets
      the real start.
    dtype: computation dtype (``None``: that of the inputs and parameters).
      Ranges are still computed in float32.
    param_dtype: parameter dtype.
    kernel_init: kernel initializer.
    bias_init: bias initializer.
  """
  features: int
  kernel_size: Sequence[int]
  strides: Union[int, Sequence[int]] = (1, 1)
  padding: PaddingLike = 'SAME'
  input_dilation: Union[int, Sequence[int]] = 1
  kernel_dilation: Union[int, Sequence[int]] = 1
  feature_group_count: int = 1
  use_bias: bool = True
  bits_w: int = quant.FULL_PRECISION
  bits_a: int = quant.FULL_PRECISION
  weight_range_axis: Optional[int] = None
  range_grad: bool = True
  pointwise_as_dot: bool = False
  depthwise_as_shifts: Optional[bool] = False
  fused_vjp: bool = False
  act_ranges: str = 'dynamic'
  range_stat: str = 'ema'
  range_momentum: float = 0.9
  method: str = 'minmax'
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    """Applies the convolution.

    Args:
      x: NHWC input.

    Returns:
      NHWC output.
    """
    kernel_size = tuple(self.kernel_size)
    in_features = x.shape[-1]
    if in_features % self.feature_group_count:
      raise ValueError(
          f'{self.name}: {in_features} input channels are not divisible by '
          f'feature_group_count={self.feature_group_count}.')
    kernel = self.param(
        'kernel', self.kernel_init,
        kernel_size + (in_features // self.feature_group_count, self.features),
        self.param_dtype)
    bias = (self.param('bias', self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)

    if self.method not in QUANT_METHODS:
      raise ValueError(f'{self.name}: method={self.method!r}; allowed: '
                       f'{", ".join(QUANT_METHODS)}.')
    if self.method != 'minmax':
      x, kernel = self._learned_quantize(x, kernel)
    else:
      x = self._quantize_input(x)
      kernel = quant.fake_quant(kernel, self.bits_w,
                                axis=self.weight_range_axis,
                                range_grad=self.range_grad,
                                fused_vjp=self.fused_vjp)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    y = self._convolve(x, kernel)
    if bias is not None:
      y = y + bias
    return y

  def _convolve(self, x, kernel):
    """The convolution proper, by ``lax`` or by one of the rewrites."""
    return convolution.convolve(
        x, kernel, strides=self.strides, padding=self.padding,
        input_dilation=self.input_dilation,
        kernel_dilation=self.kernel_dilation,
        feature_group_count=self.feature_group_count,
        pointwise_as_dot=self.pointwise_as_dot,
        depthwise_as_shifts=self.depthwise_as_shifts)

  def _learned_quantize(self, x, kernel):
    """LSQ on the kernel; LSQ+, unsigned LSQ or PACT on the input.

    Args:
      x: the NHWC input.
      kernel: the HWIO kernel.

    Returns:
      ``(x, kernel)`` fake-quantized; unchanged in the probe pass (the
      ``LSQ_PROBE`` collection mutable), which records what the parameters'
      start needs instead.
    """
    if self.act_ranges != 'dynamic':
      raise ValueError(f'{self.name}: act_ranges={self.act_ranges!r} is for '
                       f'the min-max quantizer; method={self.method!r} learns '
                       'its ranges.')
    quantize_w = self.bits_w != quant.FULL_PRECISION
    quantize_a = self.bits_a != quant.FULL_PRECISION
    per_channel = self.weight_range_axis is not None
    if self._in_pass(LSQ_PROBE):
      # Full precision: the probe only asks whether each input can be
      # negative, which the ReLU in front of a convolution (or its absence)
      # decides, not the quantizers upstream.
      if quantize_w:
        shape = (1, 1, 1, self.features) if per_channel else ()
        self.put_variable(LSQ_PROBE, STEP_W, jnp.zeros(shape, jnp.float32))
      if quantize_a:
        # Both candidates: learned_params keeps LSQ+'s step (and adds its
        # offset) for an input that is negative somewhere, else PACT's level
        # with 'pact', LSQ's step with 'lsq'.
        self.put_variable(LSQ_PROBE, STEP_A, jnp.zeros((), jnp.float32))
        if self.method == 'pact':
          self.put_variable(LSQ_PROBE, ALPHA_A, jnp.zeros((), jnp.float32))
        self.put_variable(LSQ_PROBE, 'input_min',
                          jnp.min(jax.lax.stop_gradient(x).astype(
                              jnp.float32)))
      return x, kernel
    if quantize_w:
      axis = self.weight_range_axis

      def init_step_w():
        step = learned_quant.lsq_init_step(
            jax.lax.stop_gradient(kernel), self.bits_w, signed=True,
            axis=axis)
        return step if per_channel else step.reshape(())

      step_w = self._learned_param(STEP_W, init_step_w)
      kernel = learned_quant.lsq_fake_quant(kernel, step_w, self.bits_w,
                                            signed=True)
    if quantize_a:
      x = self._learned_input_quantize(x)
    return x, kernel

  def _learned_input_quantize(self, x):
    """The input with LSQ+ (an offset in the params), else PACT ('pact') or
    unsigned LSQ ('lsq')."""
    bits = self.bits_a
    xs = jax.lax.stop_gradient(x)
    if self.has_variable('params', OFFSET_A):
      if self._in_pass(LSQ_INIT):
        step, offset = learned_quant.lsq_plus_init(xs, bits)
        self.put_variable(LSQ_INIT, STEP_A, step)
        self.put_variable(LSQ_INIT, OFFSET_A, offset)
      else:
        step = self.param(STEP_A, nn.initializers.zeros, (), jnp.float32)
        offset = self.param(OFFSET_A, nn.initializers.zeros, (), jnp.float32)
      return learned_quant.lsq_plus_fake_quant(x, step, offset, bits)
    if self.method == 'pact':
      # Starts at the batch's maximum: nothing clipped, the grid of the
      # paper's quantizer on [0, max] (learned_quant.pact_init_alpha).
      alpha = self._learned_param(
          ALPHA_A, lambda: learned_quant.pact_init_alpha(xs).reshape(()))
      return learned_quant.pact_fake_quant(x, alpha, bits)
    step = self._learned_param(STEP_A, lambda: learned_quant.lsq_init_step(
        xs, bits, signed=False).reshape(()))
    return learned_quant.lsq_fake_quant(x, step, bits, signed=False)

  @nn.nowrap
  def _in_pass(self, collection):
    """Whether this call is the probe or start pass ``collection`` names."""
    # model.init makes every collection mutable; it is neither pass.
    return (self.is_mutable_collection(collection) and
            not self.is_initializing())

  @nn.nowrap
  def _learned_param(self, name, init):
    """A learned quantizer parameter; its start in the initialisation pass.

    Args:
      name: the parameter's name.
      init: ``() -> value``: the start from this call's kernel or input
        (LSQ's rule).

    Returns:
      In the initialisation pass (``LSQ_INIT`` mutable) the start, also
      recorded there; otherwise the parameter, which ``model.init`` creates
      with the start on its own call's data (a placeholder).
    """
    if self._in_pass(LSQ_INIT):
      value = init()
      self.put_variable(LSQ_INIT, name, value)
      return value
    return self.param(name, lambda _: init())

  def _quantize_input(self, x):
    """Fake-quantizes the input with a dynamic or stored range."""
    if self.act_ranges not in ACT_RANGES:
      raise ValueError(f'{self.name}: act_ranges={self.act_ranges!r}; allowed: '
                       f'{", ".join(ACT_RANGES)}.')
    if self.bits_a == quant.FULL_PRECISION:
      return x
    if self.act_ranges == 'static':
      lo, hi = self._range_variables()[:2]
      return quant.fake_quant_range(x, self.bits_a, lo.value, hi.value)
    if self.is_mutable_collection(RANGES) and not self.is_initializing():
      self._update_range(x)
    return quant.fake_quant(x, self.bits_a, range_grad=self.range_grad,
                            fused_vjp=self.fused_vjp)

  # Not a Flax-wrapped method: it returns Variable objects, which Flax's
  # module summaries (``module_paths``, ``tabulate``) would record as
  # outputs. It runs inside ``__call__``'s scope all the same.
  @nn.nowrap
  def _range_variables(self, with_count=False):
    zero = lambda: jnp.zeros((), jnp.float32)
    variables = (self.variable(RANGES, 'lo', zero),
                 self.variable(RANGES, 'hi', zero))
    if with_count:
      variables += (self.variable(RANGES, 'count',
                                  lambda: jnp.zeros((), jnp.int32)),)
    return variables

  def _update_range(self, x):
    """Folds this batch's min and max into the stored running range."""
    if self.range_stat not in RANGE_STATS:
      raise ValueError(f'{self.name}: range_stat={self.range_stat!r}; allowed: '
                       f'{", ".join(RANGE_STATS)}.')
    lo, hi, count = self._range_variables(with_count=True)
    xf = jax.lax.stop_gradient(x).astype(jnp.float32)
    batch = {'lo': jnp.min(xf), 'hi': jnp.max(xf)}
    first = count.value == 0
    for name, var in (('lo', lo), ('hi', hi)):
      old, new = var.value, batch[name]
      if self.range_stat == 'ema':
        m = self.range_momentum
        folded = m * old + (1.0 - m) * new
      elif self.range_stat == 'mean':
        folded = old + (new - old) / (count.value + 1).astype(jnp.float32)
      else:
        folded = jnp.minimum(old, new) if name == 'lo' else jnp.maximum(
            old, new)
      var.value = jnp.where(first, new, folded)
    count.value = count.value + 1


def modules_called(model, image_shape, types, **kwargs):
  """``{path: module}`` of the modules of ``types`` a model calls on an image.

  Flax's ``Module.module_paths`` traces the model once on one zero image
  (``jax.eval_shape``: no FLOPs, no memory), so compact submodules are found
  without calling them on data. Paths are ``'/'``-joined module names, as in
  the variable trees (``'layer1_0/conv1'``).

  Args:
    model: an unbound Flax module taking ``(images, train=...)``.
    image_shape: ``(H, W, C)`` of one image.
    types: a module class or tuple of classes to keep.
    **kwargs: passed to the model's ``__call__`` (default ``train=False``).

  Returns:
    The unbound copies of the matching modules, in call order.
  """
  images = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  kwargs.setdefault('train', False)
  paths = model.module_paths(jax.random.key(0), images, **kwargs)
  return {path: module for path, module in paths.items()
          if isinstance(module, types)}
