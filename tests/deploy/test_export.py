"""Export to packed integers, and the integer inference path."""

import hashlib
import json
import math
import os
import shutil
import stat
import subprocess
import sys

from flax import linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import commands
import data_files
from dtq_jax.deploy import dtq_format
from dtq_jax.deploy import export
from dtq_jax.deploy import runs
from dtq_jax.deploy import int_inference
from dtq_jax import export as export_cli
from dtq_jax import layers
from dtq_jax.models import create_model
from dtq_jax import quant
from dtq_jax.run import config_validation
from dtq_jax.run import experiment

DIMS = ('NHWC', 'HWIO', 'NHWC')
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


# --------------------------------------------------------------------------
# Bit packing.


@pytest.mark.parametrize('bits', range(2, 9))
def test_pack_round_trip(bits):
  rng = np.random.default_rng(bits)
  for count in (0, 1, 7, 8, 9, 1001):
    codes = rng.integers(0, 2**bits, size=count)
    if count:
      codes[0], codes[-1] = 2**bits - 1, 0  # Both extremes.
    packed = dtq_format.pack(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.size == math.ceil(count * bits / 8)  # No padding to bytes.
    np.testing.assert_array_equal(dtq_format.unpack(packed, bits, count), codes)


def test_pack_layout():
  # 4 bits: two codes per byte, the first in the low nibble.
  np.testing.assert_array_equal(dtq_format.pack([1, 2, 15, 0, 7], 4),
                                [0x21, 0x0F, 0x07])
  # 5 bits: 8 codes in 5 bytes, LSB first. Codes 31, 0, 1: bits
  # 11111 00000 10000 -> byte 0 = 0b00011111, byte 1 = 0b00000100 (bit 10).
  np.testing.assert_array_equal(dtq_format.pack([31, 0, 1], 5), [0x1F, 0x04])
  assert dtq_format.pack(np.zeros(8), 5).size == 5
  with pytest.raises(ValueError, match='outside'):
    dtq_format.pack([16], 4)
  with pytest.raises(ValueError, match='bytes'):
    dtq_format.unpack(np.zeros(3, np.uint8), 4, 7)


# --------------------------------------------------------------------------
# Integer convolution against the fake-quant convolution.


def _np_terms(codes_a, codes_w, strides, padding, groups):
  """A, B, C, D of int_inference by explicit loops over valid taps."""
  codes_a = np.asarray(codes_a, np.int64)
  codes_w = np.asarray(codes_w, np.int64)
  (pt, pb), (pl, pr) = padding
  n, h, w, cin = codes_a.shape
  kh, kw, cin_g, cout = codes_w.shape
  padded = np.pad(codes_a, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  valid = np.pad(np.ones((1, h, w, cin), np.int64),
                 ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho = (h + pt + pb - kh) // strides[0] + 1
  wo = (w + pl + pr - kw) // strides[1] + 1
  terms = [np.zeros((n, ho, wo, cout), np.int64) for _ in range(4)]
  per_group = cout // groups
  for i in range(ho):
    for j in range(wo):
      rows = slice(i * strides[0], i * strides[0] + kh)
      cols = slice(j * strides[1], j * strides[1] + kw)
      for o in range(cout):
        g = o // per_group
        chans = slice(g * cin_g, (g + 1) * cin_g)
        a = padded[:, rows, cols, chans]
        m = valid[:, rows, cols, chans]
        wk = codes_w[..., o]
        terms[0][:, i, j, o] = np.sum(a * wk, axis=(1, 2, 3))
        terms[1][:, i, j, o] = np.sum(a, axis=(1, 2, 3))
        terms[2][:, i, j, o] = np.sum(m * wk)
        terms[3][:, i, j, o] = np.sum(m)
  return terms


@pytest.mark.parametrize('groups,cin,cout,k,stride,pad,bits,axis', [
    (1, 3, 4, 3, 1, 1, 4, None),   # 3x3, zero padding at the border.
    (1, 3, 4, 3, 2, 1, 5, None),   # strided, 5 bits.
    (4, 4, 4, 3, 2, 1, 4, None),   # depthwise.
    (2, 4, 6, 1, 1, 0, 8, -1),     # grouped 1x1, per-channel kernel ranges.
    (1, 3, 2, 3, 1, 0, 2, None),   # no padding, 2 bits.
])
def test_int_conv_matches_fake_quant_conv(groups, cin, cout, k, stride, pad,
                                          bits, axis):
  rng = np.random.default_rng(k * 10 + groups + bits)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin // groups, cout)), jnp.float32)
  lo_a, hi_a = -0.8, 1.3  # Static range: some inputs are clipped.
  padding = ((pad, pad), (pad, pad))
  strides = (stride, stride)
  squeeze = (lambda v: v.reshape(-1)) if axis is not None else (
      lambda v: v.reshape(()))

  @jax.jit
  def compute(x, w):
    codes_a = quant.quantize(x, bits, lo_a, hi_a)
    xq = quant.fake_quant_range(x, bits, lo_a, hi_a)
    lo_w, hi_w = quant.tensor_range(w, axis)
    codes_w = quant.quantize(w, bits, lo_w, hi_w)
    wq = quant.fake_quant(w, bits, axis=axis)
    terms = int_inference.int_conv_terms(codes_a, codes_w, strides, padding,
                                         groups)
    y = int_inference.int_conv(x, codes_w, squeeze(lo_w), squeeze(hi_w),
                               bits, lo_a, hi_a, bits, strides, padding,
                               groups)
    ref = jax.lax.conv_general_dilated(xq, wq, strides, padding,
                                       dimension_numbers=DIMS,
                                       feature_group_count=groups)
    return dict(codes_a=codes_a, xq=xq, codes_w=codes_w, wq=wq, terms=terms,
                dequantized_w=quant.dequantize(codes_w, bits, lo_w, hi_w),
                y=y, ref=ref)

  r = jax.device_get(compute(x, w))
  # Codes: those of the fake quantizers, exactly.
  s_a = np.float32((hi_a - lo_a) / (2**bits - 1))
  np.testing.assert_array_equal(r['codes_a'],
                                np.round((r['xq'] - np.float32(lo_a)) / s_a))
  np.testing.assert_allclose(r['dequantized_w'], r['wq'], rtol=0, atol=1e-6)
  assert r['codes_w'].min() == 0 and r['codes_w'].max() == 2**bits - 1
  # The four integer sums, exactly.
  expected = _np_terms(r['codes_a'], r['codes_w'], strides, padding, groups)
  for got, want in zip(r['terms'], expected):
    assert got.dtype == np.int32
    np.testing.assert_array_equal(np.broadcast_to(got, want.shape), want)
  # Dequantized: the float convolution of the fake-quantized tensors.
  scale = float(np.max(np.abs(r['ref'])))
  np.testing.assert_allclose(r['y'], r['ref'], rtol=0, atol=1e-5 * scale)


def test_int32_overflow_is_refused():
  int_inference.check_int32((3, 3, 512, 64), 8, 8)
  with pytest.raises(ValueError, match='overflow'):
    int_inference.check_int32((3, 3, 4096, 64), 8, 8)


# --------------------------------------------------------------------------
# Export, load, infer: a tiny trained run.


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory, tiny_folder):
  """A finished 5-bit FT-Q run of the tiny demo ResNet on random images."""
  root, config = tiny_folder
  c = config(root, 'quick,ft,5bit')
  workdir = str(tmp_path_factory.mktemp('run'))
  experiment.run(config_validation.validate(c), workdir)
  return workdir


def test_export_load_infer(tiny_run, tmp_path):
  out = str(tmp_path / 'model.dtq')
  report_path = str(tmp_path / 'report.json')
  assert export_cli.main(['--workdir', tiny_run, '--out', out, '--check',
                      '--report', report_path]) == 0
  manifest, variables = dtq_format.read(out)
  assert manifest['format'] == dtq_format.FORMAT
  assert manifest['model']['bits_w'] == manifest['model']['bits_a'] == 5
  # Every convolution but the stem is quantized and stored as 5-bit codes,
  # packed 8 codes per 5 bytes.
  convs = manifest['quantized_convs']
  assert len(convs) == 11 and 'conv1' not in convs
  for path, info in convs.items():
    name = f'int_weights/backbone/{path}/codes'
    shape = tuple(info['kernel_shape'])
    assert manifest['packed'][name] == {'bits': 5, 'shape': list(shape)}
    codes = variables['int_weights']['backbone']
    for key in path.split('/'):
      codes = codes[key]
    assert codes['codes'].shape == shape and codes['codes'].max() <= 31
    # Per-tensor ranges are scalars, as the format documents.
    assert codes['lo'].shape == codes['hi'].shape == ()
    ranges = variables['quant_ranges']['backbone']
    for key in path.split('/'):
      ranges = ranges[key]
    assert ranges['lo'].shape == ranges['hi'].shape == ()
  sizes = manifest['sizes']
  kernel_elements = sum(math.prod(c['kernel_shape']) for c in convs.values())
  assert sizes['float32_kernel_bytes'] == 4 * kernel_elements
  assert sizes['packed_kernel_bytes'] == sum(
      math.ceil(math.prod(c['kernel_shape']) * 5 / 8) for c in convs.values())
  assert sizes['tensor_bytes'] < sizes['float32_same_tensors_bytes']
  assert manifest['activation_ranges']['source'] == 'calibration'
  assert 'fc' not in variables['params']['backbone']  # Source classifier.
  # The integer path reproduces the static-range fake-quant evaluation.
  with open(report_path) as f:
    report = json.load(f)
  assert report['test_images'] == 9
  assert report['agreement_int_vs_static'] == 1.0
  assert report['max_abs_logit_diff_int_vs_static'] < 1e-3
  assert report['int']['accuracy'] == report['static_fake_quant']['accuracy']
  # The loaded model predicts from images alone.
  _, predict = export.load_integer_model(out)
  logits = predict(jnp.zeros((2, 16, 16, 3)))
  assert logits.shape == (2, 3) and np.all(np.isfinite(logits))


def test_zoo_network_exports_to_stablehlo_too(tiny_run, tmp_path):
  out = str(tmp_path / 'model.stablehlo')
  report_path = str(tmp_path / 'report.json')
  assert export_cli.main(['--workdir', tiny_run, '--out', out, '--check',
                          '--report', report_path]) == 0
  with open(report_path) as f:
    report = json.load(f)
  assert report['agreement_stablehlo_vs_static'] == 1.0
  assert report['max_abs_logit_diff_stablehlo_vs_static'] < 1e-3
  manifest, predict = export_cli.load_stablehlo(out)
  assert len(manifest['stablehlo']['activation_ranges']) == 11
  _, int_predict = export.load_integer_model(
      _export_dtq(tiny_run, tmp_path))
  images = np.random.RandomState(1).normal(size=(4, 16, 16, 3))
  images = images.astype(np.float32)
  np.testing.assert_allclose(predict(images), int_predict(images),
                             rtol=1e-4, atol=1e-4)


def _export_dtq(workdir, tmp_path):
  out = str(tmp_path / 'model.dtq')
  export.export_run(workdir, out, verbose=False)
  return out


def _export_command(*args):
  return subprocess.run([sys.executable, '-m', 'dtq_jax.export', *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=300,
                        check=False)


def test_export_command_hides_library_notes_unless_verbose(tiny_run,
                                                           tmp_path):
  # Issue #29: orbax's "Given directory is read only" (the checkpoints are
  # opened read only on purpose) and TensorFlow's oneDNN banner, twice.
  out = str(tmp_path / 'model.dtq')
  proc = _export_command('--workdir', tiny_run, '--out', out)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'read only' not in proc.stderr, proc.stderr
  assert 'oneDNN' not in proc.stderr, proc.stderr
  assert proc.stdout.startswith(f'{out}: ')
  proc = _export_command('--workdir', tiny_run, '--out', out,
                         '--verbosity', '0')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'Given directory is read only' in proc.stderr


def test_without_the_train_extra_the_command_names_it(tmp_path):
  # A base install (no TensorFlow) loads exports; exporting or checking one
  # reads the run's data with TensorFlow.
  out = str(tmp_path / 'model.dtq')
  proc = commands.run_without('dtq_jax.export', ['--out', out, '--check'],
                              'tensorflow')
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      "error: python -m dtq_jax.export reads the run's data and needs "
      "tensorflow: pip install 'dtq-jax[train]'"]


def test_export_refuses_a_folder_without_a_run(tmp_path, capsys):
  assert export_cli.main(['--workdir', str(tmp_path), '--out',
                      str(tmp_path / 'm.dtq')]) == 2
  assert 'config.json' in capsys.readouterr().err


# --------------------------------------------------------------------------
# The interface of the file, and its integrity.


@pytest.fixture(scope='module')
def exported(tiny_run, tmp_path_factory):
  """The tiny run exported once: ``(path, manifest, tensors)``."""
  path = str(tmp_path_factory.mktemp('exported') / 'model.dtq')
  old_umask = os.umask(0o077)  # The file's mode must not depend on it.
  try:
    assert export_cli.main(['--workdir', tiny_run, '--out', path]) == 0
  finally:
    os.umask(old_umask)
  with safetensors.safe_open(path, framework='np') as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
    manifest = json.loads(f.metadata()[dtq_format.MANIFEST_KEY])
  return path, manifest, tensors


def test_manifest_names_classes_and_preprocessing(exported):
  path, manifest, _ = exported
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
  assert manifest['version'] == 2
  assert manifest['class_names'] == ['class0', 'class1', 'class2']
  assert manifest['preprocess'] == dict(
      image_size=16, resize_to=18, mean=manifest['preprocess']['mean'],
      std=manifest['preprocess']['std'], layout='NHWC', dtype='float32')
  assert manifest['source']['finished'] is True
  assert manifest['source']['step'] > 0
  assert set(manifest['checksums']) == set(exported[2])
  _, predict = export.load_integer_model(path)
  with pytest.raises(TypeError, match='uint8 pixels'):
    predict(np.zeros((1, 16, 16, 3), np.uint8))
  assert predict(np.zeros((1, 16, 16, 3), np.float32)).shape == (1, 3)


def _header(path):
  with open(path, 'rb') as f:
    data = f.read()
  n = int.from_bytes(data[:8], 'little')
  return data, 8 + n, json.loads(data[8:8 + n])


def _patched(path, out, name, new_bytes):
  """``path`` with tensor ``name``'s first bytes overwritten in place."""
  data, start, header = _header(path)
  offset = start + header[name]['data_offsets'][0]
  data = data[:offset] + new_bytes + data[offset + len(new_bytes):]
  with open(out, 'wb') as f:
    f.write(data)


def _damage(kind, exported, out):
  """Writes a damaged or inconsistent copy of the export to ``out``."""
  path, manifest, tensors = exported
  codes = sorted(k for k in tensors if k.endswith('/codes'))[0]
  act_lo = sorted(k for k in tensors if k.startswith('quant_ranges/') and
                  k.endswith('/lo'))[0]
  meta = {dtq_format.MANIFEST_KEY: json.dumps(manifest, sort_keys=True)}
  meta[dtq_format.MANIFEST_CHECKSUM_KEY] = hashlib.sha256(
      meta[dtq_format.MANIFEST_KEY].encode()).hexdigest()
  if kind == 'flipped_code_bytes':
    flipped = bytes(255 - b for b in tensors[codes][:16].tobytes())
    _patched(path, out, codes, flipped)
  elif kind == 'nan_range_bytes':
    _patched(path, out, act_lo, np.float32(np.nan).tobytes())
  elif kind == 'nan_range_rewritten':
    dtq_format.write(out, dict(tensors, **{act_lo: np.float32(np.nan)}), manifest)
  elif kind == 'manifest_edited':  # 2 bits over 4-bit codes, checksum old.
    edited = json.loads(meta[dtq_format.MANIFEST_KEY])
    edited['model']['bits_w'] = 2
    safetensors.numpy.save_file(tensors, out, metadata={
        dtq_format.MANIFEST_KEY: json.dumps(edited, sort_keys=True),
        dtq_format.MANIFEST_CHECKSUM_KEY: meta[dtq_format.MANIFEST_CHECKSUM_KEY]})
  elif kind == 'manifest_bits_rewritten':  # The same, checksums recomputed.
    edited = json.loads(meta[dtq_format.MANIFEST_KEY])
    edited['model']['bits_w'] = 2
    for info in edited['quantized_convs'].values():
      info['bits_w'] = 2
    dtq_format.write(out, tensors, edited)
  elif kind == 'missing_tensor':
    safetensors.numpy.save_file(
        {k: v for k, v in tensors.items() if k != codes}, out, metadata=meta)
  elif kind == 'kwargs_do_not_fit':
    edited = json.loads(meta[dtq_format.MANIFEST_KEY])
    edited['model']['kwargs'] = dict(widths=[8, 8, 8, 8])
    dtq_format.write(out, tensors, edited)
  elif kind == 'truncated':
    with open(path, 'rb') as f:
      data = f.read()
    with open(out, 'wb') as f:
      f.write(data[:len(data) // 2])
  elif kind == 'garbage':
    with open(out, 'wb') as f:
      f.write(np.random.default_rng(0).bytes(5000))
  else:
    raise ValueError(kind)


@pytest.mark.parametrize('kind,message', [
    ('flipped_code_bytes', 'does not match its checksum'),
    ('nan_range_bytes', 'does not match its checksum'),
    ('nan_range_rewritten', 'is not finite'),
    ('manifest_edited', 'manifest does not match its checksum'),
    ('manifest_bits_rewritten', 'contradicts itself'),
    ('missing_tensor', 'is missing'),
    ('kwargs_do_not_fit', 'does not fit the stored tensors'),
    ('truncated', 'not a readable .dtq file'),
    ('garbage', 'not a readable .dtq file'),
])
def test_damaged_export_is_refused_in_one_line(exported, tmp_path, capsys,
                                               kind, message):
  out = str(tmp_path / 'damaged.dtq')
  _damage(kind, exported, out)
  with pytest.raises(ValueError, match=message):
    export.load_integer_model(out)
  assert export_cli.main(['--out', out, '--check']) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('error: ') and len(err.splitlines()) == 1, err
  assert message in err and out in err


def test_export_refuses_a_folder_as_out(tiny_run, tmp_path, capsys):
  assert export_cli.main(['--workdir', tiny_run, '--out', str(tmp_path)]) == 2
  err = capsys.readouterr().err.strip()
  assert 'is a folder' in err and len(err.splitlines()) == 1


def _copy_run(tiny_run, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(tiny_run, workdir)
  (seed,) = runs.seed_dirs(workdir).values()
  return workdir, seed


def test_unfinished_run_needs_allow_unfinished(tiny_run, tmp_path, capsys):
  workdir, seed = _copy_run(tiny_run, tmp_path)
  os.remove(os.path.join(seed, 'result.json'))
  out = str(tmp_path / 'model.dtq')
  assert export_cli.main(['--workdir', workdir, '--out', out]) == 2
  err = capsys.readouterr().err.strip()
  assert 'did not finish' in err and '--allow_unfinished' in err
  assert not os.path.exists(out)
  assert export_cli.main(['--workdir', workdir, '--out', out,
                      '--allow_unfinished']) == 0
  manifest, _ = dtq_format.read(out)
  assert manifest['source']['finished'] is False
  steps = [int(s) for s in os.listdir(os.path.join(seed, 'checkpoints'))
           if s.isdigit()]
  assert manifest['source']['step'] == max(steps)


def _garble(step_dir):
  for root, _, names in os.walk(step_dir):
    for name in names:
      with open(os.path.join(root, name), 'w') as f:
        f.write('garbage')


def _damaged_newest_step(tiny_run, tmp_path, damage):
  """A copy of the run with a later step (a copy of its last, with the
  copied checksum) damaged by ``damage(step_dir)``.

  Returns:
    ``(workdir, damaged step folder, last intact step)``.
  """
  workdir, seed = _copy_run(tiny_run, tmp_path)
  ckpts = os.path.join(seed, 'checkpoints')
  last = max(int(s) for s in os.listdir(ckpts) if s.isdigit())
  damaged = os.path.join(ckpts, str(last + 100))
  shutil.copytree(os.path.join(ckpts, str(last)), damaged)
  damage(damaged)
  return workdir, damaged, last


def test_garbage_newest_checkpoint_falls_back_and_says_so(tiny_run, tmp_path,
                                                          capsys):
  workdir, garbage, last = _damaged_newest_step(tiny_run, tmp_path, _garble)
  out = str(tmp_path / 'm.dtq')
  assert export_cli.main(['--workdir', workdir, '--out', out]) == 0
  said = capsys.readouterr().out
  # The damaged step is named, with how to clear it; the intact one exported.
  assert f'checkpoint {garbage} is unreadable' in said
  assert f'Move {garbage} aside' in said
  manifest, _ = dtq_format.read(out)
  assert manifest['source']['step'] == last


def test_changed_value_in_the_newest_checkpoint_is_caught(tiny_run, tmp_path,
                                                          capsys):
  # A value that still decodes: only the checksum saved with the state
  # finds it. Export names the step and exports the intact one before it.
  workdir, damaged, last = _damaged_newest_step(
      tiny_run, tmp_path, data_files.change_checkpoint_value)
  out = str(tmp_path / 'm.dtq')
  assert export_cli.main(['--workdir', workdir, '--out', out]) == 0
  said = capsys.readouterr().out
  assert f'checkpoint {damaged} is unreadable or damaged' in said
  assert 'do not match the checksum' in said
  manifest, _ = dtq_format.read(out)
  assert manifest['source']['step'] == last


def test_every_checkpoint_damaged_is_one_line(tiny_run, tmp_path, capsys):
  workdir, seed = _copy_run(tiny_run, tmp_path)
  ckpts = os.path.join(seed, 'checkpoints')
  for name in os.listdir(ckpts):
    if name.isdigit():
      _garble(os.path.join(ckpts, name))
  assert export_cli.main(['--workdir', workdir,
                      '--out', str(tmp_path / 'm.dtq')]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert 'no readable checkpoint in' in err and ckpts in err




def test_quantized_convs_match_the_stored_kernels_or_name_the_layer():
  student = create_model('small_resnet', num_classes=3, bits_w=4, bits_a=4,
                         conv=layers.QuantConv, widths=(4, 8, 8, 8))
  variables = student.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))
  convs = export.quantized_convs(student, variables, (16, 16, 1))
  # Every convolution but the full-precision stem, with its stored shape.
  assert 'conv1' not in convs and len(convs) == 11
  flat = traverse_util.flatten_dict(variables['params'], sep='/')
  for path, info in convs.items():
    assert info['kernel_shape'] == list(flat[f'{path}/kernel'].shape), path
    assert info['bits_w'] == info['bits_a'] == 4
  path = sorted(convs)[0]
  # One output channel too few.
  flat[f'{path}/kernel'] = flat[f'{path}/kernel'][..., :1]
  params = traverse_util.unflatten_dict(flat, sep='/')
  with pytest.raises(ValueError, match=f'convolution {path}: the stored '
                     'kernel'):
    export.quantized_convs(student, dict(variables, params=params),
                           (16, 16, 1))


class _OneConv(nn.Module):
  """A network whose convolution gives its stride as one int."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return layers.QuantConv(4, (3, 3), strides=2, use_bias=False, bits_w=4,
                            bits_a=4)(x)


def test_quantized_convs_take_an_int_stride_and_check_the_kernel_rank():
  net = _OneConv()
  variables = net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  convs = export.quantized_convs(net, variables, (8, 8, 3))
  assert list(convs) == ['QuantConv_0']
  assert convs['QuantConv_0']['strides'] == [2, 2]
  assert convs['QuantConv_0']['kernel_shape'] == [3, 3, 3, 4]
  damaged = jax.tree.map(lambda a: a, variables)
  damaged['params']['QuantConv_0']['kernel'] = jnp.zeros((3, 3, 4))
  with pytest.raises(ValueError, match='convolution QuantConv_0: the stored '
                     r'kernel \(3, 3, 4\)'):
    export.quantized_convs(net, damaged, (8, 8, 3))
