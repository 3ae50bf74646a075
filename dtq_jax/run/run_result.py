"""A run's result.json: built from its evaluation history, read back, checked.

``build`` turns a finished run's evaluation history into the result dict the
loop writes (final and best test accuracy, the skipped updates); ``read``
reads one back; ``check_skipped_steps`` fails a run that skipped too many
updates for its accuracy to be a trained model's. The loop also uses
``first_nonfinite`` and ``NonFiniteLossError`` (with ``rerun_advice``) to stop
at a non-finite loss, the other way such a run ends.
"""

import numpy as np

from dtq_jax.infra import files


class NonFiniteLossError(RuntimeError):
  """A loss term or the gradient became NaN or infinite.

  Also raised (after result.json is written) when more than
  ``config.max_nonfinite_fraction`` of a run's updates were skipped.
  """


def first_nonfinite(history):
  """The first step whose loss or gradient was not finite.

  Args:
    history: ``[(step, metrics)]``, the step's metrics fetched.

  Returns:
    ``(step, [names of the non-finite loss terms, or 'gradient'])``, or None.
  """
  for step, m in history:
    if not m['finite']:
      bad = [k for k, v in m.items()
             if k.startswith('loss_') and not np.isfinite(v)]
      if not np.isfinite(m['grad_norm']) and not bad:
        bad = ['gradient']
      return step, bad or ['loss']
  return None


def build(meta, seed, steps, nonfinite_steps):
  """The result of one run: final and best test accuracy, from its history.

  Args:
    meta: the run's ``{'history', 'wall_time_s', ...}``.
    seed: its seed.
    steps: the steps it trained.
    nonfinite_steps: the updates it skipped (``on_nonfinite='skip'``).

  Returns:
    The dict written as ``result.json``.
  """
  history = meta['history']
  tests = [r['test']['accuracy'] for r in history]
  best = int(np.argmax(tests))
  result = {
      'seed': seed,
      'steps': steps,
      'evaluations': len(history),
      'final_test_accuracy': tests[-1],
      'best_test_accuracy': tests[best],
      'best_epoch': history[best]['epoch'],
      'wall_time_s': meta['wall_time_s'],
      'nonfinite_steps': nonfinite_steps,
      'history': history,
  }
  if 'test_dynamic' in history[-1]:
    result['final_test_accuracy_dynamic'] = history[-1]['test_dynamic'][
        'accuracy']
  if 'val' in history[-1]:
    vals = [r['val']['accuracy'] for r in history]
    result['test_accuracy_at_best_val'] = tests[int(np.argmax(vals))]
  return result


def read(path):
  """A run's ``result.json``; files written before the rename read the same.

  Args:
    path: the file.

  Returns:
    The result dict (``evaluations`` counts the evaluations; older files
    called it ``epochs``).
  """
  result = files.read_json(path)
  if 'epochs' in result and 'evaluations' not in result:
    result['evaluations'] = result.pop('epochs')
  return result


def rerun_advice(lr_field, new_workdir):
  """What to change for a rerun after non-finite losses.

  Args:
    lr_field: the config field of the learning rate.
    new_workdir: whether a rerun with other settings needs a new workdir.

  Returns:
    One sentence of advice for the end of an error message.
  """
  return (f'Run again with a lower --config.{lr_field}, or with '
          '--config.on_nonfinite=skip and a higher '
          '--config.max_nonfinite_fraction' +
          (', in a new --workdir.' if new_workdir else '.'))


def check_skipped_steps(config, result, workdir, lr_field='optim.lr',
                        new_workdir=True):
  """Fails a run that skipped too many updates to count as trained.

  More than ``config.max_nonfinite_fraction`` of its updates skipped
  (``on_nonfinite='skip'``): its accuracy is not a trained model's.

  Args:
    config: the run config.
    result: the run's result dict.
    workdir: the run folder (for the message).
    lr_field: the config field of the learning rate, for the advice.
    new_workdir: whether a rerun with other settings needs a new workdir.

  Raises:
    NonFiniteLossError: too many skipped steps.
  """
  skipped, steps = result.get('nonfinite_steps', 0), result.get('steps', 0)
  limit = config.max_nonfinite_fraction
  if steps and skipped > limit * steps:
    raise NonFiniteLossError(
        f'{skipped} of the {steps} updates of {workdir} were skipped (a '
        f'non-finite loss or gradient), more than '
        f'config.max_nonfinite_fraction={limit}; its result.json is kept, '
        f'but the run failed. {rerun_advice(lr_field, new_workdir)}')
