"""Where the time of the DTQ step goes: every convolution shape, timed alone.

Collects every convolution the student runs (shape, kernel, stride, bits) by
intercepting ``QuantConv`` calls of ``build_networks``'s student, and times,
for each distinct shape, jitted on the present backend:

  S fp        student conv, full precision, forward + backward (input and
              kernel gradients, as in the step; the stem, whose input is the
              image batch, only the kernel gradient)
  S q         the same with the product's fake quantization (--bits), i.e.
              what the DTQ step does per conv (``layers.QuantConv``)
  T fp        the teacher's conv: forward only, full precision

and the same with the product's opt-in speed-ups (``config.quant`` switches,
``QuantConv`` attributes; same maths), each where it changes the conv:

  S q pwdot, S fp pwdot, T pwdot      pointwise_as_dot (1x1 convs without
                                      padding, strided ones included)
  S q shifts, S fp shifts, T shifts   depthwise_as_shifts (depthwise convs)
  S q fused   fused_vjp (quant.fake_quant_fused: the quantizer's
              hand-derived backward pass; quantized convs)
  S q all     all three switches on (where pwdot or shifts applies; elsewhere
              all = fused)

and, with ``--prototypes``, a candidate implementation that is NOT product
code (defined here to measure the suggestion):

  S q im2col  kxk convs as one matrix product over the k*k shifted slices,
              quantized with fused_vjp's quantizer (compare with S q fused)
  T im2col    the same forward-only for the teacher

Each (shape, implementation) is timed ``--reps`` times, interleaved with all
others (load changes hit everything alike); the per-call median (or min,
``--stat``) times the number of such convs in the network gives its share of
a step. The sums estimate the convolution part of the step (student forward +
backward, teacher forward); the rest of a step (BatchNorm, ReLU, losses,
optimizer) is the difference to train_step.py's step time.

  python benchmarks/conv_profile.py --model=resnet50 --batch=16 --reps=5 \
      --prototypes --out=results/conv_profile_cpu.md
  python benchmarks/conv_profile.py --model=small_resnet --batch=8 --reps=1 \
      --only='S q,S q pwdot,S q fused'
"""

import argparse
import collections
import functools
import sys
import time

import bench_util

bench_util.add_repo_to_path()

import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import ml_collections  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from dtq_jax import layers  # pylint: disable=wrong-import-position
from dtq_jax.method import networks  # pylint: disable=wrong-import-position
from dtq_jax import quant  # pylint: disable=wrong-import-position
from dtq_jax.run import config_validation  # pylint: disable=wrong-import-position
from dtq_jax.run import runtime as runtime_lib  # pylint: disable=wrong-import-position

import train_step as train_step_bench  # pylint: disable=wrong-import-position


# ---------------------------------------------------------------------------
# Padding, and the im2col prototype (not product code).


def _pads(spec):
  """((top, bottom), (left, right)) of a spec's padding, as QuantConv pads."""
  pads = layers.normalize_padding(spec['padding'], 2)
  if isinstance(pads, str):
    pads = jax.lax.padtype_to_pads(spec['in_shape'][1:3],
                                   spec['kernel_size'], spec['strides'], pads)
  return tuple(tuple(p) for p in pads)


def conv_im2col(spec, x, k):
  """kxk conv = one matmul over the concatenated shifted slices."""
  kh, kw = spec['kernel_size']
  sh, sw = spec['strides']
  (pt, pb), (pl, pr) = _pads(spec)
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho = (xp.shape[1] - kh) // sh + 1
  wo = (xp.shape[2] - kw) // sw + 1
  cols = [xp[:, i:i + (ho - 1) * sh + 1:sh, j:j + (wo - 1) * sw + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(cols, axis=-1)
  return jnp.einsum('nhwc,cd->nhwd', patches,
                    k.reshape(kh * kw * k.shape[2], k.shape[3]))


def is_depthwise(spec):
  return (spec['groups'] > 1 and spec['groups'] == spec['in_shape'][-1] and
          spec['features'] == spec['groups'])


# ---------------------------------------------------------------------------
# Collecting the network's convolutions.


def collect_convs(model, batch, image_size, bits):
  """Specs of every QuantConv call of the student, in call order."""
  config = train_step_bench.make_config(model, 'dtq', bits, 'float32', {},
                                        batch, image_size)
  small = model == 'small_resnet'
  num_source = 5 if small else 1000
  channels = 1 if small else 3
  student = networks.build_networks(config, 10, num_source).student
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if isinstance(m, layers.QuantConv) and context.method_name == '__call__':
      calls.append(dict(
          name='/'.join(m.path) if hasattr(m, 'path') else m.name,
          in_shape=tuple(args[0].shape), features=m.features,
          kernel_size=tuple(m.kernel_size), strides=tuple(m.strides),
          padding=m.padding, groups=m.feature_group_count,
          bits_w=m.bits_w, bits_a=m.bits_a))
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((batch, image_size, image_size, channels),
                           jnp.float32)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda x: student.init(jax.random.PRNGKey(0), x,
                                          train=False), x)
  return calls


def spec_key(c):
  pad = c['padding'] if isinstance(c['padding'], (str, int)) else tuple(
      map(tuple, c['padding']))
  return (c['in_shape'], c['features'], c['kernel_size'], c['strides'], pad,
          c['groups'], c['bits_w'], c['bits_a'])


# The product's switches (train_step.SWITCHES) by their short names in the
# implementation names.
LABELS = {'pointwise_as_dot': 'pwdot', 'depthwise_as_shifts': 'shifts',
          'fused_vjp': 'fused'}


def conv_rewrites(spec):
  """The product's convolution switches that change this conv.

  QuantConv's conditions: pointwise_as_dot for 1x1 convs without padding and
  groups, depthwise_as_shifts for depthwise convs.
  """
  out = []
  if (spec['kernel_size'] == (1, 1) and spec['groups'] == 1 and
      _pads(spec) == ((0, 0), (0, 0))):
    out.append('pointwise_as_dot')
  if is_depthwise(spec):
    out.append('depthwise_as_shifts')
  return out


def fwd_flops(spec, out_shape):
  n, ho, wo, co = out_shape
  kh, kw = spec['kernel_size']
  ci = spec['in_shape'][-1] // spec['groups']
  return 2.0 * n * ho * wo * co * kh * kw * ci


# ---------------------------------------------------------------------------
# Implementations to time.


def module_fn(spec, bits_w, bits_a, switches=None):
  """The product's QuantConv for ``spec``; ``switches``: {attribute: bool}."""
  conv = layers.QuantConv(
      features=spec['features'], kernel_size=spec['kernel_size'],
      strides=spec['strides'], padding=spec['padding'],
      feature_group_count=spec['groups'], use_bias=False, bits_w=bits_w,
      bits_a=bits_a, **(switches or {}))
  return lambda x, k: conv.apply({'params': {'kernel': k}}, x)


def proto_fn(spec, bits_w, bits_a, conv_impl):
  def f(x, k):
    x = quant.fake_quant(x, bits_a, fused_vjp=True)
    k = quant.fake_quant(k, bits_w, fused_vjp=True)
    return conv_impl(spec, x, k)
  return f


def implementations(spec, prototypes):
  """name -> (kind, fn); kind 'S' = fwd+bwd (student), 'T' = fwd (teacher)."""
  bw, ba = spec['bits_w'], spec['bits_a']
  fp = quant.FULL_PRECISION
  out = {'S fp': ('S', module_fn(spec, fp, fp)),
         'S q': ('S', module_fn(spec, bw, ba)),
         'T fp': ('T', module_fn(spec, fp, fp))}
  rewrites = conv_rewrites(spec)
  for switch in rewrites:
    on, label = {switch: True}, LABELS[switch]
    out[f'S q {label}'] = ('S', module_fn(spec, bw, ba, on))
    out[f'S fp {label}'] = ('S', module_fn(spec, fp, fp, on))
    out[f'T {label}'] = ('T', module_fn(spec, fp, fp, on))
  if bw != fp or ba != fp:
    out['S q fused'] = ('S', module_fn(spec, bw, ba, {'fused_vjp': True}))
    if rewrites:
      out['S q all'] = ('S', module_fn(
          spec, bw, ba, {s: True for s in train_step_bench.SWITCHES}))
  if prototypes and spec['kernel_size'] != (1, 1) and spec['groups'] == 1:
    out['S q im2col'] = ('S', proto_fn(spec, bw, ba, conv_im2col))
    out['T im2col'] = ('T', proto_fn(spec, fp, fp, conv_im2col))
  return out


def build_timer(kind, fn, x, k, g, input_grad=True, compiler_options=None):
  jit = functools.partial(jax.jit, compiler_options=compiler_options)
  if kind == 'T':
    f = jit(fn)
    args = (x, k)
  elif not input_grad:
    # The stem: the step differentiates its kernel, not the images.
    def fwd_bwd_kernel(x, k, g):
      _, vjp = jax.vjp(lambda k: fn(x, k), k)
      return vjp(g)
    f = jit(fwd_bwd_kernel)
    args = (x, k, g)
  else:
    def fwd_bwd(x, k, g):
      _, vjp = jax.vjp(fn, x, k)
      return vjp(g)
    f = jit(fwd_bwd)
    args = (x, k, g)
  compiled = f.lower(*args).compile()
  jax.block_until_ready(compiled(*args))  # warm-up

  def run():
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - t
  return run


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='resnet50',
                 choices=train_step_bench.MODELS)
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--image_size', type=int, default=None)
  p.add_argument('--bits', type=bench_util.parse_bits, default=(4, 4))
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--stat', default='median', choices=('median', 'min'))
  p.add_argument('--prototypes', action='store_true',
                 help='also time the candidate implementation (im2col, not '
                 'product code)')
  p.add_argument('--cpu_convolutions',
                 default=train_step_bench.DEFAULT_CPU_CONVOLUTIONS,
                 choices=config_validation.CPU_CONVOLUTIONS,
                 help='config.cpu_convolutions for every timed function '
                 '(XLA:CPU only)')
  p.add_argument('--only', default=None,
                 help='comma-separated implementation names to time')
  p.add_argument('--out', default=None, help='Markdown report path')
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  jax.config.update('jax_enable_compilation_cache', False)
  image_size = args.image_size or (28 if args.model == 'small_resnet' else 224)
  info = bench_util.machine_info(
      jax=jax.__version__, backend=jax.default_backend(),
      device_kind=jax.devices()[0].device_kind)
  print('# ' + ', '.join(f'{k}={v}' for k, v in info.items()),
        file=sys.stderr, flush=True)
  calls = collect_convs(args.model, args.batch, image_size, args.bits)
  groups = collections.OrderedDict()
  for c in calls:
    groups.setdefault(spec_key(c), []).append(c)
  only = set(args.only.split(',')) if args.only else None
  options = runtime_lib.compiler_options(
      ml_collections.ConfigDict({'cpu_convolutions': args.cpu_convolutions}))

  rs = np.random.RandomState(0)
  timers, shapes = {}, []
  for key, members in groups.items():
    spec = members[0]
    x = jnp.asarray(rs.standard_normal(spec['in_shape']).astype(np.float32))
    kshape = spec['kernel_size'] + (spec['in_shape'][-1] // spec['groups'],
                                    spec['features'])
    k = jnp.asarray(
        (rs.standard_normal(kshape) * 0.05).astype(np.float32))
    out = jax.eval_shape(module_fn(spec, 32, 32), x, k)
    g = jnp.asarray(rs.standard_normal(out.shape).astype(np.float32))
    impls = implementations(spec, args.prototypes)
    desc = (f'{spec["kernel_size"][0]}x{spec["kernel_size"][1]}'
            f'{"/s" + str(spec["strides"][0]) if spec["strides"] != (1, 1) else ""}'
            f'{" dw" if spec["groups"] > 1 else ""} '
            f'{spec["in_shape"][1]}px {spec["in_shape"][-1]}->'
            f'{spec["features"]}'
            f'{"" if spec["bits_w"] < 32 else " (fp stem)"}')
    shapes.append(dict(key=key, desc=desc, count=len(members),
                       example=members[0]['name'],
                       gflop=fwd_flops(spec, out.shape) / 1e9, times={}))
    print(f'# compiling {desc} x{len(members)}: {", ".join(impls)}',
          file=sys.stderr, flush=True)
    for name, (kind, fn) in impls.items():
      if only and name not in only:
        continue
      timers[(len(shapes) - 1, name)] = build_timer(
          kind, fn, x, k, g, input_grad=members[0] is not calls[0],
          compiler_options=options)

  samples = collections.defaultdict(list)
  for rep in range(args.reps):
    print(f'# rep {rep + 1}/{args.reps}', file=sys.stderr, flush=True)
    for tkey, run in timers.items():
      samples[tkey].append(run())
  stat = np.median if args.stat == 'median' else np.min
  for (i, name), ts in samples.items():
    shapes[i]['times'][name] = float(stat(ts))

  impl_names = []
  for s in shapes:
    for n in s['times']:
      if n not in impl_names:
        impl_names.append(n)
  # Per-shape table, sorted by the product step's cost (S q x count).
  rows = []
  for s in shapes:
    row = {'conv': s['desc'], 'count': s['count'], 'example': s['example'],
           'gflop_fwd': round(s['gflop'], 3)}
    for n in impl_names:
      t = s['times'].get(n)
      row[f'{n} ms'] = None if t is None else round(t * 1e3, 2)
    base = s['times'].get('S q', 0.0) * s['count']
    row['S q total ms'] = round(base * 1e3, 1)
    if 'S fp' in s['times']:
      row['GFLOP/s S fp'] = round(3 * s['gflop'] / s['times']['S fp'], 1)
    if 'T fp' in s['times']:
      row['GFLOP/s T fp'] = round(s['gflop'] / s['times']['T fp'], 1)
    rows.append(row)
  rows.sort(key=lambda r: -r['S q total ms'])
  total_sq = sum(r['S q total ms'] for r in rows)
  for r in rows:
    r['share %'] = round(100 * r['S q total ms'] / max(total_sq, 1e-9), 1)
  columns = ([('conv', 'conv'), ('count', 'count'), ('example', 'example'),
              ('GFLOP fwd', 'gflop_fwd')] +
             [(f'{n} ms', f'{n} ms') for n in impl_names] +
             [('S q x count ms', 'S q total ms'), ('share %', 'share %'),
              ('GFLOP/s S fp', 'GFLOP/s S fp'),
              ('GFLOP/s T fp', 'GFLOP/s T fp')])
  table = bench_util.markdown_table(rows, columns)

  # Whole-network estimates: per shape, pick an implementation per option.
  def total(choose):
    ms = 0.0
    for s in shapes:
      t = choose(s['times'])
      if t is None:
        return None
      ms += t * s['count'] * 1e3
    return round(ms, 1)

  def pick(*names):
    def choose(times):
      vals = [times[n] for n in names if n in times]
      return min(vals) if vals else None
    return choose

  def first(*names):
    """Per shape, the first of ``names`` it has (a switch that does not
    change a conv leaves it as it is)."""
    def choose(times):
      return next((times[n] for n in names if n in times), None)
    return choose

  estimates = [
      ('student fwd+bwd, full precision (lax.conv)', total(first('S fp'))),
      ('student fwd+bwd, full precision, pointwise_as_dot + '
       'depthwise_as_shifts',
       total(first('S fp pwdot', 'S fp shifts', 'S fp'))),
      ('student fwd+bwd, quantized: the product default',
       total(first('S q'))),
  ] + [
      (f'student fwd+bwd, quantized, {switch}',
       total(first(f'S q {label}', 'S q')))
      for switch, label in LABELS.items()
  ] + [
      ('student fwd+bwd, quantized, all switches',
       total(first('S q all', 'S q fused', 'S q'))),
      ('teacher fwd (lax.conv)', total(first('T fp'))),
      ('teacher fwd, pointwise_as_dot + depthwise_as_shifts (fused_vjp: '
       'not quantized)',
       total(first('T pwdot', 'T shifts', 'T fp'))),
  ]
  if args.prototypes:
    estimates += [
        ('student fwd+bwd, quantized, best of product + prototype',
         total(pick(*[n for n in impl_names if n.startswith('S q')]))),
        ('teacher fwd, best of product + prototype',
         total(pick(*[n for n in impl_names if n.startswith('T ')]))),
    ]
  est_lines = ['| estimate (sum over all convs of count x time) | ms |',
               '|---|---|']
  est_lines += [f'| {n} | {bench_util.fmt(v)} |' for n, v in estimates]
  est_table = '\n'.join(est_lines)
  record = {'model': args.model, 'batch': args.batch,
            'image_size': image_size, 'bits': list(args.bits),
            'stat': args.stat, 'reps': args.reps,
            'cpu_convolutions': args.cpu_convolutions,
            'estimates_ms': {n: v for n, v in estimates},
            'shapes': [{k: v for k, v in s.items() if k != 'key'}
                       for s in shapes]}
  bench_util.emit(record)
  print()
  print(table)
  print()
  print(est_table)
  if args.out:
    bench_util.write_report(
        args.out, f'Convolutions of the DTQ step, {args.model}, batch '
        f'{args.batch}, {image_size} px, bits {args.bits[0]}/{args.bits[1]} '
        f'({args.stat} of {args.reps}; cpu_convolutions='
        f'{args.cpu_convolutions})', info, table + '\n\n' + est_table,
        [record], [
            'S = student conv forward + backward (input and kernel '
            'gradients); T = teacher conv forward; q = fake-quantized '
            '(product QuantConv); pwdot / shifts / fused = QuantConv with '
            'pointwise_as_dot / depthwise_as_shifts / fused_vjp; all = all '
            'three; im2col = prototype defined in benchmarks/conv_profile.py '
            '(not product code), with fused_vjp\'s quantizer. Times are per '
            'call.'])


if __name__ == '__main__':
  main()
