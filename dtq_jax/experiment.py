"""A whole experiment: teacher, repeats over seeds, summary, comparisons.

``run(config, workdir)`` is what ``main.py`` calls. It never overwrites a
finished run (it prints the stored summary instead), resumes an unfinished one,
and refuses a workdir whose run (finished or not) has a different config, or
that another process is running in. The one difference it accepts is a larger
``repeats``: the run's finished seeds are kept and the new ones added.
"""

import contextlib
import hashlib
import json
import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from dtq_jax import checkpoints
from dtq_jax import datasets
from dtq_jax import delta
from dtq_jax import errors
from dtq_jax import files
from dtq_jax import locks
from dtq_jax import networks
from dtq_jax import pretrained as pretrained_lib
from dtq_jax import train
from dtq_jax.models import create_model



def cache_dir(config):
  """Cache root: ``config.cache_dir`` or ``$XDG_CACHE_HOME/dtq_jax``."""
  return config.cache_dir or os.path.dirname(
      pretrained_lib.default_cache_dir())


def enable_compilation_cache(config):
  """Keeps compiled XLA programs under the cache root across runs.

  Compiling the train and eval steps takes tens of seconds on a CPU; with the
  cache, rerunning the demo (or resuming a run) skips most of it.
  """
  jax.config.update('jax_compilation_cache_dir',
                    os.path.join(cache_dir(config), 'xla'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def _config_json(config):
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _differing_fields(saved, current, ignore=()):
  """Config fields whose values differ, as dotted names.

  A field missing from ``saved`` was added to the program after that run was
  written (it ran with the behaviour the field's default keeps): not a
  difference. Nor is a larger ``repeats``: it adds seeds to the run and
  changes none of those it has (``_check_same_config`` records the new
  count); a smaller one would leave finished seeds out of the summary.
  """
  return sorted(f for f in _diff(saved, current)
                if f not in ignore and _has_field(saved, f)
                and not (f == 'repeats' and _more_repeats(saved, current)))


def _more_repeats(saved, current):
  return int(current.get('repeats', 1)) > int(saved.get('repeats', 1))


def _has_field(tree, dotted):
  for key in dotted.split('.'):
    if not isinstance(tree, dict) or key not in tree:
      return False
    tree = tree[key]
  return True


def _field_value(tree, dotted):
  for key in dotted.split('.'):
    tree = tree.get(key) if isinstance(tree, dict) else None
  return tree


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
  current = _config_json(config)
  saved = _read_json(path) if os.path.exists(path) else None
  if saved is not None:
    diff = _differing_fields(saved, current)
    if diff:
      state = ('a finished' if os.path.exists(os.path.join(workdir, files.SUMMARY))
               else 'an unfinished')
      advice = 'use another --workdir.'
      if diff == ['repeats']:
        advice = (f'it was run with repeats={saved["repeats"]}: ask for as '
                  'many seeds or more (more add seeds to it), or use another '
                  '--workdir.')
      raise errors.ConfigError(
          diff[0], _field_value(current, diff[0]),
          f'{workdir} holds {state} run with a different config (fields: '
          f'{", ".join(diff[:5])}); {advice}')
  if write and jax.process_index() == 0:
    if saved is None:
      files.write_json(path, current)
    elif _more_repeats(saved, current):
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


def _diff(a, b, prefix=''):
  for key in sorted(set(a) | set(b)):
    va, vb = a.get(key), b.get(key)
    if isinstance(va, dict) and isinstance(vb, dict):
      yield from _diff(va, vb, f'{prefix}{key}.')
    elif va != vb:
      yield f'{prefix}{key}'


@contextlib.contextmanager
def _workdir_held(workdir):
  """The workdir, made and held by this run (process 0 takes the lock).

  Making it and writing the lock's pid file is also the check that the
  workdir can be written, before any data is loaded.
  """
  with contextlib.ExitStack() as stack:
    with errors.user_errors(f'workdir {workdir}', OSError):
      os.makedirs(workdir, exist_ok=True)
      if jax.process_index() == 0:
        stack.enter_context(locks.workdir_lock(workdir))
        files.remove_stale_temporaries(workdir)
    yield


def load_teacher(config, data):
  """The frozen full-precision network's variables (the student's start).

  Args:
    config: the run config.
    data: the loaded ``datasets.Data``.

  Returns:
    ``{'params', 'batch_stats'}`` for ``create_model(config.model)``.
  """
  if config.pretrained == 'source_task':
    return train_source_teacher(config, data)
  if config.pretrained == 'none':
    model = create_model(config.model, **dict(config.get('model_kwargs', {})))
    return networks.init_variables(model, jax.random.PRNGKey(config.seed),
                                data.image_shape)
  channels = data.image_shape[-1] if data is not None else None
  if channels not in (None, pretrained_lib.INPUT_CHANNELS):
    raise errors.ConfigError(
        'pretrained', config.pretrained,
        f'its weights take {pretrained_lib.INPUT_CHANNELS}-channel (RGB) '
        f'images, but dataset.name={config.dataset.name!r} gives '
        f'{channels}-channel ones; use pretrained=none or RGB images.')
  with errors.user_errors(f'pretrained={config.pretrained!r}'):
    return pretrained_lib.load_pretrained(
        config.model, config.pretrained,
        cache_dir=os.path.join(cache_dir(config), 'pretrained'))


# Fields the students read but the teacher's training does not: the teacher
# is trained once for all of them.
_STUDENT_ONLY = ('pretrain', 'compare_methods', 'repeats', 'cache_dir', 'l2',
                 'l2sp', 'delta')
# Fields of config.dataset that only choose the target task's images when the
# source task is Fashion-MNIST's other classes (split 'out_of_domain').
_TARGET_ONLY = ('target_classes', 'shots_per_class', 'data_seed',
                'train_per_class', 'test_per_class', 'val_fraction')
_TEACHER_FORMAT = 2  # The cache layout and key; older entries are not read.
TEACHER_CONFIG = 'teacher_config.json'


def teacher_config(config):
  """The config the demo teacher trains with, and is cached under.

  The run config with ``config.pretrain``'s budget and optimizer, method
  'fp' (full precision) and seed ``pretrain.seed``; without the fields only
  the students read, so that every student of a dataset shares one teacher.

  Args:
    config: the run config.

  Returns:
    A ConfigDict.
  """
  p = config.pretrain
  tree = config.to_dict()
  for name in _STUDENT_ONLY:
    tree.pop(name, None)
  # Of DTQ's settings, an 'fp' run reads only whether attention is built.
  tree['dtq'] = {'attention': config.dtq.attention}
  d = tree['dataset']
  d.pop('cache_dir', None)  # Where decoded images are kept.
  # Neither split's teacher images depend on the target's fields (in domain:
  # splits.in_domain_indices draws them by teacher_per_class, teacher_seed).
  for name in _TARGET_ONLY:
    d.pop(name, None)
  pre = ml_collections.ConfigDict(tree)
  pre.method = 'fp'
  pre.bits_w, pre.bits_a = networks.student_bits(pre)
  pre.seed = p.seed
  pre.batch_size = p.batch_size
  pre.num_epochs = p.num_epochs
  pre.steps_per_epoch = p.get('steps_per_epoch', 0)
  pre.optim.update(p.optim)
  return pre


def _teacher_key(pre, dataset):
  """Hash of the teacher's config, its image files and the cache format."""
  payload = json.dumps(dict(
      config=_config_json(pre), files=datasets.source_fingerprint(dataset),
      version=_TEACHER_FORMAT), sort_keys=True)
  return hashlib.sha256(payload.encode()).hexdigest()[:16]


def train_source_teacher(config, data):
  """Trains (once, then cached) the demo teacher on the source classes.

  The source task is trained by the same trainer as the students: method
  'fp' with a fresh classifier, from random initialisation. Its classifier then
  becomes the network's source classifier (``fc``), the role torchvision's
  1000-way ImageNet layer plays in the paper. The entry's folder holds the
  config it was trained with (``teacher_config.json``); a process that needs
  an entry another process is building waits for it.

  Args:
    config: the demo config (``config.pretrain`` holds the budget).
    data: the demo data; ``data.source`` holds the source splits.

  Returns:
    ``{'params', 'batch_stats'}`` of the teacher.

  Raises:
    UserError: the cache cannot be written, or its entry is damaged.
  """
  pre = teacher_config(config)
  key = _teacher_key(pre, config.dataset)
  root = os.path.join(cache_dir(config), 'teachers', f'{config.model}-{key}')
  run_dir = os.path.join(root, 'run')
  result_path = os.path.join(run_dir, files.RESULT)
  model = create_model(config.model, num_classes=data.source.num_classes,
                       **dict(config.get('model_kwargs', {})))
  with contextlib.ExitStack() as stack:
    with _cache_write_errors(root):
      if jax.process_index() == 0:
        # The other processes of a multi-process run train with process 0.
        stack.enter_context(locks.build_lock(root, 'the teacher'))
        files.remove_stale_temporaries(root)
    trained = os.path.exists(result_path)
    if jax.process_count() > 1:
      # Decided under process 0's lock, for all processes.
      trained = bool(multihost_utils.broadcast_one_to_all(np.int32(trained)))
    if not trained:
      with _cache_write_errors(root):
        if jax.process_index() == 0:
          files.write_json(os.path.join(root, TEACHER_CONFIG),
                           _config_json(pre))
        init = networks.init_variables(model, jax.random.PRNGKey(pre.seed),
                                       data.source.image_shape)
        print(f'Training the teacher on source classes '
              f'{tuple(config.dataset.source_classes)} (cached in {root}).')
        # The same trainer as the students; an interrupted pretraining
        # resumes.
        train.train_and_evaluate(pre, run_dir, pre.seed, data.source, init,
                                 lr_field='pretrain.optim.lr',
                                 new_workdir=False)
      if jax.process_count() > 1:
        # Process 0 writes result.json last; the others wait for it.
        multihost_utils.sync_global_devices('dtq_jax teacher trained')
    else:
      _check_cached_config(pre, root)
      logging.info('Using the cached teacher in %s.', root)
  try:
    restored = checkpoints.restore_params(run_dir)
  except errors.UserError as e:
    raise errors.UserError(
        f'the cached teacher in {root} is damaged ({e}); delete that folder '
        'to train it again.') from e
  params = dict(restored['params']['backbone'])
  params[model.classifier_name] = restored['params']['head']['fc']
  variables = {'params': params, 'batch_stats': restored['batch_stats']}
  accuracy = train.read_result(result_path)['final_test_accuracy']
  print(f'Teacher: source-test accuracy {accuracy:.2f}% ({root}).')
  return variables


def _check_cached_config(pre, root):
  """The entry was trained with ``pre`` (entries written before the config
  was stored have none to compare)."""
  path = os.path.join(root, TEACHER_CONFIG)
  if not os.path.exists(path):
    return
  diff = _differing_fields(_read_json(path), _config_json(pre))
  if diff:
    raise errors.UserError(
        f'the cached teacher in {root} was trained with another config '
        f'(fields: {", ".join(diff[:5])} of {TEACHER_CONFIG}); delete that '
        'folder to train it again.')


@contextlib.contextmanager
def _cache_write_errors(root):
  """A cache that cannot be written is named as such, not as the workdir."""
  try:
    yield
  except OSError as e:
    if e.errno not in files.WRITE_ERRNOS:
      raise
    raise errors.UserError(
        f'cannot write the teacher cache in {root}: {e}; free space there or '
        'choose another --config.cache_dir.') from e


def _delta_weights(config, workdir, data, teacher):
  """DELTA's fixed channel weights, computed once and cached in the workdir.

  The workdir's config is checked on resume, so the cache cannot go stale.
  """
  path = os.path.join(workdir, 'delta_weights.npz')
  if os.path.exists(path):
    return delta.load_weights(path)
  print('DELTA: training a head on the frozen network and measuring filter '
        'removal for the channel weights.')
  nets = networks.build_networks(config, data.num_classes,
                                 networks.num_source_classes(teacher))
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
  summary = {'config': _config_json(config), 'method': config.method,
             'repeats': len(results),
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
  summary = _read_json(path)
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
    NonFiniteLossError: see ``train.train_and_evaluate``.
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
    teacher = teacher or load_teacher(config, data)
    with errors.user_errors(f'workdir {workdir}', OSError):
      _check_same_config(config, workdir)
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
  current = _config_json(config)
  for name in sorted(os.listdir(workdir)) if os.path.isdir(workdir) else ():
    path = os.path.join(workdir, name, files.CONFIG)
    if not os.path.isfile(path):
      continue
    diff = _differing_fields(_read_json(path), current, ignore=_CELL_FIELDS)
    if diff:
      raise errors.ConfigError(
          diff[0], _field_value(current, diff[0]),
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
  return [(n, _read_json(os.path.join(workdir, n, files.SUMMARY))) for n in names]


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
  with _workdir_held(workdir):
    todo = [m for m in methods if summaries[m] is None]
    for m in todo:
      cell = os.path.join(workdir, m)
      with errors.user_errors(f'workdir {cell}', OSError):
        os.makedirs(cell, exist_ok=True)
        _check_same_config(cells[m], cell, write=False)
    if todo:
      data = datasets.load(config)
      teacher = load_teacher(config, data)
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
