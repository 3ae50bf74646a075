"""One run's networks: student, teacher, target head, attention; their start.

The student is the quantized backbone (BatchNorm in training mode) plus a new
target classifier and, for DTQ, the attention modules; the teacher is the
same backbone at full precision, frozen, passed to the train step as an
argument and never checkpointed (docs/method.md, "Networks").
"""

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from dtq_jax import layers
from dtq_jax.method import attention
from dtq_jax.models import create_model
from dtq_jax.models import own_network
from dtq_jax.models.head import TargetHead
from dtq_jax import quant


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


def uses_static_ranges(config):
  """Whether the run keeps activation ranges and evaluates with them."""
  return config.quant.get('act_ranges', 'dynamic') == 'static'


def student_bits(config):
  """(bits_w, bits_a) of the student; 'fp' fine-tunes at full precision."""
  if config.method == 'fp':
    return quant.FULL_PRECISION, quant.FULL_PRECISION
  return config.bits_w, config.bits_a


def own_network_settings(config):
  """``own_network.create``'s settings of a run (empty for the zoo)."""
  return dict(keep_float=tuple(config.quant.get('keep_float', ())),
              quantize_dense=config.quant.get('quantize_dense', False),
              taps=tuple(config.dtq.get('taps', ())),
              source_classifier=config.dtq.get('source_classifier', ''))


def create_backbone(config, num_classes, image_shape=None,
                    bits_w=quant.FULL_PRECISION, bits_a=quant.FULL_PRECISION,
                    conv_kwargs=None):
  """The network ``config.model`` names: a zoo model or the user's own.

  Args:
    config: the run config (``model``, ``model_kwargs``, ``compute_dtype``
      and, for a user's network, ``quant.keep_float``,
      ``quant.quantize_dense``, ``dtq.taps``, ``dtq.source_classifier``).
    num_classes: outputs of the source classifier.
    image_shape: (H, W, C) of one image; needed for a user's network.
    bits_w: weight bits of the quantized convolutions (32: float).
    bits_a: input-activation bits.
    conv_kwargs: ``layers.QuantSettings`` keyword arguments.

  Returns:
    A zoo Flax module or an ``own_network.OwnNetwork``; ``apply`` returns
    ``(logits, {'pooled', 'taps', ...})`` either way.
  """
  dtype = jnp.dtype(config.get('compute_dtype', 'float32'))
  kwargs = dict(config.get('model_kwargs', {}) or {})
  if own_network.is_import_path(config.model):
    if image_shape is None:
      raise ValueError(f'model={config.model!r}: a user\'s network needs the '
                       'image shape to be traced.')
    return own_network.create(
        config.model, num_classes, image_shape, bits_w=bits_w, bits_a=bits_a,
        conv_kwargs=conv_kwargs, dtype=dtype, model_kwargs=kwargs,
        **own_network_settings(config))
  return create_model(config.model, num_classes=num_classes, bits_w=bits_w,
                      bits_a=bits_a, dtype=dtype, conv_kwargs=conv_kwargs,
                      **kwargs)


def describe_student(config, image_shape):
  """Lines listing a user's network's layers as the student runs them.

  Args:
    config: the run config (``config.model`` a user's network).
    image_shape: (H, W, C) of one image.

  Returns:
    A list of strings: a title, one line per Conv/Dense layer (quantized
    with its bits, or float and why), the taps and the source classifier.
  """
  bits_w, bits_a = student_bits(config)
  network = create_backbone(config, 1, image_shape)
  return ([f'Network: {config.model} ({config.method}), its layers as the '
           'student runs them:'] +
          ['  ' + line for line in own_network.describe(network.plan, bits_w,
                                                       bits_a)])


def build_networks(config, num_classes, num_source_classes, image_shape=None):
  """Creates the student, teacher, target head and attention modules.

  Args:
    config: the run config.
    num_classes: target classes.
    num_source_classes: outputs of the pretrained (source) classifier.
    image_shape: (H, W, C) of one image (needed for a user's network).

  Returns:
    A ``Networks``.
  """
  settings = layers.QuantSettings.from_config(config.quant)
  bits_w, bits_a = student_bits(config)
  student = create_backbone(config, num_source_classes, image_shape, bits_w,
                            bits_a, settings.as_conv_kwargs())
  # Same maths, different kernels: the teacher runs them too.
  teacher = create_backbone(config, num_source_classes, image_shape,
                            conv_kwargs=settings.kernels_only().as_conv_kwargs())
  head = TargetHead(num_classes, dropout_rate=student.dropout_rate)
  modules = None
  if config.method == 'dtq':
    modules = attention.TransferAttention(
        uniform=config.dtq.attention == 'uniform')
  return Networks(student, teacher, head, modules)


def num_source_classes(teacher, classifier=None):
  """Outputs of the pretrained network's source classifier.

  Args:
    teacher: ``{'params', 'batch_stats'}`` of the backbone.
    classifier: the classifier's path in the params ('a/b'); None: the zoo's
      ('fc' or 'classifier_1').

  Returns:
    The classifier's output size.

  Raises:
    ValueError: the variables have no source classifier.
  """
  if classifier is not None:
    node = teacher['params']
    for key in classifier.split(own_network.SEP):
      if key not in node:
        raise ValueError(f'the pretrained variables have no source '
                         f'classifier {classifier!r}.')
      node = node[key]
    return node['kernel'].shape[-1]
  for name in ('fc', 'classifier_1'):
    if name in teacher['params']:
      return teacher['params'][name]['kernel'].shape[-1]
  raise ValueError('the pretrained variables have no source classifier '
                   "('fc' or 'classifier_1').")


def source_classes(config, teacher, image_shape=None):
  """Outputs of the source classifier of ``config.model`` in ``teacher``.

  Args:
    config: the run config.
    teacher: ``{'params', ...}`` of the pretrained network.
    image_shape: (H, W, C) of one image (needed for a user's network, whose
      classifier is found by tracing it).

  Returns:
    The classifier's output size.
  """
  if not own_network.is_import_path(config.model):
    return num_source_classes(teacher)
  probe = create_backbone(config, 1, image_shape)
  return num_source_classes(teacher, probe.classifier_name)


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
  variables = dict(jax.jit(functools.partial(model.init, train=False))(
      rng, images))
  # A network without BatchNorm (a user's ConvNeXt) has no statistics; the
  # steps handle every network alike.
  variables.setdefault('batch_stats', {})
  return variables


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
  return params, variables.get('batch_stats', {})


def make_predict(student, head):
  """``(backbone_variables, head_params, images) -> target logits`` (jitted).

  Args:
    student: the backbone (any ``conv``: quantized, static-range, integer).
    head: the target classifier.

  Returns:
    The jitted function; ``backbone_variables`` holds ``params`` and
    ``batch_stats`` and whatever else the backbone reads (``quant_ranges``
    of a static-range student, ``int_weights`` of an integer one).
  """

  def predict(variables, head_params, images):
    _, feats = student.apply(variables, images, train=False)
    return head.apply({'params': head_params}, feats['pooled'])

  return jax.jit(predict)
