"""torch.save checkpoints read with the standard library and NumPy, no code run.

``load(path)`` returns the saved object with every tensor as a NumPy array: a
state_dict comes back as an ``OrderedDict`` of arrays. It reads both formats
``torch.save`` writes:

* the zip archive (torch >= 1.6, the default since): ``<name>/data.pkl`` holds
  the pickled object, ``<name>/data/<key>`` the raw bytes of each storage and
  ``<name>/byteorder`` their byte order (little when absent, as torch reads);
* the legacy stream (``_use_new_zipfile_serialization=False``, and files saved
  before torch 1.6): a magic number, a protocol version, a ``sys_info`` dict,
  the pickled object, the list of storage keys, then each storage as an int64
  element count and its bytes, little-endian.

Safety is that of ``torch.load(weights_only=True)``, enforced here without
torch: the unpickler's ``find_class`` knows exactly the globals a state_dict
of tensors needs (``collections.OrderedDict``, ``torch._utils``'s tensor and
parameter rebuilders and the typed storage classes), each mapped to a
function of this module; any other global is refused before anything is
called, so no code from the file ever runs. Every offset, shape and stride is
checked against the storage it reads, and the tensors (copied out of their
storages) may not take much more memory than the file itself. Anything wrong
is an ``ArchiveError`` whose one-line message names the file and the problem.

Both formats matter: torchvision re-saved its ResNet weights in the zip format
in 2021 (pytorch/vision#3620), but files saved before torch 1.6 and never
re-saved (e.g. MobileNetV2's, published in 2019) use the legacy stream.

Formats this reader does not know (the tar format of torch < 0.4, TorchScript
archives) raise ``UnsupportedFormatError``, with what to do instead:
``torch.load(weights_only=True)`` refuses both too (tested with the pinned
torch), so handing them to torch would need ``weights_only=False``, which runs
code from the file.
"""

import collections
import io
import math
import os
import pickle
import struct
import tarfile
import zipfile
import zlib

import ml_dtypes
import numpy as np


class ArchiveError(ValueError):
  """The file is not a torch.save checkpoint this reader can read safely."""


class UnsupportedFormatError(ArchiveError):
  """A torch format this reader does not know, nor torch's safe loader."""


# torch's typed storages, by the class name torch.save pickles.
STORAGE_DTYPES = {
    'FloatStorage': np.dtype(np.float32),
    'DoubleStorage': np.dtype(np.float64),
    'HalfStorage': np.dtype(np.float16),
    'BFloat16Storage': np.dtype(ml_dtypes.bfloat16),
    'LongStorage': np.dtype(np.int64),
    'IntStorage': np.dtype(np.int32),
    'ShortStorage': np.dtype(np.int16),
    'CharStorage': np.dtype(np.int8),
    'ByteStorage': np.dtype(np.uint8),
    'BoolStorage': np.dtype(np.bool_),
}
# The legacy stream's first two pickles (torch/serialization.py).
LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL_VERSION = 1001
_REBUILDERS = ('_rebuild_tensor_v2', '_rebuild_parameter',
               '_rebuild_parameter_with_state')


class _Frozen:
  """Refuses attribute writes, so a pickle's BUILD cannot alter the object."""
  __slots__ = ()

  def __setattr__(self, name, value):
    raise ArchiveError(f'the pickle tries to set {name!r} on {self!r}')


class _StorageType(_Frozen):
  """What ``torch.FloatStorage`` (etc.) unpickles to: a dtype, nothing else."""
  __slots__ = ('name', 'dtype')

  def __init__(self, name):
    object.__setattr__(self, 'name', name)
    object.__setattr__(self, 'dtype', STORAGE_DTYPES[name])

  def __repr__(self):
    return f'torch.{self.name}'


class _Budget:
  """Bytes the tensors' copies may take, for one file.

  Tensors are copied out of their storages, so a file that builds one large
  tensor from a tiny storage (stride 0) or reads the same storage a million
  times could take far more memory than its size; it is refused instead.
  A real state_dict's tensors take about the size of the file.
  """

  def __init__(self, file_size):
    self.limit = self.left = 4 * file_size + (64 << 20)

  def spend(self, nbytes, what):
    self.left -= nbytes
    if self.left < 0:
      raise ArchiveError(f'its tensors would take more than {self.limit} '
                         f'bytes (4x the file, + 64 MiB) at {what}')


class _Storage(_Frozen):
  """A storage's elements as a flat read-only array (None in a first pass)."""
  __slots__ = ('key', 'dtype', 'array', 'budget')

  def __init__(self, key, dtype, array, budget=None):
    object.__setattr__(self, 'key', key)
    object.__setattr__(self, 'dtype', dtype)
    object.__setattr__(self, 'array', array)
    object.__setattr__(self, 'budget', budget)

  def __repr__(self):
    return f'storage {self.key!r}'


class _Global(_Frozen):
  """A permitted global: calls one function of this module, nothing else."""
  __slots__ = ('name', 'function')

  def __init__(self, name, function):
    object.__setattr__(self, 'name', name)
    object.__setattr__(self, 'function', function)

  def __call__(self, *args):
    return self.function(*args)

  def __repr__(self):
    return self.name


def _is_index(value):
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False,
                    backward_hooks=None, metadata=None):
  """``torch._utils._rebuild_tensor_v2``, as a NumPy copy of the view.

  Args:
    storage: the ``_Storage`` of the persistent id.
    offset: index of the tensor's first element in the storage.
    size: the tensor's shape.
    stride: elements between neighbours along each axis.
    requires_grad: ignored (a bool).
    backward_hooks: must be empty: hooks are code.
    metadata: ignored (torch's Python-level tensor metadata, plain data).

  Returns:
    A C-contiguous array that owns its memory, the tensor's exact bits.
  """
  del metadata  # plain data only: the unpickler builds nothing else
  if not isinstance(storage, _Storage):
    raise ArchiveError(f'a tensor is built on {type(storage).__name__}, not '
                       f'a storage')
  if not isinstance(requires_grad, bool) or backward_hooks:
    raise ArchiveError(f'a tensor on {storage!r} has backward hooks or a '
                       f'non-bool requires_grad')
  if not (_is_index(offset) and isinstance(size, tuple) and
          isinstance(stride, tuple) and len(size) == len(stride) and
          all(map(_is_index, size + stride))):
    raise ArchiveError(f'a tensor on {storage!r} has a malformed offset '
                       f'{offset!r}, size {size!r} or stride {stride!r}')
  if storage.array is None:  # the legacy stream's first pass: shapes only
    return None
  if 0 in size:
    return np.empty(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.array.size:
    raise ArchiveError(f'a tensor of size {size}, stride {stride} at offset '
                       f'{offset} reads element {last} of {storage!r}, which '
                       f'has {storage.array.size}')
  itemsize = storage.dtype.itemsize
  storage.budget.spend(math.prod(size) * itemsize,
                       f'a tensor of size {size} on {storage!r}')
  view = np.lib.stride_tricks.as_strided(
      storage.array[offset:], shape=size,
      strides=tuple(s * itemsize for s in stride), writeable=False)
  return np.array(view, order='C')


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None,
                       state=None):
  """``torch._utils._rebuild_parameter[_with_state]``: the tensor itself."""
  del requires_grad, state  # a Parameter's flag and Python attributes
  if not isinstance(data, np.ndarray) and data is not None:
    raise ArchiveError(f'a parameter wraps {type(data).__name__}, not a '
                       f'tensor')
  if backward_hooks:
    raise ArchiveError('a parameter has backward hooks')
  return data


class _Unpickler(pickle.Unpickler):
  """Unpickles plain data, ``OrderedDict`` and tensors; refuses the rest.

  Every global resolves to a fresh ``_Global`` (or ``OrderedDict``), never to
  an importable object, so no code named by the file can be reached.
  """

  def __init__(self, file, read_storage):
    super().__init__(file)
    self._read_storage = read_storage

  def find_class(self, module, name):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if module == 'torch._utils' and name in _REBUILDERS:
      function = (_rebuild_tensor if name == '_rebuild_tensor_v2' else
                  _rebuild_parameter)
      return _Global(f'{module}.{name}', function)
    if module == 'torch' and name in STORAGE_DTYPES:
      return _StorageType(name)
    raise ArchiveError(
        f'refused the global {module}.{name}: a state_dict of tensors needs '
        f'only collections.OrderedDict, torch._utils.{_REBUILDERS[0]} and '
        f'torch storages (loading it would run code from the file)')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and
            _text(pid[0]) == 'storage' and len(pid) in (5, 6)):
      raise ArchiveError(f'unknown persistent id {_short(pid)}')
    storage_type, key, _, numel = pid[1:5]
    if not isinstance(storage_type, _StorageType):
      raise ArchiveError(f'a storage of type {_short(storage_type)}')
    if not (isinstance(key, (str, bytes)) and _is_index(numel)):
      raise ArchiveError(f'malformed storage id {_short(pid)}')
    view = pid[5] if len(pid) == 6 else None
    return self._read_storage(_text(key), storage_type.dtype, numel, view)


def _text(value):
  return value.decode('ascii', 'replace') if isinstance(value, bytes) else value


def _short(value, limit=80):
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + '...'


def _array(raw, dtype, byteorder, what):
  """Decodes ``raw`` bytes (``byteorder`` 'little'/'big') into ``dtype``."""
  if len(raw) % dtype.itemsize:
    raise ArchiveError(f'{what} has {len(raw)} bytes, not a whole number of '
                       f'{dtype.name} elements')
  if dtype.itemsize == 1:
    return np.frombuffer(raw, dtype)
  # Swapped as unsigned integers, then reinterpreted: works for every dtype,
  # bfloat16 included, and copies into aligned memory that owns its data.
  order = '<' if byteorder == 'little' else '>'
  unsigned = np.frombuffer(raw, f'{order}u{dtype.itemsize}')
  array = unsigned.astype(f'=u{dtype.itemsize}').view(dtype)
  array.flags.writeable = False
  return array


def _unpickle(data, read_storage):
  """Runs the restricted unpickler over one pickle (bytes or a file)."""
  file = io.BytesIO(data) if isinstance(data, bytes) else data
  try:
    return _Unpickler(file, read_storage).load()
  except ArchiveError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Nothing from the file runs, so any other failure is a malformed pickle
    # (truncated, wrong opcodes, a REDUCE of a non-callable, ...).
    raise ArchiveError(f'malformed pickle ({type(e).__name__}: '
                       f'{_short(str(e))})') from None


def _no_storages(key, dtype, numel, view):
  del dtype, numel, view
  raise ArchiveError(f'unexpected storage {key!r} in a header pickle')


def _load_zip(archive, budget):
  """The object of a zip-format checkpoint."""
  names = archive.namelist()
  if any(n.endswith('/constants.pkl') or '/code/' in n for n in names):
    raise UnsupportedFormatError(
        'a TorchScript archive (torch.jit.save), not a state_dict; save the '
        "module's state_dict() with torch.save, or as .safetensors")
  pickles = [n for n in names if n.count('/') == 1 and
             n.endswith('/data.pkl')]
  if len(pickles) != 1:
    raise ArchiveError(f'a zip archive with {len(pickles)} <name>/data.pkl '
                       f'records, not a torch.save checkpoint')
  prefix = pickles[0][:-len('data.pkl')]
  byteorder = 'little'  # torch's default for archives without the record
  if prefix + 'byteorder' in names:
    byteorder = archive.read(prefix + 'byteorder').decode('ascii', 'replace')
    if byteorder not in ('little', 'big'):
      raise ArchiveError(f'unknown byteorder record {byteorder!r}')
  storages = {}

  def read_storage(key, dtype, numel, view):
    if view is not None:
      raise ArchiveError(f'storage {key!r} has legacy view metadata')
    if key not in storages:
      name = f'{prefix}data/{key}'
      if name not in names:
        raise ArchiveError(f'storage {key!r} has no record {name}')
      # Sizes are compared before reading, so a lying archive never makes
      # this allocate more than the storage it declares.
      nbytes = archive.getinfo(name).file_size
      if nbytes != numel * dtype.itemsize:
        raise ArchiveError(f'record {name} has {nbytes} bytes; {numel} '
                           f'{dtype.name} elements need '
                           f'{numel * dtype.itemsize}')
      try:
        raw = archive.read(name)
      except (zipfile.BadZipFile, NotImplementedError, zlib.error) as e:
        raise ArchiveError(f'damaged record {name} ({e})') from None
      storages[key] = _Storage(key, dtype, _array(raw, dtype, byteorder,
                                                  name), budget)
    if storages[key].dtype != dtype:
      raise ArchiveError(f'storage {key!r} is read as both '
                         f'{storages[key].dtype.name} and {dtype.name}')
    return storages[key]

  return _unpickle(archive.read(pickles[0]), read_storage)


def _load_legacy(f, size, budget):
  """The object of a legacy-format checkpoint, read from the open file ``f``.

  The storages' bytes follow the pickled object, so it is unpickled twice:
  first to learn each storage's dtype and size (and where the pickle ends),
  then, once the bytes are read, to build the arrays.
  """
  head = f.read(2)
  f.seek(0)
  if head.startswith(b'PK'):
    raise ArchiveError('a damaged or truncated zip archive (no central '
                       'directory at its end)')
  # A pickle starts with PROTO; its globals are refused like any other.
  magic = _unpickle(f, _no_storages) if head[:1] == b'\x80' else None
  if magic != LEGACY_MAGIC_NUMBER:
    raise ArchiveError('neither a zip archive nor a legacy torch.save file')
  version = _unpickle(f, _no_storages)
  if version != LEGACY_PROTOCOL_VERSION:
    raise ArchiveError(f'legacy protocol version {_short(version)}, not '
                       f'{LEGACY_PROTOCOL_VERSION}')
  _unpickle(f, _no_storages)  # sys_info: sizes of C types, unused
  start = f.tell()
  roots = {}

  def scan(key, dtype, numel, view):
    if roots.setdefault(key, (dtype, numel)) != (dtype, numel):
      raise ArchiveError(f'storage {key!r} is declared twice, differently')
    return _Storage(key, dtype, None)

  _unpickle(f, scan)
  keys = _unpickle(f, _no_storages)
  if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)
          and sorted(set(keys)) == sorted(roots)):
    raise ArchiveError(f'storage key list {_short(keys)} does not match the '
                       f'storages used ({_short(sorted(roots))})')
  arrays = {}
  for key in keys:
    dtype, numel = roots[key]
    header = f.read(8)
    count = struct.unpack('<q', header)[0] if len(header) == 8 else -1
    nbytes = numel * dtype.itemsize
    if count != numel or size - f.tell() < nbytes:
      raise ArchiveError(f'storage {key!r} ({numel} {dtype.name}) is '
                         f'truncated or mis-sized in the file')
    arrays[key] = _array(f.read(nbytes), dtype, 'little', f'storage {key!r}')

  def read_storage(key, dtype, numel, view):
    del numel  # checked by the first pass
    array = arrays[key]
    if view is not None:  # (view key, offset, size) in elements
      if not (isinstance(view, tuple) and len(view) == 3 and
              _is_index(view[1]) and _is_index(view[2]) and
              view[1] + view[2] <= array.size):
        raise ArchiveError(f'malformed view {_short(view)} of storage '
                           f'{key!r}')
      key, array = f'{key}[{view[1]}:]', array[view[1]:view[1] + view[2]]
    return _Storage(key, dtype, array, budget)

  f.seek(start)
  return _unpickle(f, read_storage)


def load(path):
  """Reads a ``torch.save`` file without torch and without running its code.

  Args:
    path: a ``.pth``/``.pt`` file written by ``torch.save``.

  Returns:
    The saved object, with tensors (and parameters) as C-contiguous NumPy
    arrays of the tensors' dtypes (bfloat16 as ``ml_dtypes.bfloat16``),
    bit-identical to ``torch.load``'s.

  Raises:
    FileNotFoundError: no such file.
    UnsupportedFormatError: a format this reader does not know (legacy tar,
      TorchScript); the message says how to re-save it.
    ArchiveError: anything else wrong: a global other than those a state_dict
      needs, a truncated or malformed archive, a tensor outside its storage.
      The message is one line and names the file.
  """
  path = os.fspath(path)
  budget = _Budget(os.path.getsize(path))
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as archive:
        return _load_zip(archive, budget)
    if tarfile.is_tarfile(path):
      raise UnsupportedFormatError(
          'the tar format of torch < 0.4, which neither this reader nor '
          "torch's weights-only loader reads; if you trust the file, load "
          'it in torch with that restriction off and save its state_dict '
          'again with torch.save, or as .safetensors')
    with open(path, 'rb') as f:
      return _load_legacy(f, os.fstat(f.fileno()).st_size, budget)
  except ArchiveError as e:
    raise type(e)(f'{path}: {e}') from None
  except (zipfile.BadZipFile, EOFError, NotImplementedError,
          zlib.error) as e:
    # A damaged archive: truncated records, bad CRC, unknown compression.
    raise ArchiveError(f'{path}: damaged zip archive ({e})') from None
