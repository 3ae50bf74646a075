"""Loss terms of DTQ and its baselines: pure functions of arrays.

All formulas are those of docs/method.md; feature maps are NHWC.
Teacher inputs are wrapped in ``stop_gradient`` so a caller cannot train the
teacher by accident.
"""

import jax
import jax.numpy as jnp
import optax

AFA_NORMALIZATIONS = ('final', 'mean')


def cross_entropy(logits, labels, weights=None):
  """Mean softmax cross-entropy with integer labels.

  Args:
    logits: (B, K).
    labels: (B,) integer labels.
    weights: optional (B,) per-example weights (e.g. a 0/1 padding mask); the
      mean is then taken over their sum.

  Returns:
    Scalar float32 loss.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)
  if weights is None:
    return jnp.mean(losses)
  return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def kl_divergence(student_logits, teacher_logits, temperature):
  """Distillation term ``T^2 * KL(p_teacher || p_student) / B``.

  Args:
    student_logits: (B, K) source logits of the student.
    teacher_logits: (B, K) source logits of the teacher (gradient stopped).
    temperature: softmax temperature T.

  Returns:
    Scalar: ``T^2 * sum_{b,k} p_s (log p_s - log_softmax(z_t / T)) / B``.
  """
  t = temperature
  teacher_logits = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  log_p_teacher = jax.nn.log_softmax(teacher_logits / t, axis=-1)
  log_p_student = jax.nn.log_softmax(
      student_logits.astype(jnp.float32) / t, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_teacher) * (log_p_teacher - log_p_student))
  return t * t * kl / student_logits.shape[0]


def _squared_distances(teacher_map, student_map):
  """(B, C) squared L2 distances over the H*W positions, in float32."""
  diff = (student_map.astype(jnp.float32) -
          jax.lax.stop_gradient(teacher_map).astype(jnp.float32))
  return jnp.sum(jnp.square(diff), axis=(1, 2))


def afa_loss(teacher_maps, student_maps, attention_weights,
             normalization='final'):
  """Attentive feature alignment, summed over the tapped maps.

  Args:
    teacher_maps: list of (B, H, W, C) teacher maps (gradient stopped).
    student_maps: list of (B, H, W, C) student maps at the same places.
    attention_weights: list of (B, C) channel weights (rows sum to one).
    normalization: ``'final'`` (authors' final code, default):
      ``0.5 * sum_{b,c} a * C * d^2 / B``; ``'mean'`` (earlier release):
      ``0.5 * sum_{b,c} a * d^2 / (B*C*H*W)``.

  Returns:
    Scalar loss.
  """
  if normalization not in AFA_NORMALIZATIONS:
    raise ValueError(f'afa normalization={normalization!r}; allowed: '
                     f'{", ".join(AFA_NORMALIZATIONS)}.')
  total = 0.0
  for fs, ft, a in zip(teacher_maps, student_maps, attention_weights,
                       strict=True):
    b, h, w, c = ft.shape
    weighted = jnp.sum(a.astype(jnp.float32) * _squared_distances(fs, ft))
    if normalization == 'final':
      total += 0.5 * c * weighted / b
    else:
      total += 0.5 * weighted / (b * c * h * w)
  return total


def delta_loss(teacher_maps, student_maps, channel_weights):
  """DELTA's behavioural regulariser Omega with fixed channel weights.

  Args:
    teacher_maps: list of (B, H, W, C) maps of the frozen network.
    student_maps: list of (B, H, W, C) student maps.
    channel_weights: list of (C,) fixed weights, one per map.

  Returns:
    ``sum_{maps, b, c} 0.5 * C * w[c] * ||F^t - F^s||^2 / (H*W)`` (summed,
    not averaged, over the batch).
  """
  total = 0.0
  for fs, ft, w in zip(teacher_maps, student_maps, channel_weights,
                       strict=True):
    _, h, wd, c = ft.shape
    d2 = _squared_distances(fs, ft)
    total += 0.5 * c * jnp.sum(jax.lax.stop_gradient(w) * d2) / (h * wd)
  return total


def l2(params):
  """Sum of squares ``||w||^2`` over every leaf (L2-Q multiplies by alpha/2)."""
  return sum(jnp.sum(jnp.square(p.astype(jnp.float32)))
             for p in jax.tree.leaves(params))


def l2_sp(params, start_params):
  """``||w - w0||^2`` towards the pretrained starting point (gradient 2(w-w0)).

  Args:
    params: current parameters.
    start_params: pretrained parameters with the same tree structure.

  Returns:
    Scalar; L2-SP-Q multiplies it by alpha/2.
  """
  diffs = jax.tree.map(
      lambda p, p0: p.astype(jnp.float32) - jax.lax.stop_gradient(p0), params,
      start_params)
  return l2(diffs)
