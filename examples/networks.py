"""Image classifiers written as plain Flax, outside dtq-jax's zoo (issue #26).

dtq-jax takes a user's own Flax Linen classifier by import path, e.g.
``--config.model=examples.networks:VGG``. These three are written as such a
user would write them, the way flax's own examples write classifiers
(flax/examples/imagenet/models.py): no dtq_jax import, plain ``nn.Conv`` and
``nn.Dense``, BatchNorm switched by ``use_running_average=not train``, a
``num_classes`` attribute, and ``__call__(x, train)`` taking NHWC float images
and returning logits only. Between them they hold what a network from outside
the zoo brings that the zoo's ResNets do not:

* ``VGG``: a plain Conv-BN-ReLU stack with max-pooling, no residuals.
* ``EfficientNetLike``: depthwise convolutions (``feature_group_count``),
  squeeze-and-excitation gates, swish, dropout (an rng in training).
* ``ConvNeXtLike``: LayerNorm and no BatchNorm at all, so its variables have
  no ``batch_stats`` collection; 1x1 projections as ``nn.Dense`` on NHWC maps.

Each network's stages are sub-modules named ``stage1``, ``stage2``, ...
(their outputs are the natural feature taps) and its last layer is the
``nn.Dense`` named ``classifier``. Attributes size them. The defaults suit
28x28 grayscale Fashion-MNIST (1 channel, 10 classes) trained for a few
minutes on 2 CPU cores at batch 32: 99, 156 and 233 thousand parameters
(VGG, EfficientNetLike, ConvNeXtLike), and one SGD step at batch 32 took 20,
220 and 90 ms on 2 shared cores, so a thousand steps take 20 s to 4 min
(XLA's CPU depthwise convolutions are slow, hence EfficientNetLike's time).
The tests build versions of a few thousand parameters; each docstring says
which attributes give a real-sized network.
"""

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp


def _batch_norm(train, dtype, name):
  """BatchNorm as flax's ImageNet example sets it.

  Momentum 0.9 (flax's default is 0.99): the running statistics of a network
  trained for a few hundred steps would otherwise still be mostly the
  initial ones.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                      epsilon=1e-5, dtype=dtype, name=name)


def _check_per_stage(network, **per_stage):
  """Raises ValueError unless the per-stage attributes have one length."""
  lengths = {name: len(values) for name, values in per_stage.items()}
  if len(set(lengths.values())) != 1:
    raise ValueError(f'{network}: the per-stage attributes must have one '
                     f'length each, got {lengths}.')


class VGGStage(nn.Module):
  """``num_convs`` 3x3 Conv-BN-ReLU at one resolution.

  Attributes:
    features: output channels of every convolution.
    num_convs: convolutions in the stage.
    dtype: computation dtype (None = float32).
  """
  features: int
  num_convs: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.num_convs):
      # No bias: the BatchNorm right after it has one.
      x = nn.Conv(self.features, (3, 3), use_bias=False, dtype=self.dtype,
                  name=f'conv{i + 1}')(x)
      x = nn.relu(_batch_norm(train, self.dtype, f'bn{i + 1}')(x))
    return x


class VGG(nn.Module):
  """VGG with BatchNorm (Simonyan and Zisserman, 2015; torchvision's vgg*_bn).

  Stages of 3x3 Conv-BN-ReLU with a 2x2 max-pool between stages, then global
  average pooling and one ``nn.Dense``. The pooling replaces VGG's three
  4096-wide fully connected layers, as later VGG variants for small images
  do: they would hold most of the parameters and fix the input size. The
  defaults (about 99 thousand parameters) see 28, 14, 7 and 3 px maps on
  Fashion-MNIST; ``stage_widths=(64, 128, 256, 512, 512)`` with
  ``convs_per_stage=(2, 2, 3, 3, 3)`` gives VGG-16-BN's convolutions.

  Module paths: ``stage1`` ... ``stageN`` (``VGGStage``; the outputs, before
  the max-pool that follows, are the feature taps) and ``classifier``.

  Attributes:
    num_classes: outputs of the classifier.
    stage_widths: output channels of each stage.
    convs_per_stage: convolutions in each stage.
    dtype: computation dtype (None = float32).
  """
  num_classes: int = 10
  stage_widths: Sequence[int] = (16, 32, 64, 128)
  convs_per_stage: Sequence[int] = (1, 1, 1, 1)
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, train: bool):
    """Returns the logits of NHWC images ``x``; ``train``: BatchNorm mode."""
    _check_per_stage('VGG', stage_widths=self.stage_widths,
                     convs_per_stage=self.convs_per_stage)
    for i, (width, convs) in enumerate(zip(self.stage_widths,
                                           self.convs_per_stage)):
      if i:
        # VALID, as VGG's pools: an odd size is floored (7 px -> 3).
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = VGGStage(width, convs, self.dtype, name=f'stage{i + 1}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x)


class SqueezeExcite(nn.Module):
  """Channel gates from the globally pooled map (Hu et al., 2018).

  Attributes:
    reduced: channels of the bottleneck between the two 1x1 convolutions.
    dtype: computation dtype (None = float32).
  """
  reduced: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x):
    # 1x1 convolutions on a 1x1 map, as EfficientNet writes them.
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.swish(nn.Conv(self.reduced, (1, 1), dtype=self.dtype,
                         name='reduce')(s))
    s = nn.sigmoid(nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype,
                           name='expand')(s))
    return x * s


class MBConv(nn.Module):
  """Inverted residual block with squeeze-and-excitation (EfficientNet's).

  1x1 expansion (left out at ratio 1), BN, swish; 3x3 depthwise convolution
  (strided), BN, swish; squeeze-and-excitation; 1x1 projection and BN with no
  activation (a linear bottleneck); the input added back where the shapes
  allow.

  Attributes:
    features: output channels.
    strides: stride of the depthwise convolution.
    expand_ratio: hidden channels over input channels.
    se_ratio: squeeze-and-excitation bottleneck over input channels (0: none).
    dtype: computation dtype (None = float32).
  """
  features: int
  strides: int = 1
  expand_ratio: int = 4
  se_ratio: float = 0.25
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    inputs = x
    in_features = x.shape[-1]
    hidden = in_features * self.expand_ratio
    if self.expand_ratio != 1:
      x = conv(hidden, (1, 1), name='expand_conv')(x)
      x = nn.swish(_batch_norm(train, self.dtype, 'expand_bn')(x))
    # One group per channel: a depthwise convolution.
    x = conv(hidden, (3, 3), strides=self.strides, feature_group_count=hidden,
             name='depthwise_conv')(x)
    x = nn.swish(_batch_norm(train, self.dtype, 'depthwise_bn')(x))
    if self.se_ratio:
      # EfficientNet sizes the gate's bottleneck by the block's input
      # channels, not the expanded ones.
      x = SqueezeExcite(max(1, int(in_features * self.se_ratio)), self.dtype,
                        name='se')(x)
    x = conv(self.features, (1, 1), name='project_conv')(x)
    x = _batch_norm(train, self.dtype, 'project_bn')(x)
    if self.strides == 1 and in_features == self.features:
      x = x + inputs
    return x


class MBConvStage(nn.Module):
  """``num_blocks`` MBConv blocks; the first one strides.

  Attributes:
    features: output channels of every block.
    num_blocks: blocks in the stage.
    strides: stride of the first block.
    expand_ratio: each block's expansion ratio.
    se_ratio: each block's squeeze-and-excitation ratio.
    dtype: computation dtype (None = float32).
  """
  features: int
  num_blocks: int
  strides: int
  expand_ratio: int
  se_ratio: float
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, train: bool):
    for i in range(self.num_blocks):
      x = MBConv(self.features, self.strides if i == 0 else 1,
                 self.expand_ratio, self.se_ratio, self.dtype,
                 name=f'block{i + 1}')(x, train)
    return x


class EfficientNetLike(nn.Module):
  """EfficientNet's layout (Tan and Le, 2019) at a chosen size.

  A 3x3 Conv-BN-swish stem, stages of ``MBConv`` blocks (the first block of
  a stage strides), a 1x1 Conv-BN-swish head, global average pooling,
  dropout and one ``nn.Dense``. Unlike EfficientNet-B0 every depthwise
  kernel is 3x3 (B0 has 5x5 ones too) and there is no stochastic depth. The
  defaults (about 156 thousand parameters) halve the resolution at the stem
  as B0 does and see 14, 7, 4 and 2 px maps on Fashion-MNIST; a stride-1 stem
  would quadruple the depthwise convolutions' work, the slowest part on CPU.
  ``stem_width=32, stage_widths=(16, 24, 40, 80, 112, 192, 320),
  blocks_per_stage=(1, 2, 2, 3, 3, 4, 1), stage_strides=(1, 2, 2, 2, 1, 2,
  1), expand_ratios=(1, 6, 6, 6, 6, 6, 6), head_width=1280`` is B0 with 3x3
  kernels.

  Dropout is active in training, which then needs a ``'dropout'`` rng
  (``model.apply(..., train=True, rngs={'dropout': key})``).

  Module paths: ``stage1`` ... ``stageN`` (``MBConvStage``, their outputs
  are the feature taps), ``head_conv`` and ``classifier``.

  Attributes:
    num_classes: outputs of the classifier.
    stem_width: output channels of the stem.
    stem_strides: stride of the stem (2 as B0).
    stage_widths: output channels of each stage.
    blocks_per_stage: MBConv blocks in each stage.
    stage_strides: stride of each stage's first block.
    expand_ratios: MBConv expansion ratio of each stage.
    se_ratio: squeeze-and-excitation ratio of every block (0: none).
    head_width: channels of the 1x1 head convolution.
    dropout_rate: dropout before the classifier (in training only).
    dtype: computation dtype (None = float32).
  """
  num_classes: int = 10
  stem_width: int = 16
  stem_strides: int = 2
  stage_widths: Sequence[int] = (16, 24, 40, 80)
  blocks_per_stage: Sequence[int] = (1, 2, 2, 2)
  stage_strides: Sequence[int] = (1, 2, 2, 2)
  expand_ratios: Sequence[int] = (1, 4, 4, 4)
  se_ratio: float = 0.25
  head_width: int = 256
  dropout_rate: float = 0.2
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, train: bool):
    """Returns the logits of NHWC images ``x``.

    Args:
      x: NHWC float images.
      train: BatchNorm uses (and updates) batch statistics, dropout is on.

    Returns:
      ``(batch, num_classes)`` logits.
    """
    _check_per_stage('EfficientNetLike', stage_widths=self.stage_widths,
                     blocks_per_stage=self.blocks_per_stage,
                     stage_strides=self.stage_strides,
                     expand_ratios=self.expand_ratios)
    x = nn.Conv(self.stem_width, (3, 3), strides=self.stem_strides,
                use_bias=False, dtype=self.dtype, name='stem_conv')(x)
    x = nn.swish(_batch_norm(train, self.dtype, 'stem_bn')(x))
    for i, stage in enumerate(zip(self.stage_widths, self.blocks_per_stage,
                                  self.stage_strides, self.expand_ratios)):
      width, blocks, strides, ratio = stage
      x = MBConvStage(width, blocks, strides, ratio, self.se_ratio,
                      self.dtype, name=f'stage{i + 1}')(x, train)
    x = nn.Conv(self.head_width, (1, 1), use_bias=False, dtype=self.dtype,
                name='head_conv')(x)
    x = nn.swish(_batch_norm(train, self.dtype, 'head_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train,
                   name='dropout')(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x)


class ConvNeXtBlock(nn.Module):
  """ConvNeXt's block (Liu et al., 2022), channels last.

  7x7 depthwise convolution, LayerNorm, a 4x wider ``nn.Dense`` (a 1x1
  convolution on an NHWC map), GELU, ``nn.Dense`` back, an optional learned
  per-channel scale, and the input added back.

  Attributes:
    layer_scale_init: initial value of the per-channel scale of the residual
      branch (None: no scale).
    dtype: computation dtype (None = float32).
  """
  layer_scale_init: Optional[float] = None
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    y = nn.Conv(features, (7, 7), feature_group_count=features,
                dtype=self.dtype, name='depthwise_conv')(x)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm')(y)
    y = nn.Dense(4 * features, dtype=self.dtype, name='expand')(y)
    # ConvNeXt uses the exact GELU (PyTorch's default), not tanh's.
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(features, dtype=self.dtype, name='project')(y)
    if self.layer_scale_init is not None:
      scale = self.param('layer_scale',
                         nn.initializers.constant(self.layer_scale_init),
                         (features,))
      y = y * scale.astype(y.dtype)
    return x + y


class ConvNeXtStage(nn.Module):
  """``num_blocks`` ConvNeXt blocks at the input's width and resolution.

  Attributes:
    num_blocks: blocks in the stage.
    layer_scale_init: each block's ``layer_scale_init``.
    dtype: computation dtype (None = float32).
  """
  num_blocks: int
  layer_scale_init: Optional[float] = None
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_blocks):
      x = ConvNeXtBlock(self.layer_scale_init, self.dtype,
                        name=f'block{i + 1}')(x)
    return x


class ConvNeXtDownsample(nn.Module):
  """LayerNorm, then a 2x2 stride-2 convolution to ``features`` channels.

  Attributes:
    features: output channels.
    dtype: computation dtype (None = float32).
  """
  features: int
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm')(x)
    return nn.Conv(self.features, (2, 2), strides=2, padding='VALID',
                   dtype=self.dtype, name='conv')(x)


class ConvNeXtLike(nn.Module):
  """ConvNeXt's layout (Liu et al., 2022) at a chosen size; no BatchNorm.

  A patchify stem (a ``stem_strides`` x ``stem_strides`` convolution with
  that stride, then LayerNorm), stages of ``ConvNeXtBlock``, a
  ``ConvNeXtDownsample`` before every stage but the first, global average
  pooling, LayerNorm and one ``nn.Dense``. Normalization is LayerNorm
  throughout, so the network's variables are ``params`` only (no
  ``batch_stats``) and ``train`` changes nothing: there is no dropout or
  stochastic depth. The defaults (about 233 thousand parameters) patchify
  at stride 2 and see 14, 7, 3 and 1 px maps on Fashion-MNIST;
  ``stem_strides=4, stage_widths=(96, 192, 384, 768), blocks_per_stage=(3,
  3, 9, 3), layer_scale_init=1e-6`` is ConvNeXt-T.

  Layer scale is off by default: ConvNeXt starts it at 1e-6 to keep deep
  networks stable, which makes every block nearly the identity at the start
  and, with SGD, slow to leave it; these networks are shallow.

  Module paths: ``stage1`` ... ``stageN`` (``ConvNeXtStage``, their outputs
  are the feature taps), ``downsample2`` ... ``downsampleN`` (before the
  stage of that number), ``head_norm`` and ``classifier``.

  Attributes:
    num_classes: outputs of the classifier.
    stem_strides: patch size and stride of the stem (2 for 28-32 px images,
      4 as ConvNeXt).
    stage_widths: channels of each stage.
    blocks_per_stage: ConvNeXt blocks in each stage.
    layer_scale_init: initial per-channel scale of every block's residual
      branch (None: no scale).
    dtype: computation dtype (None = float32).
  """
  num_classes: int = 10
  stem_strides: int = 2
  stage_widths: Sequence[int] = (16, 32, 64, 128)
  blocks_per_stage: Sequence[int] = (1, 1, 1, 1)
  layer_scale_init: Optional[float] = None
  dtype: Optional[Any] = None

  @nn.compact
  def __call__(self, x, train: bool):
    """Returns the logits of NHWC images ``x`` (``train`` changes nothing)."""
    del train  # No BatchNorm or dropout: one network for both modes.
    _check_per_stage('ConvNeXtLike', stage_widths=self.stage_widths,
                     blocks_per_stage=self.blocks_per_stage)
    patch = (self.stem_strides,) * 2
    x = nn.Conv(self.stage_widths[0], patch, strides=patch, padding='VALID',
                dtype=self.dtype, name='stem_conv')(x)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='stem_norm')(x)
    for i, (width, blocks) in enumerate(zip(self.stage_widths,
                                            self.blocks_per_stage)):
      if i:
        x = ConvNeXtDownsample(width, self.dtype,
                               name=f'downsample{i + 1}')(x)
      x = ConvNeXtStage(blocks, self.layer_scale_init, self.dtype,
                        name=f'stage{i + 1}')(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='head_norm')(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x)
