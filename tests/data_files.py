"""Small images, folders, idx files, mock TFDS data and damaged checkpoints.

Shared by the data tests (test_sources, test_splits, test_input_pipeline) and
the checkpoint readers' tests; everything is written by the tests
themselves, offline.
"""

import gzip
import os
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf

from dtq_jax.data import sources

PER_CLASS = 8  # readable images per class in ``write_folder``'s folder


def assert_one_line(excinfo, *fragments):
  """The exception's message is one line and contains every fragment."""
  message = str(excinfo.value)
  assert '\n' not in message
  for fragment in fragments:
    assert str(fragment) in message


def rgb(rng, height, width):
  return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def jpeg(image):
  return tf.io.encode_jpeg(image).numpy()


def png(image):
  return tf.io.encode_png(image).numpy()


def make_class(folder, count, rng, first=0):
  """Writes ``count`` random PNG/JPEG images of varied sizes."""
  for i in range(first, first + count):
    image = rgb(rng, int(rng.integers(20, 50)), int(rng.integers(20, 50)))
    if i % 2:
      write(os.path.join(folder, f'img{i:03d}.png'), png(image))
    else:
      # Upper-case extension: matching is case-insensitive.
      write(os.path.join(folder, f'img{i:03d}.JPG'), jpeg(image))


def write_folder(root):
  """root/{ant,bee,cat}: PER_CLASS readable images each, plus junk to skip."""
  rng = np.random.default_rng(0)
  for name in ('ant', 'bee', 'cat'):
    make_class(os.path.join(root, name), PER_CLASS, rng)
  # A grayscale and an RGBA image replace one of bee's and one of cat's.
  os.remove(os.path.join(root, 'bee', 'img000.JPG'))
  write(os.path.join(root, 'bee', 'gray.png'),
        png(rng.integers(0, 256, (30, 24, 1), dtype=np.uint8)))
  os.remove(os.path.join(root, 'cat', 'img001.png'))
  write(os.path.join(root, 'cat', 'rgba.png'),
        png(rng.integers(0, 256, (26, 30, 4), dtype=np.uint8)))
  os.remove(os.path.join(root, 'cat', 'img002.JPG'))
  write(os.path.join(root, 'cat', 'gray.jpg'),
        jpeg(rng.integers(0, 256, (28, 33, 1), dtype=np.uint8)))
  # Unreadable: random bytes and a truncated JPEG, both in ant.
  write(os.path.join(root, 'ant', 'corrupt.jpg'), rng.bytes(500))
  write(os.path.join(root, 'ant', 'truncated.jpeg'),
        jpeg(rgb(rng, 40, 40))[:300])
  # Ignored: other extensions, hidden files, nested folders.
  write(os.path.join(root, 'ant', 'notes.txt'), b'not an image')
  write(os.path.join(root, 'ant', '.hidden.png'), png(rgb(rng, 8, 8)))
  make_class(os.path.join(root, 'cat', 'nested'), 2, rng)
  return root


def index_split(num, size=8, channels=1, num_classes=3):
  """Constant images whose pixel value is the example's index."""
  images = np.broadcast_to(
      np.arange(num, dtype=np.uint8)[:, None, None, None],
      (num, size, size, channels)).copy()
  return sources.Split(images, np.arange(num) % num_classes,
                       [f'c{i}' for i in range(num_classes)])


def fake_tfds(requested, num=12, corrupt_index=None):
  """An ``as_dataset_fn`` for tfds.testing.mock_data that records splits."""

  def as_dataset(self, split, **unused_kwargs):
    requested.append((self.name, split))
    rng = np.random.default_rng(len(requested))
    images = [png(rgb(rng, 30 + i, 20 + i)) if i % 2 else jpeg(
        rgb(rng, 20 + i, 30)) for i in range(num)]
    if corrupt_index is not None:
      images[corrupt_index] = b'broken'
    return tf.data.Dataset.from_tensor_slices({
        'image': tf.constant(images, tf.string),
        'label': tf.constant(np.arange(num) % 3, tf.int64)})

  return as_dataset


def idx_bytes(array, magic):
  header = struct.pack('>I', magic) + struct.pack(f'>{array.ndim}I',
                                                  *array.shape)
  return header + array.astype(np.uint8).tobytes()


def write_fashion(folder, per_class=(6, 3), seed=0):
  """Writes the four idx .gz files; pixel [0, 0] of image i holds i % 256."""
  rng = np.random.default_rng(seed)
  names = {'train': ('train-images-idx3-ubyte.gz',
                     'train-labels-idx1-ubyte.gz'),
           'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')}
  arrays = {}
  os.makedirs(folder, exist_ok=True)
  for (part, (images_name, labels_name)), count in zip(names.items(),
                                                       per_class):
    labels = rng.permutation(np.repeat(np.arange(10), count))
    images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(len(labels)) % 256
    with gzip.open(os.path.join(folder, images_name), 'wb') as f:
      f.write(idx_bytes(images, 0x803))
    with gzip.open(os.path.join(folder, labels_name), 'wb') as f:
      f.write(idx_bytes(labels, 0x801))
    arrays[part] = (images, labels)
  return arrays


def change_checkpoint_value(step_dir):
  """Adds 1 to one value of a checkpoint step's state, keeping its meta.

  The step still decodes: only the checksum saved in its meta shows it.
  (Flipping bytes of the array files does not: they are zstd-compressed, and
  whether the result still decodes depends on the bytes hit.)

  Args:
    step_dir: a checkpoint step folder (``<step>/state`` and ``<step>/meta``).
  """
  state_dir = os.path.join(step_dir, 'state')
  checkpointer = ocp.StandardCheckpointer()
  leaves, treedef = jax.tree.flatten(checkpointer.restore(state_dir))
  floats = [i for i, leaf in enumerate(leaves)
            if jnp.issubdtype(leaf.dtype, jnp.floating)]
  largest = max(floats, key=lambda i: leaves[i].size)
  changed = np.array(leaves[largest])
  changed.flat[0] += 1
  leaves[largest] = changed
  shutil.rmtree(state_dir)
  checkpointer.save(state_dir, jax.tree.unflatten(treedef, leaves))
  checkpointer.wait_until_finished()
