"""DTQ's attention entropy per map over training, from compare.py's runs.

  python benchmarks/attention_entropy.py        # the Fashion-MNIST splits

The script reads ``seed_N/metrics.jsonl`` of every finished seed (one with a
``result.json``) of every DTQ cell (``dtq*-<bits>bit-<shots>shots``) of each
``--split NAME=WORKDIR`` (``benchmarks/compare.py``'s workdirs) and writes
one table per split: per variant, the seeds' final test accuracy and
the entropy ``-sum_c a_c log a_c`` (nats) of each map's attention weights at
the first logged step and at the end, mean ± population std over seeds, with
the AFA and cross-entropy terms at the first logged step. A uniform attention
over C channels has entropy log C; one channel, 0. ``--diverging_run`` adds a
per-step table of one seed folder that logged every step (the paper's
theta = 0.01).
The figure beside the table (``.png``) draws each map's entropy against the
step, one panel per split and map, one colour per variant, every seed.
"""

import argparse
import math
import os
import sys

from matplotlib.figure import Figure

import bench_util

bench_util.add_repo_to_path()

# pylint: disable=g-import-not-at-top,wrong-import-position
from dtq_jax.infra import errors
from dtq_jax.infra import files
from dtq_jax import plot

_ENTROPY = 'train/attention_entropy_{}'
DEFAULT_SPLITS = ('in_domain=runs/compare_fmnist_in_domain_shots',
                  'out_of_domain=runs/compare_fmnist_out_of_domain_shots')


def read_cells(workdir, shots, bits=4):
  """The DTQ cells of a compare.py workdir at one number of shots.

  Args:
    workdir: ``benchmarks/compare.py``'s ``--workdir``.
    shots: shots per class of the cells to read.
    bits: their bit width.

  Returns:
    ``{variant: [(seed name, records), ...]}``, ``dtq`` first, then by name,
    of the finished seeds (``result.json`` written; one still training would
    give an intermediate accuracy); cells without one are left out.

  Raises:
    errors.UserError: the folder holds no such cell.
  """
  if not os.path.isdir(workdir):
    raise errors.UserError(f'{workdir} is not a folder (expected '
                           'benchmarks/compare.py\'s --workdir)')
  cells = {}
  for name in sorted(os.listdir(workdir)):
    m = bench_util.CELL_NAME.match(name)
    if (m and m['variant'].startswith('dtq') and m['shots'] and
        int(m['shots']) == shots and int(m['bits']) == bits):
      cell = os.path.join(workdir, name)
      seeds = [(seed, records) for seed, records in plot.seed_records(cell)
               if records and os.path.isfile(
                   os.path.join(cell, seed, files.RESULT))]
      if seeds:
        cells[m['variant']] = seeds
  if not cells:
    raise errors.UserError(f'{workdir}: no DTQ cell at {bits} bits and {shots} '
                           f'shots (dtq*-{bits}bit-{shots}shots/seed_N/'
                           'metrics.jsonl)')
  return dict(sorted(cells.items(), key=lambda kv: (kv[0] != 'dtq', kv[0])))


def num_maps(cells):
  """How many attention maps the runs log (``train/attention_entropy_k``)."""
  return plot.num_entropy_maps({k for seeds in cells.values()
                                for _, records in seeds for r in records
                                for k in r})


def _with_key(records, key):
  return [r for r in records if key in r]


def seed_row(records, maps):
  """One seed's measurements: first and last entropy per map, AFA and CE at
  the first logged step, final test accuracy (None where not logged)."""
  first = {}
  last = {}
  for k in range(maps):
    logged = _with_key(records, _ENTROPY.format(k))
    first[k] = logged[0][_ENTROPY.format(k)] if logged else None
    last[k] = logged[-1][_ENTROPY.format(k)] if logged else None
  train = _with_key(records, 'train/loss_ce')
  tests = _with_key(records, 'test/accuracy')
  return dict(
      first_step=train[0]['step'] if train else None,
      first=first, last=last,
      afa=train[0].get('train/loss_afa') if train else None,
      ce=train[0]['train/loss_ce'] if train else None,
      accuracy=tests[-1]['test/accuracy'] if tests else None)


def split_table(cells, maps):
  """The Markdown table of one split's cells.

  Args:
    cells: ``read_cells``'s dict.
    maps: ``num_maps(cells)``.

  Returns:
    The table's lines.
  """
  header = (['variant', 'seeds', 'final test acc. (%)'] +
            [f'H map {k}: first / end' for k in range(maps)] +
            ['AFA / CE at the first log'])
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---|' * len(header)]
  for variant, seeds in cells.items():
    rows = [seed_row(records, maps) for _, records in seeds]
    steps = sorted({r['first_step'] for r in rows if r['first_step']})
    mean_std = bench_util.mean_std
    entropies = [f'{mean_std([r["first"][k] for r in rows])} / '
                 f'{mean_std([r["last"][k] for r in rows])}'
                 for k in range(maps)]
    at = f' (step {steps[0]})' if len(steps) == 1 else ''
    losses = (f'{mean_std([r["afa"] for r in rows], 3)} / '
              f'{mean_std([r["ce"] for r in rows], 3)}{at}')
    lines.append(
        f'| {variant} | {len(rows)} | '
        f'{mean_std([r["accuracy"] for r in rows])} | '
        + ' | '.join(entropies) + f' | {losses} |')
  return lines


def diverging_table(path):
  """Per-step losses and entropies of one run (every step logged).

  Args:
    path: a seed folder (``metrics.jsonl``).

  Returns:
    The table's lines.

  Raises:
    errors.UserError: no ``metrics.jsonl`` with training records there.
  """
  metrics = os.path.join(path, plot.METRICS)
  if not os.path.isfile(metrics):
    raise errors.UserError(f'--diverging_run {path}: no {plot.METRICS} '
                           '(expected a seed folder)')
  records = _with_key(plot.read_metrics(metrics), 'train/loss_ce')
  if not records:
    raise errors.UserError(f'--diverging_run {path}: no training records')
  maps = plot.num_entropy_maps(records[0])
  header = ['step', 'AFA', 'CE', 'KL'] + [f'H map {k}' for k in range(maps)]
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in records:
    values = [r.get('train/loss_afa'), r['train/loss_ce'],
              r.get('train/loss_kl')]
    values += [r[_ENTROPY.format(k)] for k in range(maps)]
    lines.append(f'| {r["step"]} | ' + ' | '.join(
        '-' if v is None else f'{v:.4g}' for v in values) + ' |')
  return lines


def figure(splits, title):
  """Entropy against step: a row per split, a panel per map.

  Args:
    splits: ``{split name: read_cells dict}``.
    title: the figure's title.

  Returns:
    The ``Figure``.
  """
  maps = max(num_maps(c) for c in splits.values())
  if not maps:
    raise errors.UserError('the runs log no attention entropy '
                           '(train/attention_entropy_k)')
  variants = list(dict.fromkeys(v for c in splits.values() for v in c))
  fig = Figure(figsize=(2.6 * maps, 2.3 * len(splits) + 0.6),
               layout='constrained')
  axes = fig.subplots(len(splits), maps, squeeze=False)
  for i, (split, cells) in enumerate(splits.items()):
    for k in range(maps):
      ax = axes[i][k]
      key = _ENTROPY.format(k)
      for variant, seeds in cells.items():
        color = f'C{variants.index(variant) % 10}'
        for j, (_, records) in enumerate(seeds):
          logged = _with_key(records, key)
          ax.plot([r['step'] for r in logged], [r[key] for r in logged],
                  color=color, alpha=0.8, linewidth=1,
                  label=variant if j == 0 else None)
      # From 0 (one channel) so that a map staying near uniform looks flat.
      ax.set_ylim(0, 1.08 * max([ax.get_ylim()[1], 0.1]))
      ax.set_title(f'{split}: map {k}', fontsize=8)
      ax.tick_params(labelsize=7)
      ax.grid(alpha=0.3)
      if k == 0:
        ax.set_ylabel('entropy (nats)', fontsize=8)
      if i == len(splits) - 1:
        ax.set_xlabel('step', fontsize=8)
  # One entry per variant, from whichever panel drew it.
  legend = {}
  for row in axes:
    for handle, label in zip(*row[0].get_legend_handles_labels()):
      legend.setdefault(label, handle)
  fig.legend(list(legend.values()), list(legend), loc='outside lower center',
             ncol=min(len(legend), 6), fontsize=7)
  fig.suptitle(title, fontsize=9)
  return fig


def report(splits, shots, bits, command, diverging=None, diverging_command='',
           diverging_note=''):
  """The Markdown report of ``splits`` (``{name: (workdir, cells)}``)."""
  lines = [f'# DTQ attention entropy per map, {bits}-bit, {shots} shots', '',
           f'Command: `{command}`  ', f'Commit: {bench_util.git_commit()}', '',
           'Entropy -Σ a_c log a_c of each map\'s attention weights (nats; '
           'uniform over C channels = log C, one channel = 0) at the first '
           'logged step and the last step, and the final test accuracy: mean '
           '± population std over the seeds counted. AFA and CE are the '
           'unweighted loss terms at the first logged step. Figure: '
           'the .png beside this file.', '']
  for name, (workdir, cells) in splits.items():
    maps = num_maps(cells)
    widths = [_uniform_note(cells, k) for k in range(maps)]
    lines += [f'## {name} (`{workdir}`)', '']
    if any(widths):
      lines += ['Uniform: ' + ', '.join(
          f'map {k} {w}' for k, w in enumerate(widths) if w) + '.', '']
    lines += split_table(cells, maps) + ['']
  if diverging:
    lines += [f'## Diverging run (`{diverging}`)', '']
    if diverging_command:
      lines += [f'Command: `{diverging_command}`' + (
          f' ({diverging_note})' if diverging_note else ''), '']
    lines += diverging_table(diverging) + ['']
  return '\n'.join(lines)


def _uniform_note(cells, k):
  """log C of map k, read from a uniform-attention variant if there is one."""
  seeds = cells.get('dtq_uniform')
  if not seeds:
    return ''
  logged = _with_key(seeds[0][1], _ENTROPY.format(k))
  if not logged:
    return ''
  h = logged[0][_ENTROPY.format(k)]
  return f'{h:.2f} ({round(math.exp(h))} channels)'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--split', action='append', metavar='NAME=WORKDIR',
                      help='a compare.py workdir and its name (repeatable; '
                      f'default {" ".join(DEFAULT_SPLITS)})')
  parser.add_argument('--shots', type=int, default=30)
  parser.add_argument('--bits', type=int, default=4)
  parser.add_argument('--diverging_run', default=None,
                      help='a seed folder that logged every step, for a '
                      'per-step table')
  parser.add_argument('--diverging_command', default='',
                      help='the command that made --diverging_run')
  parser.add_argument('--diverging_note', default='',
                      help='what to say of that run (commit, how it ended)')
  parser.add_argument('--out', default='results/attention_entropy_fmnist.md')
  args = parser.parse_args(argv)
  try:
    splits = {}
    for spec in args.split or DEFAULT_SPLITS:
      name, sep, workdir = spec.partition('=')
      if not sep or not name or not workdir:
        raise errors.UserError(f'--split {spec!r}: expected NAME=WORKDIR')
      splits[name] = (workdir, read_cells(workdir, args.shots, args.bits))
    text = report(splits, args.shots, args.bits, bench_util.command_line(),
                  args.diverging_run, args.diverging_command,
                  args.diverging_note)
    bench_util.write_text_atomic(args.out, text)
    png = os.path.splitext(args.out)[0] + '.png'
    plot.save_png(figure({n: c for n, (_, c) in splits.items()},
                         f'DTQ attention entropy, {args.bits}-bit, '
                         f'{args.shots} shots'), png)
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(text)
  print(png)
  return 0


if __name__ == '__main__':
  sys.exit(main())
