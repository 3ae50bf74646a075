"""Training with learned quantizers (quant.method='lsq', issue #27).

The DTQ step compiles once, the optimizer gives the learned steps their own
learning rate and no decay, the regularisers leave them out, runs at 2 and
3 bits train end to end with either quantizer, and an interrupted lsq run
resumes exactly (the steps are params: checkpointed, not started again).
"""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import fmnist
from dtq_jax import layers
from dtq_jax.data import input_pipeline
from dtq_jax.infra import errors
from dtq_jax.method import learned_params
from dtq_jax.method import losses
from dtq_jax.method import networks
from dtq_jax.method import step as step_lib
from dtq_jax.models import create_model
from dtq_jax.run import checkpoints
from dtq_jax.run import config_validation
from dtq_jax.run import experiment
from dtq_jax.run import teacher as teacher_lib

SHAPE = (28, 28, 1)


def _config(method='dtq', quantizer='lsq', bits=4):
  c = fmnist.get_config('quick')
  c.method = method
  c.quant.method = quantizer
  c.bits_w = c.bits_a = bits
  c.model_kwargs.widths = (4, 8, 8, 8)
  return c


def _learned_leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]
          if learned_params.is_learned(p)}


def _setup(config, batch=8, num_classes=3):
  """A started lsq student's TrainState, its step pieces and 3 batches."""
  teacher_model = create_model(config.model, num_classes=5,
                               **config.model_kwargs)
  teacher = networks.init_variables(teacher_model, jax.random.PRNGKey(0),
                                    SHAPE)
  nets = networks.build_networks(config, num_classes, 5)
  params, batch_stats = networks.init_params(nets, jax.random.PRNGKey(1),
                                             SHAPE, teacher)
  rng = np.random.RandomState(0)
  batches = [{'image': rng.randn(batch, *SHAPE).astype(np.float32),
              'label': rng.randint(0, num_classes, batch).astype(np.int32)}
             for _ in range(3)]
  if learned_params.uses_learned_quant(config):
    params['backbone'] = learned_params.init_learned_quant(
        nets.student, {'params': params['backbone'],
                       'batch_stats': batch_stats},
        batches[0]['image'])['params']
  tx, _ = step_lib.make_optimizer(config, params, 'fc', 10, 3)
  state = step_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params), rng=jax.random.PRNGKey(2),
      nonfinite_steps=jnp.zeros((), jnp.int32))
  frozen = {'teacher': teacher, 'delta_weights': [
      jnp.full((c,), 1.0 / c) for c in config.model_kwargs.widths]}
  return nets, tx, state, batches, frozen


def test_lsq_dtq_step_compiles_once_and_learns_the_steps():
  chex.clear_trace_counter()
  config = _config('dtq')
  nets, tx, state, batches, frozen = _setup(config)
  start = _learned_leaves(state.params)
  # Every quantized convolution of the demo ResNet (all but the stem) reads
  # a ReLU's output: a weight step and an unsigned input step, no offset;
  # the stem stays float.
  assert len(start) == 2 * 11
  assert set(state.params['backbone']['conv1']) == {'kernel'}
  ranges = learned_params.learned_ranges(state.params['backbone'], 4, 4)
  assert len(ranges) == 11
  assert all(float(r['input'][0]) == 0.0 for r in ranges.values())
  step = jax.jit(chex.assert_max_traces(
      step_lib.make_train_step(config, nets, tx), n=1), donate_argnums=(0,))
  for batch in batches:
    state, metrics = step(state, batch, frozen)
  assert int(state.step) == 3 and bool(metrics['finite'])
  assert {k for k in metrics if k.startswith('loss_')} == {
      'loss_ce', 'loss_kl', 'loss_afa'}
  end = _learned_leaves(state.params)
  assert set(end) == set(start)
  assert all(np.all(np.isfinite(v)) for v in end.values())
  moved = [k for k in start if not np.array_equal(start[k], end[k])]
  assert len(moved) >= len(start) // 2, moved


def test_optimizer_gives_learned_params_their_lr_and_no_decay():
  config = _config('ft')
  config.quant.lsq_lr_scale = 0.5
  config.optim.head_weight_decay = 0.1
  _, tx, state, _, _ = _setup(config)
  params = state.params
  labels = step_lib._labels(params, 'fc')  # pylint: disable=protected-access
  flat = jax.tree_util.tree_flatten_with_path(labels)[0]
  assert {l for p, l in flat if learned_params.is_learned(p)} == {'quant'}
  assert {l for p, l in flat if not learned_params.is_learned(p)} == {
      'train', 'frozen'}
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(ones, tx.init(params), params)
  conv = updates['backbone']['layer1_0']['conv1']
  lr = config.optim.lr
  np.testing.assert_allclose(conv['kernel'], -lr, rtol=1e-6)
  for name in (layers.STEP_W, layers.STEP_A):
    np.testing.assert_allclose(conv[name], -0.5 * lr, rtol=1e-6)
  # No decay: a zero gradient moves no learned parameter (the head's decay
  # moves the head).
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert not any(np.any(v) for v in _learned_leaves(updates).values())
  assert np.any(updates['head']['fc']['kernel'])


def test_minmax_optimizer_state_keeps_its_layout():
  config = _config('ft', quantizer='minmax')
  _, tx, state, _, _ = _setup(config)
  assert not _learned_leaves(state.params)
  assert set(tx.init(state.params).inner_states) == {'train', 'frozen'}


def test_l2sp_leaves_the_learned_params_out():
  config = _config('l2sp')
  nets, _, state, batches, frozen = _setup(config)
  _, (terms, _, _) = step_lib.compute_losses(
      config, nets, state.params, state.batch_stats, batches[0]['image'],
      batches[0]['label'], frozen, jax.random.PRNGKey(0))
  extractor = {k: v for k, v in learned_params.without_learned(
      state.params['backbone']).items() if k != 'fc'}
  start = {k: v for k, v in frozen['teacher']['params'].items() if k != 'fc'}
  # At the start the weights are the pretrained ones: no L2-SP distance.
  np.testing.assert_allclose(
      terms['l2sp'], config.l2sp.alpha / 2 * losses.l2_sp(extractor, start),
      atol=1e-12)
  assert float(terms['l2sp']) == 0.0


def test_config_validation_of_the_quantizer():
  config = _config('dtq')
  config.dataset.data_dir = ''
  config_validation.validate(config, device_count=1)
  config.quant.method = 'pact'
  config_validation.validate(config, device_count=1)
  config.quant.method = 'bogus'
  with pytest.raises(errors.ConfigError, match=r'^config\.quant\.method='
                     r"'bogus' is invalid; allowed: minmax, lsq, pact\.$"):
    config_validation.validate(config, device_count=1)
  for fused in (True, False):
    # A kernel choice of the min-max quantizer's gradient, unused here.
    config = _config('dtq')
    config.quant.fused_vjp = fused
    config_validation.validate(config, device_count=1)
  for field, value in (('act_ranges', 'static'), ('range_grad', False)):
    config = _config('dtq')
    config.quant[field] = value
    with pytest.raises(errors.ConfigError, match=f'quant.{field}'):
      config_validation.validate(config, device_count=1)
  config = _config('dtq')
  config.quant.quantize_dense = True  # A user's Dense: min-max only.
  with pytest.raises(errors.ConfigError, match='quant.quantize_dense'):
    config_validation.validate(config, device_count=1)
  config = _config('dtq')
  config.quant.lsq_lr_scale = 0.0
  with pytest.raises(errors.ConfigError, match='quant.lsq_lr_scale'):
    config_validation.validate(config, device_count=1)
  assert fmnist.get_config('quick,2bit').bits_w == 2
  assert fmnist.get_config('quick,3bit').bits_a == 3


def test_the_quantizer_shares_the_demo_teacher():
  base = fmnist.get_config('quick')
  config = fmnist.get_config('quick')
  config.quant.method = 'lsq'
  config.quant.lsq_lr_scale = 0.1
  keys = [teacher_lib._teacher_key(  # pylint: disable=protected-access
      teacher_lib.teacher_config(c), c.dataset) for c in (base, config)]
  assert keys[0] == keys[1]
  assert 'method' not in teacher_lib.teacher_config(config).quant
  # Nor does the device prefetch (a speed setting) change the teacher.
  config.prefetch_batches = 3
  assert 'prefetch_batches' not in teacher_lib.teacher_config(config)


# lsq at 2 bits runs end to end in the resume test below.
@pytest.mark.parametrize('quantizer,bits', [('minmax', '2bit'),
                                            ('minmax', '3bit'),
                                            ('lsq', '3bit')])
def test_two_and_three_bits_train_one_step_end_to_end(tiny_folder, tmp_path,
                                                      quantizer, bits):
  root, tiny_config = tiny_folder
  config = tiny_config(root, f'quick,dtq,{bits}')
  config.quant.method = quantizer
  config.steps_per_epoch = 1
  summary = experiment.run(config_validation.validate(config),
                           str(tmp_path / 'run'))
  assert summary['final_test_accuracy'] >= 0
  state, step = checkpoints.restore_state(str(tmp_path / 'run' / 'seed_1'))
  assert step == 1
  learned = _learned_leaves(state['params'])
  assert bool(learned) == (quantizer == 'lsq')
  assert all(np.all(np.isfinite(v)) for v in learned.values())


def test_interrupted_lsq_run_resumes_exactly(tiny_folder, tmp_path,
                                             monkeypatch):
  root, tiny_config = tiny_folder
  config = tiny_config(root, 'quick,dtq,2bit')
  config.quant.method = 'lsq'
  config.checkpoint_every_steps = 1
  config = config_validation.validate(config)
  starts = []
  original_init = learned_params.init_learned_quant

  def counted_init(*args, **kwargs):
    started = original_init(*args, **kwargs)
    # A host copy: the train step donates (deletes) the state's buffers.
    starts.append(jax.device_get(started['params']))
    return started

  monkeypatch.setattr(learned_params, 'init_learned_quant', counted_init)
  full = experiment.run(config, str(tmp_path / 'full'))
  assert len(starts) == 1

  original = input_pipeline.train_batches

  def crash_after_two_steps(*args, **kwargs):
    for i, batch in enumerate(original(*args, **kwargs)):
      if i == 2:
        raise KeyboardInterrupt('simulated crash')
      yield batch

  monkeypatch.setattr(input_pipeline, 'train_batches', crash_after_two_steps)
  workdir = str(tmp_path / 'resumed')
  with pytest.raises(KeyboardInterrupt):
    experiment.run(config, workdir)
  assert len(starts) == 2
  monkeypatch.setattr(input_pipeline, 'train_batches', original)
  resumed = experiment.run(config, workdir)
  # The resume restored the steps; it did not start them again.
  assert len(starts) == 2
  for key in ('final_test_accuracy', 'best_test_accuracy'):
    assert resumed[key] == full[key]
  a, step_a = checkpoints.restore_state(str(tmp_path / 'full' / 'seed_1'))
  b, step_b = checkpoints.restore_state(os.path.join(workdir, 'seed_1'))
  assert step_a == step_b == 3
  learned = _learned_leaves(a['params'])
  assert len(learned) == 2 * 11
  chex.assert_trees_all_equal(a['params'], b['params'])
  chex.assert_trees_all_equal(a['opt_state'], b['opt_state'])
  # The checkpoint holds the trained steps, not the starts.
  start = _learned_leaves({'backbone': starts[0]})
  assert set(start) == set(learned)
  assert any(not np.array_equal(v, learned[k]) for k, v in start.items())
