"""Variables of a user's own Flax network from a checkpoint it already has.

``load_variables(path, expected)`` reads the teacher's variables of a Flax
Linen image classifier the user brings (not one of ``models.MODEL_NAMES``)
from a checkpoint written by the usual Flax tools, and checks every leaf
against the model's abstract variables. The kind of checkpoint is told by
the path alone:

* a folder: an orbax checkpoint, as ``orbax.checkpoint.StandardCheckpointer``
  or ``PyTreeCheckpointer`` writes it (``save(path, variables)``); restored
  without a target, every array as a NumPy array on the host, so a
  checkpoint written on accelerators (or on another topology) reads on any
  machine;
* ``*.msgpack``: ``flax.serialization.to_bytes(variables)`` (or
  ``msgpack_serialize`` of a state dict), read by
  ``flax.serialization.msgpack_restore``; no code runs from the file;
* ``*.safetensors``: one tensor per leaf, keyed by its flattened path,
  ``params/stage1/Conv_0/kernel`` or ``params.stage1.Conv_0.kernel``: a key
  holding a '/' is split on '/' only (so module names may hold dots), any
  other key on '.'. Its first component names the collection.

The same layouts are accepted in all three:

* the variables themselves, ``{'params': ..., 'batch_stats': ...}``; other
  top-level entries (a training state's ``step`` or ``opt_state``, other
  collections) are ignored;
* the params alone, a tree without a 'params' or 'batch_stats' key at its
  top (``to_bytes(variables['params'])``): accepted when it fits
  ``expected['params']``, so only for a network without BatchNorm (a
  network with it reads as its batch statistics missing);
* the variables one level down, under any key (``{'params': variables}``
  when a training state's ``params`` held all the variables, or
  ``{'model': variables}``): used when they fit and the top level does not.

Leaves must be floating point (bfloat16 and float16 included) and finite;
they are returned as float32. Every problem (a leaf missing, unexpected or
of another shape, an integer or non-finite leaf) is one line of one
``errors.ConfigError``, all listed; a missing path, an unreadable file or an
unknown kind of file is one line naming the path. Nothing is written.
"""

import collections.abc
import glob
import os

from flax import serialization
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors
import safetensors.numpy

from dtq_jax.infra import errors
from dtq_jax.weights import conversion

COLLECTIONS = conversion.COLLECTIONS
_ALLOWED = ('allowed: an orbax checkpoint folder, a .msgpack file '
            '(flax.serialization.to_bytes) or a .safetensors file keyed by '
            'flattened paths (params/Conv_0/kernel).')
# orbax and tensorstore report a damaged folder in many types: all of them
# mean the user's checkpoint cannot be read, not a bug here.
_ORBAX_ERRORS = (ValueError, OSError, RuntimeError, KeyError, TypeError)
# flax.serialization's msgpack reader raises ValueError (msgpack's own
# errors derive from it) or TypeError (a damaged array record).
_MSGPACK_ERRORS = (ValueError, TypeError)


def _error(field, path, reason):
  """The ConfigError every problem raises: ``reason`` after the path."""
  return errors.ConfigError(field, path, reason)


def _first_line(exc):
  text = str(exc).strip()
  return text.splitlines()[0] if text else type(exc).__name__


def flatten(tree):
  """Flattens a nested tree of mappings and lists into tuple paths.

  Args:
    tree: nested mappings (dict, FrozenDict) and lists or tuples (orbax
      restores a list as a list; its items are keyed '0', '1', ... as in
      ``flax.serialization.to_state_dict``), with anything else as leaves.

  Returns:
    ``{(key, ...): leaf}`` with string keys; empty containers leave nothing.
  """
  if isinstance(tree, collections.abc.Mapping):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = enumerate(tree)
  else:
    return {(): tree}
  flat = {}
  for key, value in items:
    for path, leaf in flatten(value).items():
      flat[(str(key),) + path] = leaf
  return flat


def split_key(key):
  """A safetensors key as a path: split on '/' if it holds one, else on '.'.

  Args:
    key: a flattened path, e.g. 'params/Conv_0/kernel' or
      'params.Conv_0.kernel'.

  Returns:
    The path as a tuple of strings.
  """
  return tuple(key.split('/' if '/' in key else '.'))


def _checkpoint_hint(path):
  """'; checkpoints below it: ...' for a folder that holds checkpoints."""
  # A CheckpointManager's folder holds its checkpoints as <step>/<item>/,
  # and pointing at the manager's folder is an easy mistake.
  found = []
  for pattern in ('*/_METADATA', '*/*/_METADATA'):
    found += glob.glob(os.path.join(glob.escape(path), pattern))
  if not found:
    return ''
  shown = ', '.join(os.path.dirname(f) for f in sorted(found)[:3])
  return f'; checkpoints below it: {shown}{", ..." if len(found) > 3 else ""}'


def _read_orbax(path, field):
  """The tree of an orbax checkpoint folder, as NumPy arrays."""
  directory = os.path.abspath(path)
  with ocp.PyTreeCheckpointer() as checkpointer:
    try:
      metadata = checkpointer.metadata(directory)
    except _ORBAX_ERRORS as e:
      raise _error(field, path, 'not a readable orbax checkpoint folder: '
                   f'{_first_line(e)}') from None
    # orbax answers a folder without a checkpoint, or with damaged metadata
    # or data, with no item metadata rather than an error.
    tree = getattr(getattr(metadata, 'item_metadata', None), 'tree', None)
    if tree is None and os.path.isfile(os.path.join(directory, '_METADATA')):
      raise _error(field, path, 'an orbax checkpoint folder whose metadata '
                   'cannot be read (damaged or incomplete?).')
    if tree is None:
      raise _error(field, path, 'not an orbax checkpoint folder (no readable '
                   f'checkpoint metadata){_checkpoint_hint(directory)}; '
                   f'{_ALLOWED}')
    # Without a target orbax would rebuild jax.Arrays on the shardings they
    # were saved with, which another machine may not have.
    restore_args = jax.tree.map(
        lambda m: ocp.RestoreArgs(restore_type=np.ndarray)
        if isinstance(m, ocp.metadata.ArrayMetadata) else ocp.RestoreArgs(),
        tree)
    try:
      return checkpointer.restore(
          directory, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except _ORBAX_ERRORS as e:
      raise _error(field, path, 'the orbax checkpoint cannot be restored '
                   f'(damaged?): {_first_line(e)}') from None


def _read_msgpack(path, field):
  try:
    with open(path, 'rb') as f:
      return serialization.msgpack_restore(f.read())
  except (OSError,) + _MSGPACK_ERRORS as e:
    raise _error(field, path, 'not a readable .msgpack file (damaged or '
                 f'truncated?): {_first_line(e)}') from None


def _read_safetensors(path, field):
  try:
    tensors = safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, OSError) as e:
    # The Rust error is not an OSError/ValueError; without this, a truncated
    # file would be a traceback instead of a line naming it.
    raise _error(field, path, 'not a readable .safetensors file (damaged or '
                 f'truncated?): {_first_line(e)}') from None
  return {split_key(k): v for k, v in tensors.items()}


def _read_flat(path, field):
  """``{path tuple: leaf}`` of the checkpoint at ``path``, by its kind."""
  if not os.path.exists(path):
    raise _error(field, path, f'no such file or folder; {_ALLOWED}')
  suffix = os.path.splitext(path)[1].lower()
  if os.path.isdir(path):
    tree = _read_orbax(path, field)
  elif suffix == '.msgpack':
    tree = _read_msgpack(path, field)
  elif suffix == '.safetensors':
    return _read_safetensors(path, field)
  else:
    # flax.training.checkpoints names its msgpack files checkpoint_<step>.
    raise _error(field, path, f'unknown kind of checkpoint {suffix!r} (bytes '
                 'of flax.serialization.to_bytes read when named .msgpack); '
                 f'{_ALLOWED}')
  if not isinstance(tree, collections.abc.Mapping):
    raise _error(field, path, f'the checkpoint holds a {type(tree).__name__}, '
                 'not a dict of variables.')
  return flatten(tree)


def _readings(flat):
  """Where the variables may sit in a checkpoint's tree, most likely first.

  Args:
    flat: the checkpoint's ``{path: leaf}``.

  Returns:
    ``(note for messages, {variables path: leaf})`` pairs: the top level
    (as the variables if it has a 'params' or 'batch_stats' key, else as
    the params alone), then the variables under each top-level key that
    holds them.
  """
  def has_collections(prefix):
    n = len(prefix)
    return any(len(p) > n + 1 and p[:n] == prefix and p[n] in COLLECTIONS
               for p in flat)

  def variables_under(prefix):
    n = len(prefix)
    return {p[n:]: leaf for p, leaf in flat.items()
            if len(p) > n + 1 and p[:n] == prefix and p[n] in COLLECTIONS}

  if has_collections(()):
    readings = [('', variables_under(()))]
  else:
    readings = [(' (read as the params alone: its top level has no '
                 "'params' or 'batch_stats' key)",
                 {('params',) + p: leaf for p, leaf in flat.items()})]
  for key in sorted({p[0] for p in flat if len(p) > 1}):
    if has_collections((key,)):
      readings.append((f' (read as the variables under {key!r})',
                       variables_under((key,))))
  return readings


def _shape_problems(found, shapes):
  """One line per leaf missing, unexpected or of another shape."""
  def name(p):
    return '/'.join(p)
  problems = [f'missing {name(p)}: expected {s}'
              for p, s in sorted(shapes.items()) if p not in found]
  problems += [f'unexpected {name(p)}: found {np.shape(leaf)}'
               for p, leaf in sorted(found.items()) if p not in shapes]
  problems += [f'mis-shaped {name(p)}: expected {shapes[p]}, found '
               f'{np.shape(leaf)}' for p, leaf in sorted(found.items())
               if p in shapes and np.shape(leaf) != shapes[p]]
  return problems


def _float32(key, leaf, problems):
  """``leaf`` as a float32 array, or None after naming its problem."""
  if not isinstance(leaf, (np.ndarray, np.generic, int, float)):
    problems.append(f'{key} is a {type(leaf).__name__}, not an array')
    return None
  array = np.asarray(leaf)
  # jnp knows the ml_dtypes floats (bfloat16, ...) that NumPy does not.
  if not jnp.issubdtype(array.dtype, jnp.floating):
    problems.append(f'{key} is {array.dtype.name}, not floating point')
    return None
  # A copy: the reader's buffers are not aliased. Values beyond float32's
  # range become Inf, named below.
  with np.errstate(over='ignore'):
    array = np.array(array, dtype=np.float32, order='C')
  bad = array.size - np.count_nonzero(np.isfinite(array))
  if bad:
    problems.append(f'{key} has {bad} NaN/Inf value(s)')
  return array


def load_variables(path, expected, field='pretrained'):
  """Reads a user's Flax checkpoint and checks it against the model.

  Args:
    path: an orbax checkpoint folder, a ``.msgpack`` file
      (``flax.serialization.to_bytes``) or a ``.safetensors`` file keyed by
      flattened paths ('/' or '.' separated; see the module docstring for
      the layouts accepted, the params alone among them).
    expected: the model's abstract variables, as
      ``jax.eval_shape(model.init, ...)`` gives them (leaves with a
      ``shape``, e.g. ``jax.ShapeDtypeStruct``); its 'params' and, if it has
      one, 'batch_stats' collection are read, any other is ignored.
    field: the config field named in errors.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` (the collections ``expected``
    has) of float32 NumPy arrays, nested as ``expected``.

  Raises:
    errors.ConfigError: no such path, an unreadable or unknown kind of
      file, a folder that is no orbax checkpoint (one line each); or
      leaves that do not fit ``expected`` (missing, unexpected, of another
      shape), are not floating point or not finite: a summary line naming
      the path, then one line per leaf, all listed.
  """
  path = os.path.expanduser(os.fspath(path))
  shapes = {p: tuple(leaf.shape) for p, leaf in traverse_util.flatten_dict(
      {c: expected[c] for c in COLLECTIONS if c in expected}).items()}
  readings = [(note, found, _shape_problems(found, shapes))
              for note, found in _readings(_read_flat(path, field))]
  # The first reading that fits; failing that, the one closest to fitting
  # (the top level on a tie), whose problems are the ones worth listing.
  note, found, problems = min(readings, key=lambda r: len(r[2]))
  variables = {p: _float32('/'.join(p), leaf, problems)
               for p, leaf in found.items() if p in shapes}
  if problems:
    raise _error(field, path, '\n'.join(
        [f'{len(problems)} problem(s) with its variables for this model'
         f'{note}:'] + [f'  {p}' for p in problems]))
  return traverse_util.unflatten_dict(variables)


def output_width(path, layer, field='pretrained'):
  """Outputs of the Dense or Conv layer at ``layer`` in a checkpoint.

  A user's network is built with its source classifier sized to the
  checkpoint's, which is read here before the variables are checked.

  Args:
    path: the checkpoint (as ``load_variables``).
    layer: the layer's module path ('a/b').
    field: the config field named in errors.

  Returns:
    The last dimension of the layer's ``kernel``.

  Raises:
    errors.ConfigError: the checkpoint cannot be read or has no such kernel.
  """
  path = os.path.expanduser(os.fspath(path))
  key = ('params',) + tuple(layer.split('/')) + ('kernel',)
  for _, found in _readings(_read_flat(path, field)):
    if key in found and np.ndim(found[key]) >= 1:
      return int(np.shape(found[key])[-1])
  raise _error(field, path, f'it has no kernel of the source classifier '
               f'{layer!r} (looked for {"/".join(key)}).')
