"""torchvision checkpoints as Flax variables of the core models.

``load_torchvision(name, path)`` returns ``{'params': ..., 'batch_stats': ...}``
for ``models.create_model(name, num_classes=1000)`` (ResNet-18/34/50/101/152,
MobileNetV2; any model of ``models.MODEL_NAMES`` whose names follow the same
convention converts too), read from

* a ``.safetensors`` file with torchvision's key names;
* a ``.pth`` file, read without torch (``state_dicts.py``);
* torchvision's published IMAGENET1K_V1 checkpoint (``path=None``): downloaded
  once into a cache folder, its SHA-256 checked against the prefix in its file
  name, converted once, and the converted variables cached as ``.safetensors``;
* a file of converted variables written by this module (``.safetensors`` or
  ``.npz`` keyed by flattened Flax paths such as ``params/fc/kernel``).

The conversion itself (one table of rules on torch key names and tensor
ranks, every name, shape and value checked) is ``conversion.py``.

Command line (converts, reports per-tensor statistics, optionally writes;
``main`` here, run as ``python -m dtq_jax.pretrained``)::

  python -m dtq_jax.pretrained --model resnet50 --from resnet50.pth \\
      --to converted/
  python -m dtq_jax.pretrained --model mobilenet_v2 --from torchvision

Parity with torchvision itself (its networks' outputs, and ``torch.load``'s
arrays) is tested by tests/weights/test_pretrained.py when torch and torchvision are
installed (``make test-torch``).
"""

import argparse
import os
import sys
import urllib.parse

from flax import traverse_util
import numpy as np
import safetensors.numpy

from dtq_jax.infra import caches
from dtq_jax.infra import files
from dtq_jax import models
from dtq_jax.weights import conversion
from dtq_jax.weights import downloads
from dtq_jax.weights import state_dicts

# torchvision's IMAGENET1K_V1 weights (the ones the paper used). The hex group
# after '-' is the start of the file's SHA-256, as torch.hub checks it.
TORCHVISION_URLS = {
    'resnet18': 'https://download.pytorch.org/models/resnet18-f37072fd.pth',
    'resnet34': 'https://download.pytorch.org/models/resnet34-b627a593.pth',
    'resnet50': 'https://download.pytorch.org/models/resnet50-0676ba61.pth',
    'resnet101': 'https://download.pytorch.org/models/resnet101-63fe2227.pth',
    'resnet152': 'https://download.pytorch.org/models/resnet152-394f9c45.pth',
    'mobilenet_v2':
        'https://download.pytorch.org/models/mobilenet_v2-b0353104.pth',
}
# Files of converted variables (save_variables) say so in their metadata.
CONVERTED_FORMAT = 'dtq_jax.flax_variables.v1'
CONVERTED_SUFFIX = '.flax.safetensors'
_NO_PRETRAINED = ('', 'none')


def default_cache_dir():
  """Returns ``$XDG_CACHE_HOME/dtq_jax/pretrained`` (~/.cache by default)."""
  return os.path.join(caches.default_root(), 'pretrained')


def _flat_keys(variables):
  flat = traverse_util.flatten_dict(
      {c: dict(variables[c])
       for c in conversion.COLLECTIONS if c in variables})
  return {'/'.join(path): np.ascontiguousarray(value, dtype=np.float32)
          for path, value in flat.items()}


def save_variables(variables, path, name=''):
  """Writes Flax variables atomically, keyed by flattened paths, no pickle.

  Args:
    variables: ``{'params': ..., 'batch_stats': ...}``.
    path: destination ``.safetensors`` or ``.npz`` file; written under a
      temporary name and renamed, so readers never see half a file.
    name: model name recorded in the safetensors metadata.
  """
  flat = _flat_keys(variables)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files.atomic_path(path) as tmp:
    if path.endswith('.npz'):
      with open(tmp, 'wb') as f:
        np.savez(f, **flat)
    else:
      safetensors.numpy.save_file(
          flat, tmp, metadata={'format': CONVERTED_FORMAT, 'model': name})


def _is_converted(keys):
  return all(k.split('/', 1)[0] in conversion.COLLECTIONS and '/' in k
             for k in keys)


def load_variables(name, path):
  """Reads variables written by ``save_variables`` and checks them.

  Args:
    name: model name the variables must fit.
    path: ``.safetensors`` or ``.npz`` file of flattened Flax paths.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of float32 NumPy arrays.

  Raises:
    FileNotFoundError: no such file.
    state_dicts.CheckpointError: a damaged ``.safetensors`` file.
    conversion.ConversionError: a leaf missing, extra or mis-shaped for
      ``name``, not floating point, not finite, or a variance not positive.
  """
  state_dicts.check_exists(path)
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as data:
      flat = {k: data[k] for k in data.files}
  else:
    flat = state_dicts.read_safetensors(path)
  return conversion.check_variables(name, flat, path)


def _published(name, cache_dir):
  if name not in TORCHVISION_URLS:
    raise ValueError(f'No published torchvision weights for {name!r}; '
                     f'known: {", ".join(TORCHVISION_URLS)}.')
  cache_dir = cache_dir or default_cache_dir()
  url = TORCHVISION_URLS[name]
  filename = os.path.basename(urllib.parse.urlparse(url).path)
  converted = os.path.join(cache_dir, filename.split('.')[0] + CONVERTED_SUFFIX)
  return url, converted


def _download_published(url, cache_dir, progress=True):
  """torchvision's checkpoint at ``url`` in ``cache_dir``, its hash checked."""
  checkpoint = downloads.download(url, cache_dir, progress=progress)
  # Checked here, not only in download(): a file placed by hand, or a
  # truncated one, must not be converted and cached.
  downloads.check_hash(downloads.sha256_file(checkpoint), checkpoint,
                       checkpoint)
  return checkpoint


def load_torchvision(name, path=None, cache_dir=None, progress=True):
  """Flax variables of ``create_model(name, num_classes=1000)``, torchvision's.

  Args:
    name: 'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152' or
      'mobilenet_v2'.
    path: a torchvision state_dict as ``.safetensors`` or ``.pth`` (torch
      not needed), or converted variables (``.safetensors``/``.npz`` of Flax
      paths). None: torchvision's published IMAGENET1K_V1 weights, downloaded
      and converted once, then read from the cache.
    cache_dir: cache folder for downloads and converted variables (default
      ``default_cache_dir()``).
    progress: show a progress bar while downloading.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of float32 NumPy arrays.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    downloads.DownloadError: offline and nothing cached (the message says
      where to put the file by hand).
    downloads.HashMismatchError: the checkpoint is not the published file.
    state_dicts.CheckpointError, torch_archive.ArchiveError: a damaged or
      unsafe file, or a ``.pth`` holding no state_dict.
    conversion.ConversionError: the checkpoint does not fit the model, or
      its values cannot be trusted (see ``conversion.convert_state_dict``).
  """
  if path is not None:
    path = os.fspath(path)
    state_dicts.check_exists(path)
    if path.endswith('.npz'):
      return load_variables(name, path)
    if path.endswith('.safetensors'):
      if _is_converted(state_dicts.read_safetensors(path, keys_only=True)):
        return load_variables(name, path)
    return conversion.convert_state_dict(name, state_dicts.read(path))
  url, converted = _published(name, cache_dir)
  if os.path.isfile(converted):
    return load_variables(name, converted)
  checkpoint = _download_published(url, os.path.dirname(converted), progress)
  variables = conversion.convert_state_dict(
      name, state_dicts.read(checkpoint))
  save_variables(variables, converted, name)
  return variables


def load_pretrained(name, spec, cache_dir=None):
  """Dispatches on the trainer's ``pretrained`` config value.

  Args:
    name: model name.
    spec: 'torchvision' (published weights, downloaded and cached), a file
      path (see ``load_torchvision``), or 'none'/''/None for random init.
    cache_dir: cache folder (default ``default_cache_dir()``).

  Returns:
    ``{'params': ..., 'batch_stats': ...}``, or None for random init.

  Raises:
    FileNotFoundError: ``spec`` is a path that does not exist.
    See ``load_torchvision`` for the rest.
  """
  if spec is None or str(spec).strip().lower() in _NO_PRETRAINED:
    return None
  if str(spec).strip().lower() == 'torchvision':
    return load_torchvision(name, cache_dir=cache_dir)
  return load_torchvision(name, os.path.expanduser(os.fspath(spec)),
                          cache_dir=cache_dir)


def _natural_key(key):
  return [(0, int(part), '') if part.isdigit() else (1, 0, part)
          for part in key.split('.')]


def tensor_stats(plan, variables):
  """Per-tensor statistics of a conversion, for the report.

  Args:
    plan: ``conversion.plan_conversion``'s assignments.
    variables: the converted variables.

  Returns:
    One dict per assignment, in natural key order, with 'torch_key',
    'torch_shape', 'flax_path' ('' for dropped tensors), 'flax_shape',
    'mean', 'std', 'min', 'max'.
  """
  flat = traverse_util.flatten_dict(variables)
  rows = []
  # Natural order (layer2 before layer10), whatever order the file had.
  for a in sorted(plan, key=lambda a: _natural_key(a.torch_key)):
    row = dict(torch_key=a.torch_key, torch_shape=a.torch_shape,
               flax_path='/'.join(a.flax_path or ()), flax_shape=a.flax_shape)
    if a.flax_path is not None:
      value = np.asarray(flat[a.flax_path], dtype=np.float64)
      row.update(mean=value.mean(), std=value.std(), min=value.min(),
                 max=value.max())
    rows.append(row)
  return rows


def _format_report(rows):
  def shape(s):
    return 'x'.join(map(str, s)) if s else '-'
  header = (f'{"torch key":<40} {"torch shape":>16}  {"flax path":<52} '
            f'{"flax shape":>16} {"mean":>10} {"std":>10} {"min":>10} '
            f'{"max":>10}')
  lines = [header, '-' * len(header)]
  for r in rows:
    stats = ' '.join(f'{r[k]:>10.4g}' for k in ('mean', 'std', 'min', 'max')
                     ) if 'mean' in r else f'{"(dropped)":>10}'
    lines.append(f'{r["torch_key"]:<40} {shape(r["torch_shape"]):>16}  '
                 f'{r["flax_path"] or "-":<52} '
                 f'{shape(r["flax_shape"]):>16} {stats}')
  return '\n'.join(lines)


def main(argv=None):
  """Command line: convert a checkpoint, report statistics, optionally save.

  Args:
    argv: arguments (default ``sys.argv[1:]``).

  Returns:
    Process exit status.
  """
  parser = argparse.ArgumentParser(
      prog='python -m dtq_jax.pretrained',
      description='Convert a torchvision checkpoint to dtq_jax Flax '
      'variables and report per-tensor statistics.')
  parser.add_argument('--model', required=True, choices=models.MODEL_NAMES)
  parser.add_argument('--from', dest='source', default='torchvision',
                      help="'torchvision' (download the published weights) "
                      'or a .safetensors/.pth state_dict (default: '
                      '%(default)s)')
  parser.add_argument('--to', default=None,
                      help='output folder for <name>.flax.safetensors (or '
                      '.npz with --format npz); omitted: report only')
  parser.add_argument('--format', choices=('safetensors', 'npz'),
                      default='safetensors')
  # --cache_dir as absl's flags are spelled (main.py); --cache-dir still works.
  parser.add_argument('--cache_dir', '--cache-dir', default=None,
                      help=f'download cache (default: {default_cache_dir()})')
  args = parser.parse_args(argv)

  try:
    if args.source == 'torchvision':
      url, _ = _published(args.model, args.cache_dir)
      checkpoint = _download_published(
          url, args.cache_dir or default_cache_dir())
    else:
      checkpoint = os.path.expanduser(args.source)
    variables, plan = conversion.convert_with_plan(
        args.model, state_dicts.read(checkpoint))
  except (OSError, ImportError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(_format_report(tensor_stats(plan, variables)))
  flat = traverse_util.flatten_dict(variables)
  counts = {c: sum(v.size for p, v in flat.items() if p[0] == c)
            for c in conversion.COLLECTIONS}
  dropped = sum(a.flax_path is None for a in plan)
  print(f'\n{len(plan)} tensors consumed ({dropped} counters dropped), '
        f'{len(flat)} Flax leaves filled: {counts["params"]:,} parameters, '
        f'{counts["batch_stats"]:,} batch statistics.')
  if args.to:
    stem = os.path.basename(checkpoint).split('.')[0]
    out = os.path.join(args.to, stem + (
        CONVERTED_SUFFIX if args.format == 'safetensors' else '.flax.npz'))
    save_variables(variables, out, args.model)
    print(f'Wrote {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
