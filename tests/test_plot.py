"""dtq_jax.plot: a tiny run's curves, compare.py's figures, bad input."""

import json
import os
import subprocess
import sys

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import ErrorbarContainer
import pytest

import commands
from dtq_jax.infra import errors
from dtq_jax import plot
from dtq_jax.run import config_validation
from dtq_jax.run import experiment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _is_png(path):
  with open(path, 'rb') as f:
    return f.read(8) == PNG_MAGIC and os.path.getsize(path) > 1000


@pytest.fixture(name='dtq_run', scope='module')
def dtq_run_fixture(tmp_path_factory, tiny_folder):
  """A finished two-epoch DTQ run of the tiny folder: its workdir."""
  root, make_config = tiny_folder
  config = make_config(root, 'quick,dtq')
  config.num_epochs = 2
  workdir = str(tmp_path_factory.mktemp('plot') / 'dtq')
  experiment.run(config_validation.validate(config), workdir)
  return workdir


def test_run_figure_draws_every_logged_curve(dtq_run, tmp_path, capsys):
  with open(os.path.join(dtq_run, 'seed_1', 'metrics.jsonl')) as f:
    keys = {k for line in f for k in json.loads(line)}
  losses = {k for k in keys if k.startswith('train/loss') or k == 'test/loss'}
  entropies = {k for k in keys if k.startswith('train/attention_entropy_')}
  assert {'train/loss_ce', 'train/loss_kl', 'train/loss_afa'} <= losses
  assert len(entropies) == 4

  runs = plot.find_runs(dtq_run)
  assert list(runs) == ['dtq'] and [s for s, _ in runs['dtq']] == ['seed_1']
  fig = plot.run_figure(runs)
  loss_ax, accuracy_ax, entropy_ax = fig.axes
  assert {l.get_label() for l in loss_ax.lines} == losses
  assert {l.get_label() for l in accuracy_ax.lines} == {'train/accuracy',
                                                         'test/accuracy'}
  assert len(entropy_ax.lines) == 4
  # Two epochs: the test curve has one point per evaluation.
  test_line, = [l for l in accuracy_ax.lines if l.get_label() == 'test/accuracy']
  assert len(test_line.get_xdata()) == 2

  # The command line, on the run and on one seed; the default is in the run.
  assert plot.main([dtq_run]) == 0
  out = os.path.join(dtq_run, plot.DEFAULT_NAME)
  assert capsys.readouterr().out.strip() == out and _is_png(out)
  seed_png = str(tmp_path / 'seed.png')
  assert plot.main([os.path.join(dtq_run, 'seed_1'), '--out', seed_png]) == 0
  assert _is_png(seed_png)
  assert not [n for n in os.listdir(tmp_path) if '.tmp' in n]


def test_comparison_folder_gives_one_row_per_method(dtq_run, tmp_path):
  # A comparison folder of two methods: the run and a copy of its metrics
  # (an 'ft'-like run: its loss terms only, no attention).
  compare = tmp_path / 'compare'
  compare.mkdir()
  os.symlink(dtq_run, compare / 'dtq')
  (compare / 'ft' / 'seed_1').mkdir(parents=True)
  with open(os.path.join(dtq_run, 'seed_1', 'metrics.jsonl')) as f, open(
      compare / 'ft' / 'seed_1' / 'metrics.jsonl', 'w') as g:
    for line in f:
      record = json.loads(line)
      g.write(json.dumps({k: v for k, v in record.items()
                          if 'attention' not in k and 'kl' not in k
                          and 'afa' not in k}) + '\n')
  (compare / 'comparison.md').write_text('| method |\n')
  fig = plot.run_figure(plot.find_runs(str(compare)))
  assert len(fig.axes) == 6
  assert [ax.get_title().split(':')[0] for ax in fig.axes] == ['dtq'] * 3 + [
      'ft'] * 3
  assert not fig.axes[5].lines and fig.axes[2].lines


def _write_metrics(folder, records):
  folder.mkdir(parents=True)
  with open(folder / 'metrics.jsonl', 'w') as f:
    for record in records:
      f.write(json.dumps(record) + '\n')


def _synthetic_comparison(root, ft_loss=1.1):
  """A comparison folder: 'dtq' (losses 0.05..10, four attention maps) and
  'ft' (one loss near ``ft_loss``, no attention), 20 steps each."""
  dtq, ft = [], []
  for step in range(1, 21):
    dtq.append({'step': step, 'train/loss': 11.0 - step * 0.2,
                'train/loss_ce': 1.1 - step * 0.02,
                'train/loss_afa': 10.0 - step * 0.2,
                'train/loss_kl': 0.05 + step * 0.001,
                'train/accuracy': 30.0 + step,
                **{f'train/attention_entropy_{k}': 2.0 - step * 0.01 * k
                   for k in range(4)}})
    ft.append({'step': step, 'train/loss': ft_loss - step * 0.01,
               'train/loss_ce': ft_loss - step * 0.01,
               'train/accuracy': 35.0 + step})
  for records in (dtq, ft):
    records[9].update({'test/loss': 1.0, 'test/accuracy': 40.0})
  _write_metrics(root / 'dtq' / 'seed_1', dtq)
  _write_metrics(root / 'ft' / 'seed_1', ft)
  return str(root)


def test_legends_lie_outside_the_curves(tmp_path):
  fig = plot.run_figure(plot.find_runs(_synthetic_comparison(tmp_path)))
  FigureCanvasAgg(fig).draw()
  legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()]
  # One legend per column, naming every curve of the column.
  assert len(legends) == 3
  names = {t.get_text() for legend in legends for t in legend.get_texts()}
  assert {'train/loss_kl', 'test/accuracy', 'map 0', 'map 3'} <= names
  figure_box = fig.bbox
  for legend in legends:
    box = legend.get_window_extent()
    # Inside an axes a legend hides curves (issue #29): no axes holds it.
    for ax in fig.axes:
      assert not box.overlaps(ax.get_window_extent()), (
          [t.get_text() for t in legend.get_texts()], ax.get_title())
    # And it is not cut off by the figure's edge.
    assert (box.x0 >= 0 and box.y0 >= 0 and box.x1 <= figure_box.x1 and
            box.y1 <= figure_box.y1), box


@pytest.mark.parametrize('ft_loss, scale', [(1.1, 'log'), (None, 'linear')])
def test_comparable_panels_share_their_y_axis(tmp_path, ft_loss, scale):
  root = _synthetic_comparison(tmp_path, ft_loss or 1.1)
  if ft_loss is None:
    # Without the small KL term the losses span less than 20x: linear.
    for name in ('dtq', 'ft'):
      path = tmp_path / name / 'seed_1' / 'metrics.jsonl'
      records = [{k: v for k, v in json.loads(line).items()
                  if k != 'train/loss_kl'} for line in path.read_text(
                      ).splitlines()]
      path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  fig = plot.run_figure(plot.find_runs(root))
  FigureCanvasAgg(fig).draw()
  rows = [fig.axes[:3], fig.axes[3:]]
  for col in range(2):  # loss, accuracy: both rows drawn
    top, bottom = rows[0][col], rows[1][col]
    assert top.get_yscale() == bottom.get_yscale()
    assert top.get_ylim() == bottom.get_ylim()
  assert {rows[0][0].get_yscale(), rows[1][0].get_yscale()} == {scale}
  assert rows[1][2].texts[0].get_text() == 'not logged'


def test_methods_and_shots_figures_from_cells():
  cells = [dict(method='fp', bits='32/32', shots=None, mean=90.0, std=0.2,
                seeds=[89.8, 90.0, 90.2]),
           dict(method='dtq', bits='4/4', shots=None, mean=87.0, std=0.3,
                seeds=[86.7, 87.0, 87.3]),
           dict(method='dtq', bits='5/5', shots=None, mean=88.0, std=0.0,
                seeds=[])]
  ax, = plot.methods_figure(cells, 'methods', 'caption').axes
  bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
  assert [c.get_label() for c in bars] == ['32/32 bits (w/a)',
                                           '4/4 bits (w/a)', '5/5 bits (w/a)']
  # One scatter of seeds per cell that has them.
  assert len(ax.collections) - sum(len(c.lines[2]) for c in bars) == 2
  shots = [dict(c, shots=s, method=m, bits='4/4') for s in (5, 10, 30)
           for m, c in (('ft', cells[0]), ('dtq', cells[1]))]
  ax, = plot.shots_figure(shots, 'shots').axes
  bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
  assert [c.get_label() for c in bars] == ['ft', 'dtq']
  assert list(bars[0].lines[0].get_xdata()) == [5, 10, 30]


def test_bits_figure_one_panel_per_shots_with_the_fp_ceiling():
  cells = []
  for n in (10, 30):
    cells.append(dict(method='fp', bits='32/32', shots=n, mean=85.0 + n / 10,
                      std=0.2, seeds=[84.8, 85.2]))
    for m, base in (('ft', 60.0), ('dtq_lsq', 70.0)):
      for b in (2, 3, 4):
        cells.append(dict(method=m, bits=f'{b}/{b}', shots=n,
                          mean=base + 4 * b, std=0.5, seeds=[]))
  fig = plot.bits_figure(cells, 'map', 'caption')
  FigureCanvasAgg(fig).draw()
  assert [ax.get_title() for ax in fig.axes] == ['10 shots', '30 shots']
  assert fig.axes[0].get_ylim() == fig.axes[1].get_ylim()  # shared y
  for ax, n in zip(fig.axes, (10, 30)):
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert [c.get_label() for c in bars] == ['ft', 'dtq_lsq']
    assert list(bars[0].lines[0].get_xdata()) == [2, 3, 4]
    assert list(bars[1].lines[0].get_ydata()) == [78.0, 82.0, 86.0]
    # The full-precision ceiling: a horizontal line at its mean.
    ceiling, = [l for l in ax.get_lines() if l.get_linestyle() == '--']
    assert list(ceiling.get_ydata()) == [85.0 + n / 10] * 2
  # One legend, beside the panels: it covers no curve.
  legend, = fig.legends
  assert {t.get_text() for t in legend.get_texts()} == {
      'fp (full precision)', 'ft', 'dtq_lsq'}
  for ax in fig.axes:
    assert not legend.get_window_extent().overlaps(ax.get_window_extent())


TABLE = """# tiny: shots comparison

Seeds: 2 per cell (seed+1..seed+2); total time 1 s.

| method | bits (w/a) | final test acc. (%) | best test acc. (%) | wall time per run (s) | final test acc. per seed (%) |
|---|---|---|---|---|---|
| ft, 5 shots | 4/4 | 70.00 ± 1.00 | 71.00 ± 1.00 | 30 | 69.00, 71.00 |
| dtq, 5 shots | 4/4 | 72.00 ± 0.50 | 72.00 ± 0.50 | 30 | 71.50, 72.50 |
| ft, 10 shots | 4/4 | 80.00 ± 1.00 | 81.00 ± 1.00 | 30 | 79.00, 81.00 |
| dtq, 10 shots | 4/4 | 82.00 ± 0.50 | 82.00 ± 0.50 | 30 | 81.50, 82.50 |
"""


def test_compare_plot_only_draws_a_table(tmp_path):
  table = tmp_path / 'table.md'
  table.write_text(TABLE)
  cmd = [sys.executable, 'benchmarks/compare.py', '--plot_only',
         f'--out={table}']
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == str(tmp_path / 'table.png')
  assert _is_png(tmp_path / 'table.png')
  table.write_text('# not a table\n')
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 2
  assert [l for l in proc.stderr.splitlines() if l.startswith('error:')] == [
      f'error: {table}: no table rows (is it a compare.py table?)']


def test_without_matplotlib_the_command_names_the_extra(tmp_path, monkeypatch):
  # As after a plain `pip install .`: matplotlib is an extra.
  proc = commands.run_without('dtq_jax.plot', [str(tmp_path)], 'matplotlib')
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      "error: python -m dtq_jax.plot needs matplotlib: "
      "pip install 'dtq-jax[plot]'"]
  # The library (benchmarks/compare.py draws with it) says the same.
  for name in [n for n in sys.modules if n.split('.')[0] == 'matplotlib']:
    monkeypatch.setitem(sys.modules, name, None)
  with pytest.raises(errors.UserError, match=r"dtq-jax\[plot\]"):
    plot.methods_figure([dict(method='dtq', bits='4/4', mean=1.0, std=0.0,
                              seeds=[])], 'methods')


@pytest.mark.parametrize('make', ['missing', 'empty', 'blank_metrics'])
def test_bad_input_is_one_line_exit_2(tmp_path, make):
  path = tmp_path / 'run'
  if make != 'missing':
    (path / 'seed_1').mkdir(parents=True)
  if make == 'blank_metrics':
    (path / 'seed_1' / 'metrics.jsonl').write_text('{"step": 1, "trai\n')
  proc = subprocess.run([sys.executable, '-m', 'dtq_jax.plot', str(path)],
                        cwd=ROOT, capture_output=True, text=True, timeout=60,
                        check=False)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: {path}'), lines
  assert not os.path.exists(path / plot.DEFAULT_NAME)
