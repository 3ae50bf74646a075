"""Preprocesses and batches a Split: the tf.data train and eval pipelines.

``train_batches`` and ``eval_batches`` turn a ``sources.Split`` into an
iterator of numpy batches through tf.data on the host: decode (files and
bytes), resize, crop, flip and normalise per example, then batch, with
fixed-shape padded batches for evaluation. The Splits come from ``sources``
and ``splits``.

Images read from files or bytes are always delivered as 3-channel RGB (the
pretrained networks are RGB): grayscale is replicated and alpha dropped, as
PIL's ``convert('RGB')`` in the authors' loader does.

The training stream is a pure function of ``(seed, position)``: epoch ``e`` is
a permutation drawn from ``(seed, e)``, and the random crop and flip of the
example at stream position ``p`` use stateless ops seeded with ``(seed, p)``.
``start_step`` therefore resumes exactly where a checkpoint stopped, skipping
on the index level without decoding anything, and slicing a global batch
across processes changes nothing about its content.

With ``on_device=True`` both pipelines stop before the crop: they deliver the
uint8 images at the pre-crop size (resized, rounded), and the jitted step
crops, flips and normalises them (``augment``), which sends a quarter of the
bytes to the accelerator and takes the per-pixel work off the host. The image
cache's arrays (``image_cache``: large, or memory-mapped in its 'disk' mode)
are read through NumPy one batch at a time, so that only those rows are
copied or paged in.
"""

import numpy as np
import tensorflow as tf

from dtq_jax.data import augment

# Per-channel statistics on the 0..1 scale that the pretrained torchvision
# networks were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pixel mean and standard deviation of the 60000 Fashion-MNIST training
# images on the 0..1 scale (computed from train-images-idx3-ubyte.gz; the
# demo's networks are trained from scratch on the source classes, so the
# whole-dataset statistics are used for source and target alike).
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

# Tags that keep the random streams of different purposes independent even
# when they share the user's seed (splits holds 2 and 3: class subsets and
# the validation hold-out).
_SHUFFLE_STREAM = 1
_AUGMENT_STREAM = 4
# Pixel arrays up to this size are gathered from a tf.constant (Fashion-MNIST:
# 47 MB); larger ones, and memory maps, are read through NumPy
# (``_reads_rows``).
_CONSTANT_BYTES = 256 << 20


# --------------------------------------------------------------------------
# Decoding.


def _decode_rgb(encoded):
  """Decodes one image file's bytes to uint8 (H, W, 3) RGB.

  JPEGs use the accurate integer DCT (as PIL does) and let libjpeg/TF
  convert grayscale and CMYK to RGB. Other formats go through
  ``decode_image`` (first frame of a GIF) and are converted as PIL's
  ``convert('RGB')`` does: gray replicated, alpha dropped.
  """

  def other():
    img = tf.io.decode_image(encoded, expand_animations=False)
    # 1 (gray) or 2 (gray + alpha) channels: replicate gray; 3 or 4: RGB(A).
    return tf.cond(tf.shape(img)[-1] >= 3, lambda: img[..., :3],
                   lambda: tf.tile(img[..., :1], [1, 1, 3]))

  img = tf.cond(
      tf.io.is_jpeg(encoded),
      lambda: tf.io.decode_jpeg(encoded, channels=3,
                                dct_method='INTEGER_ACCURATE'),
      other)
  img.set_shape([None, None, 3])
  return img


def _resize(img, resize_to):
  """uint8 (H, W, C) -> float32 (resize_to, resize_to, C).

  Bilinear with antialiasing, as PIL's resize in torchvision.
  """
  return tf.image.resize(tf.cast(img, tf.float32), [resize_to, resize_to],
                         method='bilinear', antialias=True)


def _to_uint8(img):
  """Rounds float pixels on the 0..255 scale to uint8 (the cache's form)."""
  return tf.cast(tf.round(tf.clip_by_value(img, 0.0, 255.0)), tf.uint8)


# --------------------------------------------------------------------------
# Pipelines.


def steps_per_epoch(num_examples, batch_size, drop_remainder=True):
  """Global batches that ``train_batches`` yields per epoch.

  Args:
    num_examples: size of the training split.
    batch_size: global batch size.
    drop_remainder: as in ``train_batches``.

  Returns:
    floor(N / B) if drop_remainder else ceil(N / B).
  """
  if drop_remainder:
    return num_examples // batch_size
  return -(-num_examples // batch_size)


def eval_num_batches(num_examples, batch_size, pad_to_multiple=1):
  """Batches that ``eval_batches`` yields (on every process)."""
  batches = -(-num_examples // batch_size)
  return -(-batches // pad_to_multiple) * pad_to_multiple


def _local_rows(batch_size, process_index, process_count):
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'need 0 <= process_index < process_count, got '
                     f'{process_index} and {process_count}')
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} must be a positive multiple of '
                     f'process_count {process_count}')
  local = batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def _stream_key(seed, stream):
  """A stateless-RNG key for one purpose (shuffle or augmentation)."""
  if not 0 <= seed < 2**63:
    raise ValueError(f'seed must be in [0, 2**63), got {seed}')
  return tf.constant([seed, stream], tf.int64)


def _batch_layout(num_examples, batch_size, num_batches, rows):
  """Places (0..N-1) of each global batch's rows, and which rows are real.

  Row r of batch k holds place k * B + r; places past the end (a short last
  batch) repeat the batch's first place and are marked invalid. Only this
  process's ``rows`` are returned.
  """
  where = np.arange(num_batches * batch_size).reshape(num_batches, batch_size)
  valid = where < num_examples
  where = np.where(valid, where, where[:, :1])
  return where[:, rows], valid[:, rows]


def _train_index_data(num_examples, batch_size, seed, start_step,
                      drop_remainder, rows):
  """Index batches of the training stream, from global step ``start_step``.

  Epoch e visits the examples in a permutation keyed by (seed, e); the place
  of an example in the whole stream, e * N + place in its epoch, is its
  ``position`` and seeds its augmentation. Everything is computed in TF (no
  Python in the loop), and skipping to ``start_step`` touches indices only.
  """
  spe = steps_per_epoch(num_examples, batch_size, drop_remainder)
  start_epoch, first_step = divmod(start_step, spe)
  where, valid = _batch_layout(num_examples, batch_size, spe, rows)
  shuffle_key = _stream_key(seed, _SHUFFLE_STREAM)

  def epoch_data(epoch):
    perm = tf.random.experimental.stateless_shuffle(
        tf.range(num_examples, dtype=tf.int64),
        seed=tf.random.experimental.stateless_fold_in(shuffle_key, epoch))
    data = tf.data.Dataset.from_tensor_slices({
        'index': tf.gather(perm, where),
        'position': epoch * num_examples + where,
        'valid': valid})
    # Only the first epoch starts part-way.
    return data.skip(tf.cast(tf.where(epoch == start_epoch, first_step, 0),
                             tf.int64))

  return tf.data.Dataset.counter(start_epoch).flat_map(epoch_data)


def _eval_index_data(num_examples, batch_size, pad_to_multiple, rows):
  """Index batches of one ordered pass, padded to full global batches.

  Padding rows repeat the batch's first example (so that the batch holds no
  new values: with the per-batch activation ranges of the dynamic quantizer,
  the real examples' outputs are then exactly those of the unpadded batch);
  all-padding batches repeat example 0.
  """
  num_batches = eval_num_batches(num_examples, batch_size, pad_to_multiple)
  where, valid = _batch_layout(num_examples, batch_size, num_batches, rows)
  where = np.where(where < num_examples, where, 0)
  return tf.data.Dataset.from_tensor_slices(
      {'index': where, 'position': where, 'valid': valid})


def _normalizer(mean, std, channels, width):
  """float (B, H, width, C) -> (x / 255 - mean) / std, as the step's.

  One multiply-add over rows of ``width * C`` values: TF broadcasts a
  per-channel constant over an inner dimension of 3 several times slower.
  """
  scale, offset = (np.tile(np.broadcast_to(v, (channels,)), width)
                   for v in augment.normalization(mean, std, channels))

  def normalize(x):
    shape = tf.shape(x)
    rows = tf.reshape(x, [shape[0], shape[1], width * channels])
    return tf.reshape(rows * scale - offset, shape)

  return normalize


def _reads_rows(split):
  """Whether ``split``'s pixels are read through NumPy, a batch at a time.

  The image cache's arrays: a tf.constant would copy the whole array (and
  read all of a memory-mapped file larger than memory); a NumPy read copies
  (or pages in) only one batch's rows, in one call per batch.
  """
  return isinstance(split.images, np.memmap) or (
      not split.is_encoded and split.images.nbytes > _CONSTANT_BYTES)


def _row_reader(split):
  """Returns int64 (b,) indices -> uint8 (b, H, W, C) rows of the array."""
  array = split.images

  def read(indices):
    rows = tf.numpy_function(lambda i: np.asarray(array[i]), [indices],
                             tf.uint8, stateful=False)
    return tf.ensure_shape(rows, [None, *array.shape[1:]])

  return read


def _loader(split):
  """Returns index -> uint8 (H, W, C) image tensor for the split's images."""
  images = split.images_tensor
  if not split.is_encoded:
    return lambda i: tf.gather(images, i)
  if isinstance(split.images, list):
    return lambda i: _decode_rgb(tf.io.read_file(tf.gather(images, i)))
  return lambda i: _decode_rgb(tf.gather(images, i))


def _check_sizes(split, image_size, resize_to, crop_padding):
  """Static checks, so that no crop can fail mid-epoch."""
  if resize_to is None and split.is_encoded:
    raise ValueError('resize_to is required for images read from files or '
                     'bytes (their sizes vary)')
  if resize_to is not None:
    height = width = resize_to
  else:
    height, width = split.images.shape[1:3]
  if min(height, width) + 2 * crop_padding < image_size:
    raise ValueError(f'image_size {image_size} is larger than the '
                     f'{height}x{width} images (+ padding {crop_padding})')
  return height, width


def _centre_crop(img, height, width, size):
  top, left = augment.center_offsets(height, width, size)
  return img[top:top + size, left:left + size]


def _pipeline(split, index_data, local_batch, image_size, resize_to,
              crop_padding, augment, seed, mean, std, output, on_device=False):
  """index batches -> per-example load/preprocess -> numpy batches."""
  height, width = _check_sizes(split, image_size, resize_to, crop_padding)
  channels = split.channels
  normalize = _normalizer(mean, std, channels, image_size)
  if _reads_rows(split):
    read_rows = _row_reader(split)
    index_data = index_data.map(
        lambda batch: dict(batch, image=read_rows(batch['index'])),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    load = lambda example: example['image']
  else:
    load_index = _loader(split)
    load = lambda example: load_index(example['index'])
  labels = tf.constant(split.labels, tf.int32)
  augment_key = _stream_key(seed, _AUGMENT_STREAM)

  def preprocess(example):
    img = load(example)
    if resize_to is not None:
      img = _resize(img, resize_to)
      if on_device:
        # Pre-crop uint8, exactly what the image cache holds.
        img = _to_uint8(img)
    if on_device:
      img = tf.ensure_shape(img, [height, width, channels])
    elif augment:
      # Cropping and flipping pixels as they come (uint8 from the cache or
      # a pixel array, float after a resize): the offsets depend only on the
      # shape and the seed, so both give the same crops.
      if crop_padding:
        img = tf.pad(img, [[crop_padding] * 2, [crop_padding] * 2, [0, 0]])
      crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(
          tf.random.experimental.stateless_fold_in(augment_key,
                                                   example['position']), 2))
      img = tf.image.stateless_random_crop(
          img, [image_size, image_size, channels], seed=crop_seed)
      img = tf.image.stateless_random_flip_left_right(img, seed=flip_seed)
    else:
      img = _centre_crop(img, height, width, image_size)
    return {'image': img, 'label': tf.gather(labels, example['index']),
            'valid': example['valid']}

  def finish(batch):
    if not on_device:
      # Normalised per batch: one vectorised multiply-add instead of one
      # small op per image.
      image = normalize(tf.cast(batch['image'], tf.float32))
      batch = dict(batch, image=tf.ensure_shape(
          image, [local_batch, image_size, image_size, channels]))
    return output(batch)

  data = index_data.unbatch()
  data = data.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)
  # Every index batch is full-size (short ones are padded), so re-batching
  # restores exactly the index batches' boundaries.
  data = data.batch(local_batch, drop_remainder=True)
  data = data.map(finish, num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)
  options = tf.data.Options()
  options.deterministic = True
  # One thread per op: the parallelism is across examples.
  options.threading.max_intra_op_parallelism = 1
  return data.with_options(options).prefetch(tf.data.AUTOTUNE)


def train_batches(split, batch_size, image_size, seed, *, resize_to=None,
                  augment=True, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                  start_step=0, drop_remainder=True, crop_padding=0,
                  process_index=0, process_count=1, on_device=False):
  """An endless, reshuffled-every-epoch stream of training batches.

  Preprocessing (per example): resize to resize_to x resize_to (aspect ratio
  not kept; skipped if None), zero-pad by crop_padding, random crop
  image_size x image_size, random horizontal flip, then
  (x / 255 - mean) / std. With augment=False: resize and centre crop, as in
  evaluation. Paper (ImageNet-size images): resize_to=256, image_size=224.
  Fashion-MNIST demo: resize_to=None, image_size=28, crop_padding=2,
  FASHION_MNIST_MEAN/STD.

  The stream is a pure function of (split, seed, step): the permutation of
  epoch e is drawn from (seed, e) and the crop/flip of stream position p from
  (seed, p). Global step s is epoch s // spe, batch s % spe of that epoch
  (spe = ``steps_per_epoch``).

  Args:
    split: the training Split.
    batch_size: global batch size.
    image_size: side of the output crops.
    seed: non-negative integer.
    resize_to: resize side before cropping; required for file/bytes images.
    augment: random crop and flip (else centre crop).
    mean: per-channel mean on the 0..1 scale (1 or C values).
    std: per-channel standard deviation on the 0..1 scale.
    start_step: first global step to yield; resuming from a checkpoint at
      step s with start_step=s continues the identical stream (skipped steps
      cost nothing: no image is read).
    drop_remainder: True: every epoch yields N // B full batches (the
      remainder differs every epoch). False: ceil(N / B) batches, the last
      one of each epoch short (PyTorch's drop_last=False); only with one
      process.
    crop_padding: zero padding on each side before the random crop.
    process_index: this process's index.
    process_count: number of processes; each yields rows
      [i * B / P, (i + 1) * B / P) of every global batch.
    on_device: deliver the uint8 images before the crop (resized to
      resize_to, rounded) for a step that augments them itself
      (``augment.random_crop_flip_normalize``); the order is the same.

  Returns:
    An iterator of {'image': float32 (b, S, S, C), 'label': int32 (b,)}, b =
    batch_size // process_count; with on_device, 'image' is uint8
    (b, R, R, C), R = resize_to or the images' own size.

  Raises:
    ValueError: inconsistent sizes, a split smaller than one batch with
      drop_remainder=True, bad process arguments.
  """
  rows = _local_rows(batch_size, process_index, process_count)
  num_examples = len(split)
  if drop_remainder and num_examples < batch_size:
    raise ValueError(f'the split has {num_examples} examples, fewer than '
                     f'batch_size {batch_size}; use drop_remainder=False or '
                     f'a smaller batch')
  if not num_examples:
    raise ValueError('the split is empty')
  if not drop_remainder and process_count > 1:
    raise ValueError('drop_remainder=False would give processes batches of '
                     'different sizes; use drop_remainder=True')
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}')
  index_data = _train_index_data(num_examples, batch_size, seed, start_step,
                                 drop_remainder, rows)

  def output(batch):
    if drop_remainder:
      return {'image': batch['image'], 'label': batch['label']}
    # Short last batch of an epoch: drop the padding rows.
    return {'image': tf.boolean_mask(batch['image'], batch['valid']),
            'label': tf.boolean_mask(batch['label'], batch['valid'])}

  data = _pipeline(split, index_data, rows.stop - rows.start, image_size,
                   resize_to, crop_padding, augment, seed, mean, std, output,
                   on_device)
  return data.as_numpy_iterator()


def eval_batches(split, batch_size, image_size, *, resize_to=None,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD, pad_to_multiple=1,
                 process_index=0, process_count=1, on_device=False):
  """One pass over ``split`` in order, in fixed-shape batches.

  Preprocessing: resize to resize_to x resize_to (if given), centre crop
  image_size, (x / 255 - mean) / std. The last batch is padded to
  batch_size with rows whose 'mask' is 0 (they repeat the batch's first
  example, see below), so a jitted step sees one shape.

  Why padding repeats a real example: the quantized student computes its
  activation ranges over the whole batch, also in evaluation, so rows of
  zeros could change the real rows' predictions; duplicates of an example
  already in the batch leave every range, and so every real output, exactly
  as for the unpadded short batch. (Evaluation results still depend on the
  batch size and order for the same reason.)

  Args:
    split: the Split to evaluate.
    batch_size: global batch size.
    image_size: side of the centre crop.
    resize_to: resize side; required for file/bytes images.
    mean: per-channel mean on the 0..1 scale.
    std: per-channel standard deviation on the 0..1 scale.
    pad_to_multiple: pad the number of batches with all-padding batches up
      to a multiple of this (e.g. for a step that consumes several batches).
    process_index: this process's index.
    process_count: number of processes; each gets its rows of every global
      batch and all processes get the same number of batches.
    on_device: deliver uint8 images before the centre crop (for
      ``augment.center_crop_normalize`` in the step).

  Returns:
    An iterator of {'image': float32 (b, S, S, C), 'label': int32 (b,),
    'mask': float32 (b,)} over ``eval_num_batches(...)`` batches, b =
    batch_size // process_count; over all processes every example has mask 1
    exactly once. With on_device, 'image' is uint8 (b, R, R, C).
  """
  rows = _local_rows(batch_size, process_index, process_count)
  if pad_to_multiple < 1:
    raise ValueError(f'pad_to_multiple must be >= 1, got {pad_to_multiple}')
  if not len(split):
    raise ValueError('the split is empty')
  index_data = _eval_index_data(len(split), batch_size, pad_to_multiple,
                               rows)

  def output(batch):
    return {'image': batch['image'], 'label': batch['label'],
            'mask': tf.cast(batch['valid'], tf.float32)}

  data = _pipeline(split, index_data, rows.stop - rows.start, image_size,
                   resize_to, 0, False, 0, mean, std, output, on_device)
  return data.as_numpy_iterator()


def resized_images(split, resize_to, chunk=256):
  """Every image of ``split`` in order, decoded and resized to uint8.

  What ``image_cache`` stores: the pipelines' own decoding and resize,
  rounded to uint8, so that a cached image is the uncached one to within
  half a grey level.

  Args:
    split: a Split.
    resize_to: side of the square output; None keeps fixed-size pixels.
    chunk: images per yielded array.

  Returns:
    An iterator of uint8 (n, R, R, C) arrays, n <= chunk, over all images.
  """
  if resize_to is None and split.is_encoded:
    raise ValueError('resize_to is required for images read from files or '
                     'bytes (their sizes vary)')
  load = _loader(split)

  def decode(i):
    img = load(i)
    return img if resize_to is None else _to_uint8(_resize(img, resize_to))

  data = tf.data.Dataset.range(len(split)).map(
      decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  return data.batch(chunk).with_options(options).prefetch(
      2).as_numpy_iterator()
