"""Tests of dtq_jax.weights.pretrained: torchvision checkpoints as Flax variables.

Files, the published checkpoints' download and cache, the command line, and
parity with torchvision. The always-run tests build torchvision-layout
state_dicts with random values from test_conversion's hand-written generator
of torchvision's names and shapes (not from the converter's table), so a wrong
rule in the converter cannot hide itself.

Reading ``.pth`` files needs no torch (dtq_jax.weights.torch_archive); the always-run
tests write them with test_torch_archive's torch-free writer.

The parity tests against torch and torchvision themselves (the networks'
outputs, and torch.load's arrays against the torch-free reader's) need torch
and torchvision, which are optional (a ~5.4 GB CUDA build; it also runs on
CPU). They are skipped without them. `make test-torch` installs them into
.venv-torch and runs this file there (`ARGS='-k parity'` runs only the
comparisons).
"""

import hashlib
import http.server
import os
import socket
import sys
import tarfile
import threading
import urllib.request

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from configs import mit67
from dtq_jax.infra import errors
from dtq_jax.method import networks
from dtq_jax import models
from dtq_jax.run import teacher as teacher_lib
from dtq_jax.weights import conversion
from dtq_jax.weights import downloads
from dtq_jax.weights import pretrained
from dtq_jax.weights import state_dicts
from dtq_jax.weights import torch_archive
import test_conversion  # the hand-written torchvision state_dicts
import test_torch_archive

# --- Conversion -------------------------------------------------------------


# ResNet-50 (bottleneck blocks) converts, tensor by tensor, in
# test_published_resnet50_without_torch: not built a second time here.
@pytest.mark.parametrize('name', ['resnet18', 'mobilenet_v2'])
def test_converts_every_tensor_from_safetensors(name, tmp_path):
  entries = test_conversion.torchvision_entries(name)
  state = test_conversion.random_state_dict(entries)
  path = tmp_path / f'{name}.safetensors'
  safetensors.numpy.save_file(state, str(path))

  variables = pretrained.load_torchvision(name, path)

  flat = test_conversion.flat_paths(variables)
  expected = {p: key for key, _, p in entries if p is not None}
  # Every torch tensor has exactly one home and every Flax leaf is filled.
  assert len(expected) == len(entries) - sum(p is None for _, _, p in entries)
  assert set(flat) == set(expected)
  test_conversion.assert_converted(variables, name, entries, state)
  # Batch statistics are in batch_stats, and only there.
  assert set(variables) == {'params', 'batch_stats'}
  assert not any(p[-1] in ('mean', 'var') for p in flat if p[0] == 'params')
  assert all(p[-1] in ('mean', 'var') for p in flat if p[0] == 'batch_stats')


def test_layouts_element_by_element(tmp_path):
  """Spot-checks the transposes on asymmetric indices."""
  state = test_conversion.state_dict('mobilenet_v2', seed=1)
  path = tmp_path / 'm.safetensors'
  safetensors.numpy.save_file(state, str(path))
  v = pretrained.load_torchvision('mobilenet_v2', path)
  # Depthwise: torch (96, 1, 3, 3) -> Flax (3, 3, 1, 96).
  dw_torch = state['features.2.conv.1.0.weight']
  dw_flax = v['params']['features_2']['conv_1_0']['kernel']
  assert dw_torch.shape == (96, 1, 3, 3) and dw_flax.shape == (3, 3, 1, 96)
  assert dw_flax[0, 2, 0, 17] == dw_torch[17, 0, 0, 2]
  # Dense conv: [o, i, h, w] -> [h, w, i, o].
  conv_torch = state['features.0.0.weight']  # (32, 3, 3, 3)
  conv_flax = v['params']['features_0_0']['kernel']
  assert conv_flax[2, 0, 1, 30] == conv_torch[30, 1, 2, 0]
  # Linear: [out, in] -> [in, out].
  fc_torch = state['classifier.1.weight']
  fc_flax = v['params']['classifier_1']['kernel']
  assert fc_flax.shape == (1280, 1000) and fc_flax[7, 999] == fc_torch[999, 7]
  np.testing.assert_array_equal(
      v['batch_stats']['features_18_1']['var'],
      state['features.18.1.running_var'])


# --- Converted files and the `pretrained` config value ----------------------


@pytest.mark.parametrize('suffix', ['.flax.safetensors', '.flax.npz'])
def test_converted_round_trip(suffix, tmp_path):
  state = test_conversion.state_dict('small_resnet')
  variables = conversion.convert_state_dict('small_resnet', state)
  path = str(tmp_path / ('out' + suffix))
  pretrained.save_variables(variables, path, 'small_resnet')
  assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temp left
  loaded = pretrained.load_pretrained('small_resnet', path)
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  # A converted file is still checked against the model.
  with pytest.raises(conversion.ConversionError,
                     match='mis-shaped params/conv1/kernel'):
    pretrained.load_variables('resnet18', path)
  del variables['params']['fc']['bias']
  pretrained.save_variables(variables, path, 'small_resnet')
  with pytest.raises(conversion.ConversionError,
                     match=r'^1 problem.*\n  missing params/fc/bias'):
    pretrained.load_variables('small_resnet', path)


def test_load_pretrained_dispatch(tmp_path, monkeypatch):
  for spec in (None, '', 'none', 'None'):
    assert pretrained.load_pretrained('resnet18', spec) is None
  missing = str(tmp_path / 'nope.safetensors')
  with pytest.raises(FileNotFoundError) as e:
    pretrained.load_pretrained('resnet18', missing)
  assert missing in str(e.value) and '\n' not in str(e.value)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert pretrained.default_cache_dir() == str(
      tmp_path / 'xdg' / 'dtq_jax' / 'pretrained')


def test_pth_without_torch_is_one_line(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)  # import torch fails
  path = tmp_path / 'r.pth'
  path.write_bytes(b'not read')
  with pytest.raises(torch_archive.ArchiveError,
                     match='neither a zip archive') as e:
    pretrained.load_torchvision('resnet18', path)
  assert '\n' not in str(e.value)
  # A format the reader does not know (torch < 0.4's tar): how to re-save it.
  with tarfile.open(path, 'w') as archive:
    archive.addfile(tarfile.TarInfo('pickle'))
  with pytest.raises(torch_archive.UnsupportedFormatError,
                     match=r'r\.pth: the tar format .*save its state_dict '
                     r'again') as e:
    pretrained.load_torchvision('resnet18', path)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('legacy', [False, True])
def test_pth_without_torch(legacy, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'torch', None)
  state = test_conversion.state_dict('small_resnet')
  path = tmp_path / 'small.pth'
  test_torch_archive.save_state_dict(state, path, legacy=legacy)
  variables = pretrained.load_pretrained('small_resnet', str(path))
  jax.tree.map(np.testing.assert_array_equal, variables,
               conversion.convert_state_dict('small_resnet', state))


def _no_network(*args, **kwargs):
  raise AssertionError(f'tried to download {args} {kwargs}')


def test_published_resnet50_without_torch(tmp_path, monkeypatch):
  """The default path (config.pretrained='torchvision') with no torch at all.

  A torchvision-layout ResNet-50 .pth (torchvision's names and shapes, random
  values) is written without torch and placed in the cache as the published
  file. Its name must carry its own SHA-256 prefix (the hash check still
  runs), so the URL is patched to the published one with this file's hash in
  place of '0676ba61'; nothing may be downloaded.
  """
  monkeypatch.setitem(sys.modules, 'torch', None)
  monkeypatch.setattr(urllib.request, 'urlopen', _no_network)
  entries = test_conversion.torchvision_entries('resnet50')
  state = test_conversion.random_state_dict(entries)
  cache = tmp_path / 'cache'
  cache.mkdir()
  staging = cache / 'staging.pth'
  test_torch_archive.save_state_dict(state, staging)
  digest = hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
  url = pretrained.TORCHVISION_URLS['resnet50'].replace('0676ba61', digest)
  assert url.endswith(f'/resnet50-{digest}.pth')
  monkeypatch.setitem(pretrained.TORCHVISION_URLS, 'resnet50', url)
  os.rename(staging, cache / f'resnet50-{digest}.pth')

  variables = pretrained.load_pretrained('resnet50', 'torchvision',
                                         cache_dir=str(cache))
  test_conversion.assert_converted(variables, 'resnet50', entries, state)
  assert (cache / f'resnet50-{digest}.flax.safetensors').is_file()


# --- Values that cannot be trusted ------------------------------------------


def test_state_dict_file_values_are_checked(tmp_path):
  """A torchvision-key file (float64 here) goes through the value checks."""
  state = test_conversion.state_dict('small_resnet')
  state['fc.bias'] = state['fc.bias'].astype(np.float64)
  state['fc.bias'][2] = np.inf
  path = tmp_path / 'bad.safetensors'
  safetensors.numpy.save_file(state, str(path))
  with pytest.raises(conversion.ConversionError,
                     match=r'^1 problem.*fc\.bias has 1 NaN/Inf'):
    pretrained.load_torchvision('small_resnet', path)


def test_converted_file_values_are_checked(tmp_path):
  variables = conversion.convert_state_dict(
      'small_resnet', test_conversion.state_dict('small_resnet'))
  variables['batch_stats']['bn1']['var'][3] = 0
  variables['params']['fc']['kernel'][0, 0] = np.nan
  path = str(tmp_path / 'v.flax.safetensors')
  pretrained.save_variables(variables, path, 'small_resnet')
  with pytest.raises(conversion.ConversionError, match=(
      r'^2 problem.*batch_stats/bn1/var \(a running variance\) has 1 value'
      r'.*params/fc/kernel has 1 NaN')):
    pretrained.load_torchvision('small_resnet', path)


# --- Damaged files and wrong data, as one line ------------------------------


@pytest.mark.parametrize('converted', [False, True])
def test_truncated_safetensors_is_one_line(converted, tmp_path, capsys):
  state = test_conversion.state_dict('small_resnet')
  path = str(tmp_path / 'cut.safetensors')
  if converted:
    pretrained.save_variables(
        conversion.convert_state_dict('small_resnet', state), path)
  else:
    safetensors.numpy.save_file(state, path)
  data = open(path, 'rb').read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(state_dicts.CheckpointError) as e:
    pretrained.load_torchvision('small_resnet', path)
  assert '\n' not in str(e.value) and path in str(e.value)
  # Through main.py (teacher.load_teacher) and the command line.
  config = mit67.get_config('quick')
  config.model = 'small_resnet'
  config.pretrained = path
  with pytest.raises(errors.UserError) as e:
    teacher_lib.load_teacher(config, data=None)
  assert '\n' not in str(e.value)
  assert str(e.value).startswith(f'pretrained={path!r}: {path} is not a '
                                 f'readable .safetensors file')
  assert pretrained.main(['--model', 'small_resnet', '--from', path]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f'error: {path} is not a readable')
  assert err.count('\n') == 1


class _GrayData:
  """What load_teacher reads of datasets.Data: 1-channel images."""
  image_shape = (28, 28, 1)


def test_gray_images_with_rgb_weights_is_one_line(tmp_path):
  path = str(tmp_path / 'small.safetensors')
  safetensors.numpy.save_file(
      test_conversion.state_dict('small_resnet'), path)
  config = mit67.get_config('quick')
  config.model = 'small_resnet'
  config.pretrained = path
  config.dataset.name = 'fashion_mnist'
  with pytest.raises(errors.ConfigError) as e:
    teacher_lib.load_teacher(config, _GrayData())
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(f'config.pretrained={path!r} is invalid')
  assert ("3-channel (RGB) images, but dataset.name='fashion_mnist' gives "
          '1-channel ones') in message


# --- Downloads, against local servers only ----------------------------------


def _sha_named(tmp_path, name, data, prefix=None):
  """Writes ``data`` as '<name>-<sha256 prefix>.safetensors'."""
  prefix = prefix or hashlib.sha256(data).hexdigest()[:8]
  path = tmp_path / f'{name}-{prefix}.safetensors'
  path.write_bytes(data)
  return path


@pytest.fixture(name='served')
def _served(tmp_path):
  """A small checkpoint on an HTTP server at 127.0.0.1 (stopped after)."""
  root = tmp_path / 'www'
  root.mkdir()
  state = test_conversion.state_dict('small_resnet')
  staging = tmp_path / 'staging.safetensors'
  safetensors.numpy.save_file(state, str(staging))
  path = _sha_named(root, 'small_resnet', staging.read_bytes())

  class Handler(http.server.SimpleHTTPRequestHandler):

    def __init__(self, *args, **kwargs):
      super().__init__(*args, directory=str(root), **kwargs)

    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  url = f'http://127.0.0.1:{server.server_port}/{path.name}'
  yield url, state, server
  server.shutdown()
  server.server_close()


def test_download_convert_and_cache(served, tmp_path, monkeypatch):
  url, state, server = served
  monkeypatch.setitem(pretrained.TORCHVISION_URLS, 'small_resnet', url)
  cache = tmp_path / 'cache'
  variables = pretrained.load_pretrained('small_resnet', 'torchvision',
                                         cache_dir=str(cache))
  expected = conversion.convert_state_dict('small_resnet', state)
  jax.tree.map(np.testing.assert_array_equal, variables, expected)
  name = os.path.basename(url)
  stem = name.split('.')[0]
  assert sorted(os.listdir(cache)) == sorted(
      [name, stem + '.flax.safetensors'])
  # Offline now: the converted cache is read, nothing is fetched.
  server.shutdown()
  server.server_close()
  os.remove(cache / name)
  again = pretrained.load_torchvision('small_resnet', cache_dir=str(cache))
  jax.tree.map(np.testing.assert_array_equal, again, expected)


def test_download_file_url(tmp_path):
  source = _sha_named(tmp_path, 'blob', b'some bytes')
  cache = tmp_path / 'cache'
  path = downloads.download(source.as_uri(), str(cache), progress=False)
  assert path == str(cache / source.name)
  assert open(path, 'rb').read() == b'some bytes'


def test_download_wrong_hash(tmp_path):
  source = _sha_named(tmp_path, 'blob', b'some bytes', prefix='deadbeef')
  cache = tmp_path / 'cache'
  with pytest.raises(downloads.HashMismatchError, match='deadbeef'):
    downloads.download(source.as_uri(), str(cache), progress=False)
  assert not os.listdir(cache)  # neither the file nor a temporary


def test_placed_by_hand_wrong_hash(tmp_path, monkeypatch):
  url = 'http://127.0.0.1:9/small_resnet-0123abcd.safetensors'
  monkeypatch.setitem(pretrained.TORCHVISION_URLS, 'small_resnet', url)
  cache = tmp_path / 'cache'
  cache.mkdir()
  (cache / 'small_resnet-0123abcd.safetensors').write_bytes(b'truncated')
  with pytest.raises(downloads.HashMismatchError, match='0123abcd'):
    pretrained.load_torchvision('small_resnet', cache_dir=str(cache))


def test_offline_error_is_one_line(tmp_path, monkeypatch):
  with socket.socket() as s:  # a port with nothing listening
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  url = f'http://127.0.0.1:{port}/resnet18-f37072fd.pth'
  monkeypatch.setitem(pretrained.TORCHVISION_URLS, 'resnet18', url)
  cache = tmp_path / 'cache'
  with pytest.raises(downloads.DownloadError) as e:
    pretrained.load_pretrained('resnet18', 'torchvision', cache_dir=str(cache))
  message = str(e.value)
  assert '\n' not in message
  assert url in message
  assert str(cache / 'resnet18-f37072fd.pth') in message
  assert not os.listdir(cache)


# --- Command line -----------------------------------------------------------


def test_command_line(tmp_path, capsys):
  state = test_conversion.state_dict('small_resnet')
  source = tmp_path / 'small.safetensors'
  safetensors.numpy.save_file(state, str(source))
  out = tmp_path / 'converted'
  assert pretrained.main(['--model', 'small_resnet', '--from', str(source),
                          '--to', str(out)]) == 0
  report = capsys.readouterr().out
  assert 'layer2.0.downsample.0.weight' in report
  assert 'params/layer2_0/downsample_0/kernel' in report
  assert '(dropped)' in report
  assert f'{len(state)} tensors consumed' in report
  written = out / 'small.flax.safetensors'
  loaded = pretrained.load_torchvision('small_resnet', written)
  jax.tree.map(np.testing.assert_array_equal, loaded,
               conversion.convert_state_dict('small_resnet', state))
  assert pretrained.main(['--model', 'small_resnet', '--from',
                          str(tmp_path / 'missing.pth')]) == 1
  assert 'missing.pth' in capsys.readouterr().err


# --- With torch: .pth files and parity with torchvision ---------------------


def test_pth_written_by_torch(tmp_path):
  torch = pytest.importorskip('torch')
  state = test_conversion.state_dict('small_resnet')
  path = tmp_path / 'small.pth'
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
  variables = pretrained.load_pretrained('small_resnet', str(path))
  jax.tree.map(np.testing.assert_array_equal, variables,
               conversion.convert_state_dict('small_resnet', state))
  # An arbitrary pickled object is refused, not unpickled.
  evil = tmp_path / 'evil.pth'
  torch.save({'fc.weight': torch.zeros(2), 'x': _Unsafe()}, evil)
  with pytest.raises(torch_archive.ArchiveError,
                     match=r'refused the global test_pretrained\._Unsafe'):
    pretrained.load_torchvision('small_resnet', evil)


class _Unsafe:
  pass


def _assert_same_as_torch_load(torch, path):
  """torch_archive.load(path) has torch.load's keys, dtypes and bits."""
  ours = torch_archive.load(path)
  theirs = torch.load(path, map_location='cpu', weights_only=True)
  assert type(ours) is type(theirs) and list(ours) == list(theirs)
  assert getattr(ours, '_metadata', None) == getattr(theirs, '_metadata',
                                                     None)
  for key, tensor in theirs.items():
    tensor = tensor.detach().contiguous()
    # NumPy has no torch.bfloat16: compare its bits as int16.
    bits = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16
            else tensor).numpy()
    assert ours[key].shape == tuple(tensor.shape), key
    assert str(ours[key].dtype) == str(tensor.dtype).replace('torch.', ''), key
    assert ours[key].tobytes() == bits.tobytes(), key


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
@pytest.mark.parametrize('name', ['resnet18', 'resnet50', 'mobilenet_v2'])
def test_parity_reader_with_torch_load(name, legacy, tmp_path):
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  torch.manual_seed(0)
  net = getattr(torchvision.models, name)(weights=None)
  _randomize_batch_norms(torch, net)
  path = tmp_path / f'{name}.pth'
  torch.save(net.state_dict(), path, _use_new_zipfile_serialization=not legacy)
  _assert_same_as_torch_load(torch, path)


@pytest.mark.parametrize('legacy', [False, True], ids=['zip', 'legacy'])
def test_parity_reader_with_torch_load_on_views(legacy, tmp_path):
  torch = pytest.importorskip('torch')
  generator = torch.Generator().manual_seed(0)
  base = torch.randn(6, 10, generator=generator)
  state = {
      'transposed': base.t(),  # non-contiguous
      'every_third': base[2:4, 1::3],  # offset and strides
      'row1': base[1], 'row3': base[3],  # one storage, two offsets
      'expanded': base[0, :4].expand(3, 4),  # stride 0
      'half': torch.randn(4, 3, generator=generator).half().t(),
      'bfloat16': torch.randn(5, generator=generator).bfloat16(),
      'double': torch.randn(2, 2, generator=generator).double(),
      'long': torch.arange(20)[::3],
      'int': torch.arange(6, dtype=torch.int32).reshape(2, 3),
      'short': torch.arange(4, dtype=torch.int16),
      'char': torch.arange(-2, 2, dtype=torch.int8),
      'byte': torch.arange(4, dtype=torch.uint8),
      'bool': torch.arange(4) % 2 == 0,
      'scalar': torch.tensor(3),
      'empty': torch.zeros(0, 3),
      'parameter': torch.nn.Parameter(torch.randn(3, generator=generator)),
  }
  assert not state['transposed'].is_contiguous()
  assert state['row1'].untyped_storage().data_ptr() == (
      state['row3'].untyped_storage().data_ptr())
  path = tmp_path / 'views.pth'
  torch.save(state, path, _use_new_zipfile_serialization=not legacy)
  _assert_same_as_torch_load(torch, path)


def _randomize_batch_norms(torch, model):
  """Random but signal-preserving BN statistics and affine parameters.

  Arbitrary running statistics are not enough: with torchvision's init each
  depthwise convolution of MobileNetV2 shrinks the signal by about sqrt(2/C),
  and BatchNorm with made-up statistics does not restore it, so the logits end
  up independent of the input and compare nothing. So the statistics are
  first measured on random images (one cumulative-average pass in training
  mode), then perturbed, and the affine parameters are drawn at random.
  """
  generator = torch.Generator().manual_seed(1)
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for m in norms:
    m.reset_running_stats()
    m.momentum = None  # running stats = this one batch's statistics
  model.train()
  with torch.no_grad():
    model(torch.randn(8, 3, 64, 64, generator=generator))
    for m in norms:
      c = m.num_features
      m.running_mean.add_(0.1 * m.running_var.sqrt() *
                          torch.randn(c, generator=generator))
      m.running_var.mul_(0.5 + torch.rand(c, generator=generator))
      m.weight.copy_(0.5 + torch.rand(c, generator=generator))
      m.bias.copy_(0.2 * torch.randn(c, generator=generator))
      m.momentum = 0.1
  model.eval()


def _tapped_modules(model, name):
  if name == 'mobilenet_v2':
    return [model.features[i].conv[-1] for i in (5, 9, 13, 17)]
  last = 'conv2' if name in ('resnet18', 'resnet34') else 'conv3'
  return [getattr(getattr(model, f'layer{i}')[-1], last) for i in range(1, 5)]


def _assert_close(actual, desired, what):
  # 1e-4 relative to the tensor's scale (elementwise rtol alone is
  # meaningless for entries near zero).
  scale = float(np.abs(desired).max())
  np.testing.assert_allclose(actual, desired, rtol=1e-4, atol=1e-4 * scale,
                             err_msg=what)


@pytest.mark.parametrize('name', ['resnet18', 'resnet50', 'mobilenet_v2'])
def test_parity_with_torchvision(name, tmp_path):
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  torch.manual_seed(0)
  net = getattr(torchvision.models, name)(weights=None).eval()
  _randomize_batch_norms(torch, net)
  taps = []
  for module in _tapped_modules(net, name):
    module.register_forward_hook(lambda m, i, o: taps.append(o.numpy()))
  images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    torch_logits = net(images).numpy()
  path = tmp_path / f'{name}.pth'
  torch.save(net.state_dict(), path)

  variables = pretrained.load_torchvision(name, path)
  model = models.create_model(name, num_classes=1000, bits_w=32, bits_a=32)
  logits, features = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1)))

  # The comparison means something only if the logits depend on the image.
  spread = np.abs(torch_logits[0] - torch_logits[1]).max()
  assert spread > 1e-2 * np.abs(torch_logits).max(), 'input-independent'
  _assert_close(np.asarray(logits), torch_logits, f'{name} logits')
  assert len(taps) == len(features['taps']) == 4
  for k, (ours, theirs) in enumerate(zip(features['taps'], taps)):
    ours = np.asarray(ours).transpose(0, 3, 1, 2)  # NHWC -> NCHW
    assert ours.shape == theirs.shape, (k, ours.shape, theirs.shape)
    _assert_close(ours, theirs, f'{name} tap {k}')


def test_pretrained_file_starts_teacher_and_student(tmp_path):
  # config.pretrained = a file: the teacher is the converted network, the
  # student starts from a copy of it, and the source classifier is the
  # converted 1000-way fc (the frozen-fc training rule is in test_train).
  state = test_conversion.state_dict('resnet18')
  path = str(tmp_path / 'resnet18.safetensors')
  safetensors.numpy.save_file(state, path)
  config = mit67.get_config('quick')
  config.model = 'resnet18'
  config.pretrained = path
  config.cache_dir = str(tmp_path / 'cache')
  teacher = teacher_lib.load_teacher(config, data=None)
  expected = pretrained.load_torchvision('resnet18', path)
  chex.assert_trees_all_equal(teacher, expected)
  np.testing.assert_array_equal(teacher['params']['fc']['kernel'],
                                state['fc.weight'].T)

  nets = networks.build_networks(config, num_classes=3,
                              num_source_classes=networks.num_source_classes(
                                  teacher))
  params, batch_stats = networks.init_params(nets, jax.random.PRNGKey(0),
                                          (32, 32, 3), teacher)
  chex.assert_trees_all_equal(params['backbone'], teacher['params'])
  chex.assert_trees_all_equal(batch_stats, teacher['batch_stats'])
  assert set(params) == {'backbone', 'head', 'attention'}

  # A file that does not fit: one line that still names the tensor.
  del state['layer2.1.bn1.running_var']
  safetensors.numpy.save_file(state, path)
  with pytest.raises(errors.UserError) as e:
    teacher_lib.load_teacher(config, data=None)
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(f'pretrained={path!r}: 1 problem(s)')
  assert 'missing layer2.1.bn1.running_var' in message
