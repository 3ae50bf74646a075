"""Crops, flips and normalises uint8 image batches inside a jitted step.

The on-device counterpart of ``input_pipeline``'s host-side preprocessing:
the host sends uint8 images at the pre-crop size and the step turns them into
the network's float32 inputs. Pure JAX (no TensorFlow), per example, from a
PRNG key:

* training (``random_crop_flip_normalize``): zero padding, a crop offset
  drawn uniformly from every valid position, a horizontal flip with
  probability 1/2, then ``(x / 255 - mean) / std``, the distribution of the
  host's ``stateless_random_crop`` / ``stateless_random_flip_left_right``
  (the draws themselves differ: they come from the step's key);
* evaluation (``center_crop_normalize``): torchvision's centre crop, the
  host path's exact offsets and values.

``step_inputs`` is the step's hook: float batches (host-preprocessed) pass
through unchanged, uint8 ones are preprocessed here. ``runs_on_device``
resolves ``config.dataset.augment_on_device`` for the process's platform.
"""

import jax
import jax.numpy as jnp
import numpy as np

from dtq_jax.infra import errors

# Folded into the step's dropout key, so that the augmentation draws are
# independent of the dropout draws made from the same key.
_KEY_TAG = 0x61756720  # 'aug '


def runs_on_device(dataset):
  """Whether a run's steps crop, flip and normalise its images themselves.

  Args:
    dataset: ``config.dataset`` (its ``augment_on_device``: 'on', 'off', or
      'auto': on where JAX's default backend is an accelerator).

  Returns:
    True where the host pipeline delivers uint8 pre-crop images.

  Raises:
    ConfigError: another value of ``augment_on_device``.
  """
  setting = dataset.get('augment_on_device', 'off')
  if setting not in ('auto', 'on', 'off'):
    raise errors.ConfigError('dataset.augment_on_device', setting,
                             'allowed: auto, on, off.')
  if setting == 'auto':
    # On a CPU the step's own crop gains nothing over the host's; on an
    # accelerator it takes the per-pixel work off the host and sends a
    # quarter of the bytes (results/input_pipeline_cpu.md).
    return jax.default_backend() != 'cpu'
  return setting == 'on'


def normalization(mean, std, channels):
  """``(scale, offset)`` with ``(x / 255 - mean) / std == x * scale - offset``.

  Shared by the host pipeline and the step, so both normalise alike.

  Args:
    mean: per-channel mean on the 0..1 scale (1 or C values).
    std: per-channel standard deviation on the 0..1 scale.
    channels: the images' channels.

  Returns:
    Two float32 arrays of 1 or C values.

  Raises:
    ValueError: mean or std has the wrong length.
  """
  mean = np.asarray(mean, np.float32).reshape(-1)
  std = np.asarray(std, np.float32).reshape(-1)
  if mean.size not in (1, channels) or std.size not in (1, channels):
    raise ValueError(f'mean and std need {channels} value(s) (or 1) for '
                     f'{channels}-channel images, got {mean.size} and '
                     f'{std.size}')
  return 1.0 / (255.0 * std), mean / std


def _normalizer(mean, std, channels):
  scale, offset = normalization(mean, std, channels)
  return lambda x: x.astype(jnp.float32) * scale - offset


def crop_flip_draws(key, batch, height, width, size, padding=0):
  """The per-example crop offsets and flips of ``random_crop_flip_normalize``.

  Args:
    key: PRNG key of the batch.
    batch: number of examples.
    height: image height before padding.
    width: image width before padding.
    size: side of the square crop.
    padding: zero padding on each side before the crop.

  Returns:
    ``(top, left, flip)``: int32 (batch,) offsets into the padded image,
    uniform over 0 .. H + 2 * padding - size (resp. W), and bool (batch,).
  """
  keys = jax.random.split(key, batch)

  def draw(k):
    k_top, k_left, k_flip = jax.random.split(k, 3)
    top = jax.random.randint(k_top, (), 0, height + 2 * padding - size + 1)
    left = jax.random.randint(k_left, (), 0, width + 2 * padding - size + 1)
    return top, left, jax.random.bernoulli(k_flip)

  return jax.vmap(draw)(keys)


def random_crop_flip_normalize(key, images, size, mean, std, padding=0):
  """Random crop, random horizontal flip and normalisation, per example.

  Args:
    key: PRNG key of the batch (each example draws from its own subkey).
    images: uint8 (B, H, W, C) pre-crop images.
    size: side of the square crop.
    mean: per-channel mean on the 0..1 scale (1 or C values).
    std: per-channel standard deviation on the 0..1 scale.
    padding: zero padding on each side before the crop (black, as the host
      pads before normalising).

  Returns:
    float32 (B, size, size, C).

  Raises:
    ValueError: the crop does not fit, or mean/std have the wrong length.
  """
  b, h, w, c = images.shape
  if min(h, w) + 2 * padding < size:
    raise ValueError(f'crop size {size} is larger than the {h}x{w} images '
                     f'(+ padding {padding})')
  normalize = _normalizer(mean, std, c)
  top, left, flip = crop_flip_draws(key, b, h, w, size, padding)
  if padding:
    images = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding),
                              (0, 0)))

  def crop_one(img, y, x, f):
    out = jax.lax.dynamic_slice(img, (y, x, 0), (size, size, c))
    return jnp.where(f, out[:, ::-1], out)

  # Cropping and flipping move uint8 (a quarter of the bytes); the
  # normalisation then fuses into the network's first convolution.
  return normalize(jax.vmap(crop_one)(images, top, left, flip))


def center_offsets(height, width, size):
  """torchvision's CenterCrop offsets (Python's round), as the host uses."""
  return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def center_crop_normalize(images, size, mean, std):
  """Centre crop and normalisation: the evaluation inputs.

  Args:
    images: uint8 (B, H, W, C) pre-crop images.
    size: side of the square crop.
    mean: per-channel mean on the 0..1 scale.
    std: per-channel standard deviation on the 0..1 scale.

  Returns:
    float32 (B, size, size, C), equal to the host path's batches of the same
    uint8 images.
  """
  _, h, w, c = images.shape
  if min(h, w) < size:
    raise ValueError(f'crop size {size} is larger than the {h}x{w} images')
  top, left = center_offsets(h, w, size)
  return _normalizer(mean, std, c)(images[:, top:top + size,
                                          left:left + size])


def step_inputs(images, dataset, key=None):
  """The network inputs of a step's batch.

  Args:
    images: float (B, S, S, C) images preprocessed on the host (returned as
      they are), or uint8 (B, R, R, C) pre-crop images.
    dataset: ``config.dataset`` (``image_size``, ``mean``, ``std``,
      ``crop_padding``); read only for uint8 images.
    key: the step's PRNG key: random crop and flip (training); None: centre
      crop (evaluation).

  Returns:
    float32 (B, S, S, C) for uint8 input, else ``images``.
  """
  if images.dtype != jnp.uint8:
    return images
  if dataset is None:
    raise ValueError('uint8 images need the dataset config (image_size, '
                     'mean, std) to be preprocessed in the step')
  mean, std = tuple(dataset.mean), tuple(dataset.std)
  if key is None:
    return center_crop_normalize(images, dataset.image_size, mean, std)
  return random_crop_flip_normalize(
      jax.random.fold_in(key, _KEY_TAG), images, dataset.image_size, mean,
      std, dataset.crop_padding)
