"""Collectives of the data-parallel DTQ train step, counted in its compiled HLO.

On N devices the step's batch is split along the ``('data',)`` mesh. Every
statistic over the batch is then a cross-device reduction on the step's
critical path: each quantized convolution's activation min and max, each
BatchNorm's mean and variance in the forward pass, their gradients in the
backward pass. Then come the gradients' all-reduces. The per-replica statistics switch
(``config.stats_group_size``, docs/method.md) computes BatchNorm statistics
and activation ranges over each device's own examples, as the authors'
``nn.DataParallel`` runs did, which should leave the gradients' all-reduces
only.

This script compiles the step (the one ``train.train_and_evaluate`` jits,
built by train_step.py's ``Variant``) on N virtual CPU devices
(``--xla_force_host_platform_device_count``), with the batch's statistics
(``stats_group_size=0``, the default) and with per-device ones
(``stats_group_size = batch / N``), and counts in the compiled HLO each
collective instruction and the arrays it carries, by pass (forward, backward:
``transpose(jvp(...))`` in the op name) and by kind (scalars, vectors,
larger), with the bytes they move. Nothing is run: the counts are the
partitioner's, the same for a GPU or TPU mesh up to the backend's combining
passes (XLA:GPU and TPU combine small all-reduces further).

  python benchmarks/collectives.py --model=resnet50 --batch=64 --devices=8 \\
      --out=results/collectives_cpu_resnet50_b64_8dev.md
"""

import argparse
import collections
import json
import os
import re
import sys
import time


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', default='resnet50',
                 help='resnet50, mobilenet_v2, small_resnet, ...')
  p.add_argument('--batch', type=int, default=64, help='global batch size')
  p.add_argument('--devices', type=int, default=8,
                 help='virtual CPU devices (the mesh size)')
  p.add_argument('--bits', default='4', help='student bits: K or W/A')
  p.add_argument('--image_size', type=int, default=None,
                 help='default: 224 (28 for small_resnet)')
  p.add_argument('--out', default=None, help='Markdown report path')
  args = p.parse_args(argv)
  if args.batch % args.devices:
    p.error(f'--batch {args.batch} must be a multiple of --devices '
            f'{args.devices}')
  return args


ARGS = _parse_args() if __name__ == '__main__' else None
if ARGS is not None:
  # Before jax is imported: the host platform's device count is fixed then.
  os.environ['XLA_FLAGS'] = (
      os.environ.get('XLA_FLAGS', '') +
      f' --xla_force_host_platform_device_count={ARGS.devices}').strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import bench_util  # pylint: disable=g-import-not-at-top,wrong-import-position

bench_util.add_repo_to_path()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

# Collective HLO instructions (async pairs are counted at their start).
COLLECTIVES = ('all-reduce', 'all-reduce-start', 'all-gather',
               'all-gather-start', 'reduce-scatter', 'collective-permute',
               'collective-permute-start', 'all-to-all')
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?\S+\s*=\s*(?P<shape>\(.*?\)|\S+)\s+'
    r'(?P<op>' + '|'.join(re.escape(c) for c in sorted(
        COLLECTIVES, key=len, reverse=True)) + r')\(')
_ARRAY = re.compile(r'(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]')
_BYTES = {'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2, 'f64': 8,
          's64': 8, 'u64': 8, 'pred': 1, 's8': 1, 'u8': 1}


def collectives(hlo_text):
  """The collective instructions of an HLO module's text.

  Args:
    hlo_text: ``compiled.as_text()``.

  Returns:
    A list of dicts: ``op`` (e.g. 'all-reduce'), ``arrays`` (a list of
    ``(dtype, dims)`` it carries), ``bytes``, ``name`` (its op name) and
    ``backward`` (whether the op name says it belongs to the backward
    pass).
  """
  found = []
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    arrays = [(a['dtype'], tuple(int(d) for d in a['dims'].split(',') if d))
              for a in _ARRAY.finditer(m['shape'])]
    nbytes = 0
    for dtype, dims in arrays:
      size = 1
      for d in dims:
        size *= d
      nbytes += size * _BYTES.get(dtype, 4)
    name = re.search(r'op_name="([^"]*)"', line)
    found.append(dict(op=m['op'], arrays=arrays, bytes=nbytes,
                      name=name.group(1) if name else '',
                      backward=bool(name and 'transpose(' in name.group(1))))
  return found


def summarize(found):
  """Counts of ``collectives``' output: instructions, arrays, bytes."""
  arrays = [(dims, c['backward']) for c in found for _, dims in c['arrays']]
  return dict(
      instructions=len(found),
      forward_instructions=sum(not c['backward'] for c in found),
      backward_instructions=sum(c['backward'] for c in found),
      arrays=len(arrays),
      scalar_arrays=sum(len(d) == 0 for d, _ in arrays),
      vector_arrays=sum(len(d) == 1 for d, _ in arrays),
      larger_arrays=sum(len(d) > 1 for d, _ in arrays),
      megabytes=round(sum(c['bytes'] for c in found) / 1e6, 2),
      ops=dict(collections.Counter(c['op'] for c in found)),
      # Where the forward pass's collectives come from (a few op names).
      forward_examples=sorted({c['name'] for c in found
                               if not c['backward']})[:3])


def main():
  args = ARGS
  bits = bench_util.parse_bits(args.bits)
  step_args = train_step.parse_args([
      f'--model={args.model}', f'--batch={args.batch}',
      f'--bits={args.bits}'] + (
          [f'--image_size={args.image_size}'] if args.image_size else []))
  n = len(jax.devices())
  if n != args.devices:
    sys.exit(f'collectives: {n} devices, not {args.devices} (XLA_FLAGS was '
             'set before this script?)')
  small = args.model == 'small_resnet'
  image_size = args.image_size or (28 if small else 224)
  channels = 1 if small else 3
  num_classes = 5 if small else 257
  num_source = 5 if small else 1000
  teacher = train_step.make_teacher(step_args, args.model, image_size,
                                    channels, num_classes, num_source)
  rows = []
  for group in (0, args.batch // n):
    label = ('batch statistics (stats_group_size=0, default)' if not group
             else f'per-device statistics (stats_group_size={group})')
    spec = train_step.VariantSpec(
        f'dtq_w{bits[0]}a{bits[1]}', 'dtq', bits, {},
        train_step.DEFAULT_CPU_CONVOLUTIONS,
        overrides={'stats_group_size': group})
    print(f'# compiling: {label} ...', file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    variant = train_step.Variant(step_args, args.model, spec, teacher,
                                 image_size, channels, num_classes,
                                 num_source)
    seconds = time.perf_counter() - t0
    summary = summarize(collectives(variant.compiled.as_text()))
    variant.release()
    summary.update(statistics=label, build_and_compile_s=round(seconds, 1))
    print(json.dumps(summary), flush=True)
    rows.append(summary)

  columns = [('statistics', 'statistics'),
             ('collective instructions', 'instructions'),
             ('in the forward pass', 'forward_instructions'),
             ('in the backward pass', 'backward_instructions'),
             ('arrays carried', 'arrays'), ('scalars', 'scalar_arrays'),
             ('vectors', 'vector_arrays'), ('larger', 'larger_arrays'),
             ('MB moved', 'megabytes'), ('ops', 'ops')]
  table = bench_util.markdown_table(rows, columns)
  print(table)
  if args.out:
    info = bench_util.machine_info(jax=jax.__version__,
                                   backend=jax.default_backend(),
                                   device_count=n)
    title = (f'Collectives of the DTQ step: {args.model}, batch {args.batch} '
             f'on {n} devices, bits {bits[0]}/{bits[1]}')
    bench_util.write_report(args.out, title, info, table, rows, notes=[
        'Counted in the compiled HLO (`compiled.as_text()`): each '
        'collective instruction once (async pairs at their start); '
        '"arrays carried" counts the tuple elements of combined ones; '
        'forward/backward by `transpose(` in the op name; MB: the bytes of '
        'the arrays carried (per device).'])


if __name__ == '__main__':
  main()
