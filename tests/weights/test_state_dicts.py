"""dtq_jax.weights.state_dicts: state_dict files read as NumPy, bad files named."""

import collections
import zipfile

import numpy as np
import pytest
import safetensors.numpy

from dtq_jax.weights import state_dicts
import test_torch_archive  # the tests' torch-free .pth writer


def _state():
  return collections.OrderedDict([
      ('conv1.weight', np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)),
      ('bn1.num_batches_tracked', np.array(7, np.int64))])


@pytest.mark.parametrize('kind', ['safetensors', 'zip', 'legacy'])
def test_reads_every_tensor(kind, tmp_path):
  path = str(tmp_path / ('w.safetensors' if kind == 'safetensors'
                         else 'w.pth'))
  if kind == 'safetensors':
    safetensors.numpy.save_file(dict(_state()), path)
  else:
    test_torch_archive.save_state_dict(_state(), path,
                                       legacy=kind == 'legacy')
  read = state_dicts.read(path)
  if kind == 'safetensors':  # the format keeps no order of its own
    assert sorted(read) == sorted(_state())
  else:  # torch.save's order, as torch.load gives it
    assert list(read) == list(_state())
  for key, value in _state().items():
    np.testing.assert_array_equal(read[key], value)
    assert read[key].dtype == value.dtype


def test_a_pth_that_holds_no_state_dict_is_named(tmp_path):
  path = str(tmp_path / 'list.pth')
  test_torch_archive.save_zip(
      [test_torch_archive.Tensor.of(np.zeros(2, np.float32), '0')], path)
  with pytest.raises(state_dicts.CheckpointError,
                     match=r'list\.pth holds a list, not a state_dict'):
    state_dicts.read(path)
  path = str(tmp_path / 'count.pth')
  test_torch_archive.save_zip({'epoch': 3}, path)
  with pytest.raises(state_dicts.CheckpointError,
                     match=r'count\.pth: epoch is a int, not a tensor'):
    state_dicts.read(path)


def test_missing_unknown_and_damaged_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='No such pretrained checkpoint'):
    state_dicts.read(str(tmp_path / 'absent.pth'))
  other = tmp_path / 'w.bin'
  other.write_bytes(b'x')
  with pytest.raises(ValueError, match=r"unknown checkpoint type '\.bin'"):
    state_dicts.read(str(other))
  damaged = tmp_path / 'w.safetensors'
  damaged.write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":')
  with pytest.raises(state_dicts.CheckpointError,
                     match='not a readable .safetensors file'):
    state_dicts.read(str(damaged))



def test_torch_script_archives_are_refused_with_advice(tmp_path):
  """The formats the reader leaves out are ones torch's safe loader refuses.

  Without torch, an archive laid out as ``torch.jit.save`` writes it; with
  torch (make test-torch), a real one, which ``torch.load(weights_only=True)``
  refuses as well.
  """
  path = str(tmp_path / 'script.pt')
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    torch = None
  if torch is None:
    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr('script/data.pkl', b'')
      archive.writestr('script/constants.pkl', b'')
      archive.writestr('script/code/__torch__.py', b'')
  else:
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 3)), path)
    with pytest.raises(RuntimeError, match='weights_only'):
      torch.load(path, weights_only=True)
  with pytest.raises(state_dicts.torch_archive.UnsupportedFormatError,
                     match=r'script\.pt: a TorchScript archive .*state_dict'
                     r'\(\) with torch\.save, or as \.safetensors') as e:
    state_dicts.read(path)
  assert '\n' not in str(e.value)
