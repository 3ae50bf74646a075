"""Writes and reads the portable StableHLO export of a student (jax.export).

Every student can be exported this way, a user's own network included,
whatever operations it uses: the predictor is lowered by ``jax.export``,
which serializes the StableHLO module XLA compiles, so the file needs no
Python code of the network to run. A ``.stablehlo`` file is a zip archive
(stored, not compressed) of two members:

* ``manifest.json``: the export manifest, the same as a ``.dtq`` file's
  (dtq_format.py), with a ``stablehlo`` entry describing the module;
* ``predict.jax_export``: ``jax.export``'s serialization of
  ``images -> target logits``. The images are float32 NHWC, preprocessed as
  ``manifest['preprocess']`` says, with a symbolic batch size; the weights are
  constants of the module, the quantized kernels as their integer codes. The
  predictor computes in float32 on the dequantized codes with the static
  activation ranges (``int_inference.predictor(..., integer=False)``): the
  static-range fake-quant network of training, as the ONNX export does.
  It is lowered for CPU, CUDA and TPU (``PLATFORMS``), so one file runs on
  any of them.

Loading needs jax only (``load``); ``jax.export`` keeps a serialized module
readable by later jax releases for a documented compatibility window.
"""

import io
import json
import os
import zipfile

from flax import traverse_util
import jax
from jax import export as jax_export
import jax.numpy as jnp
import numpy as np

from dtq_jax.deploy import int_inference
from dtq_jax.infra import files
from dtq_jax import layers

FORMAT = 'dtq-jax-stablehlo'
MANIFEST = 'manifest.json'
MODULE = 'predict.jax_export'
PLATFORMS = ('cpu', 'cuda', 'tpu')
# The name of the symbolic batch dimension of the images.
BATCH = 'N'


def export_predictor(manifest, variables, platforms=PLATFORMS):
  """Lowers the predictor of an export with ``jax.export``.

  Args:
    manifest: the export manifest.
    variables: the exported variables, codes unpacked
      (``dtq_format.variables_of``); they become constants of the module.
    platforms: the platforms to lower for.

  Returns:
    The ``jax.export.Exported``.
  """
  predict = int_inference.predictor(manifest, integer=False)
  # jax arrays, not numpy's: a numpy array's own methods (``astype``)
  # would run eagerly and leave float32 kernels, not codes, in the module.
  constants = jax.tree.map(jnp.asarray, variables)
  shape = jax_export.symbolic_shape(
      f'{BATCH}, ' + ', '.join(str(d) for d in manifest['model'][
          'image_shape']))
  images = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax_export.export(
      jax.jit(lambda x: predict(constants, x)),
      platforms=platforms)(images)


def write(path, manifest, variables, platforms=PLATFORMS):
  """Writes the ``.stablehlo`` file of an export, atomically.

  Args:
    path: the file.
    manifest: the export manifest (copied; the ``stablehlo`` entry added).
    variables: the exported variables, codes unpacked.
    platforms: the platforms to lower for.

  Returns:
    The manifest as written.
  """
  exported = export_predictor(manifest, variables, platforms)
  manifest = dict(manifest, format=FORMAT, stablehlo=dict(
      platforms=list(exported.platforms), jax_version=jax.__version__,
      calling_convention_version=exported.calling_convention_version,
      input=dict(dtype='float32', layout='NHWC',
                 shape=[BATCH] + list(manifest['model']['image_shape'])),
      output=dict(dtype='float32',
                  shape=[BATCH, manifest['model']['num_classes']]),
      computes='float32 on the dequantized codes, static activation ranges',
      # The module holds them as constants; kept readable for the check
      # against the run's fake quantization (export_check.py).
      activation_ranges=ranges_of(variables)))
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, 'w', zipfile.ZIP_STORED) as z:
    z.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True,
                                    default=float))
    z.writestr(MODULE, bytes(exported.serialize()))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  files.write_text(path, buffer.getvalue())
  return manifest


def ranges_of(variables):
  """``{conv path: [lo, hi]}`` of the exported static activation ranges."""
  flat = traverse_util.flatten_dict(
      variables.get(layers.RANGES, {}).get('backbone', {}), sep='/')
  out = {}
  for name, value in sorted(flat.items()):
    path, end = name.rsplit('/', 1)
    out.setdefault(path, [0.0, 0.0])[('lo', 'hi').index(end)] = float(
        np.asarray(value).reshape(()))
  return out


def ranges(manifest):
  """The ``'quant_ranges'`` tree (backbone) that ``ranges_of`` recorded."""
  flat = {}
  for path, (lo, hi) in manifest['stablehlo']['activation_ranges'].items():
    flat[f'{path}/lo'] = np.float32(lo)
    flat[f'{path}/hi'] = np.float32(hi)
  return traverse_util.unflatten_dict(flat, sep='/')


def read(path):
  """The manifest and the ``jax.export.Exported`` of a ``.stablehlo`` file.

  Raises:
    ValueError: the file is not a readable StableHLO export (one line).
    FileNotFoundError: there is no file.
  """
  if os.path.isdir(path):
    raise ValueError(f'{path} is a folder, not a .stablehlo export.')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found.')
  try:
    with zipfile.ZipFile(path) as z:
      manifest = json.loads(z.read(MANIFEST))
      module = z.read(MODULE)
  except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as e:
    raise ValueError(f'{path} is not a dtq_jax StableHLO export: '
                     f'{str(e).splitlines()[0] if str(e) else e!r}') from e
  if manifest.get('format') != FORMAT:
    raise ValueError(f'{path}: format {manifest.get("format")!r}, not '
                     f'{FORMAT!r}.')
  try:
    exported = jax_export.deserialize(bytearray(module))
  except Exception as e:  # pylint: disable=broad-except
    # jax raises its own types for a damaged or too new module.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise ValueError(f'{path}: the module does not deserialize: '
                     f'{first}') from e
  return manifest, exported


def load(path):
  """Loads a ``.stablehlo`` export for inference.

  Example::

    from dtq_jax import export
    manifest, predict = export.load_stablehlo('model.stablehlo')
    logits = predict(images)  # float32 (N, H, W, C), as manifest['preprocess']

  Args:
    path: the file.

  Returns:
    ``(manifest, predict)``; ``predict(images) -> target logits`` (jitted).

  Raises:
    ValueError: the file is damaged, or was not lowered for this platform.
  """
  manifest, exported = read(path)
  platform = jax.default_backend()
  if platform not in exported.platforms:
    raise ValueError(f'{path} was lowered for {", ".join(exported.platforms)}'
                     f', not for this machine\'s {platform}.')
  call = jax.jit(exported.call)
  shape = tuple(manifest['model']['image_shape'])

  def predict(images):
    images = jnp.asarray(images)
    if (not jnp.issubdtype(images.dtype, jnp.floating) or images.ndim != 4 or
        tuple(images.shape[1:]) != shape):
      raise TypeError(f'predict takes float32 images of shape (N,) + '
                      f'{shape}, preprocessed as the manifest says '
                      f'({manifest["preprocess"]}), not {images.dtype} '
                      f'{tuple(images.shape)}.')
    return call(images.astype(jnp.float32))

  return manifest, predict
