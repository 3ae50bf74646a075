"""Model zoo: torchvision ResNets and MobileNetV2, and the demo ResNet.

resnet (ResNet-18..152 and the demo's small_resnet), mobilenet_v2, head (the
target classifier). Each model takes its convolution as an injected ``conv``
module (dtq_jax.layers) and returns logits plus a dict of named features;
parameter names map one-to-one to torchvision's. own_network gives a user's
Flax classifier (named 'package.module:Class') the same interface without
touching its code. Imports quant, layers and infra.
"""

from dtq_jax.models.mobilenet_v2 import MobileNetV2
from dtq_jax.models.resnet import ResNet
from dtq_jax.models.resnet import resnet
from dtq_jax.models.resnet import small_resnet

_RESNET_DEPTHS = {f'resnet{d}': d for d in (18, 34, 50, 101, 152)}
MODEL_NAMES = tuple(_RESNET_DEPTHS) + ('mobilenet_v2', 'small_resnet')


def create_model(name, num_classes=1000, bits_w=32, bits_a=32, **kwargs):
  """Builds a model by name.

  Args:
    name: one of ``MODEL_NAMES``.
    num_classes: outputs of the source classifier.
    bits_w: weight bit width of the quantized convolutions (32 = float).
    bits_a: input-activation bit width of the quantized convolutions.
    **kwargs: further model attributes (``dtype``, ``conv``, ``conv_kwargs``;
      ``widths``/``stage_sizes`` for ``small_resnet``).

  Returns:
    A Flax module; ``model.apply(variables, images, train=False)`` returns
    ``(logits, {'pooled': ..., 'taps': [4 maps]})``.

  Raises:
    ValueError: for an unknown name.
  """
  common = dict(num_classes=num_classes, bits_w=bits_w, bits_a=bits_a,
                **kwargs)
  if name in _RESNET_DEPTHS:
    return resnet(_RESNET_DEPTHS[name], **common)
  if name == 'mobilenet_v2':
    return MobileNetV2(**common)
  if name == 'small_resnet':
    return small_resnet(**common)
  raise ValueError(
      f'Unknown model {name!r}; allowed: {", ".join(MODEL_NAMES)}.')
