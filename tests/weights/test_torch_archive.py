"""Tests of dtq_jax.weights.torch_archive: torch.save files read without torch.

The archives here are written without torch, by ``save_zip`` and
``save_legacy`` below, which imitate torch/serialization.py's two layouts
(the pickle, its persistent ids and the storages' bytes) with ``pickle`` and
``zipfile`` only. tests/weights/test_pretrained.py compares the reader with
``torch.load`` on files torch itself wrote, when torch is installed.
"""

import builtins
import collections
import io
import os
import pickle
import struct
import subprocess
import tarfile
import zipfile

import ml_dtypes
import numpy as np
import pytest

from dtq_jax.weights import torch_archive

# --- A torch-free writer of torch.save's formats -----------------------------

STORAGE_NAMES = {v: k for k, v in torch_archive.STORAGE_DTYPES.items()}


class TorchGlobal:
  """A global of torch's, pickled by name without importing torch."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle requires a callable; never called
    raise NotImplementedError(f'{self.module}.{self.name}')


REBUILD_TENSOR = TorchGlobal('torch._utils', '_rebuild_tensor_v2')


class Storage:
  """A torch storage: a flat array, pickled as a persistent id."""

  def __init__(self, array, key):
    self.array, self.key = np.ravel(array), key


class Tensor:
  """A view of a ``Storage``, pickled as torch pickles a tensor."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset = storage, offset
    self.size, self.stride = tuple(size), tuple(stride)

  @classmethod
  def of(cls, array, key):
    """A contiguous tensor on a storage of its own."""
    array = np.array(array, order='C')  # keeps 0-d arrays 0-d
    stride = tuple(s // array.itemsize for s in array.strides)
    return cls(Storage(array, key), 0, array.shape, stride)

  def __reduce__(self):
    return REBUILD_TENSOR, (self.storage, self.offset, self.size, self.stride,
                            False, collections.OrderedDict())


class _TorchPickler(pickle._Pickler):  # pylint: disable=protected-access
  """Pickles ``TorchGlobal`` as GLOBAL opcodes and storages as torch does."""
  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, file, legacy):
    # torch.save's protocol; Python 3 names, as an attacker may choose.
    super().__init__(file, protocol=2, fix_imports=False)
    self.legacy, self.storages = legacy, {}

  def _save_torch_global(self, obj):
    self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode())
    self.memoize(obj)

  dispatch[TorchGlobal] = _save_torch_global

  def persistent_id(self, obj):
    if not isinstance(obj, Storage):
      return None
    self.storages[obj.key] = obj
    storage_type = TorchGlobal('torch', STORAGE_NAMES[obj.array.dtype])
    pid = ('storage', storage_type, obj.key, 'cpu', obj.array.size)
    return pid + (None,) if self.legacy else pid  # legacy: view metadata


def _dumps(obj, legacy=False):
  buffer = io.BytesIO()
  pickler = _TorchPickler(buffer, legacy)
  pickler.dump(obj)
  return buffer.getvalue(), pickler.storages


def _raw(array, byteorder='little'):
  if array.dtype.itemsize == 1:
    return array.tobytes()
  unsigned = array.view(f'u{array.itemsize}')
  return unsigned.astype(('<' if byteorder == 'little' else '>') +
                         f'u{array.itemsize}').tobytes()


def save_zip(obj, path, byteorder='little', data_pkl=None):
  """Writes ``obj`` in torch.save's zip layout (torch >= 1.6).

  Args:
    obj: plain containers of ``Tensor``s.
    path: destination; its stem names the archive's folder, as in torch.
    byteorder: the ``byteorder`` record and the storages' byte order; None
      omits the record (little-endian, as torch reads such archives).
    data_pkl: bytes written as ``data.pkl`` instead of ``obj``'s pickle.
  """
  pickled, storages = _dumps(obj)
  name = os.path.splitext(os.path.basename(path))[0]
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
    archive.writestr(f'{name}/data.pkl', pickled if data_pkl is None else
                     data_pkl)
    if byteorder is not None:
      archive.writestr(f'{name}/byteorder', byteorder)
    for key, storage in storages.items():
      archive.writestr(f'{name}/data/{key}',
                       _raw(storage.array, byteorder or 'little'))
    archive.writestr(f'{name}/version', '3\n')


def save_legacy(obj, path, magic=torch_archive.LEGACY_MAGIC_NUMBER):
  """Writes ``obj`` in torch.save's legacy layout (torch < 1.6)."""
  pickled, storages = _dumps(obj, legacy=True)
  keys = sorted(storages)
  with open(path, 'wb') as f:
    f.write(magic if isinstance(magic, bytes) else pickle.dumps(magic, 2))
    pickle.dump(torch_archive.LEGACY_PROTOCOL_VERSION, f, protocol=2)
    pickle.dump({'protocol_version': 1001, 'little_endian': True,
                 'type_sizes': {'short': 2, 'int': 4, 'long': 4}}, f,
                protocol=2)
    f.write(pickled)
    pickle.dump(keys, f, protocol=2)
    for key in keys:
      array = storages[key].array
      f.write(struct.pack('<q', array.size) + _raw(array))


def save_state_dict(state, path, legacy=False):
  """Writes ``{key: np.ndarray}`` as torch.save writes a state_dict."""
  tensors = collections.OrderedDict(
      (k, Tensor.of(v, str(i))) for i, (k, v) in enumerate(state.items()))
  (save_legacy if legacy else save_zip)(tensors, path)


# --- Round trips -------------------------------------------------------------


def _assert_bits_equal(actual, expected):
  assert actual.dtype == expected.dtype and actual.shape == expected.shape
  assert actual.tobytes() == np.ascontiguousarray(expected).tobytes()


def _views():
  """Tensors that share storages, are strided, or are of every dtype."""
  rng = np.random.default_rng(0)
  base = Storage(rng.standard_normal(60).astype(np.float32), 'base')
  half = Storage(rng.standard_normal(12).astype(np.float16), 'half')
  tensors = collections.OrderedDict(
      transposed=Tensor(base, 0, (10, 6), (1, 10)),  # (6, 10).T
      every_third=Tensor(base, 21, (2, 3), (10, 3)),  # [2:4, 1::3]
      row1=Tensor(base, 10, (10,), (1,)),  # two offsets into one storage
      row3=Tensor(base, 30, (10,), (1,)),
      broadcast=Tensor(base, 5, (3, 4), (0, 1)),  # expand(): stride 0
      half_t=Tensor(half, 0, (4, 3), (1, 4)),
      scalar=Tensor(Storage(np.array([7], np.int64), 'scalar'), 0, (), ()),
      empty=Tensor(Storage(np.zeros(0, np.float32), 'empty'), 0, (0, 3),
                   (3, 1)),
  )
  for dtype in torch_archive.STORAGE_DTYPES.values():
    values = rng.integers(0, 100, 6).astype(np.float32) + 0.25
    tensors[dtype.name] = Tensor.of(values.astype(dtype).reshape(2, 3),
                                    dtype.name)
  b = base.array.reshape(6, 10)
  expected = dict(transposed=b.T, every_third=b[2:4, 1::3], row1=b[1],
                  row3=b[3], broadcast=np.broadcast_to(b[0, 5:9], (3, 4)),
                  half_t=half.array.reshape(3, 4).T, scalar=np.int64(7),
                  empty=np.zeros((0, 3), np.float32))
  expected.update({k: t.storage.array.reshape(2, 3)
                   for k, t in tensors.items() if k not in expected})
  return tensors, expected


@pytest.mark.parametrize('layout', ['zip', 'zip_big_endian', 'zip_no_record',
                                    'legacy'])
def test_round_trip(layout, tmp_path):
  tensors, expected = _views()
  path = tmp_path / 'views.pth'
  if layout == 'legacy':
    save_legacy(tensors, path)
  else:
    save_zip(tensors, path, byteorder={'zip': 'little',
                                       'zip_big_endian': 'big'}.get(layout))
  loaded = torch_archive.load(path)
  assert isinstance(loaded, collections.OrderedDict)
  assert list(loaded) == list(tensors)
  for key, array in loaded.items():
    _assert_bits_equal(array, np.asarray(expected[key]))
    assert array.flags.c_contiguous and array.flags.owndata, key
  assert loaded['bfloat16'].dtype == ml_dtypes.bfloat16
  # Copies: writing one tensor does not change another on its storage.
  loaded['row1'][0] = 100
  assert loaded['transposed'][1, 0] == expected['transposed'][1, 0]


def test_state_dict_with_parameters_and_metadata(tmp_path):
  weight = Tensor.of(np.arange(6, dtype=np.float32).reshape(2, 3), '0')

  class Parameter:

    def __reduce__(self):
      return (TorchGlobal('torch._utils', '_rebuild_parameter'),
              (weight, True, collections.OrderedDict()))

  state = collections.OrderedDict(weight=Parameter())
  state._metadata = {'': {'version': 1}}  # what state_dict() attaches
  path = tmp_path / 'p.pth'
  save_zip(state, path)
  loaded = torch_archive.load(path)
  np.testing.assert_array_equal(loaded['weight'], weight.storage.array
                                .reshape(2, 3))
  assert loaded._metadata == {'': {'version': 1}}


# --- Refusals ----------------------------------------------------------------


class _Payload:
  """A pickle that calls ``function(*args)`` when loaded by plain pickle."""

  def __init__(self, function, *args):
    self.function, self.args = function, args

  def __reduce__(self):
    return self.function, self.args


def _payloads(marker):
  """Each creates ``marker`` when unpickled by pickle.load."""
  return {
      'posix.system': _Payload(os.system, f'touch {marker}'),
      'builtins.eval': _Payload(builtins.eval, f'open({str(marker)!r}, "w")'),
      'subprocess.Popen': _Payload(subprocess.Popen, ['touch', str(marker)]),
  }


def _check_refused(path, marker, name):
  with pytest.raises(torch_archive.ArchiveError) as e:
    torch_archive.load(path)
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(f'{path}: refused the global {name}')
  assert not marker.exists(), 'the payload ran'


@pytest.mark.parametrize('name', list(_payloads('x')))
@pytest.mark.parametrize('where', ['zip', 'zip_storage_type', 'legacy',
                                   'legacy_magic'])
def test_code_in_the_pickle_never_runs(name, where, tmp_path):
  marker = tmp_path / 'ran'
  payload = _payloads(marker)[name]
  # The payload works: plain pickle runs it (creating another marker).
  control = tmp_path / 'control'
  result = pickle.loads(pickle.dumps(_payloads(control)[name], 2))
  if isinstance(result, subprocess.Popen):
    result.wait()
  elif hasattr(result, 'close'):
    result.close()
  assert control.exists()
  path = tmp_path / 'evil.pth'
  state = {'fc.weight': Tensor.of(np.zeros(2, np.float32), '0'),
           'fc.bias': payload}
  if where == 'zip':
    save_zip(state, path)
  elif where == 'zip_storage_type':  # inside the storage's persistent id
    evil = pickle.dumps(('storage', payload, '0', 'cpu', 2), 2,
                        fix_imports=False)
    save_zip({}, path, data_pkl=b'\x80\x02' + evil[2:-1] + b'Q.')
  elif where == 'legacy':
    save_legacy(state, path)
  else:
    save_legacy({}, path, magic=pickle.dumps(payload, 2, fix_imports=False))
  _check_refused(path, marker, name)


def test_a_pickle_cannot_alter_the_reader(tmp_path):
  # BUILD on the storage type the reader hands out: set its dtype to int8.
  data = (b'\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtype'
          b'ctorch\nCharStorage\nsb.')
  path = tmp_path / 'build.pth'
  save_zip({}, path, data_pkl=data)
  with pytest.raises(torch_archive.ArchiveError, match='malformed pickle'):
    torch_archive.load(path)
  assert torch_archive.STORAGE_DTYPES['FloatStorage'] == np.float32


def _one_line_error(path, match):
  with pytest.raises(torch_archive.ArchiveError, match=match) as e:
    torch_archive.load(path)
  assert '\n' not in str(e.value) and str(path) in str(e.value)
  return e.value


@pytest.mark.parametrize('legacy', [False, True])
def test_truncated_file(legacy, tmp_path):
  path = tmp_path / 'cut.pth'
  save_state_dict({'w': np.ones((64, 64), np.float32)}, path, legacy=legacy)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  _one_line_error(path, 'damaged or truncated zip archive' if not legacy
                  else r"storage '0' \(4096 float32\) is truncated")


def test_not_a_checkpoint(tmp_path):
  path = tmp_path / 'notes.pth'
  path.write_bytes(b'these are not weights\n' * 10)
  _one_line_error(path, 'neither a zip archive nor a legacy torch.save file')
  other_zip = tmp_path / 'other.pth'
  with zipfile.ZipFile(other_zip, 'w') as archive:
    archive.writestr('readme.txt', 'hello')
  _one_line_error(other_zip, r'0 <name>/data\.pkl records')


def test_damaged_record_is_refused(tmp_path):
  path = tmp_path / 'crc.pth'
  save_state_dict({'w': np.ones(256, np.float32)}, path)
  data = bytearray(path.read_bytes())
  at = data.index(np.ones(4, np.float32).tobytes())
  data[at:at + 4] = np.float32(2).tobytes()  # the CRC no longer matches
  path.write_bytes(bytes(data))
  _one_line_error(path, r'damaged record crc/data/0 \(Bad CRC-32')


def test_tensor_outside_its_storage(tmp_path):
  storage = Storage(np.zeros(6, np.float32), '0')
  path = tmp_path / 'oob.pth'
  save_zip({'w': Tensor(storage, 4, (2, 2), (2, 1))}, path)
  _one_line_error(path, r'reads element 7 of storage .0., which has 6')
  save_zip({'w': Tensor(storage, -1, (2,), (1,))}, path)
  _one_line_error(path, 'malformed offset -1')


def test_a_file_cannot_exhaust_memory(tmp_path):
  path = tmp_path / 'bomb.pth'
  one = Storage(np.zeros(1, np.float32), '0')
  save_zip({'w': Tensor(one, 0, (1 << 20, 1 << 20), (0, 0))}, path)  # 4 TiB
  _one_line_error(path, 'would take more than')
  # 100 copies of one 4 MiB storage, from a file of 4 MiB.
  big = Storage(np.zeros(1 << 20, np.float32), '0')
  save_zip([Tensor(big, 0, (1 << 20,), (1,)) for _ in range(100)], path)
  _one_line_error(path, r'would take more than \d+ bytes .* at a tensor of '
                  r'size \(1048576,\)')
  # The same as a few views: fine.
  save_zip([Tensor(big, 0, (1 << 20,), (1,)) for _ in range(3)], path)
  assert len(torch_archive.load(path)) == 3


def test_record_of_the_wrong_size(tmp_path):
  path = tmp_path / 'size.pth'
  save_state_dict({'w': np.zeros(4, np.float32)}, path)
  with zipfile.ZipFile(path) as archive:
    records = {n: archive.read(n) for n in archive.namelist()}
  records['size/data/0'] = records['size/data/0'][:12]
  with zipfile.ZipFile(path, 'w') as archive:
    for name, data in records.items():
      archive.writestr(name, data)
  _one_line_error(path, 'record size/data/0 has 12 bytes; 4 float32 '
                  'elements need 16')


def test_unknown_formats_are_left_to_torch(tmp_path):
  path = tmp_path / 'old.pth'  # torch < 0.4 wrote a tar of pickles
  with tarfile.open(path, 'w') as archive:
    info = tarfile.TarInfo('pickle')
    info.size = 3
    archive.addfile(info, io.BytesIO(b'abc'))
  with pytest.raises(torch_archive.UnsupportedFormatError,
                     match='tar format of torch < 0.4'):
    torch_archive.load(path)
  script = tmp_path / 'script.pt'
  with zipfile.ZipFile(script, 'w') as archive:
    archive.writestr('script/data.pkl', b'')
    archive.writestr('script/constants.pkl', b'')
    archive.writestr('script/code/__torch__.py', b'')
  with pytest.raises(torch_archive.UnsupportedFormatError,
                     match='TorchScript'):
    torch_archive.load(script)
