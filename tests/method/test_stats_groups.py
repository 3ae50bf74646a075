"""Per-replica statistics (``config.stats_group_size``): step.apply_in_groups.

The reference is written here: each group of consecutive examples run through
the student on its own, as one ``nn.DataParallel`` replica of the authors'
two-GPU runs did, and the first group's BatchNorm update kept.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fmnist
from dtq_jax.method import step as step_lib
from test_step_regression import SHAPE
from test_step_regression import tiny_networks


def _setup(group_size=0, method='dtq'):
  config = fmnist.get_config('quick')
  config.method = method
  config.model_kwargs.widths = (4, 8, 8, 8)
  config.stats_group_size = group_size
  teacher, nets, params, batch_stats = tiny_networks(config)
  return config, nets, params, batch_stats, teacher


def _images(n, seed=0):
  return np.random.RandomState(seed).randn(n, *SHAPE).astype(np.float32)


def test_whole_batch_is_the_plain_call():
  calls = []

  def apply_fn(x, rng):
    calls.append((x, rng))
    return {'y': x * 2}, {'s': 1}

  x, key = jnp.ones((4, 2)), jax.random.PRNGKey(3)
  for size in (0, 4):
    out, state = step_lib.apply_in_groups(apply_fn, x, size, key)
    assert state == {'s': 1} and calls[-1][0] is x and calls[-1][1] is key
    np.testing.assert_array_equal(out['y'], x * 2)


def test_training_forward_is_each_group_on_its_own():
  _, nets, params, batch_stats, _ = _setup()
  images = jnp.asarray(_images(8))
  key = jax.random.PRNGKey(5)
  variables = {'params': params['backbone'], 'batch_stats': batch_stats}

  def apply_fn(x, rng):
    return nets.student.apply(variables, x, train=True,
                              mutable=['batch_stats'], rngs={'dropout': rng})

  # Compiled: op by op, most of the test's time went to compiling each
  # operation of the quantized network on its own.
  apply_fn = jax.jit(apply_fn)
  (logits, feats), state = jax.jit(step_lib.apply_in_groups, static_argnums=(
      0, 2))(apply_fn, images, 4, key)
  keys = jax.random.split(key, 2)
  halves = [apply_fn(images[i * 4:(i + 1) * 4], keys[i]) for i in range(2)]
  want_logits = jnp.concatenate([h[0][0] for h in halves])
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  for i, tap in enumerate(feats['taps']):
    want = jnp.concatenate([h[0][1]['taps'][i] for h in halves])
    np.testing.assert_allclose(tap, want, rtol=1e-5, atol=1e-5)
  # The first replica's BatchNorm update survives, as in nn.DataParallel.
  chex.assert_trees_all_close(state, halves[0][1], rtol=1e-5, atol=1e-6)
  # ... and it is not the whole batch's: grouping changed something.
  (whole_logits, _), whole = apply_fn(images, key)
  assert not np.allclose(whole_logits, logits, atol=1e-3)
  assert not np.allclose(jax.tree.leaves(whole)[0],
                         jax.tree.leaves(state)[0], atol=1e-6)


def test_groups_must_divide_the_batch():
  with pytest.raises(ValueError, match=r'config.stats_group_size=3 must '
                     r'divide the batch of 8'):
    step_lib.apply_in_groups(lambda x, r: (x, {}), jnp.zeros((8, 2)), 3)


def test_evaluation_pads_each_group_with_its_own_first_row():
  _, nets, params, batch_stats, _ = _setup()
  images = _images(8, seed=1)
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1], np.int32)
  mask = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.int32)
  eval_step = jax.jit(step_lib.make_eval_step(nets, stats_group_size=4))
  got = eval_step(params, batch_stats,
                  {'image': images, 'label': labels, 'mask': mask})
  # Reference: the first group as it is, the second reduced to its one real
  # image (copies of it leave its activation ranges unchanged).
  plain = jax.jit(step_lib.make_eval_step(nets))
  first = plain(params, batch_stats, {'image': images[:4],
                                      'label': labels[:4],
                                      'mask': np.ones(4, np.int32)})
  last = plain(params, batch_stats, {'image': images[4:5],
                                     'label': labels[4:5],
                                     'mask': np.ones(1, np.int32)})
  assert int(got['count']) == 5
  assert int(got['correct']) == int(first['correct']) + int(last['correct'])
  np.testing.assert_allclose(got['loss'], first['loss'] + last['loss'],
                             rtol=1e-5)


def test_train_step_with_groups_compiles_once_and_trains():
  config, nets, params, batch_stats, teacher = _setup(group_size=4)
  tx, _ = step_lib.make_optimizer(config, params, 'fc', 10, 3)
  state = step_lib.create_train_state(config, nets, params, batch_stats, tx,
                                      jax.random.PRNGKey(2), SHAPE)
  frozen = {'teacher': teacher}
  step = jax.jit(chex.assert_max_traces(
      step_lib.make_train_step(config, nets, tx), n=1))
  rng = np.random.RandomState(0)
  for _ in range(2):
    batch = {'image': rng.randn(8, *SHAPE).astype(np.float32),
             'label': rng.randint(0, 3, 8).astype(np.int32)}
    state, metrics = step(state, batch, frozen)
  assert bool(metrics['finite']) and int(state.step) == 2
