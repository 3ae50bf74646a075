"""Tests for examples/networks.py: plain Flax classifiers outside the zoo.

Tiny versions run (a few thousand parameters, compiled once per input shape:
evaluation, and training with its gradients, in one program); the defaults
are only traced (``jax.eval_shape``). Variables are traced from ``init`` and
filled with NumPy: a compiled ``init`` took longer than the rest (8-19 s per
network on 2 shared cores).
"""

import ast
import functools
import inspect
import pathlib

from flax import errors
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from examples import networks

SOURCE = pathlib.Path(networks.__file__)
NUM_CLASSES = 5
BATCH = 4
# Tiny versions with the options on: two stages; in EfficientNetLike a
# block with a residual and no expansion (stage1) and a strided one with
# both the other way (stage2), dropout; layer scale in ConvNeXtLike.
TINY = {
    'VGG': networks.VGG(num_classes=NUM_CLASSES, stage_widths=(4, 8),
                        convs_per_stage=(1, 2)),
    'EfficientNetLike': networks.EfficientNetLike(
        num_classes=NUM_CLASSES, stem_width=8, stage_widths=(8, 16),
        blocks_per_stage=(1, 1), stage_strides=(1, 2), expand_ratios=(1, 2),
        head_width=32, dropout_rate=0.5),
    'ConvNeXtLike': networks.ConvNeXtLike(
        num_classes=NUM_CLASSES, stage_widths=(8, 16), blocks_per_stage=(1, 1),
        layer_scale_init=0.5),
}
# The module paths each docstring names (stages: the feature taps).
PATHS = {
    'VGG': ('stage1', 'stage2', 'classifier'),
    'EfficientNetLike': ('stage1', 'stage2', 'head_conv', 'classifier'),
    'ConvNeXtLike': ('stage1', 'downsample2', 'stage2', 'head_norm',
                     'classifier'),
}
HAS_BATCH_STATS = {'VGG': True, 'EfficientNetLike': True,
                   'ConvNeXtLike': False}
SHAPES = {'32x32x3': (32, 32, 3), '28x28x1': (28, 28, 1)}


def _images(shape, seed=0):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((BATCH,) + shape).astype(np.float32)


def _variables(model, shape, seed=0):
  """``model``'s variables for ``shape`` images, traced and NumPy-filled.

  Kernels get He scaling and BatchNorm its initial running statistics (mean
  0, variance 1), which training must move.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False),
                          jax.random.key(0), _images(shape))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'mean':
      return np.zeros(leaf.shape, leaf.dtype)
    if name == 'var':
      return np.ones(leaf.shape, leaf.dtype)
    if name == 'kernel':
      scale = np.sqrt(2 / np.prod(leaf.shape[:-1]))
    elif name in ('scale', 'layer_scale'):
      return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
    else:
      scale = 0.1
    return (scale * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def _run(name, shape):
  """Runs the tiny ``name`` on ``shape`` images in both modes.

  Returns:
    A dict: ``variables``; ``eval`` (logits) and ``eval_state`` (the mutable
    batch_stats and the top-level modules' outputs); ``train`` (logits),
    ``train_state`` (batch_stats) and ``grads`` (of the cross-entropy) in
    training mode; ``run`` (the compiled function of ``(variables, images,
    dropout key)`` that returns them).
  """
  model = TINY[name]
  x = _images(shape)
  labels = jnp.arange(BATCH) % NUM_CLASSES
  variables = _variables(model, shape)

  def loss(params, variables, x, key):
    logits, state = model.apply({**variables, 'params': params}, x,
                                train=True, rngs={'dropout': key},
                                mutable=['batch_stats'])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return ce.mean(), (logits, state)

  @jax.jit
  def run(variables, x, key):
    # The top-level modules' outputs: the stages and the classifier.
    evaluated = model.apply(
        variables, x, train=False, mutable=['batch_stats', 'intermediates'],
        capture_intermediates=lambda module, _: len(module.path) == 1)
    (_, trained), grads = jax.value_and_grad(loss, has_aux=True)(
        variables['params'], variables, x, key)
    return evaluated, trained, grads

  (eval_logits, eval_state), (train_logits, train_state), grads = run(
      variables, x, jax.random.key(2))
  return dict(variables=variables, eval=eval_logits, eval_state=eval_state,
              train=train_logits, train_state=train_state, grads=grads,
              run=run)


def _leaves_close(a, b):
  return all(np.allclose(x, y) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_networks_do_not_import_dtq_jax():
  # They stand for a user's own code, written without dtq-jax.
  imported = set()
  for node in ast.walk(ast.parse(SOURCE.read_text())):
    if isinstance(node, ast.Import):
      imported.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      imported.add('.' * node.level + (node.module or ''))
  assert imported, 'the scan found no import'
  assert not {m for m in imported if m.split('.')[0] in ('dtq_jax', '')}, (
      imported)


@pytest.mark.parametrize('name', sorted(TINY))
def test_interface_and_documented_paths(name):
  cls = getattr(networks, name)
  assert 'num_classes' in cls.__dataclass_fields__
  assert list(inspect.signature(cls.__call__).parameters) == [
      'self', 'x', 'train']
  # Stages are named as ``stage1`` ... ``stageN``.
  for path in {p.replace('stage2', 'stage1') for p in PATHS[name]}:
    assert f'``{path}``' in cls.__doc__, path


@pytest.mark.parametrize('shape', sorted(SHAPES))
@pytest.mark.parametrize('name', sorted(TINY))
def test_logits_in_both_modes(name, shape):
  run = _run(name, SHAPES[shape])
  for mode in ('eval', 'train'):
    assert run[mode].shape == (BATCH, NUM_CLASSES), mode
    assert np.all(np.isfinite(run[mode])), mode
  params = run['variables']['params']
  num_params = sum(p.size for p in jax.tree.leaves(params))
  assert 100 < num_params < 10_000


@pytest.mark.parametrize('shape', sorted(SHAPES))
@pytest.mark.parametrize('name', sorted(TINY))
def test_batch_stats_change_in_training_only(name, shape):
  run = _run(name, SHAPES[shape])
  variables = run['variables']
  if not HAS_BATCH_STATS[name]:
    # LayerNorm only: params alone, and training mode is the same network.
    assert set(variables) == {'params'}
    assert not run['train_state'].get('batch_stats')
    np.testing.assert_allclose(run['train'], run['eval'], rtol=1e-5,
                               atol=1e-5)
    return
  assert set(variables) == {'params', 'batch_stats'}
  before = variables['batch_stats']
  assert _leaves_close(run['eval_state']['batch_stats'], before)
  after = run['train_state']['batch_stats']
  assert jax.tree.structure(after) == jax.tree.structure(before)
  # Every BatchNorm's statistics move (its variance at least: a BatchNorm
  # fed by another one through a bias-free 1x1 conv sees a zero batch mean).
  variances = [(path, a, b) for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(after), jax.tree.leaves(before))
               if path[-1].key == 'var']
  assert len(variances) >= 3
  for path, a, b in variances:
    assert not np.allclose(a, b), jax.tree_util.keystr(path)


@pytest.mark.parametrize('shape', sorted(SHAPES))
@pytest.mark.parametrize('name', sorted(TINY))
def test_documented_module_paths_exist(name, shape):
  run = _run(name, SHAPES[shape])
  captured = run['eval_state']['intermediates']
  for path in PATHS[name]:
    assert path in captured, path
  for stage in (p for p in PATHS[name] if p.startswith('stage')):
    (tap,) = captured[stage]['__call__']
    assert tap.ndim == 4 and tap.shape[0] == BATCH, stage
  (logits,) = captured['classifier']['__call__']
  np.testing.assert_array_equal(logits, run['eval'])
  assert 'classifier' in run['variables']['params']


@pytest.mark.parametrize('name', sorted(TINY))
def test_gradients_are_finite(name):
  grads = _run(name, SHAPES['28x28x1'])['grads']
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert np.any(grads['classifier']['kernel'])
  # Gradients reach the first stage through the whole network.
  assert any(np.any(g) for g in jax.tree.leaves(grads['stage1']))


def test_efficientnet_dropout_needs_an_rng_in_training():
  model = TINY['EfficientNetLike']
  run = _run('EfficientNetLike', SHAPES['28x28x1'])
  variables, x = run['variables'], _images(SHAPES['28x28x1'])
  # Tracing reaches the missing rng before anything compiles.
  with pytest.raises(errors.InvalidRngError, match='dropout'):
    jax.jit(lambda v, x: model.apply(v, x, train=True,
                                     mutable=['batch_stats']))(variables, x)
  # Each dropout key drops other features (no new compilation: the key is
  # an argument); evaluation needs none.
  (eval_logits, _), (other_logits, _), _ = run['run'](variables, x,
                                                      jax.random.key(3))
  assert not np.allclose(run['train'], other_logits)
  np.testing.assert_array_equal(eval_logits, run['eval'])


def test_convnext_layer_scale_is_optional():
  params = _run('ConvNeXtLike', SHAPES['28x28x1'])['variables']['params']
  assert params['stage2']['block1']['layer_scale'].shape == (16,)
  without = jax.eval_shape(networks.ConvNeXtBlock().init, jax.random.key(0),
                           jnp.zeros((1, 2, 2, 4)))
  assert 'layer_scale' not in without['params']


@pytest.mark.parametrize('name', sorted(TINY))
def test_defaults_fit_fashion_mnist(name):
  # Traced only: 28x28 grayscale in, ten classes out, at most a few hundred
  # thousand parameters (the module docstring gives each count).
  model = getattr(networks, name)()
  x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.key(0), x)
  logits = jax.eval_shape(functools.partial(model.apply, train=False),
                          variables, x)
  assert logits.shape == (2, 10)
  num_params = sum(p.size for p in jax.tree.leaves(variables['params']))
  assert 50_000 < num_params < 300_000, num_params
  assert ('batch_stats' in variables) == HAS_BATCH_STATS[name]


def test_per_stage_attributes_must_agree():
  model = networks.VGG(stage_widths=(4, 8), convs_per_stage=(1,))
  with pytest.raises(ValueError, match='convs_per_stage'):
    jax.eval_shape(functools.partial(model.init, train=False),
                   jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
