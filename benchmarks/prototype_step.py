"""The full DTQ train step with candidate speed-ups patched in (not product code).

Measures suggestions from conv_profile.py at the level of the whole step
before anyone changes the product: each candidate is applied by patching
functions *in this process only* while the step is traced (``dtq_jax`` files
are not touched), then the step is built, jitted and timed exactly as
train_step.py does (same ``Variant`` class), all candidates interleaved.

Candidates (``--candidates``, comma-separated, each a '+'-joined set):

  product   the step as it is (baseline)
  pwdot     config.quant.pointwise_as_dot = True (an existing product option)
  fastq     quant.fake_quant (per tensor, range_grad=True) replaced by a
            custom-VJP version with the same values and the same gradient
            (conv_profile.fast_fake_quant)
  s2dot     1x1 convolutions with stride > 1 and no padding (ResNet
            downsample) computed as subsample + matrix product
  im2col    kxk convolutions (k > 1, no groups) as one matrix product over
            the concatenated shifted slices
  dwshift   depthwise kxk convolutions as k*k shifted multiply-adds

  python benchmarks/prototype_step.py --model=resnet50 --batch=16 --steps=2 \
      --rounds=2 --candidates=product,pwdot,pwdot+fastq,pwdot+fastq+s2dot
"""

import argparse
import contextlib
import sys

import bench_util

bench_util.add_repo_to_path()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from dtq_jax import quant  # pylint: disable=wrong-import-position
from dtq_jax import train  # pylint: disable=wrong-import-position

import conv_profile  # pylint: disable=wrong-import-position
import train_step  # pylint: disable=wrong-import-position

KNOWN = ('product', 'pwdot', 'fastq', 's2dot', 'im2col', 'dwshift')


@contextlib.contextmanager
def patched(obj, name, value):
  old = getattr(obj, name)
  setattr(obj, name, value)
  try:
    yield
  finally:
    setattr(obj, name, old)


def make_fake_quant(original):
  def fake_quant(x, bits, *, axis=None, range_grad=True):
    quant.check_bits(bits)
    if bits == quant.FULL_PRECISION:
      return x
    if axis is None and range_grad:
      return conv_profile.fast_fake_quant(x, bits)
    return original(x, bits, axis=axis, range_grad=range_grad)
  return fake_quant


def make_conv(original, s2dot, im2col, dwshift=False):
  """A lax.conv_general_dilated that routes some NHWC/HWIO convs to dots."""

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
           rhs_dilation=None, dimension_numbers=None,
           feature_group_count=1, **kwargs):
    plain = (dimension_numbers == ('NHWC', 'HWIO', 'NHWC') and
             feature_group_count == 1 and not lhs_dilation and
             not rhs_dilation and not kwargs and
             not isinstance(padding, str))
    if plain:
      kh, kw = rhs.shape[:2]
      spec = dict(kernel_size=(kh, kw), strides=tuple(window_strides),
                  padding=tuple(tuple(p) for p in padding), groups=1)
      no_pad = all(p == (0, 0) for p in spec['padding'])
      if s2dot and (kh, kw) == (1, 1) and no_pad and spec['strides'] != (1, 1):
        return conv_profile.conv_s2dot(spec, lhs, rhs)
      if im2col and (kh, kw) != (1, 1):
        return conv_profile.conv_im2col(spec, lhs, rhs)
    depthwise = (dimension_numbers == ('NHWC', 'HWIO', 'NHWC') and
                 feature_group_count > 1 and rhs.shape[2] == 1 and
                 rhs.shape[3] == feature_group_count == lhs.shape[3] and
                 not lhs_dilation and not rhs_dilation and not kwargs and
                 not isinstance(padding, str))
    if dwshift and depthwise:
      spec = dict(kernel_size=tuple(rhs.shape[:2]),
                  strides=tuple(window_strides),
                  padding=tuple(tuple(p) for p in padding))
      return conv_profile.conv_dwshift(spec, lhs, rhs)
    return original(lhs, rhs, window_strides, padding, lhs_dilation,
                    rhs_dilation, dimension_numbers, feature_group_count,
                    **kwargs)
  return conv


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--candidates',
                 default='product,pwdot,pwdot+fastq,pwdot+fastq+s2dot')
  known, rest = p.parse_known_args(argv)
  args = train_step.parse_args(rest)
  candidates = [c.strip() for c in known.candidates.split(',') if c.strip()]
  for c in candidates:
    for part in c.split('+'):
      if part not in KNOWN:
        p.error(f'unknown candidate part {part!r}; known: {", ".join(KNOWN)}')
  jax.config.update('jax_enable_compilation_cache', False)
  runtime = train.Runtime()
  info = bench_util.machine_info(
      jax=jax.__version__, backend=jax.default_backend(),
      device_kind=jax.devices()[0].device_kind)
  print('# ' + ', '.join(f'{k}={v}' for k, v in info.items()),
        file=sys.stderr, flush=True)
  records = []
  method = 'ft' if args.variants == ['ft'] else 'dtq'
  bits = (32, 32) if args.variants == ['dtq32'] else args.bits
  for model in args.model:
    small = model == 'small_resnet'
    image_size = args.image_size or (28 if small else 224)
    channels = 1 if small else 3
    num_classes = args.num_classes or (5 if small else 257)
    num_source = args.num_source_classes or (5 if small else 1000)
    teacher_vars = train_step.make_teacher(args, model, image_size, channels,
                                           num_classes, num_source)
    variants = []
    for cand in candidates:
      parts = set(cand.split('+'))
      name = f'{method}_w{bits[0]}a{bits[1]}:{cand}'
      print(f'# {model} {name}: building and compiling ...', file=sys.stderr,
            flush=True)
      with contextlib.ExitStack() as stack:
        if 'fastq' in parts:
          stack.enter_context(patched(quant, 'fake_quant',
                                      make_fake_quant(quant.fake_quant)))
        if parts & {'s2dot', 'im2col', 'dwshift'}:
          stack.enter_context(patched(
              jax.lax, 'conv_general_dilated',
              make_conv(jax.lax.conv_general_dilated, 's2dot' in parts,
                        'im2col' in parts, 'dwshift' in parts)))
        v = train_step.Variant(args, model, name, method, bits,
                               'pwdot' in parts, teacher_vars, image_size,
                               channels, num_classes, num_source, runtime)
      v.warm_up()
      variants.append(v)
    for r in range(args.rounds):
      for v in variants:
        print(f'# {model} {v.name}: timing round {r + 1}/{args.rounds} ...',
              file=sys.stderr, flush=True)
        v.time_steps(args.steps)
    first = None
    for v in variants:
      rec = v.record()
      v.release()
      if rec['nonfinite_steps']:
        print(f'# WARNING: {model} {v.name}: {rec["nonfinite_steps"]} '
              'non-finite steps', file=sys.stderr, flush=True)
      first = first or rec
      rec['time_ratio'] = round(rec['step_ms'] / first['step_ms'], 3)
      records.append(rec)
      bench_util.emit(rec)
  table = bench_util.markdown_table(records, train_step.COLUMNS)
  print()
  print(table)
  if args.out:
    bench_util.write_report(
        args.out.replace('{backend}', jax.default_backend()),
        'DTQ train step with candidate speed-ups (prototypes, not product '
        'code)', info, table, records,
        ['Candidates are patched in while the step is traced; see '
         'benchmarks/prototype_step.py.'])


if __name__ == '__main__':
  main()
