"""Exports of a user's own network: StableHLO, packed integers and ONNX.

A tiny run of examples/networks.py's VGG (plain Flax, named by import path)
trains on random images; each format is exported with the command, reloaded
and checked against the run's static-range fake quantization.
"""

import re
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import commands
from dtq_jax.deploy import dtq_format
from dtq_jax.deploy import export
from dtq_jax.deploy import stablehlo_export
from dtq_jax import export as export_cli
from dtq_jax import layers
from dtq_jax.method import networks
from dtq_jax.models import own_network
from dtq_jax.run import config_validation
from dtq_jax.run import experiment

VGG = 'examples.networks:VGG'


@pytest.fixture(scope='module')
def own_run(tmp_path_factory, tiny_folder):
  """A finished 4-bit DTQ run of a tiny VGG on 16 px random images."""
  root, config = tiny_folder
  c = config(root, 'quick,dtq')
  c.model = VGG
  c.model_kwargs = dict(stage_widths=(4, 8, 8, 8))
  workdir = str(tmp_path_factory.mktemp('own_run'))
  experiment.run(config_validation.validate(c), workdir)
  return workdir


def test_stablehlo_export_reloads_and_predicts_as_the_run(own_run, tmp_path):
  out = str(tmp_path / 'model.stablehlo')
  report = commands.export_report(own_run, out, tmp_path)
  assert report['format'] == 'stablehlo'
  assert report['test_images'] == 9
  assert report['agreement_stablehlo_vs_static'] == 1.0
  assert report['max_abs_logit_diff_stablehlo_vs_static'] < 1e-4
  manifest, predict = export_cli.load_stablehlo(out)
  assert manifest['model']['name'] == VGG
  # The own network's settings rebuild its student (keep_float, taps...).
  assert manifest['model']['own_network']['source_classifier'] == ''
  assert manifest['stablehlo']['platforms'] == ['cpu', 'cuda', 'tpu']
  # Every quantized layer's static range is recorded, and the first
  # convolution stays float.
  assert set(manifest['stablehlo']['activation_ranges']) == set(
      manifest['quantized_convs'])
  assert 'stage1/conv1' not in manifest['quantized_convs']
  # Any batch size: the batch dimension is symbolic.
  images = np.random.RandomState(0).normal(size=(5, 16, 16, 3))
  logits = np.asarray(predict(images.astype(np.float32)))
  assert logits.shape == (5, 3) and np.all(np.isfinite(logits))
  np.testing.assert_allclose(predict(images[:2].astype(np.float32)),
                             logits[:2], rtol=1e-5, atol=1e-5)
  # The same classes as the integer inference path of a .dtq export.
  dtq_out = str(tmp_path / 'model.dtq')
  report = commands.export_report(own_run, dtq_out, tmp_path)
  assert report['agreement_int_vs_static'] == 1.0
  _, int_predict = export.load_integer_model(dtq_out)
  np.testing.assert_array_equal(
      np.asarray(int_predict(images.astype(np.float32))).argmax(-1),
      logits.argmax(-1))
  with pytest.raises(TypeError, match='float32 images of shape'):
    predict(np.zeros((2, 8, 8, 3), np.float32))


def test_stablehlo_module_runs_on_accelerators_as_is(own_run, tmp_path):
  # Nothing in the lowered module is tied to the host: no float64, no host
  # callbacks, no CPU-only custom calls.
  out = str(tmp_path / 'model.stablehlo')
  export.export_run(own_run, out, verbose=False)
  _, exported = stablehlo_export.read(out)
  text = exported.mlir_module()
  assert not re.search(r'\bf64\b', text)
  # jax's own shape assertions (the symbolic batch) are the only calls.
  assert set(re.findall(r'custom_call @(\w+)', text)) <= {'shape_assertion'}
  assert 'callback' not in text
  # The quantized kernels are constants of integer codes, not floats.
  assert re.search(r"constant dense<[^>]*> : tensor<3x3x4x8xui8>", text)


@pytest.mark.parametrize('damage, message', [
    ('not_zip', 'not a dtq_jax StableHLO export'),
    ('no_module', 'not a dtq_jax StableHLO export'),
    ('bad_module', 'does not deserialize'),
])
def test_damaged_stablehlo_file_is_one_line(own_run, tmp_path, capsys,
                                            damage, message):
  good = str(tmp_path / 'good.stablehlo')
  export.export_run(own_run, good, verbose=False)
  bad = str(tmp_path / 'bad.stablehlo')
  with zipfile.ZipFile(good) as z:
    manifest = z.read(stablehlo_export.MANIFEST)
  if damage == 'not_zip':
    with open(bad, 'wb') as f:
      f.write(b'garbage')
  else:
    with zipfile.ZipFile(bad, 'w') as z:
      z.writestr(stablehlo_export.MANIFEST, manifest)
      if damage == 'bad_module':
        z.writestr(stablehlo_export.MODULE, b'\x00' * 64)
  assert export_cli.main(['--out', bad, '--check']) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1, err


def test_dtq_export_keeps_only_the_quantized_kernels_as_codes(own_run,
                                                              tmp_path):
  out = str(tmp_path / 'model.dtq')
  export.export_run(own_run, out, verbose=False)
  manifest, variables = dtq_format.read(out)
  convs = manifest['quantized_convs']
  assert sorted(convs) == ['stage2/conv1', 'stage3/conv1', 'stage4/conv1']
  backbone = variables['params']['backbone']
  # The source classifier is not exported; the float first convolution is.
  assert 'classifier' not in backbone
  assert 'kernel' in backbone['stage1']['conv1']
  assert 'conv1' not in backbone['stage2']  # codes only, no float kernel
  codes = variables['int_weights']['backbone']['stage2']['conv1']['codes']
  assert codes.dtype == np.uint8 and codes.max() <= 15


def test_onnx_export_of_own_network_agrees_with_the_run(own_run, tmp_path):
  onnx = pytest.importorskip('onnx')
  out = str(tmp_path / 'model.onnx')
  report = commands.export_report(own_run, out, tmp_path)
  assert report['agreement_onnx_vs_static'] == 1.0
  assert report['max_abs_logit_diff_onnx_vs_static'] < 1e-4
  model = onnx.load(out)
  # Integer weights: the quantized kernels are code initializers, the
  # float kernels of those layers are not in the file.
  types = {i.name: i.data_type for i in model.graph.initializer}
  codes = 'int_weights/backbone/stage2/conv1/codes'
  assert types[codes] in (onnx.TensorProto.UINT4, onnx.TensorProto.UINT8)
  assert 'params/backbone/stage2/conv1/kernel' not in types
  assert 'params/backbone/classifier/kernel' not in types
  # The metadata carries the manifest, as for the zoo's graphs.
  props = {p.key for p in model.metadata_props}
  assert {'class_names', 'preprocess', 'dtq_manifest'} <= props


class CumsumNet(nn.Module):
  """A network with an operation ONNX has no translation for here."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.Conv(4, (3, 3), name='stem')(x))
    x = nn.Conv(8, (3, 3), name='body')(x)
    x = jnp.cumsum(x, axis=1)
    return nn.Dense(self.num_classes, name='fc')(x.mean(axis=(1, 2)))


def test_onnx_refuses_an_operation_it_cannot_translate_in_one_line(
    tmp_path):
  # The StableHLO export of the same network works.
  shape = (8, 8, 3)
  student = own_network.create(
      f'{__name__}:CumsumNet', 3, shape, bits_w=4, bits_a=4,
      conv_kwargs=layers.QuantSettings().as_conv_kwargs())
  variables = networks.init_variables(student, jax.random.key(0), shape)
  head = {'fc': {'kernel': np.ones((8, 2), np.float32),
                 'bias': np.zeros((2,), np.float32)}}
  ranges = {'body': {'lo': np.float32(0.0), 'hi': np.float32(2.0)}}
  tensors, manifest = export.make_export(
      student, variables, head, ranges, shape, name=f'{__name__}:CumsumNet',
      kwargs={}, bits_w=4, bits_a=4, preprocess={}, class_names=None,
      activation_ranges='test', own_network=dict(source_classifier='fc'))
  with pytest.raises(ValueError) as e:
    export.write_onnx(str(tmp_path / 'm.onnx'), manifest, tensors)
  message = str(e.value)
  assert len(message.splitlines()) == 1
  assert "'cumsum'" in message and '--format stablehlo' in message
  stablehlo_export.write(str(tmp_path / 'm.stablehlo'), manifest,
                         dtq_format.variables_of(manifest, tensors))
  _, predict = stablehlo_export.load(str(tmp_path / 'm.stablehlo'))
  assert predict(np.ones((2,) + shape, np.float32)).shape == (2, 2)
