"""Exports a trained student as packed integer weights, and checks it.

  python -m dtq_jax.export --workdir runs/fmnist/dtq --out model.dtq
  python -m dtq_jax.export --workdir runs/fmnist/dtq --out model.dtq --check
  python -m dtq_jax.export --out model.dtq --check

``--workdir`` is the folder of a finished single-method run (``config.json``
and ``seed_N/``); the student of its first seed (``--seed``), latest
checkpoint (``--best``: the best one) is written to ``--out``. ``--check``
runs the integer inference path (int_inference.py) of ``--out`` on the test
set; with ``--workdir`` it also evaluates the checkpoint with fake
quantization, static ranges (the exported ones) and dynamic ranges (the
paper's), and reports how often the top-1 predictions agree.

File format (``.dtq``, version 1)
---------------------------------
A safetensors file (https://github.com/huggingface/safetensors: an 8-byte
little-endian header length, a JSON header naming every tensor's dtype, shape
and byte range, then the raw little-endian data; no pickle). Its header
metadata holds one entry, ``"dtq_manifest"``: a JSON document with

* ``format`` ("dtq-jax-export"), ``version`` (1);
* ``model``: ``name``, ``kwargs`` (for ``models.create_model``), ``bits_w``,
  ``bits_a``, ``weight_range_axis`` (null: one kernel range per tensor; -1:
  per output channel), ``classifier_name``, ``num_classes`` (target),
  ``feature_dim``, ``image_shape``; the frozen *source* classifier is not
  exported (``source_classifier: "omitted"``);
* ``preprocess``: ``image_size``, ``resize_to``, ``mean``, ``std``: the
  network's input is ``(pixels / 255 - mean) / std`` after resizing and centre
  cropping;
* ``quantized_convs``: per quantized convolution (path as below): ``bits_w``,
  ``bits_a``, ``kernel_shape`` (HWIO), ``strides``, ``padding`` (pairs),
  ``groups``;
* ``packed``: per packed tensor: ``bits``, ``shape`` (of the codes);
* ``activation_ranges``: where the static ranges come from (``source``:
  "training" or "calibration", ``stat``, ``batches``, ``batch_size``,
  ``images``);
* ``sizes`` (bytes), ``source`` (workdir, seed, checkpoint, step) and the
  run's ``config``.

Tensors are named ``<collection>/<module path>/<name>``:

* ``params/backbone/...``, ``batch_stats/backbone/...``: float32 parameters
  and BatchNorm statistics that stay full precision (stem convolution,
  BatchNorm scale/bias/mean/var, biases), exactly as in the Flax model;
  ``params/head/fc/{kernel,bias}``: the target classifier;
* ``int_weights/backbone/<conv>/codes``: uint8, the kernel's unsigned codes
  ``c = round((w - lo) / s)``, ``s = (hi - lo) / (2**bits - 1)``, in row-major
  HWIO order, bit-packed: code ``i`` occupies bits ``i*bits .. i*bits+bits-1``
  of the stream, least significant bit first, stream bit ``j`` being bit
  ``j % 8`` of byte ``j // 8`` (4-bit: two codes per byte, the first in the
  low nibble; 5-bit: 8 codes per 5 bytes); the last byte is zero-padded;
* ``int_weights/backbone/<conv>/{lo,hi}``: float32 kernel range, shape ()
  or (Cout,); the kernel's value is ``c * s + lo``;
* ``quant_ranges/backbone/<conv>/{lo,hi}``: float32 scalars, the static range
  of the convolution's input; its codes are
  ``round((clip(x, lo, hi) - lo) / s_a)``.
"""

import argparse
import json
import math
import os
import sys
import time

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from safetensors import safe_open
import safetensors.numpy

from dtq_jax import files
from dtq_jax import int_inference
from dtq_jax import layers
from dtq_jax import networks
from dtq_jax import quant
from dtq_jax import static_ranges

FORMAT = 'dtq-jax-export'
VERSION = 1
MANIFEST_KEY = 'dtq_manifest'
CONFIG = 'config.json'


# --------------------------------------------------------------------------
# Bit packing.


def packed_size(count, bits):
  """Bytes of ``count`` packed ``bits``-bit codes."""
  return -(-count * bits // 8)


def pack(codes, bits):
  """Packs unsigned codes, ``bits`` each, LSB first, into a uint8 stream.

  Args:
    codes: integer array, every value in ``[0, 2**bits)``; flattened in
      row-major order.
    bits: 1..16.

  Returns:
    1-D uint8 array of ``packed_size(codes.size, bits)`` bytes.
  """
  if not 1 <= bits <= 16:
    raise ValueError(f'bits={bits}; packing takes 1..16.')
  codes = np.asarray(codes).reshape(-1)
  if codes.size and (codes.min() < 0 or codes.max() >= 2**bits):
    raise ValueError(f'codes outside [0, {2**bits}) cannot be packed into '
                     f'{bits} bits.')
  codes = codes.astype(np.uint32)
  planes = ((codes[:, None] >> np.arange(bits, dtype=np.uint32)) & 1)
  return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder='little')


def unpack(packed, bits, count):
  """Inverse of ``pack``: ``count`` codes (uint8, or uint16 above 8 bits)."""
  packed = np.asarray(packed, np.uint8).reshape(-1)
  if packed.size != packed_size(count, bits):
    raise ValueError(f'{packed.size} bytes hold {count} {bits}-bit codes in '
                     f'{packed_size(count, bits)} bytes.')
  planes = np.unpackbits(packed, count=count * bits, bitorder='little')
  planes = planes.reshape(count, bits).astype(np.uint32)
  codes = (planes << np.arange(bits, dtype=np.uint32)).sum(axis=1)
  return codes.astype(np.uint8 if bits <= 8 else np.uint16)


# --------------------------------------------------------------------------
# Reading a run.


def load_config(workdir):
  """The run's config (``workdir/config.json``) as a ConfigDict."""
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: --workdir must be the folder '
                            'of one method (with config.json and seed_N/).')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def seed_dirs(workdir):
  """``{seed: folder}`` of the run's repeats."""
  out = {}
  for name in os.listdir(workdir):
    if name.startswith('seed_') and name[5:].isdigit():
      out[int(name[5:])] = os.path.join(workdir, name)
  return dict(sorted(out.items()))


def restore_state(run_dir, best=False):
  """The saved training state of one repeat as nested dicts.

  Returns:
    ``(state, step)``; ``state`` has ``params``, ``batch_stats`` and, if the
    run collected them, ``quant_ranges``.
  """
  mngr = ocp.CheckpointManager(
      os.path.abspath(os.path.join(run_dir, 'best' if best else
                                   'checkpoints')),
      item_names=('state', 'meta'),
      options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {run_dir}.')
  # Onto this process's first device, wherever the checkpoint was written.
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(
          fallback_sharding=jax.sharding.SingleDeviceSharding(
              jax.local_devices()[0]))))
  state = jax.device_get(dict(restored.state))
  return state, int(step)


class _FirstConv(Exception):
  """Carries the input channels of the network's first convolution."""


def _image_shape(student, variables, size):
  """(size, size, C), C from the kernel of the student's first convolution."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (isinstance(module, layers.QuantConv) and
        context.method_name == '__call__'):
      kernel = module.get_variable('params', 'kernel')
      raise _FirstConv(kernel.shape[2] * module.feature_group_count)
    return next_fun(*args, **kwargs)

  images = jnp.zeros((1, size, size, 1), jnp.float32)
  try:
    with nn.intercept_methods(interceptor):
      jax.eval_shape(lambda v, x: student.apply(v, x, train=False), variables,
                     images)
  except _FirstConv as found:
    return (size, size, int(found.args[0]))
  raise ValueError('the student has no convolution.')


def quantized_convs(student, variables, image_shape):
  """``{path: attributes}`` of every quantized convolution of ``student``."""
  found = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (isinstance(module, layers.QuantConv) and
        context.method_name == '__call__' and
        (module.bits_w != quant.FULL_PRECISION or
         module.bits_a != quant.FULL_PRECISION)):
      size = tuple(module.kernel_size)
      padding = layers.normalize_padding(module.padding, len(size))
      found['/'.join(module.path)] = dict(
          bits_w=module.bits_w, bits_a=module.bits_a,
          weight_range_axis=module.weight_range_axis,
          kernel_shape=list(size) + [args[0].shape[-1] //
                                     module.feature_group_count,
                                     module.features],
          strides=list(module.strides),
          padding=padding if isinstance(padding, str) else [
              list(p) for p in padding],
          groups=module.feature_group_count, use_bias=module.use_bias)
    return next_fun(*args, **kwargs)

  images = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v, x: student.apply(v, x, train=False), variables,
                   images)
  return found


def _tree_bytes(tree):
  return int(sum(np.asarray(x).size * 4 for x in jax.tree.leaves(tree)))


def _dir_bytes(path):
  total = 0
  for root, _, names in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in names)
  return total


def _load_data(config):
  # Imported lazily: the input pipeline pulls in TensorFlow.
  from dtq_jax import datasets  # pylint: disable=g-import-not-at-top
  return datasets.load(config)


def calibrate_run(config, student, variables, num_batches=0, batch_size=0,
                  stat='minmax', data=None):
  """Static ranges from training images (no augmentation, BN in inference).

  Args:
    config: the run config (dataset and preprocessing).
    student: the (dynamic-range) student.
    variables: ``{'params', 'batch_stats'}`` of the student.
    num_batches: batches to use; 0: one pass over the training split.
    batch_size: 0: ``config.eval_batch_size``.
    stat: 'minmax', 'mean' or 'ema' (see static_ranges.calibrate).
    data: preloaded ``datasets.Data``.

  Returns:
    ``(ranges, info)``; ``info`` describes the calibration for the manifest.
  """
  batch_size = batch_size or config.eval_batch_size
  data = data or _load_data(config)
  batches = data.eval_batches(data.train, batch_size)
  total = data.num_eval_batches(data.train, batch_size)
  used = min(num_batches, total) if num_batches else total
  ranges = static_ranges.calibrate(student, variables, batches, used, stat)
  return ranges, dict(source='calibration', stat=stat, batches=used,
                      batch_size=batch_size,
                      images=min(used * batch_size, len(data.train)),
                      split='train', augment=False)


def _squeeze_range(x, axis):
  x = np.asarray(x, np.float32)
  return x.reshape(-1) if axis is not None else x.reshape(())


def student_tensors(student, variables, head_params, ranges, image_shape):
  """The tensors of the export file for a student's variables.

  Args:
    student: the (dynamic-range) student module.
    variables: its ``{'params', 'batch_stats'}``.
    head_params: the target classifier's parameters.
    ranges: the static activation ranges (``'quant_ranges'`` tree).
    image_shape: (H, W, C) of one input image.

  Returns:
    ``(tensors, packed, convs, sizes)``: name -> numpy array, the packed
    tensors' ``{'bits', 'shape'}``, the quantized convolutions' attributes,
    and byte counts.
  """
  convs = quantized_convs(student, variables, image_shape)
  flat_ranges = static_ranges.layer_ranges(ranges or {})
  classifier = student.classifier_name
  backbone = {k: v for k, v in variables['params'].items() if k != classifier}
  flat_params = traverse_util.flatten_dict(backbone, sep='/')
  tensors, packed = {}, {}
  packed_bytes = float_kernel_bytes = 0
  for path, info in convs.items():
    if info['bits_w'] != quant.FULL_PRECISION:
      kernel = jnp.asarray(flat_params.pop(f'{path}/kernel'), jnp.float32)
      axis = info['weight_range_axis']
      lo, hi = quant.tensor_range(kernel, axis)
      codes = np.asarray(quant.quantize(kernel, info['bits_w'], lo, hi))
      prefix = f'{int_inference.INT_WEIGHTS}/backbone/{path}'
      tensors[f'{prefix}/codes'] = pack(codes, info['bits_w'])
      packed[f'{prefix}/codes'] = dict(bits=info['bits_w'],
                                       shape=list(kernel.shape))
      tensors[f'{prefix}/lo'] = _squeeze_range(lo, axis)
      tensors[f'{prefix}/hi'] = _squeeze_range(hi, axis)
      packed_bytes += tensors[f'{prefix}/codes'].nbytes
      float_kernel_bytes += kernel.size * 4
    if info['bits_a'] != quant.FULL_PRECISION:
      if path not in flat_ranges:
        raise ValueError(f'no activation range for {path}.')
      for end in ('lo', 'hi'):
        tensors[f'{layers.RANGES}/backbone/{path}/{end}'] = np.asarray(
            flat_ranges[path][end], np.float32).reshape(())
  for name, value in flat_params.items():
    tensors[f'params/backbone/{name}'] = np.asarray(value, np.float32)
  for name, value in traverse_util.flatten_dict(variables['batch_stats'],
                                                sep='/').items():
    tensors[f'batch_stats/backbone/{name}'] = np.asarray(value, np.float32)
  for name, value in traverse_util.flatten_dict(head_params, sep='/').items():
    tensors[f'params/head/{name}'] = np.asarray(value, np.float32)
  tensor_bytes = sum(t.nbytes for t in tensors.values())
  sizes = dict(
      tensor_bytes=int(tensor_bytes),
      float32_same_tensors_bytes=int(tensor_bytes - packed_bytes +
                                     float_kernel_bytes),
      packed_kernel_bytes=int(packed_bytes),
      float32_kernel_bytes=int(float_kernel_bytes),
      float32_student_bytes=_tree_bytes(
          {'backbone': variables['params'], 'head': head_params,
           'batch_stats': variables['batch_stats']}))
  return tensors, packed, convs, sizes


def export_run(workdir, out, seed=None, best=False, calibration_batches=0,
               calibration_batch_size=0, calibration_stat='minmax',
               recalibrate=False, data=None, verbose=True):
  """Writes the student of a finished run to ``out`` (see module docstring).

  Args:
    workdir: the run folder (``config.json``, ``seed_N/``).
    out: the output file.
    seed: which repeat (default: the first).
    best: the best checkpoint instead of the latest.
    calibration_batches: calibration batches (0: the whole training split).
    calibration_batch_size: 0: the config's eval batch size.
    calibration_stat: 'minmax', 'mean' or 'ema'.
    recalibrate: calibrate even if the run collected ranges in training.
    data: preloaded ``datasets.Data`` (loaded from the config if needed).
    verbose: print a summary.

  Returns:
    The manifest, with ``sizes['file_bytes']`` added.
  """
  config = load_config(workdir)
  seeds = seed_dirs(workdir)
  if not seeds:
    raise FileNotFoundError(f'no seed_N/ folder in {workdir}.')
  seed = min(seeds) if seed is None else seed
  if seed not in seeds:
    raise ValueError(f'no seed_{seed} in {workdir} (have {list(seeds)}).')
  state, step = restore_state(seeds[seed], best)
  params = state['params']
  head = params['head']
  num_classes = int(np.asarray(head['fc']['kernel']).shape[-1])
  feature_dim = int(np.asarray(head['fc']['kernel']).shape[0])
  nets = networks.build_networks(
      config, num_classes,
      networks.num_source_classes({'params': params['backbone']}))
  student = nets.student
  variables = {'params': params['backbone'],
               'batch_stats': state['batch_stats']}
  image_shape = _image_shape(student, variables, config.dataset.image_size)
  bits_w, bits_a = networks.student_bits(config)

  ranges = state.get(layers.RANGES)
  if (ranges and static_ranges.has_collected_ranges(ranges) and
      not recalibrate):
    range_info = dict(source='training',
                      stat=config.quant.get('range_stat', 'ema'),
                      momentum=config.quant.get('range_momentum', 0.9))
  elif bits_a != quant.FULL_PRECISION:
    ranges, range_info = calibrate_run(
        config, student, variables, calibration_batches,
        calibration_batch_size, calibration_stat, data)
  else:
    ranges, range_info = {}, dict(source='none')
  tensors, packed, convs, sizes = student_tensors(student, variables, head,
                                                  ranges, image_shape)
  ckpt_dir = os.path.join(seeds[seed], 'best' if best else 'checkpoints',
                          str(step))
  sizes['training_checkpoint_bytes'] = (
      _dir_bytes(ckpt_dir) if os.path.isdir(ckpt_dir) else None)
  d = config.dataset
  axes = {c['weight_range_axis'] for c in convs.values()}
  manifest = dict(
      format=FORMAT, version=VERSION,
      model=dict(name=config.model,
                 kwargs=dict(config.get('model_kwargs', {}) or {}),
                 bits_w=bits_w, bits_a=bits_a,
                 weight_range_axis=axes.pop() if len(axes) == 1 else None,
                 classifier_name=student.classifier_name,
                 source_classifier='omitted', num_classes=num_classes,
                 feature_dim=feature_dim, image_shape=list(image_shape)),
      preprocess=dict(image_size=d.image_size, resize_to=d.resize_to or None,
                      mean=list(d.mean), std=list(d.std)),
      quantized_convs=convs, packed=packed, activation_ranges=range_info,
      sizes=sizes,
      source=dict(workdir=os.path.abspath(workdir), seed=seed,
                  checkpoint='best' if best else 'latest', step=step),
      config=config.to_dict())
  write(out, tensors, manifest)
  manifest['sizes']['file_bytes'] = os.path.getsize(out)
  if verbose:
    print(format_sizes(manifest, out))
  return manifest


def format_sizes(manifest, path):
  s = manifest['sizes']
  lines = [f'{path}: {s["file_bytes"]:,} bytes '
           f'({len(manifest["quantized_convs"])} quantized convolutions, '
           f'{manifest["model"]["bits_w"]}-bit weights packed: '
           f'{s["packed_kernel_bytes"]:,} bytes for '
           f'{s["float32_kernel_bytes"]:,} bytes of float32 kernels)',
           f'  the same tensors in float32: '
           f'{s["float32_same_tensors_bytes"]:,} bytes '
           f'({s["float32_same_tensors_bytes"] / s["file_bytes"]:.2f}x the '
           'file)',
           f'  float32 student variables (params incl. the source classifier '
           f'+ head + BatchNorm statistics): {s["float32_student_bytes"]:,} '
           'bytes']
  if s.get('training_checkpoint_bytes'):
    lines.append(f'  training checkpoint on disk (state incl. momentum): '
                 f'{s["training_checkpoint_bytes"]:,} bytes')
  return '\n'.join(lines)


# --------------------------------------------------------------------------
# The file.


def write(path, tensors, manifest):
  """Writes tensors and manifest as one safetensors file, atomically."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f'{path}.tmp.{os.getpid()}'
  try:
    safetensors.numpy.save_file(
        # order='C', not np.ascontiguousarray: that turns 0-d ranges into
        # shape (1,), and the format says shape ().
        {k: np.asarray(v, order='C') for k, v in tensors.items()}, tmp,
        metadata={MANIFEST_KEY: json.dumps(manifest, sort_keys=True)})
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def read(path):
  """Reads an exported model.

  Args:
    path: a ``.dtq`` file.

  Returns:
    ``(manifest, variables)``; ``variables`` is
    ``{'params': {'backbone', 'head'}, 'batch_stats': {'backbone'},
    'int_weights': {'backbone'}, 'quant_ranges': {'backbone'}}`` with the
    codes unpacked (uint8 arrays of the kernel shapes).
  """
  with safe_open(path, framework='np') as f:
    metadata = f.metadata() or {}
    if MANIFEST_KEY not in metadata:
      raise ValueError(f'{path} has no {MANIFEST_KEY}; not a dtq export.')
    manifest = json.loads(metadata[MANIFEST_KEY])
    arrays = {k: f.get_tensor(k) for k in f.keys()}
  if manifest.get('format') != FORMAT or manifest.get('version') != VERSION:
    raise ValueError(f'{path}: format {manifest.get("format")!r} version '
                     f'{manifest.get("version")!r}; this reader takes '
                     f'{FORMAT!r} version {VERSION}.')
  for name, info in manifest['packed'].items():
    shape = tuple(info['shape'])
    arrays[name] = unpack(arrays[name], info['bits'],
                          math.prod(shape)).reshape(shape)
  variables = traverse_util.unflatten_dict(arrays, sep='/')
  return manifest, variables


def load_integer_model(path):
  """``(manifest, predict)``: ``predict(images) -> target logits``."""
  manifest, variables = read(path)
  return manifest, integer_predictor(manifest, variables)


def integer_predictor(manifest, variables):
  """``predict(images) -> target logits`` of read (manifest, variables)."""
  student, head = int_inference.build(manifest)
  m = manifest['model']
  backbone = {col: tree['backbone'] for col, tree in variables.items()
              if 'backbone' in tree}
  backbone = int_inference.with_source_stub(backbone, m['classifier_name'],
                                            m['feature_dim'])
  head_params = variables['params']['head']
  predict = int_inference.make_predict(student, head)
  return lambda images: predict(backbone, head_params, images)


# --------------------------------------------------------------------------
# Checking.


def check(path, workdir=None, batch_size=0, max_batches=0, data=None,
          verbose=True):
  """Evaluates the integer model of ``path`` on its task's test set.

  Args:
    path: the exported model.
    workdir: the run it came from; if given, the same checkpoint is also
      evaluated with fake quantization (static ranges as exported, and the
      paper's dynamic ranges) and the top-1 predictions are compared.
    batch_size: 0: the config's eval batch size (dynamic ranges depend on
      it).
    max_batches: stop after this many test batches (0: all).
    data: preloaded ``datasets.Data``.
    verbose: print the report.

  Returns:
    A report dict (accuracies in %, agreements as fractions).
  """
  from dtq_jax import datasets  # pylint: disable=g-import-not-at-top
  manifest, exported = read(path)
  predict_int = integer_predictor(manifest, exported)
  config = ml_collections.ConfigDict(manifest['config'])
  data = data or datasets.load(config)
  batch_size = batch_size or config.eval_batch_size
  paths = {'int': predict_int}
  if workdir is not None:
    src = manifest['source']
    state, _ = restore_state(
        seed_dirs(workdir)[src['seed']], src['checkpoint'] == 'best')
    params = state['params']
    nets = networks.build_networks(
        config, manifest['model']['num_classes'],
        networks.num_source_classes({'params': params['backbone']}))
    fq_vars = {'params': params['backbone'],
               'batch_stats': state['batch_stats']}
    static_vars = dict(fq_vars, **{
        layers.RANGES: exported[layers.RANGES]['backbone']})
    static = networks.make_predict(
        static_ranges.with_act_ranges(nets.student, 'static'), nets.head)
    dynamic = networks.make_predict(nets.student, nets.head)
    paths['static_fake_quant'] = lambda x: static(static_vars, params['head'],
                                                  x)
    paths['dynamic_fake_quant'] = lambda x: dynamic(fq_vars, params['head'], x)
  preds = {k: [] for k in paths}
  logits_diff = 0.0
  labels = []
  seconds = {k: 0.0 for k in paths}
  batches = data.eval_batches(data.test, batch_size)
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    mask = batch['mask'].astype(bool)
    out = {}
    for name, fn in paths.items():
      start = time.time()
      out[name] = np.asarray(fn(batch['image']))
      seconds[name] += time.time() - start
      preds[name].append(out[name].argmax(-1)[mask])
    if 'static_fake_quant' in out:
      logits_diff = max(logits_diff, float(np.abs(
          out['int'] - out['static_fake_quant'])[mask].max()))
    labels.append(batch['label'][mask])
  labels = np.concatenate(labels)
  preds = {k: np.concatenate(v) for k, v in preds.items()}
  report = dict(model=os.path.abspath(path), test_images=int(labels.size),
                batch_size=batch_size, sizes=manifest['sizes'],
                activation_ranges=manifest['activation_ranges'])
  for name, p in preds.items():
    report[name] = dict(accuracy=100.0 * float(np.mean(p == labels)),
                        seconds=seconds[name])
  if workdir is not None:
    report['agreement_int_vs_static'] = float(
        np.mean(preds['int'] == preds['static_fake_quant']))
    report['agreement_static_vs_dynamic'] = float(
        np.mean(preds['static_fake_quant'] == preds['dynamic_fake_quant']))
    report['max_abs_logit_diff_int_vs_static'] = logits_diff
  if verbose:
    print(format_report(report))
  return report


def format_report(report):
  lines = [f'{report["test_images"]} test images '
           f'(batch {report["batch_size"]}):']
  names = {'int': 'integer inference (exported)',
           'static_fake_quant': 'fake quant, static ranges',
           'dynamic_fake_quant': 'fake quant, dynamic ranges (paper)'}
  for key, label in names.items():
    if key in report:
      lines.append(f'  {label:38s} top-1 {report[key]["accuracy"]:.2f}%')
  if 'agreement_int_vs_static' in report:
    lines.append(f'  same top-1, integer vs static fake quant: '
                 f'{100 * report["agreement_int_vs_static"]:.2f}% '
                 f'(max |logit difference| '
                 f'{report["max_abs_logit_diff_int_vs_static"]:.2g})')
    lines.append(f'  same top-1, static vs dynamic fake quant: '
                 f'{100 * report["agreement_static_vs_dynamic"]:.2f}%')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m dtq_jax.export',
      description='Export a trained DTQ student as packed integer weights '
      '(--workdir, --out) and/or evaluate the integer model (--check).')
  parser.add_argument('--workdir', help='folder of a finished single-method '
                      'run (config.json, seed_N/); exports its student')
  parser.add_argument('--out', required=True, help='the .dtq file')
  parser.add_argument('--check', action='store_true',
                      help='evaluate the integer model on the test set (and '
                      'compare with fake quantization when --workdir is '
                      'given)')
  parser.add_argument('--seed', type=int, default=None,
                      help='which repeat (default: the first)')
  parser.add_argument('--best', action='store_true',
                      help='export the best checkpoint, not the latest')
  parser.add_argument('--calibration_batches', type=int, default=0,
                      help='training batches for the static ranges (0: the '
                      'whole training split)')
  parser.add_argument('--calibration_batch_size', type=int, default=0,
                      help='0: the config\'s eval_batch_size')
  parser.add_argument('--calibration_stat', default='minmax',
                      choices=layers.RANGE_STATS)
  parser.add_argument('--recalibrate', action='store_true',
                      help='calibrate even if the run collected ranges')
  parser.add_argument('--max_eval_batches', type=int, default=0)
  parser.add_argument('--report', help='write the --check report (JSON) here')
  args = parser.parse_args(argv)
  if args.workdir is None and not args.check:
    parser.error('give --workdir (export) and/or --check.')
  try:
    if args.workdir is not None:
      export_run(args.workdir, args.out, seed=args.seed, best=args.best,
                 calibration_batches=args.calibration_batches,
                 calibration_batch_size=args.calibration_batch_size,
                 calibration_stat=args.calibration_stat,
                 recalibrate=args.recalibrate)
    if args.check:
      report = check(args.out, args.workdir,
                     max_batches=args.max_eval_batches)
      if args.report:
        files.write_json(args.report, report)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
