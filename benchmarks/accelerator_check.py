"""One-shot check of the DTQ train step on an accelerator: speed, FLOPs, memory.

Run from a fresh checkout on a machine with jax (with CUDA or TPU support),
flax, optax and orbax; neither TensorFlow nor a network is needed (the train
step path never imports TensorFlow). The two further packages it needs,
ml_collections and tensorboardX (pure Python; the run's metrics log imports
the latter), can be brought along as wheels:

  # on a machine with internet:
  pip download --no-deps --only-binary=:all: -d wheels \
      'ml-collections>=1.1,<2' 'tensorboardX>=2.6.2,<3'
  # on the accelerator machine (absl-py, PyYAML and protobuf come with
  # orbax; the training loop also needs tqdm):
  pip install --no-index --no-deps wheels/*.whl

  python benchmarks/accelerator_check.py            # the grid below, ~10 min
  python benchmarks/accelerator_check.py --smoke    # tiny, on CPU, ~1 min

The grid: ResNet-50 and MobileNetV2 DTQ steps (224 px, 257 classes, random
weights, the step ``train.train_and_evaluate`` jits) at batch 64 and 128, in
float32 and bfloat16 compute, with 4/4 and 32/32 bits. Per step: compile time,
images/s, XLA's FLOPs of the compiled step (``cost_analysis()``), the
utilisation of the device's peak (``PEAK_TFLOPS``), XLA's planned memory
(``memory_analysis()``) and the device's peak so far (``memory_stats()``).
Then the on-device augmentation (``dtq_jax/data/augment.py``): the same step fed
uint8 256 px images that it crops, flips and normalises itself, the
augmentation alone, and the host-to-device copy of a float32 224 px batch
against a uint8 256 px one.

Then the real training loop (``train_loop.py``, ``--loop``): ResNet-50 at
batch 128 in bfloat16, ``train.train_and_evaluate`` fed by its input pipeline
(tf.data where TensorFlow is installed, else the same uint8 rows gathered with
NumPy), its images/s against the step alone of the same spec.

Variants are compiled in parallel threads (XLA compiles without the GIL),
then timed in turn (``--rounds``). ``--budget_s`` stops starting new work when
time runs short, so the report always comes out; the Markdown table is
rewritten atomically after every variant (``--out``, default
``results/accelerator_<device>.md``).
"""

import argparse
import concurrent.futures
import contextlib
import os
import re
import sys
import time
import types

import bench_util

bench_util.add_repo_to_path()

for _module, _package in (('ml_collections', 'ml-collections'),
                          ('tensorboardX', 'tensorboardX')):
  try:
    __import__(_module)
  except ImportError:
    sys.exit(f'accelerator_check: {_module} is missing; bring its wheel '
             f'along (see this script\'s docstring: pip download --no-deps '
             f'{_package}, then pip install --no-index --no-deps the .whl)')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

import train_loop  # pylint: disable=wrong-import-position
import train_step  # pylint: disable=wrong-import-position
from dtq_jax.data import augment  # pylint: disable=wrong-import-position

# Dense (no sparsity) peak TFLOP/s per device kind (a substring of
# ``device.device_kind``) and compute dtype, from the vendors' data sheets:
# NVIDIA H100/H200 SXM (BF16 989, TF32 494.5, FP32 67), H100 PCIe (756, 378,
# 51), A100 (312, 156, 19.5), L4 (121, 60, 30.3); Google Cloud TPU
# documentation (bf16: v4 275, v5e 197, v5p 459, v6e 918). On NVIDIA GPUs
# XLA runs float32 convolutions and matrix products in TF32 at JAX's default
# precision, so float32 is compared with the TF32 peak (the plain FP32 peak
# is in 'fp32'); TPUs run float32 products as bfloat16 passes.
PEAK_TFLOPS = (
    ('H100 PCIe', {'bfloat16': 756.0, 'float32': 378.0, 'fp32': 51.0}),
    ('H200', {'bfloat16': 989.0, 'float32': 494.5, 'fp32': 67.0}),
    ('H100', {'bfloat16': 989.0, 'float32': 494.5, 'fp32': 67.0}),
    ('A100', {'bfloat16': 312.0, 'float32': 156.0, 'fp32': 19.5}),
    ('L4', {'bfloat16': 121.0, 'float32': 60.0, 'fp32': 30.3}),
    ('TPU v4', {'bfloat16': 275.0, 'float32': 275.0}),
    ('TPU v5 lite', {'bfloat16': 197.0, 'float32': 197.0}),
    ('TPU v5e', {'bfloat16': 197.0, 'float32': 197.0}),
    ('TPU v5p', {'bfloat16': 459.0, 'float32': 459.0}),
    ('TPU v6', {'bfloat16': 918.0, 'float32': 918.0}),
)


def peak_tflops(device_kind, dtype):
  """The device's dense peak for ``dtype`` compute, or None if unknown."""
  for kind, peaks in PEAK_TFLOPS:
    if kind.lower() in device_kind.lower():
      return peaks.get(dtype)
  return None


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--smoke', action='store_true',
                 help='tiny: the demo network at batch 8, float32, 4/4 bits')
  p.add_argument('--models', default='resnet50,mobilenet_v2')
  p.add_argument('--batches', default='64,128')
  p.add_argument('--dtypes', default='float32,bfloat16')
  p.add_argument('--bits', default='4,32', help='comma-separated K (K/K)')
  p.add_argument('--augment', default='resnet50:128:bfloat16',
                 help='model:batch:dtype steps also measured with uint8 '
                 'input and on-device augmentation (comma-separated; 4/4 '
                 'bits; "" for none)')
  p.add_argument('--loop', default='resnet50:128:bfloat16',
                 help='model:batch:dtype runs of the real training loop fed '
                 'by its input pipeline (train_loop.py; 4/4 bits), after '
                 'the grid (comma-separated; "" for none)')
  p.add_argument('--loop_steps', type=int, default=30,
                 help='steps of each loop run (the first log interval, '
                 'which compiles, is not timed)')
  p.add_argument('--loop_log_every', type=int, default=10)
  p.add_argument('--steps', type=int, default=10, help='timed steps a round')
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--compile_threads', type=int, default=4)
  p.add_argument('--budget_s', type=float, default=420.0,
                 help='no new variant is started after this many seconds')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default='results/accelerator_{device}.md',
                 help='{device}: the device kind, e.g. nvidia_h200')
  args = p.parse_args(argv)
  if args.smoke:
    args.models, args.batches, args.dtypes, args.bits = (
        'small_resnet', '8', 'float32', '4')
    args.augment = args.loop = 'small_resnet:8:float32'
    args.steps, args.rounds, args.warmup = 2, 1, 1
    args.loop_steps, args.loop_log_every = 4, 2
  args.models = [m for m in args.models.split(',') if m]
  args.batches = [int(b) for b in args.batches.split(',') if b]
  args.dtypes = [d for d in args.dtypes.split(',') if d]
  args.bits = [int(b) for b in args.bits.split(',') if b]
  args.augment = [tuple(a.split(':')) for a in args.augment.split(',') if a]
  args.loop = [tuple(a.split(':')) for a in args.loop.split(',') if a]
  for m in args.models + [a[0] for a in args.augment + args.loop]:
    if m not in train_step.MODELS:
      p.error(f'unknown model {m!r}; allowed: {", ".join(train_step.MODELS)}')
  return args


def variant_plan(args):
  """(model, batch, dtype, bits, on_device_augment) in the order to run."""
  plan = []
  for model in args.models:
    for batch in args.batches:
      for dtype in args.dtypes:
        for bits in args.bits:
          plan.append((model, batch, dtype, bits, False))
  for model, batch, dtype in args.augment:
    plan.append((model, int(batch), dtype, 4, True))
  return plan


def _variant_args(args, batch, dtype):
  """The argparse namespace train_step's Variant reads."""
  return types.SimpleNamespace(
      batch=batch, dtype=dtype, seed=args.seed, lr=None, warmup=args.warmup,
      dump_hlo=None, image_size=None)


def build(args, spec, teachers):
  """Compiles and warms up one variant; returns it (or the error)."""
  model, batch, dtype, bits, on_device = spec
  image_size, channels, classes, source = train_step.task(model)
  name = (f'{model} b{batch} {dtype} w{bits}a{bits}' +
          (' +device aug' if on_device else ''))
  vspec = train_step.VariantSpec(
      name, 'dtq', (bits, bits), {}, None,
      (lambda: train_step.uint8_batches(train_step.pre_crop_size(model)))
      if on_device else None)
  t = time.perf_counter()
  with vspec.patch() if vspec.patch else contextlib.nullcontext():
    v = train_step.Variant(_variant_args(args, batch, dtype), model, vspec,
                           teachers[model], image_size, channels, classes,
                           source)
  v.wall_compile_s = time.perf_counter() - t
  v.spec = spec
  v.warm_up()
  return v


def record(v, device):
  """train_step's record of a timed variant, with the utilisation."""
  dtype, on_device = v.spec[2], v.spec[4]
  r = v.record()
  peak = peak_tflops(device.device_kind, dtype)
  # XLA's cost analysis of an SPMD-partitioned step counts one device's
  # program: per-device FLOPs, against one device's peak; the whole mesh
  # computes n times that.
  n = len(jax.devices())
  tflops = r['gflop_per_s'] / 1e3
  r.update(
      devices=n, gflop_per_step_per_device=r['gflop_per_step'],
      gflop_per_step_global=round(r['gflop_per_step'] * n, 2),
      on_device_augment=on_device, peak_tflops=peak,
      achieved_tflops=round(tflops, 2),
      utilisation_pct=round(100 * tflops / peak, 1) if peak else None,
      wall_compile_s=round(v.wall_compile_s, 1))
  return r


def augment_alone(batch, pre_crop, size, channels, repeats):
  """ms per batch of the jitted augmentation alone, and of the H2D copies."""
  images = np.random.RandomState(0).randint(
      0, 256, (batch, pre_crop, pre_crop, channels)).astype(np.uint8)
  mean, std = (0.485, 0.456, 0.406)[:channels], (0.229, 0.224,
                                                  0.225)[:channels]
  fn = jax.jit(lambda k, x: augment.random_crop_flip_normalize(
      k, x, size, mean, std))
  on_device = jax.device_put(images)
  key = jax.random.PRNGKey(0)
  jax.block_until_ready(fn(key, on_device))
  t = time.perf_counter()
  for i in range(repeats):
    out = fn(jax.random.fold_in(key, i), on_device)
  jax.block_until_ready(out)
  aug_ms = (time.perf_counter() - t) / repeats * 1e3
  floats = np.random.RandomState(0).standard_normal(
      (batch, size, size, channels)).astype(np.float32)
  copies = {}
  for name, host in (('float32', floats), ('uint8', images)):
    jax.block_until_ready(jax.device_put(host))
    t = time.perf_counter()
    for _ in range(repeats):
      jax.block_until_ready(jax.device_put(host))
    copies[name] = (time.perf_counter() - t) / repeats * 1e3
  return aug_ms, copies


COLUMNS = [
    ('step', 'variant'),
    ('img/s', 'img_per_s'),
    ('step ms', 'step_ms'),
    ('compile s', 'compile_s'),
    ('devices', 'devices'),
    ('GFLOP/step, all devices', 'gflop_per_step_global'),
    ('GFLOP/step per device (XLA)', 'gflop_per_step_per_device'),
    ('TFLOP/s per device', 'achieved_tflops'),
    ('peak TFLOP/s per device', 'peak_tflops'),
    ('utilisation %', 'utilisation_pct'),
    ('XLA memory MB', 'mem_total_mb'),
    ('device peak MB so far', 'device_peak_mb_so_far'),
]


def report(info, records, notes, path):
  """The Markdown table; written atomically with ``notes`` to ``path``."""
  table = bench_util.markdown_table(records, COLUMNS)
  if path:
    bench_util.write_report(
        path, f'DTQ train step on {info["device_kind"]} '
        f'({info["backend"]})', info, table, records, notes)
  return table


def main(argv=None):
  args = parse_args(argv)
  start = time.perf_counter()
  if args.smoke:
    jax.config.update('jax_platforms', 'cpu')
    # A check of the script, not of speed: LLVM's optimisations would take
    # most of the time (read when the backend starts, below).
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               ' --xla_backend_optimization_level=0')
  # Honest compile times: no persistent compilation cache.
  jax.config.update('jax_enable_compilation_cache', False)
  device = jax.devices()[0]
  info = bench_util.machine_info(
      jax=jax.__version__, backend=jax.default_backend(),
      device_kind=device.device_kind, device_count=len(jax.devices()),
      tensorflow_imported=sys.modules.get('tensorflow') is not None)
  print('# ' + ', '.join(f'{k}={v}' for k, v in info.items()),
        file=sys.stderr, flush=True)
  path = args.out.replace('{device}', re.sub(
      r'[^a-z0-9]+', '_', device.device_kind.lower()).strip('_') or 'device')
  if args.smoke and args.out == parse_args([]).out:
    path = None  # a smoke run does not overwrite a results file
  notes = []
  if jax.default_backend() == 'cpu':
    notes.append('No accelerator: this run is on the CPU, so it has no GPU '
                 'or TPU numbers (and no peak to compare with).')

  teachers = {}
  for model in dict.fromkeys([m for m, *_ in variant_plan(args)] +
                             [m for m, *_ in args.loop]):
    image_size, channels, classes, source = train_step.task(model)
    teachers[model] = train_step.make_teacher(
        _variant_args(args, args.batches[0], 'float32'), model, image_size,
        channels, classes, source)

  plan = variant_plan(args)
  variants, failed = [], []

  def keep(spec, build_fn):
    try:
      v = build_fn()
    except Exception as e:  # pylint: disable=broad-except
      failed.append(f'- {spec}: failed: {type(e).__name__}: '
                    f'{" ".join(str(e).split())[:200]}')
      return
    if v is not None:
      print(f'# built {v.name} in {v.wall_compile_s:.1f} s', file=sys.stderr,
            flush=True)
      variants.append(v)

  def in_budget(spec):
    if time.perf_counter() - start > args.budget_s:
      return None
    return build(args, spec, teachers)

  # Float-input steps compile in parallel; the uint8 ones after them, one at
  # a time (they patch train_step.random_batch while they are built).
  with concurrent.futures.ThreadPoolExecutor(args.compile_threads) as pool:
    futures = {pool.submit(in_budget, spec): spec
               for spec in plan if not spec[4]}
    for future in concurrent.futures.as_completed(futures):
      keep(futures[future], future.result)
  for spec in plan:
    if spec[4]:
      keep(spec, lambda s=spec: in_budget(s))
  variants.sort(key=lambda v: plan.index(v.spec))
  built = {v.spec for v in variants}
  skipped = [f'- {spec}: not run (--budget_s {args.budget_s} reached)'
             for spec in plan if spec not in built and not any(
                 str(spec) in f for f in failed)]

  alone = {}
  for r in range(args.rounds):
    if r and time.perf_counter() - start > args.budget_s + 60:
      break
    for v in variants:
      v.time_steps(args.steps)
    records = [record(v, device) for v in variants]
    by_spec = {v.spec: rec for v, rec in zip(variants, records)}
    aug_notes = augment_notes(by_spec, alone)
    report(info, records, notes + failed + skipped + aug_notes + [
        _legend(time.perf_counter() - start)], path)
  # The loop builds its own state and step: the grid's go first.
  for v in variants:
    v.release()
  loop_notes = []
  for model, batch, dtype in args.loop:
    if time.perf_counter() - start > args.budget_s + 60:
      loop_notes.append(f'- Training loop {model} batch {batch} {dtype}: not '
                        f'run (--budget_s {args.budget_s} reached)')
      continue
    loop_notes.append(loop_note(args, model, int(batch), dtype,
                                teachers[model], by_spec))
    report(info, records, notes + failed + skipped + aug_notes + loop_notes +
           [_legend(time.perf_counter() - start)], path)
  for rec in records:
    bench_util.emit(rec)
  print()
  print(report(info, records, (), None))
  print('\n'.join(notes + failed + skipped + aug_notes + loop_notes))


def loop_note(args, model, batch, dtype, teacher, by_spec):
  """Times the training loop of one spec (train_loop.py); a report line.

  Its images/s are set against the grid's step of the same model, batch,
  dtype and input (uint8 with on-device augmentation, else float32).
  """
  what = f'Training loop {model} batch {batch} {dtype} w4a4'
  try:
    # The smoke run on a CPU augments on the device as an accelerator would.
    config = train_loop.loop_config(model, batch, dtype, args.loop_steps,
                                    args.loop_log_every,
                                    'on' if args.smoke else 'auto')
    feed = train_loop.resolve_feed('auto')
    _, channels, classes, _ = train_step.task(model)
    data = train_loop.make_data(config, 4 * batch, classes, channels, feed,
                                args.seed)
    loop = train_loop.time_loop(config, data, teacher, args.seed)
  except Exception as e:  # pylint: disable=broad-except
    return (f'- {what}: failed: {type(e).__name__}: '
            f'{" ".join(str(e).split())[:300]}')
  bench_util.emit(dict(loop, what=what, feed=feed))
  step = by_spec.get((model, batch, dtype, 4, loop['on_device']))
  against = ('no step of the same model, batch, dtype and input in the '
             'grid to compare with' if step is None else
             f'the step alone {step["img_per_s"]:.1f} img/s, so the loop '
             f'runs at x{loop["loop_img_per_s"] / step["img_per_s"]:.3f} '
             'of it')
  return (
      f'- {what} (`train.train_and_evaluate`; feed: {feed}; on-device '
      f'augmentation: {"on" if loop["on_device"] else "off"}; '
      f'prefetch_batches {loop["prefetch_batches"]}): '
      f'{loop["loop_img_per_s"]:.1f} img/s, the median of the loop\'s own '
      f'rate over log intervals of {args.loop_log_every} steps after the '
      f'first, which compiles ({loop["loop_intervals_img_per_s"]}); '
      f'{against}.')


def augment_notes(by_spec, alone):
  """What the on-device augmentation costs, per uint8 variant.

  ``by_spec`` maps each variant's spec to its record; ``alone`` keeps the
  timings of the augmentation by itself and of the host-to-device copies
  (measured once per variant) between calls.
  """
  out = []
  for spec, rec in by_spec.items():
    model, batch, dtype, bits, on_device = spec
    base = by_spec.get((model, batch, dtype, bits, False))
    if not on_device or base is None:
      continue
    image_size, channels, *_ = train_step.task(model)
    pre_crop = train_step.pre_crop_size(model)
    if spec not in alone:
      alone[spec] = augment_alone(batch, pre_crop, image_size, channels, 20)
    aug_ms, copies = alone[spec]
    step_ms = base['step_ms']
    out.append(
        f'- On-device augmentation, {model} batch {batch} {dtype}: the step '
        f'fed uint8 {pre_crop} px images takes {rec["step_ms"]:.2f} ms '
        f'against {step_ms:.2f} ms for float32 {image_size} px input '
        f'({100 * (rec["step_ms"] / step_ms - 1):+.1f}%, within the noise '
        f'of the timing when small); the augmentation alone (jitted) '
        f'{aug_ms:.2f} ms ({100 * aug_ms / step_ms:.2f}% of the step). '
        f'Host-to-device copy of one batch: float32 {copies["float32"]:.2f} '
        f'ms, uint8 {copies["uint8"]:.2f} ms.')
  return out


def _legend(total_s):
  return (
      '\nimg/s: batch x steps / wall time of the timed steps; step ms: '
      'median time between step completions; compile s: trace + lower + XLA '
      'compile of the step (float-input steps compiled in parallel threads, '
      'no persistent cache); GFLOP: XLA cost_analysis() of the compiled '
      'step, which counts one device\'s program (all devices: times the '
      'device count); utilisation: one device\'s achieved FLOP/s over its '
      'dense peak of '
      'PEAK_TFLOPS (float32 on NVIDIA: the TF32 peak); XLA memory: '
      'memory_analysis() (arguments + outputs + temporaries, donated state '
      'once); device peak: memory_stats() peak_bytes_in_use of the process '
      f'so far (all variants are alive at once). Wall time so far '
      f'{total_s:.0f} s.')


if __name__ == '__main__':
  main()
