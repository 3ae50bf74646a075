"""ResNet in torchvision's layout, with quantized convolutions.

Module names follow torchvision's state_dict keys with '.' written as '_'
(``layer1.0.conv1.weight`` is ``params['layer1_0']['conv1']['kernel']``), so
converting pretrained weights is a table of name rules (see conversion.py).
Padding is explicit and symmetric as in PyTorch, so outputs match torchvision
number for number.

Quantization rules (docs/method.md): the stem convolution and the classifier
stay full precision; every other convolution, the 1x1 shortcut included,
quantizes
its kernel to ``bits_w`` and its input to ``bits_a`` bits.
"""

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dtq_jax import layers
from dtq_jax import quant

# torchvision initialises convolutions with kaiming_normal_(mode='fan_out').
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def batch_norm(train, dtype, name):
  """BatchNorm with PyTorch's defaults (momentum 0.1 there is 0.9 here)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, dtype=dtype, name=name)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions; returns (output, tap) with tap = conv2 before BN."""
  features: int
  strides: int
  conv: Callable
  dtype: Optional[Any] = None
  expansion = 1

  @nn.compact
  def __call__(self, x, train):
    y = self.conv(self.features, (3, 3), (self.strides,) * 2, padding=1,
                  name='conv1')(x)
    y = nn.relu(batch_norm(train, self.dtype, 'bn1')(y))
    tap = self.conv(self.features, (3, 3), padding=1, name='conv2')(y)
    y = batch_norm(train, self.dtype, 'bn2')(tap)
    return nn.relu(y + _shortcut(self, x, train)), tap


class Bottleneck(nn.Module):
  """1x1, 3x3 (strided, as torchvision), 1x1; tap = conv3 before BN."""
  features: int
  strides: int
  conv: Callable
  dtype: Optional[Any] = None
  expansion = 4

  @nn.compact
  def __call__(self, x, train):
    y = self.conv(self.features, (1, 1), padding=0, name='conv1')(x)
    y = nn.relu(batch_norm(train, self.dtype, 'bn1')(y))
    y = self.conv(self.features, (3, 3), (self.strides,) * 2, padding=1,
                  name='conv2')(y)
    y = nn.relu(batch_norm(train, self.dtype, 'bn2')(y))
    tap = self.conv(self.features * 4, (1, 1), padding=0, name='conv3')(y)
    y = batch_norm(train, self.dtype, 'bn3')(tap)
    return nn.relu(y + _shortcut(self, x, train)), tap


def _shortcut(block, x, train):
  out_features = block.features * block.expansion
  if x.shape[-1] == out_features and block.strides == 1:
    return x
  y = block.conv(out_features, (1, 1), (block.strides,) * 2, padding=0,
                 name='downsample_0')(x)
  return batch_norm(train, block.dtype, 'downsample_1')(y)


class ResNet(nn.Module):
  """ResNet returning ``(logits, features)``.

  Attributes:
    stage_sizes: blocks per stage (four stages).
    block_cls: ``BasicBlock`` or ``Bottleneck``.
    num_classes: outputs of the (source) classifier ``fc``.
    widths: base channels of each stage (output channels are times the
      block's expansion).
    small_stem: 3x3 stride-1 stem without max-pool, for 28-32 px images.
    bits_w: weight bit width of the quantized convolutions.
    bits_a: activation bit width of the quantized convolutions.
    conv: the convolution class, ``layers.QuantConv`` or a compatible one.
    conv_kwargs: extra attributes for every quantized convolution (e.g.
      ``pointwise_as_dot``).
    dtype: computation dtype (None = float32).
  """
  stage_sizes: Sequence[int]
  block_cls: Any
  num_classes: int = 1000
  widths: Sequence[int] = (64, 128, 256, 512)
  small_stem: bool = False
  bits_w: int = quant.FULL_PRECISION
  bits_a: int = quant.FULL_PRECISION
  conv: Callable = layers.QuantConv
  conv_kwargs: Optional[dict] = None
  dtype: Optional[Any] = None
  dropout_rate = 0.0
  classifier_name = 'fc'  # the source classifier (frozen in DTQ).

  @nn.compact
  def __call__(self, x, train=False):
    """Runs the network.

    Args:
      x: NHWC float images.
      train: BatchNorm uses batch statistics (and updates ``batch_stats``).

    Returns:
      ``(logits, features)``: source logits, and a dict with ``'pooled'`` (the
      global-average-pooled vector) and ``'taps'`` (the four tapped maps).
    """
    conv = functools.partial(self.conv, use_bias=False, kernel_init=CONV_INIT,
                             dtype=self.dtype)
    qconv = functools.partial(conv, bits_w=self.bits_w, bits_a=self.bits_a,
                              **(self.conv_kwargs or {}))
    if self.small_stem:
      x = conv(self.widths[0], (3, 3), padding=1, name='conv1')(x)
    else:
      x = conv(self.widths[0], (7, 7), (2, 2), padding=3, name='conv1')(x)
    x = nn.relu(batch_norm(train, self.dtype, 'bn1')(x))
    if not self.small_stem:
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    taps = []
    for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x, tap = self.block_cls(width, strides, qconv, self.dtype,
                                name=f'layer{i + 1}_{j}')(x, train)
      taps.append(tap)
    pooled = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(pooled)
    return logits, {'pooled': pooled, 'taps': taps}


STAGE_SIZES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


def resnet(depth, **kwargs):
  """torchvision's ResNet-``depth`` (18, 34, 50, 101 or 152)."""
  if depth not in STAGE_SIZES:
    raise ValueError(f'ResNet depth {depth} not in {sorted(STAGE_SIZES)}.')
  block_cls = BasicBlock if depth < 50 else Bottleneck
  return ResNet(stage_sizes=STAGE_SIZES[depth], block_cls=block_cls, **kwargs)


def small_resnet(widths=(16, 32, 64, 128), stage_sizes=(1, 1, 1, 1),
                 **kwargs):
  """The offline demo's ResNet for 28-32 px images (3x3 stem, no max-pool)."""
  return ResNet(stage_sizes=tuple(stage_sizes), block_cls=BasicBlock,
                widths=tuple(widths), small_stem=True, **kwargs)
