"""ONNX export: the graph against the JAX static-range fake-quant network."""

import functools
import json
import os
import stat
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import helper
from onnx import TensorProto
import onnxruntime
import pytest

import commands
from configs import fmnist
from dtq_jax.data import sources
from dtq_jax.deploy import dtq_format
from dtq_jax.deploy import export
from dtq_jax.deploy import onnx_export
from dtq_jax import export as export_cli
from dtq_jax.infra import errors
from dtq_jax import layers
from dtq_jax.method import static_ranges
from dtq_jax.models import create_model
from dtq_jax.models.head import TargetHead
from dtq_jax import quant
from dtq_jax.run import config_validation
from dtq_jax.run import experiment


def _session(model):
  return onnxruntime.InferenceSession(model.SerializeToString(),
                                      providers=['CPUExecutionProvider'])


# --------------------------------------------------------------------------
# The activation quantizer, bit for bit.


@pytest.mark.parametrize('lo,hi,bits', [
    (0.0, 2.7, 4),     # After a ReLU: QuantizeLinear/DequantizeLinear.
    (-1.3, 2.1, 5),    # Non-integer zero point: Sub/Div/Round/Mul/Add.
    (-0.7, 0.9, 8),
    (0.4, 0.4, 4),     # Constant range: the output is lo.
])
def test_activation_quantizer_is_the_projects(lo, hi, bits):
  lo, hi = np.float32(lo), np.float32(hi)
  scale = np.float32(quant.range_scale(lo, hi, bits))
  rng = np.random.default_rng(bits)
  # Exact ties of the rounding (k + 1/2 steps), their float neighbours, the
  # range ends, values outside the range, and random ones.
  ties = (lo + (rng.integers(0, 2**bits - 1, 2000) + 0.5) * max(scale, 1e-3)
          ).astype(np.float32)
  x = np.concatenate([
      ties, np.nextafter(ties, np.float32(np.inf)),
      np.nextafter(ties, np.float32(-np.inf)),
      np.array([lo, hi, lo - 1, hi + 1, 0.0], np.float32),
      rng.uniform(lo - 0.5, hi + 0.5, 5000).astype(np.float32)])
  flat = {f'{layers.RANGES}/backbone/c/lo': lo,
          f'{layers.RANGES}/backbone/c/hi': hi}
  graph = onnx_export._Graph()  # pylint: disable=protected-access
  builder = onnx_export._Builder(graph, flat, {})  # pylint: disable=protected-access
  out = builder.act_quant('x', 'c', bits)
  codes = 'c/input_codes'  # The rounded codes (float, or QuantizeLinear's).
  model = helper.make_model(
      helper.make_graph(
          graph.nodes, 'q',
          [helper.make_tensor_value_info('x', TensorProto.FLOAT, [None])],
          [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None]),
           helper.make_tensor_value_info(
               codes, TensorProto.UINT8 if lo == 0 and hi > lo else
               TensorProto.FLOAT, [None])],
          graph.initializers),
      opset_imports=[helper.make_opsetid('', onnx_export.OPSET)])
  model.ir_version = 10
  onnx.checker.check_model(model, full_check=True)
  ops = {n.op_type for n in model.graph.node}
  assert ('QuantizeLinear' in ops) == (lo == 0 and hi > lo)
  got, got_codes = _session(model).run(None, {'x': x})
  if hi <= lo:
    np.testing.assert_array_equal(got, np.full_like(x, lo))
    np.testing.assert_array_equal(got, np.asarray(quant.fake_quant_range(
        jnp.asarray(x), bits, lo, hi)))
    return
  # The quantizer's definition in float32 arithmetic (quant.py):
  # code = round((clip(x, lo, hi) - lo) / s), half to even; value
  # code * s + lo. The graph computes exactly that, bit for bit.
  d = np.clip(x, lo, hi) - lo
  codes = np.round(d / scale)
  np.testing.assert_array_equal(got_codes.astype(np.float32), codes)
  np.testing.assert_array_equal(got, codes * scale + lo)
  # XLA evaluates the same formula with its own rewrites (a division by a
  # broadcast scalar becomes a multiplication by its reciprocal, and
  # multiply-adds fuse), so JAX's codes may differ from the definition, by
  # one, only where (x - lo) / s lies within float32 rounding of a tie.
  jax_codes = np.asarray(jax.jit(quant.quantize, static_argnums=1)(
      x, bits, lo, hi), np.float32)
  u = d.astype(np.float64) / np.float64(scale)
  near_tie = np.abs(np.abs(u - np.floor(u)) - 0.5) <= (
      8 * np.finfo(np.float32).eps * np.maximum(u, 1))
  differ = jax_codes != codes
  assert np.all(np.abs(jax_codes - codes)[differ] == 1)
  assert np.all(near_tie[differ])
  assert not np.any(differ[~near_tie])


# --------------------------------------------------------------------------
# Whole networks with random weights.


def _random_export(name, bits, image_size, per_channel=False, **kwargs):
  """A random-weight student with calibrated ranges, as make_export sees it."""
  rng = np.random.default_rng(0)
  student = create_model(
      name, num_classes=7, bits_w=bits, bits_a=bits,
      conv_kwargs=dict(weight_range_axis=-1 if per_channel else None),
      **kwargs)
  shape = (image_size, image_size, 3)
  # Compiled: op by op, init would compile each operation of each shape on
  # its own, most of the test's time; so is the calibration, whose ranges
  # both sides read. The reference below stays op by op, as ONNX Runtime
  # computes: compiled, XLA's fused arithmetic rounds otherwise, and over
  # MobileNetV2's 52 4-bit quantizers a value that crosses a rounding
  # boundary moves logits by up to 12%.
  variables = jax.jit(functools.partial(student.init, train=False))(
      jax.random.PRNGKey(0), jnp.zeros((1,) + shape))
  # Non-trivial BatchNorm statistics, as a trained network has.
  stats = jax.tree.map(
      lambda v: jnp.asarray(rng.uniform(0.5, 1.5, v.shape) if v.ndim and
                            float(v.reshape(-1)[0]) == 1.0 else
                            rng.normal(0, 0.1, v.shape), jnp.float32),
      variables['batch_stats'])
  variables = {'params': variables['params'], 'batch_stats': stats}
  _, feats = jax.eval_shape(
      lambda v: student.apply(v, jnp.zeros((1,) + shape), train=False),
      variables)
  head = TargetHead(4)
  head_params = head.init(jax.random.PRNGKey(1),
                          jnp.zeros(feats['pooled'].shape))['params']
  images = rng.normal(size=(6,) + shape).astype(np.float32)
  collecting = static_ranges.with_act_ranges(student, 'dynamic', 'minmax')
  _, state = jax.jit(functools.partial(
      collecting.apply, train=False, mutable=[layers.RANGES]))(
          dict(variables, **{layers.RANGES: static_ranges.empty_ranges(
              student, variables, shape)}), images)
  ranges = state[layers.RANGES]
  tensors, manifest = export.make_export(
      student, variables, head_params, ranges, shape, name=name,
      kwargs=kwargs, bits_w=bits, bits_a=bits,
      preprocess=dict(image_size=image_size, resize_to=None,
                      mean=[0.5] * 3, std=[0.25] * 3),
      class_names=['a', 'b', 'c', 'd'],
      activation_ranges=dict(source='calibration'))
  static = static_ranges.with_act_ranges(student, 'static')

  def reference(x):
    _, f = static.apply(dict(variables, **{layers.RANGES: ranges}), x,
                        train=False)
    return head.apply({'params': head_params}, f['pooled'])

  return tensors, manifest, reference, images


@pytest.mark.parametrize('name,bits,size,per_channel,kwargs', [
    ('resnet50', 4, 32, False, dict(widths=(4, 8, 8, 8))),
    ('mobilenet_v2', 4, 32, False, {}),
    ('small_resnet', 5, 12, True, dict(widths=(4, 8, 8, 8))),
])
def test_onnx_matches_static_fake_quant(name, bits, size, per_channel,
                                        kwargs):
  tensors, manifest, reference, images = _random_export(
      name, bits, size, per_channel, **kwargs)
  model = onnx_export.build_model(manifest, dtq_format.variables_of(manifest,
                                                                tensors))
  onnx.checker.check_model(model, full_check=True)
  got = _session(model).run([onnx_export.OUTPUT],
                            {onnx_export.INPUT: images})[0]
  want = np.asarray(reference(images))
  assert got.shape == want.shape == (6, 4)
  # Float Conv/BatchNorm in another summation order can move a value across
  # a rounding boundary of the next quantizer: close, not bit-equal.
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * scale)
  # Kernels are stored as codes: uint4 (4-bit) or the exact 5-bit values in
  # uint8, one DequantizeLinear per quantized convolution.
  inits = {i.name: i for i in model.graph.initializer}
  codes = [n for n in inits if n.endswith('/codes')]
  assert len(codes) == len(manifest['quantized_convs'])
  want_type = TensorProto.UINT4 if bits <= 4 else TensorProto.UINT8
  for n in codes:
    assert inits[n].data_type == want_type
    values = onnx.numpy_helper.to_array(inits[n]).astype(np.int32)
    assert values.min() >= 0 and values.max() <= 2**bits - 1
  ops = [n.op_type for n in model.graph.node]
  assert ops.count('DequantizeLinear') >= len(codes)
  assert ops.count('Conv') == len(
      [k for k in tensors if k.endswith('/codes')]) + 1  # + the stem.
  # The ranges read back are the exported ones.
  back = onnx_export.ranges(model)
  flat = static_ranges.layer_ranges(back)
  assert set(flat) == set(manifest['quantized_convs'])
  props = {p.key: p.value for p in model.metadata_props}
  assert json.loads(props['class_names']) == ['a', 'b', 'c', 'd']
  assert json.loads(props['input'])['shape'] == ['N', size, size, 3]
  assert json.loads(props['preprocess'])['mean'] == [0.5] * 3


# --------------------------------------------------------------------------
# The demo model, exported and checked from the command line.

_FILES = os.path.join(fmnist.get_config().dataset.data_dir,
                      'train-images-idx3-ubyte.gz')


@pytest.mark.skipif(
    not os.path.exists(_FILES),
    reason=f'{_FILES} is absent (apt-get install dataset-fashion-mnist)')
def test_quick_demo_exports_to_onnx(tmp_path, capsys):
  c = fmnist.get_config('quick')
  c.method = 'ft'
  c.compare_methods = ()
  c.pretrained = 'none'  # No teacher to train: the export is the subject.
  c.cache_dir = str(tmp_path / 'cache')
  c.model_kwargs.widths = (8, 16, 16, 16)
  c.quant.act_ranges = 'static'
  c.total_steps = 8
  c.eval_every_epochs = 1000
  c.max_eval_batches = 1
  c.eval_batch_size = 400
  workdir = str(tmp_path / 'ft')
  experiment.run(config_validation.validate(c), workdir)
  out = str(tmp_path / 'model.onnx')
  report_path = str(tmp_path / 'report.json')
  old_umask = os.umask(0o077)
  try:
    assert export_cli.main(['--workdir', workdir, '--format', 'onnx', '--out',
                        out, '--check', '--max_eval_batches', '1',
                        '--report', report_path]) == 0
  finally:
    os.umask(old_umask)
  assert 'same top-1, ONNX vs static fake quant' in capsys.readouterr().out
  assert stat.S_IMODE(os.stat(out).st_mode) == 0o644
  with open(report_path) as f:
    report = json.load(f)
  assert report['test_images'] == 400
  # ONNX Runtime and XLA sum each convolution in another order, and the
  # network quantizes every activation: an ulp can move one across a rounding
  # boundary. After 8 steps many test images sit near a tie of their top two
  # logits, so a few may flip (2 of 400 on a Zen 3 AMD EPYC with
  # quant.fused_vjp's weights); more would be an exporter bug.
  assert report['agreement_onnx_vs_static'] >= 0.99
  assert report['onnx']['accuracy'] == pytest.approx(
      report['static_fake_quant']['accuracy'], abs=0.1)
  model = onnx.load(out)
  onnx.checker.check_model(model, full_check=True)
  props = {p.key: p.value for p in model.metadata_props}
  # The demo's in-domain target: all ten classes, in label order.
  assert json.loads(props['class_names']) == list(
      sources.FASHION_MNIST_CLASSES)
  pre = json.loads(props['preprocess'])
  assert pre['image_size'] == 28 and pre['mean'] == [0.286]
  manifest = onnx_export.read_manifest(model)
  with open(os.path.join(workdir, 'seed_1', 'result.json')) as f:
    steps = json.load(f)['steps']
  assert manifest['source']['finished'] and manifest['source']['step'] == steps
  # Smaller than the float32 tensors it replaces.
  assert os.path.getsize(out) < manifest['sizes']['float32_same_tensors_bytes']


# --------------------------------------------------------------------------
# String paddings (none of the models uses them; a user's network may).


@pytest.mark.parametrize('padding,height,width,stride', [
    ('SAME', 7, 8, 2),   # odd total padding on one axis: the extra at the end
    ('SAME', 6, 6, 2),
    ('SAME', 5, 5, 1),
    ('SAME_LOWER', 7, 8, 2),  # the extra before the image
    ('VALID', 7, 8, 2),
])
def test_string_padding_matches_the_convolution(padding, height, width,
                                                 stride):
  conv = layers.QuantConv(3, (3, 3), strides=stride, padding=padding,
                          use_bias=False, bits_w=quant.FULL_PRECISION,
                          bits_a=quant.FULL_PRECISION)
  x = np.random.RandomState(0).randn(2, height, width, 2).astype(np.float32)
  variables = conv.init(jax.random.key(0), x)
  graph = onnx_export._Graph()  # pylint: disable=protected-access
  flat = {'params/backbone/c/kernel': variables['params']['kernel']}
  builder = onnx_export._Builder(graph, flat, {'c': conv})  # pylint: disable=protected-access
  nchw = graph.node('Transpose', ['x'], 'to_nchw', perm=[0, 3, 1, 2])
  y = builder.conv(nchw, 'c')
  graph.node('Transpose', [y], 'y', perm=[0, 2, 3, 1])
  model = helper.make_model(
      helper.make_graph(
          graph.nodes, 'conv',
          [helper.make_tensor_value_info('x', TensorProto.FLOAT,
                                         ['N', height, width, 2])],
          [helper.make_tensor_value_info('y', TensorProto.FLOAT, None)],
          graph.initializers),
      opset_imports=[helper.make_opsetid('', onnx_export.OPSET)])
  model.ir_version = 10
  got = _session(model).run(['y'], {'x': x})[0]
  want = np.asarray(conv.apply(variables, x))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_an_unexported_padding_is_named():
  conv = layers.QuantConv(3, (3, 3), padding='CIRCULAR',
                          bits_w=quant.FULL_PRECISION,
                          bits_a=quant.FULL_PRECISION)
  builder = onnx_export._Builder(  # pylint: disable=protected-access
      onnx_export._Graph(), {}, {'c': conv})  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="c: padding 'CIRCULAR' is not"):
    builder.conv('x', 'c')


# --------------------------------------------------------------------------
# Without the onnx extra.

@pytest.mark.parametrize('blocked,args,message', [
    ('onnx', ['--workdir', 'RUN', '--format', 'onnx'],
     'the ONNX export (--format onnx) needs onnx'),
    ('onnxruntime', ['--check'], 'checking an ONNX export needs onnxruntime'),
])
def test_without_the_onnx_extra_the_command_names_it(tmp_path, blocked, args,
                                                     message):
  # As after a plain `pip install .`; the command fails before any work.
  out = str(tmp_path / 'model.onnx')
  argv = [str(tmp_path) if a == 'RUN' else a for a in args] + ['--out', out]
  proc = commands.run_without('dtq_jax.export', argv, blocked)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      f"error: {message}: pip install 'dtq-jax[onnx]'"]
  assert not os.path.exists(out)


def test_the_onnx_graph_without_onnx_is_a_user_error(monkeypatch):
  for name in [n for n in sys.modules if n.split('.')[0] == 'onnx']:
    monkeypatch.setitem(sys.modules, name, None)
  monkeypatch.setitem(sys.modules, 'onnx', None)
  with pytest.raises(errors.UserError,
                     match=r"needs onnx: pip install 'dtq-jax\[onnx\]'"):
    onnx_export.build_model({'model': {}}, {})
