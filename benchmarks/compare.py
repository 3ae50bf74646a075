"""Methods x bit widths x seeds on one config, as a Markdown table.

  python benchmarks/compare.py                       # the Fashion-MNIST demo
  python benchmarks/compare.py --sweep=shots         # 5/10/30/100 shots
  python benchmarks/compare.py --sweep=shots --config=configs/fmnist.py:in_domain \
      --methods=ft,delta_1e-3,dtq     # the in-domain split (its own files)
  python benchmarks/compare.py --config=configs/mit67.py --methods=ft,delta,dtq \
      --bits=4 --seeds=5 --workdir=runs/compare_mit67
  python benchmarks/compare.py --sweep=shots --plot_only  # redraw the figure

Each cell (method, bits[, shots]) is an ordinary experiment in its own folder
under --workdir, trained for --seeds seeds by experiment.run_single, so a rerun
skips finished cells and resumes an interrupted one; a larger --seeds adds
seeds to finished cells (a smaller one is refused before anything trains).
Tables that share a workdir share its cells (the 30-shot rows of the shots
sweep and of a --shots=30 table of variants): extending a cell there to more
seeds extends it for both, so rerun the other table with as many --seeds. The table (mean and
population std of final- and best-epoch test accuracy, each seed's final
accuracy, mean wall time per run) goes to --out with the exact command, the
git commit and the machine above it, and its figure (accuracy per method, or
against shots, with the seeds' spread) beside it as a PNG. --plot_only redraws
that figure from the table alone.
"""

import os
import re
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

import bench_util

bench_util.add_repo_to_path()

# pylint: disable=g-import-not-at-top,wrong-import-position
from dtq_jax.data import datasets
from dtq_jax.infra import caches
from dtq_jax.infra import errors
from dtq_jax import plot
from dtq_jax.run import config_validation
from dtq_jax.run import experiment
from dtq_jax.run import teacher as teacher_lib

# Methods and ablations: name -> (config.method, overrides).
VARIANTS = {
    'fp': ('fp', {}),
    'ft': ('ft', {}),
    'l2': ('l2', {}),
    'l2sp': ('l2sp', {}),
    'delta': ('delta', {}),
    'dtq': ('dtq', {}),
    'dtq_no_kl': ('dtq', {'dtq.kl_weight': 0.0}),
    'dtq_no_afa': ('dtq', {'dtq.afa_weight': 0.0}),
    'dtq_uniform': ('dtq', {'dtq.attention': 'uniform'}),
    'dtq_reversed': ('dtq', {'dtq.attention': 'reversed'}),
    'dtq_entropy': ('dtq', {'dtq.attention_entropy_weight': 0.1}),
    # The paper's theta (the demo uses 1e-3) and DELTA at the demo's stable
    # alpha (docs/results.md).
    'dtq_theta0.01': ('dtq', {'dtq.afa_weight': 0.01}),
    'delta_1e-3': ('delta', {'delta.alpha': 1e-3}),
    # The KL temperature (the demo's is 4).
    'dtq_T2': ('dtq', {'dtq.temperature': 2.0}),
    'dtq_T10': ('dtq', {'dtq.temperature': 10.0}),
    # Per-replica statistics (the authors' two-GPU nn.DataParallel: BatchNorm
    # and activation ranges over each half of a 64-image batch), against the
    # same evaluation batch (512 splits into groups of 32; the demo's 500
    # does not).
    'ft_eval512': ('ft', {'eval_batch_size': 512}),
    'ft_groups32': ('ft', {'eval_batch_size': 512, 'stats_group_size': 32}),
    'dtq_eval512': ('dtq', {'eval_batch_size': 512}),
    'dtq_groups32': ('dtq', {'eval_batch_size': 512, 'stats_group_size': 32}),
    # Learned quantizers instead of the paper's min-max one (issue #27's
    # map): LSQ weights, LSQ+/unsigned LSQ inputs; with PACT, a learned
    # clipping level for the inputs that are never negative.
    'ft_lsq': ('ft', {'quant.method': 'lsq'}),
    'dtq_lsq': ('dtq', {'quant.method': 'lsq'}),
    'ft_pact': ('ft', {'quant.method': 'pact'}),
    'dtq_pact': ('dtq', {'quant.method': 'pact'}),
    # bfloat16 compute (issue #28): the same recipe with the networks'
    # activations and convolutions in bfloat16 (float32 parameters).
    'ft_bf16': ('ft', {'compute_dtype': 'bfloat16'}),
    'dtq_bf16': ('dtq', {'compute_dtype': 'bfloat16'}),
}
# The default list of --methods: the paper's methods and the first ablations.
DEFAULT_VARIANTS = ('fp', 'ft', 'l2', 'l2sp', 'delta', 'dtq', 'dtq_no_kl',
                    'dtq_no_afa', 'dtq_uniform')

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/fmnist.py', 'Base config.', lock_config=False)
_METHODS = flags.DEFINE_list(
    'methods', None, f'Variants among {", ".join(VARIANTS)} (default: '
    f'{",".join(DEFAULT_VARIANTS)}; with --sweep=shots: ft,delta,dtq).')
_BITS = flags.DEFINE_list('bits', None,
                          'Bit widths (default 4,5; shots sweep: 4).')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds per cell (repeats).')
_SWEEP = flags.DEFINE_enum('sweep', 'methods', ['methods', 'shots'],
                           'What the table compares.')
_SHOTS = flags.DEFINE_list('shots', ['5', '10', '30', '100'],
                           'Shots per class for --sweep=shots.')
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Folder of the cells (default runs/compare_*).')
_OUT = flags.DEFINE_string('out', None, 'Markdown table (default results/).')
_PLOT_ONLY = flags.DEFINE_bool(
    'plot_only', False, 'Only redraw the figure of the --out table (trains '
    'nothing; --sweep and --config pick the default --out).')


def _set(config, dotted, value):
  *parents, leaf = dotted.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


def cell_config(base, variant, bits, shots=None):
  """The config of one table cell."""
  method, overrides = VARIANTS[variant]
  config = base.copy_and_resolve_references()
  config.method = method
  config.compare_methods = ()
  config.bits_w = config.bits_a = bits
  config.repeats = _SEEDS.value
  for k, v in overrides.items():
    _set(config, k, v)
  if shots is not None:
    config.dataset.shots_per_class = shots
    # Every step sees a full batch; few shots make a smaller one.
    n = shots * len(config.dataset.target_classes)
    config.batch_size = min(config.batch_size, n)
  return config_validation.validate(config)


def machine():
  return (f'{bench_util.cpu_model()}, {os.cpu_count()} cores, '
          f'jax {jax.__version__} on {jax.devices()[0].device_kind}')


def row(label, bits, summary):
  runs = summary['run_wall_time_s']
  seeds = summary.get('final_test_accuracy_per_repeat', [])
  return (f'| {label} | {bits} | {summary["final_test_accuracy"]:.2f} ± '
          f'{summary["final_test_std"]:.2f} | '
          f'{summary["best_test_accuracy"]:.2f} ± '
          f'{summary["best_test_std"]:.2f} | {sum(runs) / len(runs):.0f} | '
          f'{", ".join(f"{a:.2f}" for a in seeds)} |')


_LABEL = re.compile(r'(?P<method>[\w.-]+)(?:, (?P<shots>\d+) shots)?$')


def parse_table(text, path):
  """The cells of a table ``main`` wrote, as ``plot``'s figures take them.

  Tables written before the per-seed column have mean and std only: their
  cells get ``seeds=[]``.

  Args:
    text: the Markdown.
    path: its file, for error messages.

  Returns:
    A list of dicts: ``method``, ``bits``, ``shots`` (None in a methods
    table), ``mean`` and ``std`` of the final test accuracy, ``seeds``.

  Raises:
    errors.UserError: no table rows, or a row this script does not write.
  """
  rows = []
  lines = text.splitlines()
  start = next((i + 1 for i, l in enumerate(lines) if l.startswith('|---')),
               None)
  for line in lines[start or len(lines):]:
    if not line.startswith('|'):
      break
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    label = _LABEL.match(cells[0])
    try:
      mean, std = (float(x) for x in cells[2].split('±'))
      seeds = [float(x) for x in cells[5].split(',')] if len(
          cells) > 5 and cells[5] else []
    except (ValueError, IndexError):
      label = None
    if label is None:
      raise errors.UserError(f'{path}: row {line!r} is not a compare.py row')
    rows.append(dict(method=label['method'], bits=cells[1],
                     shots=int(label['shots']) if label['shots'] else None,
                     mean=mean, std=std, seeds=seeds))
  if not rows:
    raise errors.UserError(f'{path}: no table rows (is it a compare.py table?)')
  return rows


def draw(out, rows, title, num_seeds):
  """Draws the table's figure to ``out`` with .png; returns that path.

  Args:
    out: the Markdown table's path.
    rows: ``parse_table``'s cells.
    title: the figure's title.
    num_seeds: seeds per cell (for the caption).
  """
  source = os.path.basename(out)
  if all(r['seeds'] for r in rows):
    caption = (f'Final-epoch test accuracy ({source}): mean ± population std '
               f'over {num_seeds} seeds; hollow dots: each seed.')
  else:
    caption = (f'Final-epoch test accuracy ({source}): mean ± population std '
               f'over {num_seeds} seeds, as the table gives them; it holds no '
               'per-seed values, so single seeds are not drawn.')
  shots = any(r['shots'] is not None for r in rows)
  quantized_bits = {r['bits'] for r in rows if r['bits'] != '32/32'}
  if shots and len(quantized_bits) > 1:
    # Methods x bits x shots (the quantizer map): accuracy against bits.
    draw_figure = plot.bits_figure
  else:
    draw_figure = plot.shots_figure if shots else plot.methods_figure
  figure = draw_figure(rows, title, caption)
  path = os.path.splitext(out)[0] + '.png'
  plot.save_png(figure, path)
  return path


def redraw(out):
  """``--plot_only``: the figure of an existing table; returns its path."""
  with errors.user_errors(f'reading --out {out}', OSError):
    with open(out) as f:
      text = f.read()
  title = text.splitlines()[0].lstrip('# ') if text else out
  seeds = re.search(r'Seeds: (\d+) per cell', text)
  return draw(out, parse_table(text, out), title,
              int(seeds.group(1)) if seeds else '?')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  base = _CONFIG.value
  sweep = _SWEEP.value
  methods = _METHODS.value or (['ft', 'delta', 'dtq'] if sweep == 'shots'
                               else list(DEFAULT_VARIANTS))
  unknown = sorted(set(methods) - set(VARIANTS))
  if unknown:
    raise app.UsageError(f'unknown --methods {unknown}; allowed: '
                         f'{", ".join(VARIANTS)}')
  bits = [int(b) for b in (_BITS.value or (['4'] if sweep == 'shots'
                                           else ['4', '5']))]
  # configs/fmnist.py:in_domain,quick -> fmnist_in_domain_quick.
  path, _, variant = flags.FLAGS['config'].config_filename.partition(':')
  name = '_'.join([os.path.splitext(os.path.basename(path))[0]] + [
      t.strip() for t in variant.split(',') if t.strip()])
  workdir = _WORKDIR.value or os.path.join('runs', f'compare_{name}_{sweep}')
  out = _OUT.value or os.path.join('results', f'compare_{name}_{sweep}.md')
  try:
    if _PLOT_ONLY.value:
      print(redraw(out))
    else:
      _run_cells(base, sweep, methods, bits, name, workdir, out)
  except errors.UserError as e:
    # Bad input (a config or folder that cannot be used) is one line, as in
    # main.py; anything else is a bug and keeps its traceback.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


def _run_cells(base, sweep, methods, bits, name, workdir, out):
  """Trains (or reuses) every cell, then writes the table and its figure."""
  caches.enable_compilation_cache(base)

  # (variant, bits, shots, config, folder) of every cell, in table order.
  cells = []
  for shots in ([int(s) for s in _SHOTS.value] if sweep == 'shots'
                else [None]):
    for variant in methods:
      # Full precision does not depend on the bit width: one row.
      for b in ([32] if variant == 'fp' else bits):
        folder = os.path.join(workdir, bench_util.cell_name(variant, b, shots))
        cells.append((variant, b, shots, cell_config(base, variant, b, shots),
                      folder))
  # A cell run with other settings refuses the sweep before anything loads
  # or trains (more seeds than a cell has add to it).
  for *_, config, folder in cells:
    experiment.check_workdir(config, folder)
  data_cache, teacher = {}, None
  lines, rows = [], []
  start = time.time()
  for variant, b, shots, config, folder in cells:
    if shots not in data_cache:
      data_cache[shots] = datasets.load(config)
    data = data_cache[shots]
    if teacher is None:
      teacher = teacher_lib.load_teacher(config, data)
    summary = experiment.run_single(config, folder, data, teacher)
    label = variant if shots is None else f'{variant}, {shots} shots'
    lines.append(row(label, f'{b}/{b}', summary))
    rows.append(dict(method=variant, bits=f'{b}/{b}', shots=shots,
                     mean=summary['final_test_accuracy'],
                     std=summary['final_test_std'],
                     seeds=summary.get('final_test_accuracy_per_repeat', [])))
  header = [
      f'# {name}: {sweep} comparison',
      '',
      f'Command: `python {" ".join(sys.argv)}`  ',
      f'Commit: {bench_util.git_commit()}  ',
      f'Machine: {machine()}  ',
      f'Seeds: {_SEEDS.value} per cell (seed+1..seed+{_SEEDS.value}); '
      f'total time {time.time() - start:.0f} s for this invocation '
      '(finished cells are reused).',
      '',
      '| method | bits (w/a) | final test acc. (%) | best test acc. (%) '
      '| wall time per run (s) | final test acc. per seed (%) |',
      '|---|---|---|---|---|---|',
  ]
  os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
  bench_util.write_text_atomic(out, '\n'.join(header + lines) + '\n')
  print('\n'.join(header + lines))
  print(draw(out, rows, f'{name}: {sweep} comparison', _SEEDS.value))


if __name__ == '__main__':
  app.run(main)
