"""DELTA's fixed channel weights (Li et al., ICLR 2019), as DELTA-Q uses them.

docs/method.md ("DELTA-Q") weights the channels of each tapped map by how
much the full-precision network needs them on the target task. The defaults
(``DEFAULTS``) are those of DELTA's reference code (lixingjian/DELTA:
``channel_eval.py`` and the ``run.sh`` that calls it):

1. a new head (``TargetHead``, with the network's dropout) is trained on top of
   the network, whose weights stay frozen, for ``head_epochs`` epochs of the
   augmented training stream in batches of ``batch_size``: SGD, lr
   ``head_lr``, momentum ``head_momentum``, weight decay ``head_weight_decay``
   (PyTorch style: added to the gradient before the momentum, on the head's
   weight and bias), lr decayed by ``head_lr_decay_factor`` every
   ``head_lr_decay_epochs`` epochs::

     lr(step) = head_lr * head_lr_decay_factor ** (epoch / head_lr_decay_epochs)

   with ``epoch`` the integer epoch of the step (``head_lr_staircase=True``,
   the reference's ``ExponentialLR(gamma = 0.1 ** (1 / 6))`` stepped once per
   epoch) or the fractional ``step / steps_per_epoch`` (``False``: one decay
   per update). ``head_batch_norm`` is the network's BatchNorm mode meanwhile:
   ``'train'`` (the reference's ``model.train()``): batch statistics, and the
   running statistics follow the target's batches (momentum 0.1 in PyTorch's
   convention, as everywhere in this project); ``'frozen'``: inference mode,
   the pretrained running statistics, unchanged.
2. with the network (its running statistics as step 1 left them) and the
   trained head in inference mode, on the next ``num_batches`` batches of the
   same augmented training stream (the first batches of the epoch that
   follows the head training: the reference code starts a new pass of its
   shuffled loader), for every tapped convolution and every output channel
   c, the filter of c is zeroed (``kernel[..., c] = 0``) and the rise of the
   batch-mean cross-entropy over that of the unmodified network is measured;
   the rises are averaged over the batches.
3. per map, the rises are standardised (population std, ``np.std``, as the
   reference code) and ``softmax(z / temperature)`` over the channels gives
   the weights. If all rises of a map are equal (std 0) z is taken as 0: the
   weights are uniform.

The tapped convolutions are those whose outputs are the models' transfer taps:
for ResNets the last convolution (``conv3`` in bottlenecks, ``conv2`` in basic
blocks) of the last block of each of the four stages; for MobileNetV2 the
projection convolution of the blocks whose projection BatchNorm output is the
tap (zeroing a filter there makes that channel of the tapped BN output a
constant, the BN shift).

All rises of one tapped convolution come from one jitted function that takes
the channel as a traced index (``kernel * (1 - one_hot(c))``) and maps over the
channels with ``lax.map``: it compiles once per tapped convolution, never per
channel. Nothing is sharded: host or single-device variables run on the
default device, with whole batches; under several processes every process
computes the same weights from the same stream.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dtq_jax.infra import files
from dtq_jax.method import losses
from dtq_jax.models.head import TargetHead
from dtq_jax.models import mobilenet_v2
from dtq_jax.models.mobilenet_v2 import MobileNetV2
from dtq_jax.models import MODEL_NAMES
from dtq_jax.models import own_network
from dtq_jax.models.resnet import ResNet

# config.delta fields of the channel-weight computation, with their
# defaults: DELTA's reference code (lixingjian/DELTA, channel_eval.py and
# run.sh; docs/method.md, DELTA-Q, lists what was verified there). Other
# fields of config.delta (alpha, beta) are the loss weights and are not read
# here.
DEFAULTS = dict(
    head_epochs=10,  # epochs of head training (channel_eval.py num_epochs).
    head_lr=0.01,  # initial learning rate of the head (run.sh --lr_init).
    head_momentum=0.9,  # SGD momentum.
    head_weight_decay=1e-4,  # on the head's weight and bias.
    head_lr_decay_epochs=6.0,  # the lr falls by head_lr_decay_factor ...
    head_lr_decay_factor=0.1,  # ... every head_lr_decay_epochs epochs,
    head_lr_staircase=True,  # ... stepped once per epoch (ExponentialLR).
    # The network's BatchNorm while the head trains: 'train' (model.train():
    # batch statistics; the running statistics adapt to the target and are
    # those the rises are measured with) or 'frozen' (inference mode, the
    # pretrained statistics).
    head_batch_norm='train',
    batch_size=32,  # of head training and rise batches (run.sh); 0 = the
    # run's batch_size.
    num_batches=4,  # training batches the rises are averaged over.
    temperature=5.0,  # softmax(z / temperature) of the standardised rises.
)
# Values of head_batch_norm.
BATCH_NORM_MODES = ('train', 'frozen')

_RESNET_BLOCK = re.compile(r'^layer(\d+)_(\d+)$')
_PROJECTION = re.compile(r'^conv_(\d+)$')


def settings(config=None):
  """The channel-weight settings: ``DEFAULTS`` overridden by ``config``.

  Args:
    config: ``config.delta`` (a ConfigDict or dict), or None for the defaults.
      Fields other than those of ``DEFAULTS`` are ignored.

  Returns:
    A dict with every key of ``DEFAULTS``.

  Raises:
    ValueError: a value out of range.
  """
  s = dict(DEFAULTS)
  if config is not None:
    s.update({k: config[k] for k in DEFAULTS if k in config})
  for key in ('head_epochs', 'num_batches'):
    if isinstance(s[key], bool) or int(s[key]) != s[key] or s[key] < 1:
      raise ValueError(f'delta.{key}={s[key]!r}; allowed: an integer >= 1.')
    s[key] = int(s[key])
  for key in ('head_lr', 'head_lr_decay_epochs', 'head_lr_decay_factor',
              'temperature'):
    if not s[key] > 0:
      raise ValueError(f'delta.{key}={s[key]!r}; allowed: a number > 0.')
  for key in ('head_momentum', 'head_weight_decay'):
    if not s[key] >= 0:
      raise ValueError(f'delta.{key}={s[key]!r}; allowed: a number >= 0.')
  if (isinstance(s['batch_size'], bool) or int(s['batch_size']) !=
      s['batch_size'] or s['batch_size'] < 0):
    raise ValueError(f'delta.batch_size={s["batch_size"]!r}; allowed: an '
                     'integer >= 1, or 0 for the run\'s batch_size.')
  s['batch_size'] = int(s['batch_size'])
  if s['head_batch_norm'] not in BATCH_NORM_MODES:
    raise ValueError(f'delta.head_batch_norm={s["head_batch_norm"]!r}; '
                     f'allowed: {", ".join(BATCH_NORM_MODES)}.')
  s['head_lr_staircase'] = bool(s['head_lr_staircase'])
  return s


# Tapped convolutions.


def _family(model_name):
  if model_name == 'small_resnet' or re.fullmatch(r'resnet\d*', model_name):
    return 'resnet'
  if model_name == 'mobilenet_v2':
    return 'mobilenet_v2'
  raise ValueError(f'Unknown model {model_name!r}; allowed: '
                   f'{", ".join(MODEL_NAMES)}.')


def _model_name(model):
  """The family name of a model module (for ``tapped_convolutions``)."""
  if isinstance(model, ResNet):
    return 'resnet'
  if isinstance(model, MobileNetV2):
    return 'mobilenet_v2'
  raise ValueError(f'DELTA channel weights need a ResNet or MobileNetV2, got '
                   f'{type(model).__name__}.')


def _filter_paths(model, params):
  """Param-tree paths of the layers whose filters make the tapped maps."""
  if not isinstance(model, own_network.OwnNetwork):
    return tapped_convolutions(_model_name(model), params)
  for tap, path in zip(model.plan.taps, model.plan.tap_filters):
    if path is None:
      raise ValueError(f'DELTA: no Conv or Dense layer at or inside the tap '
                       f'{tap!r} outputs its channels, so it has no filters '
                       'to remove; tap a module that ends with one.')
  return [tuple(path.split(own_network.SEP))
          for path in model.plan.tap_filters]


def tapped_convolutions(model_name, params):
  """Param-tree paths of the convolutions behind the four tapped maps.

  Args:
    model_name: a ``create_model`` name (``'resnet50'``, ``'small_resnet'``,
      ``'mobilenet_v2'``, ...; ``'resnet'`` for any ResNet).
    params: the model's ``'params'`` collection.

  Returns:
    Four tuples of keys, in the order of ``features['taps']``; each names a
    convolution module (``params[k0][k1]['kernel']`` is its HWIO kernel):
    ResNets: the last convolution of the last block of stages 1-4 (e.g.
    ``('layer4_2', 'conv3')`` in ResNet-50); MobileNetV2: the projection
    convolution of each tapped block (``('features_5', 'conv_2')``, ...).

  Raises:
    ValueError: unknown model, or params that lack the expected modules.
  """
  if _family(model_name) == 'resnet':
    last = {}
    for key in params:
      m = _RESNET_BLOCK.match(key)
      if m:
        stage, block = int(m.group(1)), int(m.group(2))
        last[stage] = max(last.get(stage, -1), block)
    if sorted(last) != [1, 2, 3, 4]:
      raise ValueError(f'{model_name}: expected blocks layer1_* .. layer4_* '
                       f'in params, found stages {sorted(last)}.')
    paths = []
    for stage in (1, 2, 3, 4):
      block = f'layer{stage}_{last[stage]}'
      # Bottlenecks end with conv3, basic blocks with conv2.
      conv = 'conv3' if 'conv3' in params[block] else 'conv2'
      if 'kernel' not in params[block].get(conv, {}):
        raise ValueError(f'{model_name}: {block} has no {conv} kernel.')
      paths.append((block, conv))
    return paths
  paths = []
  for index in mobilenet_v2.TAPPED_BLOCKS:
    block = f'features_{index}'
    if block not in params:
      raise ValueError(f'{model_name}: {block} missing from params.')
    # The projection is the only conv_N holding a kernel itself (conv_N_0 are
    # the expansion / depthwise convolutions, conv_N_1 and the last conv_N
    # BatchNorms).
    convs = sorted((int(_PROJECTION.match(k).group(1)), k)
                   for k, v in params[block].items()
                   if _PROJECTION.match(k) and 'kernel' in v)
    if len(convs) != 1:
      raise ValueError(f'{model_name}: expected one projection convolution in '
                       f'{block}, found {[k for _, k in convs]}.')
    paths.append((block, convs[0][1]))
  return paths


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _replace(tree, path, value):
  """A copy of nested dict ``tree`` with the leaf at ``path`` replaced."""
  if not path:
    return value
  new = dict(tree)
  new[path[0]] = _replace(tree[path[0]], path[1:], value)
  return new


# Step 1: a head on the network, whose weights stay frozen.


def head_lr_schedule(s, steps_per_epoch):
  """The head's learning rate as a function of the update count."""
  def schedule(count):
    epoch = count / steps_per_epoch
    if s['head_lr_staircase']:
      epoch = jnp.floor(epoch)
    return s['head_lr'] * s['head_lr_decay_factor'] ** (
        epoch / s['head_lr_decay_epochs'])
  return schedule


def _head_optimizer(s, steps_per_epoch):
  # PyTorch's SGD adds weight_decay * w to the gradient before the momentum.
  return optax.chain(
      optax.add_decayed_weights(s['head_weight_decay']),
      optax.sgd(head_lr_schedule(s, steps_per_epoch),
                momentum=s['head_momentum'] or None))


def _logits(model, head, variables, head_params, images):
  """Target logits of the network in inference mode plus the head."""
  _, feats = model.apply(variables, images, train=False)
  pooled = jax.lax.stop_gradient(feats['pooled'])
  return head.apply({'params': head_params}, pooled, train=False)


def make_head_step(model, head, tx, batch_norm='frozen'):
  """The jitted step of head training (step 1).

  ``step(head_params, opt_state, batch_stats, frozen, images, labels, rng)``
  returns ``(head_params, opt_state, batch_stats, loss)``; ``frozen`` holds
  the network's other variables (``{'params': ...}``), never updated. With
  ``batch_norm='train'`` the network runs in training mode: BatchNorm
  normalises with the batch's statistics and the returned ``batch_stats`` are
  the running statistics updated by this batch (MobileNetV2's own dropout,
  which feeds only its source classifier, draws from ``rng`` too); with
  ``'frozen'`` it runs in inference mode and ``batch_stats`` come back
  unchanged. The head parameters and the optimizer state are donated.
  """
  if batch_norm not in BATCH_NORM_MODES:
    raise ValueError(f'batch_norm={batch_norm!r}; allowed: '
                     f'{", ".join(BATCH_NORM_MODES)}.')

  def step(head_params, opt_state, batch_stats, frozen, images, labels, rng):
    variables = dict(frozen, batch_stats=batch_stats)
    if batch_norm == 'train':
      (_, feats), state = model.apply(
          variables, images, train=True, mutable=['batch_stats'],
          rngs={'dropout': jax.random.fold_in(rng, 1)})
      batch_stats = state['batch_stats']
    else:
      _, feats = model.apply(variables, images, train=False)
    pooled = jax.lax.stop_gradient(feats['pooled'])

    def loss_fn(p):
      logits = head.apply({'params': p}, pooled, train=True,
                          rngs={'dropout': rng})
      return losses.cross_entropy(logits, labels)
    loss, grads = jax.value_and_grad(loss_fn)(head_params)
    updates, opt_state = tx.update(grads, opt_state, head_params)
    return (optax.apply_updates(head_params, updates), opt_state, batch_stats,
            loss)
  return jax.jit(step, donate_argnums=(0, 1))


def train_head(model, head, variables, batches, s, steps_per_epoch, rng):
  """Trains a fresh ``head`` on the network, whose weights stay frozen.

  Step 1; ``s['head_batch_norm']`` says whether the network's BatchNorm runs
  in training mode (its running statistics then follow the batches) or in
  inference mode.

  Args:
    model: the full-precision network.
    head: a ``TargetHead``.
    variables: the network's ``{'params', 'batch_stats'}`` (not modified).
    batches: iterator of ``{'image', 'label'}`` training batches; exactly
      ``head_epochs * steps_per_epoch`` are taken.
    s: ``settings(...)``.
    steps_per_epoch: updates per epoch.
    rng: PRNG key (head initialisation and dropout).

  Returns:
    ``(head_params, variables, epoch_losses)``: the trained head, the
    network's variables after the head training (new running statistics
    with ``'train'``, the given ones with ``'frozen'``) and the mean training
    cross-entropy of every epoch.
  """
  # On the device once, not copied from the host at every step.
  variables = jax.device_put(variables)
  frozen = {k: v for k, v in variables.items() if k != 'batch_stats'}
  batch_stats = variables.get('batch_stats', {})
  init_rng, dropout_rng = jax.random.split(rng)
  first = next(batches)
  pooled = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False)[1]['pooled'], variables,
      jax.ShapeDtypeStruct(first['image'].shape, jnp.float32))
  head_params = head.init(init_rng, jnp.zeros(pooled.shape,
                                              pooled.dtype))['params']
  tx = _head_optimizer(s, steps_per_epoch)
  opt_state = tx.init(head_params)
  step = make_head_step(model, head, tx, s['head_batch_norm'])
  epoch_losses, batch = [], first
  for epoch in range(s['head_epochs']):
    total = 0.0
    for i in range(steps_per_epoch):
      if batch is None:
        batch = next(batches)
      n = epoch * steps_per_epoch + i
      head_params, opt_state, batch_stats, loss = step(
          head_params, opt_state, batch_stats, frozen, batch['image'],
          batch['label'], jax.random.fold_in(dropout_rng, n))
      total += loss
      batch = None
    epoch_losses.append(float(total) / steps_per_epoch)
  return head_params, dict(variables, batch_stats=batch_stats), epoch_losses


# Step 2: rise of the cross-entropy when a filter is removed.


def _rises(model, head, variables, head_params, images, labels, path):
  """(base CE, (C,) rises of the batch-mean CE) for the conv at ``path``."""
  params = variables['params']
  kernel_path = tuple(path) + ('kernel',)
  kernel = _get(params, kernel_path)
  num_channels = kernel.shape[-1]

  def per_example_ce(p):
    logits = _logits(model, head, dict(variables, params=p), head_params,
                     images)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels)

  base = per_example_ce(params)

  def rise(c):
    keep = 1 - jax.nn.one_hot(c, num_channels, dtype=kernel.dtype)
    ce = per_example_ce(_replace(params, kernel_path, kernel * keep))
    # mean(ce_c) - mean(ce_0), taken per example first (fewer cancellations).
    return jnp.mean(ce - base)

  return jnp.mean(base), jax.lax.map(rise, jnp.arange(num_channels))


def make_rise_fn(model, head):
  """The jitted ``(variables, head_params, images, labels, path) -> ...``.

  ``path`` (a tuple from ``tapped_convolutions``) is static: the function
  compiles once per tapped convolution; the channel is a traced index mapped
  over with ``lax.map``. It returns ``(base_ce, rises)``: the batch-mean
  cross-entropy of the unmodified network and the (C,) rises of it when the
  filter of each output channel is zeroed. The layers before the tapped
  convolution do not depend on the channel, and XLA hoists them out of the
  loop (on XLA:CPU a channel of the last tap costs a small fraction of a
  forward pass).
  """
  return jax.jit(functools.partial(_rises, model, head),
                 static_argnames=('path',))


def filter_removal_rises(model, head, variables, head_params, batches, paths,
                         rise_fn=None):
  """Mean rise of the cross-entropy per removed filter (step 2).

  Args:
    model: the frozen network.
    head: its ``TargetHead``.
    variables: the network's ``{'params', 'batch_stats'}``.
    head_params: the trained head's parameters.
    batches: a list of ``{'image', 'label'}`` batches.
    paths: convolution paths (``tapped_convolutions``).
    rise_fn: a ``make_rise_fn(model, head)`` to reuse (made if None).

  Returns:
    ``(rises, base_ce)``: a list with one float64 (C,) array per path, the
    rises averaged over the batches, and the unmodified batch-mean
    cross-entropy of every batch.
  """
  rise_fn = rise_fn or make_rise_fn(model, head)
  variables = jax.device_put(variables)
  sums = [None] * len(paths)
  base_ce = []
  for batch in batches:
    for k, path in enumerate(paths):
      base, rises = rise_fn(variables, head_params, batch['image'],
                            batch['label'], path=tuple(path))
      rises = np.asarray(jax.device_get(rises), np.float64)
      sums[k] = rises if sums[k] is None else sums[k] + rises
    base_ce.append(float(base))
  return [total / len(batches) for total in sums], base_ce


# Step 3: rises -> weights.


def weights_from_rises(rises, temperature=DEFAULTS['temperature']):
  """``softmax(z / temperature)`` of the standardised rises of one map.

  Args:
    rises: (C,) rises of the cross-entropy.
    temperature: the softmax temperature.

  Returns:
    (C,) float32 weights summing to one; uniform when all rises are equal.
  """
  r = np.asarray(rises, np.float64)
  std = r.std()
  z = (r - r.mean()) / std if std > 0 else np.zeros_like(r)
  z = z / temperature
  e = np.exp(z - z.max())
  return (e / e.sum()).astype(np.float32)


# The whole computation.


def channel_weights(model, variables, data, config=None, *, batch_size=None,
                    seed, num_classes=None, return_diagnostics=False):
  """DELTA's per-channel weights of the four tapped maps (docs/method.md).

  Args:
    model: the frozen full-precision network (a ``create_model`` ResNet or
      MobileNetV2 with ``bits_w = bits_a = 32``; the teacher).
    variables: its ``{'params', 'batch_stats'}`` (host or single-device
      arrays; not modified: with ``head_batch_norm='train'`` the adapted
      running statistics are a copy).
    data: the target task's ``datasets.Data``: ``data.train_batches`` gives
      the augmented training stream.
    config: ``config.delta`` (see ``DEFAULTS``), or None for the defaults.
    batch_size: the run's batch size, used for head training and the rise
      batches where ``config.batch_size`` is 0 (by default the settings'
      batch size, the reference's 32, is used).
    seed: seed of the training stream (order and augmentation), the head's
      initialisation and its dropout.
    num_classes: classes of the new head (default ``data.num_classes``).
    return_diagnostics: also return a dict of intermediate values.

  Returns:
    A list of four float32 numpy arrays, the (C,) weights of each tapped map
    in the order of ``features['taps']`` (each sums to one). With
    ``return_diagnostics``, ``(weights, diagnostics)`` where diagnostics holds
    ``paths``, ``rises`` (float64 arrays), ``base_ce`` (per rise batch),
    ``head_epoch_losses``, ``batch_size``, ``steps_per_epoch`` and
    ``batch_stats`` (the running statistics the rises were measured with).

  Raises:
    ValueError: bad settings, no batch size, an unsupported model, or a
      split smaller than one batch.
    FloatingPointError: a non-finite head loss or rise.
  """
  s = settings(config)
  if s['batch_size']:
    batch_size = s['batch_size']
  elif not batch_size:
    raise ValueError('delta.batch_size=0 asks for the run\'s batch size, but '
                     'none was given.')
  paths = _filter_paths(model, variables['params'])
  num_classes = num_classes or data.num_classes
  head = TargetHead(num_classes, dropout_rate=model.dropout_rate)
  steps_per_epoch = data.steps_per_epoch(batch_size)
  # One stream: head training, then the first batches of the next epoch.
  batches = data.train_batches(batch_size, seed=seed)
  head_params, variables, epoch_losses = train_head(
      model, head, variables, batches, s, steps_per_epoch,
      jax.random.PRNGKey(seed))
  if not np.all(np.isfinite(epoch_losses)):
    raise FloatingPointError(f'DELTA head training diverged: epoch losses '
                             f'{epoch_losses}; lower delta.head_lr.')
  rise_batches = [next(batches) for _ in range(s['num_batches'])]
  rises, base_ce = filter_removal_rises(model, head, variables, head_params,
                                        rise_batches, paths)
  for path, r in zip(paths, rises):
    if not np.all(np.isfinite(r)):
      raise FloatingPointError(f'non-finite cross-entropy rise removing a '
                               f'filter of {"/".join(path)}.')
  weights = [weights_from_rises(r, s['temperature']) for r in rises]
  if not return_diagnostics:
    return weights
  return weights, {'paths': paths, 'rises': rises, 'base_ce': base_ce,
                   'head_epoch_losses': epoch_losses,
                   'batch_size': batch_size,
                   'steps_per_epoch': steps_per_epoch,
                   'batch_stats': jax.device_get(variables['batch_stats'])}


# Caching.


def save_weights(path, weights):
  """Writes the per-map weights to ``path`` (.npz, no pickle) atomically."""
  arrays = {f'map_{i}': np.asarray(w, np.float32)
            for i, w in enumerate(weights)}
  with files.atomic_path(path) as tmp:
    # A file object: np.savez would append '.npz' to a name.
    with open(tmp, 'wb') as f:
      np.savez(f, **arrays)


def load_weights(path):
  """Reads what ``save_weights`` wrote: a list of float32 (C,) arrays.

  Raises:
    ValueError: the file does not hold maps map_0 .. map_{n-1}.
  """
  with np.load(path, allow_pickle=False) as z:
    names = set(z.files)
    expected = {f'map_{i}' for i in range(len(names))}
    if not names or names != expected:
      raise ValueError(f'{path} does not hold DELTA channel weights '
                       f'(arrays: {sorted(names)}).')
    return [z[f'map_{i}'] for i in range(len(names))]
