"""A torchvision state_dict file read as NumPy arrays, torch only as a fallback.

``read(path)`` takes a ``.safetensors`` file (torchvision's key names) or a
``.pth``/``.pt`` file, which ``torch_archive`` reads with the standard library
and NumPy, as safely as ``torch.load(weights_only=True)``; torch is used, if
installed, only for the formats that reader does not know. Damaged files are
one-line errors naming the file. ``conversion.py`` converts what it returns.
"""

import os
import pickle
import re
import tarfile
from typing import Mapping

import numpy as np
import safetensors
import safetensors.numpy

from dtq_jax import torch_archive


class CheckpointError(ValueError):
  """A checkpoint file cannot be read: damaged, truncated or of another kind."""


def _first_line(error):
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _torch_load(path, reason):
  """``torch.load`` for a format ``torch_archive`` does not know."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        f'{reason}; reading it needs torch (pip install -r '
        f'requirements-torch.txt), or give a .safetensors copy of it '
        f'instead.') from None
  # weights_only=True: tensors and plain containers only, never arbitrary
  # pickled objects (a .pth from the internet is untrusted code otherwise).
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    # torch's message runs over many lines (how to allow-list the object);
    # the one thing worth a line is what the object was.
    found = re.search(r'GLOBAL (\S+)', str(e))
    raise CheckpointError(
        f'{path}: torch.load refused it: it holds '
        f'{found.group(1) if found else "objects"}, not only tensors and '
        f'plain containers, and building that would run code from the '
        f'file.') from None
  except (RuntimeError, EOFError, tarfile.ReadError) as e:
    raise CheckpointError(f'{path}: torch.load could not read it (damaged or '
                          f'truncated?): {_first_line(e)}') from None
  if not isinstance(obj, Mapping):
    return obj
  return {k: (v.detach().cpu().float() if v.is_floating_point() else
              v.detach().cpu()).numpy()  # NumPy has no torch bfloat16
          if isinstance(v, torch.Tensor) else v for k, v in obj.items()}


def _read_pth(path):
  try:
    obj = torch_archive.load(path)
  except torch_archive.UnsupportedFormatError as e:
    obj = _torch_load(path, e)
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
      without running code from it; torch only for formats it does not know).

  Returns:
    ``{torch key: np.ndarray}`` in the file's order.

  Raises:
    FileNotFoundError: no such file.
    CheckpointError: a damaged ``.safetensors`` file, a ``.pth`` file
      that holds something else than a state_dict of tensors, or one in a
      format only torch reads that ``torch.load(weights_only=True)``
      refuses or cannot read.
    torch_archive.ArchiveError: a damaged or unsafe ``.pth`` file.
    ImportError: a ``.pth`` format only torch reads, without torch installed.
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
