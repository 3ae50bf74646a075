"""Tests of dtq_jax.method.delta: DELTA's channel weights (docs/method.md, DELTA-Q)."""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dtq_jax.data import datasets
from dtq_jax.data import sources
from dtq_jax.method import delta
from dtq_jax.models import create_model
from dtq_jax.models.head import TargetHead

TINY = dict(widths=(4, 8, 8, 8))
NUM_CLASSES = 3


def _separable_split(per_class=16, seed=0):
  """28x28x1 uint8 noise images whose brightness gives the class.

  (Brightness survives the global average pooling; the position of a pattern
  would not.)
  """
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), per_class)
  images = rng.integers(0, 50, (len(labels), 28, 28, 1))
  images = (images + 90 * labels[:, None, None, None]).astype(np.uint8)
  order = rng.permutation(len(labels))
  return sources.Split(images[order], labels[order],
                       [f'c{k}' for k in range(NUM_CLASSES)])


def _data(split):
  return datasets.Data(split, split, None, datasets.Preprocessing(
      image_size=28, mean=(0.25,), std=(0.35,), crop_padding=2))


def _numpy_init(shapes, seed):
  """He-normal kernels, identity BatchNorm, zero biases, from NumPy.

  (XLA takes ~10 s on CPU to compile the threefry draws of model.init.)
  """
  rng = np.random.default_rng(seed)

  def init(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in),
                         jnp.float32)
    return (jnp.ones if name in ('scale', 'var') else jnp.zeros)(
        leaf.shape, jnp.float32)
  return jax.tree_util.tree_map_with_path(init, shapes)


@functools.lru_cache()
def _tiny_teacher(seed=0):
  """A random small_resnet in inference mode."""
  model = create_model('small_resnet', num_classes=5, **TINY)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed),
                          jnp.zeros((1, 28, 28, 1)))
  return model, dict(_numpy_init(dict(shapes), seed))


def _batches(split, n, batch_size=16, seed=0):
  stream = _data(split).train_batches(batch_size, seed=seed)
  return [next(stream) for _ in range(n)]


# Tapped convolutions.


@pytest.mark.parametrize('name,kwargs,expected', [
    ('resnet18', {}, [('layer1_1', 'conv2'), ('layer2_1', 'conv2'),
                      ('layer3_1', 'conv2'), ('layer4_1', 'conv2')]),
    ('resnet50', {}, [('layer1_2', 'conv3'), ('layer2_3', 'conv3'),
                      ('layer3_5', 'conv3'), ('layer4_2', 'conv3')]),
    ('mobilenet_v2', {}, [('features_5', 'conv_2'), ('features_9', 'conv_2'),
                          ('features_13', 'conv_2'),
                          ('features_17', 'conv_2')]),
    ('small_resnet', {}, [('layer1_0', 'conv2'), ('layer2_0', 'conv2'),
                          ('layer3_0', 'conv2'), ('layer4_0', 'conv2')]),
    ('small_resnet', dict(stage_sizes=(2, 1, 3, 2)),
     [('layer1_1', 'conv2'), ('layer2_0', 'conv2'), ('layer3_2', 'conv2'),
      ('layer4_1', 'conv2')]),
])
def test_tapped_convolutions(name, kwargs, expected):
  model = create_model(name, num_classes=10, **kwargs)
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x),
                             images)
  paths = delta.tapped_convolutions(name, variables['params'])
  assert paths == expected
  # Each convolution has as many output channels as its tapped map.
  _, feats = jax.eval_shape(lambda v, x: model.apply(v, x), variables, images)
  kernels = [delta._get(variables['params'], p)['kernel'] for p in paths]  # pylint: disable=protected-access
  assert [k.shape[-1] for k in kernels] == [t.shape[-1]
                                            for t in feats['taps']]


def test_tapped_convolutions_produce_the_taps():
  """Zeroing a filter of a tapped convolution zeroes that tap channel."""
  model, variables = _tiny_teacher()
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 28, 28, 1))
  paths = delta.tapped_convolutions('small_resnet', variables['params'])
  taps = jax.jit(lambda v: model.apply(v, x)[1]['taps'])
  for i, path in enumerate(paths):
    kernel = delta._get(variables['params'], path + ('kernel',))  # pylint: disable=protected-access
    params = delta._replace(variables['params'], path + ('kernel',),  # pylint: disable=protected-access
                            kernel.at[..., 1].set(0.0))
    tap = np.asarray(taps(dict(variables, params=params))[i])
    assert np.all(tap[..., 1] == 0) and np.any(tap[..., 0] != 0)


def test_tapped_convolutions_rejects_unknown_models():
  with pytest.raises(ValueError, match='Unknown model'):
    delta.tapped_convolutions('vgg16', {})
  with pytest.raises(ValueError, match='stages'):
    delta.tapped_convolutions('resnet50', {'layer1_0': {}})


# Step 2: filter removal against a brute-force loop.


def _trained_setup():
  """Teacher with one zero filter and one dead channel, and a trained head."""
  model, variables = _tiny_teacher()
  params = variables['params']
  # Tap 0, channel 2: the filter is already zero -> removing it changes
  # nothing. Tap 1, channel 5: its BatchNorm scale is 0, so its output feeds
  # nothing -> no rise either.
  k0 = delta.tapped_convolutions('small_resnet', params)[0]
  params = delta._replace(  # pylint: disable=protected-access
      params, k0 + ('kernel',),
      delta._get(params, k0 + ('kernel',)).at[..., 2].set(0.0))  # pylint: disable=protected-access
  scale = params['layer2_0']['bn2']['scale']
  params = delta._replace(params, ('layer2_0', 'bn2', 'scale'),  # pylint: disable=protected-access
                          scale.at[5].set(0.0))
  variables = dict(variables, params=params)
  split = _separable_split()
  head = TargetHead(NUM_CLASSES)
  s = delta.settings(dict(head_epochs=5, head_lr=0.1,
                          head_batch_norm='frozen'))
  head_params, _, _ = delta.train_head(
      model, head, variables, iter(_batches(split, 15)), s, 3,
      jax.random.PRNGKey(0))
  return model, variables, head, head_params, split


def _brute_force_rises(model, head, variables, head_params, batches, paths):
  """The DELTA reference loop: zero each filter, re-run, restore."""
  ce = jax.jit(lambda v, x, y: optax.softmax_cross_entropy_with_integer_labels(
      head.apply({'params': head_params}, model.apply(v, x)[1]['pooled']),
      y).mean())
  params = jax.tree.map(np.array, variables['params'])  # mutable copies
  out = []
  for path in paths:
    kernel = delta._get(params, path)['kernel']  # pylint: disable=protected-access
    rises = np.zeros(kernel.shape[-1])
    for b, batch in enumerate(batches):
      base = float(ce(dict(variables, params=params), batch['image'],
                      batch['label']))
      for c in range(kernel.shape[-1]):
        saved = kernel[..., c].copy()
        kernel[..., c] = 0.0
        loss = float(ce(dict(variables, params=params), batch['image'],
                        batch['label']))
        kernel[..., c] = saved
        rises[c] = (b * rises[c] + loss - base) / (b + 1)
    out.append(rises)
  return out


def test_filter_removal_rises_match_brute_force():
  model, variables, head, head_params, split = _trained_setup()
  batches = _batches(split, 2, seed=1)
  paths = delta.tapped_convolutions('small_resnet', variables['params'])
  rise_fn = delta.make_rise_fn(model, head)
  rises, base_ce = delta.filter_removal_rises(
      model, head, variables, head_params, batches, paths, rise_fn=rise_fn)
  # One compilation per tapped convolution, none per channel or batch.
  assert rise_fn._cache_size() == len(paths)  # pylint: disable=protected-access
  expected = _brute_force_rises(model, head, variables, head_params, batches,
                                paths)
  assert len(base_ce) == 2 and all(np.isfinite(base_ce))
  for r, e in zip(rises, expected, strict=True):
    assert r.dtype == np.float64 and r.shape == e.shape
    np.testing.assert_allclose(r, e, rtol=1e-3, atol=2e-6)
  assert abs(rises[0][2]) < 1e-6  # filter already zero
  assert abs(rises[1][5]) < 1e-6  # channel feeds nothing
  # Removing a filter the trained head relies on raises the cross-entropy.
  assert max(np.max(r) for r in rises) > 1e-3


# Step 3: standardisation and softmax.


def test_weights_from_rises_matches_numpy():
  rises = np.array([0.3, -0.1, 0.0, 1.2, 0.05])
  z = (rises - rises.mean()) / rises.std()
  expected = np.exp(z / 5) / np.exp(z / 5).sum()
  w = delta.weights_from_rises(rises)
  assert w.dtype == np.float32
  np.testing.assert_allclose(w, expected, rtol=1e-6)
  np.testing.assert_allclose(delta.weights_from_rises(rises, temperature=2.0),
                             np.exp(z / 2) / np.exp(z / 2).sum(), rtol=1e-6)
  # Scale and shift of the rises do not matter (standardised first).
  np.testing.assert_allclose(delta.weights_from_rises(3 * rises + 7), w,
                             rtol=1e-5)


def test_weights_from_equal_rises_are_uniform():
  for rises in (np.zeros(4), np.full(4, 0.25)):
    w = delta.weights_from_rises(rises)
    np.testing.assert_allclose(w, np.full(4, 0.25))


# Step 1 and the whole computation.


def test_head_lr_schedule():
  s = delta.settings()
  # Default (DELTA's channel_eval.py): ExponentialLR(gamma = 0.1 ** (1 / 6))
  # stepped once per epoch: constant within an epoch.
  stairs = delta.head_lr_schedule(s, steps_per_epoch=10)
  np.testing.assert_allclose(float(stairs(0)), 0.01, rtol=1e-6)
  np.testing.assert_allclose(float(stairs(9)), 0.01, rtol=1e-6)
  np.testing.assert_allclose(float(stairs(19)), 0.01 * 0.1**(1 / 6),
                             rtol=1e-5)
  np.testing.assert_allclose(float(stairs(60)), 0.001, rtol=1e-5)
  np.testing.assert_allclose(float(stairs(99)), 0.01 * 0.1**(9 / 6),
                             rtol=1e-5)
  smooth = delta.head_lr_schedule(dict(s, head_lr_staircase=False), 10)
  np.testing.assert_allclose(float(smooth(60)), 0.001, rtol=1e-5)
  np.testing.assert_allclose(float(smooth(15)), 0.01 * 0.1**0.25,
                             rtol=1e-5)  # decays within an epoch


def test_settings():
  config = ml_collections.ConfigDict(dict(alpha=0.01, beta=0.01,
                                          num_batches=2))
  s = delta.settings(config)
  assert s == dict(delta.DEFAULTS, num_batches=2)
  assert delta.settings() == delta.DEFAULTS
  # DELTA's reference (lixingjian/DELTA): channel_eval.py trains the head
  # 10 epochs in model.train(), SGD 0.01 / 0.9 / 1e-4, ExponentialLR
  # stepped per epoch with gamma 0.1 ** (1 / 6), then zeroes filters on the
  # first 4 training batches; run.sh calls it with --batch_size=32;
  # train.py takes softmax(z / 5) of the standardised rises.
  assert delta.DEFAULTS == dict(
      head_epochs=10, head_lr=0.01, head_momentum=0.9, head_weight_decay=1e-4,
      head_lr_decay_epochs=6.0, head_lr_decay_factor=0.1,
      head_lr_staircase=True, head_batch_norm='train', batch_size=32,
      num_batches=4, temperature=5.0)
  assert delta.settings(dict(batch_size=0))['batch_size'] == 0
  with pytest.raises(ValueError, match='num_batches'):
    delta.settings(dict(num_batches=0))
  with pytest.raises(ValueError, match='temperature'):
    delta.settings(dict(temperature=0.0))
  with pytest.raises(ValueError, match='batch_size'):
    delta.settings(dict(batch_size=-1))
  with pytest.raises(ValueError, match='batch_size'):
    delta.settings(dict(batch_size=2.5))
  with pytest.raises(ValueError, match='head_batch_norm.*train, frozen'):
    delta.settings(dict(head_batch_norm='eval'))


@pytest.mark.parametrize('batch_norm', ['train', 'frozen'])
def test_head_training_reduces_the_cross_entropy(batch_norm):
  model, variables = _tiny_teacher()
  split = _separable_split()
  batches = _batches(split, 30)  # 10 epochs of 3 steps
  head = TargetHead(NUM_CLASSES)
  head_params, after, epoch_losses = delta.train_head(
      model, head, variables, iter(batches),
      delta.settings(dict(head_batch_norm=batch_norm)), 3,
      jax.random.PRNGKey(0))
  init = head.init(jax.random.split(jax.random.PRNGKey(0))[0],
                   jnp.zeros((1, 8)))['params']

  # Step 2 measures in inference mode, with the statistics step 1 left.
  pooled = jax.jit(lambda x: model.apply(after, x)[1]['pooled'])

  def ce(p):
    return np.mean([float(optax.softmax_cross_entropy_with_integer_labels(
        head.apply({'params': p}, pooled(b['image'])), b['label']).mean())
                    for b in batches[:3]])

  assert len(epoch_losses) == 10
  assert ce(head_params) < ce(init) - 0.05
  assert epoch_losses[-1] < epoch_losses[0]


def _stats_close(a, b, **kwargs):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kwargs)


def test_head_training_batch_norm_modes():
  """'train' (DELTA's model.train()): batch statistics, running ones adapt.

  The brute-force loop runs the network in training mode batch after batch,
  as PyTorch's BatchNorm does under model.train(); 'frozen' keeps the
  pretrained statistics and normalises with them.
  """
  model, variables = _tiny_teacher()
  batches = _batches(_separable_split(), 6)
  head = TargetHead(NUM_CLASSES)
  init = head.init(jax.random.split(jax.random.PRNGKey(0))[0],
                   jnp.zeros((1, 8)))['params']

  def first_loss(v, train):
    out = model.apply(v, batches[0]['image'], train=train,
                      mutable=['batch_stats'] if train else False)
    feats = (out[0] if train else out)[1]
    return float(optax.softmax_cross_entropy_with_integer_labels(
        head.apply({'params': init}, feats['pooled']),
        batches[0]['label']).mean())

  # The running statistics after 6 batches in training mode.
  expected = variables['batch_stats']
  for b in batches:
    _, state = model.apply(dict(variables, batch_stats=expected), b['image'],
                           train=True, mutable=['batch_stats'])
    expected = state['batch_stats']

  s = delta.settings(dict(head_epochs=6))
  _, after, losses_train = delta.train_head(
      model, head, variables, iter(batches), s, 1, jax.random.PRNGKey(0))
  _stats_close(after['batch_stats'], expected, rtol=1e-5, atol=1e-6)
  # The first update's loss: the initial head on batch-normalised features.
  np.testing.assert_allclose(losses_train[0], first_loss(variables, True),
                             rtol=1e-5)

  _, kept, losses_frozen = delta.train_head(
      model, head, variables, iter(batches),
      dict(s, head_batch_norm='frozen'), 1, jax.random.PRNGKey(0))
  _stats_close(kept['batch_stats'], variables['batch_stats'], rtol=0, atol=0)
  np.testing.assert_allclose(losses_frozen[0], first_loss(variables, False),
                             rtol=1e-5)
  assert abs(losses_frozen[0] - losses_train[0]) > 1e-3
  # The caller's statistics are untouched.
  _stats_close(variables['batch_stats'], _tiny_teacher()[1]['batch_stats'],
               rtol=0, atol=0)


def test_channel_weights_end_to_end():
  model, variables = _tiny_teacher()
  data = _data(_separable_split())  # 48 images
  config = ml_collections.ConfigDict(dict(alpha=0.01, beta=0.01,
                                          head_epochs=1, num_batches=2))
  # The run's batch size (16) gives way to DELTA's 32 (delta.batch_size).
  weights, diag = delta.channel_weights(
      model, variables, data, config, batch_size=16, seed=3,
      return_diagnostics=True)
  assert [w.shape for w in weights] == [(4,), (8,), (8,), (8,)]
  for w, r in zip(weights, diag['rises'], strict=True):
    assert w.dtype == np.float32
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(w, delta.weights_from_rises(r), rtol=1e-6)
  assert diag['batch_size'] == 32 and diag['steps_per_epoch'] == 1
  assert len(diag['head_epoch_losses']) == 1 and len(diag['base_ce']) == 2
  assert diag['paths'] == delta.tapped_convolutions('small_resnet',
                                                    variables['params'])

  # The rises are measured with the running statistics the head training
  # left (training mode), on the next batches of the same stream.
  stream = data.train_batches(32, seed=3)
  head = TargetHead(NUM_CLASSES)
  head_params, after, _ = delta.train_head(
      model, head, variables, stream, delta.settings(config), 1,
      jax.random.PRNGKey(3))
  _stats_close(diag['batch_stats'], after['batch_stats'], rtol=1e-6,
               atol=1e-7)
  with pytest.raises(AssertionError):
    _stats_close(diag['batch_stats'], variables['batch_stats'], rtol=1e-3,
                 atol=1e-3)
  rises, _ = delta.filter_removal_rises(
      model, head, after, head_params, [next(stream), next(stream)],
      diag['paths'])
  for r, e in zip(diag['rises'], rises, strict=True):
    np.testing.assert_allclose(r, e, rtol=1e-5, atol=1e-7)

  # delta.batch_size = 0: the run's batch size.
  _, diag = delta.channel_weights(
      model, variables, data, dict(config, batch_size=0), batch_size=16,
      seed=3, return_diagnostics=True)
  assert diag['batch_size'] == 16 and diag['steps_per_epoch'] == 3
  with pytest.raises(ValueError, match='batch_size=0'):
    delta.channel_weights(model, variables, data, dict(config, batch_size=0),
                          seed=3)


# Caching.


def test_save_load_round_trip(tmp_path):
  weights = [np.arange(3, dtype=np.float32) / 3,
             np.linspace(0, 1, 7).astype(np.float32)]
  path = os.path.join(tmp_path, 'delta_weights')  # no .npz suffix
  delta.save_weights(path, weights)
  assert os.listdir(tmp_path) == ['delta_weights']
  loaded = delta.load_weights(path)
  assert len(loaded) == 2
  for a, b in zip(loaded, weights, strict=True):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
  other = os.path.join(tmp_path, 'other.npz')
  np.savez(other, x=np.zeros(2))
  with pytest.raises(ValueError, match='channel weights'):
    delta.load_weights(other)
