"""dtq_jax.run.run_result: a run's result from its history, read back, checked."""

import math

import ml_collections
import pytest

from dtq_jax.infra import files
from dtq_jax.run import run_result


def _history(tests, vals=None, dynamic=None):
  history = []
  for i, test in enumerate(tests):
    record = {'epoch': 2 * (i + 1), 'test': {'accuracy': test}}
    if vals is not None:
      record['val'] = {'accuracy': vals[i]}
    if dynamic is not None:
      record['test_dynamic'] = {'accuracy': dynamic[i]}
    history.append(record)
  return history


def test_build_takes_final_and_best_and_the_test_at_the_best_val():
  meta = {'history': _history([50.0, 70.0, 60.0, 55.0],
                              vals=[40.0, 35.0, 45.0, 42.0],
                              dynamic=[49.0, 69.0, 61.5, 54.0]),
          'wall_time_s': 12.5}
  result = run_result.build(meta, seed=3, steps=40, nonfinite_steps=1)
  assert result['seed'] == 3 and result['steps'] == 40
  assert result['evaluations'] == 4
  assert result['final_test_accuracy'] == 55.0
  assert result['best_test_accuracy'] == 70.0 and result['best_epoch'] == 4
  # Selected by validation accuracy (the third evaluation), neither the
  # best test accuracy nor the last.
  assert result['test_accuracy_at_best_val'] == 60.0
  assert result['final_test_accuracy_dynamic'] == 54.0
  assert result['nonfinite_steps'] == 1 and result['wall_time_s'] == 12.5
  assert result['history'] is meta['history']


def test_build_without_val_or_dynamic_ranges_has_no_such_fields():
  meta = {'history': _history([10.0, 10.0]), 'wall_time_s': 1.0}
  result = run_result.build(meta, seed=1, steps=4, nonfinite_steps=0)
  assert result['best_epoch'] == 2  # the first of equal accuracies
  assert 'test_accuracy_at_best_val' not in result
  assert 'final_test_accuracy_dynamic' not in result


def test_read_gives_old_files_the_new_field_name(tmp_path):
  path = tmp_path / files.RESULT
  files.write_json(path, {'epochs': 5, 'final_test_accuracy': 1.0})
  assert run_result.read(path) == {'evaluations': 5,
                                   'final_test_accuracy': 1.0}
  files.write_json(path, {'evaluations': 2, 'epochs': 9})
  assert run_result.read(path) == {'evaluations': 2, 'epochs': 9}


def test_first_nonfinite_names_the_terms_or_the_gradient():
  ok = {'finite': True, 'loss_ce': 1.0, 'grad_norm': 2.0}
  assert run_result.first_nonfinite([(1, ok), (2, ok)]) is None
  bad_loss = {'finite': False, 'loss_ce': 1.0, 'loss_afa': math.nan,
              'loss_kl': math.inf, 'grad_norm': math.nan}
  bad_grad = {'finite': False, 'loss_ce': 1.0, 'grad_norm': math.inf}
  assert run_result.first_nonfinite(
      [(1, ok), (2, bad_loss), (3, bad_grad)]) == (2, ['loss_afa', 'loss_kl'])
  assert run_result.first_nonfinite([(5, bad_grad)]) == (5, ['gradient'])
  # Not finite, yet every logged term and the norm are (e.g. a term the
  # step does not log): the loss is named.
  assert run_result.first_nonfinite(
      [(7, {'finite': False, 'loss_ce': 1.0, 'grad_norm': 1.0})]) == (
          7, ['loss'])


@pytest.mark.parametrize('skipped,steps,fails', [
    (0, 100, False), (10, 100, False), (11, 100, True), (100, 100, True),
    (None, 100, False),  # a result without the field (older runs)
    (3, 0, False),  # no step recorded: nothing to compare with
])
def test_check_skipped_steps_fails_above_the_fraction(skipped, steps, fails):
  config = ml_collections.ConfigDict({'max_nonfinite_fraction': 0.1})
  result = {'steps': steps}
  if skipped is not None:
    result['nonfinite_steps'] = skipped
  if not fails:
    run_result.check_skipped_steps(config, result, '/runs/a')
    return
  with pytest.raises(run_result.NonFiniteLossError) as e:
    run_result.check_skipped_steps(config, result, '/runs/a',
                                   lr_field='pretrain.optim.lr',
                                   new_workdir=False)
  message = str(e.value)
  assert message.startswith(f'{skipped} of the 100 updates of /runs/a')
  assert 'config.max_nonfinite_fraction=0.1' in message
  assert '--config.pretrain.optim.lr' in message
  assert message.endswith('max_nonfinite_fraction.')  # no new --workdir
  assert '\n' not in message


def test_rerun_advice_names_the_field_and_the_workdir():
  assert run_result.rerun_advice('optim.lr', True).endswith(
      ', in a new --workdir.')
  assert '--config.optim.lr' in run_result.rerun_advice('optim.lr', False)
