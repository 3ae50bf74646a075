"""Accelerator readiness by proof: the steps lower for CUDA and TPU from here.

``jax.export`` lowers a function for platforms this machine does not have.
The DTQ train step, the evaluation step and the exported integer predictor
are lowered for ``('cuda', 'tpu')`` for ResNet-50 and MobileNetV2 at the
paper's batch (64) and size (224 px), in float32 and bfloat16, from abstract
inputs (``jax.ShapeDtypeStruct``: nothing is allocated),
and the lowered modules are checked for what would fail or fall back to the
host on an accelerator: host callbacks, float64, and custom calls
(a host callback cannot be lowered for another platform at all, and
``jax.export`` refuses custom calls that are not stable across platforms; the
check below also refuses any custom call target that names a callback, a
host or a CPU).
"""

import functools
import re

from flax import traverse_util
import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np
import pytest

from configs import caltech256_30
from configs import fmnist
from dtq_jax.deploy import dtq_format
from dtq_jax.deploy import export
from dtq_jax.deploy import int_inference
from dtq_jax.method import networks
from dtq_jax.method import step as step_lib
from dtq_jax.models import create_model

PLATFORMS = ('cuda', 'tpu')
BATCH = 64
NUM_CLASSES = 257  # Caltech 256-30.
NUM_SOURCE = 1000  # ImageNet.


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                      tree)


def _problems(exported):
  """What in a lowered module would not run on the accelerator as is."""
  text = exported.mlir_module()
  found = []
  if re.search(r'\bf64\b', text):
    found.append('float64 values')
  for target in set(re.findall(r'custom_call @(\w+)|call_target_name = '
                               r'"([^"]+)"', text)):
    name = ''.join(target)
    if 'callback' in name or 'cpu' in name.lower() or 'host' in name.lower():
      found.append(f'custom call {name}')
  return found


def _lower(fn, *args):
  exported = jax_export.export(fn, platforms=PLATFORMS)(*args)
  assert exported.platforms == PLATFORMS
  return exported


@functools.lru_cache(maxsize=None)
def _setup(model, dtype):
  """The paper config and abstract state of one network and compute dtype."""
  config = caltech256_30.get_config(model)
  config.compute_dtype = dtype
  size = config.dataset.image_size
  shape = (size, size, 3)
  teacher_model = create_model(config.model, num_classes=NUM_SOURCE,
                               **config.get('model_kwargs', {}))
  teacher = jax.eval_shape(
      lambda: networks.init_variables(teacher_model, jax.random.PRNGKey(0),
                                      shape))
  nets = networks.build_networks(config, NUM_CLASSES, NUM_SOURCE)
  params, batch_stats = jax.eval_shape(
      lambda t: networks.init_params(nets, jax.random.PRNGKey(1), shape, t),
      teacher)
  tx, _ = step_lib.make_optimizer(config, params,
                                  nets.student.classifier_name, 120, 75)
  state = jax.eval_shape(
      lambda p, b: step_lib.create_train_state(
          config, nets, p, b, tx, jax.random.PRNGKey(2), shape),
      params, batch_stats)
  return config, nets, tx, shape, teacher, state


def _batch(shape, mask=False):
  batch = {'image': jax.ShapeDtypeStruct((BATCH,) + shape, jnp.float32),
           'label': jax.ShapeDtypeStruct((BATCH,), jnp.int32)}
  if mask:
    batch['mask'] = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
  return batch


MODELS = ['resnet50', 'mobilenet_v2']
DTYPES = ['float32', 'bfloat16']


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('model', MODELS)
def test_dtq_train_step_lowers_for_accelerators(model, dtype):
  config, nets, tx, shape, teacher, state = _setup(model, dtype)
  assert config.method == 'dtq' and config.bits_w == config.bits_a == 4
  train_step = jax.jit(step_lib.make_train_step(config, nets, tx))
  exported = _lower(train_step, state, _batch(shape), {'teacher': teacher})
  assert not _problems(exported)
  # The lowered step returns the state it took: nothing changed type.
  out_state = jax.tree.leaves(exported.out_avals)[:len(jax.tree.leaves(state))]
  assert [a.dtype for a in out_state] == [
      s.dtype for s in jax.tree.leaves(state)]


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('model', MODELS)
def test_eval_step_lowers_for_accelerators(model, dtype):
  config, nets, _, shape, _, state = _setup(model, dtype)
  eval_step = jax.jit(step_lib.make_eval_step(nets, dataset=config.dataset))
  exported = _lower(eval_step, state.params, state.batch_stats,
                    _batch(shape, mask=True))
  assert not _problems(exported)


def _export_layout(config, nets, shape, variables, head_params):
  """The manifest model entry and the variables of a .dtq export, as shapes.

  What ``export.make_export`` and ``dtq_format.variables_of`` give for these
  variables, without building the tensors (for ResNet-50 that is quantizing,
  packing and checksumming 25M weights): the quantized kernels become
  ``int_weights`` codes (uint8) with their range ends, every quantized
  input gets a ``quant_ranges`` pair, and the source classifier a 1-output
  stub. ``test_export_layout_is_the_real_exports`` checks it against a real
  export of the demo network.
  """
  convs = export.quantized_convs(nets.student, variables, shape)
  classifier = nets.student.classifier_name
  params = traverse_util.flatten_dict(
      {k: v for k, v in variables['params'].items() if k != classifier},
      sep='/')
  flat = {}
  f32 = lambda s=(): jax.ShapeDtypeStruct(s, jnp.float32)
  for path, info in convs.items():
    if info['bits_w'] != 32:
      kernel = params.pop(f'{path}/kernel')
      prefix = f'{int_inference.INT_WEIGHTS}/{path}'
      flat[f'{prefix}/codes'] = jax.ShapeDtypeStruct(np.shape(kernel),
                                                     jnp.uint8)
      axis = info['weight_range_axis']
      ends = f32() if axis is None else f32((np.shape(kernel)[-1],))
      flat[f'{prefix}/lo'] = flat[f'{prefix}/hi'] = ends
    if info['bits_a'] != 32:
      flat[f'{int_inference.RANGES}/{path}/lo'] = f32()
      flat[f'{int_inference.RANGES}/{path}/hi'] = f32()
  flat.update({f'params/{k}': v for k, v in params.items()})
  flat.update({f'batch_stats/{k}': v for k, v in traverse_util.flatten_dict(
      variables['batch_stats'], sep='/').items()})
  feature_dim = np.shape(head_params['fc']['kernel'])[0]
  model = dict(name=config.model, kwargs=dict(config.get('model_kwargs', {})),
               bits_w=config.bits_w, bits_a=config.bits_a,
               weight_range_axis=next(iter(convs.values()))[
                   'weight_range_axis'],
               classifier_name=classifier,
               num_classes=np.shape(head_params['fc']['kernel'])[1],
               feature_dim=feature_dim)
  backbone = int_inference.with_source_stub(
      traverse_util.unflatten_dict(flat, sep='/'), classifier, feature_dim)
  return model, _abstract(backbone)


@pytest.mark.parametrize('model', MODELS)
def test_exported_integer_predictor_lowers_for_accelerators(model):
  # The predictor of a .dtq export (float32 by construction: integer codes,
  # float32 scales), from the export's layout as shapes.
  config, nets, _, shape, _, state = _setup(model, 'float32')
  variables = {'params': state.params['backbone'],
               'batch_stats': state.batch_stats}
  manifest_model, backbone = _export_layout(config, nets, shape, variables,
                                            state.params['head'])
  student, head = int_inference.build({'model': manifest_model})
  predict = networks.make_predict(student, head)
  exported = _lower(predict, backbone, _abstract(state.params['head']),
                    jax.ShapeDtypeStruct((BATCH,) + shape, jnp.float32))
  assert not _problems(exported)
  assert exported.out_avals[0].shape == (BATCH, NUM_CLASSES)


def test_export_layout_is_the_real_exports():
  # _export_layout against export.make_export on the demo network.
  config = fmnist.get_config('quick')
  config.model_kwargs.widths = (4, 8, 8, 8)
  shape = (28, 28, 1)
  nets = networks.build_networks(config, 3, 5)
  variables = networks.init_variables(nets.student, jax.random.PRNGKey(0),
                                      shape)
  head_params = networks.init_params(nets, jax.random.PRNGKey(1), shape,
                                     variables)[0]['head']
  ranges = {}
  for path in export.quantized_convs(nets.student, variables, shape):
    node = ranges
    for part in path.split('/'):
      node = node.setdefault(part, {})
    node.update(lo=np.float32(0.0), hi=np.float32(4.0))
  tensors, manifest = export.make_export(
      nets.student, variables, head_params, ranges, shape,
      name=config.model, kwargs=dict(config.model_kwargs),
      bits_w=config.bits_w, bits_a=config.bits_a, preprocess={},
      class_names=None, activation_ranges='test')
  real = dtq_format.variables_of(manifest, tensors)
  m = manifest['model']
  real_backbone = int_inference.with_source_stub(
      {col: tree['backbone'] for col, tree in real.items()
       if 'backbone' in tree}, m['classifier_name'], m['feature_dim'])
  model, backbone = _export_layout(config, nets, shape, variables,
                                   head_params)
  assert model == {k: m[k] for k in model}
  assert jax.tree.structure(backbone) == jax.tree.structure(
      _abstract(real_backbone))
  assert jax.tree.leaves(backbone) == jax.tree.leaves(
      _abstract(real_backbone))


def test_the_check_sees_float64_and_host_callbacks():
  # The checks must be able to fail. A host callback cannot even be lowered
  # for another platform from here, so a step holding one fails to export.
  def with_callback(x):
    return jax.pure_callback(lambda v: v, jax.ShapeDtypeStruct((2,),
                                                               jnp.float32), x)
  with pytest.raises((NotImplementedError, ValueError)):
    _lower(jax.jit(with_callback), jax.ShapeDtypeStruct((2,), jnp.float32))
  with jax.enable_x64(True):
    exported = _lower(jax.jit(lambda x: x.astype(jnp.float64) * 2),
                      jax.ShapeDtypeStruct((2,), jnp.float32))
  assert _problems(exported) == ['float64 values']
