"""Static activation ranges (opt-in): collect, calibrate, evaluate with them.

The paper quantizes the input of every quantized convolution with the min and
max of the current batch (dynamic ranges, ``act_ranges='dynamic'``, the
default). A deployed integer network needs fixed ranges instead. Each
``QuantConv`` keeps running statistics of its input range in the
``'quant_ranges'`` variable collection (``{'lo', 'hi', 'count'}`` per layer,
float32/float32/int32 scalars) whenever that collection is mutable:

* during training (the trainer passes ``mutable=['batch_stats',
  'quant_ranges']``; ``range_stat='ema'`` follows the moving weights), and/or
* in a calibration pass over training batches after training
  (``calibrate``; BatchNorm in inference mode; ``range_stat='minmax'`` by
  default, i.e. the extreme over all calibration images).

``with_act_ranges(model, 'static')`` returns the same network reading those
ranges (``model.apply({'params', 'batch_stats', 'quant_ranges'}, ...)``);
inputs outside a stored range are clipped to it. Full-precision convolutions
(the stem, the teacher) keep no ranges.
"""

import jax
import jax.numpy as jnp
import numpy as np

from dtq_jax import layers

RANGES = layers.RANGES


def with_act_ranges(model, act_ranges, range_stat=None, range_momentum=None):
  """A copy of ``model`` whose quantized convolutions use ``act_ranges``.

  Args:
    model: a model of ``dtq_jax.models`` (it has ``conv_kwargs``).
    act_ranges: 'dynamic' or 'static'.
    range_stat: optional ``QuantConv.range_stat`` ('ema', 'mean', 'minmax').
    range_momentum: optional ``QuantConv.range_momentum``.

  Returns:
    The cloned module.
  """
  if act_ranges not in layers.ACT_RANGES:
    raise ValueError(f'act_ranges={act_ranges!r}; allowed: '
                     f'{", ".join(layers.ACT_RANGES)}.')
  if range_stat is not None and range_stat not in layers.RANGE_STATS:
    raise ValueError(f'range_stat={range_stat!r}; allowed: '
                     f'{", ".join(layers.RANGE_STATS)}.')
  changes = dict(act_ranges=act_ranges, range_stat=range_stat,
                 range_momentum=range_momentum)
  settings = layers.QuantSettings(**(model.conv_kwargs or {})).replace(
      **{k: v for k, v in changes.items() if v is not None})
  return model.clone(conv_kwargs=settings.as_conv_kwargs())


def _backbone_variables(variables):
  return {k: v for k, v in variables.items() if k in ('params', 'batch_stats')}


def empty_ranges(model, variables, image_shape):
  """The ``'quant_ranges'`` tree of ``model`` with every count at 0.

  Use it to give a training state its (fixed) structure before the first
  step: the first collected batch then sets every range.

  Args:
    model: the student.
    variables: its ``{'params', 'batch_stats'}``.
    image_shape: (H, W, C) of one input image.

  Returns:
    ``{layer path...: {'lo', 'hi', 'count'}}``, zeros (``{}`` for a
    full-precision model).
  """
  dynamic = with_act_ranges(model, 'dynamic')
  images = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  _, state = jax.eval_shape(
      lambda v: dynamic.apply(v, images, train=False, mutable=[RANGES]),
      _backbone_variables(variables))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                      state.get(RANGES, {}))


def make_collect_step(model, range_stat='minmax', range_momentum=None,
                      train=False):
  """``(variables, ranges, images) -> ranges`` folding one batch in (jitted).

  The network runs with dynamic ranges (as in training) and, by default,
  BatchNorm in inference mode; only the ranges change.
  """
  collecting = with_act_ranges(model, 'dynamic', range_stat, range_momentum)

  def step(variables, ranges, images):
    _, state = collecting.apply(
        dict(_backbone_variables(variables), **{RANGES: ranges}), images,
        train=train, mutable=[RANGES])
    return state[RANGES]

  return jax.jit(step)


def calibrate(model, variables, batches, num_batches=0, range_stat='minmax',
              range_momentum=None):
  """Static ranges of ``model`` from a pass over ``batches``.

  Args:
    model: the student.
    variables: its ``{'params', 'batch_stats'}`` (more keys are ignored).
    batches: iterable of ``{'image'[, 'mask']}`` numpy batches, e.g.
      ``input_pipeline.eval_batches`` over the training split (no
      augmentation). Rows with mask 0 are replaced by the batch's first row
      (which leaves its min and max unchanged).
    num_batches: stop after this many batches (0: use them all).
    range_stat: 'minmax' (extremes over all batches), 'mean' (average of the
      per-batch extremes) or 'ema'.
    range_momentum: momentum of 'ema'.

  Returns:
    The ``'quant_ranges'`` tree (``lo``, ``hi``, ``count`` per layer).

  Raises:
    ValueError: no batch was seen.
  """
  step = make_collect_step(model, range_stat, range_momentum)
  ranges = None
  for i, batch in enumerate(batches):
    if num_batches and i >= num_batches:
      break
    images = np.asarray(batch['image'])
    if 'mask' in batch:
      mask = np.asarray(batch['mask']).astype(bool)
      images = np.where(mask[:, None, None, None], images, images[:1])
    if ranges is None:
      ranges = empty_ranges(model, variables, images.shape[1:])
    ranges = step(variables, ranges, images)
  if ranges is None:
    raise ValueError('calibration saw no batch.')
  check_ranges(ranges)
  return jax.device_get(ranges)


def layer_ranges(ranges):
  """Flattens a ranges tree to ``{'a/b/conv': {'lo', 'hi'[, 'count']}}``."""
  out = {}

  def walk(tree, path):
    if 'lo' in tree and not isinstance(tree['lo'], dict):
      out['/'.join(path)] = dict(tree)
      return
    for k, v in tree.items():
      walk(v, path + (k,))

  walk(dict(ranges), ())
  return out


def check_ranges(ranges):
  """Raises ValueError if a layer's range was never collected (count 0)."""
  empty = [p for p, r in layer_ranges(ranges).items()
           if 'count' in r and int(np.asarray(r['count'])) == 0]
  if empty:
    raise ValueError(f'{len(empty)} layer(s) have no collected activation '
                     f'range (count 0), e.g. {empty[0]}; calibrate first.')


def has_collected_ranges(ranges):
  """Whether ``ranges`` holds a collected range for at least one layer."""
  flat = layer_ranges(ranges or {})
  return bool(flat) and all(int(np.asarray(r.get('count', 1))) > 0
                            for r in flat.values())
