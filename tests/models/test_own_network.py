"""Tests of own_network.py: a user's Flax classifier quantized untouched."""

import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fmnist
from dtq_jax import layers
from dtq_jax import quant
from dtq_jax.method import attention
from dtq_jax.method import networks
from dtq_jax.method import static_ranges
from dtq_jax.method import step as step_lib
from dtq_jax.models import create_model
from dtq_jax.models import own_network
from dtq_jax.models.resnet import Bottleneck
from dtq_jax.models.resnet import ResNet
from dtq_jax.models.head import TargetHead

IMAGE = (16, 16, 3)


class Stage(nn.Module):
  """Strided 3x3 convolution, BatchNorm, ReLU."""
  width: int

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(self.width, (3, 3), strides=2, use_bias=False)(x)
    return nn.relu(nn.BatchNorm(use_running_average=not train)(x))


class TinyNet(nn.Module):
  """A stem, four stages at halving resolutions, a hidden Dense, a classifier."""
  num_classes: int = 5
  dtype: object = None

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(4, (3, 3), name='stem')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
    for i, width in enumerate((4, 8, 8, 16)):
      x = Stage(width, name=f'stage{i + 1}')(x, train)
    x = nn.relu(nn.Dense(8, name='hidden')(x.mean((1, 2))))
    return nn.Dense(self.num_classes, name='classifier')(x)


class NoTrain(nn.Module):
  num_classes: int = 2

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


class Softmaxed(nn.Module):
  """Its output is not a Dense's: the classifier does not make the logits."""
  num_classes: int = 2

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(4, (3, 3))(x).mean((1, 2))
    return jax.nn.softmax(nn.Dense(self.num_classes)(x))


class DenseOnly(nn.Module):
  num_classes: int = 2

  @nn.compact
  def __call__(self, x, train):
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


class Shared(nn.Module):
  """One convolution module called twice."""
  num_classes: int = 2

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(3, (3, 3), name='stem')(x)
    conv = nn.Conv(3, (3, 3), name='twice')
    x = conv(conv(x))
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


@pytest.fixture(name='user_module', autouse=True)
def user_module_fixture(monkeypatch):
  """The networks above, importable as 'user_nets:<Class>'."""
  module = types.ModuleType('user_nets')
  for cls in (TinyNet, NoTrain, Softmaxed, DenseOnly, Shared):
    setattr(module, cls.__name__, cls)
  module.not_a_module = 3
  monkeypatch.setitem(sys.modules, 'user_nets', module)
  return module


# Loading a class by import path.


def test_load_class_by_import_path():
  assert own_network.is_import_path('user_nets:TinyNet')
  assert not own_network.is_import_path('resnet50')
  assert own_network.load_class('user_nets:TinyNet') is TinyNet


@pytest.mark.parametrize('spec, message', [
    ('user_nets', "write 'package.module:Class'"),
    ('no_such_package.nets:Net', "cannot import 'no_such_package.nets'"),
    ('user_nets:Missing', "has no 'Missing'"),
    ('user_nets:not_a_module', 'is not a flax.linen.Module class'),
    ('user_nets:NoTrain', 'takes no train argument'),
    ('builtins:object', 'is not a flax.linen.Module class'),
])
def test_load_class_errors_are_one_line(spec, message):
  with pytest.raises(own_network.NetworkError, match=message) as e:
    own_network.load_class(spec)
  assert '\n' not in str(e.value)


def test_class_without_num_classes_is_refused(user_module):

  class NoClasses(nn.Module):

    @nn.compact
    def __call__(self, x, train):
      return x

  user_module.NoClasses = NoClasses
  with pytest.raises(own_network.NetworkError, match='no num_classes'):
    own_network.load_class('user_nets:NoClasses')


# What resolve settles.


def test_plan_lists_layers_taps_and_classifier():
  plan = own_network.resolve(TinyNet(), IMAGE)
  assert [(l.path, l.kind, l.quantized, l.reason) for l in plan.layers] == [
      ('stem', 'conv', False, 'first convolution'),
      ('stage1/Conv_0', 'conv', True, ''),
      ('stage2/Conv_0', 'conv', True, ''),
      ('stage3/Conv_0', 'conv', True, ''),
      ('stage4/Conv_0', 'conv', True, ''),
      ('hidden', 'dense', False, 'Dense: quant.quantize_dense=False'),
      ('classifier', 'dense', False, 'source classifier'),
  ]
  # The last module at each of the last four resolutions: the stages.
  assert plan.taps == ('stage1', 'stage2', 'stage3', 'stage4')
  assert plan.tap_shapes == ((8, 8, 4), (4, 4, 8), (2, 2, 8), (1, 1, 16))
  assert plan.auto_taps
  assert plan.classifier == 'classifier' and plan.feature_dim == 8
  assert plan.tap_filters == ('stage1/Conv_0', 'stage2/Conv_0',
                              'stage3/Conv_0', 'stage4/Conv_0')
  lines = own_network.describe(plan, 4, 5)
  assert lines[1].split() == ['stage1/Conv_0', 'conv', '4-bit', 'weights,',
                              '5-bit', 'inputs']
  assert 'float (first convolution)' in lines[0]
  assert lines[-2].startswith('taps (chosen: last module per resolution): '
                              'stage1 (8, 8, 4)')
  assert lines[-1] == 'source classifier: classifier (8 features)'


def test_plan_settings_keep_float_dense_and_explicit_taps():
  plan = own_network.resolve(
      TinyNet(), IMAGE, keep_float=(r'stage[34]/.*',), quantize_dense=True,
      taps=('stage2', r'stage3/Conv_\d'), source_classifier='classifier')
  reasons = {l.path: l.reason for l in plan.layers}
  assert reasons['stage3/Conv_0'] == "keep_float 'stage[34]/.*'"
  assert reasons['stage4/Conv_0'] == "keep_float 'stage[34]/.*'"
  assert reasons['hidden'] == '' and reasons['stage1/Conv_0'] == ''
  assert reasons['classifier'] == 'source classifier'
  assert plan.taps == ('stage2', 'stage3/Conv_0') and not plan.auto_taps


@pytest.mark.parametrize('kwargs, message', [
    (dict(taps=('nothing',)), "'nothing' matches 0 modules"),
    (dict(taps=(r'stage\d',)), r"matches 4 modules: stage1, stage2"),
    (dict(taps=('hidden',)), 'a tap is a \\(batch, H, W, C\\) map'),
    (dict(source_classifier='hidden'), 'does not produce the logits'),
    (dict(source_classifier='stem'), 'is not an nn.Dense'),
    (dict(source_classifier='fc'), 'no module of that path'),
    (dict(keep_float=('stage9/.*',)), 'matches no Conv or Dense layer'),
])
def test_resolve_errors_are_one_line(kwargs, message):
  with pytest.raises(own_network.NetworkError, match=message) as e:
    own_network.resolve(TinyNet(), IMAGE, **kwargs)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('cls, kwargs, message', [
    (Softmaxed, {}, 'no nn.Dense produces the logits'),
    (DenseOnly, {}, 'has no nn.Conv to quantize'),
    (Shared, dict(taps=('twice',)), 'is called 2 times'),
])
def test_networks_that_cannot_be_used(cls, kwargs, message):
  with pytest.raises(own_network.NetworkError, match=message):
    own_network.resolve(cls(), IMAGE, **kwargs)


def test_network_failing_on_the_image_shape_names_it(user_module):

  class NeedsColour(nn.Module):
    num_classes: int = 2

    @nn.compact
    def __call__(self, x, train):
      if x.shape[-1] != 3:
        raise ValueError(f'expected RGB, got {x.shape[-1]} channels\nmore')
      return nn.Dense(self.num_classes)(nn.Conv(2, (3, 3))(x).mean((1, 2)))

  with pytest.raises(own_network.NetworkError, match=(
      r'^NeedsColour fails on images of shape \(16, 16, 1\): ValueError: '
      r'expected RGB, got 1 channels$')):
    own_network.resolve(NeedsColour(), (16, 16, 1))
  # Logits that are not (batch, classes).
  with pytest.raises(own_network.NetworkError, match=r'TinyNet returns shape '
                     r'\(5,\) for one image'):
    own_network.resolve(TinyNet(), (16, 16))


# Running it.


def _variables(network, batch=3, seed=0):
  x = jax.random.normal(jax.random.PRNGKey(seed), (batch,) + IMAGE)
  return network.init(jax.random.PRNGKey(1), x), x


def _reference_student(variables, x, bits, train):
  """TinyNet with its stages' convolutions fake-quantized, written out."""
  p, s = variables['params'], variables['batch_stats']
  conv = lambda x, k, stride, bias=None: jax.lax.conv_general_dilated(
      x, k, (stride, stride), 'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + (0 if bias is None
                                                      else bias)

  def bn(x, params, stats):
    if train:
      mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    else:
      mean, var = stats['mean'], stats['var']
    return (x - mean) / jnp.sqrt(var + 1e-5) * params['scale'] + params['bias']

  x = conv(x, p['stem']['kernel'], 1, p['stem']['bias'])
  x = jax.nn.relu(bn(x, p['BatchNorm_0'], s['BatchNorm_0']))
  taps = []
  for i in range(1, 5):
    stage, stats = p[f'stage{i}'], s[f'stage{i}']
    kernel = quant.fake_quant(stage['Conv_0']['kernel'], bits)
    x = conv(quant.fake_quant(x, bits), kernel, 2)
    x = jax.nn.relu(bn(x, stage['BatchNorm_0'], stats['BatchNorm_0']))
    taps.append(x)
  pooled = jax.nn.relu(x.mean((1, 2)) @ p['hidden']['kernel'] +
                       p['hidden']['bias'])
  logits = pooled @ p['classifier']['kernel'] + p['classifier']['bias']
  return logits, pooled, taps


@pytest.mark.parametrize('train', [False, True])
def test_student_matches_a_reference_written_out(train):
  module = TinyNet()
  plan = own_network.resolve(module, IMAGE)
  student = own_network.OwnNetwork(module, plan, 4, 4)
  variables, x = _variables(student)
  if train:
    (logits, feats), state = student.apply(variables, x, train=True,
                                           mutable=['batch_stats'])
    assert set(state) == {'batch_stats'}
  else:
    logits, feats = student.apply(variables, x)
  want_logits, want_pooled, want_taps = _reference_student(
      variables, x, 4, train)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(feats['pooled'], want_pooled, rtol=1e-5,
                             atol=1e-5)
  for got, want in zip(feats['taps'], want_taps):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The float teacher is the network as written.
  teacher = student.clone(bits_w=32, bits_a=32)
  np.testing.assert_array_equal(teacher.apply(variables, x)[0],
                                module.apply(variables, x, train=False))


def test_quantized_dense_and_gradients_reach_every_layer():
  module = TinyNet()
  plan = own_network.resolve(module, IMAGE, quantize_dense=True)
  student = own_network.OwnNetwork(module, plan, 3, 3)
  variables, x = _variables(student)
  float_logits = module.apply(variables, x, train=False)
  # Only the hidden Dense differs from the convolution-only student.
  convs_only = own_network.OwnNetwork(module, own_network.resolve(
      module, IMAGE), 3, 3)
  assert not np.allclose(student.apply(variables, x)[0],
                         convs_only.apply(variables, x)[0])
  assert not np.allclose(student.apply(variables, x)[0], float_logits)

  def loss(params):
    logits, feats = student.apply(dict(variables, params=params), x)
    return jnp.sum(logits ** 2) + sum(jnp.sum(t) for t in feats['taps'])

  grads = jax.jit(jax.grad(loss))(variables['params'])
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(g)), path
    if 'kernel' in jax.tree_util.keystr(path):
      assert np.any(g != 0), path


def test_static_ranges_live_in_each_layer_scope():
  module = TinyNet()
  student = own_network.OwnNetwork(module, own_network.resolve(module, IMAGE),
                                   4, 4, layers.QuantSettings(
                                       act_ranges='static').as_conv_kwargs())
  variables, x = _variables(student)
  ranges = static_ranges.empty_ranges(student, variables, IMAGE)
  assert sorted(static_ranges.layer_ranges(ranges)) == [
      f'stage{i}/Conv_0' for i in range(1, 5)]
  collect = static_ranges.make_collect_step(student)
  ranges = collect(variables, ranges, x)
  first = static_ranges.layer_ranges(ranges)['stage1/Conv_0']
  assert int(first['count']) == 1 and float(first['lo']) < float(first['hi'])
  # Evaluation with the stored ranges: a batch inside them is unchanged.
  static = static_ranges.with_act_ranges(student, 'static')
  got = static.apply(dict(variables, quant_ranges=ranges), x)[0]
  dynamic = static_ranges.with_act_ranges(student, 'dynamic')
  np.testing.assert_allclose(got, dynamic.apply(variables, x)[0], rtol=1e-5,
                             atol=1e-5)


# The zoo through the generic path gives today's numbers.


class PlainConv(nn.Conv):
  """``nn.Conv`` taking (and ignoring) the zoo's quantizer attributes.

  With it a zoo model is a network of plain ``nn.Conv`` layers, the same
  parameter tree and the same computation at full precision.
  """
  bits_w: int = 32
  bits_a: int = 32
  weight_range_axis: object = None
  range_grad: bool = True
  pointwise_as_dot: bool = False
  depthwise_as_shifts: bool = False
  fused_vjp: bool = False
  act_ranges: str = 'dynamic'
  range_stat: str = 'ema'
  range_momentum: float = 0.9


ZOO_TAPS = {
    # ResNet-50's blocks (Bottleneck, downsampling shortcuts), one per stage:
    # the taps are each stage's last conv3, as the zoo's.
    'resnet50_blocks': tuple(f'layer{i}_0/conv3' for i in range(1, 5)),
    # The projection BatchNorm of blocks 5, 9, 13, 17, as the zoo's.
    'mobilenet_v2': tuple(f'features_{i}/conv_3' for i in (5, 9, 13, 17)),
}


def _zoo_model(case, **kwargs):
  if case == 'resnet50_blocks':
    return ResNet(stage_sizes=(1, 1, 1, 1), block_cls=Bottleneck,
                  widths=(4, 8, 8, 16), **kwargs)
  return create_model(case, **kwargs)


class PlainZoo(nn.Module):
  """A zoo model as a user's network: nn.Conv layers, logits only."""
  num_classes: int = 10
  case: str = 'mobilenet_v2'

  def setup(self):
    self.net = _zoo_model(self.case, num_classes=self.num_classes,
                          conv=PlainConv)
    # The zoo model's parameter tree, without a prefix.
    nn.share_scope(self, self.net)

  def __call__(self, x, train):
    return self.net(x, train)[0]


@pytest.mark.parametrize('case', sorted(ZOO_TAPS))
def test_zoo_through_the_generic_path_gives_the_same_numbers(case):
  # DTQ: its loss has every term FT-Q's has (the cross-entropy) and more.
  config = fmnist.get_config('quick')
  method = config.method = 'dtq'
  shape = (32, 32, 3)
  num_source, num_classes = 10, 3
  settings = layers.QuantSettings.from_config(config.quant)
  zoo_student = _zoo_model(case, num_classes=num_source, bits_w=4, bits_a=4,
                           conv_kwargs=settings.as_conv_kwargs())
  zoo_teacher = _zoo_model(case, num_classes=num_source)
  plain = PlainZoo(num_source, case)
  plan = own_network.resolve(plain, shape, taps=ZOO_TAPS[case])
  assert plan.classifier == zoo_student.classifier_name
  # The zoo keeps exactly its first convolution (and the classifier) float.
  assert [l.path for l in plan.layers if not l.quantized] == [
      'conv1' if case.startswith('resnet') else 'features_0_0',
      zoo_student.classifier_name]
  own_student = own_network.OwnNetwork(plain, plan, 4, 4,
                                       settings.as_conv_kwargs())
  own_teacher = own_network.OwnNetwork(plain, plan)
  head = TargetHead(num_classes, dropout_rate=zoo_student.dropout_rate)
  att = attention.TransferAttention() if method == 'dtq' else None
  zoo_nets = networks.Networks(zoo_student, zoo_teacher, head, att)
  own_nets = networks.Networks(own_student, own_teacher,
                               TargetHead(num_classes, dropout_rate=0.0), att)

  teacher = networks.init_variables(zoo_teacher, jax.random.PRNGKey(0), shape)
  params, batch_stats = networks.init_params(zoo_nets, jax.random.PRNGKey(1),
                                             shape, teacher)
  own_params, own_stats = networks.init_params(own_nets, jax.random.PRNGKey(1),
                                               shape, teacher)
  jax.tree.map(np.testing.assert_array_equal, (params, batch_stats),
               (own_params, own_stats))
  images = jax.random.normal(jax.random.PRNGKey(2), (4,) + shape)
  labels = jnp.array([0, 1, 2, 1])

  def losses(nets):
    fn = jax.value_and_grad(
        lambda p: step_lib.compute_losses(
            config, nets, p, batch_stats, images, labels,
            {'teacher': teacher}, jax.random.PRNGKey(3)), has_aux=True)
    return jax.jit(fn)(params)

  (total, (terms, stats, _)), grads = losses(zoo_nets)
  (own_total, (own_terms, own_stats, _)), own_grads = losses(own_nets)
  assert set(terms) == set(own_terms)
  np.testing.assert_allclose(own_total, total, rtol=1e-6)
  for k in terms:
    np.testing.assert_allclose(own_terms[k], terms[k], rtol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7),
               (own_grads, own_stats), (grads, stats))
