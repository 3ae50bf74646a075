"""Builds a trained student's export: packed integers, ONNX or StableHLO.

``export_run(workdir, out)`` reads a finished run (``config.json`` and
``seed_N/``), restores its student, calibrates static activation ranges where
the run did not collect them, and writes the packed ``.dtq`` file
(``dtq_format.py``), the ONNX model (``onnx_export.py`` for the zoo's
networks, ``jaxpr_onnx.py`` for a user's own) or the portable StableHLO
module (``stablehlo_export.py``).
``load_integer_model(path)`` reads a ``.dtq`` back for integer inference
(``int_inference.py``). The command line is ``python -m dtq_jax.export``
(dtq_jax/export.py); checking an export against its run is export_check.py.
"""

import os

from flax import errors as flax_errors
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from dtq_jax import convolution
from dtq_jax.deploy import dtq_format
from dtq_jax.deploy import int_inference
from dtq_jax.deploy import jaxpr_onnx
from dtq_jax.deploy import onnx_export
from dtq_jax.deploy import runs
from dtq_jax.deploy import stablehlo_export
from dtq_jax.infra import files
from dtq_jax import layers
from dtq_jax.method import learned_params
from dtq_jax.method import networks
from dtq_jax.method import static_ranges
from dtq_jax.models import own_network as own_network_lib
from dtq_jax import quant

FORMATS = ('dtq', 'onnx', 'stablehlo')
# File name endings that choose the format when --format is not given.
_SUFFIXES = {'.onnx': 'onnx', '.stablehlo': 'stablehlo'}


def quantized_convs(student, variables, image_shape):
  """``{path: attributes}`` of every quantized convolution of ``student``."""
  found = {}
  params = traverse_util.flatten_dict(variables['params'], sep='/')
  for path, module in layers.modules_called(student, image_shape,
                                            layers.QuantConv).items():
    if (module.bits_w == quant.FULL_PRECISION and
        module.bits_a == quant.FULL_PRECISION):
      continue
    padding = convolution.normalize_padding(module.padding, len(module.kernel_size))
    # The manifest records the stored kernel's shape; it must be the one the
    # layer computes with.
    kernel = params.get(f'{path}/kernel')
    shape = None if kernel is None else tuple(np.shape(kernel))
    size = tuple(module.kernel_size)
    if (shape is None or len(shape) != 4 or shape[:2] != size or
        shape[3] != module.features):
      raise ValueError(f'convolution {path}: the stored kernel '
                       f'{shape or "is missing"}, the layer needs '
                       f'{size} x {module.features} outputs.')
    found[path] = dict(
        bits_w=module.bits_w, bits_a=module.bits_a,
        weight_range_axis=module.weight_range_axis,
        # (H, W, input channels per group, output channels), as stored.
        kernel_shape=[int(d) for d in shape],
        strides=list(convolution.pair(module.strides, 'strides')),
        padding=padding if isinstance(padding, str) else [
            list(p) for p in padding],
        groups=module.feature_group_count, use_bias=module.use_bias)
  return found


def _tree_bytes(tree):
  return int(sum(np.asarray(x).size * 4 for x in jax.tree.leaves(tree)))


def _squeeze_range(x, axis):
  x = np.asarray(x, np.float32)
  return x.reshape(-1) if axis is not None else x.reshape(())


def student_tensors(student, variables, head_params, ranges, image_shape,
                    weight_ranges=None):
  """The tensors of the export file for a student's variables.

  Args:
    student: the (dynamic-range) student module.
    variables: its ``{'params', 'batch_stats'}``.
    head_params: the target classifier's parameters.
    ranges: the static activation ranges (``'quant_ranges'`` tree).
    image_shape: (H, W, C) of one input image.
    weight_ranges: ``{path: (lo, hi)}`` of every quantized kernel, for a
      student with learned steps (``learned_params.learned_ranges``); None:
      each kernel's own extremes, the paper's quantizer.

  Returns:
    ``(tensors, packed, convs, sizes)``: name -> numpy array, the packed
    tensors' ``{'bits', 'shape'}``, the quantized convolutions' attributes,
    and byte counts.
  """
  convs = quantized_convs(student, variables, image_shape)
  flat_ranges = static_ranges.layer_ranges(ranges or {})
  # The source classifier is not exported ('a/b' for a user's network).
  classifier = student.classifier_name + '/'
  flat_params = {k: v for k, v in traverse_util.flatten_dict(
      variables['params'], sep='/').items() if not k.startswith(classifier)}
  tensors, packed = {}, {}
  packed_bytes = float_kernel_bytes = 0
  for path, info in convs.items():
    if info['bits_w'] != quant.FULL_PRECISION:
      kernel = jnp.asarray(flat_params.pop(f'{path}/kernel'), jnp.float32)
      axis = info['weight_range_axis']
      if weight_ranges is None:
        lo, hi = quant.tensor_range(kernel, axis)
      elif path in weight_ranges:
        lo, hi = (jnp.asarray(r, jnp.float32) for r in weight_ranges[path])
      else:
        raise ValueError(f'no learned weight step for {path}.')
      codes = np.asarray(quant.quantize(kernel, info['bits_w'], lo, hi))
      prefix = f'{int_inference.INT_WEIGHTS}/backbone/{path}'
      tensors[f'{prefix}/codes'] = dtq_format.pack(codes, info['bits_w'])
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
        value = np.asarray(flat_ranges[path][end], np.float32).reshape(())
        if not np.isfinite(value):
          raise ValueError(f'the activation range of {path} is {end}='
                           f'{value}; a non-finite range cannot be exported '
                           '(the run diverged, or calibrate again with '
                           '--recalibrate).')
        tensors[f'{layers.RANGES}/backbone/{path}/{end}'] = value
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


def make_export(student, variables, head_params, ranges, image_shape, *,
                name, kwargs, bits_w, bits_a, preprocess, class_names,
                activation_ranges, source=None, config=None,
                own_network=None, weight_ranges=None):
  """The tensors and manifest of an export (see the module docstring).

  Args:
    student: the (dynamic-range) student module.
    variables: its ``{'params', 'batch_stats'}`` (source classifier
      included; it is not exported).
    head_params: the target classifier's parameters.
    ranges: the static activation ranges (``'quant_ranges'`` tree).
    image_shape: (H, W, C) of one input image.
    name: the model's name for ``models.create_model``.
    kwargs: the model's further ``create_model`` arguments.
    bits_w: the student's weight bits.
    bits_a: the student's activation bits.
    preprocess: the manifest's ``preprocess`` entry.
    class_names: the target classes in output order.
    activation_ranges: where the ranges come from (manifest entry).
    source: the run, step and checkpoint exported (manifest entry).
    config: the run's config dict.
    own_network: for a user's network, the settings that rebuild its student
      (``keep_float``, ``quantize_dense``, ``taps``, ``source_classifier``).
    weight_ranges: learned kernel ranges (see ``student_tensors``).

  Returns:
    ``(tensors, manifest)``: name -> numpy array (codes packed), and the
    manifest with the tensors' checksums.
  """
  classifier = student.classifier_name
  num_classes = int(np.asarray(head_params['fc']['kernel']).shape[-1])
  if class_names is not None and len(class_names) != num_classes:
    raise ValueError(f'{len(class_names)} class names for a classifier of '
                     f'{num_classes} outputs.')
  tensors, packed, convs, sizes = student_tensors(student, variables,
                                                  head_params, ranges,
                                                  image_shape, weight_ranges)
  axes = {c['weight_range_axis'] for c in convs.values()}
  manifest = dict(
      format=dtq_format.FORMAT, version=dtq_format.VERSION,
      model=dict(name=name, kwargs=dict(kwargs or {}), bits_w=bits_w,
                 bits_a=bits_a,
                 weight_range_axis=axes.pop() if len(axes) == 1 else None,
                 classifier_name=classifier, source_classifier='omitted',
                 num_classes=num_classes,
                 feature_dim=int(np.asarray(
                     head_params['fc']['kernel']).shape[0]),
                 image_shape=list(image_shape),
                 **({'own_network': own_network} if own_network else {})),
      class_names=None if class_names is None else list(class_names),
      preprocess=dict(preprocess, layout='NHWC', dtype='float32'),
      quantized_convs=convs, packed=packed,
      activation_ranges=activation_ranges, sizes=sizes, source=source or {},
      config=config or {},
      checksums={k: dtq_format.tensor_checksum(v) for k, v in tensors.items()})
  return tensors, manifest


def output_format(path, fmt=None):
  """'dtq', 'onnx' or 'stablehlo': ``fmt`` if given, else from the name."""
  if fmt is None:
    return _SUFFIXES.get(os.path.splitext(str(path))[1].lower(), 'dtq')
  if fmt not in FORMATS:
    raise ValueError(f'--format {fmt!r}; allowed: {", ".join(FORMATS)}.')
  return fmt


def export_run(workdir, out, seed=None, best=False, calibration_batches=0,
               calibration_batch_size=0, calibration_stat='minmax',
               recalibrate=False, data=None, verbose=True, fmt=None,
               allow_unfinished=False):
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
    data: preloaded ``datasets.Data`` (loaded from the config if needed: for
      the class names, and to calibrate).
    verbose: print a summary.
    fmt: 'dtq', 'onnx' or 'stablehlo' (None: from ``out``'s ending, .onnx or
      .stablehlo, else 'dtq').
    allow_unfinished: export a repeat without ``result.json`` (its newest
      checkpoint; the manifest records ``source.finished = false``).

  Returns:
    The manifest, with ``sizes['file_bytes']`` added.

  Raises:
    ValueError: an unfinished run, a folder as ``out``, bad ranges.
    FileNotFoundError: no run in ``workdir``.
  """
  fmt = output_format(out, fmt)
  if os.path.isdir(out):
    raise ValueError(f'--out {out} is a folder; name the file to write.')
  config = runs.load_config(workdir)
  if recalibrate and learned_params.uses_learned_quant(config):
    raise ValueError(f'{workdir} was trained with learned quantizer steps '
                     f'(quant.method={config.quant.method!r}): they are its '
                     'ranges, --recalibrate does not apply.')
  seeds = runs.seed_dirs(workdir)
  if not seeds:
    raise FileNotFoundError(f'no seed_N/ folder in {workdir}.')
  seed = min(seeds) if seed is None else seed
  if seed not in seeds:
    raise ValueError(f'no seed_{seed} in {workdir} (have {list(seeds)}).')
  finished = os.path.exists(os.path.join(seeds[seed], files.RESULT))
  if not finished and not allow_unfinished:
    raise ValueError(f'{seeds[seed]} has no {files.RESULT}: the run did not '
                     'finish. Resume it, or export its newest checkpoint '
                     'with --allow_unfinished.')
  data = data or runs.load_data(config)
  image_shape = data.image_shape
  nets, variables, head, state, step = runs.restore_run(
      config, seeds[seed], best, image_shape)
  student = nets.student
  bits_w, bits_a = networks.student_bits(config)

  ranges = state.get(layers.RANGES)
  weight_ranges = None
  if learned_params.uses_learned_quant(config):
    # Learned steps are static ranges already: the exported quantizers are
    # the trained ones, with nothing to calibrate.
    variables, ranges, weight_ranges = runs.learned_export_ranges(
        config, variables)
    range_info = dict(source='learned',
                      method=config.quant.get('method', 'minmax'))
  elif (ranges and static_ranges.has_collected_ranges(ranges) and
        not recalibrate):
    range_info = dict(source='training',
                      stat=config.quant.get('range_stat', 'ema'),
                      momentum=config.quant.get('range_momentum', 0.9))
  elif bits_a != quant.FULL_PRECISION:
    ranges, range_info = runs.calibrate_run(
        config, student, variables, calibration_batches,
        calibration_batch_size, calibration_stat, data)
  else:
    ranges, range_info = {}, dict(source='none')
  d = config.dataset
  tensors, manifest = make_export(
      student, variables, head, ranges, image_shape, name=config.model,
      kwargs=config.get('model_kwargs', {}) or {}, bits_w=bits_w,
      bits_a=bits_a,
      preprocess=dict(image_size=d.image_size,
                      resize_to=d.resize_to or None, mean=list(d.mean),
                      std=list(d.std)),
      class_names=list(data.train.class_names), activation_ranges=range_info,
      source=dict(workdir=os.path.abspath(workdir), seed=seed,
                  checkpoint='best' if best else 'latest', step=step,
                  finished=finished),
      config=config.to_dict(),
      own_network=(networks.own_network_settings(config)
                   if own_network_lib.is_import_path(config.model) else None),
      weight_ranges=weight_ranges)
  ckpt_dir = os.path.join(seeds[seed], 'best' if best else 'checkpoints',
                          str(step))
  manifest['sizes']['training_checkpoint_bytes'] = (
      runs.dir_bytes(ckpt_dir) if os.path.isdir(ckpt_dir) else None)
  if fmt == 'onnx':
    write_onnx(out, manifest, tensors)
  elif fmt == 'stablehlo':
    stablehlo_export.write(out, manifest,
                           dtq_format.variables_of(manifest, tensors))
  else:
    dtq_format.write(out, tensors, manifest)
  manifest['sizes']['file_bytes'] = os.path.getsize(out)
  if verbose:
    print(format_sizes(manifest, out, fmt))
  return manifest


def format_sizes(manifest, path, fmt='dtq'):
  s = manifest['sizes']
  m = manifest['model']
  if fmt == 'stablehlo':
    return (f'{path}: {s["file_bytes"]:,} bytes (jax.export StableHLO module '
            f'for {", ".join(stablehlo_export.PLATFORMS)}, '
            f'{len(manifest["quantized_convs"])} quantized convolutions, '
            f'{m["bits_w"]}-bit weights as uint8 codes); the same tensors '
            f'in float32: {s["float32_same_tensors_bytes"]:,} bytes')
  if fmt == 'onnx':
    return (f'{path}: {s["file_bytes"]:,} bytes (ONNX opset '
            f'{onnx_export.OPSET}, {len(manifest["quantized_convs"])} '
            f'quantized convolutions, {m["bits_w"]}-bit weights stored as '
            f'{np.dtype(onnx_export.code_dtype(m["bits_w"])).name} codes); '
            f'the same tensors in float32: '
            f'{s["float32_same_tensors_bytes"]:,} bytes '
            f'({s["float32_same_tensors_bytes"] / s["file_bytes"]:.2f}x the '
            'file)')
  lines = [f'{path}: {s["file_bytes"]:,} bytes '
           f'({len(manifest["quantized_convs"])} quantized convolutions, '
           f'{m["bits_w"]}-bit weights packed: '
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


def write_onnx(path, manifest, tensors):
  """Writes the ONNX model of an export, atomically.

  The zoo's networks have a hand-written graph (onnx_export.py); a user's
  network is converted from the predictor's jaxpr (jaxpr_onnx.py), which
  refuses, naming it, an operation it has no translation for.
  """
  variables = dtq_format.variables_of(manifest, tensors)
  m = manifest['model']
  if own_network_lib.is_import_path(m['name']):
    model = jaxpr_onnx.convert(
        int_inference.predictor(manifest, integer=False), variables,
        tuple(m['image_shape']), input_name=onnx_export.INPUT,
        output_name=onnx_export.OUTPUT, opset=onnx_export.OPSET,
        graph_name=f'dtq_own_network_w{m["bits_w"]}a{m["bits_a"]}')
    onnx_export.require('onnx.helper').set_model_props(
        model, onnx_export.metadata(manifest))
  else:
    model = onnx_export.build_model(manifest, variables)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  files.write_text(path, model.SerializeToString(), dtq_format.FILE_MODE)


def load_integer_model(path):
  """Loads a ``.dtq`` export for integer inference.

  Example::

    from dtq_jax import export
    manifest, predict = export.load_integer_model('model.dtq')
    # images: float32 (N, H, W, C), preprocessed as manifest['preprocess']
    # says: (pixels / 255 - mean) / std after resizing and centre cropping.
    logits = predict(images)
    labels = [manifest['class_names'][i] for i in logits.argmax(-1)]

  Args:
    path: the ``.dtq`` file.

  Returns:
    ``(manifest, predict)``; ``predict(images) -> target logits`` (N,
    num_classes), jitted; it raises TypeError for integer (e.g. uint8) pixels.

  Raises:
    ValueError: the file is damaged or not an export (see ``read``).
  """
  manifest, variables = dtq_format.read(path)
  try:
    return manifest, integer_predictor(manifest, variables)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e


def integer_predictor(manifest, variables):
  """``predict(images) -> target logits`` of read (manifest, variables).

  Raises:
    ValueError: the manifest's model does not fit the variables.
  """
  m = manifest['model']
  try:
    predict = jax.jit(int_inference.predictor(manifest))
    # Fails here, not at the first prediction, if the model (name, kwargs,
    # bits) does not fit the stored tensors.
    jax.eval_shape(predict, variables,
                   jnp.zeros((1,) + tuple(m['image_shape']), jnp.float32))
  except (TypeError, ValueError, KeyError, flax_errors.FlaxError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f'the manifest\'s model ({m.get("name")}, kwargs '
                     f'{m.get("kwargs")}) does not fit the stored tensors: '
                     f'{first}') from e

  def checked(images):
    dtype = getattr(images, 'dtype', None)
    if dtype is None:
      images = np.asarray(images)
      dtype = images.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f'predict takes float images preprocessed as the manifest says '
          f'((pixels / 255 - mean) / std, {manifest["preprocess"]}), not '
          f'{dtype} pixels.')
    return predict(variables, images)

  return checked
