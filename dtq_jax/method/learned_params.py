"""The student's learned quantizer parameters: structure, start, ranges.

With ``config.quant.method='lsq'`` every quantized convolution owns LSQ's
parameters as Flax params beside its kernel (``layers.LEARNED_PARAMS``):
``lsq_step_w`` (per tensor, or per output channel), ``lsq_step_a`` and, for
an input that can be negative, LSQ+'s ``lsq_offset_a``. The pretrained
variables have none of them; this module gives a student its parameters in
two passes over one batch of training images (docs/method.md, "Learned
quantizers"):

1. the probe (``learned_quant_template``): the network at full precision
   records each quantized convolution's input minimum; an input that is
   negative somewhere gets LSQ+ (step and offset), one that is not (it
   follows a ReLU) gets unsigned LSQ (step only). The choice becomes the
   params' structure, which is static under jit and checkpointed with them.
2. the start (``init_learned_quant``): LSQ's rule on the pretrained kernels
   (``2 * mean(|w|) / sqrt(Qp)``), and on each convolution's input, as the
   quantized student computes it, LSQ's rule (unsigned) or LSQ+'s MSE-based
   ``(step, offset)``.

A resumed run needs only the structure (the checkpoint holds the values),
so it runs the probe alone.
"""

import jax
import jax.numpy as jnp
import numpy as np

from dtq_jax import layers
from dtq_jax import learned_quant
from dtq_jax import quant
from dtq_jax.method import networks


def uses_learned_quant(config):
  """Whether a run's student has learned quantizer parameters.

  Args:
    config: the run config (``quant.method``, the bit widths, ``method``:
      a student at full precision, 'fp', quantizes nothing and so learns no
      range).

  Returns:
    True for ``quant.method`` other than 'minmax' with some bits below 32.
  """
  return (config.quant.get('method', 'minmax') != 'minmax' and
          min(networks.student_bits(config)) < quant.FULL_PRECISION)


def is_learned(path):
  """Whether a tree path (``tree_map_with_path``'s) names a learned param."""
  last = path[-1] if path else None
  return getattr(last, 'key', None) in layers.LEARNED_PARAMS


def without_learned(tree):
  """``tree`` (nested dicts) without its learned quantizer parameters."""
  if not hasattr(tree, 'items'):
    return tree
  return {k: without_learned(v) for k, v in tree.items()
          if k not in layers.LEARNED_PARAMS}


def _merge(base, extra):
  """Nested dicts: ``base`` with ``extra``'s leaves added or replaced."""
  out = dict(base)
  for k, v in extra.items():
    out[k] = _merge(out.get(k, {}), v) if hasattr(v, 'items') else v
  return out


def _apply(student, variables, images, rng, collection):
  """One jitted training-mode pass; returns the ``collection`` it wrote.

  Training mode: the student's BatchNorm normalises with the batch's own
  statistics, as in the train step, so the inputs the quantizers see are
  those they will see in training (the new statistics are dropped).
  """

  def run(variables, images, rng):
    _, state = student.apply(variables, images, train=True,
                             mutable=['batch_stats', collection],
                             rngs={'dropout': rng})
    return state.get(collection, {})

  return jax.device_get(jax.jit(run)(variables, images, rng))


def _backbone(variables):
  """The pretrained ``{'params', 'batch_stats'}``, no learned parameters."""
  return {'params': without_learned(variables['params']),
          'batch_stats': variables.get('batch_stats', {})}


def learned_quant_template(student, variables, images, rng=None):
  """The student's params with learned parameters of the right structure.

  The probe pass: a convolution whose input is negative somewhere in
  ``images`` gets ``lsq_offset_a`` (LSQ+), others an unsigned step only.
  The values are zero placeholders: a restored checkpoint, or
  ``init_learned_quant``, fills them.

  Args:
    student: the quantized backbone (``method='lsq'`` convolutions).
    variables: its ``{'params', 'batch_stats'}`` (learned parameters, if
      any, are replaced).
    images: (B, H, W, C) float training images, preprocessed as the train
      step feeds them.
    rng: key for the network's dropout (default: key 0).

  Returns:
    The params tree with the placeholders.
  """
  rng = jax.random.PRNGKey(0) if rng is None else rng
  backbone = _backbone(variables)
  probe = _apply(student, backbone, images, rng, layers.LSQ_PROBE)

  def structure(tree):
    tree = dict(tree)
    if 'input_min' in tree:
      # An input that is never negative (after a ReLU) needs no offset:
      # unsigned codes from 0 use every level; with PACT, its clipping level
      # replaces the step.
      if float(tree.pop('input_min')) < 0:
        tree[layers.OFFSET_A] = np.zeros((), np.float32)
        tree.pop(layers.ALPHA_A, None)
      elif layers.ALPHA_A in tree:
        del tree[layers.STEP_A]
      return tree
    return {k: structure(v) for k, v in tree.items()}

  template = jax.tree.map(jnp.asarray, structure(probe))
  return _merge(backbone['params'], template)


def init_learned_quant(student, variables, images, rng=None):
  """The student's variables with its learned quantizer parameters started.

  A pure function of the pretrained variables and one batch of training
  images: weight steps from the kernels (LSQ's ``2 * mean(|w|) /
  sqrt(Qp)``), input steps (and LSQ+'s offsets) from ``images`` as the
  quantized student computes them, each convolution's input quantized with
  the starts of the convolutions before it. Called once, when a run starts.

  Args:
    student: the quantized backbone (``method='lsq'`` convolutions).
    variables: ``{'params', 'batch_stats'}`` (the pretrained weights).
    images: (B, H, W, C) float training images, preprocessed as the train
      step feeds them (augmented, normalised).
    rng: key for the network's dropout (default: key 0).

  Returns:
    ``variables`` with ``params`` holding every learned parameter.
  """
  rng = jax.random.PRNGKey(0) if rng is None else rng
  params = learned_quant_template(student, variables, images, rng)
  backbone = {'params': params,
              'batch_stats': variables.get('batch_stats', {})}
  starts = _apply(student, backbone, images, rng, layers.LSQ_INIT)
  return dict(variables,
              params=_merge(params, jax.tree.map(jnp.asarray, starts)))


def learned_ranges(params, bits_w, bits_a):
  """Each quantized convolution's learned quantizers as static ranges.

  For the exporters: the paper's quantizer on a given range
  (``quant.fake_quant_range``) computes the same function as the learned
  one up to float32 rounding when the range is (``learned_quant.lsq_range``,
  ``lsq_plus_range``) ``[Qn * s, Qp * s]`` for the signed weights,
  ``[0, (2**k - 1) * s]`` for an unsigned input and ``[beta, beta +
  (2**k - 1) * s]`` for an LSQ+ input.

  Args:
    params: the backbone's params (with learned parameters).
    bits_w: the student's weight bits.
    bits_a: its activation bits.

  Returns:
    ``{'a/b/conv': {'weight': (lo, hi), 'input': (lo, hi)}}`` (float32
    arrays; the weight's are per output channel, shape (1, 1, 1, C), when
    its step is), an entry only for what the layer quantizes.
  """
  out = {}

  def walk(tree, path):
    if not hasattr(tree, 'items'):
      return
    ranges = {}
    if layers.STEP_W in tree:
      ranges['weight'] = learned_quant.lsq_range(tree[layers.STEP_W], bits_w,
                                                 signed=True)
    if layers.OFFSET_A in tree:
      ranges['input'] = learned_quant.lsq_plus_range(
          tree[layers.STEP_A], tree[layers.OFFSET_A], bits_a)
    elif layers.ALPHA_A in tree:
      ranges['input'] = learned_quant.pact_range(tree[layers.ALPHA_A],
                                                 bits_a)
    elif layers.STEP_A in tree:
      ranges['input'] = learned_quant.lsq_range(tree[layers.STEP_A], bits_a,
                                                signed=False)
    if ranges:
      out['/'.join(path)] = ranges
    for k, v in tree.items():
      walk(v, path + (k,))

  walk(params, ())
  return out
