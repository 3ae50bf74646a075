"""The full DTQ train step with candidate speed-ups, product or prototype.

Measures suggestions from conv_profile.py at the level of the whole step: the
product's opt-in speed-ups (``config.quant`` switches) and prototypes that
are not product code, the latter applied by patching functions *in this
process only* while the step is traced (``dtq_jax`` files are not touched).
Each candidate's step is built, jitted and timed exactly as train_step.py
does (``train_step.measure_model``), all candidates interleaved.

Candidates (``--candidates``, comma-separated, each a '+'-joined set; default
``product,all,all+im2col``):

  product               the step as it is by default (baseline)
  pointwise_as_dot,     the product's config.quant switches (same maths; see
  depthwise_as_shifts,  dtq_jax/layers.py QuantConv and quant.fake_quant);
  fused_vjp, all        'all' is the three
  im2col                prototype (not product code): kxk convolutions
                        (k > 1, no groups) as one matrix product over the
                        concatenated shifted slices (conv_profile.conv_im2col),
                        patched into lax.conv_general_dilated

One variant per candidate: dtq at --bits, or the one --variants names if it
names only ft or only dtq32.

  python benchmarks/prototype_step.py --model=resnet50 --batch=16 --steps=2 \
      --rounds=2 --warmup=1 --candidates=product,pointwise_as_dot,all,all+im2col
"""

import argparse
import contextlib
import sys

import bench_util

bench_util.add_repo_to_path()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position


import conv_profile  # pylint: disable=wrong-import-position
import train_step  # pylint: disable=wrong-import-position

PROTOTYPES = ('im2col',)
KNOWN = ('product', 'all') + train_step.SWITCHES + PROTOTYPES


def make_conv(original):
  """lax.conv_general_dilated, plain NHWC/HWIO kxk convs (k > 1) as im2col."""

  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
           rhs_dilation=None, dimension_numbers=None,
           feature_group_count=1, **kwargs):
    plain = (dimension_numbers == ('NHWC', 'HWIO', 'NHWC') and
             feature_group_count == 1 and not lhs_dilation and
             not rhs_dilation and not kwargs and
             not isinstance(padding, str))
    if plain and tuple(rhs.shape[:2]) != (1, 1):
      spec = dict(kernel_size=tuple(rhs.shape[:2]),
                  strides=tuple(window_strides),
                  padding=tuple(tuple(p) for p in padding))
      return conv_profile.conv_im2col(spec, lhs, rhs)
    return original(lhs, rhs, window_strides, padding, lhs_dilation,
                    rhs_dilation, dimension_numbers, feature_group_count,
                    **kwargs)
  return conv


@contextlib.contextmanager
def im2col_patched():
  original = jax.lax.conv_general_dilated
  jax.lax.conv_general_dilated = make_conv(original)
  try:
    yield
  finally:
    jax.lax.conv_general_dilated = original


def parse_candidate(text):
  """'a+b+im2col' -> (product switches, patch or None)."""
  parts = [p.strip() for p in text.split('+')]
  for part in parts:
    if part not in KNOWN:
      raise ValueError(f'unknown candidate part {part!r}; known: '
                       f'{", ".join(KNOWN)}')
  switches = [p for p in parts if p not in PROTOTYPES and p != 'product']
  if 'all' in switches:
    switches = ['all']
  switches = train_step.parse_switch_set('+'.join(switches) or 'none')
  return switches, (im2col_patched if 'im2col' in parts else None)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--candidates',
                 default='product,all,all+im2col',
                 help='comma-separated, each a +-joined set of ' +
                 ', '.join(KNOWN))
  known, rest = p.parse_known_args(argv)
  args = train_step.parse_args(rest)
  if args.speedups != [train_step.parse_switch_set('none')]:
    p.error('--speedups: name the switches in --candidates instead')
  candidates = [c.strip() for c in known.candidates.split(',') if c.strip()]
  try:
    parsed = [parse_candidate(c) for c in candidates]
  except ValueError as e:
    p.error(str(e))
  jax.config.update('jax_enable_compilation_cache', False)
  info = bench_util.machine_info(
      jax=jax.__version__, backend=jax.default_backend(),
      device_kind=jax.devices()[0].device_kind)
  print('# ' + ', '.join(f'{k}={v}' for k, v in info.items()),
        file=sys.stderr, flush=True)
  method = 'ft' if args.variants == ['ft'] else 'dtq'
  bits = (32, 32) if args.variants == ['dtq32'] else args.bits
  specs = [train_step.VariantSpec(f'{method}_w{bits[0]}a{bits[1]}:{cand}',
                                  method, bits, switches, patch=patch)
           for cand, (switches, patch) in zip(candidates, parsed)]
  records = []
  for model in args.model:
    records += train_step.measure_model(args, model, specs)
  table = bench_util.markdown_table(records, train_step.COLUMNS)
  print()
  print(table)
  if args.out:
    bench_util.write_report(
        args.out.replace('{backend}', jax.default_backend()),
        'DTQ train step with candidate speed-ups (product switches and '
        'prototypes)', info, table, records,
        ['Product switches are config.quant options; prototypes (im2col) '
         'are patched in while the step is traced; see '
         'benchmarks/prototype_step.py.'])


if __name__ == '__main__':
  main()
