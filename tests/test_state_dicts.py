"""dtq_jax.state_dicts: state_dict files read as NumPy, bad files named."""

import collections

import numpy as np
import pytest
import safetensors.numpy

from dtq_jax import state_dicts
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


def _only_torch_reads(monkeypatch):
  """Makes every .pth a format ``torch_archive`` leaves to torch."""
  def load(path):
    raise state_dicts.torch_archive.UnsupportedFormatError(
        f'{path} is in a format this reader does not know')
  monkeypatch.setattr(state_dicts.torch_archive, 'load', load)


def test_formats_only_torch_reads_go_through_torch_load(tmp_path,
                                                        monkeypatch):
  torch = pytest.importorskip('torch')  # make test-torch runs this
  state = collections.OrderedDict([
      ('conv1.weight', torch.arange(24, dtype=torch.float32).reshape(
          2, 3, 2, 2)),
      ('fc.weight', torch.tensor([[0.5, -1.25]], dtype=torch.bfloat16)),
      ('bn1.num_batches_tracked', torch.tensor(7))])
  path = str(tmp_path / 'w.pth')
  torch.save(state, path)
  _only_torch_reads(monkeypatch)
  read = state_dicts.read(path)
  assert list(read) == list(state)
  np.testing.assert_array_equal(read['conv1.weight'],
                                np.arange(24, dtype=np.float32).reshape(
                                    2, 3, 2, 2))
  # NumPy has no bfloat16: such tensors come back as float32, exactly.
  assert read['fc.weight'].dtype == np.float32
  np.testing.assert_array_equal(read['fc.weight'], [[0.5, -1.25]])
  assert read['bn1.num_batches_tracked'].dtype == np.int64
  assert read['bn1.num_batches_tracked'] == 7


class _Unsafe:
  """A class of the test's own: weights_only refuses to build it."""


def test_torch_load_runs_no_code_and_its_refusal_is_one_line(tmp_path,
                                                            monkeypatch):
  torch = pytest.importorskip('torch')
  path = str(tmp_path / 'w.pth')
  # An object outside weights_only's allowed types: unpickling it would run
  # its class's code.
  torch.save({'conv1.weight': torch.zeros(2), 'extra': _Unsafe()}, path)
  _only_torch_reads(monkeypatch)
  with pytest.raises(state_dicts.CheckpointError,
                     match=r'w\.pth: torch\.load refused it: it holds '
                     r'test_state_dicts\._Unsafe, not only tensors') as e:
    state_dicts.read(path)
  assert '\n' not in str(e.value)
  # A damaged file torch cannot read is one line too.
  with open(path, 'rb') as f:
    head = f.read(300)
  with open(path, 'wb') as f:
    f.write(head)
  with pytest.raises(state_dicts.CheckpointError,
                     match=r'w\.pth: torch\.load could not read it') as e:
    state_dicts.read(path)
  assert '\n' not in str(e.value)
