"""A whole experiment: repeats over seeds, their summary, comparisons.

``run(config, workdir)`` is what ``main.py`` runs (through launch.py). It
never overwrites a finished run (it prints the stored summary instead),
resumes an unfinished one, and refuses a workdir whose run (finished or not)
has a different config, or that another process is running in. The one
difference it accepts is a larger ``repeats``: the run's finished seeds are
kept and the new ones added. A run refused before it wrote anything (its data
or weights) leaves the workdir as it found it.
"""

import contextlib
import os

import jax
import ml_collections
import numpy as np

from dtq_jax.data import datasets
from dtq_jax.infra import errors
from dtq_jax.infra import files
from dtq_jax.infra import locks
from dtq_jax.method import delta
from dtq_jax.method import networks
from dtq_jax.models import own_network
from dtq_jax.run import saved_configs
# Not "teacher": run_single's argument of that name holds its variables.
from dtq_jax.run import teacher as teacher_lib
from dtq_jax.run import train


def _check_same_config(config, workdir, write=True):
  """Writes config.json, or checks that the workdir's run has the same config.

  ``write=False`` only checks: config.json is written once nothing about the
  config can fail any more (data and teacher loaded), so that a corrected
  rerun is not refused as "a different config".

  A finished run is refused like an unfinished one: rerunning it with another
  config would print its old results as if they were the new config's.

  Raises:
    ConfigError: the workdir holds a run with another config.
  """
  path = os.path.join(workdir, files.CONFIG)
  current = saved_configs.config_json(config)
  saved = files.read_json(path) if os.path.exists(path) else None
  if saved is not None:
    diff = saved_configs.differing_fields(saved, current)
    if diff:
      finished = os.path.exists(os.path.join(workdir, files.SUMMARY))
      state = 'a finished' if finished else 'an unfinished'
      advice = 'use another --workdir.'
      if diff == ['repeats']:
        advice = (f'it was run with repeats={saved["repeats"]}: ask for as '
                  'many seeds or more (more add seeds to it), or use another '
                  '--workdir.')
      raise errors.ConfigError(
          diff[0], saved_configs.field_value(current, diff[0]),
          f'{workdir} holds {state} run with a different config (fields: '
          f'{", ".join(diff[:5])}); {advice}')
  if write and jax.process_index() == 0:
    if saved is None:
      files.write_json(path, current)
    elif saved_configs.more_repeats(saved, current):
      # Only the count changes: fields the saved file lacks ran with their
      # defaults of that time, which the current values need not be. A rerun
      # with the old count is then refused rather than shown a summary with
      # seeds it did not ask for.
      files.write_json(path, dict(saved, repeats=current['repeats']))


def check_workdir(config, workdir):
  """Refuses, before any data loads, a workdir whose run has another config.

  For callers that run many cells (``benchmarks/compare.py``): every cell is
  checked before the first trains, so a bad cell stops nothing half-way.

  Args:
    config: the validated config the run would have.
    workdir: its folder (need not exist).

  Raises:
    ConfigError: the workdir holds a run with another config.
  """
  _check_same_config(config, workdir, write=False)


@contextlib.contextmanager
def _workdir_held(workdir):
  """The workdir, made and held by this run (process 0 takes the lock).

  Making it and writing the lock's pid file is also the check that the
  workdir can be written, before any data is loaded. A run that ends before
  it wrote anything (its data or teacher refused, an interrupt while they
  load) leaves the workdir as it found it, so that no empty run folder is
  left for the user to wonder about: the lock files and the folders it made
  are removed; nothing that was there before is.

  Yields:
    A list of the folders this run made, outermost first; the caller adds
    those it makes inside the workdir (a comparison's method folders), to be
    removed when the run ends by an exception and they are still empty.
  """
  made = _missing_folders(workdir)
  before = set(os.listdir(workdir)) if os.path.isdir(workdir) else set()
  try:
    with contextlib.ExitStack() as stack:
      with errors.user_errors(f'workdir {workdir}', OSError):
        os.makedirs(workdir, exist_ok=True)
        if jax.process_index() == 0:
          stack.enter_context(locks.workdir_lock(
              workdir, remove_if=lambda _: _wrote_nothing(workdir, before,
                                                          made)))
          files.remove_stale_temporaries(workdir)
      yield made
  except BaseException:
    for folder in reversed(made):
      with contextlib.suppress(OSError):  # Not empty: the run wrote there.
        os.rmdir(folder)
    raise


def _missing_folders(path):
  """The folders ``os.makedirs(path)`` would make, outermost first."""
  missing = []
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    missing.append(path)
    path = os.path.dirname(path)
  return missing[::-1]


def _wrote_nothing(workdir, before, made):
  """Whether the run added nothing to the workdir but its lock and empty
  folders.

  Args:
    workdir: the run's folder.
    before: the names it held when the run started.
    made: the folders the run made (absolute paths).

  Returns:
    True if every name not in ``before`` is a lock file or an empty folder
    in ``made``.
  """
  lock = locks.WORKDIR_LOCK
  for name in set(os.listdir(workdir)) - before - {lock, lock + locks.PID}:
    path = os.path.join(workdir, name)
    if os.path.abspath(path) not in made or os.listdir(path):
      return False
  return True


def _delta_weights(config, workdir, data, teacher):
  """DELTA's fixed channel weights, computed once and cached in the workdir.

  The workdir's config is checked on resume, so the cache cannot go stale.
  """
  path = os.path.join(workdir, 'delta_weights.npz')
  if os.path.exists(path):
    return delta.load_weights(path)
  print('DELTA: training a head on the frozen network and measuring filter '
        'removal for the channel weights.')
  nets = networks.build_networks(
      config, data.num_classes,
      networks.source_classes(config, teacher, data.image_shape),
      data.image_shape)
  weights = delta.channel_weights(nets.teacher, teacher, data, config.delta,
                                  batch_size=config.batch_size,
                                  seed=config.seed)
  if jax.process_index() == 0:
    delta.save_weights(path, weights)
  return weights


def summarize(results, config):
  """Mean and population std over repeats of final and best accuracy.

  Args:
    results: the repeats' result dicts.
    config: the run config.

  Returns:
    The summary dict. Its ``wall_time_s`` adds up the repeats' training
    times, each over all the invocations that trained it (a resumed run's
    included).
  """
  summary = {'config': saved_configs.config_json(config),
             'method': config.method, 'repeats': len(results),
             'bits_w': networks.student_bits(config)[0],
             'bits_a': networks.student_bits(config)[1]}
  for key in ('final_test_accuracy', 'best_test_accuracy'):
    values = [r[key] for r in results]
    summary[key] = float(np.mean(values))
    summary[key.replace('accuracy', 'std')] = float(np.std(values))
    summary[key + '_per_repeat'] = values
  summary['seeds'] = [r['seed'] for r in results]
  summary['run_wall_time_s'] = [r['wall_time_s'] for r in results]
  summary['wall_time_s'] = float(sum(summary['run_wall_time_s']))
  # Updates skipped for a non-finite loss or gradient (on_nonfinite='skip').
  summary['nonfinite_steps_per_repeat'] = [r.get('nonfinite_steps', 0)
                                           for r in results]
  summary['nonfinite_steps'] = sum(summary['nonfinite_steps_per_repeat'])
  return summary


def _accuracy_cell(s, key):
  """Mean, and ± the std when there are several repeats to spread."""
  mean = f'{s[key + "_accuracy"]:.2f}'
  if _summary_seeds(s) > 1:
    return f'{mean} ± {s[key + "_std"]:.2f}'
  return mean


def format_table(rows):
  """A Markdown table of summaries: method, bits, seeds, accuracies, skipped
  steps and time.

  The seeds are counted per row: a comparison folder may hold methods run
  with fewer seeds than a later invocation asked of others.

  Args:
    rows: ``(name, summary)`` pairs.

  Returns:
    The table's text.
  """
  lines = ['| method | bits (w/a) | seeds | final test acc. (%) | best test '
           'acc. (%) | skipped steps | wall time (s) |',
           '|---|---|---|---|---|---|---|']
  for name, s in rows:
    # Summaries written before the count have none ('-').
    skipped = s.get('nonfinite_steps', '-')
    lines.append(
        f'| {name} | {s["bits_w"]}/{s["bits_a"]} | {_summary_seeds(s)} | '
        f'{_accuracy_cell(s, "final_test")} | '
        f'{_accuracy_cell(s, "best_test")} | {skipped} | '
        f'{s["wall_time_s"]:.0f} |')
  return '\n'.join(lines)


def _finished_summary(config, workdir):
  """The summary of a finished run with this config, or None if unfinished.

  A finished run asked for more seeds (``config.repeats``) than its summary
  holds is unfinished: its finished seeds are kept and the others trained.

  Raises:
    ConfigError: the run is finished, with another config.
  """
  path = os.path.join(workdir, files.SUMMARY)
  if not os.path.exists(path):
    return None
  _check_same_config(config, workdir, write=False)
  summary = files.read_json(path)
  if _summary_seeds(summary) < config.repeats:
    return None
  return summary


def _summary_seeds(summary):
  """How many seeds a summary covers."""
  return summary.get('repeats', len(summary.get(
      'final_test_accuracy_per_repeat', [None])))


def run_single(config, workdir, data=None, teacher=None):
  """Runs ``config.repeats`` seeds of one method (or shows the finished run).

  A finished run asked for more seeds keeps its seeds and trains the new
  ones; its summary is then written again, over all of them.

  Args:
    config: a validated config.
    workdir: the run folder.
    data: preloaded ``datasets.Data`` (loaded from the config if None).
    teacher: preloaded teacher variables (loaded if None).

  Returns:
    The summary dict (written to ``workdir/summary.json``).

  Raises:
    ConfigError: the workdir holds a run (finished or not) with another
      config.
    UserError: the workdir cannot be written, or another process runs in it.
    run_result.NonFiniteLossError: see ``train.train_and_evaluate``.
  """
  summary = _finished_summary(config, workdir)
  if summary is not None:
    print(f'{workdir} is finished; not overwriting it. Its summary:')
    print(format_table([(summary['method'], summary)]))
    return summary
  with _workdir_held(workdir):
    with errors.user_errors(f'workdir {workdir}', OSError):
      _check_same_config(config, workdir, write=False)
    data = data or datasets.load(config)
    teacher = teacher or teacher_lib.load_teacher(config, data)
    with errors.user_errors(f'workdir {workdir}', OSError):
      _check_same_config(config, workdir)
    if own_network.is_import_path(config.model):
      print('\n'.join(networks.describe_student(config, data.image_shape)))
    delta_weights = None
    if config.method == 'delta':
      delta_weights = _delta_weights(config, workdir, data, teacher)
    results = []
    for r in range(1, config.repeats + 1):
      seed = config.seed + r
      results.append(train.train_and_evaluate(
          config, os.path.join(workdir, f'seed_{seed}'), seed, data, teacher,
          delta_weights))
    summary = summarize(results, config)
    if jax.process_index() == 0:
      files.write_json(os.path.join(workdir, files.SUMMARY), summary)
  print(format_table([(config.method, summary)]))
  return summary


# Fields in which the cells of one comparison differ.
_CELL_FIELDS = ('method', 'compare_methods')


def _cell_config(config, method):
  sub = ml_collections.ConfigDict(config.to_dict())
  sub.method = method
  sub.compare_methods = ()
  return sub


def _check_cells_share_config(config, workdir):
  """Every run in a comparison folder has the comparison's config.

  Raises:
    ConfigError: a cell was run with other settings (its table row would
      not compare like with like).
  """
  current = saved_configs.config_json(config)
  for name in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else ():
    path = os.path.join(workdir, name, files.CONFIG)
    if not os.path.isfile(path):
      continue
    diff = saved_configs.differing_fields(files.read_json(path), current,
                                          ignore=_CELL_FIELDS)
    if diff:
      raise errors.ConfigError(
          diff[0], saved_configs.field_value(current, diff[0]),
          f'the comparison in {workdir} holds {name}, run with a different '
          f'config (fields: {", ".join(diff[:5])}), and the methods of a '
          'comparison share one config; use another --workdir.')


def _finished_cells(workdir, methods):
  """``(name, summary)`` of every finished run in a comparison folder: the
  requested methods first, in their order, then the others by name."""
  names = [n for n in sorted(os.listdir(workdir))
           if os.path.isfile(os.path.join(workdir, n, files.SUMMARY))]
  names.sort(key=lambda n: (methods.index(n) if n in methods
                            else len(methods)))
  return [(n, files.read_json(os.path.join(workdir, n, files.SUMMARY)))
          for n in names]


def run(config, workdir):
  """Runs the experiment a config describes; see the module docstring.

  A comparison (``config.compare_methods``) runs each method in
  ``workdir/<method>``; its table, ``comparison.md``, lists every finished
  run of the folder (those of earlier invocations with other methods too),
  all of them with the same config apart from the method.

  Args:
    config: a validated config.
    workdir: output folder.

  Returns:
    The summary dict; with ``config.compare_methods``, a dict of them (of
    the methods asked for).

  Raises:
    ConfigError: the workdir (or a cell of the comparison) holds a run with
      another config.
    UserError: the workdir cannot be written, or another process runs in it.
  """
  methods = tuple(config.get('compare_methods') or ())
  if not methods:
    return run_single(config, workdir)
  # Everything that can refuse the run does so before data load and the
  # teacher trains.
  _check_cells_share_config(config, workdir)
  cells = {m: _cell_config(config, m) for m in methods}
  summaries = {m: _finished_summary(cells[m], os.path.join(workdir, m))
               for m in methods}
  with _workdir_held(workdir) as made:
    todo = [m for m in methods if summaries[m] is None]
    for m in todo:
      cell = os.path.join(workdir, m)
      with errors.user_errors(f'workdir {cell}', OSError):
        made.extend(_missing_folders(cell))
        os.makedirs(cell, exist_ok=True)
        _check_same_config(cells[m], cell, write=False)
    if todo:
      data = datasets.load(config)
      teacher = teacher_lib.load_teacher(config, data)
      for m in todo:
        summaries[m] = run_single(cells[m], os.path.join(workdir, m), data,
                                  teacher)
    table = format_table(_finished_cells(workdir, methods))
    path = os.path.join(workdir, files.COMPARISON)
    if jax.process_index() == 0 and not _has_text(path, table + '\n'):
      files.write_text(path, table + '\n')
  print(table)
  return summaries


def _has_text(path, text):
  try:
    with open(path) as f:
      return f.read() == text
  except OSError:
    return False
