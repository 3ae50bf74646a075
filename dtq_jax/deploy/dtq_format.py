"""The ``.dtq`` file format: bit packing, writing, reading and verifying.

File format (``.dtq``, version 2)
---------------------------------
A safetensors file (https://github.com/huggingface/safetensors: an 8-byte
little-endian header length, a JSON header naming every tensor's dtype, shape
and byte range, then the raw little-endian data; no pickle). Its header
metadata holds two entries: ``"dtq_manifest"``, a JSON document, and
``"dtq_manifest_sha256"``, the SHA-256 of that document's text. The manifest
has

* ``format`` ("dtq-jax-export"), ``version`` (2; version 1 files, without
  checksums, are refused: export the run again);
* ``checksums``: per tensor, the SHA-256 of its dtype, shape and raw bytes
  (``tensor_checksum``); the reader refuses a file whose tensors, ranges or
  manifest do not match, and non-finite ranges;
* ``class_names``: the target classes in output (logit) order;
* ``model``: ``name``, ``kwargs`` (for ``models.create_model``), ``bits_w``,
  ``bits_a``, ``weight_range_axis`` (null: one kernel range per tensor; -1:
  per output channel), ``classifier_name``, ``num_classes`` (target),
  ``feature_dim``, ``image_shape``; the frozen *source* classifier is not
  exported (``source_classifier: "omitted"``);
* ``preprocess``: ``image_size``, ``resize_to``, ``mean``, ``std``,
  ``layout`` ("NHWC"), ``dtype`` ("float32"): the network's input is
  ``(pixels / 255 - mean) / std`` after resizing (shorter side to
  ``resize_to``, if set) and centre cropping to ``image_size``; ``predict``
  refuses integer pixels;
* ``quantized_convs``: per quantized convolution (path as below): ``bits_w``,
  ``bits_a``, ``kernel_shape`` (HWIO), ``strides``, ``padding`` (pairs),
  ``groups``;
* ``packed``: per packed tensor: ``bits``, ``shape`` (of the codes);
* ``activation_ranges``: where the static ranges come from (``source``:
  "training" or "calibration", ``stat``, ``batches``, ``batch_size``,
  ``images``);
* ``sizes`` (bytes), ``source`` (workdir, seed, checkpoint, step, and
  ``finished``: whether the run had finished) and the run's ``config``.

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

import hashlib
import json
import math
import os

from flax import traverse_util
import numpy as np
from safetensors import safe_open
import safetensors.numpy

from dtq_jax.deploy import int_inference
from dtq_jax.infra import files
from dtq_jax import layers
from dtq_jax import quant

FORMAT = 'dtq-jax-export'
VERSION = 2
MANIFEST_KEY = 'dtq_manifest'
MANIFEST_CHECKSUM_KEY = 'dtq_manifest_sha256'
# Exports are read by others, whatever the writer's umask.
FILE_MODE = 0o644


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


def tensor_checksum(array):
  """SHA-256 (hex) of an array's dtype, shape and row-major bytes."""
  array = np.asarray(array, order='C')
  digest = hashlib.sha256(f'{array.dtype.str}{list(array.shape)}'.encode())
  digest.update(array.tobytes())
  return digest.hexdigest()


# --------------------------------------------------------------------------
# The file.


def write(path, tensors, manifest):
  """Writes tensors and manifest as one safetensors file, atomically.

  The manifest's ``checksums`` are (re)computed from ``tensors``, and the
  manifest's own checksum is stored beside it.
  """
  manifest = dict(manifest, checksums={
      k: tensor_checksum(v) for k, v in tensors.items()})
  text = json.dumps(manifest, sort_keys=True)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files.atomic_path(path, FILE_MODE) as tmp:
    safetensors.numpy.save_file(
        # order='C', not np.ascontiguousarray: that turns 0-d ranges into
        # shape (1,), and the format says shape ().
        {k: np.asarray(v, order='C') for k, v in tensors.items()}, tmp,
        metadata={MANIFEST_KEY: text,
                  MANIFEST_CHECKSUM_KEY: hashlib.sha256(
                      text.encode()).hexdigest()})


def variables_of(manifest, arrays):
  """Unpacks the codes of ``arrays`` (name -> array) into nested variables."""
  arrays = dict(arrays)
  for name, info in manifest['packed'].items():
    shape = tuple(info['shape'])
    arrays[name] = unpack(arrays[name], info['bits'],
                          math.prod(shape)).reshape(shape)
  return traverse_util.unflatten_dict(arrays, sep='/')


def _verify(path, manifest, arrays):
  """Raises ValueError unless tensors and manifest agree (see the format)."""
  sums = manifest.get('checksums') or {}
  for name in sorted(set(sums) - set(arrays)):
    raise ValueError(f'{path}: tensor {name} is missing.')
  for name in sorted(set(arrays) - set(sums)):
    raise ValueError(f'{path}: tensor {name} is not in the manifest.')
  for name in sorted(sums):
    if tensor_checksum(arrays[name]) != sums[name]:
      raise ValueError(f'{path}: tensor {name} does not match its checksum '
                       '(the file is damaged).')
  m = manifest['model']
  for conv, info in manifest['quantized_convs'].items():
    if info['bits_w'] != quant.FULL_PRECISION:
      name = f'{int_inference.INT_WEIGHTS}/backbone/{conv}/codes'
      packed = manifest['packed'].get(name)
      if (packed is None or packed['bits'] != info['bits_w'] or
          info['bits_w'] != m['bits_w'] or
          list(packed['shape']) != list(info['kernel_shape'])):
        raise ValueError(
            f'{path}: the manifest contradicts itself about {conv} (model '
            f'bits_w={m["bits_w"]}, layer bits_w={info["bits_w"]}, stored '
            f'codes {packed}, kernel {info["kernel_shape"]}).')
    if info['bits_a'] != quant.FULL_PRECISION and info['bits_a'] != m[
        'bits_a']:
      raise ValueError(f'{path}: the manifest contradicts itself about '
                       f'{conv} (model bits_a={m["bits_a"]}, layer bits_a='
                       f'{info["bits_a"]}).')
  for name, value in arrays.items():
    if (name.startswith((int_inference.INT_WEIGHTS, layers.RANGES)) and
        name.endswith(('/lo', '/hi')) and not np.all(np.isfinite(value))):
      raise ValueError(f'{path}: range {name} is not finite.')


def read(path):
  """Reads an exported model, verifying it.

  Args:
    path: a ``.dtq`` file.

  Returns:
    ``(manifest, variables)``; ``variables`` is
    ``{'params': {'backbone', 'head'}, 'batch_stats': {'backbone'},
    'int_weights': {'backbone'}, 'quant_ranges': {'backbone'}}`` with the
    codes unpacked (uint8 arrays of the kernel shapes).

  Raises:
    ValueError: the file is no readable ``.dtq`` of this version, or its
      tensors, ranges or manifest do not match (one line, naming the file).
  """
  if os.path.isdir(path):
    raise ValueError(f'{path} is a folder, not a .dtq file.')
  try:
    with safe_open(path, framework='np') as f:
      metadata = f.metadata() or {}
      arrays = {k: f.get_tensor(k) for k in f.keys()}
  except (safetensors.SafetensorError, OSError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise ValueError(f'{path} is not a readable .dtq file (truncated or not '
                     f'an export): {e}') from e
  if MANIFEST_KEY not in metadata:
    raise ValueError(f'{path} has no {MANIFEST_KEY}; not a dtq export.')
  text = metadata[MANIFEST_KEY]
  try:
    manifest = json.loads(text)
  except ValueError as e:
    raise ValueError(f'{path}: its manifest is not JSON ({e}).') from e
  if manifest.get('format') != FORMAT or manifest.get('version') != VERSION:
    raise ValueError(f'{path}: format {manifest.get("format")!r} version '
                     f'{manifest.get("version")!r}; this reader takes '
                     f'{FORMAT!r} version {VERSION} (export the run again).')
  if hashlib.sha256(text.encode()).hexdigest() != metadata.get(
      MANIFEST_CHECKSUM_KEY):
    raise ValueError(f'{path}: the manifest does not match its checksum '
                     '(edited or damaged).')
  try:
    _verify(path, manifest, arrays)
    variables = variables_of(manifest, arrays)
  except (KeyError, TypeError) as e:
    raise ValueError(f'{path}: the manifest does not fit the file '
                     f'({type(e).__name__}: {e}).') from e
  except ValueError as e:
    raise ValueError(str(e) if str(e).startswith(str(path)) else
                     f'{path}: {e}') from e
  return manifest, variables
