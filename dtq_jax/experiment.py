"""A whole experiment: teacher, repeats over seeds, summary, comparisons.

``run(config, workdir)`` is what ``main.py`` calls. It never overwrites a
finished run (it prints the stored summary instead), resumes an unfinished one,
and refuses to resume a workdir with a different config.
"""

import hashlib
import json
import os
import time

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
from dtq_jax import networks
from dtq_jax import pretrained as pretrained_lib
from dtq_jax import train
from dtq_jax.models import create_model

SUMMARY = 'summary.json'
CONFIG = 'config.json'


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


def _check_same_config(config, workdir, write=True):
  """Writes config.json, or checks that a resumed run keeps the same config.

  ``write=False`` only checks: config.json is written once nothing about the
  config can fail any more (data and teacher loaded), so that a corrected
  rerun is not refused as "a different config".
  """
  path = os.path.join(workdir, CONFIG)
  current = _config_json(config)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved != current:
      diff = sorted(_diff(saved, current))
      raise errors.ConfigError(
          diff[0] if diff else 'config', None,
          f'{workdir} holds an unfinished run with a different config '
          f'(fields: {", ".join(diff[:5])}); use another --workdir.')
  elif write and jax.process_index() == 0:
    files.write_json(path, current)


def _diff(a, b, prefix=''):
  for key in sorted(set(a) | set(b)):
    va, vb = a.get(key), b.get(key)
    if isinstance(va, dict) and isinstance(vb, dict):
      yield from _diff(va, vb, f'{prefix}{key}.')
    elif va != vb:
      yield f'{prefix}{key}'


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


def _teacher_key(config, data):
  """Hash of everything that determines the demo teacher."""
  d = config.dataset
  files = datasets.source_fingerprint(d)
  payload = json.dumps(dict(
      model=config.model, model_kwargs=dict(config.get('model_kwargs', {})),
      source_classes=list(d.source_classes), image_size=d.image_size,
      split=[d.get(k) for k in ('split', 'teacher_per_class', 'teacher_seed')],
      mean=list(d.mean), std=list(d.std), files=files,
      pretrain=_config_json(config.pretrain),
      version=1), sort_keys=True)
  del data
  return hashlib.sha256(payload.encode()).hexdigest()[:16]


def train_source_teacher(config, data):
  """Trains (once, then cached) the demo teacher on the source classes.

  The source task is trained by the same trainer as the students: method
  'fp' with a fresh classifier, from random initialisation. Its classifier then
  becomes the network's source classifier (``fc``), the role torchvision's
  1000-way ImageNet layer plays in the paper.

  Args:
    config: the demo config (``config.pretrain`` holds the budget).
    data: the demo data; ``data.source`` holds the source splits.

  Returns:
    ``{'params', 'batch_stats'}`` of the teacher.
  """
  key = _teacher_key(config, data)
  root = os.path.join(cache_dir(config), 'teachers', f'{config.model}-{key}')
  run_dir = os.path.join(root, 'run')
  model = create_model(config.model, num_classes=data.source.num_classes,
                       **dict(config.get('model_kwargs', {})))
  p = config.pretrain
  if not os.path.exists(os.path.join(run_dir, 'result.json')):
    pre = ml_collections.ConfigDict(config.to_dict())
    pre.method = 'fp'
    pre.batch_size = p.batch_size
    pre.num_epochs = p.num_epochs
    pre.steps_per_epoch = p.get('steps_per_epoch', 0)
    pre.optim.update(p.optim)
    init = networks.init_variables(model, jax.random.PRNGKey(p.seed),
                                data.source.image_shape)
    print(f'Training the teacher on source classes '
          f'{tuple(config.dataset.source_classes)} (cached in {root}).')
    # The same trainer as the students; an interrupted pretraining resumes.
    train.train_and_evaluate(pre, run_dir, p.seed, data.source, init)
    if jax.process_count() > 1:
      # Process 0 writes result.json last; the others wait for it.
      multihost_utils.sync_global_devices('dtq_jax teacher trained')
  else:
    logging.info('Using the cached teacher in %s.', root)
  trained = checkpoints.restore_params(run_dir)
  params = dict(trained['params']['backbone'])
  params[model.classifier_name] = trained['params']['head']['fc']
  variables = {'params': params, 'batch_stats': trained['batch_stats']}
  with open(os.path.join(run_dir, 'result.json')) as f:
    accuracy = json.load(f)['final_test_accuracy']
  print(f'Teacher: source-test accuracy {accuracy:.2f}% ({root}).')
  return variables


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


def summarize(results, config, wall_time_s):
  """Mean and population std over repeats of final and best accuracy."""
  summary = {'config': _config_json(config), 'wall_time_s': wall_time_s,
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
  return summary


def format_table(rows):
  """A Markdown table of summaries: method, bits, final/best accuracy, time."""
  lines = ['| method | bits (w/a) | final test acc. (%) | best test acc. (%) '
           '| wall time (s) |', '|---|---|---|---|---|']
  for name, s in rows:
    lines.append(
        f'| {name} | {s["bits_w"]}/{s["bits_a"]} | '
        f'{s["final_test_accuracy"]:.2f} ± {s["final_test_std"]:.2f} | '
        f'{s["best_test_accuracy"]:.2f} ± {s["best_test_std"]:.2f} | '
        f'{s["wall_time_s"]:.0f} |')
  return '\n'.join(lines)


def run_single(config, workdir, data=None, teacher=None):
  """Runs ``config.repeats`` seeds of one method (or shows the finished run).

  Args:
    config: a validated config.
    workdir: the run folder.
    data: preloaded ``datasets.Data`` (loaded from the config if None).
    teacher: preloaded teacher variables (loaded if None).

  Returns:
    The summary dict (written to ``workdir/summary.json``).
  """
  summary_path = os.path.join(workdir, SUMMARY)
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      summary = json.load(f)
    print(f'{workdir} is finished; not overwriting it. Its summary:')
    print(format_table([(summary['method'], summary)]))
    return summary
  with errors.user_errors(f'workdir {workdir}', OSError):
    os.makedirs(workdir, exist_ok=True)
    _check_same_config(config, workdir, write=False)
  start = time.time()
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
  summary = summarize(results, config, time.time() - start)
  if jax.process_index() == 0:
    files.write_json(summary_path, summary)
  print(format_table([(config.method, summary)]))
  return summary


def run(config, workdir):
  """Runs the experiment a config describes; see the module docstring.

  Args:
    config: a validated config.
    workdir: output folder.

  Returns:
    The summary dict; with ``config.compare_methods``, a dict of them.
  """
  methods = tuple(config.get('compare_methods') or ())
  if not methods:
    return run_single(config, workdir)
  with errors.user_errors(f'workdir {workdir}', OSError):
    os.makedirs(workdir, exist_ok=True)
  data = datasets.load(config)
  teacher = load_teacher(config, data)
  summaries = {}
  for method in methods:
    sub = ml_collections.ConfigDict(config.to_dict())
    sub.method = method
    sub.compare_methods = ()
    summaries[method] = run_single(sub, os.path.join(workdir, method), data,
                                   teacher)
  table = format_table(list(summaries.items()))
  if jax.process_index() == 0:
    files.write_text(os.path.join(workdir, 'comparison.md'), table + '\n')
  print(table)
  return summaries
