"""The 2-D convolution a ``QuantConv`` computes: lax's, or the same maths
rewritten for XLA:CPU.

``convolve`` is ``lax.conv_general_dilated`` in NHWC/HWIO unless a rewrite
applies (``pointwise_as_dot``: a 1x1 convolution as a matrix product;
``depthwise_as_shifts``: a depthwise one as a sum of shifted copies, or, with
``None``, that on a CPU and lax's elsewhere), each the same sum in another
kernel. ``pair`` and
``normalize_padding`` read Flax's convolution attributes for it and for the
exporters.
"""

import jax
import jax.numpy as jnp


def normalize_padding(padding, ndim):
  """'SAME'/'VALID' unchanged; an int or pairs as ((lo, hi), ...) per dim."""
  if isinstance(padding, str):
    return padding
  if isinstance(padding, int):
    return ((padding, padding),) * ndim
  return tuple(tuple(p) for p in padding)


def pair(value, name):
  """An int or a 2-sequence of ints as a (height, width) tuple.

  Args:
    value: ``n`` (the same on both axes, as ``flax.linen.Conv`` accepts) or
      ``(n_h, n_w)``.
    name: the attribute's name, for the error message.

  Returns:
    ``(n_h, n_w)``.
  """
  if isinstance(value, int):
    return (value, value)
  value = tuple(value)
  if len(value) != 2:
    raise ValueError(f'{name}={value!r}: QuantConv is 2-D; give an int or two '
                     'ints.')
  return value


def depthwise_by_shifts(x, kernel, strides, pads):
  """Depthwise convolution as a sum of shifted, scaled copies of the input.

  XLA:CPU runs a grouped convolution with one channel per group far below the
  speed of the elementwise arithmetic it amounts to; ``kh * kw`` strided
  slices of the padded input, each times one row of the kernel, are the same
  sum and fuse into one loop.

  Args:
    x: NHWC input.
    kernel: (kh, kw, C) filters, one per channel.
    strides: (sh, sw).
    pads: ((top, bottom), (left, right)).

  Returns:
    NHWC output, as ``lax.conv_general_dilated`` with ``feature_group_count=C``.
  """
  kh, kw = kernel.shape[:2]
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0),) + tuple(tuple(p) for p in pads) + ((0, 0),))
  ho = (xp.shape[1] - kh) // sh + 1
  wo = (xp.shape[2] - kw) // sw + 1
  y = None
  for i in range(kh):
    for j in range(kw):
      term = xp[:, i:i + (ho - 1) * sh + 1:sh,
                j:j + (wo - 1) * sw + 1:sw, :] * kernel[i, j]
      y = term if y is None else y + term
  return y


def convolve(x, kernel, *, strides, padding, input_dilation=1,
             kernel_dilation=1, feature_group_count=1, pointwise_as_dot=False,
             depthwise_as_shifts=False):
  """``x`` convolved with ``kernel``, by ``lax`` or by one of the rewrites.

  Args:
    x: NHWC input.
    kernel: HWIO kernel (I = input channels per group).
    strides: an int or (sh, sw).
    padding: 'SAME', 'VALID', an int or ((top, bottom), (left, right)).
    input_dilation: an int or a pair.
    kernel_dilation: an int or a pair.
    feature_group_count: groups.
    pointwise_as_dot: a 1x1, unpadded, ungrouped convolution as a matrix
      product.
    depthwise_as_shifts: a depthwise convolution (one channel per group,
      as many outputs) as ``depthwise_by_shifts`` (True), by lax (False), or
      the platform's choice (None): the shifts where the program runs on a
      CPU, where XLA's grouped convolution is far slower, lax's on GPUs and
      TPUs. The choice is made when the program is lowered for its
      platform (``jax.lax.platform_dependent``), so a ``jax.export`` for an
      accelerator from a CPU host gets lax's convolution.

  Returns:
    The NHWC output.
  """
  if depthwise_as_shifts not in (True, False, None):
    raise ValueError(f'depthwise_as_shifts={depthwise_as_shifts!r}; allowed: '
                     'True (shifts), False (lax) or None (shifts on a CPU '
                     'only).')
  strides = pair(strides, 'strides')
  input_dilation = pair(input_dilation, 'input_dilation')
  kernel_dilation = pair(kernel_dilation, 'kernel_dilation')
  kernel_size = kernel.shape[:2]
  pads = normalize_padding(padding, 2)
  # The rewrites cover undilated convolutions only; lax resolves 'SAME' with
  # dilations itself.
  if input_dilation == kernel_dilation == (1, 1):
    if isinstance(pads, str):
      pads = jax.lax.padtype_to_pads(x.shape[1:3], kernel_size, strides, pads)
    no_padding = all(tuple(p) == (0, 0) for p in pads)
    if (pointwise_as_dot and kernel_size == (1, 1) and no_padding and
        feature_group_count == 1):
      sh, sw = strides
      return jnp.einsum('nhwc,cd->nhwd', x[:, ::sh, ::sw, :], kernel[0, 0])
    if (depthwise_as_shifts is not False and kernel.shape[2] == 1 and
        feature_group_count == x.shape[-1] == kernel.shape[-1]):
      shifts = lambda x, kernel: depthwise_by_shifts(
          x, kernel[:, :, 0, :], strides, pads)
      if depthwise_as_shifts:
        return shifts(x, kernel)
      return jax.lax.platform_dependent(
          x, kernel, cpu=shifts,
          default=lambda x, kernel: _lax_convolve(
              x, kernel, strides, pads, input_dilation, kernel_dilation,
              feature_group_count))
  return _lax_convolve(x, kernel, strides, pads, input_dilation,
                       kernel_dilation, feature_group_count)


def _lax_convolve(x, kernel, strides, pads, input_dilation, kernel_dilation,
                  feature_group_count):
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=pads,
      lhs_dilation=input_dilation, rhs_dilation=kernel_dilation,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=feature_group_count)
