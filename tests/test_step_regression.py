"""The train and eval steps' numbers, recorded before the #15 refactor.

Three steps of every method on the demo network (4-8 channels, random
batches) give these loss terms and evaluation sums. They were recorded with
the code before train.py was split into networks/step/checkpoints/runtime
(commit a2a479a), where they agreed bit for bit with the split code; the test
keeps any later change that moves them beyond float32 rounding from passing
unnoticed. A change meant to move them (a new default) updates the table and
says why in its commit.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fmnist
from dtq_jax import networks
from dtq_jax import step as step_lib
from dtq_jax.models import create_model

# method -> {metric after step 3 (or 'eval/...' after it): value}.
RECORDED = {
    'fp': {'loss': 1.1330130100250244, 'loss_ce': 1.1330130100250244,
           'eval/correct': 5, 'eval/loss': 6.486326217651367},
    'ft': {'loss': 1.1144392490386963, 'loss_ce': 1.1144392490386963,
           'eval/correct': 4, 'eval/loss': 6.4721150398254395},
    'l2': {'loss': 2.2797839641571045, 'loss_ce': 1.1144256591796875,
           'loss_head_l2': 0.006944610737264156,
           'loss_l2': 1.1584136486053467,
           'eval/correct': 4, 'eval/loss': 6.458534240722656},
    'l2sp': {'loss': 1.121392846107483, 'loss_ce': 1.1144298315048218,
             'loss_head_l2': 0.006944610737264156,
             'loss_l2sp': 1.841015910031274e-05,
             'eval/correct': 4, 'eval/loss': 6.466739654541016},
    'delta': {'loss': 1.8836517333984375, 'loss_ce': 1.1204102039337158,
              'loss_delta': 0.7562967538833618,
              'loss_head_l2': 0.00694474158808589,
              'eval/correct': 5, 'eval/loss': 6.37158727645874},
    'dtq': {'loss': 2.1223678588867188, 'loss_afa': 0.9731682538986206,
            'loss_ce': 1.1241989135742188, 'loss_kl': 0.025000739842653275,
            'eval/correct': 4, 'eval/loss': 6.572885513305664},
}


def _three_steps(method, static=False):
  config = fmnist.get_config('quick')
  config.method = method
  config.model_kwargs.widths = (4, 8, 8, 8)
  if static:
    config.quant.act_ranges = 'static'
  shape = (28, 28, 1)
  teacher = dict(create_model(config.model, num_classes=5,
                              **config.model_kwargs).init(
                                  jax.random.PRNGKey(0),
                                  jnp.zeros((1,) + shape)))
  nets = networks.build_networks(config, 3, 5)
  params, batch_stats = networks.init_params(nets, jax.random.PRNGKey(1),
                                             shape, teacher)
  tx, _ = step_lib.make_optimizer(config, params, 'fc', 10, 3)
  state = step_lib.create_train_state(config, nets, params, batch_stats, tx,
                                      jax.random.PRNGKey(2), shape)
  assert hasattr(state, 'quant_ranges') == static
  frozen = {'teacher': teacher, 'delta_weights': [
      jnp.full((w,), 1.0 / w) for w in config.model_kwargs.widths]}
  rng = np.random.RandomState(0)
  train_step = jax.jit(step_lib.make_train_step(config, nets, tx))
  for _ in range(3):
    batch = {'image': rng.randn(8, *shape).astype(np.float32),
             'label': rng.randint(0, 3, 8).astype(np.int32)}
    state, metrics = train_step(state, batch, frozen)
  out = {k: float(v) for k, v in metrics.items() if k.startswith('loss')}
  batch = {'image': rng.randn(8, *shape).astype(np.float32),
           'label': rng.randint(0, 3, 8).astype(np.int32),
           'mask': np.array([1] * 6 + [0] * 2, np.int32)}
  sums = jax.jit(step_lib.make_eval_step(nets))(state.params,
                                                state.batch_stats, batch)
  out['eval/correct'] = int(sums['correct'])
  out['eval/loss'] = float(sums['loss'])
  return out


@pytest.mark.parametrize('method', sorted(RECORDED))
def test_three_steps_give_the_recorded_numbers(method):
  got = _three_steps(method)
  assert set(got) == set(RECORDED[method])
  for key, want in RECORDED[method].items():
    np.testing.assert_allclose(got[key], want, rtol=2e-6, err_msg=key)


def test_static_ranges_leave_training_as_it_was():
  # Keeping the ranges changes nothing in training (the paper's dynamic
  # quantization), nor in the dynamic-range evaluation.
  got = _three_steps('dtq', static=True)
  for key, want in RECORDED['dtq'].items():
    np.testing.assert_allclose(got[key], want, rtol=2e-6, err_msg=key)
