"""Fixtures shared by the end-to-end tests: tiny image folders and configs."""

import os

import numpy as np
import pytest

# TensorFlow and Triton (which torchvision pulls in through torch._dynamo)
# both carry LLVM, and importing Triton after TensorFlow crashes the process
# with a segmentation fault. Where the optional torch extra is installed
# (requirements-torch.txt), import torchvision first so that the parity tests
# of test_pretrained.py run.
try:
  import torchvision  # pylint: disable=g-import-not-at-top,unused-import
except ImportError:
  pass
import tensorflow as tf  # pylint: disable=g-import-not-at-top

from configs import mit67
from dtq_jax.data import sources

_CHECK_REACHABLE = sources._check_reachable  # pylint: disable=protected-access


# The shared compilation cache's limit: far above what the suite writes; any
# limit at all makes JAX lock the folder (see _session_caches).
_CACHE_MAX_BYTES = 8 << 30


@pytest.fixture(autouse=True, scope='session')
def _session_caches(tmp_path_factory):
  """One cache root and one persistent XLA cache for the session's processes.

  Runs whose config names no ``cache_dir`` keep decoded images and trained
  teachers under ``$XDG_CACHE_HOME/dtq_jax``: pointed into the session's
  temporary folder, tests neither write to the user's home nor find an
  earlier session's teachers there. Many tests compile the same tiny
  programs again (a run, then its resume; the same step in another file's
  worker or in a main.py subprocess); each ``jax.jit`` of a new closure, and
  each new process, would compile them anew. Under pytest-xdist the workers
  share folders beside their own temporary folders, and the environment
  carries them to subprocesses (main.py's ``caches.enable_compilation_cache``
  honours ``JAX_COMPILATION_CACHE_DIR``). A maximum size turns on JAX's file
  lock around each cache entry's read and write, so no process reads an
  entry that another is still writing.
  """
  import jax  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent
  xla = base / 'xla_cache'
  xla.mkdir(exist_ok=True)
  settings = {'jax_compilation_cache_dir': str(xla),
              'jax_compilation_cache_max_size': _CACHE_MAX_BYTES,
              'jax_persistent_cache_min_compile_time_secs': 0.5}
  previous = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('XDG_CACHE_HOME', str(base / 'xdg_cache'))
    patch.setenv('JAX_COMPILATION_CACHE_DIR', str(xla))
    patch.setenv('JAX_COMPILATION_CACHE_MAX_SIZE', str(_CACHE_MAX_BYTES))
    yield
  for name, value in previous.items():
    jax.config.update(name, value)


@pytest.fixture(autouse=True)
def _no_download_host_probe(monkeypatch):
  """Tests run offline, and tfds.testing.mock_data fakes only the download.

  ``sources`` probes the download hosts before TFDS downloads, which would
  fail every mock_data test here.
  """
  monkeypatch.setattr(sources, '_check_reachable', lambda urls: None)


@pytest.fixture(name='check_reachable')
def check_reachable_fixture():
  """The real download-host probe, for the test of it."""
  return _CHECK_REACHABLE


def write_class_images(root, per_class, size, num_classes=3, seed=0):
  """Writes ``root/class<c>/<i>.png``: random RGB images with a class signal.

  Channel ``c`` of every odd image of class ``c`` is saturated (even ones:
  zero), so a network can learn something in a few steps.

  Args:
    root: folder (created).
    per_class: images per class.
    size: image height and width.
    num_classes: classes.
    seed: NumPy seed of the pixels.
  """
  rng = np.random.RandomState(seed)
  for c in range(num_classes):
    os.makedirs(os.path.join(root, f'class{c}'))
    for i in range(per_class):
      pixels = rng.randint(0, 255, (size, size, 3)).astype(np.uint8)
      pixels[..., c] = 255 * (i % 2)
      tf.io.write_file(os.path.join(str(root), f'class{c}', f'{i}.png'),
                       tf.io.encode_png(pixels))


@pytest.fixture(name='class_images', scope='session')
def class_images_fixture():
  """``write_class_images``, for tests that build their own folders."""
  return write_class_images


def tiny_folder_config(root, variant='quick,ft'):
  """mit67's ':quick' config shrunk to the tiny demo ResNet on 16 px images.

  Args:
    root: an image folder of ``write_class_images(root, 8, 20)``.
    variant: mit67 config variant tokens.

  Returns:
    An unvalidated ConfigDict (5 training and 3 test images per class, one
    epoch, every test image evaluated).
  """
  c = mit67.get_config(variant)
  c.model = 'small_resnet'
  c.dtq.temperature = 60.0  # the paper's ResNet-50 value
  c.model_kwargs = dict(widths=(4, 8, 8, 8))
  c.pretrained = 'none'
  c.dataset.root = str(root)
  c.dataset.train_per_class = 5
  c.dataset.test_per_class = 3
  c.dataset.image_size = 16
  c.dataset.resize_to = 18
  c.num_epochs = 1
  c.max_eval_batches = 0
  return c


@pytest.fixture(name='tiny_folder', scope='session')
def tiny_folder_fixture(tmp_path_factory):
  """3 classes x 8 random 20x20 images, and ``tiny_folder_config`` for it."""
  root = tmp_path_factory.mktemp('tiny_folder')
  write_class_images(root, 8, 20)
  return root, tiny_folder_config
