"""Tests of dtq_jax.infra.files: atomic writes, stale temporaries, the metrics log."""

import json
import os
import stat

import pytest

from dtq_jax.infra import files


def test_atomic_write_replaces_whole_files_with_the_usual_mode(tmp_path):
  path = tmp_path / 'result.json'
  files.write_json(path, {'a': 1})
  files.write_json(path, {'a': 2})
  assert json.loads(path.read_text()) == {'a': 2}
  # What open() would give (0666 less the umask), not tempfile's 0600.
  mask = os.umask(0)
  os.umask(mask)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask
  assert os.listdir(tmp_path) == ['result.json']


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / 'table.md'
  files.write_text(path, 'old\n')
  with pytest.raises(RuntimeError):
    with files.atomic_path(path) as tmp:
      with open(tmp, 'w') as f:
        f.write('half')
      raise RuntimeError('killed half way')
  assert path.read_text() == 'old\n'
  assert os.listdir(tmp_path) == ['table.md']


def test_explicit_mode_whatever_the_umask(tmp_path):
  old = os.umask(0o077)
  try:
    files.write_text(tmp_path / 'model.onnx', b'bytes', mode=0o644)
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / 'model.onnx').st_mode) == 0o644


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
  (tmp_path / 'summary.json.tmp.ab12cd').write_text('{')  # this writer's
  (tmp_path / 'result.json.tmp.1234').write_text('{')  # the earlier writers'
  (tmp_path / 'notes.tmp').write_text('mine')  # not a temporary of ours
  (tmp_path / 'summary.json').write_text('{}')
  removed = files.remove_stale_temporaries(str(tmp_path))
  assert sorted(removed) == ['result.json.tmp.1234', 'summary.json.tmp.ab12cd']
  assert sorted(os.listdir(tmp_path)) == ['notes.tmp', 'summary.json']
  assert files.remove_stale_temporaries(str(tmp_path / 'missing')) == []


def test_truncating_the_log_survives_bytes_that_are_not_utf8(tmp_path):
  # A kill can cut a line anywhere, also inside a multi-byte character; a
  # disk error can leave garbage. Resuming drops such lines, never fails.
  path = tmp_path / 'metrics.jsonl'
  path.write_bytes(b'{"step": 1, "train/loss": 1.0}\n'
                   b'{"step": 2, "name": "\xc3\n'
                   b'\xff\xfe garbage\n'
                   b'{"step": 3, "train/loss": 0.5}\n'
                   b'{"step": 4, "train/loss": 0.25}\n')
  files.truncate_jsonl(str(path), last_step=3)
  steps = [json.loads(line)['step'] for line in path.read_text().splitlines()]
  assert steps == [1, 3]


def test_metrics_log_of_a_resumed_run_drops_what_came_after(tmp_path):
  log = files.MetricsLog(str(tmp_path), True)
  for step in (1, 2, 3):
    log.write(step, {'train/loss': float(step)})
  log.close()
  log = files.MetricsLog(str(tmp_path), True, start_step=2)
  log.write(3, {'train/loss': 30.0})
  log.close()
  records = [json.loads(line) for line in
             (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r['train/loss']) for r in records] == [
      (1, 1.0), (2, 2.0), (3, 30.0)]
  # A process that does not log writes nothing.
  files.MetricsLog(str(tmp_path / 'other'), False).close()
  assert not (tmp_path / 'other').exists()
