"""Throughput and compile time of the full DTQ train step (the one main.py runs).

The step is built exactly as ``train.train_and_evaluate`` builds it
(``build_networks``, ``init_params``, ``make_optimizer``,
``Runtime.jit_train_step``: the Runtime's shardings, the state donated, the
config's XLA compiler options), from a config
of the paper recipe (``configs/common.py``; ``configs/fmnist.py`` for
``small_resnet``). Weights are random (the teacher is a random network and the
student starts from it, as it would start from the pretrained one); one random
batch is placed on the device once and reused.

For each model, in one process, the variants are (``--variants``):

  dtq    DTQ at --bits (CE + KL + AFA, teacher forward, attention)
  dtq32  the same step with a full-precision student (bits 32/32): the cost
         of fake quantization is t(dtq) / t(dtq32)
  ft     FT-Q at --bits (CE only, no teacher, no transfer terms): the cost of
         transfer is t(dtq) / t(ft)

each once per quantizer (``--quantizers``: minmax, the paper's, and lsq,
learned steps started as a run starts them; dtq32 quantizes nothing and is
measured once, a variant with lsq is named ``dtq_w4a4_lsq``), once per value
of ``config.cpu_convolutions`` (``--cpu_convolutions``)
and per set of the product's speed-up switches (``--speedups``: a
comma-separated list of switch sets, each 'default' (the product's: fused_vjp
on, depthwise_as_shifts on a CPU), 'none', 'all' or a '+'-joined subset of
the ``config.quant`` switches pointwise_as_dot, depthwise_as_shifts and
fused_vjp; same maths, other kernels). A variant's name carries its set
unless it is the product's (``dtq_w4a4``, ``dtq_w4a4+none``,
``dtq_w4a4+all``, ``dtq_w4a4+pointwise_as_dot+fused_vjp``)
and its JSON line the value of every switch. The summary gives, per set, the
cost of quantization (dtq vs dtq32), of transfer (dtq vs ft) and of learned
steps (lsq vs minmax), and per
set but 'none' the speed-up of each variant over the same variant with none
(when 'none' is measured too).

Per variant: one JSON line with the compile time, the median step time, images
per second, XLA's FLOP count of the compiled step (``cost_analysis()``), the
achieved GFLOP/s and the memory XLA plans for the step (``memory_analysis()``),
then a Markdown table; ``--out`` writes it with the command, git commit and
machine. Timing: every variant of a model is built, compiled and warmed up
(``--warmup`` steps) first; then ``--rounds`` rounds each time ``--steps``
steps of every variant in turn (interleaving spreads load changes of a shared
machine over all variants). Steps are dispatched without waiting; the wall
time of all timed steps (one ``block_until_ready`` at the end of each run of
``--steps``) gives images/s, and the completion times of the individual steps
(observed one step behind the dispatch, so the queue never runs dry) give the
median step time.

Examples:

  python benchmarks/train_step.py --model=small_resnet --batch=64 \
      --image_size=28 --steps=20
  python benchmarks/train_step.py --model=resnet50,mobilenet_v2 --batch=16 \
      --steps=3 --speedups=none,all --out=results/train_step_cpu.md
  python benchmarks/train_step.py --model=mobilenet_v2 --batch=16 --steps=3 \
      --variants=dtq --speedups=none,depthwise_as_shifts,all
  python benchmarks/train_step.py --model=resnet50 --batch=16 --steps=3 \
      --variants=dtq,ft --quantizers=minmax,lsq
"""

import argparse
import collections
import contextlib
import gc
import hashlib
import os
import re
import sys
import time

import bench_util

bench_util.add_repo_to_path()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from configs import common  # pylint: disable=wrong-import-position
from configs import fmnist  # pylint: disable=wrong-import-position
from dtq_jax import layers  # pylint: disable=wrong-import-position
from dtq_jax.method import learned_params  # pylint: disable=wrong-import-position
from dtq_jax.method import networks  # pylint: disable=wrong-import-position
from dtq_jax.method import step as step_lib  # pylint: disable=wrong-import-position
from dtq_jax.run import config_validation  # pylint: disable=wrong-import-position
from dtq_jax.run import runtime as runtime_lib  # pylint: disable=wrong-import-position

VARIANTS = ('dtq', 'dtq32', 'ft')
DTYPES = ('float32', 'bfloat16')
# The speed-up switches of config.quant (same maths, other kernels).
SWITCHES = ('pointwise_as_dot', 'depthwise_as_shifts', 'fused_vjp')
_PRODUCT_CONFIG = common.paper_config(dict(name='image_folder', root='unused'))
# The product's config.cpu_convolutions (variant names mark the others).
DEFAULT_CPU_CONVOLUTIONS = _PRODUCT_CONFIG.cpu_convolutions
# The product's values of SWITCHES (--speedups=default); None (for
# depthwise_as_shifts) is the platform's choice, on for a CPU.
DEFAULT_SWITCHES = {s: _PRODUCT_CONFIG.quant[s] for s in SWITCHES}
MODELS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152',
          'mobilenet_v2', 'small_resnet')


# Warm-up goes on while two steps in flight fault more pages than this (a
# settled ResNet-50 step faults none; an unsettled one about 930,000).
SETTLED_FAULTS = 10_000
MAX_SETTLE_PAIRS = 4


def minor_faults():
  """This process's minor page faults so far (0 where getrusage lacks them)."""
  try:
    import resource  # pylint: disable=g-import-not-at-top
  except ImportError:  # not on Unix
    return 0
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def parse_switch_set(text):
  """'default', 'none', 'all' or 'a+b' (names in SWITCHES) -> {switch: bool,
  ...}; 'default' is the product's set (DEFAULT_SWITCHES, where None is the
  platform's choice); the others name each switch on or off."""
  text = text.strip()
  if text == 'default':
    return dict(DEFAULT_SWITCHES)
  if text in ('none', 'all'):
    return {s: text == 'all' for s in SWITCHES}
  names = [n.strip() for n in text.split('+')]
  for n in names:
    if n not in SWITCHES:
      raise ValueError(f'unknown speed-up {n!r} in {text!r}; use default, '
                       'none, all, or a +-joined subset of '
                       f'{", ".join(SWITCHES)}')
  return {s: s in names for s in SWITCHES}


def switch_label(switches):
  """'default' (the product's set), 'none', 'all' or the '+'-joined switches
  that are on (SWITCHES order)."""
  if {s: switches.get(s) for s in SWITCHES} == DEFAULT_SWITCHES:
    return 'default'
  on = [s for s in SWITCHES if switches.get(s)]
  if not on:
    return 'none'
  return 'all' if len(on) == len(SWITCHES) else '+'.join(on)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  bench_util.add_step_args(p, MODELS, VARIANTS)
  p.add_argument('--batch', type=int, default=16, help='global batch size')
  p.add_argument('--image_size', type=int, default=None,
                 help='default: 224 (28 for small_resnet)')
  p.add_argument('--dtype', default='float32',
                 help='comma-separated config.compute_dtype values, each '
                 'measured for every variant: float32, bfloat16 (the first '
                 'is the baseline of the comparison lines)')
  p.add_argument('--speedups', default='default',
                 help='comma-separated switch sets, each measured for every '
                 'variant: default (the product\'s: ' +
                 switch_label(DEFAULT_SWITCHES) + '), none, all, or a '
                 '+-joined subset of ' + ', '.join(SWITCHES) +
                 ' (config.quant switches)')
  p.add_argument('--quantizers', default='minmax',
                 help='comma-separated config.quant.method values, each '
                 'measured for every quantized variant: ' +
                 ', '.join(layers.QUANT_METHODS) + ' (the first is the '
                 'baseline of the comparison lines)')
  p.add_argument('--cpu_convolutions', default=DEFAULT_CPU_CONVOLUTIONS,
                 help='comma-separated values of config.cpu_convolutions, '
                 'each measured for every variant and switch set: ' +
                 ', '.join(config_validation.CPU_CONVOLUTIONS) +
                 ' (XLA:CPU only; the first is the baseline of the '
                 'comparison lines)')
  p.add_argument('--num_classes', type=int, default=None,
                 help='target classes (default 257, Caltech-256; 5 for '
                 'small_resnet)')
  p.add_argument('--num_source_classes', type=int, default=None,
                 help='source classifier outputs (default 1000; 5 for '
                 'small_resnet)')
  p.add_argument('--lr', type=float, default=None,
                 help='learning rate (default: the config\'s, 0.01); the '
                 'step\'s cost does not depend on it, but random weights at '
                 'a high rate can diverge to non-finite steps')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--dump_hlo', default=None,
                 help='folder: write each variant\'s optimized HLO text there')
  p.add_argument('--out', default=None,
                 help='Markdown report path; {backend} is replaced by the '
                 'backend name (e.g. results/train_step_{backend}.md)')
  args = p.parse_args(argv)
  bench_util.check_model_variant_args(p, args, MODELS, VARIANTS)
  # As main.py, before the step's buffers exist.
  args.allocator = bench_util.configure_allocator(args.allocator)
  sets = args.speedups.split(',')
  args.speedups = []
  for text in sets:
    if not text.strip():
      continue
    try:
      switches = parse_switch_set(text)
    except ValueError as e:
      p.error(f'--speedups: {e}')
    if switches in args.speedups:
      p.error(f'--speedups: {switch_label(switches)} is given twice')
    args.speedups.append(switches)
  if not args.speedups:
    p.error('--speedups: give at least one set (default: the product\'s)')
  args.quantizers = _choices(p, 'quantizers', args.quantizers,
                             layers.QUANT_METHODS)
  args.dtypes = _choices(p, 'dtype', args.dtype, DTYPES)
  # The teacher's BatchNorm calibration and scripts that build one Variant
  # read args.dtype: the first (baseline) value.
  args.dtype = args.dtypes[0]
  args.cpu_convolutions = _choices(p, 'cpu_convolutions',
                                   args.cpu_convolutions,
                                   config_validation.CPU_CONVOLUTIONS)
  return args


def _choices(parser, flag, text, allowed):
  """``--flag``'s comma-separated values, each in ``allowed`` and once."""
  values = [v.strip() for v in text.split(',') if v.strip()]
  for v in values:
    if v not in allowed:
      parser.error(f'--{flag}: unknown {v!r}; allowed: {", ".join(allowed)}')
  if not values or len(set(values)) != len(values):
    parser.error(f'--{flag}: give each value once')
  return values


def make_config(model, method, bits, dtype, switches, batch, image_size,
                lr=None, cpu_convolutions=None, quantizer='minmax'):
  """The run config main.py would use, with the benchmark's overrides.

  ``switches``: {name: bool or None} for config.quant's speed-ups
  (SWITCHES); those not named keep the config's default.
  ``cpu_convolutions``: None keeps the config's. ``quantizer``:
  ``config.quant.method``.
  """
  if model == 'small_resnet':
    config = fmnist.get_config()
  else:
    config = common.paper_config(
        dict(name='image_folder', root='unused'),
        model if model in common.NETWORKS else None)
    config.model = model
    config.dtq.temperature = common.TEMPERATURE.get(model, 60.0)
  config.method = method
  config.bits_w, config.bits_a = bits
  config.quant.method = quantizer
  config.compute_dtype = dtype
  for name, on in (switches or {}).items():
    if name not in SWITCHES:
      raise ValueError(f'unknown quant switch {name!r}; known: '
                       f'{", ".join(SWITCHES)}')
    config.quant[name] = None if on is None else bool(on)
  config.batch_size = batch
  config.dataset.image_size = image_size
  if lr is not None:
    config.optim.lr = lr
  if cpu_convolutions is not None:
    config.cpu_convolutions = cpu_convolutions
  return config


# One variant to measure: ``switches`` and ``cpu_convolutions`` as for
# make_config; ``patch``, if not None, is called with no arguments for a
# context manager that is entered while the step is built and traced
# (accelerator_check.py patches its on-device batches in with it);
# ``overrides``, if not None, sets further top-level config fields
# (collectives.py: ``stats_group_size``); ``dtype``, if not None, is the
# variant's config.compute_dtype (None: ``args.dtype``).
VariantSpec = collections.namedtuple(
    'VariantSpec',
    ('name', 'method', 'bits', 'switches', 'cpu_convolutions', 'patch',
     'quantizer', 'overrides', 'dtype'),
    defaults=(None, None, 'minmax', None, None))


def variant_list(args):
  """The VariantSpecs to measure: every variant, quantizer, switch set and
  library."""
  out = []
  for dtype in args.dtypes:
    for convs in args.cpu_convolutions:
      for switches in args.speedups:
        label = switch_label(switches)
        for v in args.variants:
          method = 'ft' if v == 'ft' else 'dtq'
          bits = (32, 32) if v == 'dtq32' else args.bits
          # A full-precision student has no quantizer to choose.
          for quantizer in args.quantizers[:1] if v == 'dtq32' else (
              args.quantizers):
            name = f'{method}_w{bits[0]}a{bits[1]}' + (
                '' if quantizer == 'minmax' else f'_{quantizer}') + (
                    '' if label == 'default' else '+' + label) + (
                        '' if convs == DEFAULT_CPU_CONVOLUTIONS else
                        '@' + convs) + (
                            '' if dtype == 'float32' else ' ' + dtype)
            out.append(VariantSpec(name, method, bits, switches, convs,
                                   quantizer=quantizer, dtype=dtype))
  return out


def _cost(compiled):
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0] if cost else {}
  return cost or {}


def _memory(compiled, device):
  """Memory XLA plans for the step, and the device's peak if it reports it."""
  out = {}
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    m = None
  if m is not None:
    mb = lambda b: round(b / 2**20, 1)
    out['mem_args_mb'] = mb(m.argument_size_in_bytes)
    out['mem_out_mb'] = mb(m.output_size_in_bytes)
    out['mem_alias_mb'] = mb(m.alias_size_in_bytes)
    out['mem_temp_mb'] = mb(m.temp_size_in_bytes)
    # XLA:CPU fills peak_memory_in_bytes with the argument size only, so it
    # is reported for other backends.
    peak = getattr(m, 'peak_memory_in_bytes', 0) or 0
    if jax.default_backend() == 'cpu':
      peak = 0
    # Arguments + outputs + temporaries, donated (aliased) buffers once.
    out['mem_total_mb'] = mb(m.argument_size_in_bytes +
                             m.output_size_in_bytes -
                             m.alias_size_in_bytes + m.temp_size_in_bytes)
    if peak:
      out['mem_peak_mb'] = mb(peak)
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and 'peak_bytes_in_use' in stats:
    # Process-wide peak so far (it includes earlier variants).
    out['device_peak_mb_so_far'] = round(stats['peak_bytes_in_use'] / 2**20, 1)
  return out


def random_batch(seed, batch, image_shape, num_classes):
  """The benchmark's input batch: standard-normal images, random labels."""
  rs = np.random.RandomState(seed)
  return {'image': rs.standard_normal((batch,) + image_shape).astype(
              np.float32),
          'label': rs.randint(0, num_classes, (batch,)).astype(np.int32)}


def task(model):
  """(image_size, channels, classes, source classes) of the benchmarks'
  tasks: the demo's 28 px Fashion-MNIST for small_resnet, else the paper's
  224 px Caltech-256 against ImageNet."""
  if model == 'small_resnet':
    return 28, 1, 5, 5
  return 224, 3, 257, 1000


def pre_crop_side(dataset):
  """Side of the uint8 images that a step augmenting on the device gets:
  ``config.dataset``'s resize (the paper's 256 px) or its image size."""
  return dataset.resize_to or dataset.image_size


def pre_crop_size(model):
  """``pre_crop_side`` of ``model``'s benchmark config."""
  return pre_crop_side(make_config(model, 'dtq', (4, 4), 'float32', {}, 1,
                                   task(model)[0]).dataset)


@contextlib.contextmanager
def uint8_batches(pre_crop):
  """Makes Variant build uint8 pre-crop batches (for a step that augments
  them on the device) instead of ``random_batch``'s float images."""
  global random_batch
  original = random_batch

  def uint8_batch(seed, batch, image_shape, num_classes):
    rs = np.random.RandomState(seed)
    shape = (batch, pre_crop, pre_crop, image_shape[-1])
    return {'image': rs.randint(0, 256, shape).astype(np.uint8),
            'label': rs.randint(0, num_classes, (batch,)).astype(np.int32)}

  random_batch = uint8_batch
  try:
    yield
  finally:
    random_batch = original


# BatchNorm momentum of the models (models/resnet.py batch_norm: PyTorch's
# 0.1 is 0.9 here); used to solve the running-average update for the batch
# statistics.
_BN_MOMENTUM = 0.9


def make_teacher(args, model, image_size, channels, num_classes, num_source):
  """Random full-precision teacher variables with calibrated BatchNorm.

  A random network in inference mode with the initial running statistics
  (mean 0, variance 1) does not normalise anything: activations grow through
  the 50 layers of ResNet-50 and the KL/AFA terms overflow within a few
  steps (non-finite steps would then be timed). So the running statistics
  are set to the statistics of the benchmark batch itself (one forward pass
  in training mode, the running-average update solved for the batch
  statistics), as a pretrained teacher's would roughly be: the teacher's
  maps and logits are then of a realistic size.
  """
  base = make_config(model, 'dtq', (32, 32), args.dtype, {}, args.batch,
                     image_size)
  net = networks.build_networks(base, num_classes, num_source).teacher
  images = jnp.asarray(random_batch(args.seed, args.batch,
                                    (image_size, image_size, channels),
                                    num_classes)['image'])
  k_init, k_drop = jax.random.split(jax.random.PRNGKey(args.seed + 1))

  @jax.jit
  def init_and_calibrate(images):
    variables = net.init(k_init, images[:1], train=False)
    _, updated = net.apply(variables, images, train=True,
                           mutable=['batch_stats'], rngs={'dropout': k_drop})
    stats = jax.tree.map(
        lambda new, old: (new - _BN_MOMENTUM * old) / (1 - _BN_MOMENTUM),
        updated['batch_stats'], variables['batch_stats'])
    return {'params': variables['params'], 'batch_stats': stats}

  return init_and_calibrate(images)


class Variant:
  """One compiled variant of the step, with its state, batch and timings."""

  def __init__(self, args, model, spec, teacher_vars, image_size, channels,
               num_classes, num_source):
    self.model, self.name, self.method, self.bits = (
        model, spec.name, spec.method, spec.bits)
    self.args, self.image_size = args, image_size
    self.dtype = spec.dtype or args.dtype
    config = make_config(model, spec.method, spec.bits, self.dtype,
                         spec.switches, args.batch, image_size, args.lr,
                         spec.cpu_convolutions, spec.quantizer)
    for field, value in (spec.overrides or {}).items():
      config[field] = value
    self.quantizer = config.quant.method
    self.switches = {s: config.quant[s] for s in SWITCHES}
    self.cpu_convolutions = config.cpu_convolutions
    # As train.train_and_evaluate: the config's compiler options.
    runtime = runtime_lib.Runtime(
        compiler_options=runtime_lib.compiler_options(config))
    image_shape = (image_size, image_size, channels)
    nets = networks.build_networks(config, num_classes, num_source)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(args.seed))
    params, batch_stats = networks.init_params(nets, init_rng, image_shape,
                                               teacher_vars)
    host_batch = random_batch(args.seed, args.batch, image_shape, num_classes)
    # Seconds a run spends starting its learned steps (None: minmax).
    self.learned_init_s = None
    if learned_params.uses_learned_quant(config):
      # As a run starts: the learned steps from the kernels and one batch
      # (two compiled passes of the network: the probe and the start).
      t0 = time.perf_counter()
      params['backbone'] = jax.block_until_ready(
          learned_params.init_learned_quant(
              nets.student, {'params': params['backbone'],
                             'batch_stats': batch_stats},
              host_batch['image'])['params'])
      self.learned_init_s = time.perf_counter() - t0
    # Schedule lengths only place the learning-rate drop; any values do.
    tx, _ = step_lib.make_optimizer(
        config, params, nets.student.classifier_name, steps_per_epoch=100,
        num_epochs=75)
    self.state = runtime.replicate(step_lib.create_train_state(
        config, nets, params, batch_stats, tx, state_rng, image_shape))
    self.frozen = runtime.replicate({'teacher': teacher_vars,
                                     'delta_weights': None})
    self.batch = runtime.put_batch(host_batch)

    step_fn = runtime.jit_train_step(
        step_lib.make_train_step(config, nets, tx))
    t0 = time.perf_counter()
    lowered = step_fn.lower(self.state, self.batch, self.frozen)
    t1 = time.perf_counter()
    self.compiled = lowered.compile()
    t2 = time.perf_counter()
    self.lower_s, self.xla_compile_s = t1 - t0, t2 - t1
    hlo = self.compiled.as_text()
    # Identical programs (e.g. depthwise_as_shifts on a network without
    # depthwise convolutions) are flagged in the summary.
    self.hlo_hash = hashlib.sha1(
        re.sub(r'metadata=\{[^}]*\}', '', hlo).encode()).hexdigest()[:12]
    if args.dump_hlo:
      os.makedirs(args.dump_hlo, exist_ok=True)
      path = os.path.join(args.dump_hlo,
                          f'{model}_{self.name}_b{args.batch}.hlo.txt')
      bench_util.write_text_atomic(path, hlo)
    del hlo
    self.first_s = None
    self.metrics = None
    self.intervals = []
    self.timed_s = 0.0
    self.timed_steps = 0

  def _step(self):
    self.state, self.metrics = self.compiled(self.state, self.batch,
                                             self.frozen)
    return self.metrics

  def warm_up(self):
    """``--warmup`` steps, then more until steps in flight fault no pages.

    With the allocator keeping freed memory, the first steps dispatched while
    another is still running fault in a further set of the step's buffers
    each (ResNet-50 at batch 16 on XLA:CPU: about 930,000 minor page faults,
    8 s, twice); a timed round that met them would mix 6 s and 14 s steps.
    So pairs of steps are dispatched as ``time_steps`` does until a pair
    faults fewer than SETTLED_FAULTS pages (at most MAX_SETTLE_PAIRS pairs;
    ``settle_steps`` in the record counts them).
    """
    # The first execution separately: it can carry one-time costs.
    t = time.perf_counter()
    jax.block_until_ready(self._step())
    self.first_s = time.perf_counter() - t
    for _ in range(max(self.args.warmup - 1, 0)):
      self._step()
    jax.block_until_ready((self.state, self.metrics))
    self.settle_steps = 0
    if not self.args.warmup:
      return
    for _ in range(MAX_SETTLE_PAIRS):
      before = minor_faults()
      self._step()
      self._step()
      jax.block_until_ready((self.state, self.metrics))
      self.settle_steps += 2
      if minor_faults() - before < SETTLED_FAULTS:
        break

  def time_steps(self, steps):
    """Dispatches ``steps`` steps without waiting; records completions.

    Step i-1 is waited for only after step i has been dispatched, so the
    device always has queued work; the wall time of the whole loop ends with
    one block_until_ready.
    """
    done, previous = [], None
    start = time.perf_counter()
    for _ in range(steps):
      metrics = self._step()
      if previous is not None:
        jax.block_until_ready(previous)
        done.append(time.perf_counter())
      previous = metrics
    jax.block_until_ready((self.state, self.metrics))
    end = time.perf_counter()
    done.append(end)
    self.intervals.extend(np.diff([start] + done).tolist())
    self.timed_s += end - start
    self.timed_steps += steps

  def record(self):
    args = self.args
    step_s = float(np.median(self.intervals))
    cost = _cost(self.compiled)
    flops = float(cost.get('flops', float('nan')))
    metrics = jax.device_get(self.metrics)
    record = {
        'model': self.model,
        'variant': self.name,
        'method': self.method,
        'bits_w': self.bits[0],
        'bits_a': self.bits[1],
        'quant_method': self.quantizer,
        **self.switches,
        'cpu_convolutions': self.cpu_convolutions,
        'batch': args.batch,
        'image_size': self.image_size,
        'dtype': self.dtype,
        'backend': jax.default_backend(),
        'steps': self.timed_steps,
        'img_per_s': round(args.batch * self.timed_steps / self.timed_s, 3),
        'step_ms': round(step_s * 1e3, 2),
        'step_ms_min': round(min(self.intervals) * 1e3, 2),
        'step_ms_max': round(max(self.intervals) * 1e3, 2),
        'first_step_s': round(self.first_s, 3),
        'settle_steps': self.settle_steps,
        'learned_init_s': (None if self.learned_init_s is None else
                           round(self.learned_init_s, 2)),
        'hlo_hash': self.hlo_hash,
        'compile_s': round(self.lower_s + self.xla_compile_s, 2),
        'lower_s': round(self.lower_s, 2),
        'xla_compile_s': round(self.xla_compile_s, 2),
        'gflop_per_step': round(flops / 1e9, 2),
        'gflop_per_image': round(flops / 1e9 / args.batch, 3),
        'gflop_per_s': round(flops / 1e9 / step_s, 1),
        'bytes_accessed_gb': round(
            float(cost.get('bytes accessed', float('nan'))) / 1e9, 2),
        'loss': float(metrics['loss']),
        'finite': bool(metrics['finite']),
        # Steps whose loss or gradient was not finite (their update was
        # skipped); the timings of such a run are suspect.
        'nonfinite_steps': int(jax.device_get(self.state.nonfinite_steps)),
    }
    record.update(_memory(self.compiled, jax.devices()[0]))
    return record

  def release(self):
    del self.state, self.frozen, self.batch, self.compiled, self.metrics
    gc.collect()


COLUMNS = [
    ('model', 'model'),
    ('variant', 'variant'),
    ('img/s', 'img_per_s'),
    ('step ms (median)', 'step_ms'),
    ('x time of first variant', 'time_ratio'),
    ('compile s', 'compile_s'),
    ('GFLOP/step (XLA)', 'gflop_per_step'),
    ('GFLOP/s', 'gflop_per_s'),
    ('XLA memory MB (args+out+temp)', 'mem_total_mb'),
    ('temp MB', 'mem_temp_mb'),
    ('device peak MB', 'mem_peak_mb'),
]


def variant_kind(record):
  """'dtq', 'dtq32' or 'ft' (VARIANTS) of a record; '_lsq' etc. appended
  for a learned quantizer."""
  quantizer = record.get('quant_method', 'minmax')
  suffix = '' if quantizer == 'minmax' else f'_{quantizer}'
  if record['method'] == 'ft':
    return 'ft' + suffix
  return 'dtq32' if (record['bits_w'], record['bits_a']) == (32, 32) else (
      'dtq' + suffix)


def summary_lines(records):
  """The ratios the benchmark exists for, per model, library and switch set.

  Per (cpu_convolutions and compute dtype, switch set): the cost of
  quantization (dtq vs dtq32) and of transfer (dtq vs ft); per other
  switch set, its speed-up over 'none' with the same library; per library
  (or dtype) after the first one measured, its speed-up over the first with
  the same switches.
  """
  lines = []
  by_model = {}
  for r in records:
    by_model.setdefault(r['model'], {}).setdefault(
        (r.get('cpu_convolutions'), r.get('dtype', 'float32')),
        {}).setdefault(
            switch_label(r), {}).setdefault(variant_kind(r), r)

  def speedup(tag, base, r):
    same = (' (the same compiled program: this is the run\'s noise)'
            if base.get('hlo_hash') == r.get('hlo_hash') else '')
    lines.append(f'- {tag}: speeds {base["variant"]} up x'
                 f'{base["step_ms"] / r["step_ms"]:.2f} '
                 f'({r["variant"]}){same}')

  for model, libraries in by_model.items():
    first_lib = next(iter(libraries))
    for lib, sets in libraries.items():
      # ' @jaxlib_default', ' bfloat16': what differs from the first.
      where = (f' @{lib[0]}' if lib[0] != first_lib[0] else '') + (
          f' {lib[1]}' if lib[1] != first_lib[1] else '')
      for label, kinds in sets.items():
        tag = (model if label == 'default' else f'{model} ({label})') + where
        q, fp, ft = kinds.get('dtq'), kinds.get('dtq32'), kinds.get('ft')
        if q and fp:
          lines.append(f'- {tag}: quantization costs x'
                       f'{q["step_ms"] / fp["step_ms"]:.2f} '
                       f'({q["variant"]} vs {fp["variant"]})')
        if q and ft:
          lines.append(f'- {tag}: teacher + transfer terms cost x'
                       f'{q["step_ms"] / ft["step_ms"]:.2f} '
                       f'({q["variant"]} vs {ft["variant"]})')
        for kind, r in kinds.items():
          base = kinds.get(kind.partition('_')[0])
          if '_' in kind and base:
            lines.append(f'- {tag}: learned steps ({r["quant_method"]}) '
                         f'cost x{r["step_ms"] / base["step_ms"]:.2f} '
                         f'({r["variant"]} vs {base["variant"]}); starting '
                         f'them took {r["learned_init_s"]:.1f} s once')
      for label, kinds in sets.items():
        for kind, r in kinds.items():
          if label != 'none' and kind in sets.get('none', {}):
            speedup(f'{model} ({label}){where}', sets['none'][kind], r)
          base = libraries[first_lib].get(label, {}).get(kind)
          if lib != first_lib and base is not None:
            what = ', '.join(f'{field}={part}' for field, part, b in zip(
                ('cpu_convolutions', 'dtype'), lib, first_lib) if part != b)
            speedup(f'{model} ({what})', base, r)
  return lines


def measure_model(args, model, specs):
  """Builds, compiles, warms up and times ``specs`` on one model; its records.

  The teacher (random, full precision) is the same for every variant. Every
  variant is compiled first, then all are timed in --rounds interleaved
  rounds, so that load changes on a shared machine hit all variants alike.
  Each record is printed as a JSON line; ``time_ratio`` is relative to the
  first spec.
  """
  size, channels, classes, source = task(model)
  image_size = args.image_size or size
  num_classes = args.num_classes or classes
  num_source = args.num_source_classes or source
  teacher_vars = make_teacher(args, model, image_size, channels, num_classes,
                              num_source)
  variants = []
  for spec in specs:
    print(f'# {model} {spec.name}: building and compiling ...',
          file=sys.stderr, flush=True)
    with spec.patch() if spec.patch else contextlib.nullcontext():
      v = Variant(args, model, spec, teacher_vars, image_size, channels,
                  num_classes, num_source)
    v.warm_up()
    variants.append(v)
  loads = bench_util.time_rounds(model, variants, args.rounds, args.steps,
                                args.take_turns)
  records, first = [], None
  for v in variants:
    rec = v.record()
    rec['load_per_round'] = loads
    v.release()
    if rec['nonfinite_steps']:
      print(f'# WARNING: {model} {v.name}: {rec["nonfinite_steps"]} '
            'non-finite steps (lower --lr?)', file=sys.stderr, flush=True)
    first = first or rec
    rec['time_ratio'] = round(rec['step_ms'] / first['step_ms'], 3)
    records.append(rec)
    bench_util.emit(rec)
  del variants, teacher_vars
  gc.collect()
  return records


def main(argv=None):
  args = parse_args(argv)
  # Honest compile times: no persistent compilation cache.
  jax.config.update('jax_enable_compilation_cache', False)
  n_dev = len(jax.devices())
  if args.batch % n_dev:
    sys.exit(f'--batch {args.batch} must be a multiple of the {n_dev} devices')
  device = jax.devices()[0]
  info = bench_util.machine_info(
      jax=jax.__version__, backend=jax.default_backend(),
      device_kind=device.device_kind, device_count=n_dev,
      xla_flags=os.environ.get('XLA_FLAGS', ''), allocator=args.allocator)
  print('# ' + ', '.join(f'{k}={v}' for k, v in info.items()),
        file=sys.stderr, flush=True)

  records = []
  for model in args.model:
    records += measure_model(args, model, variant_list(args))

  table = bench_util.markdown_table(records, COLUMNS)
  notes = summary_lines(records)
  notes.append(
      '\nimg/s: batch x steps / wall time of the timed steps (one '
      'block_until_ready at the end); step ms: median time between step '
      'completions; compile s: trace + lower + XLA compile (no persistent '
      'cache); GFLOP: XLA cost_analysis() of the compiled step (what XLA '
      'executes: for depthwise convolutions, as in MobileNetV2, XLA runs the '
      'kernel gradient as a dense convolution, C times the nominal work, and '
      'counts it so); memory: XLA memory_analysis() of the compiled step '
      '(donated state counted once).')
  print()
  print(table)
  print('\n'.join(notes))
  if args.out:
    path = args.out.replace('{backend}', jax.default_backend())
    bench_util.write_report(
        path, f'DTQ train step ({", ".join(args.model)}, batch {args.batch}, '
        f'{", ".join(args.dtypes)}, bits {args.bits[0]}/{args.bits[1]})',
        info, table, records, notes)


if __name__ == '__main__':
  main()
