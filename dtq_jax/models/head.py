"""The new target classifier put on the student's pooled features."""

import flax.linen as nn
import jax
import jax.numpy as jnp


def _torch_linear_bias_init(fan_in):
  # PyTorch's nn.Linear draws its bias from U(+-1/sqrt(fan_in)).
  bound = 1.0 / jnp.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class TargetHead(nn.Module):
  """Dropout (MobileNetV2 keeps its 0.2 in front of both classifiers) + Dense.

  The trainer feeds it MobileNetV2's already dropped-out features with
  ``train=False`` by default (``config.head_dropout='shared'``), so its own
  dropout runs only for ``'independent'``.

  Attributes:
    num_classes: target classes.
    dropout_rate: dropout before the layer in training (0 disables it).
  """
  num_classes: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, features, train=False):
    """Returns (B, num_classes) float32 logits of (B, D) pooled features."""
    if self.dropout_rate:
      features = nn.Dropout(self.dropout_rate, deterministic=not train)(
          features)
    return nn.Dense(
        self.num_classes,
        kernel_init=nn.initializers.variance_scaling(1 / 3, 'fan_in',
                                                     'uniform'),
        bias_init=_torch_linear_bias_init(features.shape[-1]),
        name='fc')(features.astype(jnp.float32))
