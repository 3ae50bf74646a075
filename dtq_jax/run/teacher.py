"""The frozen full-precision teacher: published weights, or trained once.

``load_teacher`` gives the variables a run starts from and distils from:
torchvision's weights (``config.pretrained``: 'torchvision' or a file), a
random network ('none'), or, for the demo ('source_task'), the network
trained by the project's own trainer on the source task and cached under the
cache root's ``teachers/``, keyed by everything its training reads.
"""

import contextlib
import hashlib
import json
import os

from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from dtq_jax.data import datasets
from dtq_jax.infra import caches
from dtq_jax.infra import errors
from dtq_jax.infra import files
from dtq_jax.infra import locks
from dtq_jax.method import networks
from dtq_jax.models import own_network
from dtq_jax.run import checkpoints
from dtq_jax.run import run_result
from dtq_jax.run import saved_configs
from dtq_jax.run import train
from dtq_jax.weights import conversion
from dtq_jax.weights import flax_checkpoint
from dtq_jax.weights import pretrained


def load_teacher(config, data):
  """The frozen full-precision network's variables (the student's start).

  Args:
    config: the run config.
    data: the loaded ``datasets.Data``.

  Returns:
    ``{'params', 'batch_stats'}`` for ``create_model(config.model)``.
  """
  if config.pretrained == 'source_task':
    return train_source_teacher(config, data)
  if config.pretrained == 'none':
    model = networks.create_backbone(config, _RANDOM_SOURCE_CLASSES,
                                     data.image_shape)
    return networks.init_variables(model, jax.random.PRNGKey(config.seed),
                                   data.image_shape)
  if own_network.is_import_path(config.model):
    return _own_network_weights(config, data)
  channels = data.image_shape[-1] if data is not None else None
  if channels not in (None, conversion.INPUT_CHANNELS):
    raise errors.ConfigError(
        'pretrained', config.pretrained,
        f'its weights take {conversion.INPUT_CHANNELS}-channel (RGB) '
        f'images, but dataset.name={config.dataset.name!r} gives '
        f'{channels}-channel ones; use pretrained=none or RGB images.')
  with errors.user_errors(f'pretrained={config.pretrained!r}'):
    return pretrained.load_pretrained(
        config.model, config.pretrained,
        cache_dir=os.path.join(caches.root(config), 'pretrained'))


# A random network's source classifier: ImageNet's width, as torchvision's.
_RANDOM_SOURCE_CLASSES = 1000


def _own_network_weights(config, data):
  """A user's network's variables from its own Flax checkpoint."""
  if config.pretrained == 'torchvision':
    raise errors.ConfigError(
        'pretrained', config.pretrained,
        f'torchvision has no weights for model={config.model!r}; give its '
        'Flax checkpoint (an orbax folder, .msgpack or .safetensors), '
        "'source_task' or 'none'.")
  probe = networks.create_backbone(config, 1, data.image_shape)
  classes = flax_checkpoint.output_width(config.pretrained,
                                         probe.classifier_name)
  model = networks.create_backbone(config, classes, data.image_shape)
  images = jax.ShapeDtypeStruct((1,) + tuple(data.image_shape), jnp.float32)
  expected = jax.eval_shape(
      lambda x: model.init(jax.random.PRNGKey(0), x, train=False), images)
  variables = flax_checkpoint.load_variables(config.pretrained, expected)
  # A network without BatchNorm has no statistics (see init_variables).
  variables.setdefault('batch_stats', {})
  return variables


# Fields the students read but the teacher's training does not: the teacher
# is trained once for all of them.
_STUDENT_ONLY = ('pretrain', 'compare_methods', 'repeats', 'cache_dir', 'l2',
                 'l2sp', 'delta')
# Fields of config.dataset that only choose the target task's images when the
# source task is Fashion-MNIST's other classes (split 'out_of_domain').
_TARGET_ONLY = ('target_classes', 'shots_per_class', 'data_seed',
                'train_per_class', 'test_per_class', 'val_fraction')
# Fields of config.quant that only a quantized student reads (the learned
# quantizers'): the full-precision teacher is the same whatever they are, and
# leaving them out keeps the cache entries written before they existed.
_QUANTIZER_ONLY = ('method', 'lsq_lr_scale')
# Fields that change how fast a run goes, not what it computes: leaving them
# out keeps the cache entries written before they existed.
_SPEED_ONLY = ('prefetch_batches',)
_TEACHER_FORMAT = 2  # The cache layout and key; older entries are not read.
TEACHER_CONFIG = 'teacher_config.json'


def teacher_config(config):
  """The config the demo teacher trains with, and is cached under.

  The run config with ``config.pretrain``'s budget and optimizer, method
  'fp' (full precision) and seed ``pretrain.seed``; without the fields only
  the students read, so that every student of a dataset shares one teacher.

  Args:
    config: the run config.

  Returns:
    A ConfigDict.
  """
  p = config.pretrain
  tree = config.to_dict()
  for name in _STUDENT_ONLY + _SPEED_ONLY:
    tree.pop(name, None)
  # Of DTQ's settings, an 'fp' run reads only whether attention is built.
  tree['dtq'] = {'attention': config.dtq.attention}
  for name in _QUANTIZER_ONLY:
    tree['quant'].pop(name, None)
  d = tree['dataset']
  d.pop('cache_dir', None)  # Where decoded images are kept.
  # Neither split's teacher images depend on the target's fields (in domain:
  # splits.in_domain_indices draws them by teacher_per_class, teacher_seed).
  for name in _TARGET_ONLY:
    d.pop(name, None)
  pre = ml_collections.ConfigDict(tree)
  pre.method = 'fp'
  pre.bits_w, pre.bits_a = networks.student_bits(pre)
  pre.seed = p.seed
  pre.batch_size = p.batch_size
  pre.num_epochs = p.num_epochs
  pre.steps_per_epoch = p.get('steps_per_epoch', 0)
  pre.optim.update(p.optim)
  return pre


def _teacher_key(pre, dataset):
  """Hash of the teacher's config, its image files and the cache format."""
  payload = json.dumps(dict(
      config=saved_configs.config_json(pre),
      files=datasets.source_fingerprint(dataset),
      version=_TEACHER_FORMAT), sort_keys=True)
  return hashlib.sha256(payload.encode()).hexdigest()[:16]


def train_source_teacher(config, data):
  """Trains (once, then cached) the demo teacher on the source classes.

  The source task is trained by the same trainer as the students: method
  'fp' with a fresh classifier, from random initialisation. Its classifier then
  becomes the network's source classifier (``fc``), the role torchvision's
  1000-way ImageNet layer plays in the paper. The entry's folder holds the
  config it was trained with (``teacher_config.json``); a process that needs
  an entry another process is building waits for it.

  Args:
    config: the demo config (``config.pretrain`` holds the budget).
    data: the demo data; ``data.source`` holds the source splits.

  Returns:
    ``{'params', 'batch_stats'}`` of the teacher.

  Raises:
    UserError: the cache cannot be written, or its entry is damaged.
  """
  pre = teacher_config(config)
  key = _teacher_key(pre, config.dataset)
  # A user's network is named 'package.module:Class'.
  name = config.model.replace(':', '.')
  root = os.path.join(caches.root(config), 'teachers', f'{name}-{key}')
  run_dir = os.path.join(root, 'run')
  result_path = os.path.join(run_dir, files.RESULT)
  model = networks.create_backbone(config, data.source.num_classes,
                                   data.source.image_shape)
  with contextlib.ExitStack() as stack:
    with _cache_write_errors(root):
      if jax.process_index() == 0:
        # The other processes of a multi-process run train with process 0.
        stack.enter_context(locks.build_lock(root, 'the teacher'))
        files.remove_stale_temporaries(root)
    trained = os.path.exists(result_path)
    if jax.process_count() > 1:
      # Decided under process 0's lock, for all processes.
      trained = bool(multihost_utils.broadcast_one_to_all(np.int32(trained)))
    if not trained:
      with _cache_write_errors(root):
        if jax.process_index() == 0:
          files.write_json(os.path.join(root, TEACHER_CONFIG),
                           saved_configs.config_json(pre))
        init = networks.init_variables(model, jax.random.PRNGKey(pre.seed),
                                       data.source.image_shape)
        print(f'Training the teacher on source classes '
              f'{tuple(config.dataset.source_classes)} (cached in {root}).')
        # The same trainer as the students; an interrupted pretraining
        # resumes.
        train.train_and_evaluate(pre, run_dir, pre.seed, data.source, init,
                                 lr_field='pretrain.optim.lr',
                                 new_workdir=False)
      if jax.process_count() > 1:
        # Process 0 writes result.json last; the others wait for it.
        multihost_utils.sync_global_devices('dtq_jax teacher trained')
    else:
      _check_cached_config(pre, root)
      logging.info('Using the cached teacher in %s.', root)
  try:
    restored = checkpoints.restore_params(run_dir)
  except errors.UserError as e:
    raise errors.UserError(
        f'the cached teacher in {root} is damaged ({e}); delete that folder '
        'to train it again.') from e
  params = _with_classifier(restored['params']['backbone'],
                            model.classifier_name,
                            restored['params']['head']['fc'])
  variables = {'params': params, 'batch_stats': restored['batch_stats']}
  accuracy = run_result.read(result_path)['final_test_accuracy']
  print(f'Teacher: source-test accuracy {accuracy:.2f}% ({root}).')
  return variables


def _with_classifier(params, path, classifier):
  """A copy of ``params`` whose module at ``path`` ('a/b') is replaced."""
  first, _, rest = path.partition('/')
  params = dict(params)
  params[first] = (_with_classifier(params[first], rest, classifier) if rest
                   else classifier)
  return params


def _check_cached_config(pre, root):
  """The entry was trained with ``pre`` (entries written before the config
  was stored have none to compare)."""
  path = os.path.join(root, TEACHER_CONFIG)
  if not os.path.exists(path):
    return
  diff = saved_configs.differing_fields(files.read_json(path),
                                        saved_configs.config_json(pre))
  if diff:
    raise errors.UserError(
        f'the cached teacher in {root} was trained with another config '
        f'(fields: {", ".join(diff[:5])} of {TEACHER_CONFIG}); delete that '
        'folder to train it again.')


@contextlib.contextmanager
def _cache_write_errors(root):
  """A cache that cannot be written is named as such, not as the workdir."""
  try:
    yield
  except OSError as e:
    if e.errno not in files.WRITE_ERRNOS:
      raise
    raise errors.UserError(
        f'cannot write the teacher cache in {root}: {e}; free space there or '
        'choose another --config.cache_dir.') from e
