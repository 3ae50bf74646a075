"""dtq_jax.run.saved_configs: which fields of a saved run config differ."""

import ml_collections

from dtq_jax.infra import files
from dtq_jax.run import saved_configs


def test_differences_are_dotted_fields():
  saved = {'optim': {'lr': 0.01, 'momentum': 0.9}, 'method': 'dtq'}
  current = {'optim': {'lr': 0.02, 'momentum': 0.9}, 'method': 'ft'}
  assert saved_configs.differing_fields(saved, current) == ['method',
                                                            'optim.lr']
  assert saved_configs.differing_fields(saved, current,
                                        ignore=('method',)) == ['optim.lr']
  assert saved_configs.field_value(current, 'optim.lr') == 0.02
  assert saved_configs.field_value(current, 'optim.nesterov') is None


def test_a_field_the_saved_run_lacks_is_not_a_difference():
  # Added to the program after the run was saved: it ran with the default.
  saved = {'optim': {'lr': 0.01}}
  current = {'optim': {'lr': 0.01, 'nesterov': False}, 'keep': 2}
  assert saved_configs.differing_fields(saved, current) == []


def test_more_repeats_add_seeds_fewer_differ():
  saved = {'repeats': 3, 'seed': 0}
  assert saved_configs.differing_fields(saved, {'repeats': 5, 'seed': 0}) == []
  assert saved_configs.more_repeats(saved, {'repeats': 5})
  assert saved_configs.differing_fields(saved, {'repeats': 2, 'seed': 0}) == [
      'repeats']
  assert not saved_configs.more_repeats(saved, {'repeats': 3})


def test_config_json_round_trips_through_a_file(tmp_path):
  config = ml_collections.ConfigDict({'optim': {'lr': 0.01}, 'bits': (4, 4)})
  tree = saved_configs.config_json(config)
  assert tree == {'bits': [4, 4], 'optim': {'lr': 0.01}}
  path = tmp_path / 'config.json'
  path.write_text(config.to_json_best_effort())
  assert files.read_json(str(path)) == tree  # as saved
