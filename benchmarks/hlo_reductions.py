"""Counts the min/max reductions in a compiled step's optimized HLO text.

Answers: is the weight (and activation) quantization range recomputed in the
backward pass? Every quantized convolution needs one min and one max over its
kernel and one over its input in the forward pass; any further min/max
reduction over the same shapes, or one whose ``op_name`` metadata lies under
``transpose(...)`` (JAX's marker of the backward pass), is a recomputation.

Input: HLO text files written by ``train_step.py --dump_hlo=DIR`` (the
compiled step's ``as_text()``).

  python benchmarks/hlo_reductions.py /tmp/hlo/resnet50_dtq_w4a4_b16.hlo.txt
"""

import collections
import re
import sys

_INST = re.compile(
    r'^\s*(?:ROOT )?%([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ([\w\-]+)\((.*?)\)(.*)$')


def parse(text):
  """(computations: name -> body lines, instructions list, name -> shape)."""
  comps, cur = {}, None
  for line in text.splitlines():
    if line and not line.startswith(' ') and line.rstrip().endswith('{'):
      cur = line.split()[1 if line.startswith('ENTRY') else 0].lstrip('%')
      comps[cur] = []
    elif cur is not None:
      comps[cur].append(line)
  shapes, insts = {}, []
  for comp, lines in comps.items():
    for line in lines:
      m = _INST.match(line)
      if m:
        name, shape, op, args, rest = m.groups()
        shapes[name] = shape
        insts.append((comp, name, shape, op, args, rest))
  return comps, insts, shapes


def reducer_kind(comps, name):
  body = ' '.join(comps.get(name, []))
  for kind in ('minimum', 'maximum', 'add'):
    if f' {kind}(' in body:
      return kind
  return 'other'


def analyse(text, batch=None):
  """Counter of (kind, operand class, pass, result shape) for min/max reduces."""
  comps, insts, shapes = parse(text)
  counts = collections.Counter()
  examples = {}
  convs = collections.Counter()
  for _, _, shape, op, args, rest in insts:
    opname = re.search(r'op_name="([^"]*)"', rest)
    opname = opname.group(1) if opname else ''
    backward = 'transpose(' in opname
    if op == 'convolution':
      convs['convolution'] += 1
    elif op == 'dot':
      convs['dot'] += 1
    if op != 'reduce':
      continue
    to_apply = re.search(r'to_apply=%?([\w.\-]+)', rest)
    kind = reducer_kind(comps, to_apply.group(1)) if to_apply else 'other'
    if kind not in ('minimum', 'maximum'):
      continue
    operand = args.split(',')[0].strip().lstrip('%')
    oshape = shapes.get(operand, '?')
    dims = oshape.split('[', 1)[1].split(']')[0] if '[' in oshape else ''
    dims = [int(d) for d in dims.split(',') if d]
    if len(dims) == 4 and (batch is None or dims[0] != batch):
      what = 'kernel'
    elif len(dims) == 4:
      what = 'activation'
    else:
      what = f'{len(dims)}-d'
    key = (kind, what, 'backward' if backward else 'forward',
           'full' if shape.startswith('f32[]') else 'partial')
    counts[key] += 1
    examples.setdefault(key, f'{oshape} {opname[-90:]}')
  return counts, examples, convs


def main(paths):
  if not paths:
    sys.exit(__doc__)
  for path in paths:
    with open(path) as f:
      text = f.read()
    m = re.search(r'_b(\d+)\.hlo', path)
    counts, examples, convs = analyse(text, int(m.group(1)) if m else None)
    print(f'## {path}')
    print(f'instructions: {dict(convs)}')
    print('| count | reducer | operand | pass | result | example |')
    print('|---|---|---|---|---|---|')
    for key, n in sorted(counts.items()):
      print(f'| {n} | {" | ".join(key)} | `{examples[key]}` |')
    print()


if __name__ == '__main__':
  main(sys.argv[1:])
