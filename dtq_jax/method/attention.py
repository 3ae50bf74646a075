"""The learnable channel-attention module of attentive feature alignment.

One ``ChannelAttention`` per tapped feature map reads the *teacher's* map and
returns weights over its channels (docs/method.md, "The attention
module")::

  z = reshape(F, (B, C, H*W))          # positions in row-major (h, w) order
  z = relu(z @ W1) @ W2                # W1: (H*W, H), W2: (H, 1), no biases
  a = softmax(z + b, over C)           # b: (C,), initialised to zero
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# config.dtq.attention: the paper's learned attention, or an ablation (equal
# weights; the learned module trained to ascend the AFA term it weights).
VARIANTS = ('learned', 'uniform', 'reversed')
# PyTorch's nn.Linear default (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)).
TORCH_LINEAR_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


class ChannelAttention(nn.Module):
  """Channel weights from one teacher feature map.

  Parameters: ``fc1`` (Dense H*W -> H, no bias), ``fc2`` (Dense H -> 1, no
  bias), ``bias`` (C,), zeros.
  """

  @nn.compact
  def __call__(self, teacher_map):
    """Computes the attention.

    Args:
      teacher_map: (B, H, W, C) teacher feature map; no gradient flows into it.

    Returns:
      (B, C) float32 weights, each row summing to one.
    """
    b, h, w, c = teacher_map.shape
    z = jax.lax.stop_gradient(teacher_map).astype(jnp.float32)
    z = jnp.transpose(z, (0, 3, 1, 2)).reshape(b, c, h * w)
    z = nn.relu(nn.Dense(h, use_bias=False, kernel_init=TORCH_LINEAR_INIT,
                         name='fc1')(z))
    z = nn.Dense(1, use_bias=False, kernel_init=TORCH_LINEAR_INIT,
                 name='fc2')(z)[..., 0]
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    return jax.nn.softmax(z + bias, axis=-1)


class TransferAttention(nn.Module):
  """One attention module per tapped map (``attention_0`` ... ``attention_3``).

  Attributes:
    uniform: ablation: equal weights 1/C instead of learned ones (no params).
  """
  uniform: bool = False

  @nn.compact
  def __call__(self, teacher_maps: Sequence[jax.Array]):
    """Returns a list of (B, C) channel weights, one per map."""
    if self.uniform:
      return [jnp.full(m.shape[:1] + m.shape[-1:], 1.0 / m.shape[-1],
                       jnp.float32) for m in teacher_maps]
    return [ChannelAttention(name=f'attention_{i}')(m)
            for i, m in enumerate(teacher_maps)]


@jax.custom_vjp
def reverse_gradient(x):
  """The identity whose gradient is negated (the 'reversed' attention).

  Put between the attention and the AFA term, it makes the attention
  *maximise* the term it weights while the student still minimises it: an
  adversarial weighting that spreads over the channels where the student is
  furthest from the teacher instead of collapsing onto the closest one.

  Args:
    x: any array.

  Returns:
    ``x``; its cotangent g becomes -g.
  """
  return x


def _reverse_fwd(x):
  return x, None


def _reverse_bwd(_, g):
  return (-g,)


reverse_gradient.defvjp(_reverse_fwd, _reverse_bwd)


def attention_entropy(weights):
  """Mean entropy (nats) of (B, C) channel weights; log(C) means uniform."""
  return -jnp.mean(jnp.sum(weights * jnp.log(weights + 1e-12), axis=-1))
