"""Divides whole Splits: per-class N-shot subsets, validation, transfer tasks.

Per-class subsampling (Caltech 256-30/60, the 10/20/40 ablation, few-shot
targets), the stratified validation hold-out and the Fashion-MNIST
source/target split are index arithmetic on ``Split.labels`` and never touch
pixels. Every draw depends only on (seed, class), so with one seed the
10/20/30/40/60-per-class training sets are nested. The Splits themselves
come from ``sources``.
"""

import os

import numpy as np

from dtq_jax.data import sources

# Tags that keep the random streams of different purposes independent even
# when they share the user's seed (input_pipeline holds 1 and 4: shuffle and
# augmentation).
_CLASS_SPLIT_STREAM = 2
_VALIDATION_STREAM = 3


def _rng(*keys):
  """A numpy Generator keyed by non-negative integers (purpose, seed, ...)."""
  return np.random.default_rng([int(k) % 2**63 for k in keys])


# --------------------------------------------------------------------------
# Per-class sampling.


def _class_permutations(labels, seed, stream):
  """Maps each class present in ``labels`` to its indices, shuffled.

  Each class has its own random stream keyed by (stream, seed, class), so a
  class's draw does not depend on which other classes exist or how big they
  are.
  """
  labels = np.asarray(labels)
  perms = {}
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    perms[int(c)] = idx[_rng(stream, seed, c).permutation(len(idx))]
  return perms


def per_class_subset(labels, per_class, seed):
  """Draws ``per_class`` examples of every class present in ``labels``.

  The draw for a class is the first ``per_class`` entries of a per-class
  permutation that depends only on (seed, class), so with one seed the
  10/20/30/40/60-per-class training sets are nested.

  Args:
    labels: (N,) integer labels.
    per_class: examples to take from each class, >= 1.
    seed: non-negative integer.

  Returns:
    Sorted int64 indices into ``labels``, ``per_class`` per class.

  Raises:
    ValueError: if per_class < 1 or a class has fewer examples.
  """
  if int(per_class) < 1:
    raise ValueError(f'per_class must be >= 1, got {per_class}')
  chosen = []
  for c, perm in _class_permutations(labels, seed, _CLASS_SPLIT_STREAM).items():
    if len(perm) < per_class:
      raise ValueError(f'class {c} has {len(perm)} examples, fewer than '
                       f'per_class={per_class}')
    chosen.append(perm[:per_class])
  if not chosen:
    return np.zeros((0,), np.int64)
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def split_validation(split, fraction, seed):
  """Holds out a stratified validation set from ``split``.

  Every class gives ``max(1, round(fraction * n_class))`` examples to the
  validation set and keeps at least one for training.

  Args:
    split: the Split to divide.
    fraction: in (0, 1).
    seed: non-negative integer.

  Returns:
    (train, val) Splits, each in the original order.

  Raises:
    ValueError: for a fraction outside (0, 1) or a class with fewer than two
      examples.
  """
  if not 0 < fraction < 1:
    raise ValueError(f'fraction must be in (0, 1), got {fraction}')
  train_idx, val_idx = [], []
  perms = _class_permutations(split.labels, seed, _VALIDATION_STREAM)
  for c, perm in perms.items():
    n_val = max(1, int(round(fraction * len(perm))))
    if len(perm) - n_val < 1:
      raise ValueError(f'class {c} ({split.class_names[c]}) has {len(perm)} '
                       f'example(s), too few to hold out a validation example')
    val_idx.append(perm[:n_val])
    train_idx.append(perm[n_val:])
  return (split.subset(np.sort(np.concatenate(train_idx))),
          split.subset(np.sort(np.concatenate(val_idx))))


# --------------------------------------------------------------------------
# Image folders.


def _check_class_sizes(split, root, needed, what):
  counts = np.bincount(split.labels, minlength=split.num_classes)
  for label, name in enumerate(split.class_names):
    if counts[label] < needed:
      raise ValueError(f'class folder {os.path.join(root, name)} has '
                       f'{counts[label]} readable images, fewer than {what} '
                       f'= {needed}')


def image_folder_splits(root, train_per_class=None, test_per_class=None,
                        seed=0, *, validate=True):
  """Train and test Splits from an image folder.

  Two layouts:

  * ``root/<class>/<image>``: each class is split at random (keyed by seed
    and class): train takes the first ``train_per_class`` images of the
    class's permutation, test the *last* ``test_per_class`` (all the
    remaining ones if None), the rest is unused. Taking test from the end
    keeps the test set fixed when only ``train_per_class`` changes
    (Caltech 256-10/20/30/40/60 with one seed share their 20 test images per
    class, and their training sets are nested).
  * ``root/train/<class>/...`` and ``root/test/<class>/...`` (the layout is
    detected by ``root/train`` and ``root/test`` both being folders): the
    official split; ``train_per_class`` / ``test_per_class`` subsample each
    side per class.

  Classes are the subfolder names, sorted; images are files with the
  extensions in ``sources.IMAGE_EXTENSIONS`` (any case) directly inside a
  class folder. Unreadable images are skipped (logged, listed in ``skipped``)
  before any counting or splitting.

  Args:
    root: the folder.
    train_per_class: training images per class; None: all (official layout)
      or all but the test images.
    test_per_class: test images per class; None: all (official layout) or
      all that are not training images.
    seed: non-negative integer for the per-class draws.
    validate: decode every image once to find unreadable ones (set False
      only for data known to be clean; a corrupt file then fails the
      pipeline when it is reached).

  Returns:
    (train, test) Splits of file paths.

  Raises:
    FileNotFoundError: root (or an official-layout class folder) is missing.
    ValueError: no classes, a class without readable images, a class with
      too few images for the requested counts, mismatched train/test classes.
  """
  root = os.fspath(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'image folder {root} does not exist')
  train_dir, test_dir = os.path.join(root, 'train'), os.path.join(root, 'test')
  if os.path.isdir(train_dir) and os.path.isdir(test_dir):
    classes = sources.list_classes(train_dir)
    test_classes = sources.list_classes(test_dir)
    if test_classes != classes:
      diff = sorted(set(classes) ^ set(test_classes))
      raise ValueError(f'{train_dir} and {test_dir} have different classes, '
                       f'e.g. {diff[0]}')
    train = sources.read_folder(train_dir, classes, validate)
    test = sources.read_folder(test_dir, classes, validate)
    if train_per_class is not None:
      _check_class_sizes(train, train_dir, train_per_class, 'train_per_class')
      train = train.subset(per_class_subset(train.labels, train_per_class,
                                            seed))
    if test_per_class is not None:
      _check_class_sizes(test, test_dir, test_per_class, 'test_per_class')
      test = test.subset(per_class_subset(test.labels, test_per_class, seed))
    return train, test

  if train_per_class is None and test_per_class is None:
    raise ValueError(f'image folder {root} has no train/ and test/ '
                     f'subfolders, so train_per_class or test_per_class must '
                     f'be given to split it')
  for name, value in (('train_per_class', train_per_class),
                      ('test_per_class', test_per_class)):
    if value is not None and int(value) < 1:
      raise ValueError(f'{name} must be >= 1, got {value}')
  data = sources.read_folder(root, sources.list_classes(root), validate)
  n_train, n_test = train_per_class or 0, test_per_class or 0
  # Each side needs at least one image when its count is left open.
  needed = max(n_train, 1) + max(n_test, 1)
  what = (f'{"train_per_class" if train_per_class else "1"} + '
          f'{"test_per_class" if test_per_class else "1"}')
  _check_class_sizes(data, root, needed, what)
  train_idx, test_idx = [], []
  for perm in _class_permutations(data.labels, seed,
                                  _CLASS_SPLIT_STREAM).values():
    train_end = n_train if train_per_class else len(perm) - n_test
    test_start = len(perm) - n_test if test_per_class else n_train
    train_idx.append(perm[:train_end])
    test_idx.append(perm[test_start:])
  return (data.subset(np.sort(np.concatenate(train_idx))),
          data.subset(np.sort(np.concatenate(test_idx))))




# --------------------------------------------------------------------------
# TFDS.


def tfds_splits(name, data_dir=None, train_split=None, test_split=None,
                train_per_class=None, seed=0, *, validate=True):
  """Train and test Splits of a TFDS dataset, the training one subsampled.

  Args:
    name: TFDS name, e.g. one of ``tfds_tasks.TFDS_DATASETS``.
    data_dir: see ``sources.read_tfds``.
    train_split: see ``sources.read_tfds``.
    test_split: see ``sources.read_tfds``.
    train_per_class: if given, subsample the training split per class.
    seed: non-negative integer for the subsample.
    validate: decode every image once and drop unreadable ones.

  Returns:
    (train, test) Splits whose images are encoded bytes.

  Raises:
    FileNotFoundError: the dataset is neither prepared nor downloadable.
    ValueError: unknown dataset, empty split, too few images per class.
  """
  train, test = sources.read_tfds(name, data_dir, train_split, test_split,
                                  validate=validate)
  if train_per_class is not None:
    train = train.subset(per_class_subset(train.labels, train_per_class, seed))
  return train, test


# --------------------------------------------------------------------------
# The Fashion-MNIST demo's transfer split.


def _check_classes(field, classes):
  classes = list(classes)
  if not classes:
    raise ValueError(f'{field} must not be empty')
  for c in classes:
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not (
        0 <= c <= 9):
      raise ValueError(f'{field} must hold class indices in 0..9, got {c!r}')
  if len(set(classes)) != len(classes):
    raise ValueError(f'{field} has duplicates: {classes}')
  return [int(c) for c in classes]


def _remap(split, classes):
  """Examples of ``classes`` (in data order), labels renumbered 0..k-1."""
  lookup = np.full(split.num_classes, -1, np.int32)
  lookup[classes] = np.arange(len(classes), dtype=np.int32)
  keep = np.flatnonzero(lookup[split.labels] >= 0)
  return sources.Split(split.images[keep], lookup[split.labels[keep]],
               [split.class_names[c] for c in classes])


def fashion_mnist_transfer_splits(data_dir, source_classes, target_classes,
                                  shots_per_class, seed, *, tfds_data_dir=None):
  """The offline demo's source and few-shot target tasks from Fashion-MNIST.

  Args:
    data_dir: see ``sources.fashion_mnist_arrays``.
    source_classes: Fashion-MNIST class indices (0..9) of the source task;
      label i of the result is source_classes[i].
    target_classes: class indices of the target task, disjoint from the
      source classes; label i is target_classes[i].
    shots_per_class: training images per target class, drawn with ``seed``.
    seed: non-negative integer.
    tfds_data_dir: see ``sources.fashion_mnist_arrays``.

  Returns:
    {'source_train', 'source_test', 'target_train', 'target_test'}: Splits
    with uint8 (N, 28, 28, 1) images. The source splits and target_test hold
    all images of their classes.

  Raises:
    ValueError: invalid classes or shots (the message names the field).
  """
  source = _check_classes('source_classes', source_classes)
  target = _check_classes('target_classes', target_classes)
  overlap = sorted(set(source) & set(target))
  if overlap:
    raise ValueError(f'target_classes must be disjoint from source_classes, '
                     f'both contain {overlap}')
  if isinstance(shots_per_class, bool) or not isinstance(
      shots_per_class, (int, np.integer)) or shots_per_class < 1:
    raise ValueError(f'shots_per_class must be an integer >= 1, got '
                     f'{shots_per_class!r}')
  data = sources.fashion_mnist_arrays(data_dir, tfds_data_dir=tfds_data_dir)
  target_train = _remap(data['train'], target)
  available = np.bincount(target_train.labels, minlength=len(target)).min()
  if shots_per_class > available:
    raise ValueError(f'shots_per_class={shots_per_class} exceeds the '
                     f'{available} training images of the smallest target '
                     f'class')
  return {
      'source_train': _remap(data['train'], source),
      'source_test': _remap(data['test'], source),
      'target_train': target_train.subset(
          per_class_subset(target_train.labels, shots_per_class, seed)),
      'target_test': _remap(data['test'], target),
  }




# The stream of the in-domain split's teacher/target division (independent of
# the target's shot draw, stream 2, and of the validation hold-out, stream 3).
_TEACHER_STREAM = 5


def _check_count(field, value):
  if isinstance(value, bool) or not isinstance(
      value, (int, np.integer)) or value < 1:
    raise ValueError(f'{field} must be an integer >= 1, got {value!r}')


def in_domain_indices(labels, source_classes, target_classes,
                      teacher_per_class, shots_per_class, seed,
                      teacher_seed=0):
  """Divides one training set between a teacher and a few-shot target task.

  Per class, a permutation keyed by (teacher_seed, class) gives the teacher
  its first ``teacher_per_class`` images (source classes only); the target's
  ``shots_per_class`` images per target class are drawn with ``seed`` from
  the rest, as ``per_class_subset`` draws them (nested across shot counts).
  The two index sets are disjoint.

  Args:
    labels: (N,) class indices of the training set.
    source_classes: classes the teacher learns.
    target_classes: classes of the target task (may overlap the source ones).
    teacher_per_class: images per source class for the teacher, >= 1.
    shots_per_class: images per target class for the target task, >= 1.
    seed: non-negative integer (the target's draw).
    teacher_seed: non-negative integer (the teacher's part).

  Returns:
    ``(teacher, target)``: sorted int64 indices into ``labels``.

  Raises:
    ValueError: a count below 1, or too few images left in a class (the
      message names the field).
  """
  _check_count('teacher_per_class', teacher_per_class)
  _check_count('shots_per_class', shots_per_class)
  source, target = set(source_classes), set(target_classes)
  teacher_idx, rest_idx = [], []
  for c, perm in _class_permutations(labels, teacher_seed,
                                     _TEACHER_STREAM).items():
    n_teacher = teacher_per_class if c in source else 0
    if c in source and n_teacher >= len(perm):
      raise ValueError(f'teacher_per_class={teacher_per_class} leaves no '
                       f'training image of class {c} ({len(perm)} images) '
                       'for the target task')
    if c in source:
      teacher_idx.append(perm[:n_teacher])
    if c in target:
      if len(perm) - n_teacher < shots_per_class:
        raise ValueError(f'shots_per_class={shots_per_class} exceeds the '
                         f'{len(perm) - n_teacher} training images of class '
                         f'{c} that the teacher leaves')
      rest_idx.append(perm[n_teacher:])
  rest = np.sort(np.concatenate(rest_idx))
  shots = rest[per_class_subset(np.asarray(labels)[rest], shots_per_class,
                                seed)]
  return np.sort(np.concatenate(teacher_idx)).astype(np.int64), shots


def fashion_mnist_in_domain_splits(data_dir, source_classes, target_classes,
                                   teacher_per_class, shots_per_class, seed,
                                   teacher_seed=0, *, tfds_data_dir=None):
  """The demo's in-domain tasks: teacher and target share the image domain.

  As ImageNet covers the paper's target sets, the teacher here learns
  Fashion-MNIST itself (``source_classes``, usually all ten) from part of the
  training images, and the target task draws its few shots from the other
  training images (``in_domain_indices``): no target training image was seen
  by the teacher.

  Args:
    data_dir: see ``sources.fashion_mnist_arrays``.
    source_classes: class indices (0..9) the teacher learns; label i of the
      source splits is source_classes[i].
    target_classes: class indices of the target task (may overlap the source
      classes); label i is target_classes[i].
    teacher_per_class: training images per source class for the teacher.
    shots_per_class: training images per target class.
    seed: non-negative integer (the target's draw).
    teacher_seed: non-negative integer (the teacher's part).
    tfds_data_dir: see ``sources.fashion_mnist_arrays``.

  Returns:
    {'source_train', 'source_test', 'target_train', 'target_test'} as
    ``fashion_mnist_transfer_splits`` returns them; the test splits hold all
    test images of their classes.

  Raises:
    ValueError: invalid classes or counts (the message names the field).
  """
  source = _check_classes('source_classes', source_classes)
  target = _check_classes('target_classes', target_classes)
  data = sources.fashion_mnist_arrays(data_dir, tfds_data_dir=tfds_data_dir)
  teacher_idx, target_idx = in_domain_indices(
      data['train'].labels, source, target, teacher_per_class,
      shots_per_class, seed, teacher_seed)
  return {
      'source_train': _remap(data['train'].subset(teacher_idx), source),
      'source_test': _remap(data['test'], source),
      'target_train': _remap(data['train'].subset(target_idx), target),
      'target_test': _remap(data['test'], target),
  }
