"""A run's config as saved JSON, and the fields in which another differs.

A run folder keeps the config it was run with (``config.json``), a cached
teacher the config it was trained with: a rerun, a comparison's cells and a
cache entry are checked against them field by field.
"""

import json


def config_json(config):
  """The config as the JSON tree a run saves (``config.json``)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def differing_fields(saved, current, ignore=()):
  """Config fields whose values differ, as dotted names.

  A field missing from ``saved`` was added to the program after that run was
  written (it ran with the behaviour the field's default keeps): not a
  difference. Nor is a larger ``repeats``: it adds seeds to the run and
  changes none of those it has (the caller records the new count); a
  smaller one would leave finished seeds out of the summary.
  """
  return sorted(f for f in _diff(saved, current)
                if f not in ignore and _has_field(saved, f)
                and not (f == 'repeats' and more_repeats(saved, current)))


def more_repeats(saved, current):
  """Whether ``current`` asks for more seeds than ``saved`` was run with."""
  return int(current.get('repeats', 1)) > int(saved.get('repeats', 1))


def _has_field(tree, dotted):
  for key in dotted.split('.'):
    if not isinstance(tree, dict) or key not in tree:
      return False
    tree = tree[key]
  return True


def field_value(tree, dotted):
  """The value of a dotted field of a JSON tree (None if absent)."""
  for key in dotted.split('.'):
    tree = tree.get(key) if isinstance(tree, dict) else None
  return tree


def _diff(a, b, prefix=''):
  for key in sorted(set(a) | set(b)):
    va, vb = a.get(key), b.get(key)
    if isinstance(va, dict) and isinstance(vb, dict):
      yield from _diff(va, vb, f'{prefix}{key}.')
    elif va != vb:
      yield f'{prefix}{key}'
