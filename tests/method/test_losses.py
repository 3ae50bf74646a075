"""Tests of dtq_jax.method.losses against NumPy versions of docs/method.md's terms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtq_jax.method import losses

RTOL = 1e-5


def _rng(seed=0):
  return np.random.default_rng(seed)


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def np_softmax(z):
  return np.exp(np_log_softmax(z))


def _maps(seed=0):
  """Two pairs of (B, H, W, C) teacher/student maps with different shapes."""
  rng = _rng(seed)
  shapes = [(3, 4, 4, 5), (3, 2, 2, 7)]
  teacher = [rng.normal(size=s).astype(np.float32) for s in shapes]
  student = [rng.normal(size=s).astype(np.float32) for s in shapes]
  return teacher, student


def _attention(teacher, seed=1):
  rng = _rng(seed)
  return [np_softmax(rng.normal(size=(t.shape[0], t.shape[-1]))).astype(
      np.float32) for t in teacher]


def _np_sq_dist(fs, ft):
  """d[b, c]^2 = ||F^t[b, c] - F^s[b, c]||^2 over the H*W positions."""
  diff = np.asarray(ft, np.float64) - np.asarray(fs, np.float64)
  return np.sum(diff**2, axis=(1, 2))


# --------------------------------------------------------------------------
# Cross-entropy.
# --------------------------------------------------------------------------


def test_cross_entropy_unweighted():
  rng = _rng()
  logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
  labels = np.array([0, 4, 2, 2, 1, 3])
  expected = -np.mean(np_log_softmax(logits)[np.arange(6), labels])
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), expected,
                             rtol=RTOL)


def test_cross_entropy_weighted():
  rng = _rng(1)
  logits = rng.normal(size=(5, 4)).astype(np.float32)
  labels = np.array([3, 0, 1, 1, 2])
  per_example = -np_log_softmax(logits)[np.arange(5), labels]
  # A 0/1 padding mask: the mean over the real examples only.
  mask = np.array([1.0, 0.0, 1.0, 1.0, 0.0], np.float32)
  np.testing.assert_allclose(
      losses.cross_entropy(logits, labels, mask),
      (per_example[0] + per_example[2] + per_example[3]) / 3, rtol=RTOL)
  # General weights: sum(w * l) / sum(w).
  weights = np.array([0.5, 2.0, 1.0, 0.25, 3.0], np.float32)
  np.testing.assert_allclose(
      losses.cross_entropy(logits, labels, weights),
      np.sum(weights * per_example) / np.sum(weights), rtol=RTOL)
  # An all-padding batch gives 0, not NaN.
  assert float(losses.cross_entropy(logits, labels, np.zeros(5))) == 0.0


# --------------------------------------------------------------------------
# KL term.
# --------------------------------------------------------------------------


@pytest.mark.parametrize('temperature', [1.0, 4.0, 30.0, 60.0])
def test_kl_divergence(temperature):
  rng = _rng(2)
  student = (rng.normal(size=(4, 10)) * 20).astype(np.float32)
  teacher = (rng.normal(size=(4, 10)) * 20).astype(np.float32)
  t = temperature
  log_ps = np_log_softmax(teacher / t)
  expected = t**2 * np.sum(
      np.exp(log_ps) * (log_ps - np_log_softmax(student / t))) / 4
  np.testing.assert_allclose(
      losses.kl_divergence(student, teacher, temperature), expected,
      rtol=1e-4, atol=1e-7)


def test_kl_divergence_zero_for_equal_logits_and_stops_teacher_grad():
  rng = _rng(3)
  logits = rng.normal(size=(3, 8)).astype(np.float32)
  np.testing.assert_allclose(losses.kl_divergence(logits, logits, 60.0), 0.0,
                             atol=1e-5)
  teacher = rng.normal(size=(3, 8)).astype(np.float32)
  g_student, g_teacher = jax.jit(
      jax.grad(losses.kl_divergence, argnums=(0, 1)))(logits, teacher, 2.0)
  np.testing.assert_array_equal(g_teacher, 0.0)
  # d/dz^t = T^2 * (p^t - p^s) / (T * B) = T (p^t - p^s) / B.
  expected = 2.0 * (np_softmax(logits / 2.0) - np_softmax(teacher / 2.0)) / 3
  np.testing.assert_allclose(g_student, expected, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------
# Attentive feature alignment.
# --------------------------------------------------------------------------


def _np_afa(teacher, student, attention, normalization):
  total = 0.0
  for fs, ft, a in zip(teacher, student, attention):
    b, h, w, c = ft.shape
    weighted = np.sum(np.asarray(a, np.float64) * _np_sq_dist(fs, ft))
    if normalization == 'final':
      total += 0.5 * weighted * c / b
    else:
      total += 0.5 * weighted / (b * c * h * w)
  return total


@pytest.mark.parametrize('normalization', ['final', 'mean'])
def test_afa_loss(normalization):
  teacher, student = _maps()
  attention = _attention(teacher)
  np.testing.assert_allclose(
      losses.afa_loss(teacher, student, attention, normalization),
      _np_afa(teacher, student, attention, normalization), rtol=RTOL)


def test_afa_default_is_final():
  teacher, student = _maps()
  attention = _attention(teacher)
  np.testing.assert_array_equal(
      losses.afa_loss(teacher, student, attention),
      losses.afa_loss(teacher, student, attention, 'final'))


def test_afa_normalizations_differ_by_c2_h_w():
  teacher, student = _maps()
  attention = _attention(teacher)
  for fs, ft, a in zip(teacher, student, attention):
    _, h, w, c = ft.shape
    final = losses.afa_loss([fs], [ft], [a], 'final')
    mean = losses.afa_loss([fs], [ft], [a], 'mean')
    np.testing.assert_allclose(final / mean, c * c * h * w, rtol=RTOL)


def test_afa_bad_normalization_raises():
  teacher, student = _maps()
  with pytest.raises(ValueError):
    losses.afa_loss(teacher, student, _attention(teacher), 'sum')


def test_afa_grads():
  teacher, student = _maps()
  attention = _attention(teacher)
  g_teacher, g_student, g_attention = jax.jit(
      jax.grad(losses.afa_loss, argnums=(0, 1, 2)))(teacher, student,
                                                     attention)
  for gt, gs, ga, fs, ft, a in zip(g_teacher, g_student, g_attention, teacher,
                                   student, attention):
    b, _, _, c = ft.shape
    # The teacher is frozen.
    np.testing.assert_array_equal(gt, 0.0)
    # d/dF^t of 0.5 * C * a * ||F^t - F^s||^2 / B.
    np.testing.assert_allclose(gs, c * a[:, None, None, :] * (ft - fs) / b,
                               rtol=RTOL, atol=1e-6)
    # The attention is trained on the same loss, so gradient must reach it.
    np.testing.assert_allclose(ga, 0.5 * c * _np_sq_dist(fs, ft) / b,
                               rtol=RTOL)


def test_afa_zero_for_equal_maps():
  teacher, _ = _maps()
  assert float(losses.afa_loss(teacher, teacher, _attention(teacher))) == 0.0


# --------------------------------------------------------------------------
# DELTA.
# --------------------------------------------------------------------------


def test_delta_loss():
  teacher, student = _maps()
  rng = _rng(4)
  weights = [np_softmax(rng.normal(size=t.shape[-1])).astype(np.float32)
             for t in teacher]
  expected = 0.0
  for fs, ft, w in zip(teacher, student, weights):
    _, h, wd, c = ft.shape
    # Summed (not averaged) over the batch.
    expected += np.sum(0.5 * c * w[None, :] * _np_sq_dist(fs, ft) / (h * wd))
  np.testing.assert_allclose(losses.delta_loss(teacher, student, weights),
                             expected, rtol=RTOL)
  g_teacher, g_student, g_weights = jax.jit(
      jax.grad(losses.delta_loss, argnums=(0, 1, 2)))(teacher, student,
                                                      weights)
  for gt, gw in zip(g_teacher, g_weights):
    np.testing.assert_array_equal(gt, 0.0)  # Frozen network.
    np.testing.assert_array_equal(gw, 0.0)  # Fixed channel weights.
  for gs, fs, ft, w in zip(g_student, teacher, student, weights):
    _, h, wd, c = ft.shape
    np.testing.assert_allclose(gs, c * w * (ft - fs) / (h * wd), rtol=RTOL,
                               atol=1e-6)


# --------------------------------------------------------------------------
# Weight penalties.
# --------------------------------------------------------------------------


def _params(seed):
  rng = _rng(seed)
  return {
      'conv': {'kernel': rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
      'bn': {'scale': rng.normal(size=(4,)).astype(np.float32),
             'bias': rng.normal(size=(4,)).astype(np.float32)},
  }


def test_l2():
  params = _params(0)
  expected = sum(np.sum(np.asarray(p, np.float64)**2)
                 for p in jax.tree.leaves(params))
  np.testing.assert_allclose(losses.l2(params), expected, rtol=RTOL)
  grads = jax.jit(jax.grad(losses.l2))(params)
  jax.tree.map(
      lambda g, p: np.testing.assert_allclose(g, 2 * p, rtol=RTOL), grads,
      params)


def test_l2_sp_value_and_grad():
  params, start = _params(0), _params(1)
  expected = sum(
      np.sum((np.asarray(p, np.float64) - np.asarray(p0, np.float64))**2)
      for p, p0 in zip(jax.tree.leaves(params), jax.tree.leaves(start)))
  np.testing.assert_allclose(losses.l2_sp(params, start), expected, rtol=RTOL)
  g_params, g_start = jax.jit(jax.grad(losses.l2_sp, argnums=(0, 1)))(
      params, start)
  # Gradient 2 (w - w0); the starting point is a constant.
  jax.tree.map(
      lambda g, p, p0: np.testing.assert_allclose(g, 2 * (p - p0), rtol=RTOL,
                                                  atol=1e-6),
      g_params, params, start)
  jax.tree.map(lambda g: np.testing.assert_array_equal(g, 0.0), g_start)
  # Zero at the starting point.
  assert float(losses.l2_sp(start, start)) == 0.0


def test_losses_are_jittable():
  teacher, student = _maps()
  attention = _attention(teacher)
  value = jax.jit(losses.afa_loss, static_argnums=3)(teacher, student,
                                                     attention, 'mean')
  np.testing.assert_allclose(value,
                             _np_afa(teacher, student, attention, 'mean'),
                             rtol=RTOL)
  logits = jnp.ones((2, 3))
  assert jax.jit(losses.kl_divergence)(logits, logits, 30.0).shape == ()
