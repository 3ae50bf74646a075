"""Where the DTQ step's time goes: its pieces timed alone, JAX and PyTorch.

XLA:CPU's profiler does not record its convolutions and fusions one by one
(jax 0.10: only some kernels emit trace events), so the pieces of the step
are timed alone instead, at the step's exact shapes, in each framework as it
runs them by default, and summed with their counts:

  conv fwd      each convolution of the student (and, for DTQ, of the
                teacher: the same shapes in inference) on its own, a
                depthwise one as the config computes it
                (``quant.depthwise_as_shifts``);
  conv dx       its input gradient (not the stem's: images get none);
  conv dw       its kernel gradient;
  BatchNorm     each student BatchNorm in training mode, forward + backward;
  quantization  the min-max fake quantization of each quantized
                convolution's input and kernel, forward + backward, as
                the config's student computes it (``quant.fused_vjp``:
                the fused backward pass, the default);
  the rest      the whole step (timed first) minus the pieces: ReLU, residual
                adds, pooling, the teacher's BatchNorm, attention, losses and
                the optimizer, less what XLA saves by fusing the pieces into
                their neighbours (a negative rest means fusion saves more
                than the rest costs).

Each framework takes its shapes from its own network (the JAX student's
traced convolutions; forward hooks on torchvision's), so a row that shows up
on one side only is a real difference between the two networks. Each side
runs in its own process with its own defaults: JAX with the config's XLA
options (``cpu_convolutions``) and the allocator main.py uses, PyTorch eager
(``benchmarks/torch_reference.py``'s lean step and quantizer) with glibc's
allocator as it is, as in the fair comparison (docs/speed.md).
PyTorch's autograd computes a convolution's dx and dw in one call
(``convolution_backward``); here each is asked for alone.

  .venv/bin/python benchmarks/op_profile.py --framework=jax \\
      --model=resnet50 --batch=16 --json=/tmp/op_jax.json
  .venv-torch/bin/python benchmarks/op_profile.py --framework=torch \\
      --model=resnet50 --batch=16 --json=/tmp/op_torch.json
  .venv/bin/python benchmarks/op_profile.py \\
      --merge=/tmp/op_jax.json,/tmp/op_torch.json \\
      --out=results/op_profile_cpu_resnet50_b16_zen3.md
"""

import argparse
import collections
import json
import sys
import time

import numpy as np

import bench_util

bench_util.add_repo_to_path()

FRAMEWORKS = ('jax', 'torch')
CATEGORIES = ('conv fwd (student)', 'conv fwd (teacher)', 'conv dx',
              'conv dw', 'BatchNorm fwd+bwd', 'quantization fwd+bwd')


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split('\n', 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--framework', choices=FRAMEWORKS, default=None)
  p.add_argument('--model', default='resnet50',
                 choices=('resnet18', 'resnet34', 'resnet50', 'resnet101',
                          'mobilenet_v2'))
  p.add_argument('--batch', type=int, default=16)
  p.add_argument('--image_size', type=int, default=224)
  p.add_argument('--bits', type=bench_util.parse_bits, default=(4, 4))
  p.add_argument('--reps', type=int, default=5,
                 help='timed calls per piece (median)')
  p.add_argument('--steps', type=int, default=3,
                 help='timed whole steps (median); 0: no whole step')
  p.add_argument('--method', default='dtq', choices=('dtq', 'ft'))
  p.add_argument('--json', default=None, help='this side\'s measurements')
  p.add_argument('--merge', default=None, metavar='JAX_JSON,TORCH_JSON',
                 help='write the side-by-side report of two --json files')
  p.add_argument('--out', default=None, help='Markdown report (--merge)')
  args = p.parse_args(argv)
  if (args.merge is None) == (args.framework is None):
    p.error('give either --framework (measure) or --merge (report)')
  if args.framework and not args.json:
    p.error('--framework needs --json')
  return args


def conv_signature(kh, kw, stride, groups, height, cin, cout):
  """'3x3/s2 56px 64->64', with ' dw' for a depthwise convolution."""
  s = f'/s{stride}' if stride > 1 else ''
  dw = ' dw' if groups > 1 else ''
  return f'{kh}x{kw}{s}{dw} {height}px {cin}->{cout}'


def time_call(fn, reps, sync):
  """Median seconds of ``reps`` calls of ``fn`` after two untimed ones."""
  for _ in range(2):
    sync(fn())
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def group(pieces):
  """[(key, payload)] -> [(key, payload, count)] in first-seen order."""
  counts = collections.Counter(k for k, _ in pieces)
  seen, out = set(), []
  for key, payload in pieces:
    if key not in seen:
      seen.add(key)
      out.append((key, payload, counts[key]))
  return out


# ---------------------------------------------------------------------------
# JAX.


def _walk_eqns(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs nested in its params."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else (value,):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          yield from _walk_eqns(inner)


def jax_profile(args):
  """Measures the JAX side.

  Args:
    args: parsed flags (model, batch, image_size, bits, method, reps, steps).

  Returns:
    The JSON record: ``convs`` (signature, stem, count, fwd/dx/dw ms),
    ``bns`` and ``quants`` (shape, count, ms), ``step_ms`` (median) and
    ``step_ms_each`` if --steps, and ``info`` (machine and libraries).
  """
  bench_util.configure_allocator('keep')  # as main.py
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
  from dtq_jax import convolution  # pylint: disable=g-import-not-at-top
  from dtq_jax import layers  # pylint: disable=g-import-not-at-top
  from dtq_jax import quant  # pylint: disable=g-import-not-at-top
  from dtq_jax.method import networks  # pylint: disable=g-import-not-at-top
  from dtq_jax.run import runtime as runtime_lib  # pylint: disable=g-import-not-at-top

  config = train_step.make_config(args.model, args.method, args.bits,
                                  'float32', {}, args.batch, args.image_size)
  options = runtime_lib.compiler_options(config)
  jit = lambda f: jax.jit(f, compiler_options=options)
  nets = networks.build_networks(config, 257, 1000)
  shape = (args.batch, args.image_size, args.image_size, 3)
  variables = jax.eval_shape(
      lambda: networks.init_variables(nets.student, jax.random.PRNGKey(0),
                                      shape[1:]))
  jaxpr = jax.make_jaxpr(lambda v, x: nets.student.apply(
      v, x, train=True, mutable=['batch_stats'],
      rngs={'dropout': jax.random.PRNGKey(0)}))(
          variables, jax.ShapeDtypeStruct(shape, jnp.float32))
  convs = [e for e in _walk_eqns(jaxpr.jaxpr)
           if e.primitive.name == 'conv_general_dilated']
  rng = np.random.RandomState(0)
  normal = lambda s: jnp.asarray(rng.standard_normal(s).astype(np.float32))
  sync = jax.block_until_ready
  pieces = []
  for i, e in enumerate(convs):
    lhs, rhs = e.invars[0].aval.shape, e.invars[1].aval.shape
    out = e.outvars[0].aval.shape
    dn = e.params['dimension_numbers']
    sig = conv_signature(
        rhs[dn.rhs_spec[2]], rhs[dn.rhs_spec[3]], e.params['window_strides'][0],
        e.params['feature_group_count'], lhs[dn.lhs_spec[2]],
        lhs[dn.lhs_spec[1]], rhs[dn.rhs_spec[0]])
    pieces.append(((sig, i == 0), (lhs, rhs, out, dn.out_spec[1], e.params)))
  # The whole step first, in a fresh process: timed after the pieces, the
  # ResNet-50 step took 13.1 s against 6.0 s alone (Zen 3 AMD EPYC).
  step_ms = None
  if args.steps:
    # Five warm-up steps: the first steps dispatched while another is in
    # flight fault in further sets of the step's buffers (on a Zen 3 AMD
    # EPYC two such steps each took 8 s more, about 930,000 page faults);
    # the allocator keeps them, and later steps fault none.
    step_args = train_step.parse_args([
        f'--model={args.model}', f'--batch={args.batch}',
        f'--image_size={args.image_size}',
        f'--bits={args.bits[0]}/{args.bits[1]}', '--warmup=5'])
    teacher = train_step.make_teacher(step_args, args.model, args.image_size,
                                      3, 257, 1000)
    spec = train_step.VariantSpec(args.method, args.method, args.bits, {},
                                  config.cpu_convolutions, None)
    var = train_step.Variant(step_args, args.model, spec, teacher,
                             args.image_size, 3, 257, 1000)
    var.warm_up()
    var.time_steps(args.steps)
    step_ms = [1e3 * t for t in var.intervals]
    var.release()
    del var, teacher
  record = {'framework': 'jax', 'convs': [], 'bns': [], 'quants': []}
  if step_ms is not None:
    record['step_ms'] = float(np.median(step_ms))
    record['step_ms_each'] = step_ms
  quant_shapes = []
  # The config's quantizer and kernel choices, as the student's
  # convolutions take them.
  settings = layers.QuantSettings.from_config(config.quant)
  for (sig, stem), (lhs, rhs, out, out_c, params), count in group(pieces):
    print(f'# jax {sig}', file=sys.stderr, flush=True)
    conv = lambda x, w, params=params: jax.lax.conv_general_dilated_p.bind(
        x, w, **params)
    dn = params['dimension_numbers']
    if params['feature_group_count'] > 1 and rhs[dn.rhs_spec[1]] == 1:
      # A depthwise convolution (NHWC, HWIO), computed as the student
      # computes it (quant.depthwise_as_shifts: the shifts on a CPU by
      # default).
      conv = lambda x, w, params=params: convolution.convolve(
          x, w, strides=params['window_strides'], padding=params['padding'],
          feature_group_count=params['feature_group_count'],
          depthwise_as_shifts=settings.depthwise_as_shifts)
    x, w, ct = normal(lhs), normal(rhs), normal(out)
    fwd = jit(conv)
    dx = jit(lambda x, w, ct, conv=conv: jax.vjp(
        lambda x: conv(x, w), x)[1](ct)[0])
    dw = jit(lambda x, w, ct, conv=conv: jax.vjp(
        lambda w: conv(x, w), w)[1](ct)[0])
    record['convs'].append({
        'sig': sig, 'stem': stem, 'count': count,
        'fwd_ms': 1e3 * time_call(lambda: fwd(x, w), args.reps, sync),
        'dx_ms': 1e3 * time_call(lambda: dx(x, w, ct), args.reps, sync),
        'dw_ms': 1e3 * time_call(lambda: dw(x, w, ct), args.reps, sync)})
    if not stem:
      quant_shapes += [('input', tuple(lhs))] * count
      quant_shapes += [('kernel', tuple(rhs))] * count
  # Every convolution is followed by a BatchNorm of its output.
  bn_shapes = [(tuple(out), out_c) for _, (_, _, out, out_c, _) in pieces]
  for (shape_, axis), _, count in group([(k, None) for k in bn_shapes]):
    bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                      axis=axis)
    bn_vars = bn.init(jax.random.PRNGKey(0), jnp.zeros(shape_))
    x, ct = normal(shape_), normal(shape_)

    def fwd_bwd(x, params, ct, bn=bn, stats=bn_vars['batch_stats']):
      def f(x, params):
        return bn.apply({'params': params, 'batch_stats': stats}, x,
                        mutable=['batch_stats'])
      (_, updates), pullback = jax.vjp(f, x, params)
      grads = pullback((ct, jax.tree.map(jnp.zeros_like, updates)))
      return grads, updates
    run = jit(fwd_bwd)
    ms = 1e3 * time_call(lambda: run(x, bn_vars['params'], ct), args.reps,
                         sync)
    record['bns'].append({'shape': list(shape_), 'count': count, 'ms': ms})
  bits = {'input': args.bits[1], 'kernel': args.bits[0]}
  # The quantizer as the student's convolutions call it (the fused backward
  # pass by default, quant.fused_vjp).
  axis = {'input': None, 'kernel': settings.weight_range_axis}
  for (what, shape_), _, count in group([(k, None) for k in quant_shapes]):
    x, ct = normal(shape_), normal(shape_)
    run = jit(lambda x, ct, b=bits[what], axis=axis[what]: jax.vjp(
        lambda x: quant.fake_quant(x, b, axis=axis,
                                   range_grad=settings.range_grad,
                                   fused_vjp=settings.fused_vjp),
        x)[1](ct)[0])
    ms = 1e3 * time_call(lambda: run(x, ct), args.reps, sync)
    record['quants'].append({'what': what, 'shape': list(shape_),
                             'count': count, 'ms': ms})
  record['info'] = bench_util.machine_info(
      jax=jax.__version__, backend=jax.default_backend(),
      cpu_convolutions=config.cpu_convolutions, allocator='keep',
      fused_vjp=settings.fused_vjp,
      depthwise_as_shifts=settings.depthwise_as_shifts)
  return record


# ---------------------------------------------------------------------------
# PyTorch.


def torch_profile(args):
  """Measures the PyTorch side.

  Args:
    args: parsed flags, as for ``jax_profile``.

  Returns:
    The JSON record, with ``jax_profile``'s fields; shapes are written in
    JAX's layout (NHWC inputs, HWIO kernels) so that the two sides match.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(bench_util.usable_cores())
  net = torch_reference.create(args.model, 1000)[0]
  seen = []

  def hook(module, inputs, _):
    seen.append((module, tuple(inputs[0].shape)))
  handles = [m.register_forward_hook(hook) for m in net.modules()
             if isinstance(m, nn.Conv2d)]
  with torch.no_grad():
    net.train()(torch.zeros(args.batch, 3, args.image_size, args.image_size))
  for h in handles:
    h.remove()
  gen = torch.Generator().manual_seed(0)
  normal = lambda s: torch.randn(*s, generator=gen)
  pieces = []
  for i, (m, in_shape) in enumerate(seen):
    kh, kw = m.kernel_size
    sig = conv_signature(kh, kw, m.stride[0], m.groups, in_shape[2],
                         m.in_channels, m.out_channels)
    pieces.append(((sig, i == 0), (m, in_shape)))
  # The whole step first, as on the JAX side.
  step_ms = None
  if args.steps:
    step_args = torch_reference.parse_args([
        f'--model={args.model}', f'--batch={args.batch}',
        f'--image_size={args.image_size}',
        f'--bits={args.bits[0]}/{args.bits[1]}', '--warmup=2', '--no_flops'])
    torch.manual_seed(step_args.seed + 1)
    batch = torch_reference.random_batch(step_args)
    teacher = torch_reference.calibrated_teacher_state(
        args.model, step_args.num_source_classes, batch[0])
    var = torch_reference.Variant(step_args, args.model, args.method,
                                  args.method, args.bits, teacher, batch,
                                  torch.device('cpu'))
    var.warm_up()
    var.time_steps(args.steps)
    step_ms = [1e3 * t for t in var.intervals]
    del var, teacher, batch
  record = {'framework': 'torch', 'convs': [], 'bns': [], 'quants': []}
  if step_ms is not None:
    record['step_ms'] = float(np.median(step_ms))
    record['step_ms_each'] = step_ms
  quant_shapes, bn_shapes = [], []
  sync = lambda _: None  # eager CPU ops return when done
  for (sig, stem), (m, in_shape), count in group(pieces):
    print(f'# torch {sig}', file=sys.stderr, flush=True)
    x, w = normal(in_shape), normal(tuple(m.weight.shape))
    conv = lambda x, w, m=m: F.conv2d(x, w, None, m.stride, m.padding,
                                      m.dilation, m.groups)
    with torch.no_grad():
      out_shape = tuple(conv(x, w).shape)
    ct = normal(out_shape)

    def backward(mask, x=x, w=w, ct=ct, m=m):
      return torch.ops.aten.convolution_backward(
          ct, x, w, None, m.stride, m.padding, m.dilation, False, [0, 0],
          m.groups, mask)
    with torch.no_grad():
      record['convs'].append({
          'sig': sig, 'stem': stem, 'count': count,
          'fwd_ms': 1e3 * time_call(lambda: conv(x, w), args.reps, sync),
          'dx_ms': 1e3 * time_call(lambda: backward([True, False, False]),
                                   args.reps, sync),
          'dw_ms': 1e3 * time_call(lambda: backward([False, True, False]),
                                   args.reps, sync)})
    bn_shapes += [out_shape] * count
    if not stem:
      quant_shapes += [('input', in_shape)] * count
      quant_shapes += [('kernel', tuple(m.weight.shape))] * count
  for shape_, _, count in group([(k, None) for k in bn_shapes]):
    x = normal(shape_).requires_grad_()
    weight = torch.ones(shape_[1], requires_grad=True)
    bias = torch.zeros(shape_[1], requires_grad=True)
    mean, var = torch.zeros(shape_[1]), torch.ones(shape_[1])
    ct = normal(shape_)

    def fwd_bwd(x=x, weight=weight, bias=bias, mean=mean, var=var, ct=ct):
      F.batch_norm(x, mean, var, weight, bias, True, 0.1, 1e-5).backward(ct)
    ms = 1e3 * time_call(fwd_bwd, args.reps, sync)
    # NCHW -> NHWC, as the JAX side names the shape.
    nhwc = [shape_[0], shape_[2], shape_[3], shape_[1]]
    record['bns'].append({'shape': nhwc, 'count': count, 'ms': ms})
  bits = {'input': args.bits[1], 'kernel': args.bits[0]}
  for (what, shape_), _, count in group([(k, None) for k in quant_shapes]):
    x, ct = normal(shape_).requires_grad_(), normal(shape_)

    def fwd_bwd(x=x, ct=ct, b=bits[what]):
      torch_reference.fake_quant(x, b).backward(ct)
    ms = 1e3 * time_call(fwd_bwd, args.reps, sync)
    shape_ = list(shape_)
    # NCHW / OIHW -> NHWC / HWIO, as the JAX side names the shape.
    shape_ = (shape_[:1] + shape_[2:] + shape_[1:2] if what == 'input'
              else shape_[2:] + shape_[1:2] + shape_[:1])
    record['quants'].append({'what': what, 'shape': shape_, 'count': count,
                             'ms': ms})
  record['info'] = bench_util.machine_info(
      torch=torch.__version__, torch_threads=torch.get_num_threads(),
      allocator='default')
  return record


# ---------------------------------------------------------------------------
# The report.


def totals(record, method):
  """Milliseconds per step of each piece of one side's record.

  Args:
    record: a side's JSON record.
    method: 'dtq' (the teacher's forward convolutions counted) or 'ft'.

  Returns:
    {piece: ms}, with 'the rest' and 'whole step' when the step was timed.
  """
  convs = record['convs']
  # The teacher's convolutions have the student's shapes (timed once).
  forward = sum(c['count'] * c['fwd_ms'] for c in convs)
  out = {
      'conv fwd (student)': forward,
      'conv fwd (teacher)': forward if method == 'dtq' else 0.0,
      'conv dx': sum(c['count'] * c['dx_ms'] for c in convs
                     if not c['stem']),
      'conv dw': sum(c['count'] * c['dw_ms'] for c in convs),
      'BatchNorm fwd+bwd': sum(b['count'] * b['ms'] for b in record['bns']),
      'quantization fwd+bwd': sum(q['count'] * q['ms']
                                  for q in record['quants']),
  }
  if 'step_ms' in record:
    out['the rest'] = record['step_ms'] - sum(out.values())
    out['whole step'] = record['step_ms']
  return out


def _ratio(a, b):
  return f'{a / b:.2f}' if a and b and a > 0 and b > 0 else '-'


def report(jax_rec, torch_rec, method):
  """The side-by-side Markdown tables.

  Args:
    jax_rec: the JAX side's record.
    torch_rec: the PyTorch side's record.
    method: as for ``totals``.

  Returns:
    ``(markdown, jax_totals, torch_totals)``: the table per piece, then the
    table per convolution shape (heaviest in JAX first).
  """
  tj, tt = totals(jax_rec, method), totals(torch_rec, method)
  step = tj.get('whole step')
  rows = ['| piece | JAX ms | PyTorch ms | PyTorch / JAX | share of the JAX '
          'step |', '|---|---|---|---|---|']
  for cat in tj:
    share = f'{100 * tj[cat] / step:.0f}%' if step else '-'
    rows.append(f'| {cat} | {tj[cat]:.0f} | {tt.get(cat, float("nan")):.0f} '
                f'| {_ratio(tt.get(cat), tj[cat])} | {share} |')
  rows += ['', '| convolution | count | fwd JAX | fwd PyTorch | dx JAX | '
           'dx PyTorch | dw JAX | dw PyTorch | JAX ms x count | PyTorch '
           'ms x count |', '|---|---|---|---|---|---|---|---|---|---|']
  torch_convs = {c['sig']: c for c in torch_rec['convs']}
  jax_convs = {c['sig']: c for c in jax_rec['convs']}
  weight = lambda c: c['count'] * (c['fwd_ms'] + c['dw_ms'] +
                                   (0 if c['stem'] else c['dx_ms']))
  for sig in sorted(set(jax_convs) | set(torch_convs),
                    key=lambda s: -weight(jax_convs.get(s) or torch_convs[s])):
    j, t = jax_convs.get(sig), torch_convs.get(sig)
    cell = lambda c, k: f'{c[k]:.1f}' if c else '-'
    count = (j or t)['count']
    rows.append(
        f'| {sig}{" (stem)" if (j or t)["stem"] else ""} | {count} | '
        f'{cell(j, "fwd_ms")} | {cell(t, "fwd_ms")} | {cell(j, "dx_ms")} | '
        f'{cell(t, "dx_ms")} | {cell(j, "dw_ms")} | {cell(t, "dw_ms")} | '
        f'{weight(j) if j else 0:.0f} | {weight(t) if t else 0:.0f} |')
  return '\n'.join(rows), tj, tt


def main(argv=None):
  args = parse_args(argv)
  if args.framework:
    rec = (jax_profile if args.framework == 'jax' else torch_profile)(args)
    rec['args'] = {k: v for k, v in vars(args).items() if k != 'merge'}
    rec['command'] = bench_util.command_line()
    bench_util.write_text_atomic(args.json, json.dumps(rec, indent=1))
    print(json.dumps(totals(rec, args.method)))
    return
  paths = args.merge.split(',')
  if len(paths) != 2:
    sys.exit('--merge takes two files: JAX_JSON,TORCH_JSON')
  recs = {}
  for path in paths:
    with open(path) as f:
      rec = json.load(f)
    recs[rec['framework']] = rec
  if set(recs) != set(FRAMEWORKS):
    sys.exit(f'--merge needs one jax and one torch file, got {sorted(recs)}')
  a = recs['jax']['args']
  table, _, _ = report(recs['jax'], recs['torch'], a['method'])
  text = [f'# Where the {a["method"].upper()} step\'s time goes: {a["model"]}, '
          f'batch {a["batch"]}, {a["image_size"]} px, bits {a["bits"][0]}/'
          f'{a["bits"][1]}, JAX and PyTorch eager', '',
          'Written by `benchmarks/op_profile.py` (how it measures: its '
          'docstring). Times in ms, medians of '
          f'{a["reps"]} calls per piece and {a["steps"]} whole steps.', '',
          'Commands (from the repository root):', '', '```sh']
  text += [recs[f]['command'] for f in FRAMEWORKS]
  text += [bench_util.command_line(), '```', '']
  for f in FRAMEWORKS:
    text.append(f'{f} side: ' + ', '.join(
        f'{k}={v}' for k, v in recs[f]['info'].items()))
    text.append('')
  text += [table, '']
  if args.out:
    bench_util.write_text_atomic(args.out, '\n'.join(text))
  print('\n'.join(text))


if __name__ == '__main__':
  main()
