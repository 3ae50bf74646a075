"""Where the time of the DTQ step goes: every convolution shape, timed alone.

Collects every convolution the student runs (shape, kernel, stride, bits) by
intercepting ``QuantConv`` calls of ``build_networks``'s student, and times,
for each distinct shape, jitted on the present backend:

  S fp        student conv, full precision, forward + backward (input and
              kernel gradients, as in the step; the stem, whose input is the
              image batch, only the kernel gradient)
  S q         the same with the product's fake quantization (--bits), i.e.
              what the DTQ step does per conv (``layers.QuantConv``)
  S q pwdot   the same with ``pointwise_as_dot=True`` (1x1 stride-1 only)
  T fp        the teacher's conv: forward only, full precision
  T pwdot     the same with ``pointwise_as_dot=True``

and, with ``--prototypes``, candidate implementations that are NOT product
code (defined here to measure suggestions):

  S q fastq   fake quantization with a hand-written VJP (same values and the
              same gradient as quant.fake_quant, ties included) + the best
              product conv for the shape
  S q s2dot   1x1 stride-2 (ResNet downsample) as subsample + matrix product
  S q im2col  kxk convs as one matrix product over the k*k shifted slices
  T s2dot / T im2col   the same forward-only for the teacher

Each (shape, implementation) is timed ``--reps`` times, interleaved with all
others (load changes hit everything alike); the per-call median (or min,
``--stat``) times the number of such convs in the network gives its share of
a step. The sums estimate the convolution part of the step (student forward +
backward, teacher forward); the rest of a step (BatchNorm, ReLU, losses,
optimizer) is the difference to train_step.py's step time.

  python benchmarks/conv_profile.py --model=resnet50 --batch=16 --reps=5 \
      --prototypes --out=results/conv_profile_cpu.md
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
import numpy as np  # pylint: disable=wrong-import-position

from dtq_jax import layers  # pylint: disable=wrong-import-position
from dtq_jax import quant  # pylint: disable=wrong-import-position
from dtq_jax import train  # pylint: disable=wrong-import-position

import train_step as train_step_bench  # pylint: disable=wrong-import-position


# ---------------------------------------------------------------------------
# Prototypes (not product code).


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fast_fake_quant(x, bits):
  """quant.fake_quant(x, bits) (per tensor, range_grad=True), own VJP.

  Backward: g + [x is max] * t / (n * count_max) - [x is min] * t /
  (n * count_min) with t = sum(g * (round(u) - u)), n = 2**bits - 1: the
  gradient METHOD.md specifies (the lo terms cancel), computed in one
  reduction pass and one elementwise pass.
  """
  return _fq_fwd(x, bits)[0]


def _fq_fwd(x, bits):
  xf = x.astype(jnp.float32)
  lo, hi = jnp.min(xf), jnp.max(xf)
  scale = (hi - lo) / (2**bits - 1)
  degenerate = scale <= 0
  safe = jnp.where(degenerate, 1.0, scale)
  q = jnp.round((xf - lo) / safe) * safe + lo
  return jnp.where(degenerate, xf, q).astype(x.dtype), (x, lo, hi, safe,
                                                        degenerate)


def _fq_bwd(bits, res, g):
  x, lo, hi, safe, degenerate = res
  xf, gf = x.astype(jnp.float32), g.astype(jnp.float32)
  u = (xf - lo) / safe
  t = jnp.sum(gf * (jnp.round(u) - u))
  is_hi, is_lo = xf == hi, xf == lo
  n_hi = jnp.sum(is_hi.astype(jnp.float32))
  n_lo = jnp.sum(is_lo.astype(jnp.float32))
  c = jnp.where(degenerate, 0.0, t / (2**bits - 1))
  dx = gf + c * (is_hi.astype(jnp.float32) / n_hi -
                 is_lo.astype(jnp.float32) / n_lo)
  return (dx.astype(g.dtype),)


fast_fake_quant.defvjp(_fq_fwd, _fq_bwd)


def _maybe_fast_quant(x, bits):
  return x if bits == quant.FULL_PRECISION else fast_fake_quant(x, bits)


def _pads(spec):
  p = spec['padding']
  if isinstance(p, int):
    return ((p, p), (p, p))
  if isinstance(p, str):
    if p == 'VALID':
      return ((0, 0), (0, 0))
    kh, kw = spec['kernel_size']
    return (((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2))
  return tuple(tuple(q) for q in p)


def conv_s2dot(spec, x, k):
  """1x1 conv with stride s and no padding = subsample, then matmul."""
  sh, sw = spec['strides']
  return jnp.einsum('nhwc,cd->nhwd', x[:, ::sh, ::sw, :], k[0, 0])


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


def conv_dwshift(spec, x, k):
  """Depthwise kxk conv as k*k shifted elementwise multiply-adds."""
  kh, kw = spec['kernel_size']
  sh, sw = spec['strides']
  (pt, pb), (pl, pr) = _pads(spec)
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  ho = (xp.shape[1] - kh) // sh + 1
  wo = (xp.shape[2] - kw) // sw + 1
  y = None
  for i in range(kh):
    for j in range(kw):
      term = xp[:, i:i + (ho - 1) * sh + 1:sh,
                j:j + (wo - 1) * sw + 1:sw, :] * k[i, j, 0]
      y = term if y is None else y + term
  return y


def is_depthwise(spec):
  return (spec['groups'] > 1 and spec['groups'] == spec['in_shape'][-1] and
          spec['features'] == spec['groups'])


# ---------------------------------------------------------------------------
# Collecting the network's convolutions.


def collect_convs(model, batch, image_size, bits):
  """Specs of every QuantConv call of the student, in call order."""
  config = train_step_bench.make_config(model, 'dtq', bits, 'float32', False,
                                        batch, image_size)
  small = model == 'small_resnet'
  num_source = 5 if small else 1000
  channels = 1 if small else 3
  student = train.build_networks(config, 10, num_source).student
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


def is_pointwise(spec):
  return (spec['kernel_size'] == (1, 1) and spec['strides'] == (1, 1) and
          spec['groups'] == 1)


def fwd_flops(spec, out_shape):
  n, ho, wo, co = out_shape
  kh, kw = spec['kernel_size']
  ci = spec['in_shape'][-1] // spec['groups']
  return 2.0 * n * ho * wo * co * kh * kw * ci


# ---------------------------------------------------------------------------
# Implementations to time.


def module_fn(spec, bits_w, bits_a, pointwise_as_dot):
  conv = layers.QuantConv(
      features=spec['features'], kernel_size=spec['kernel_size'],
      strides=spec['strides'], padding=spec['padding'],
      feature_group_count=spec['groups'], use_bias=False, bits_w=bits_w,
      bits_a=bits_a, pointwise_as_dot=pointwise_as_dot)
  return lambda x, k: conv.apply({'params': {'kernel': k}}, x)


def proto_fn(spec, bits_w, bits_a, conv_impl):
  def f(x, k):
    x = _maybe_fast_quant(x, bits_a)
    k = _maybe_fast_quant(k, bits_w)
    return conv_impl(spec, x, k)
  return f


def product_conv(spec, x, k):
  if is_pointwise(spec):
    return jnp.einsum('nhwc,cd->nhwd', x, k[0, 0])
  return jax.lax.conv_general_dilated(
      x, k, spec['strides'], _pads(spec),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=spec['groups'])


def implementations(spec, prototypes):
  """name -> (kind, fn); kind 'S' = fwd+bwd (student), 'T' = fwd (teacher)."""
  bw, ba = spec['bits_w'], spec['bits_a']
  fp = quant.FULL_PRECISION
  out = {'S fp': ('S', module_fn(spec, fp, fp, False)),
         'S q': ('S', module_fn(spec, bw, ba, False)),
         'T fp': ('T', module_fn(spec, fp, fp, False))}
  pw = is_pointwise(spec)
  if pw:
    out['S q pwdot'] = ('S', module_fn(spec, bw, ba, True))
    out['S fp pwdot'] = ('S', module_fn(spec, fp, fp, True))
    out['T pwdot'] = ('T', module_fn(spec, fp, fp, True))
  if prototypes:
    if bw != fp or ba != fp:
      out['S q fastq'] = ('S', proto_fn(spec, bw, ba, product_conv))
    s2 = (spec['kernel_size'] == (1, 1) and spec['strides'] != (1, 1) and
          spec['groups'] == 1 and _pads(spec) == ((0, 0), (0, 0)))
    if s2:
      out['S q s2dot'] = ('S', proto_fn(spec, bw, ba, conv_s2dot))
      out['T s2dot'] = ('T', proto_fn(spec, fp, fp, conv_s2dot))
    if spec['kernel_size'] != (1, 1) and spec['groups'] == 1:
      out['S q im2col'] = ('S', proto_fn(spec, bw, ba, conv_im2col))
      out['T im2col'] = ('T', proto_fn(spec, fp, fp, conv_im2col))
    if is_depthwise(spec):
      out['S q dwshift'] = ('S', proto_fn(spec, bw, ba, conv_dwshift))
      out['T dwshift'] = ('T', proto_fn(spec, fp, fp, conv_dwshift))
  return out


def build_timer(kind, fn, x, k, g, input_grad=True):
  if kind == 'T':
    f = jax.jit(fn)
    args = (x, k)
  elif not input_grad:
    # The stem: the step differentiates its kernel, not the images.
    def fwd_bwd_kernel(x, k, g):
      _, vjp = jax.vjp(lambda k: fn(x, k), k)
      return vjp(g)
    f = jax.jit(fwd_bwd_kernel)
    args = (x, k, g)
  else:
    def fwd_bwd(x, k, g):
      _, vjp = jax.vjp(fn, x, k)
      return vjp(g)
    f = jax.jit(fwd_bwd)
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
  p.add_argument('--bits', type=train_step_bench.parse_bits, default=(4, 4))
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--stat', default='median', choices=('median', 'min'))
  p.add_argument('--prototypes', action='store_true',
                 help='also time the candidate implementations')
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

  rs = np.random.RandomState(0)
  timers, shapes = {}, []
  for key, members in groups.items():
    spec = members[0]
    x = jnp.asarray(rs.standard_normal(spec['in_shape']).astype(np.float32))
    kshape = spec['kernel_size'] + (spec['in_shape'][-1] // spec['groups'],
                                    spec['features'])
    k = jnp.asarray(
        (rs.standard_normal(kshape) * 0.05).astype(np.float32))
    out = jax.eval_shape(module_fn(spec, 32, 32, False), x, k)
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
          kind, fn, x, k, g, input_grad=members[0] is not calls[0])

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

  protos_s = [n for n in impl_names if n.startswith('S q ') and
              n not in ('S q pwdot',)]
  protos_t = [n for n in impl_names if n.startswith('T ') and n != 'T fp']
  estimates = [
      ('student fwd+bwd, full precision (lax.conv)', total(pick('S fp'))),
      ('student fwd+bwd, full precision, pointwise_as_dot',
       total(pick('S fp pwdot', 'S fp')) if 'S fp pwdot' in impl_names
       else None),
      ('student fwd+bwd, quantized: the product default', total(pick('S q'))),
      ('student fwd+bwd, quantized, pointwise_as_dot',
       total(lambda t: t.get('S q pwdot', t.get('S q')))),
      ('teacher fwd (lax.conv)', total(pick('T fp'))),
      ('teacher fwd, pointwise_as_dot',
       total(lambda t: t.get('T pwdot', t.get('T fp')))),
  ]
  if args.prototypes:
    estimates += [
        ('student fwd+bwd, quantized, best of product + prototypes',
         total(pick('S q', 'S q pwdot', *protos_s))),
        ('teacher fwd, best of product + prototypes',
         total(pick('T fp', 'T pwdot', *protos_t))),
    ]
  est_lines = ['| estimate (sum over all convs of count x time) | ms |',
               '|---|---|']
  est_lines += [f'| {n} | {bench_util.fmt(v)} |' for n, v in estimates]
  est_table = '\n'.join(est_lines)
  record = {'model': args.model, 'batch': args.batch,
            'image_size': image_size, 'bits': list(args.bits),
            'stat': args.stat, 'reps': args.reps,
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
        f'({args.stat} of {args.reps})', info, table + '\n\n' + est_table,
        [record], [
            'S = student conv forward + backward (input and kernel '
            'gradients); T = teacher conv forward; q = fake-quantized '
            '(product QuantConv); pwdot = pointwise_as_dot; fastq / s2dot / '
            'im2col = prototypes defined in benchmarks/conv_profile.py (not '
            'product code). Times are per call.'])


if __name__ == '__main__':
  main()
