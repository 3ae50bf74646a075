"""Runtime.prefetch: device batches in order, transfers issued ahead."""

import json

import jax
import numpy as np
import pytest

from dtq_jax.run import config_validation
from dtq_jax.run import experiment
from dtq_jax.run import runtime as runtime_lib


def _batches(n):
  rng = np.random.RandomState(0)
  return [{'image': rng.randn(4, 3, 3, 1).astype(np.float32),
           'label': np.full((4,), i, np.int32)} for i in range(n)]


@pytest.mark.parametrize('ahead', [0, 1, 3, 10])
def test_prefetch_yields_every_batch_in_order_on_the_mesh(ahead):
  rt = runtime_lib.Runtime()
  batches = _batches(5)
  out = list(rt.prefetch(iter(batches), ahead))
  assert len(out) == 5
  for got, want in zip(out, batches):
    assert isinstance(got['image'], jax.Array)
    assert got['image'].sharding.is_equivalent_to(rt.batch, 4)
    np.testing.assert_array_equal(got['image'], want['image'])
    np.testing.assert_array_equal(got['label'], want['label'])


@pytest.mark.parametrize('ahead', [0, 1, 2])
def test_prefetch_reads_ahead_batches_before_the_loop_takes_them(ahead):
  pulled = []

  def source():
    for i, batch in enumerate(_batches(6)):
      pulled.append(i)
      yield batch

  stream = runtime_lib.Runtime().prefetch(source(), ahead)
  for k in range(6):
    batch = next(stream)
    assert int(batch['label'][0]) == k
    # Batch k is taken: batches k + 1 .. k + ahead are already on the way.
    assert len(pulled) == min(k + 1 + ahead, 6)
  assert next(stream, None) is None


def test_prefetch_changes_no_number_of_a_run(tiny_folder, tmp_path):
  root, config = tiny_folder
  summaries = []
  for ahead in (0, 2):
    c = config(root, 'quick,dtq')
    c.prefetch_batches = ahead
    summaries.append(experiment.run(config_validation.validate(c),
                                    str(tmp_path / f'ahead{ahead}')))
  for key in ('final_test_accuracy', 'best_test_accuracy'):
    assert summaries[0][key] == summaries[1][key]
  # Every logged loss and accuracy too (not the speeds).
  logs = []
  for a in (0, 2):
    text = (tmp_path / f'ahead{a}' / 'seed_1' / 'metrics.jsonl').read_text()
    records = [json.loads(line) for line in text.splitlines()]
    logs.append([{k: v for k, v in r.items()
                  if not any(t in k for t in ('per_s', 'time', 'seconds'))}
                 for r in records])
  assert logs[0] == logs[1] and any('train/loss' in r for r in logs[0])
