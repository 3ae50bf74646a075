"""Tests of the train step: losses per method, one compile, mesh equivalence."""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fmnist
from dtq_jax.method import losses
from dtq_jax.method import networks
from dtq_jax.method import step as step_lib
from dtq_jax.models import create_model
from dtq_jax.run import runtime as runtime_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(method='dtq', **overrides):
  c = fmnist.get_config('quick')
  c.method = method
  c.model_kwargs.widths = (4, 8, 8, 8)
  for k, v in overrides.items():
    c[k] = v
  return c


def _setup(config, batch=8, num_classes=3, runtime=None):
  runtime = runtime or runtime_lib.Runtime()
  teacher_model = create_model(config.model, num_classes=5,
                               **config.model_kwargs)
  images = jnp.zeros((1, 28, 28, 1))
  teacher = dict(teacher_model.init(jax.random.PRNGKey(0), images))
  nets = networks.build_networks(config, num_classes, 5)
  params, batch_stats = networks.init_params(nets, jax.random.PRNGKey(1),
                                          (28, 28, 1), teacher)
  tx, _ = step_lib.make_optimizer(config, params, 'fc', 10, 3)
  state = step_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params), rng=jax.random.PRNGKey(2),
      nonfinite_steps=jnp.zeros((), jnp.int32))
  rng = np.random.RandomState(0)
  batches = [{'image': rng.randn(batch, 28, 28, 1).astype(np.float32),
              'label': rng.randint(0, num_classes, batch).astype(np.int32)}
             for _ in range(3)]
  frozen = {'teacher': teacher, 'delta_weights': [
      jnp.full((c,), 1.0 / c) for c in config.model_kwargs.widths]}
  return nets, tx, runtime.replicate(state), batches, runtime.replicate(
      frozen), runtime


@pytest.mark.parametrize('method', ['fp', 'ft', 'l2', 'l2sp', 'delta', 'dtq'])
def test_step_runs_and_compiles_once(method):
  chex.clear_trace_counter()  # The counter is keyed by the step's code.
  config = _config(method)
  nets, tx, state, batches, frozen, runtime = _setup(config)
  step = jax.jit(chex.assert_max_traces(
      step_lib.make_train_step(config, nets, tx), n=1), donate_argnums=(0,))
  for batch in batches:
    state, metrics = step(state, runtime.put_batch(batch), frozen)
  assert int(state.step) == 3
  assert bool(metrics['finite'])
  expected = {'fp': {'ce'}, 'ft': {'ce'}, 'l2': {'ce', 'l2', 'head_l2'},
              'l2sp': {'ce', 'l2sp', 'head_l2'},
              'delta': {'ce', 'delta', 'head_l2'}, 'dtq': {'ce', 'kl', 'afa'}}
  assert {k[5:] for k in metrics if k.startswith('loss_')} == expected[method]
  np.testing.assert_allclose(
      metrics['loss'],
      sum(v for k, v in metrics.items() if k.startswith('loss_')), rtol=1e-5)


def test_dtq_total_loss_matches_formula():
  config = _config('dtq')
  nets, _, state, batches, frozen, _ = _setup(config)
  state = jax.device_get(state)
  batch = batches[0]
  total, (terms, _, aux) = step_lib.compute_losses(
      config, nets, state.params, state.batch_stats, batch['image'],
      batch['label'], jax.device_get(frozen), jax.random.PRNGKey(0))
  t_logits, t_feats = nets.teacher.apply(frozen['teacher'], batch['image'])
  (s_logits, s_feats), _ = nets.student.apply(
      {'params': state.params['backbone'], 'batch_stats': state.batch_stats},
      batch['image'], train=True, mutable=['batch_stats'])
  c = config.dtq
  expected = (losses.cross_entropy(aux['logits'], batch['label']) +
              c.kl_weight * losses.kl_divergence(s_logits, t_logits,
                                                 c.temperature) +
              c.afa_weight * losses.afa_loss(t_feats['taps'], s_feats['taps'],
                                             aux['attention']))
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  assert set(terms) == {'ce', 'kl', 'afa'}


def test_source_classifier_and_teacher_stay_frozen():
  config = _config('dtq')
  nets, tx, state, batches, frozen, runtime = _setup(config)
  fc0 = jax.device_get(state.params['backbone']['fc'])
  conv0 = jax.device_get(state.params['backbone']['layer1_0']['conv1'])
  step = jax.jit(step_lib.make_train_step(config, nets, tx))
  for batch in batches:
    state, _ = step(state, runtime.put_batch(batch), frozen)
  chex.assert_trees_all_equal(jax.device_get(state.params['backbone']['fc']),
                              fc0)
  assert not np.allclose(
      state.params['backbone']['layer1_0']['conv1']['kernel'],
      conv0['kernel'])
  assert 'attention' in state.params


def test_nonfinite_step_is_skipped_and_counted():
  config = _config('ft')
  nets, tx, state, batches, frozen, runtime = _setup(config)
  step = jax.jit(step_lib.make_train_step(config, nets, tx))
  before = jax.device_get(state.params)
  bad = dict(batches[0], image=np.full_like(batches[0]['image'], np.nan))
  state, metrics = step(state, runtime.put_batch(bad), frozen)
  assert not bool(metrics['finite'])
  assert int(state.nonfinite_steps) == 1
  chex.assert_trees_all_equal(jax.device_get(state.params), before)


def test_head_weight_decay_only_on_head():
  config = _config('ft')
  nets, tx, state, _, _, _ = _setup(config)
  params = jax.device_get(state.params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  lr = config.optim.lr
  np.testing.assert_allclose(updates['head']['fc']['kernel'],
                             -lr * 1e-4 * params['head']['fc']['kernel'],
                             rtol=1e-6)
  assert not np.any(updates['backbone']['layer1_0']['conv1']['kernel'])


def test_eight_devices_match_one_device():
  # Runs in a subprocess: the device count is fixed when jax starts.
  script = textwrap.dedent('''
      import jax, numpy as np
      import tests.method.test_step as t
      from dtq_jax.run import runtime as runtime_lib
      from dtq_jax.method import step as step_lib
      assert jax.device_count() == 8, jax.devices()
      out = {}
      for n in (1, 8):
        config = t._config('dtq')
        rt = runtime_lib.Runtime(jax.devices()[:n])
        nets, tx, state, batches, frozen, rt = t._setup(config, runtime=rt)
        step = rt.jit_train_step(step_lib.make_train_step(config, nets, tx))
        losses = []
        for batch in batches:
          state, m = step(state, rt.put_batch(batch), frozen)
          losses.append(float(m['loss']))
        out[n] = (losses, jax.device_get(state.params))
      np.testing.assert_allclose(out[1][0], out[8][0], rtol=1e-4)
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3,
                                                           atol=1e-5),
                   out[1][1], out[8][1])
      print('OK', out[1][0])
  ''')
  # The suite's XLA flags (the Makefile's), then 8 host devices.
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=(
      os.environ.get('XLA_FLAGS', '') +
      ' --xla_force_host_platform_device_count=8').strip())
  proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'OK' in proc.stdout


def test_compiler_options_pick_eigen_convolutions_on_cpu_only():
  config = _config()
  assert config.cpu_convolutions == 'eigen'
  options = runtime_lib.compiler_options(config, backend='cpu')
  assert options == {'xla_cpu_experimental_ynn_fusion_type':
                     'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,'
                     'LIBRARY_FUSION_TYPE_REDUCE'}
  assert runtime_lib.compiler_options(config, backend='gpu') is None
  assert runtime_lib.compiler_options(config, backend='tpu') is None
  config.cpu_convolutions = 'jaxlib_default'
  assert runtime_lib.compiler_options(config, backend='cpu') is None
  config.cpu_convolutions = 'onednn'
  with pytest.raises(ValueError, match='cpu_convolutions'):
    runtime_lib.compiler_options(config, backend='cpu')


def _conv(x, k):
  return jax.lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU options')
def test_eigen_convolutions_keep_ynnpack_dots_and_reductions():
  x, k = jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32))
  a = jnp.ones((256, 256))
  library = {}
  for choice in ('eigen', 'jaxlib_default'):
    rt = runtime_lib.Runtime(compiler_options=runtime_lib.compiler_options(
        _config(cpu_convolutions=choice)))
    library[choice] = [
        '__ynn_fusion' in rt.jit(f).lower(*args).compile().as_text()
        for f, args in ((_conv, (x, k)), (jnp.matmul, (a, a)),
                        (jnp.max, (a,)))]
  # jaxlib 0.10 sends all three to YNNPACK; 'eigen' takes convolutions only.
  assert library['jaxlib_default'] == [True, True, True]
  assert library['eigen'] == [False, True, True]


def test_cpu_convolution_choices_train_alike():
  out = {}
  for choice in ('eigen', 'jaxlib_default'):
    config = _config('dtq', cpu_convolutions=choice)
    rt = runtime_lib.Runtime(
        compiler_options=runtime_lib.compiler_options(config))
    nets, tx, state, batches, frozen, rt = _setup(config, runtime=rt)
    state, metrics = rt.jit_train_step(
        step_lib.make_train_step(config, nets, tx))(
        state, rt.put_batch(batches[0]), frozen)
    out[choice] = (float(metrics['loss']), jax.device_get(state.params))
  np.testing.assert_allclose(out['eigen'][0], out['jaxlib_default'][0],
                             rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               out['eigen'][1], out['jaxlib_default'][1])


# ---------------------------------------------------------------------------
# Opt-in attention switches and MobileNetV2's shared dropout mask.


def _losses_and_grads(config, nets, state, batch, frozen):
  fn = jax.value_and_grad(
      lambda p: step_lib.compute_losses(
          config, nets, p, state.batch_stats, batch['image'], batch['label'],
          frozen, jax.random.PRNGKey(0)), has_aux=True)
  (total, (terms, _, aux)), grads = jax.jit(fn)(state.params)
  return total, terms, aux, grads


def _dtq_setup():
  config = _config('dtq')
  nets, _, state, batches, frozen, _ = _setup(config)
  return config, nets, jax.device_get(state), batches[0], jax.device_get(
      frozen)


def test_attention_switches_at_defaults_change_nothing():
  config, nets, state, batch, frozen = _dtq_setup()
  assert config.dtq.attention == 'learned'
  assert config.dtq.attention_entropy_weight == 0
  total, terms, aux, grads = _losses_and_grads(config, nets, state, batch,
                                               frozen)
  assert set(terms) == {'ce', 'kl', 'afa'}
  # A config written before the switches existed takes the same path.
  old = _config('dtq')
  del old.dtq['attention_entropy_weight']
  old_total, _, _, old_grads = _losses_and_grads(old, nets, state, batch,
                                                 frozen)
  assert np.asarray(total).tobytes() == np.asarray(old_total).tobytes()
  chex.assert_trees_all_equal(grads, old_grads)
  assert 'attention' in grads and aux['attention']


def test_reversed_attention_gets_the_negated_gradient():
  config, nets, state, batch, frozen = _dtq_setup()
  total, terms, _, grads = _losses_and_grads(config, nets, state, batch,
                                             frozen)
  config.dtq.attention = 'reversed'
  r_total, r_terms, _, r_grads = _losses_and_grads(config, nets, state,
                                                   batch, frozen)
  assert np.asarray(total).tobytes() == np.asarray(r_total).tobytes()
  assert set(r_terms) == set(terms)
  # Another program: XLA may fuse it differently, so the gradients agree up
  # to float32 rounding.
  chex.assert_trees_all_close(r_grads['attention'],
                              jax.tree.map(jnp.negative, grads['attention']),
                              rtol=1e-5, atol=1e-8)
  # The student still descends the same loss.
  chex.assert_trees_all_close(r_grads['backbone'], grads['backbone'],
                              rtol=1e-5, atol=1e-8)
  chex.assert_trees_all_close(r_grads['head'], grads['head'], rtol=1e-5,
                              atol=1e-8)
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads['attention']))


def test_attention_entropy_weight_adds_minus_weight_times_entropy():
  config, nets, state, batch, frozen = _dtq_setup()
  total, _, aux, grads = _losses_and_grads(config, nets, state, batch, frozen)
  config.dtq.attention_entropy_weight = 0.5
  e_total, e_terms, _, e_grads = _losses_and_grads(config, nets, state, batch,
                                                   frozen)
  entropy = sum(float(jnp.mean(-jnp.sum(w * jnp.log(w), -1)))
                for w in aux['attention'])
  # Near-uniform weights of 4, 8, 8, 8 channels.
  assert entropy > 0.9 * np.log([4, 8, 8, 8]).sum()
  np.testing.assert_allclose(e_terms['attention_entropy'], -0.5 * entropy,
                             rtol=1e-5)
  np.testing.assert_allclose(e_total - total, -0.5 * entropy, rtol=1e-5)
  chex.assert_trees_all_equal(e_grads['backbone'], grads['backbone'])
  assert not np.allclose(e_grads['attention']['attention_0']['bias'],
                         grads['attention']['attention_0']['bias'])


def _mobilenet_setup(head_dropout):
  config = _config('ft', model='mobilenet_v2', head_dropout=head_dropout)
  config.model_kwargs = {}
  nets = networks.build_networks(config, 3, 5)
  params, batch_stats = networks.init_params(nets, jax.random.PRNGKey(1),
                                             (32, 32, 3))
  images = np.random.RandomState(0).randn(2, 32, 32, 3).astype(np.float32)
  return config, nets, params, batch_stats, images


def test_mobilenet_heads_share_one_dropout_mask():
  config, nets, params, batch_stats, images = _mobilenet_setup('shared')
  rng = jax.random.PRNGKey(7)
  losses_fn = jax.jit(lambda p, r: step_lib.compute_losses(
      config, nets, p, batch_stats, images, np.zeros(2, np.int32), {}, r))
  _, (_, _, aux) = losses_fn(params, rng)
  # The backbone's call inside compute_losses uses the first half of the key.
  k_model, _ = jax.random.split(rng)
  (source_logits, feats), _ = jax.jit(lambda p: nets.student.apply(
      {'params': p, 'batch_stats': batch_stats}, images, train=True,
      mutable=['batch_stats'], rngs={'dropout': k_model}))(params['backbone'])
  dropped = feats['dropped']
  # Dropout is active: some features are zeroed, the rest scaled by 1/0.8.
  kept = np.asarray(dropped) != 0
  assert 0 < kept.mean() < 1
  np.testing.assert_allclose(np.asarray(dropped)[kept],
                             np.asarray(feats['pooled'])[kept] / 0.8,
                             rtol=1e-5)
  # Both classifiers read exactly these features.
  fc = params['head']['fc']
  np.testing.assert_allclose(aux['logits'],
                             dropped @ fc['kernel'] + fc['bias'], rtol=1e-5,
                             atol=1e-6)
  src = params['backbone']['classifier_1']
  np.testing.assert_allclose(source_logits,
                             dropped @ src['kernel'] + src['bias'],
                             rtol=1e-5, atol=1e-6)
  # 'independent' draws another mask for the target classifier.
  config.head_dropout = 'independent'
  _, (_, _, aux_independent) = jax.jit(lambda p, r: step_lib.compute_losses(
      config, nets, p, batch_stats, images, np.zeros(2, np.int32), {}, r))(
          params, rng)
  assert not np.allclose(aux_independent['logits'], aux['logits'])


def test_resnet_step_is_unchanged_by_head_dropout():
  config = _config('dtq')
  nets, _, state, batches, frozen, _ = _setup(config)
  state, frozen = jax.device_get(state), jax.device_get(frozen)
  shared = _losses_and_grads(config, nets, state, batches[0], frozen)
  config.head_dropout = 'independent'
  independent = _losses_and_grads(config, nets, state, batches[0], frozen)
  chex.assert_trees_all_equal(shared[0], independent[0])
  chex.assert_trees_all_equal(shared[3], independent[3])
