"""Training: the DTQ train step on a device mesh, evaluation, the loop.

One run trains one student for one seed. The student is the quantized network
(BatchNorm in training mode) plus a new target classifier and, for DTQ, the
attention modules; the teacher is the frozen full-precision network, passed to
the step as an argument and never checkpointed (METHOD.md, "Networks").
"""

import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import threading
import time
import zlib
from typing import Any, Callable, Optional

from absl import logging
import flax
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorboardX
from tqdm import tqdm

from dtq_jax import calibration
from dtq_jax import config_validation
from dtq_jax import errors
from dtq_jax import losses
from dtq_jax import quant
from dtq_jax import transfer
from dtq_jax.models import create_model
from dtq_jax.models.head import TargetHead

# Methods whose loss needs the teacher's forward pass.
_TEACHER_METHODS = ('dtq', 'delta')


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


@dataclasses.dataclass(frozen=True)
class Networks:
  """The Flax modules of one run.

  Attributes:
    student: quantized backbone (returns source logits and features).
    teacher: the same network at full precision.
    head: the target classifier.
    attention: the AFA attention modules (None unless the method is DTQ).
  """
  student: Any
  teacher: Any
  head: Any
  attention: Optional[Any]


def static_ranges(config):
  """Whether the run collects activation ranges and evaluates with them."""
  return config.quant.get('act_ranges', 'dynamic') == 'static'


def student_bits(config):
  """(bits_w, bits_a) of the student; 'fp' fine-tunes at full precision."""
  if config.method == 'fp':
    return quant.FULL_PRECISION, quant.FULL_PRECISION
  return config.bits_w, config.bits_a


def build_networks(config, num_classes, num_source_classes):
  """Creates the student, teacher, target head and attention modules.

  Args:
    config: the run config.
    num_classes: target classes.
    num_source_classes: outputs of the pretrained (source) classifier.

  Returns:
    A ``Networks``.
  """
  dtype = jnp.dtype(config.compute_dtype)
  # Same maths, different kernels: the teacher runs them too.
  conv_kwargs = dict(pointwise_as_dot=config.quant.pointwise_as_dot,
                     depthwise_as_shifts=config.quant.depthwise_as_shifts)
  kwargs = dict(config.get('model_kwargs', {}) or {})
  bits_w, bits_a = student_bits(config)
  student_conv_kwargs = dict(
      conv_kwargs,
      weight_range_axis=-1 if config.quant.per_channel_weights else None,
      range_grad=config.quant.range_grad,
      fused_vjp=config.quant.fused_vjp)
  if static_ranges(config):
    # Training stays dynamic (the paper's); these say how the collected
    # ranges follow the batches.
    student_conv_kwargs.update(range_stat=config.quant.range_stat,
                               range_momentum=config.quant.range_momentum)
  student = create_model(
      config.model, num_classes=num_source_classes, bits_w=bits_w,
      bits_a=bits_a, dtype=dtype, conv_kwargs=student_conv_kwargs, **kwargs)
  teacher = create_model(config.model, num_classes=num_source_classes,
                         dtype=dtype, conv_kwargs=conv_kwargs, **kwargs)
  head = TargetHead(num_classes, dropout_rate=student.dropout_rate)
  attention = None
  if config.method == 'dtq':
    attention = transfer.TransferAttention(
        uniform=config.dtq.attention == 'uniform')
  return Networks(student, teacher, head, attention)


def init_variables(model, rng, image_shape):
  """Random ``{'params', 'batch_stats'}`` of a model, initialised under jit.

  Eager initialisation compiles every operation separately, which takes
  several seconds even for the demo network.

  Args:
    model: a model of ``dtq_jax.models``.
    rng: PRNG key.
    image_shape: (H, W, C) of one input image.

  Returns:
    The variables as a dict.
  """
  images = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  return dict(jax.jit(functools.partial(model.init, train=False))(rng, images))


def init_params(nets, rng, image_shape, pretrained=None):
  """Initialises the trainable parameters and the student's batch stats.

  Args:
    nets: ``Networks``.
    rng: PRNG key.
    image_shape: (H, W, C) of one input image.
    pretrained: optional ``{'params', 'batch_stats'}`` of the backbone (the
      teacher's variables); the student starts from them.

  Returns:
    ``(params, batch_stats)``.
  """
  k_model, k_head, k_att = jax.random.split(rng, 3)
  if pretrained is None:
    variables = init_variables(nets.student, k_model, image_shape)
  else:
    # A copy: the student must not share (donated) buffers with the teacher.
    variables = jax.tree.map(jnp.array, dict(pretrained))
  # Only the shapes of the features matter for initialising the head and
  # the attention modules.
  images = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  _, feats = jax.eval_shape(functools.partial(nets.teacher.apply, train=False),
                            variables, images)
  zeros = lambda s: jnp.zeros(s.shape, jnp.float32)
  params = {
      'backbone': variables['params'],
      'head': jax.jit(nets.head.init)(k_head, zeros(feats['pooled']))['params'],
  }
  if nets.attention is not None:
    att = jax.jit(nets.attention.init)(k_att, [zeros(t) for t in feats['taps']])
    if 'params' in att:
      params['attention'] = att['params']
  return params, variables['batch_stats']


def _labels(params, classifier_name):
  """'frozen' for the source classifier, 'train' for everything else."""
  def label(path, _):
    keys = [getattr(p, 'key', None) for p in path]
    return 'frozen' if keys[:2] == ['backbone', classifier_name] else 'train'
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(config, params, classifier_name, steps_per_epoch,
                   num_epochs):
  """SGD with momentum, head-only weight decay, one step decay of the lr.

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
  tx = optax.multi_transform(
      {'train': train, 'frozen': optax.set_to_zero()},
      _labels(params, classifier_name))
  return tx, schedule


def _feature_extractor(backbone_params, classifier_name):
  return {k: v for k, v in backbone_params.items() if k != classifier_name}


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


def compute_losses(config, nets, params, batch_stats, images, labels, frozen,
                   dropout_rng, quant_ranges=None):
  """All loss terms of the configured method for one batch.

  Args:
    config: the run config.
    nets: ``Networks``.
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
    variables[calibration.RANGES] = quant_ranges
    mutable.append(calibration.RANGES)
  (source_logits, feats), new_state = nets.student.apply(
      variables, images, train=True, mutable=mutable,
      rngs={'dropout': k_model})
  logits = nets.head.apply({'params': params['head']}, feats['pooled'],
                           train=True, rngs={'dropout': k_head})
  terms = {'ce': losses.cross_entropy(logits, labels)}
  aux = {'logits': logits}
  if quant_ranges is not None:
    aux['quant_ranges'] = new_state[calibration.RANGES]
  method = config.method
  classifier = nets.student.classifier_name
  if method in _TEACHER_METHODS:
    teacher_logits, teacher_feats = nets.teacher.apply(
        frozen['teacher'], images, train=False)
  if method == 'dtq':
    c = config.dtq
    terms['kl'] = c.kl_weight * losses.kl_divergence(
        source_logits, teacher_logits, kl_temperature(config))
    if nets.attention is None or c.attention == 'uniform':
      weights = transfer.TransferAttention(uniform=True).apply(
          {}, teacher_feats['taps'])
    else:
      weights = nets.attention.apply({'params': params['attention']},
                                     teacher_feats['taps'])
    terms['afa'] = c.afa_weight * losses.afa_loss(
        teacher_feats['taps'], feats['taps'], weights,
        normalization=c.afa_normalization)
    aux['attention'] = weights
  elif method == 'delta':
    c = config.delta
    terms['delta'] = c.alpha * losses.delta_loss(
        teacher_feats['taps'], feats['taps'], frozen['delta_weights'])
    terms['head_l2'] = c.beta / 2 * losses.l2(params['head'])
  elif method in ('l2', 'l2sp'):
    c = config[method]
    extractor = _feature_extractor(params['backbone'], classifier)
    if method == 'l2':
      terms['l2'] = c.alpha / 2 * losses.l2(extractor)
    else:
      start = _feature_extractor(frozen['teacher']['params'], classifier)
      terms['l2sp'] = c.alpha / 2 * losses.l2_sp(extractor, start)
    terms['head_l2'] = c.beta / 2 * losses.l2(params['head'])
  total = sum(terms.values())
  return total, (terms, new_state['batch_stats'], aux)


def make_train_step(config, nets, tx):
  """Builds the pure train step ``(state, batch, frozen) -> (state, metrics)``.

  The step differentiates only the student's trainable parameters. A step
  whose loss or gradient is not finite leaves the state unchanged and counts
  itself in ``state.nonfinite_steps`` (the loop decides whether to stop).

  Args:
    config: the run config.
    nets: ``Networks``.
    tx: the optax transformation.

  Returns:
    The (unjitted) step function.
  """

  def train_step(state, batch, frozen):
    rng, dropout_rng = jax.random.split(state.rng)
    grad_fn = jax.value_and_grad(
        functools.partial(compute_losses, config, nets), has_aux=True)
    ranges = getattr(state, 'quant_ranges', None)
    (total, (terms, batch_stats, aux)), grads = grad_fn(
        state.params, state.batch_stats, batch['image'], batch['label'],
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
      metrics[f'attention_entropy_{i}'] = transfer.attention_entropy(w)
    return new_state, metrics

  return train_step


def make_eval_step(nets, act_ranges='dynamic'):
  """Builds ``(params, batch_stats, batch[, quant_ranges]) -> {'correct',
  'count', 'loss'}``.

  Padded rows (mask 0) are replaced by a copy of the batch's first row, which
  is always real: activation ranges are taken over the whole batch, and a
  duplicate of a real image leaves every min and max unchanged, so padding
  does not change any prediction.

  Args:
    nets: ``Networks``.
    act_ranges: 'dynamic' (paper) or 'static' (the step then takes the
      ``quant_ranges`` to quantize with).
  """
  student = calibration.with_act_ranges(nets.student, act_ranges)

  def eval_step(params, batch_stats, batch, quant_ranges=None):
    mask = batch['mask'].astype(bool)
    images = jnp.where(mask[:, None, None, None], batch['image'],
                       batch['image'][:1])
    variables = {'params': params['backbone'], 'batch_stats': batch_stats}
    if quant_ranges is not None:
      variables[calibration.RANGES] = quant_ranges
    _, feats = student.apply(variables, images, train=False)
    logits = nets.head.apply({'params': params['head']}, feats['pooled'])
    weights = mask.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         batch['label'])
    correct = (jnp.argmax(logits, -1) == batch['label']) & mask
    return {'correct': jnp.sum(correct), 'count': jnp.sum(weights),
            'loss': jnp.sum(ce * weights)}

  return eval_step


def schedule_lengths(config, num_train):
  """Steps per epoch, epochs and total steps of a run.

  The paper fixes 9000 iterations at batch 64 and converts them into whole
  epochs: ``epochs = round(total_steps * batch_size / N_train)``.

  Args:
    config: the run config.
    num_train: number of training images.

  Returns:
    ``(steps_per_epoch, num_epochs, total_steps)``.
  """
  # Imported lazily: input_pipeline pulls in TensorFlow.
  from dtq_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  # Every step sees a full batch (one compiled shape), so an epoch is
  # floor(N / B) steps; the remainder differs from epoch to epoch.
  steps_per_epoch = config.steps_per_epoch or input_pipeline.steps_per_epoch(
      num_train, config.batch_size)
  num_epochs = config.num_epochs or max(
      1, round(config.total_steps * config.batch_size / num_train))
  return steps_per_epoch, num_epochs, steps_per_epoch * num_epochs


# jaxlib 0.10 hands dots, reductions and convolutions to YNNPACK
# (DebugOptions.xla_cpu_experimental_ynn_fusion_type); 'eigen' keeps the first
# two and leaves convolutions to XLA's Eigen kernels. A compiler option replaces
# the whole list, so it names the two it keeps (measured in
# benchmarks/README.md: dropping them too is slower).
_YNN_ALL_BUT_CONVOLUTIONS = ('LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,'
                             'LIBRARY_FUSION_TYPE_REDUCE')


def compiler_options(config, backend=None):
  """XLA compiler options for the run's jitted functions.

  On XLA:CPU, YNNPACK's convolutions (jaxlib 0.10's default) run the 1x1 and
  56 px 3x3 convolutions of ResNet-50 1.5-4x slower than Eigen's on the
  2-core AVX-512 machines measured in benchmarks/; ``config.cpu_convolutions
  = 'eigen'`` (the default) selects Eigen. Other backends take no options.

  Args:
    config: the run config (``cpu_convolutions``: 'eigen', or
      'jaxlib_default' for no options).
    backend: platform name; default ``jax.default_backend()``.

  Returns:
    A dict for ``jax.jit(..., compiler_options=...)``, or None.

  Raises:
    ValueError: unknown ``config.cpu_convolutions``.
  """
  choice = config.get('cpu_convolutions', 'jaxlib_default')
  if choice not in config_validation.CPU_CONVOLUTIONS:
    raise ValueError(f'config.cpu_convolutions={choice!r}; allowed: '
                     f'{", ".join(config_validation.CPU_CONVOLUTIONS)}.')
  if (backend or jax.default_backend()) != 'cpu' or choice != 'eigen':
    return None
  return {'xla_cpu_experimental_ynn_fusion_type': _YNN_ALL_BUT_CONVOLUTIONS}


class Runtime:
  """The device mesh, its shardings and the XLA options of the run's jits."""

  def __init__(self, devices=None, compiler_options=None):  # pylint: disable=redefined-outer-name
    devices = jax.devices() if devices is None else devices
    self.mesh = jax.sharding.Mesh(np.array(devices), ('data',))
    self.replicated = jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec())
    self.batch = jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec('data'))
    self.is_main = jax.process_index() == 0
    self.compiler_options = compiler_options

  def jit(self, fn, **kwargs):
    """``jax.jit(fn, **kwargs)`` with the run's compiler options."""
    return jax.jit(fn, compiler_options=self.compiler_options, **kwargs)

  def jit_train_step(self, config, nets, tx):
    """The train step on this mesh: the state replicated and donated.

    Args:
      config: the run config.
      nets: the run's ``Networks``.
      tx: the optimizer.

    Returns:
      ``step(state, batch, frozen) -> (state, metrics)``, jitted.
    """
    return self.jit(
        make_train_step(config, nets, tx),
        in_shardings=(self.replicated, self.batch, self.replicated),
        out_shardings=(self.replicated, self.replicated),
        donate_argnums=(0,))

  def put_batch(self, local_batch):
    """Builds global arrays from this process's slice of a global batch."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch, x),
        local_batch)

  def replicate(self, tree):
    return jax.device_put(tree, self.replicated)


def _write_text_atomic(path, text):
  """Writes ``text`` under a temporary name, then renames it to ``path``."""
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def _write_json_atomic(path, obj):
  _write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True,
                                      default=float))


def _truncate_jsonl(path, last_step):
  """Keeps the records of ``path`` up to ``last_step`` (atomic rewrite)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= last_step:
        kept.append(line)
    except (ValueError, KeyError, TypeError):
      pass  # A line cut short by a kill.
  if len(kept) < len(lines):
    _write_text_atomic(path, ''.join(kept))


class _Logger:
  """TensorBoard events, metrics.jsonl and console, from process 0 only."""

  def __init__(self, workdir, enabled, start_step=0):
    """Opens the logs of a run that starts (or resumes) after ``start_step``.

    What an earlier attempt logged after ``start_step`` (the steps after its
    last checkpoint, which this run trains again) is dropped, so a resumed
    run's logs read as an uninterrupted run's.

    Args:
      workdir: the run's folder.
      enabled: whether this process logs (process 0).
      start_step: the restored checkpoint's step (0: a fresh start).
    """
    self.enabled = enabled
    if enabled:
      path = os.path.join(workdir, 'metrics.jsonl')
      _truncate_jsonl(path, start_step)
      # tensorboardX writes TensorBoard event files without TensorFlow's
      # tensorboard package; purge_step makes TensorBoard hide the earlier
      # attempt's events from that step on.
      self._writer = tensorboardX.SummaryWriter(workdir,
                                                purge_step=start_step + 1)
      self._jsonl = open(path, 'a')

  def write(self, step, scalars):
    if not self.enabled:
      return
    for k, v in scalars.items():
      self._writer.add_scalar(k, float(v), global_step=step)
    self._writer.flush()
    self._jsonl.write(json.dumps(dict(step=step, **{
        k: float(v) for k, v in scalars.items()})) + '\n')
    self._jsonl.flush()

  def close(self):
    if self.enabled:
      self._writer.close()
      self._jsonl.close()


class NonFiniteLossError(RuntimeError):
  """A loss term or the gradient became NaN or infinite."""


class Interrupted(Exception):
  """SIGTERM/SIGINT arrived; a checkpoint of the current step was written."""

  def __init__(self, message, signum):
    super().__init__(message)
    self.signum = signum


class _StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step.

  The step in flight finishes and is checkpointed. A second SIGINT aborts at
  once (Python's default KeyboardInterrupt). Handlers are only installed from
  the main thread (signal's rule) and are restored on exit.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    # The next SIGINT interrupts immediately.
    signal.signal(signal.SIGINT, signal.default_int_handler)

  def agreed(self):
    """The signal to stop on, as every process sees it, or None.

    A process stops only when all do: alone it would leave the others
    waiting in the next step's collectives (or the checkpoint's barriers)
    forever. With several processes this is a collective over all of them,
    so call it at the same steps everywhere; a process that was not
    signalled stops with SIGTERM's code.

    Returns:
      A signal number or None.
    """
    if jax.process_count() == 1:
      return self.signum
    flags = multihost_utils.process_allgather(
        np.int32(self.signum or 0))
    if not np.any(flags):
      return None
    return self.signum or signal.SIGTERM

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)


def _state_digest(state):
  """CRC-32 of every array of a TrainState (this process's copy), in order.

  Written into each checkpoint's meta and checked on restore: damage that
  still decodes (a flipped byte in an array file) is caught as well.
  """
  crc = 0
  for leaf in jax.tree.leaves(state):
    if isinstance(leaf, jax.Array):
      leaf = leaf.addressable_shards[0].data  # Replicated: the whole array.
    crc = zlib.crc32(np.ascontiguousarray(leaf).reshape(-1).view(np.uint8),
                     crc)
  return f'{crc:08x}'


def _restore_latest_good(ckpt, target):
  """Restores the newest intact checkpoint, reporting and deleting bad ones.

  Orbax writes a checkpoint under a temporary name and renames it when it is
  complete, so a kill during a write leaves no partial step. A step damaged
  afterwards (a truncated or corrupt file, a checksum that does not match)
  fails to restore and the previous one is used; the newer steps that failed
  are then moved out of the way (not deleted: the failure may not have been
  damage), so that training writes them again.

  Args:
    ckpt: the run's CheckpointManager.
    target: a TrainState with the expected structure.

  Returns:
    The restored Composite (``.state``, ``.meta``), or None if there is no
    checkpoint.

  Raises:
    UserError: checkpoints exist but none can be read.
  """
  steps = sorted(ckpt.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    try:
      restored = ckpt.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          meta=ocp.args.JsonRestore()))
      expected = restored.meta.get('state_crc32')
      if expected is not None and _state_digest(restored.state) != expected:
        raise ValueError('its arrays do not match the checksum saved with '
                         'them')
    except Exception as e:  # pylint: disable=broad-except
      print(f'warning: checkpoint {ckpt.directory}/{step} is unreadable '
            f'({type(e).__name__}: {str(e).strip().splitlines()[0][:200]}); '
            'trying the previous one.')
      continue
    if i:
      aside = _move_aside(ckpt, steps[:i])
      print(f'Moved the unreadable checkpoint(s) '
            f'{", ".join(map(str, steps[:i]))} to {aside}; training writes '
            'them again.')
    return restored
  if steps:
    raise errors.UserError(
        f'no readable checkpoint in {ckpt.directory}; move it away to start '
        'the run again.')
  return None


def _move_aside(ckpt, steps):
  """Moves checkpoint steps to ``<run>/unreadable_checkpoints/``.

  Args:
    ckpt: the CheckpointManager.
    steps: the steps to move.

  Returns:
    The folder they are in now.
  """
  directory = os.fspath(ckpt.directory)
  aside = os.path.join(os.path.dirname(directory.rstrip('/')),
                       'unreadable_checkpoints')
  if jax.process_index() == 0:
    os.makedirs(aside, exist_ok=True)
    stamp = time.strftime('%Y%m%d-%H%M%S')
    for step in steps:
      os.replace(os.path.join(directory, str(step)),
                 os.path.join(aside, f'{step}-{stamp}'))
  multihost_utils.sync_global_devices('dtq_jax unreadable checkpoints moved')
  ckpt.reload()
  return aside


# Orbax and TensorStore report a failed write (a full disk, a read-only
# folder) as ValueError('... [os_error_code=28]').
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


@contextlib.contextmanager
def _checkpoint_write_errors(directory):
  """Re-raises orbax's failed writes as the OSError they stand for."""
  try:
    yield
  except ValueError as e:
    match = _OS_ERROR_CODE.search(str(e))
    if match is None:
      raise
    code = int(match.group(1))
    raise OSError(code, f'{os.strerror(code)} (writing a checkpoint in '
                  f'{directory})') from e


def _settle_checkpoints(managers, exc_type, exc, tb):
  """On an error, lets checkpoint writes in flight finish (or fail) first.

  The last good checkpoint is then complete, and no orbax thread is still
  writing while the interpreter shuts down. A second Ctrl-C
  (KeyboardInterrupt) does not wait.
  """
  del exc, tb
  if exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
    for manager in managers:
      try:
        manager.wait_until_finished()
      except Exception:  # pylint: disable=broad-except
        pass  # The error being raised already says what went wrong.
  return False


def evaluate(eval_step, params, batch_stats, split, config, data, runtime,
             quant_ranges=None):
  """Accuracy (%) and mean CE on every example of ``split`` exactly once."""
  # Imported lazily: input_pipeline pulls in TensorFlow.
  from dtq_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  totals = None
  batches = input_pipeline.eval_batches(
      split, config.eval_batch_size, process_index=jax.process_index(),
      process_count=jax.process_count(), **data.eval_kwargs)
  for i, batch in enumerate(batches):
    if config.max_eval_batches and i >= config.max_eval_batches:
      break
    extra = () if quant_ranges is None else (quant_ranges,)
    out = eval_step(params, batch_stats, runtime.put_batch(batch), *extra)
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  count = max(float(totals['count']), 1.0)
  return {'accuracy': 100.0 * float(totals['correct']) / count,
          'loss': float(totals['loss']) / count, 'count': int(totals['count'])}


def _first_nonfinite(history):
  for step, m in history:
    if not m['finite']:
      bad = [k for k, v in m.items()
             if k.startswith('loss_') and not np.isfinite(v)]
      if not np.isfinite(m['grad_norm']) and not bad:
        bad = ['gradient']
      return step, bad or ['loss']
  return None


def train_and_evaluate(config, workdir, seed, data, teacher,
                       delta_weights=None):
  """Trains one student for one seed, resuming from ``workdir`` if possible.

  Args:
    config: the run config.
    workdir: folder of this run (checkpoints, events, metrics, result).
    seed: the seed of this run (initialisation, data order, dropout).
    data: a ``datasets.Data`` (splits and preprocessing).
    teacher: ``{'params', 'batch_stats'}`` of the pretrained network.
    delta_weights: per-map channel weights for DELTA.

  Returns:
    The run's result dict (also written to ``workdir/result.json``).

  Raises:
    NonFiniteLossError: a loss became non-finite and ``config.on_nonfinite``
      is 'stop'.
    Interrupted: SIGTERM/SIGINT; the current step was checkpointed.
  """
  from dtq_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  # Orbax takes only absolute checkpoint paths.
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  result_path = os.path.join(workdir, 'result.json')
  if os.path.exists(result_path):
    with open(result_path) as f:
      return json.load(f)
  runtime = Runtime(compiler_options=compiler_options(config))
  nets = build_networks(config, data.num_classes, num_source_classes(teacher))
  steps_per_epoch, num_epochs, total_steps = schedule_lengths(
      config, data.num_train)

  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
  params, batch_stats = init_params(nets, init_rng, data.image_shape, teacher)
  tx, schedule = make_optimizer(config, params, nets.student.classifier_name,
                                steps_per_epoch, num_epochs)
  fields = dict(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params), rng=state_rng,
      nonfinite_steps=jnp.zeros((), jnp.int32))
  if static_ranges(config):
    # Count 0 everywhere: the first training batch sets every range.
    state = StaticRangesTrainState(**fields, quant_ranges=(
        calibration.empty_ranges(nets.student, {
            'params': params['backbone'], 'batch_stats': batch_stats},
                                 data.image_shape)))
  else:
    state = TrainState(**fields)
  state = runtime.replicate(state)
  frozen = runtime.replicate({'teacher': teacher,
                              'delta_weights': delta_weights})

  ckpt = ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'), item_names=('state', 'meta'),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.keep_checkpoints, create=True))
  # Its own barrier names: with several processes, both managers saving the
  # same step at once would otherwise wait on the same orbax barriers.
  best_ckpt = ocp.CheckpointManager(
      os.path.join(workdir, 'best'), item_names=('state', 'meta'),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True,
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              barrier_sync_key_prefix='best')))
  meta = {'history': [], 'best_accuracy': -1.0, 'wall_time_s': 0.0}
  restored = _restore_latest_good(ckpt, state)
  if restored is not None:
    state, meta = restored.state, restored.meta
    print(f'Resuming {workdir} at step {int(state.step)}.')

  train_step = runtime.jit_train_step(config, nets, tx)
  eval_step = runtime.jit(make_eval_step(nets),
                          out_shardings=runtime.replicated)
  static_eval_step = runtime.jit(make_eval_step(nets, 'static'),
                                 out_shardings=runtime.replicated)
  start_step = int(state.step)
  batches = input_pipeline.train_batches(
      data.train, config.batch_size, seed=seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count(),
      **data.train_kwargs)

  def fetch_checked(pending):
    """Fetches pending step metrics; stops at a non-finite loss if asked."""
    history = [(s, jax.device_get(m)) for s, m in pending]
    bad = _first_nonfinite(history)
    if bad is not None and config.on_nonfinite == 'stop':
      raise NonFiniteLossError(
          f'non-finite {", ".join(bad[1])} at step {bad[0]}; the last good '
          f'checkpoint in {workdir}/checkpoints is intact. Run again with a '
          'lower --config.optim.lr, or --config.on_nonfinite=skip to skip '
          'such steps, in a new --workdir.')
    if bad is not None:
      skipped = [s for s, m in history if not m['finite']]
      bar.write(f'warning: skipped {len(skipped)} update(s) with a '
                f'non-finite loss or gradient (first: step {bad[0]}, '
                f'{", ".join(bad[1])}); '
                f'{int(jax.device_get(state.nonfinite_steps))} skipped so '
                'far.')
    return history

  def save(manager, step):
    saved_meta = dict(meta, state_crc32=_state_digest(state))
    with _checkpoint_write_errors(manager.directory):
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          meta=ocp.args.JsonSave(saved_meta)))

  def wait_for_saves():
    for manager in (ckpt, best_ckpt):
      with _checkpoint_write_errors(manager.directory):
        manager.wait_until_finished()

  def log_train(step, history, seconds):
    scalars = {k: np.mean([m[k] for _, m in history]) for k in history[0][1]}
    scalars.pop('finite')
    scalars['lr'] = float(schedule(step - 1))
    scalars['images_per_s'] = len(history) * config.batch_size / max(
        seconds, 1e-9)
    scalars['nonfinite_steps'] = int(jax.device_get(state.nonfinite_steps))
    logger.write(step, {f'train/{k}': v for k, v in scalars.items()})
    bar.set_postfix(loss=f'{scalars["loss"]:.3f}',
                    acc=f'{scalars["accuracy"]:.1f}')

  def log_eval(step, epoch):
    record = {'epoch': epoch, 'step': step}
    for name, split in (('val', data.val), ('test', data.test)):
      if split is not None:
        record[name] = evaluate(eval_step, state.params, state.batch_stats,
                                split, config, data, runtime)
        if static_ranges(config):
          # The run's accuracy is the static one; the paper's dynamic one is
          # kept beside it.
          record[f'{name}_dynamic'] = record[name]
          record[name] = evaluate(static_eval_step, state.params,
                                  state.batch_stats, split, config, data,
                                  runtime, quant_ranges=state.quant_ranges)
          logger.write(step, {f'{name}_dynamic/{k}': v for k, v in
                              record[f'{name}_dynamic'].items()})
        logger.write(step, {f'{name}/{k}': v for k, v in record[name].items()})
    meta['history'].append(record)
    bar.write(f'epoch {epoch}/{num_epochs}: test accuracy '
              f'{record["test"]["accuracy"]:.2f}%')
    return record['val' if data.val is not None else 'test']['accuracy']

  logger = _Logger(workdir, runtime.is_main, start_step)
  bar = tqdm(total=total_steps, initial=start_step, disable=not runtime.is_main,
             desc=os.path.basename(workdir.rstrip('/')), dynamic_ncols=True,
             mininterval=2.0)
  # Metrics stay on the device until a log, evaluation or checkpoint point,
  # so the loop only enqueues work and never waits for a step to finish.
  pending, t_start, t_log = [], time.time(), time.time()
  with contextlib.ExitStack() as stack:
    stack.callback(logger.close)
    stack.callback(bar.close)
    stop = stack.enter_context(_StopRequest())
    stack.push(functools.partial(_settle_checkpoints, (ckpt, best_ckpt)))
    for step in range(start_step + 1, total_steps + 1):
      state, metrics = train_step(state, runtime.put_batch(next(batches)),
                                  frozen)
      pending.append((step, metrics))
      bar.update(1)
      epoch, in_epoch = divmod(step, steps_per_epoch)
      do_eval = not in_epoch and (epoch % config.eval_every_epochs == 0 or
                                  step == total_steps)
      do_save = do_eval or bool(config.checkpoint_every_steps and
                                step % config.checkpoint_every_steps == 0)
      # Read once: a signal during this step's logging or saving is acted on
      # after the next step, so a stop always comes with its checkpoint.
      # Several processes agree at log and save points only (a collective).
      stopping = None
      if jax.process_count() == 1 or do_save or not (
          step % config.log_every_steps):
        stopping = stop.agreed()
      do_save = do_save or stopping is not None
      if step % config.log_every_steps and not do_save:
        continue
      log_train(step, fetch_checked(pending), time.time() - t_log)
      pending, t_log = [], time.time()
      if do_eval:
        accuracy = log_eval(step, epoch)
        if accuracy > meta['best_accuracy']:
          meta['best_accuracy'] = accuracy
          save(best_ckpt, step)
          # A checkpoint of this step must imply its best checkpoint.
          with _checkpoint_write_errors(best_ckpt.directory):
            best_ckpt.wait_until_finished()
      if do_save:
        meta['wall_time_s'] += time.time() - t_start
        t_start = time.time()
        save(ckpt, step)
      if stopping is not None:
        wait_for_saves()
        cause = signal.Signals(stopping).name + (
            '' if stop.signum else ' on another process')
        raise Interrupted(
            f'{cause}: stopped after step {step} and saved a checkpoint in '
            f'{workdir}/checkpoints; rerun the same command to resume.',
            stopping)
    wait_for_saves()
  result = _result(meta, seed, int(state.step),
                   int(jax.device_get(state.nonfinite_steps)))
  if runtime.is_main:
    _write_json_atomic(result_path, result)
  return result


def num_source_classes(teacher):
  """Outputs of the pretrained network's source classifier."""
  for name in ('fc', 'classifier_1'):
    if name in teacher['params']:
      return teacher['params'][name]['kernel'].shape[-1]
  raise ValueError('the pretrained variables have no source classifier '
                   "('fc' or 'classifier_1').")


def _result(meta, seed, steps, nonfinite_steps):
  """Final and best test accuracy of one run from its epoch history."""
  history = meta['history']
  tests = [r['test']['accuracy'] for r in history]
  best = int(np.argmax(tests))
  result = {
      'seed': seed,
      'steps': steps,
      'epochs': len(history),
      'final_test_accuracy': tests[-1],
      'best_test_accuracy': tests[best],
      'best_epoch': history[best]['epoch'],
      'wall_time_s': meta['wall_time_s'],
      'nonfinite_steps': nonfinite_steps,
      'history': history,
  }
  if 'test_dynamic' in history[-1]:
    result['final_test_accuracy_dynamic'] = history[-1]['test_dynamic'][
        'accuracy']
  if 'val' in history[-1]:
    vals = [r['val']['accuracy'] for r in history]
    result['test_accuracy_at_best_val'] = tests[int(np.argmax(vals))]
  return result


def restore_params(workdir, best=False):
  """Trained ``{'params', 'batch_stats'}`` of a run's latest (or best) state.

  Args:
    workdir: the run folder given to ``train_and_evaluate``.
    best: take the best checkpoint instead of the latest.

  Returns:
    Nested dicts of arrays.
  """
  mngr = ocp.CheckpointManager(
      os.path.abspath(
          os.path.join(workdir, 'best' if best else 'checkpoints')),
      item_names=('state', 'meta'),
      options=ocp.CheckpointManagerOptions(read_only=True))
  # A checkpoint written on other devices (e.g. by a multi-process run)
  # restores onto this process's first device.
  restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(
          fallback_sharding=jax.sharding.SingleDeviceSharding(
              jax.local_devices()[0]))))
  return {k: restored.state[k] for k in ('params', 'batch_stats')}
