"""Quantized convolution, a drop-in for ``flax.linen.Conv``.

Models take the convolution class as a ``conv`` attribute, so the same network
definition builds the full-precision teacher (``bits_w = bits_a = 32``) and the
quantized student.
"""

from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from dtq_jax import quant

PaddingLike = Union[str, int, Sequence[Tuple[int, int]]]


def _normalize_padding(padding, ndim):
  if isinstance(padding, str):
    return padding
  if isinstance(padding, int):
    return ((padding, padding),) * ndim
  return tuple(tuple(p) for p in padding)


class QuantConv(nn.Module):
  """2-D convolution whose kernel and input are fake-quantized.

  Parameters are named like ``flax.linen.Conv`` (``kernel`` in HWIO layout,
  optional ``bias``), so checkpoints and weight conversion do not depend on the
  bit widths.

  Attributes:
    features: number of output channels.
    kernel_size: (height, width) of the kernel.
    strides: (height, width) strides.
    padding: 'SAME', 'VALID', an int (symmetric, as in PyTorch) or a sequence
      of (low, high) pairs.
    feature_group_count: groups; equal to the input channels for depthwise.
    use_bias: whether to add a bias.
    bits_w: bit width of the kernel (32 = full precision).
    bits_a: bit width of the input activations (32 = full precision).
    weight_range_axis: ``None`` (paper: one range per kernel) or ``-1`` for one
      range per output channel (opt-in).
    range_grad: whether gradient reaches the range ends (paper: True).
    pointwise_as_dot: compute 1x1 stride-1 convolutions as a matrix product
      instead of ``lax.conv_general_dilated``. Same maths; on XLA:CPU it is
      several times faster (see benchmarks/). Off by default.
    dtype: computation dtype (``None``: that of the inputs and parameters).
      Ranges are still computed in float32.
    param_dtype: parameter dtype.
    kernel_init: kernel initializer.
    bias_init: bias initializer.
  """
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: PaddingLike = 'SAME'
  feature_group_count: int = 1
  use_bias: bool = True
  bits_w: int = quant.FULL_PRECISION
  bits_a: int = quant.FULL_PRECISION
  weight_range_axis: Optional[int] = None
  range_grad: bool = True
  pointwise_as_dot: bool = False
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

    x = quant.fake_quant(x, self.bits_a, range_grad=self.range_grad)
    kernel = quant.fake_quant(kernel, self.bits_w, axis=self.weight_range_axis,
                              range_grad=self.range_grad)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    strides = tuple(self.strides)
    padding = _normalize_padding(self.padding, len(kernel_size))
    is_pointwise = (kernel_size == (1, 1) and strides == (1, 1) and
                    self.feature_group_count == 1 and
                    padding in ('SAME', 'VALID', ((0, 0), (0, 0))))
    if self.pointwise_as_dot and is_pointwise:
      y = jnp.einsum('nhwc,cd->nhwd', x, kernel[0, 0])
    else:
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=strides, padding=padding,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          feature_group_count=self.feature_group_count)
    if bias is not None:
      y = y + bias
    return y
