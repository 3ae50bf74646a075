"""The pure train and eval steps: state, optimizer, each method's loss terms.

``make_train_step`` returns ``(state, batch, frozen) -> (state, metrics)``: it
differentiates only the student's trainable parameters; the teacher's
variables arrive in ``frozen`` and are never updated or checkpointed
(docs/method.md, "Losses" and "Training recipe").
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from dtq_jax.data import augment
from dtq_jax.method import attention
from dtq_jax.method import learned_params
from dtq_jax.method import losses
from dtq_jax.method import networks
from dtq_jax.method import static_ranges

# Methods whose loss needs the teacher's forward pass.
TEACHER_METHODS = ('dtq', 'delta')


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly where it stopped.

  Attributes:
    step: number of updates done.
    params: ``{'backbone', 'head'[, 'attention']}`` trainable parameters (the
      backbone's source classifier is inside but never updated).
    batch_stats: the student's BatchNorm statistics.
    opt_state: optax state.
    rng: PRNG key (raw uint32) for dropout.
    nonfinite_steps: updates skipped because a loss or gradient was not finite.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_steps: jax.Array


@flax.struct.dataclass
class StaticRangesTrainState(TrainState):
  """A ``TrainState`` that also keeps the running activation ranges.

  Used when ``config.quant.act_ranges='static'`` (a separate class, so that
  the checkpoints of other runs keep their layout).

  Attributes:
    quant_ranges: ``{'lo', 'hi', 'count'}`` per quantized convolution.
  """
  quant_ranges: Any


def create_train_state(config, nets, params, batch_stats, tx, rng,
                       image_shape):
  """The state of a run before its first step.

  Args:
    config: the run config.
    nets: ``networks.Networks``.
    params: trainable parameters (``networks.init_params``).
    batch_stats: the student's BatchNorm statistics.
    tx: the optimizer.
    rng: the key the steps draw dropout from.
    image_shape: (H, W, C) of one input image.

  Returns:
    A ``TrainState``, or a ``StaticRangesTrainState`` when the run keeps
    activation ranges (each range's count is 0: the first training batch
    sets it).
  """
  fields = dict(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params), rng=rng,
      nonfinite_steps=jnp.zeros((), jnp.int32))
  if not networks.uses_static_ranges(config):
    return TrainState(**fields)
  return StaticRangesTrainState(**fields, quant_ranges=(
      static_ranges.empty_ranges(nets.student, {
          'params': params['backbone'], 'batch_stats': batch_stats},
                               image_shape)))


def _classifier_keys(classifier_name):
  """The source classifier's keys in the backbone params ('a/b' -> [a, b])."""
  return classifier_name.split('/')


def _labels(params, classifier_name):
  """'frozen' for the source classifier, 'quant' for learned quantizer
  parameters (``learned_params``), 'train' for everything else."""
  frozen = ['backbone'] + _classifier_keys(classifier_name)

  def label(path, _):
    keys = [getattr(p, 'key', None) for p in path]
    if keys[:len(frozen)] == frozen:
      return 'frozen'
    return 'quant' if learned_params.is_learned(path) else 'train'
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config, params, classifier_name, steps_per_epoch,
                   num_epochs):
  """SGD with momentum, head-only weight decay, one step decay of the lr.

  Learned quantizer parameters (``quant.method='lsq'``) get their own
  transformation: the same SGD at ``quant.lsq_lr_scale`` times the
  learning rate (schedule included), and no weight decay.

  Args:
    config: the run config (``config.optim``).
    params: the trainable parameter tree (for the masks).
    classifier_name: the backbone's source classifier, kept frozen.
    steps_per_epoch: updates per epoch.
    num_epochs: epochs of the run.

  Returns:
    ``(optax transformation, learning-rate schedule)``.
  """
  o = config.optim
  drop_step = int(o.lr_drop_epoch_fraction * num_epochs) * steps_per_epoch
  schedule = optax.piecewise_constant_schedule(
      o.lr, {drop_step: o.lr_drop_factor} if drop_step > 0 else {})
  head_only = jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[0], 'key', None) == 'head', params)
  # PyTorch's SGD adds weight_decay * w to the gradient before momentum.
  train = optax.chain(
      optax.add_decayed_weights(o.head_weight_decay, mask=head_only),
      optax.sgd(schedule, momentum=o.momentum))
  labels = _labels(params, classifier_name)
  transforms = {'train': train, 'frozen': optax.set_to_zero()}
  # Only a tree that has learned parameters gets the 'quant' transformation:
  # the optimizer state of every other run keeps its layout (checkpoints).
  if 'quant' in jax.tree.leaves(labels):
    scale = config.quant.get('lsq_lr_scale', 1.0)
    transforms['quant'] = optax.sgd(lambda count: scale * schedule(count),
                                    momentum=o.momentum)
  tx = optax.multi_transform(transforms, labels)
  return tx, schedule


def kl_temperature(config):
  """The KL term's softmax temperature of a run.

  Args:
    config: the run config. ``dtq.temperature`` > 0 is used as it is; 0
      (the paper configs' default) means the value for ``config.model`` in
      ``dtq.temperature_by_model`` (60 for ResNet-50, 30 for MobileNetV2).

  Returns:
    The temperature, a float.
  """
  c = config.dtq
  if c.temperature:
    return float(c.temperature)
  return float(c.temperature_by_model[config.model])


def apply_in_groups(apply_fn, images, group_size, rng=None):
  """Runs the student on groups of examples, as data-parallel replicas would.

  The authors' ResNet-50 runs used ``nn.DataParallel`` on two GPUs: each
  replica normalised with the BatchNorm statistics of its own half of the
  batch and quantized activations over its own half's range, and only the
  first replica's BatchNorm updates survived (its module is the original;
  the others are copies). ``group_size`` reproduces that on any number of
  devices: the batch is cut into consecutive groups of ``group_size``
  examples, ``apply_fn`` runs on each (``jax.vmap``, so every statistic and
  range is the group's), the outputs are joined back in batch order and the
  new state (BatchNorm statistics, collected ranges) is the first group's.

  Args:
    apply_fn: ``(images, rng) -> (outputs, state)``; ``outputs`` is a tree of
      arrays with the batch as leading axis.
    images: (B, H, W, C).
    group_size: examples per group; 0 (or B) runs ``apply_fn`` on the whole
      batch unchanged (the default: statistics over the global batch).
    rng: a key for ``apply_fn`` (each group gets its own) or None.

  Returns:
    ``(outputs, state)`` as ``apply_fn`` returns them for the whole batch.

  Raises:
    ValueError: ``group_size`` does not divide the batch.
  """
  batch = images.shape[0]
  if not group_size or group_size == batch:
    return apply_fn(images, rng)
  if batch % group_size:
    raise ValueError(f'config.stats_group_size={group_size} must divide the '
                     f'batch of {batch} examples (batch_size and '
                     'eval_batch_size per step).')
  groups = batch // group_size
  grouped = images.reshape((groups, group_size) + images.shape[1:])
  rngs = None if rng is None else jax.random.split(rng, groups)
  outputs, state = jax.vmap(apply_fn)(grouped, rngs)
  outputs = jax.tree.map(lambda x: x.reshape((batch,) + x.shape[2:]), outputs)
  return outputs, jax.tree.map(lambda x: x[0], state)


def _feature_extractor(backbone_params, classifier_name):
  """The backbone's params without the source classifier's."""
  *parents, last = _classifier_keys(classifier_name)

  def without(tree, keys):
    if not keys:
      return {k: v for k, v in tree.items() if k != last}
    return {k: without(v, keys[1:]) if k == keys[0] else v
            for k, v in tree.items()}

  return without(backbone_params, parents)


def _dtq_terms(config, nets, params, student_out, teacher_out):
  """DTQ's weighted KL and AFA terms, and the attention weights used."""
  c = config.dtq
  (source_logits, feats), (teacher_logits, teacher_feats) = (student_out,
                                                             teacher_out)
  terms = {'kl': c.kl_weight * losses.kl_divergence(
      source_logits, teacher_logits, kl_temperature(config))}
  if nets.attention is None or c.attention == 'uniform':
    weights = attention.TransferAttention(uniform=True).apply(
        {}, teacher_feats['taps'])
  else:
    weights = nets.attention.apply({'params': params['attention']},
                                   teacher_feats['taps'])
  # 'reversed' (ablation): the attention ascends the AFA term it weights.
  afa_weights = ([attention.reverse_gradient(w) for w in weights]
                 if c.attention == 'reversed' else weights)
  terms['afa'] = c.afa_weight * losses.afa_loss(
      teacher_feats['taps'], feats['taps'], afa_weights,
      normalization=c.afa_normalization)
  entropy_weight = c.get('attention_entropy_weight', 0.0)
  if entropy_weight:
    # Opt-in bonus against the attention's collapse onto a few channels:
    # minus the weight times the summed per-map entropy (nats).
    terms['attention_entropy'] = -entropy_weight * sum(
        attention.attention_entropy(w) for w in weights)
  return terms, weights


def _delta_terms(config, params, feats, teacher_feats, delta_weights):
  """DELTA-Q's weighted feature distance and the head's L2 term."""
  c = config.delta
  return {'delta': c.alpha * losses.delta_loss(teacher_feats['taps'],
                                               feats['taps'], delta_weights),
          'head_l2': c.beta / 2 * losses.l2(params['head'])}


def _weight_decay_terms(config, params, start_params, classifier_name):
  """L2's or L2-SP's term on the feature extractor and the head's L2 term."""
  method = config.method
  c = config[method]
  # Learned quantizer steps are not weights: no decay pulls them to zero or
  # to a start the pretrained network does not have.
  extractor = learned_params.without_learned(
      _feature_extractor(params['backbone'], classifier_name))
  if method == 'l2':
    terms = {'l2': c.alpha / 2 * losses.l2(extractor)}
  else:
    start = _feature_extractor(start_params, classifier_name)
    terms = {'l2sp': c.alpha / 2 * losses.l2_sp(extractor, start)}
  terms['head_l2'] = c.beta / 2 * losses.l2(params['head'])
  return terms


def compute_losses(config, nets, params, batch_stats, images, labels, frozen,
                   dropout_rng, quant_ranges=None):
  """All loss terms of the configured method for one batch.

  Args:
    config: the run config.
    nets: ``networks.Networks``.
    params: trainable parameters.
    batch_stats: student BatchNorm statistics.
    images: (B, H, W, C) batch.
    labels: (B,) target labels.
    frozen: ``{'teacher': variables}`` plus ``'delta_weights'`` for DELTA.
    dropout_rng: key for dropout.
    quant_ranges: the student's running activation ranges, updated with this
      batch (None: not collected).

  Returns:
    ``(total, (terms, new_batch_stats, aux))``: ``terms`` maps loss names to
    scalars (weighted as in the total), ``aux`` has the target logits, the
    attention weights and, if collected, the new ``quant_ranges``.
  """
  k_model, k_head = jax.random.split(dropout_rng)
  variables = {'params': params['backbone'], 'batch_stats': batch_stats}
  mutable = ['batch_stats']
  if quant_ranges is not None:
    variables[static_ranges.RANGES] = quant_ranges
    mutable.append(static_ranges.RANGES)

  def apply_student(x, rng):
    return nets.student.apply(variables, x, train=True, mutable=mutable,
                              rngs={'dropout': rng})

  student_out, new_state = apply_in_groups(
      apply_student, images, config.get('stats_group_size', 0), k_model)
  feats = student_out[1]
  if 'dropped' in feats and config.get('head_dropout', 'shared') == 'shared':
    # As in the authors' code, the target classifier reads the features the
    # backbone's dropout already masked for the source classifier.
    logits = nets.head.apply({'params': params['head']}, feats['dropped'])
  else:
    logits = nets.head.apply({'params': params['head']}, feats['pooled'],
                             train=True, rngs={'dropout': k_head})
  terms = {'ce': losses.cross_entropy(logits, labels)}
  aux = {'logits': logits}
  if quant_ranges is not None:
    aux['quant_ranges'] = new_state[static_ranges.RANGES]
  method = config.method
  if method in TEACHER_METHODS:
    teacher_out = nets.teacher.apply(frozen['teacher'], images, train=False)
  if method == 'dtq':
    dtq_terms, aux['attention'] = _dtq_terms(config, nets, params,
                                             student_out, teacher_out)
    terms.update(dtq_terms)
  elif method == 'delta':
    terms.update(_delta_terms(config, params, feats, teacher_out[1],
                              frozen['delta_weights']))
  elif method in ('l2', 'l2sp'):
    terms.update(_weight_decay_terms(config, params,
                                     frozen['teacher']['params'],
                                     nets.student.classifier_name))
  total = sum(terms.values())
  return total, (terms, new_state['batch_stats'], aux)


def make_train_step(config, nets, tx):
  """Builds the pure train step ``(state, batch, frozen) -> (state, metrics)``.

  The step differentiates only the student's trainable parameters. A step
  whose loss or gradient is not finite leaves the state unchanged and counts
  itself in ``state.nonfinite_steps`` (the loop decides whether to stop).
  A batch of uint8 pre-crop images is cropped, flipped and normalised in the
  step (``augment.step_inputs``, per example, from the step's key).

  Args:
    config: the run config.
    nets: ``networks.Networks``.
    tx: the optax transformation.

  Returns:
    The (unjitted) step function.
  """

  def train_step(state, batch, frozen):
    rng, dropout_rng = jax.random.split(state.rng)
    grad_fn = jax.value_and_grad(
        functools.partial(compute_losses, config, nets), has_aux=True)
    ranges = getattr(state, 'quant_ranges', None)
    images = augment.step_inputs(batch['image'], config.get('dataset'),
                                 dropout_rng)
    (total, (terms, batch_stats, aux)), grads = grad_fn(
        state.params, state.batch_stats, images, batch['label'],
        frozen, dropout_rng, quant_ranges=ranges)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(
        lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        batch_stats=keep(batch_stats, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
        rng=rng,
        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32))
    if ranges is not None:
      new_state = new_state.replace(
          quant_ranges=keep(aux['quant_ranges'], ranges))
    metrics = {f'loss_{k}': v for k, v in terms.items()}
    metrics['loss'] = total
    metrics['grad_norm'] = grad_norm
    metrics['finite'] = finite
    metrics['accuracy'] = 100.0 * jnp.mean(
        jnp.argmax(aux['logits'], -1) == batch['label'])
    for i, w in enumerate(aux.get('attention', [])):
      metrics[f'attention_entropy_{i}'] = attention.attention_entropy(w)
    return new_state, metrics

  return train_step


def make_eval_step(nets, act_ranges='dynamic', dataset=None,
                   stats_group_size=0):
  """Builds ``(params, batch_stats, batch[, quant_ranges]) -> {'correct',
  'count', 'loss'}``.

  Padded rows (mask 0) are replaced by a copy of the first row of their
  group (the batch, or each ``stats_group_size`` examples), which is real
  unless the whole group is padding: activation ranges are taken over the
  group, and a duplicate of one of its real images leaves every min and max
  unchanged, so padding does not change any prediction.

  Args:
    nets: ``networks.Networks``.
    act_ranges: 'dynamic' (paper) or 'static' (the step then takes the
      ``quant_ranges`` to quantize with).
    dataset: ``config.dataset``, needed for batches of uint8 pre-crop images
      (centre-cropped and normalised in the step).
    stats_group_size: ``config.stats_group_size``: activation ranges over
      groups of this many examples (``apply_in_groups``); 0: the batch.

  Returns:
    The (unjitted) step function; its outputs are sums over the batch.
  """
  student = static_ranges.with_act_ranges(nets.student, act_ranges)

  def eval_step(params, batch_stats, batch, quant_ranges=None):
    mask = batch['mask'].astype(bool)
    images = augment.step_inputs(batch['image'], dataset)
    if stats_group_size and stats_group_size < images.shape[0]:
      first = jnp.repeat(images[::stats_group_size], stats_group_size, axis=0)
    else:
      first = images[:1]
    images = jnp.where(mask[:, None, None, None], images, first)
    variables = {'params': params['backbone'], 'batch_stats': batch_stats}
    if quant_ranges is not None:
      variables[static_ranges.RANGES] = quant_ranges
    (_, feats), _ = apply_in_groups(
        lambda x, _: (student.apply(variables, x, train=False), {}), images,
        stats_group_size)
    logits = nets.head.apply({'params': params['head']}, feats['pooled'])
    weights = mask.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         batch['label'])
    correct = (jnp.argmax(logits, -1) == batch['label']) & mask
    return {'correct': jnp.sum(correct), 'count': jnp.sum(weights),
            'loss': jnp.sum(ce * weights)}

  return eval_step
