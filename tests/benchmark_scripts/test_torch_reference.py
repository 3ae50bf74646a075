"""benchmarks/torch_reference.py's quantizer computes dtq_jax.quant's maths.

The PyTorch reference is the anchor of the README's speed claims, written as
leanly as the authors' code (a rounding autograd.Function, one clamp, min/max
in the graph); these tests pin that lean does not mean different: forward
values and gradients (the range term of the min/max elements, ties, constant
tensors) equal ``dtq_jax.quant.fake_quant``'s. They need torch (skipped
without it; ``make test-torch`` runs them in .venv-torch).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dtq_jax import quant

torch = pytest.importorskip('torch')
pytest.importorskip('torchvision')

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))), 'benchmarks'))
import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position


def _tensors():
  """Named float32 test tensors: plain, ReLU'd (tied minima), tied maxima."""
  rng = np.random.default_rng(0)
  plain = rng.normal(size=(4, 8, 5, 5)).astype(np.float32)
  relu = np.maximum(plain, 0)  # about half the elements tie for the min
  tied_max = plain.copy()
  tied_max.flat[[3, 50, 700]] = plain.max() + 1.0
  weight = (0.05 * rng.normal(size=(16, 8, 3, 3))).astype(np.float32)
  return {'plain': plain, 'relu': relu, 'tied_max': tied_max,
          'weight': weight}


def _torch_value_and_grad(x, g, bits):
  xt = torch.tensor(x, requires_grad=True)
  q = torch_reference.fake_quant(xt, bits)
  (q * torch.tensor(g)).sum().backward()
  return q.detach().numpy(), xt.grad.numpy()


def _jax_value_and_grad(x, g, bits):
  q, vjp = jax.vjp(lambda v: quant.fake_quant(v, bits), jnp.asarray(x))
  return np.asarray(q), np.asarray(vjp(jnp.asarray(g))[0])


def _method_gradient(x, g, bits):
  """docs/method.md's gradient in closed form (float64).

  With u = (x - lo) / s, n = 2**bits - 1 and t = sum(g * (round(u) - u)):
  dx = g + t / n * ([x == hi] / #(x == hi) - [x == lo] / #(x == lo)).
  """
  lo, hi = x.min(), x.max()
  n = 2**bits - 1
  u = (x - lo) / ((hi - lo) / n)
  t = np.sum(g * (np.round(u) - u))
  is_hi, is_lo = x == hi, x == lo
  return g + t / n * (is_hi / is_hi.sum() - is_lo / is_lo.sum())


@pytest.mark.parametrize('bits', [2, 4, 5, 8])
@pytest.mark.parametrize('name', ['plain', 'relu', 'tied_max', 'weight'])
def test_gradient_is_method_md_in_float64(name, bits):
  x = _tensors()[name].astype(np.float64)
  g = np.random.default_rng(1).normal(size=x.shape)
  _, dx = _torch_value_and_grad(x, g, bits)
  np.testing.assert_allclose(dx, _method_gradient(x, g, bits), rtol=1e-12,
                             atol=1e-12)
  # Not the plain straight-through estimator: the min and max elements get
  # the range term on top of g.
  extremes = (x == x.min()) | (x == x.max())
  assert np.abs(dx[extremes] - g[extremes]).max() > 1e-4


@pytest.mark.parametrize('bits', [2, 4, 5, 8])
@pytest.mark.parametrize('name', ['plain', 'relu', 'tied_max', 'weight'])
def test_values_and_gradients_equal_dtq_jax(name, bits):
  x = _tensors()[name]
  g = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
  q_t, dx_t = _torch_value_and_grad(x, g, bits)
  q_j, dx_j = _jax_value_and_grad(x, g, bits)
  step = (x.max() - x.min()) / (2**bits - 1)
  np.testing.assert_allclose(q_t, q_j, rtol=0, atol=1e-6 * step)
  assert len(np.unique(q_t)) <= 2**bits
  extremes = (x == x.min()) | (x == x.max())
  # The others get g (times s / s: float32 rounding).
  np.testing.assert_allclose(dx_t[~extremes], dx_j[~extremes], rtol=1e-6)
  # The range term is a difference of two sums of the tensor's size in both
  # frameworks (autodiff through s), in another order: float32 cancellation.
  np.testing.assert_allclose(dx_t[extremes], dx_j[extremes], rtol=0,
                             atol=1e-4)


def test_constant_tensor_is_returned_with_identity_gradient():
  x = np.full((3, 4), 0.7, np.float32)
  g = np.arange(12, dtype=np.float32).reshape(3, 4)
  q_t, dx_t = _torch_value_and_grad(x, g, 4)
  q_j, dx_j = _jax_value_and_grad(x, g, 4)
  np.testing.assert_array_equal(q_t, x)
  np.testing.assert_array_equal(q_t, q_j)
  np.testing.assert_array_equal(dx_t, g)
  np.testing.assert_array_equal(dx_t, dx_j)


def test_full_precision_is_the_identity():
  x = torch.randn(5)
  assert torch_reference.fake_quant(x, torch_reference.FULL_PRECISION) is x
