"""A torchvision state_dict file read as NumPy arrays, without torch.

``read(path)`` takes a ``.safetensors`` file (torchvision's key names) or a
``.pth``/``.pt`` file, which ``torch_archive`` reads with the standard library
and NumPy, as safely as ``torch.load(weights_only=True)``. torch is not used:
the formats that reader does not know (torch < 0.4's tar files, TorchScript
archives) are ones ``torch.load(weights_only=True)`` refuses too. Damaged
files are one-line errors naming the file. ``conversion.py`` converts what it
returns.
"""

import os
from typing import Mapping

import numpy as np
import safetensors
import safetensors.numpy

from dtq_jax.weights import torch_archive


class CheckpointError(ValueError):
  """A checkpoint file cannot be read: damaged, truncated or of another kind."""


def _read_pth(path):
  obj = torch_archive.load(path)
  if not isinstance(obj, Mapping):
    raise CheckpointError(f'{path} holds a {type(obj).__name__}, not a '
                          f'state_dict.')
  for key, value in obj.items():
    if not isinstance(value, np.ndarray):
      raise CheckpointError(f'{path}: {key} is a {type(value).__name__}, not '
                            f'a tensor.')
  return dict(obj)


def read_safetensors(path, keys_only=False):
  """A ``.safetensors`` file's arrays (or keys), with damage as one line."""
  try:
    if keys_only:
      with safetensors.safe_open(path, 'numpy') as f:
        return list(f.keys())
    return dict(safetensors.numpy.load_file(path))
  except safetensors.SafetensorError as e:
    # The Rust error is not an OSError/ValueError: without this, a truncated
    # download is a traceback instead of a message naming the file.
    raise CheckpointError(f'{path} is not a readable .safetensors file '
                          f'(damaged or truncated?): {e}') from None


def read(path):
  """Reads a torchvision state_dict as NumPy arrays, without torch.

  Args:
    path: ``.safetensors`` or ``.pth``/``.pt`` (read by ``torch_archive``
      without running code from it).

  Returns:
    ``{torch key: np.ndarray}`` in the file's order.

  Raises:
    FileNotFoundError: no such file.
    CheckpointError: a damaged ``.safetensors`` file, or a ``.pth`` file
      that holds something else than a state_dict of tensors.
    torch_archive.ArchiveError: a damaged or unsafe ``.pth`` file, or one in
      a format no safe reader reads (``UnsupportedFormatError``).
    ValueError: an unknown file type.
  """
  check_exists(path)
  suffix = os.path.splitext(path)[1].lower()
  if suffix == '.safetensors':
    return read_safetensors(path)
  if suffix in ('.pth', '.pt'):
    return _read_pth(path)
  raise ValueError(f'{path}: unknown checkpoint type {suffix!r} (expected '
                   f'.safetensors, .pth or .pt).')


def check_exists(path):
  """Raises FileNotFoundError naming a missing checkpoint file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No such pretrained checkpoint: {path}')
