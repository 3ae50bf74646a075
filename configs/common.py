"""Shared defaults of the paper settings (docs/method.md, training recipe).

Each paper config calls ``paper_config`` with its dataset fields and the config
argument (``configs/mit67.py:mobilenet_v2,5bit``), so the recipe is written
once. Every field is documented where it is set.
"""

import ml_collections

from dtq_jax.method import delta
from dtq_jax.run.config_validation import DEFAULT_CPU_CONVOLUTIONS
from dtq_jax.run.config_validation import METHODS

NETWORKS = ('resnet50', 'mobilenet_v2')
_BITS = {'2bit': 2, '3bit': 3, '4bit': 4, '5bit': 5, '32bit': 32}
# Softmax temperature of the KL term per network (authors' defaults).
TEMPERATURE = {'resnet50': 60.0, 'mobilenet_v2': 30.0}


def parse_variant(arg, extra=()):
  """Splits a config argument like 'mobilenet_v2,5bit,quick' into tokens.

  Args:
    arg: the text after ':' in ``--config=FILE:ARG`` (may be None or '').
    extra: further tokens the calling config accepts.

  Returns:
    The set of tokens.

  Raises:
    ValueError: for an unknown token, naming the allowed ones.
  """
  tokens = {t.strip() for t in (arg or '').split(',') if t.strip()}
  allowed = set(NETWORKS) | set(_BITS) | set(METHODS) | {'quick'} | set(extra)
  unknown = sorted(tokens - allowed)
  if unknown:
    raise ValueError(f'unknown config variant {",".join(unknown)}; allowed: '
                     f'{", ".join(sorted(allowed))}.')
  return tokens


def method_config():
  """Loss weights of every method; only the selected method's are used."""
  c = ml_collections.ConfigDict()
  # DTQ: CE + kl_weight * KL + afa_weight * AFA.
  c.dtq = ml_collections.ConfigDict(dict(
      kl_weight=0.5,
      afa_weight=0.01,
      temperature=60.0,
      # 'learned' (paper); ablations: 'uniform' (1/C) or 'reversed' (the
      # attention maximises the AFA term, the student still minimises it).
      attention='learned',
      attention_entropy_weight=0.0,  # > 0: loss -= it * sum of entropies.
      afa_normalization='final',  # 'final' (authors' final code) or 'mean'.
      # A user's own network (model='package.module:Class') only; the zoo's
      # are fixed. Module paths (regular expressions, each matching one
      # module) whose outputs feed AFA; () picks the last module at each of
      # the last four resolutions. The source classifier's path ('': the
      # last Dense whose output the network returns).
      taps=(),
      source_classifier='',
  ))
  # Baselines: the DTQ authors did not publish their values (their code has
  # no baseline). docs/method.md ("Where the baselines' values come from")
  # names the source of each value:
  # L2: DELTA's reference train.py (lixingjian/DELTA) trains its 'l2'
  # baseline with SGD weight decay 1e-4 on every parameter, i.e. alpha =
  # 1e-4 in alpha/2 * ||w||^2; the head's 1e-4 is optim.head_weight_decay,
  # which every method has, so beta = 0.
  c.l2 = ml_collections.ConfigDict(dict(alpha=1e-4, beta=0.0))
  # L2-SP: Li et al., ICML 2018 (METHOD.md; the paper's text not verified).
  c.l2sp = ml_collections.ConfigDict(dict(alpha=0.1, beta=0.01))
  # DELTA: alpha 0.01 (run.sh; 0.1 for Stanford Dogs, set in
  # configs/stanford_dogs.py), beta 0.01 (train.py). The channel weights'
  # settings (a head trained on the frozen network, then filter removal on
  # augmented batches) are delta.DEFAULTS, the reference code's.
  c.delta = ml_collections.ConfigDict(dict(alpha=0.01, beta=0.01,
                                           **delta.DEFAULTS))
  return c


def paper_config(dataset, arg=None):
  """The authors' recipe for one target dataset.

  Args:
    dataset: dict of ``config.dataset`` fields.
    arg: variant tokens (network, bits, method, 'quick').

  Returns:
    A ConfigDict.
  """
  tokens = parse_variant(arg)
  c = ml_collections.ConfigDict()
  # A zoo name, or a Flax classifier of your own: 'package.module:Class'
  # (docs/own_network.md), model_kwargs holding its further attributes.
  c.model = 'mobilenet_v2' if 'mobilenet_v2' in tokens else 'resnet50'
  c.model_kwargs = ml_collections.ConfigDict()
  bits = next((_BITS[t] for t in tokens if t in _BITS), 4)
  c.bits_w = bits
  c.bits_a = bits
  c.method = next((t for t in tokens if t in METHODS), 'dtq')
  # 'torchvision' downloads/caches torchvision's ImageNet weights; a path to a
  # .pth/.safetensors file; or 'none' for random initialisation.
  c.pretrained = 'torchvision'

  c.dataset = ml_collections.ConfigDict(dict(
      name='image_folder',
      root='',  # image folder root (image_folder datasets).
      data_dir='',  # TFDS data_dir ('' = TFDS default).
      train_per_class=0,  # 0 = all (official split).
      test_per_class=0,  # 0 = all remaining / official test split.
      val_fraction=0.0,  # held-out validation from train (0 = paper).
      data_seed=0,  # seed of the per-class split.
      image_size=224,
      resize_to=256,  # 0 = no resize (images already image_size).
      crop_padding=0,  # zero padding before the random crop.
      mean=(0.485, 0.456, 0.406),  # ImageNet statistics, on a 0..1 scale.
      std=(0.229, 0.224, 0.225),
      # Decoded-image cache (dtq_jax/data/image_cache.py): images decoded and
      # resized once (uint8), checked, reused by later runs. 'memory' (read
      # into RAM), 'disk' (memory-mapped), 'none' (decode every epoch) or
      # 'auto' (memory if it takes under a quarter of the available RAM and
      # one process runs).
      cache='auto',
      cache_dir='',  # '' = <cache_dir>/images under the cache root.
      # Random crop, flip and normalisation in the jitted step (uint8 sent to
      # the device): 'auto' (on for GPU/TPU, off on CPU), 'on' or 'off'.
      augment_on_device='auto',
  ))
  c.dataset.update(dataset)

  c.batch_size = 64
  c.eval_batch_size = 64
  # The paper trains 9000 iterations at batch 64, expressed in whole epochs:
  # epochs = round(total_steps * batch_size / N_train). num_epochs > 0
  # overrides that.
  c.total_steps = 9000
  c.num_epochs = 0
  c.steps_per_epoch = 0  # 0 = floor(N_train / batch_size) (full batches).
  c.max_eval_batches = 0  # 0 = the whole test set.
  c.optim = ml_collections.ConfigDict(dict(
      lr=0.01,
      momentum=0.9,
      head_weight_decay=1e-4,  # on the target classifier only.
      lr_drop_epoch_fraction=0.67,  # lr x0.1 once at int(0.67 * epochs).
      lr_drop_factor=0.1,
  ))
  c.update(method_config())
  # 0 = the authors' value for the network in `model`, looked up when the run
  # starts, so `--config.model=mobilenet_v2` gets T = 30 as the variant does.
  c.dtq.temperature = 0.0
  c.dtq.temperature_by_model = ml_collections.ConfigDict(TEMPERATURE)

  c.quant = ml_collections.ConfigDict(dict(
      # The quantizer: 'minmax' (paper: ranges from each tensor's extremes)
      # or 'lsq' (opt-in, issue #27): learned steps, LSQ for weights, LSQ or
      # LSQ+ (with a learned offset, for inputs that can be negative) for
      # activations, started from the pretrained weights and the first
      # training batch (docs/method.md, "Learned quantizers"); or 'pact':
      # as 'lsq' with PACT's learned clipping level on non-negative inputs.
      method='minmax',
      # lsq, pact: the learned parameters' learning rate, times optim.lr
      # (and its schedule); no weight decay. 1.0: LSQ's recipe, one lr for
      # weights and steps, its gradient scale balancing their updates.
      lsq_lr_scale=1.0,
      per_channel_weights=False,  # opt-in: one range per output channel.
      range_grad=True,  # paper: gradient reaches the range ends.
      # Speed-ups with the same maths (each measured in benchmarks/): 1x1
      # convolutions as matrix products (opt-in, for XLA:CPU); depthwise
      # ones as shifted multiply-adds (None: where the program runs on a
      # CPU, whose grouped convolution is several times slower, and lax's
      # convolution on GPUs and TPUs; True or False: everywhere); and the
      # quantizer's hand-derived backward pass instead of autodiff through
      # min/max (on: the paper's gradient in closed form, fewer passes over
      # each tensor; docs/speed.md, "Quantization's memory price").
      pointwise_as_dot=False,
      depthwise_as_shifts=ml_collections.config_dict.placeholder(bool),
      fused_vjp=True,
      # 'dynamic' (paper): activation ranges from each batch, in training
      # and evaluation. 'static' (opt-in): training is unchanged but also
      # keeps running input ranges per quantized convolution (quant_ranges,
      # checkpointed); evaluation quantizes with them (the dynamic accuracy
      # is recorded beside it as test_dynamic).
      act_ranges='dynamic',
      range_stat='ema',  # how the kept ranges follow the batches: 'ema',
      # 'mean' (of the per-batch min/max) or 'minmax' (extremes so far).
      range_momentum=0.9,  # of 'ema'.
      # A user's own network only (the zoo's first convolution and
      # classifier are float by construction): layers whose module path
      # matches one of these regular expressions in full stay in full
      # precision, as do the first convolution and the source classifier;
      # quantize_dense also quantizes its nn.Dense layers.
      keep_float=(),
      quantize_dense=False,
  ))
  # MobileNetV2's Dropout(0.2): 'shared' (authors' code) gives the target
  # and the source classifier the same dropped-out features (one mask per
  # step); 'independent' draws a mask for each.
  c.head_dropout = 'shared'
  c.compute_dtype = 'float32'  # 'bfloat16' on accelerators (opt-in).
  # Per-replica statistics (opt-in): BatchNorm statistics and activation
  # ranges over groups of this many consecutive examples, as the authors'
  # two-GPU nn.DataParallel runs had (32 of each batch of 64); 0: over the
  # whole batch. Must divide batch_size and eval_batch_size.
  c.stats_group_size = 0
  # XLA:CPU only: the kernel library of convolutions. 'eigen' is 1.3-1.5x
  # faster for the whole ResNet-50 step than jaxlib 0.10's own choice,
  # YNNPACK ('jaxlib_default'); results agree to float32 rounding
  # (benchmarks/README.md).
  c.cpu_convolutions = DEFAULT_CPU_CONVOLUTIONS
  # Training batches whose host-to-device transfer is issued before the
  # step that needs them is dispatched (1: double buffering; 0: none). The
  # same batches in the same order: no effect on the numbers.
  c.prefetch_batches = 1

  # The authors' protocol (their main.py and hocon configs, repeat = 5):
  # repeat r = 1..5 trains with seed + r; the summary is the mean and
  # population std over the repeats.
  c.seed = 0
  c.repeats = 5
  c.log_every_steps = 50
  c.eval_every_epochs = 1  # paper: evaluate (and checkpoint) every epoch.
  c.checkpoint_every_steps = 0  # 0 = at the end of every epoch.
  c.keep_checkpoints = 2
  c.on_nonfinite = 'stop'  # or 'skip' (skip the update, count it).
  # With 'skip': a run that skipped more than this fraction of its updates
  # fails (exit 1) after writing its result.json: its accuracy is not that
  # of a trained network.
  c.max_nonfinite_fraction = 0.1
  # '' = $XDG_CACHE_HOME/dtq_jax or ~/.cache/dtq_jax. Compiled programs go
  # to its xla/, or to $JAX_COMPILATION_CACHE_DIR where that is set.
  c.cache_dir = ''
  c.compare_methods = ()  # non-empty: run each method, print one table.

  if 'quick' in tokens:
    # A few steps on tiny images: a smoke test of the whole pipeline.
    c.pretrained = 'none'
    c.dataset.image_size = 32
    c.dataset.resize_to = 36
    c.batch_size = 8
    c.eval_batch_size = 8
    c.num_epochs = 2
    c.steps_per_epoch = 3
    c.max_eval_batches = 2
    c.log_every_steps = 1
    c.repeats = 1
    c.delta.batch_size = 0  # DELTA-Q's head: the run's batch of 8.
  return c
