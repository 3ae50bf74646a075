"""MobileNetV2 (width 1.0) in torchvision's layout, with quantized convs.

Names follow torchvision with '.' written as '_': ``features.3.conv.1.0.weight``
is ``params['features_3']['conv_1_0']['kernel']``. Every convolution except the
stem (``features.0.0``) is quantized: expansion, depthwise, projection and the
final 1x1 (320 -> 1280). The classifier stays full precision, behind
Dropout(0.2) as in torchvision.
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from dtq_jax import layers
from dtq_jax.models.resnet import batch_norm
from dtq_jax import quant

# (expansion t, output channels c, repeats n, first stride s), as in the paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# Blocks whose projection BatchNorm output is a transfer tap (docs/method.md).
TAPPED_BLOCKS = (5, 9, 13, 17)
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class InvertedResidual(nn.Module):
  """Expansion 1x1 (if t > 1), depthwise 3x3, linear projection 1x1."""
  features: int
  strides: int
  expand_ratio: int
  conv: Callable
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, train):
    in_features = x.shape[-1]
    hidden = in_features * self.expand_ratio
    y, index = x, 0
    if self.expand_ratio != 1:
      y = self.conv(hidden, (1, 1), padding=0, name='conv_0_0')(y)
      y = nn.relu6(batch_norm(train, self.dtype, 'conv_0_1')(y))
      index = 1
    y = self.conv(hidden, (3, 3), (self.strides,) * 2, padding=1,
                  feature_group_count=hidden, name=f'conv_{index}_0')(y)
    y = nn.relu6(batch_norm(train, self.dtype, f'conv_{index}_1')(y))
    y = self.conv(self.features, (1, 1), padding=0,
                  name=f'conv_{index + 1}')(y)
    tap = batch_norm(train, self.dtype, f'conv_{index + 2}')(y)
    if self.strides == 1 and in_features == self.features:
      return x + tap, tap
    return tap, tap


class MobileNetV2(nn.Module):
  """MobileNetV2 returning ``(logits, features)``; see ``ResNet``."""
  num_classes: int = 1000
  dropout_rate: float = 0.2
  bits_w: int = quant.FULL_PRECISION
  bits_a: int = quant.FULL_PRECISION
  conv: Callable = layers.QuantConv
  conv_kwargs: Optional[dict] = None
  dtype: Optional[Any] = None
  classifier_name = 'classifier_1'  # the source classifier (frozen in DTQ).

  @nn.compact
  def __call__(self, x, train=False):
    """Runs the network.

    Args:
      x: NHWC float images.
      train: batch-statistics BatchNorm and active dropout (needs a 'dropout'
        rng).

    Returns:
      ``(logits, features)`` with ``features['pooled']`` (before dropout),
      ``features['dropped']`` (after it: what the source classifier read)
      and ``features['taps']`` (projection BN outputs of blocks 5, 9, 13,
      17).
    """
    conv = functools.partial(self.conv, use_bias=False, kernel_init=CONV_INIT,
                             dtype=self.dtype)
    qconv = functools.partial(conv, bits_w=self.bits_w, bits_a=self.bits_a,
                              **(self.conv_kwargs or {}))
    x = conv(32, (3, 3), (2, 2), padding=1, name='features_0_0')(x)
    x = nn.relu6(batch_norm(train, self.dtype, 'features_0_1')(x))
    taps, index = [], 1
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
      for i in range(n):
        x, tap = InvertedResidual(c, s if i == 0 else 1, t, qconv, self.dtype,
                                  name=f'features_{index}')(x, train)
        if index in TAPPED_BLOCKS:
          taps.append(tap)
        index += 1
    x = qconv(1280, (1, 1), padding=0, name=f'features_{index}_0')(x)
    x = nn.relu6(batch_norm(train, self.dtype, f'features_{index}_1')(x))
    pooled = jnp.mean(x, axis=(1, 2))
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(pooled)
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      name='classifier_1')(y)
    return logits, {'pooled': pooled, 'dropped': y, 'taps': taps}
