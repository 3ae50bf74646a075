"""Tests for dtq_jax.method.attention: the channel-attention module of AFA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtq_jax.method import attention
from dtq_jax.method import losses


def _map(shape=(3, 4, 4, 6), seed=0):
  # NumPy, not jax.random: eager jax.random compiles one program per shape.
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


def np_attention(teacher_map, w1, w2, bias):
  """Reference forward of docs/method.md with NumPy.

  Args:
    teacher_map: (B, H, W, C) map (NHWC, as the models produce).
    w1: (H*W, h) first weight.
    w2: (h, 1) second weight.
    bias: (C,) bias.

  Returns:
    (B, C) softmax(relu(z @ W1) @ W2 + b) over C, z = F as (B, C, H*W) with
    the positions in row-major (h, w) order.
  """
  f = np.asarray(teacher_map, np.float64)
  b, h, w, c = f.shape
  z = np.transpose(f, (0, 3, 1, 2)).reshape(b, c, h * w)
  z = np.maximum(z @ w1, 0.0) @ w2
  z = z[..., 0] + bias
  z = z - z.max(axis=-1, keepdims=True)
  return np.exp(z) / np.sum(np.exp(z), axis=-1, keepdims=True)


def _params(h, w, c, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return {
      'fc1': {'kernel': (scale * rng.normal(size=(h * w, h))).astype(
          np.float32)},
      'fc2': {'kernel': (scale * rng.normal(size=(h, 1))).astype(np.float32)},
      'bias': rng.normal(size=(c,)).astype(np.float32),
  }


def _init(module, *args):
  # Jitted: Flax's eager initialisers compile one program per primitive and
  # shape, which is slow on a small CPU.
  return jax.jit(module.init)(jax.random.key(0), *args)


@pytest.mark.parametrize('shape', [(3, 4, 4, 6), (2, 7, 7, 10), (2, 3, 5, 4)])
def test_param_names_and_shapes(shape):
  _, h, w, c = shape
  params = _init(attention.ChannelAttention(), _map(shape))['params']
  assert jax.tree.map(jnp.shape, params) == {
      'fc1': {'kernel': (h * w, h)},
      'fc2': {'kernel': (h, 1)},
      'bias': (c,),
  }
  np.testing.assert_array_equal(params['bias'], 0.0)
  # PyTorch's nn.Linear initialisation: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
  assert np.max(np.abs(params['fc1']['kernel'])) <= 1 / np.sqrt(h * w)
  assert np.max(np.abs(params['fc2']['kernel'])) <= 1 / np.sqrt(h)


def test_weights_sum_to_one_over_channels():
  x = _map()
  module = attention.ChannelAttention()
  variables = _init(module, x)
  a = module.apply(variables, x)
  assert a.shape == (3, 6)
  assert a.dtype == jnp.float32
  assert np.all(np.asarray(a) > 0)
  np.testing.assert_allclose(np.sum(a, axis=-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize('shape', [(3, 4, 4, 6), (2, 3, 5, 4)])
def test_matches_numpy_reference(shape):
  x = _map(shape)
  _, h, w, c = shape
  params = _params(h, w, c)
  a = attention.ChannelAttention().apply({'params': params}, x)
  np.testing.assert_allclose(
      a, np_attention(x, params['fc1']['kernel'], params['fc2']['kernel'],
                      params['bias']), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('row,col', [(0, 3), (2, 1), (1, 4)])
def test_positions_flattened_row_major(row, col):
  # W1 picks exactly one position, p = row * W + col; then z[b, c] is the
  # map's value there and the weights are softmax(F[:, row, col, :]).
  h, w, c = 3, 5, 4
  x = jnp.abs(_map((2, h, w, c))) + 0.1  # Positive: the relu is inactive.
  w1 = np.zeros((h * w, h), np.float32)
  w1[row * w + col, 0] = 1.0
  w2 = np.zeros((h, 1), np.float32)
  w2[0, 0] = 1.0
  params = {'fc1': {'kernel': w1}, 'fc2': {'kernel': w2},
            'bias': np.zeros((c,), np.float32)}
  a = attention.ChannelAttention().apply({'params': params}, x)
  picked = np.asarray(x[:, row, col, :], np.float64)
  expected = np.exp(picked) / np.sum(np.exp(picked), axis=-1, keepdims=True)
  np.testing.assert_allclose(a, expected, rtol=1e-5)


def test_bias_shifts_weights():
  x = _map()
  # Small weights, so that the weights without bias are far from one-hot.
  params = _params(4, 4, 6, scale=0.2)
  params['bias'] = np.zeros((6,), np.float32)
  module = attention.ChannelAttention()
  a0 = np.asarray(module.apply({'params': params}, x), np.float64)
  assert np.max(a0) < 0.9
  c, shift = 2, 5.0
  params['bias'] = np.zeros((6,), np.float32)
  params['bias'][c] = shift
  a1 = np.asarray(module.apply({'params': params}, x), np.float64)
  # softmax(z + b): channel c is scaled by e^b, then renormalised.
  scaled = a0 * np.where(np.arange(6) == c, np.exp(shift), 1.0)
  np.testing.assert_allclose(a1, scaled / scaled.sum(-1, keepdims=True),
                             rtol=1e-5)
  assert np.all(a1[:, c] > a0[:, c])
  others = np.arange(6) != c
  assert np.all(a1[:, others] < a0[:, others])
  # A large bias makes channel c take nearly all the weight.
  params['bias'][c] = 50.0
  a2 = module.apply({'params': params}, x)
  np.testing.assert_allclose(a2[:, c], 1.0, rtol=1e-6)


def test_no_gradient_into_teacher_map():
  x = _map()
  params = _params(4, 4, 6)
  g_x = jax.jit(jax.grad(lambda x: jnp.sum(
      attention.ChannelAttention().apply({'params': params}, x)[:, 0])))(x)
  np.testing.assert_array_equal(g_x, 0.0)


def test_transfer_attention_modules_and_gradient_from_afa():
  maps = [_map((2, 4, 4, 3), 0), _map((2, 2, 2, 5), 1), _map((2, 2, 2, 4), 2),
          _map((2, 1, 1, 6), 3)]
  students = [m + 0.5 * _map(m.shape, 10 + i) for i, m in enumerate(maps)]
  module = attention.TransferAttention()
  params = _init(module, maps)['params']
  assert sorted(params) == [f'attention_{i}' for i in range(4)]
  for i, m in enumerate(maps):
    _, h, w, c = m.shape
    assert params[f'attention_{i}']['fc1']['kernel'].shape == (h * w, h)
    assert params[f'attention_{i}']['bias'].shape == (c,)
  weights = jax.jit(module.apply)({'params': params}, maps)
  assert [a.shape for a in weights] == [(2, m.shape[-1]) for m in maps]

  # The attention is trained on the total loss: AFA gives it gradient.
  def loss(params):
    return losses.afa_loss(maps, students,
                           module.apply({'params': params}, maps))

  grads = jax.jit(jax.grad(loss))(params)
  for i in range(4):
    assert np.any(np.asarray(grads[f'attention_{i}']['bias']) != 0)


def test_uniform_gives_one_over_c_and_no_params():
  maps = [_map((2, 4, 4, 3)), _map((2, 2, 2, 8))]
  module = attention.TransferAttention(uniform=True)
  variables = module.init(jax.random.key(0), maps)
  assert not jax.tree.leaves(variables)  # Nothing to train or to save.
  weights = module.apply(variables, maps)
  for a, m in zip(weights, maps):
    assert a.shape == (2, m.shape[-1])
    np.testing.assert_allclose(a, 1.0 / m.shape[-1], rtol=1e-7)


def test_attention_entropy():
  for c in (3, 8, 2048):
    uniform = jnp.full((4, c), 1.0 / c)
    np.testing.assert_allclose(attention.attention_entropy(uniform),
                               np.log(c), rtol=1e-5)
  one_hot = jax.nn.one_hot(jnp.array([0, 2]), 5)
  np.testing.assert_allclose(attention.attention_entropy(one_hot), 0.0,
                             atol=1e-6)
  p = np.array([[0.5, 0.25, 0.25], [0.7, 0.2, 0.1]])
  expected = -np.mean(np.sum(p * np.log(p), axis=-1))
  np.testing.assert_allclose(attention.attention_entropy(p), expected,
                             rtol=1e-5)
