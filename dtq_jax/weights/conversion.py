"""torchvision state_dicts as Flax variables: one table of rules, all checked.

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

``pretrained.py`` finds the weights (files, torchvision's published
checkpoints, the cache of converted variables) and hands them to this module.
"""

import dataclasses
import functools
import re
from typing import Optional, Tuple

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dtq_jax import models

COLLECTIONS = ('params', 'batch_stats')
# torchvision's networks take RGB images, so every converted first
# convolution (and every template here) has 3 input channels.
INPUT_CHANNELS = 3
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


def convert_with_plan(name, state_dict):
  """``convert_state_dict``, with the plan it followed (for reports).

  Args:
    name: model name, e.g. 'resnet50' or 'mobilenet_v2'.
    state_dict: ``{torch key: array}`` in torchvision's layout.

  Returns:
    ``(variables, plan)``: see ``convert_state_dict`` and ``plan_conversion``.

  Raises:
    ConversionError: see ``convert_state_dict``.
  """
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
  return convert_with_plan(name, state_dict)[0]


def check_variables(name, flat, what):
  """Checks converted variables, keyed by flattened paths, against a model.

  Args:
    name: model name the variables must fit.
    flat: ``{'params/conv1/kernel': array, ...}`` (``save_variables``'s keys).
    what: what they were read from, for the error message.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of float32 NumPy arrays.

  Raises:
    ConversionError: a leaf missing, extra or mis-shaped for ``name``, not
      floating point, not finite, or a variance not positive.
  """
  template = _template(name)
  errors, variables = [], {}
  for key, value in flat.items():
    path = tuple(key.split('/'))
    if path not in template:
      errors.append(f'unexpected {key} {value.shape}')
    elif value.shape != template[path]:
      errors.append(f'mis-shaped {key}: {value.shape}, expected '
                    f'{template[path]}')
    else:
      variables[path] = _trusted_float32(key, path, value, None, errors)
  errors += [f'missing {"/".join(p)} {s}' for p, s in template.items()
             if '/'.join(p) not in flat]
  _raise_if(errors, f'{what} into {name}')
  return traverse_util.unflatten_dict(variables)
