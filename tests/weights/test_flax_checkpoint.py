"""dtq_jax.weights.flax_checkpoint: a user's Flax checkpoint, leaves checked."""

import hashlib
import os
import pathlib
import re

from flax import linen as nn
from flax import serialization
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

from dtq_jax.infra import errors
from dtq_jax.weights import flax_checkpoint

FORMATS = ('orbax_standard', 'orbax_pytree', 'msgpack', 'safetensors_slash',
           'safetensors_dot')


class TinyCNN(nn.Module):
  """Two layers, a convolution and a classifier, as a user might write."""
  num_classes: int = 3
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3))(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x).mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


def _expected(batch_norm=True):
  model = TinyCNN(batch_norm=batch_norm)
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, 8, 8, 1), jnp.float32))


def _variables(expected, seed=0):
  """Distinct random values for every leaf: a round trip cannot fake them."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: rng.standard_normal(s.shape).astype(np.float32), expected)


def _write(fmt, tree, tmp_path, name='ckpt'):
  """Writes ``tree`` as ``fmt`` with a user's tools; returns its path."""
  if fmt.startswith('orbax'):
    path = str(tmp_path / name)
    if fmt == 'orbax_standard':
      with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, tree)
    else:
      with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(path, tree)
    return path
  if fmt == 'msgpack':
    path = tmp_path / f'{name}.msgpack'
    path.write_bytes(serialization.to_bytes(tree))
    return str(path)
  path = str(tmp_path / f'{name}.safetensors')
  separator = '/' if fmt == 'safetensors_slash' else '.'
  safetensors.numpy.save_file(
      {separator.join(k): np.asarray(v)
       for k, v in traverse_util.flatten_dict(tree).items()}, path)
  return path


def _digest(path):
  """SHA-256 of a file, or of every file's name and bytes below a folder."""
  digest = hashlib.sha256()
  files = ([path] if os.path.isfile(path) else sorted(
      os.path.join(d, f) for d, _, names in os.walk(path) for f in names))
  for f in files:
    digest.update(os.path.relpath(f, path).encode())
    with open(f, 'rb') as stream:
      digest.update(stream.read())
  return digest.hexdigest()


def _assert_same(read, variables):
  flat_read = traverse_util.flatten_dict(read)
  flat = traverse_util.flatten_dict(variables)
  assert sorted(flat_read) == sorted(flat)
  for key, value in flat.items():
    assert isinstance(flat_read[key], np.ndarray)
    assert flat_read[key].dtype == np.float32
    np.testing.assert_array_equal(flat_read[key], value)


def _error(path, expected):
  with pytest.raises(errors.ConfigError) as info:
    flax_checkpoint.load_variables(path, expected)
  assert info.value.field == 'pretrained'
  return str(info.value)


@pytest.mark.parametrize('batch_norm', [True, False])
@pytest.mark.parametrize('fmt', FORMATS)
def test_every_leaf_round_trips_and_the_file_is_left_alone(
    fmt, batch_norm, tmp_path):
  expected = _expected(batch_norm)
  assert ('batch_stats' in expected) == batch_norm
  variables = _variables(expected)
  path = _write(fmt, variables, tmp_path)
  before = _digest(path)
  read = flax_checkpoint.load_variables(path, expected)
  assert set(read) == set(expected)
  _assert_same(read, variables)
  assert _digest(path) == before


@pytest.mark.parametrize('fmt', ['orbax_standard', 'msgpack',
                                 'safetensors_slash'])
def test_the_params_alone_are_read_when_the_model_has_no_batch_norm(
    fmt, tmp_path):
  expected = _expected(batch_norm=False)
  variables = _variables(expected)
  path = _write(fmt, variables['params'], tmp_path)
  _assert_same(flax_checkpoint.load_variables(path, expected), variables)
  # A network with BatchNorm needs its statistics: each is named missing.
  message = _error(path, _expected(batch_norm=True))
  assert "read as the params alone" in message.splitlines()[0]
  assert 'missing batch_stats/BatchNorm_0/mean: expected (4,)' in message
  assert 'missing batch_stats/BatchNorm_0/var: expected (4,)' in message


@pytest.mark.parametrize('fmt', ['orbax_standard', 'msgpack'])
def test_a_training_state_and_wrapped_variables_are_read(fmt, tmp_path):
  expected = _expected()
  variables = _variables(expected)
  # A training state: step and optimizer state beside the collections.
  state = dict(variables, step=np.int64(7),
               opt_state={'mu': variables['params']})
  _assert_same(flax_checkpoint.load_variables(
      _write(fmt, state, tmp_path, 'state'), expected), variables)
  # A training state whose params held all the variables.
  wrapped = {'step': np.int64(7), 'params': variables}
  _assert_same(flax_checkpoint.load_variables(
      _write(fmt, wrapped, tmp_path, 'wrapped'), expected), variables)


def test_other_collections_of_the_model_are_ignored(tmp_path):
  expected = dict(_expected(), intermediates={
      'x': jax.ShapeDtypeStruct((2,), jnp.float32)})
  variables = _variables(_expected())
  read = flax_checkpoint.load_variables(
      _write('msgpack', variables, tmp_path), expected)
  assert set(read) == {'params', 'batch_stats'}


@pytest.mark.parametrize('fmt', ['orbax_standard', 'msgpack',
                                 'safetensors_slash'])
def test_half_precision_leaves_are_cast_to_float32(fmt, tmp_path):
  expected = _expected()
  variables = _variables(expected)
  half = {'params': jax.tree.map(lambda v: v.astype(ml_dtypes.bfloat16),
                                 variables['params']),
          'batch_stats': jax.tree.map(lambda v: v.astype(np.float16),
                                      variables['batch_stats'])}
  read = flax_checkpoint.load_variables(_write(fmt, half, tmp_path), expected)
  _assert_same(read, jax.tree.map(lambda v: v.astype(np.float32), half))


def test_integer_and_non_finite_leaves_are_named(tmp_path):
  expected = _expected()
  variables = _variables(expected)
  variables['params']['Dense_0']['bias'] = np.arange(3, dtype=np.int32)
  variables['batch_stats']['BatchNorm_0']['var'][1] = np.nan
  message = _error(_write('msgpack', variables, tmp_path), expected)
  assert 'params/Dense_0/bias is int32, not floating point' in message
  assert 'batch_stats/BatchNorm_0/var has 1 NaN/Inf value(s)' in message


@pytest.mark.parametrize('fmt', ['orbax_standard', 'msgpack',
                                 'safetensors_slash'])
def test_missing_extra_and_misshaped_leaves_are_all_listed(fmt, tmp_path):
  expected = _expected()
  variables = _variables(expected)
  del variables['params']['Conv_0']['bias']
  variables['params']['Extra_0'] = {'kernel': np.zeros(2, np.float32)}
  variables['params']['Dense_0']['kernel'] = np.zeros((4, 5), np.float32)
  path = _write(fmt, variables, tmp_path)
  lines = _error(path, expected).splitlines()
  assert lines[0].startswith(f'config.pretrained={path!r} is invalid; '
                             '3 problem(s)')
  assert lines[1:] == [
      '  missing params/Conv_0/bias: expected (4,)',
      '  unexpected params/Extra_0/kernel: found (2,)',
      '  mis-shaped params/Dense_0/kernel: expected (4, 3), found (4, 5)']


def test_batch_stats_for_a_model_without_batch_norm_are_unexpected(tmp_path):
  variables = _variables(_expected(batch_norm=True))
  message = _error(_write('msgpack', variables, tmp_path),
                   _expected(batch_norm=False))
  assert 'unexpected batch_stats/BatchNorm_0/mean: found (4,)' in message
  assert 'unexpected params/BatchNorm_0/scale: found (4,)' in message


def test_a_missing_path_and_an_unknown_suffix_are_one_line(tmp_path):
  expected = _expected()
  missing = str(tmp_path / 'absent.msgpack')
  message = _error(missing, expected)
  assert '\n' not in message
  assert re.search(r"pretrained='.*absent\.msgpack' is invalid; no such file",
                   message)
  other = tmp_path / 'weights.pth'
  other.write_bytes(b'x')
  message = _error(str(other), expected)
  assert '\n' not in message
  assert "weights.pth' is invalid; unknown kind of checkpoint '.pth'" in message


def test_damaged_files_are_one_line(tmp_path):
  expected = _expected()
  variables = _variables(expected)
  good = pathlib.Path(_write('msgpack', variables, tmp_path)).read_bytes()
  for name, data in [('truncated.msgpack', good[:100]),
                     ('garbage.msgpack', b'garbage')]:
    (tmp_path / name).write_bytes(data)
    message = _error(str(tmp_path / name), expected)
    assert '\n' not in message
    assert f"{name}' is invalid; not a readable .msgpack file" in message
  (tmp_path / 'number.msgpack').write_bytes(serialization.to_bytes(3))
  assert 'holds a int, not a dict' in _error(
      str(tmp_path / 'number.msgpack'), expected)
  good = _write('safetensors_slash', variables, tmp_path)
  (tmp_path / 'truncated.safetensors').write_bytes(
      pathlib.Path(good).read_bytes()[:-10])
  message = _error(str(tmp_path / 'truncated.safetensors'), expected)
  assert '\n' not in message
  assert "truncated.safetensors' is invalid; not a readable .safetensors" in (
      message)


def test_a_folder_that_is_no_checkpoint_is_one_line(tmp_path):
  expected = _expected()
  folder = tmp_path / 'notes'
  folder.mkdir()
  (folder / 'readme.txt').write_text('not a checkpoint')
  message = _error(str(folder), expected)
  assert '\n' not in message
  assert "notes' is invalid; not an orbax checkpoint folder" in message
  # A CheckpointManager's folder: the checkpoints below it are named.
  manager = tmp_path / 'manager'
  _write('orbax_standard', _variables(expected), manager / '100', 'default')
  message = _error(str(manager), expected)
  assert '\n' not in message
  assert f'checkpoints below it: {manager / "100" / "default"}' in message


def test_a_damaged_orbax_folder_is_one_line(tmp_path):
  expected = _expected()
  path = _write('orbax_standard', _variables(expected), tmp_path)
  # Damaged metadata. (Damaged data reads the same, but orbax's threads then
  # print their own errors as the process exits.)
  with open(os.path.join(path, '_METADATA'), 'w') as f:
    f.write('{not json')
  message = _error(path, expected)
  assert '\n' not in message
  assert "ckpt' is invalid; an orbax checkpoint folder whose metadata" in (
      message)
