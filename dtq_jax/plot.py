"""Figures of training runs and method comparisons, written as PNG files.

  python -m dtq_jax.plot RUN_OR_COMPARISON_DIR [--out FILE.png]

draws, from the ``metrics.jsonl`` of every ``seed_N/`` below the folder, the
loss terms, the train and test accuracy and (DTQ) the attention entropy of
each map over the steps: one row of panels per run, so a ``main.py`` comparison
folder (one folder per method) gives one row per method. The default output is
``curves.png`` in the folder. ``benchmarks/compare.py`` draws its tables with
``methods_figure``, ``shots_figure`` and ``bits_figure``.

Figures are ``matplotlib.figure.Figure`` objects saved by the Agg renderer:
no pyplot, so nothing needs a display or touches global plotting state.
"""

import argparse
import importlib
import json
import os
import re
import sys
import textwrap

from dtq_jax.infra import errors
from dtq_jax.infra import files

METRICS = 'metrics.jsonl'
DEFAULT_NAME = 'curves.png'
# Small enough that the committed figures stay a few tens of KB.
DPI = 90
# matplotlib is an extra (pip install 'dtq-jax[plot]'): the figures import it
# when drawn, so that without it the command says what to install.
EXTRA_HINT = "pip install 'dtq-jax[plot]'"
_SEED_DIR = re.compile(r'seed_(\d+)$')
# The step's attention entropy of map k, as the loop logs it.
ENTROPY_KEY = re.compile(r'train/attention_entropy_(\d+)$')


def new_figure(what='dtq_jax.plot', **kwargs):
  """A ``matplotlib.figure.Figure``; matplotlib is imported here.

  Args:
    what: who needs it, for the error (e.g. the command's name).
    **kwargs: the ``Figure``'s arguments.

  Returns:
    The new ``Figure``.

  Raises:
    errors.UserError: matplotlib is not installed.
  """
  try:
    figure = importlib.import_module('matplotlib.figure')
  except ImportError as e:
    raise errors.UserError(f'{what} needs matplotlib: {EXTRA_HINT}') from e
  return figure.Figure(**kwargs)


def read_metrics(path):
  """The records of one ``metrics.jsonl`` (lines cut short by a kill skipped).

  Args:
    path: the file.

  Returns:
    A list of dicts, each with ``step`` and ``split/name`` scalars.
  """
  records = []
  with errors.user_errors(f'reading {path}', (OSError, UnicodeDecodeError)):
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if isinstance(record, dict) and 'step' in record:
          records.append(record)
  return records


def seed_records(folder):
  """``[(seed name, records)]`` of a run folder, or of a single seed folder."""
  if os.path.isfile(os.path.join(folder, METRICS)):
    return [(os.path.basename(os.path.normpath(folder)),
             read_metrics(os.path.join(folder, METRICS)))]
  seeds = sorted((int(m.group(1)), name) for name in os.listdir(folder)
                 if (m := _SEED_DIR.match(name))
                 and os.path.isfile(os.path.join(folder, name, METRICS)))
  return [(name, read_metrics(os.path.join(folder, name, METRICS)))
          for _, name in seeds]


def find_runs(path):
  """The runs below ``path`` and their seeds' metrics.

  ``path`` is a seed folder (``metrics.jsonl``), a run folder (``seed_N/``),
  or a comparison folder whose subfolders are runs (``main.py`` with
  ``compare_methods``, or ``benchmarks/compare.py``'s workdir).

  Args:
    path: the folder.

  Returns:
    ``{run name: [(seed name, records), ...]}`` in folder order; every run
    has at least one seed with records.

  Raises:
    errors.UserError: no such folder, or no metrics below it.
  """
  if not os.path.isdir(path):
    raise errors.UserError(f'{path} is not a folder (expected a run folder '
                           'with seed_N/metrics.jsonl)')
  with errors.user_errors(f'listing {path}', OSError):
    own = seed_records(path)
    if own:
      runs = {os.path.basename(os.path.abspath(path)): own}
    else:
      runs = {name: seed_records(os.path.join(path, name))
              for name in sorted(os.listdir(path))
              if os.path.isdir(os.path.join(path, name))}
  runs = {name: [(s, r) for s, r in seeds if r] for name, seeds in runs.items()}
  runs = {name: seeds for name, seeds in runs.items() if seeds}
  if not runs:
    raise errors.UserError(
        f'{path}: no metrics found (expected {METRICS} in the folder, in its '
        'seed_N/ folders, or in its runs\' seed_N/ folders)')
  return runs


def _series(records, key):
  steps = [r['step'] for r in records if key in r]
  return steps, [r[key] for r in records if key in r]


def _keys(runs, wanted):
  """The metric keys ``wanted(key)`` accepts, over all runs, sorted."""
  keys = {k for seeds in runs.values() for _, records in seeds
          for r in records for k in r if wanted(k)}
  entropy = lambda k: int(ENTROPY_KEY.match(k).group(1)) if ENTROPY_KEY.match(
      k) else -1
  return sorted(keys, key=lambda k: (entropy(k), k))


def num_entropy_maps(keys):
  """How many attention maps metric ``keys`` log (``ENTROPY_KEY``), or 0.

  Args:
    keys: metric names (e.g. a record's keys).

  Returns:
    One more than the highest map index among them.
  """
  found = [int(m.group(1)) for k in keys if (m := ENTROPY_KEY.match(k))]
  return max(found) + 1 if found else 0


def _is_loss(key):
  return key == 'train/loss' or key.startswith('train/loss_') or (
      key.split('/')[-1] == 'loss' and not key.startswith('train/'))


def _is_accuracy(key):
  return key.endswith('/accuracy')


def _style(key, j):
  """The line style of metric ``key``, the ``j``-th of its panel."""
  return dict(color=f'C{j % 10}', alpha=0.85,
              marker=None if key.startswith('train/') else 'o',
              markersize=3, linewidth=1.2,
              # The total equals CE for ft/fp: dashed, both show.
              linestyle='--' if key == 'train/loss' else '-')


def _legend_label(key):
  """The legend's name of ``key``: an entropy curve is its map's number."""
  m = ENTROPY_KEY.match(key)
  return f'map {m.group(1)}' if m else key


def _wants_log(values):
  """Whether loss ``values`` span enough decades for a logarithmic axis."""
  return bool(values) and min(values) > 0 and max(values) > 20 * min(values)


def run_figure(runs, title=None):
  """Training curves: one row per run; losses, accuracy, attention entropy.

  Every seed of a run is a line of the metric's colour (the same colour in
  every row), so each column has one legend, under its bottom panel: inside
  the axes a legend hid the curves it names. Evaluation points (test/val)
  carry markers. The panels of a column share their y axis, so that the rows
  (methods) compare at a glance; the loss column is logarithmic when its
  values are positive and span more than a factor of 20 (AFA against KL),
  in every row alike.

  Args:
    runs: ``find_runs``'s dict.
    title: the figure's title.

  Returns:
    The ``Figure``: ``len(runs)`` rows of 2 axes, 3 when some run logged
    ``train/attention_entropy_i``.
  """
  panels = [('loss', _keys(runs, _is_loss)),
            ('accuracy (%)', _keys(runs, _is_accuracy))]
  entropy = _keys(runs, ENTROPY_KEY.match)
  if entropy:
    panels.append(('attention entropy', entropy))
  fig = new_figure(figsize=(4.2 * len(panels), 2.6 * len(runs) + 1.2),
                   layout='constrained')
  axes = fig.subplots(len(runs), len(panels), squeeze=False, sharex=True)
  for col, (label, keys) in enumerate(panels):
    column = axes[:, col]
    values_drawn, drawn, handles = [], [], {}
    for ax, (name, seeds) in zip(column, runs.items()):
      for j, key in enumerate(keys):
        for _, records in seeds:
          steps, values = _series(records, key)
          if steps:
            values_drawn.extend(values)
            handles[key], = ax.plot(steps, values, label=key,
                                    **_style(key, j))
      n = len(seeds)
      ax.set_title(f'{name}: {label}' + (f' ({n} seeds)' if n > 1 else ''),
                   fontsize=9)
      ax.grid(alpha=0.3)
      ax.tick_params(labelsize=8)
      if ax.lines:
        drawn.append(ax)
      else:
        ax.text(0.5, 0.5, 'not logged', ha='center', va='center',
                transform=ax.transAxes, fontsize=8, color='gray')
        ax.set_yticks([])
    # Shared only among the panels with curves: an empty one has no ticks.
    for ax in drawn[1:]:
      ax.sharey(drawn[0])
    if label == 'loss' and _wants_log(values_drawn):
      for ax in drawn:
        ax.set_yscale('log')
    if handles:
      ordered = [handles[k] for k in keys if k in handles]
      column[-1].legend(
          ordered, [_legend_label(k) for k in keys if k in handles],
          fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.22),
          # One line for up to 4 names (the maps), else rows of 3.
          ncols=len(ordered) if len(ordered) <= 4 else 3, frameon=False,
          title='attention map' if label == 'attention entropy' else None,
          title_fontsize=7)
  for ax in axes[-1]:
    ax.set_xlabel('step', fontsize=8)
  if title:
    fig.suptitle(title, fontsize=10)
  return fig


def _caption(fig, caption):
  """Wrapped small text under the axes."""
  if caption:
    # About 15 characters of 8-point text per inch.
    width = int(15 * fig.get_figwidth())
    fig.supxlabel('\n'.join(textwrap.wrap(caption, width)), fontsize=8,
                  x=0.01, ha='left')


def _points(ax, x, values, color):
  """Each seed's value as a hollow dot at ``x``."""
  if values:
    ax.scatter([x] * len(values), values, s=12, facecolors='none',
               edgecolors=color, linewidths=0.8, zorder=3)


def methods_figure(rows, title, caption=''):
  """Final test accuracy per method, one series per bit width.

  Args:
    rows: dicts with ``method``, ``bits`` ('4/4'), ``mean``, ``std`` and
      ``seeds`` (each seed's value; may be empty), in table order.
    title: the figure's title.
    caption: text under the plot (what the bars and points are).

  Returns:
    The ``Figure`` (one axes; an error bar container per bit width).
  """
  methods = list(dict.fromkeys(r['method'] for r in rows))
  bits = list(dict.fromkeys(r['bits'] for r in rows))
  width = 0.7 / len(bits)
  fig = new_figure(figsize=(max(5.0, 0.75 * len(methods) + 1.5), 4.2),
                   layout='constrained')
  ax = fig.subplots()
  for j, b in enumerate(bits):
    color = f'C{j}'
    xs, means, stds = [], [], []
    for r in rows:
      if r['bits'] != b:
        continue
      # fp has one bit width; it stays centred on its method.
      n = sum(1 for q in rows if q['method'] == r['method'])
      offset = 0.0 if n == 1 else (j - (len(bits) - 1) / 2) * width
      x = methods.index(r['method']) + offset
      xs.append(x)
      means.append(r['mean'])
      stds.append(r['std'])
      _points(ax, x, r['seeds'], color)
    ax.errorbar(xs, means, yerr=stds, fmt='o', color=color, capsize=3,
                markersize=4, label=f'{b} bits (w/a)')
  ax.set_xticks(range(len(methods)), methods, rotation=30, ha='right',
                fontsize=8)
  ax.set_xlim(-0.6, len(methods) - 0.4)
  ax.set_ylabel('final test accuracy (%)', fontsize=9)
  ax.tick_params(labelsize=8)
  ax.grid(axis='y', alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title, fontsize=10)
  _caption(fig, caption)
  return fig


def shots_figure(rows, title, caption=''):
  """Final test accuracy against shots per class, one line per method.

  Args:
    rows: dicts as for ``methods_figure`` plus ``shots`` (int).
    title: the figure's title.
    caption: text under the plot.

  Returns:
    The ``Figure`` (one axes; an error bar container per method and bits).
  """
  bits = list(dict.fromkeys(r['bits'] for r in rows))
  several_bits = len(bits) > 1
  series = {}
  for r in rows:
    name = r['method'] + (f' {r["bits"]}' if several_bits else '')
    series.setdefault(name, []).append(r)
  shots = sorted({r['shots'] for r in rows})
  fig = new_figure(figsize=(5.5, 4.2), layout='constrained')
  ax = fig.subplots()
  for j, (name, cells) in enumerate(series.items()):
    cells = sorted(cells, key=lambda r: r['shots'])
    color = f'C{j % 10}'
    for r in cells:
      _points(ax, r['shots'], r['seeds'], color)
    ax.errorbar([r['shots'] for r in cells], [r['mean'] for r in cells],
                yerr=[r['std'] for r in cells], fmt='-o', color=color,
                capsize=3, markersize=4, label=name)
  ax.set_xscale('log')
  ax.set_xticks(shots, [str(s) for s in shots])
  ax.minorticks_off()
  ax.set_xlabel('training images per class (shots)', fontsize=9)
  ax.set_ylabel('final test accuracy (%)', fontsize=9)
  ax.tick_params(labelsize=8)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, title=None if several_bits else f'{bits[0]} bits (w/a)',
            title_fontsize=8)
  ax.set_title(title, fontsize=10)
  _caption(fig, caption)
  return fig


def bits_figure(rows, title, caption=''):
  """Final test accuracy against the bit width, one panel per shots value.

  One line per method (quantizer variants included) over the quantized bit
  widths; a full-precision row (bits '32/32') is the dashed ceiling of its
  panel, its band one std.

  Args:
    rows: dicts as for ``shots_figure`` (``shots`` may be None: one panel).
    title: the figure's title.
    caption: text under the plot.

  Returns:
    The ``Figure`` (one axes per shots value, sharing y; an error bar
    container per method in each).
  """
  shots = sorted({r['shots'] for r in rows}, key=lambda s: s or 0)
  methods = list(dict.fromkeys(r['method'] for r in rows
                               if r['bits'] != '32/32'))
  bits = sorted({int(r['bits'].split('/')[0]) for r in rows
                 if r['bits'] != '32/32'})
  fig = new_figure(figsize=(3.2 * len(shots) + 1.8, 4.4),
                   layout='constrained')
  axes = fig.subplots(1, len(shots), sharey=True, squeeze=False)[0]
  for ax, n in zip(axes, shots):
    panel = [r for r in rows if r['shots'] == n]
    for r in panel:
      if r['bits'] == '32/32':
        ax.axhline(r['mean'], color='0.3', linestyle='--', linewidth=1,
                   label=f'{r["method"]} (full precision)')
        ax.axhspan(r['mean'] - r['std'], r['mean'] + r['std'], color='0.3',
                   alpha=0.12, linewidth=0)
    for j, method in enumerate(methods):
      cells = sorted((r for r in panel if r['method'] == method and
                      r['bits'] != '32/32'),
                     key=lambda r: int(r['bits'].split('/')[0]))
      if not cells:
        continue
      color = f'C{j % 10}'
      xs = [int(r['bits'].split('/')[0]) for r in cells]
      for x, r in zip(xs, cells):
        _points(ax, x, r['seeds'], color)
      ax.errorbar(xs, [r['mean'] for r in cells],
                  yerr=[r['std'] for r in cells], fmt='-o', color=color,
                  capsize=3, markersize=4, label=method)
    ax.set_xticks(bits, [str(b) for b in bits])
    ax.set_xlabel('bits (weights = activations)', fontsize=9)
    ax.set_title(f'{n} shots' if n else title, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('final test accuracy (%)', fontsize=9)
  # One legend for all panels, right of them: it covers no curve (nor the
  # caption below).
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc='outside right upper', fontsize=8)
  fig.suptitle(title, fontsize=10)
  _caption(fig, caption)
  return fig


def save_png(fig, path, dpi=DPI):
  """Writes ``fig`` to ``path`` under a temporary name, then renames it.

  Args:
    fig: a ``Figure``.
    path: the PNG file.
    dpi: resolution.

  Raises:
    errors.UserError: the folder cannot be written.
  """
  with errors.user_errors(f'writing {path}', OSError):
    with files.atomic_path(path) as tmp:
      fig.savefig(tmp, format='png', dpi=dpi)


def main(argv=None):
  """``python -m dtq_jax.plot``; returns the exit status."""
  parser = argparse.ArgumentParser(
      prog='python -m dtq_jax.plot',
      description='Draw the training curves of a run (seed_N/metrics.jsonl) '
      'or of every run of a comparison folder to a PNG.')
  parser.add_argument('path', help='a seed, run or comparison folder')
  parser.add_argument('--out', help=f'the PNG (default PATH/{DEFAULT_NAME})')
  parser.add_argument('--dpi', type=int, default=DPI)
  args = parser.parse_args(argv)
  try:
    new_figure(parser.prog)  # Before reading anything: the extra is missing.
    runs = find_runs(args.path)
    out = args.out or os.path.join(args.path, DEFAULT_NAME)
    save_png(run_figure(runs, os.path.normpath(args.path)), out, args.dpi)
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
