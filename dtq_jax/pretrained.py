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

The conversion is one table of rules, ``LEAF_RULES``, on the last component of
a torch key and the rank of its tensor (a 4-D ``weight`` is a convolution
kernel, a 1-D ``weight`` a BatchNorm scale, ...), plus one rule for module
paths: the models name their Flax modules after torchvision's with '.' written
as '_' (``layer1.0.downsample.0`` is ``params['layer1_0']['downsample_0']``),
so a torch module path matches the Flax module path whose names, joined with
'_', give the same string. Every tensor of the state_dict is consumed exactly
once and every Flax leaf is filled exactly once; anything else is an error
that names the tensors or leaves at fault. The values are checked too: every
kept tensor must be floating point and finite, and every running variance
positive, so a damaged checkpoint is refused instead of trained from.

Command line (converts, reports per-tensor statistics, optionally writes)::

  python -m dtq_jax.pretrained --model resnet50 --from resnet50.pth \\
      --to converted/
  python -m dtq_jax.pretrained --model mobilenet_v2 --from torchvision

Parity with torchvision itself (its networks' outputs, and ``torch.load``'s
arrays) is tested by tests/test_pretrained.py when torch and torchvision are
installed (``make test-torch``).
"""

import argparse
import dataclasses
import functools
import os
import re
import sys
from typing import Optional, Tuple
import urllib.parse

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy

from dtq_jax import caches
from dtq_jax import downloads
from dtq_jax import files
from dtq_jax import models
from dtq_jax import state_dicts

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
COLLECTIONS = ('params', 'batch_stats')
# torchvision's networks take RGB images, so every converted first
# convolution (and every template here) has 3 input channels.
INPUT_CHANNELS = 3
_NO_PRETRAINED = ('', 'none')
# Longest list of problems shown in one conversion error.
_IN_FIRST_LINE = 3
_MAX_LISTED_ERRORS = 40

# Axis permutations: torch OIHW (depthwise: (C, 1, H, W)) -> Flax HWIO
# (depthwise: (H, W, 1, C)); torch Linear (out, in) -> Flax Dense (in, out).
OIHW_TO_HWIO = (2, 3, 1, 0)
OUT_IN_TO_IN_OUT = (1, 0)


class ConversionError(ValueError):
  """A state_dict does not fit the model: missing, extra or mis-shaped."""


@dataclasses.dataclass(frozen=True)
class LeafRule:
  """How one kind of torch tensor becomes one Flax leaf.

  Attributes:
    torch_leaf: last component of the torch key (``weight``, ``bias``, ...).
    ndim: rank of the torch tensor; with ``torch_leaf`` it picks the rule.
    collection: Flax collection, or None for tensors consumed but not kept.
    flax_leaf: name of the Flax leaf inside the module.
    perm: axis permutation from torch to Flax layout (None: as is).
  """
  torch_leaf: str
  ndim: int
  collection: Optional[str]
  flax_leaf: Optional[str]
  perm: Optional[Tuple[int, ...]] = None


LEAF_RULES = (
    LeafRule('weight', 4, 'params', 'kernel', OIHW_TO_HWIO),  # Conv2d
    LeafRule('weight', 2, 'params', 'kernel', OUT_IN_TO_IN_OUT),  # Linear
    LeafRule('weight', 1, 'params', 'scale'),  # BatchNorm affine
    LeafRule('bias', 1, 'params', 'bias'),  # BatchNorm, Linear (or Conv2d)
    LeafRule('running_mean', 1, 'batch_stats', 'mean'),
    LeafRule('running_var', 1, 'batch_stats', 'var'),
    # Only PyTorch's cumulative-average BatchNorm (momentum=None) reads this
    # counter; torchvision and Flax use an exponential average, so it is
    # consumed (its module must be a BatchNorm) and dropped.
    LeafRule('num_batches_tracked', 0, None, None),
)
_RULES = {(r.torch_leaf, r.ndim): r for r in LEAF_RULES}
assert len(_RULES) == len(LEAF_RULES), 'LEAF_RULES must not overlap'


@dataclasses.dataclass(frozen=True)
class Assignment:
  """Where one torch tensor goes.

  Attributes:
    torch_key: state_dict key.
    torch_shape: its shape.
    flax_path: (collection, *modules, leaf), or None if consumed and dropped.
    flax_shape: shape of the Flax leaf (None if dropped).
    perm: axis permutation applied (None: as is).
  """
  torch_key: str
  torch_shape: Tuple[int, ...]
  flax_path: Optional[Tuple[str, ...]]
  flax_shape: Optional[Tuple[int, ...]]
  perm: Optional[Tuple[int, ...]]


def default_cache_dir():
  """Returns ``$XDG_CACHE_HOME/dtq_jax/pretrained`` (~/.cache by default)."""
  return os.path.join(caches.default_root(), 'pretrained')


@functools.lru_cache(maxsize=None)
def _template(name):
  model = models.create_model(name, num_classes=1000)
  # Shapes only: jax.eval_shape traces init without computing anything, so
  # even ResNet-152's template costs no memory or FLOPs. Shapes do not depend
  # on the image size, so a small one keeps the trace cheap.
  variables = jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0),
      jax.ShapeDtypeStruct((1, 32, 32, INPUT_CHANNELS), jnp.float32))
  flat = traverse_util.flatten_dict(
      {c: dict(variables[c]) for c in COLLECTIONS if c in variables})
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def model_template(name):
  """Flax leaf shapes of ``create_model(name, num_classes=1000)``.

  Args:
    name: a model of ``models.MODEL_NAMES``.

  Returns:
    ``{(collection, *modules, leaf): shape}`` for 'params' and 'batch_stats'.
  """
  return dict(_template(name))


def _module_index(template):
  """Maps '_'-joined Flax module paths to the module paths themselves."""
  index = {}
  for path in template:
    modules = path[1:-1]
    joined = '_'.join(modules)
    if index.setdefault(joined, modules) != modules:
      raise ConversionError(
          f'Flax modules {"/".join(index[joined])} and {"/".join(modules)} '
          f'both read as {joined!r}; torch names cannot be matched.')
  return index


def _permuted(shape, perm):
  return tuple(shape) if perm is None else tuple(shape[a] for a in perm)


def _torch_name_hint(path):
  """Guesses the torch key of a Flax leaf, for error messages only."""
  collection, modules, leaf = path[0], path[1:-1], path[-1]
  torch_leaf = next((r.torch_leaf for r in LEAF_RULES
                     if (r.collection, r.flax_leaf) == (collection, leaf)),
                    leaf)
  # '_' before a digit was a '.' in torch (layer1_0 <- layer1.0).
  module = re.sub(r'_(?=\d)', '.', '.'.join(modules))
  return f'{module}.{torch_leaf}'


def _raise_if(errors, what):
  if not errors:
    return
  shown = errors[:_MAX_LISTED_ERRORS]
  more = len(errors) - len(shown)
  # The first line names the first problems too: callers that show one line
  # (main.py's errors) still say which tensors.
  head = '; '.join(errors[:_IN_FIRST_LINE])
  if len(errors) > _IN_FIRST_LINE:
    head += f'; ... ({len(errors) - _IN_FIRST_LINE} more)'
  lines = [f'{len(errors)} problem(s) converting {what}: {head}'] + [
      f'  {e}' for e in shown] + ([f'  ... and {more} more'] if more else [])
  raise ConversionError('\n'.join(lines))


def plan_conversion(name, shapes):
  """Matches torch tensors to Flax leaves, checking names and shapes.

  Args:
    name: model name (see ``models.create_model``).
    shapes: ``{torch key: shape}`` of a torchvision state_dict, in order.

  Returns:
    One ``Assignment`` per torch key, in the given order.

  Raises:
    ConversionError: naming every torch tensor that has no rule, no Flax
      counterpart, a shape that does not fit or a Flax leaf already taken, and
      every Flax leaf left unfilled.
  """
  template = _template(name)
  index = _module_index(template)
  errors, plan, filled = [], [], {}
  for key, shape in shapes.items():
    shape = tuple(int(d) for d in shape)
    module, _, leaf = key.rpartition('.')
    rule = _RULES.get((leaf, len(shape)))
    modules = index.get(module.replace('.', '_'))
    if rule is None:
      errors.append(f'unexpected {key} {shape}: no rule for a '
                    f'{len(shape)}-D {leaf!r}')
      continue
    if modules is None:
      errors.append(f'unexpected {key} {shape}: the model has no module '
                    f'{module.replace(".", "_")!r}')
      continue
    if rule.collection is None:
      # The counter belongs to a BatchNorm: the module must have statistics.
      if ('batch_stats',) + modules + ('mean',) not in template:
        errors.append(f'unexpected {key}: {"/".join(modules)} is not a '
                      f'BatchNorm')
      else:
        plan.append(Assignment(key, shape, None, None, None))
      continue
    path = (rule.collection,) + modules + (rule.flax_leaf,)
    target = template.get(path)
    converted = _permuted(shape, rule.perm)
    if target is None:
      errors.append(f'unexpected {key} {shape}: the model has no leaf '
                    f'{"/".join(path)}')
    elif path in filled:
      errors.append(f'{key} fills {"/".join(path)}, already filled by '
                    f'{filled[path]}')
    elif converted != target:
      errors.append(f'mis-shaped {key}: {shape} gives {converted}, but '
                    f'{"/".join(path)} is {target}')
      filled[path] = key
    else:
      filled[path] = key
      plan.append(Assignment(key, shape, path, target, rule.perm))
  for path in template:
    if path not in filled:
      errors.append(f'missing {_torch_name_hint(path)}: nothing fills '
                    f'{"/".join(path)} {template[path]}')
  _raise_if(errors, f'a state_dict into {name}')
  return plan


def _is_float(dtype):
  # ml_dtypes' bfloat16 (a torch bfloat16 tensor) is not an np.floating.
  return np.issubdtype(dtype, np.floating) or dtype == ml_dtypes.bfloat16


def _trusted_float32(label, path, array, perm, errors):
  """``array`` as the Flax leaf at ``path``, or None after naming a problem.

  Args:
    label: the tensor's name in messages (torch key or Flax path).
    path: its Flax path; a 'batch_stats' 'var' leaf must be positive.
    array: the tensor's values.
    perm: axis permutation to the Flax layout (None: as is).
    errors: list the problems are appended to.

  Returns:
    A contiguous float32 copy (safetensors needs contiguous arrays, and the
    source's buffers, e.g. a memory map, must not be aliased), or None.
  """
  array = np.asarray(array)
  if not _is_float(array.dtype):
    errors.append(f'{label} is {array.dtype.name}, not floating point')
    return None
  if perm is not None:
    array = np.transpose(array, perm)
  # Checked after the cast: float64 values beyond float32's range are Inf
  # in the model even if finite in the file (reported below, not warned).
  with np.errstate(over='ignore'):
    array = np.array(array, dtype=np.float32, order='C')
  bad = array.size - np.count_nonzero(np.isfinite(array))
  if bad:
    errors.append(f'{label} has {bad} NaN/Inf value(s)')
  elif path[0] == 'batch_stats' and path[-1] == 'var':
    nonpositive = np.count_nonzero(array <= 0)
    if nonpositive:
      errors.append(f'{label} (a running variance) has {nonpositive} '
                    f'value(s) <= 0')
  return array


def _convert(name, state_dict):
  plan = plan_conversion(
      name, {k: np.shape(v) for k, v in state_dict.items()})
  flat, errors = {}, []
  for a in plan:
    if a.flax_path is not None:
      flat[a.flax_path] = _trusted_float32(
          a.torch_key, a.flax_path, state_dict[a.torch_key], a.perm, errors)
  _raise_if(errors, f'the values of a state_dict for {name}')
  return traverse_util.unflatten_dict(flat), plan


def convert_state_dict(name, state_dict):
  """Converts a torchvision state_dict into Flax variables.

  Args:
    name: model name, e.g. 'resnet50' or 'mobilenet_v2'.
    state_dict: ``{torch key: array}`` (NumPy arrays or anything
      ``np.asarray`` reads) in torchvision's layout.

  Returns:
    ``{'params': ..., 'batch_stats': ...}``: nested dicts of float32 NumPy
    arrays for ``create_model(name, num_classes=1000)``.

  Raises:
    ConversionError: see ``plan_conversion``; also a kept tensor that is not
      floating point, has NaN/Inf values, or a running variance <= 0.
  """
  return _convert(name, state_dict)[0]


def _flat_keys(variables):
  flat = traverse_util.flatten_dict(
      {c: dict(variables[c]) for c in COLLECTIONS if c in variables})
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
  return all(k.split('/', 1)[0] in COLLECTIONS and '/' in k for k in keys)


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
    ConversionError: a leaf missing, extra or mis-shaped for ``name``, not
      floating point, not finite, or a variance not positive.
  """
  state_dicts.check_exists(path)
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as data:
      flat = {k: data[k] for k in data.files}
  else:
    flat = state_dicts.read_safetensors(path)
  template = _template(name)
  errors, variables = [], {}
  for key, value in flat.items():
    path_ = tuple(key.split('/'))
    if path_ not in template:
      errors.append(f'unexpected {key} {value.shape}')
    elif value.shape != template[path_]:
      errors.append(f'mis-shaped {key}: {value.shape}, expected '
                    f'{template[path_]}')
    else:
      variables[path_] = _trusted_float32(key, path_, value, None, errors)
  errors += [f'missing {"/".join(p)} {s}' for p, s in template.items()
             if '/'.join(p) not in flat]
  _raise_if(errors, f'{path} into {name}')
  return traverse_util.unflatten_dict(variables)


def _published(name, cache_dir):
  if name not in TORCHVISION_URLS:
    raise ValueError(f'No published torchvision weights for {name!r}; '
                     f'known: {", ".join(TORCHVISION_URLS)}.')
  cache_dir = cache_dir or default_cache_dir()
  url = TORCHVISION_URLS[name]
  filename = os.path.basename(urllib.parse.urlparse(url).path)
  converted = os.path.join(cache_dir, filename.split('.')[0] + CONVERTED_SUFFIX)
  return url, converted


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
    downloads.DownloadError: offline and nothing cached (the message says where to put
      the file by hand).
    downloads.HashMismatchError: the checkpoint is not the published file.
    state_dicts.CheckpointError, torch_archive.ArchiveError: a damaged or
      unsafe file, or a ``.pth`` holding no state_dict.
    ImportError: a ``.pth`` format only torch reads, without torch installed.
    ConversionError: the checkpoint does not fit the model, or its values
      cannot be trusted (see ``_trusted_float32``).
  """
  if path is not None:
    path = os.fspath(path)
    state_dicts.check_exists(path)
    if path.endswith('.npz'):
      return load_variables(name, path)
    if path.endswith('.safetensors'):
      if _is_converted(state_dicts.read_safetensors(path, keys_only=True)):
        return load_variables(name, path)
    return convert_state_dict(name, state_dicts.read(path))
  url, converted = _published(name, cache_dir)
  if os.path.isfile(converted):
    return load_variables(name, converted)
  checkpoint = downloads.download(url, os.path.dirname(converted), progress=progress)
  # Checked here, not only in download(): a file placed by hand, or a
  # truncated one, must not be converted and cached.
  downloads.check_hash(downloads.sha256_file(checkpoint), checkpoint,
                       checkpoint)
  variables = convert_state_dict(name, state_dicts.read(checkpoint))
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
    plan: ``plan_conversion``'s assignments.
    variables: the converted variables.

  Returns:
    One dict per assignment, in natural key order, with 'torch_key', 'torch_shape', 'flax_path'
    ('' for dropped tensors), 'flax_shape', 'mean', 'std', 'min', 'max'.
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
      checkpoint = downloads.download(url, args.cache_dir or default_cache_dir())
      downloads.check_hash(downloads.sha256_file(checkpoint), checkpoint,
                       checkpoint)
    else:
      checkpoint = os.path.expanduser(args.source)
    variables, plan = _convert(args.model, state_dicts.read(checkpoint))
  except (OSError, ImportError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(_format_report(tensor_stats(plan, variables)))
  flat = traverse_util.flatten_dict(variables)
  counts = {c: sum(v.size for p, v in flat.items() if p[0] == c)
            for c in COLLECTIONS}
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
