"""benchmarks/train_loop.py times the real loop with either feed."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import train_loop  # pylint: disable=g-import-not-at-top,wrong-import-position  # noqa: E402
from dtq_jax.data import datasets  # pylint: disable=wrong-import-position  # noqa: E402
from dtq_jax.data import sources  # pylint: disable=wrong-import-position  # noqa: E402


def _config(on_device='on', steps=4, log_every=2):
  return train_loop.loop_config('small_resnet', 8, 'float32', steps,
                                log_every, on_device)


def test_numpy_feed_gives_the_tf_pipelines_batches():
  config = _config()
  tf_data = train_loop.make_data(config, 32, 5, 1, 'tf')
  np_data = train_loop.make_data(config, 32, 5, 1, 'numpy')
  assert isinstance(tf_data, datasets.Data)
  assert isinstance(np_data, train_loop.RowData)
  for attr in ('on_device', 'num_train', 'num_classes', 'image_shape', 'val'):
    assert getattr(np_data, attr) == getattr(tf_data, attr), attr
  assert np_data.steps_per_epoch(8) == tf_data.steps_per_epoch(8) == 4
  tf_batch = next(tf_data.train_batches(8, seed=0, on_device=True))
  np_stream = np_data.train_batches(8, seed=0)
  epoch = [next(np_stream) for _ in range(4)]
  for key in ('image', 'label'):
    assert epoch[0][key].dtype == tf_batch[key].dtype, key
    assert epoch[0][key].shape == tf_batch[key].shape, key
  assert set(epoch[0]) == set(tf_batch)
  # An epoch is a permutation of the rows (the same as the tf pipeline's
  # draws in distribution, not in order).
  seen = np.concatenate([b['image'] for b in epoch]).reshape(32, -1)
  rows = np_data.train[0].reshape(32, -1)
  assert sorted(map(bytes, seen)) == sorted(map(bytes, rows))
  # start_step resumes the identical stream.
  resumed = next(np_data.train_batches(8, seed=0, start_step=3))
  np.testing.assert_array_equal(resumed['image'], epoch[3]['image'])
  np.testing.assert_array_equal(resumed['label'], epoch[3]['label'])
  # Each process gets its rows of the global batch.
  halves = [next(np_data.train_batches(8, seed=0, process_index=i,
                                       process_count=2))['label']
            for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), epoch[0]['label'])


def test_numpy_eval_batches_equal_the_tf_pipelines():
  rs = np.random.RandomState(1)
  images = rs.randint(0, 256, (10, 28, 28, 1)).astype(np.uint8)
  labels = rs.randint(0, 5, (10,)).astype(np.int32)
  np_data = train_loop.RowData((images, labels), (images, labels), 28, 5)
  split = sources.Split(images, labels, [str(c) for c in range(5)])
  tf_data = datasets.Data(split, split, None,
                          datasets.Preprocessing(image_size=28, mean=(0.5,),
                                                 std=(0.25,)),
                          on_device=True)
  got = list(np_data.eval_batches(np_data.test, 8))
  want = list(tf_data.eval_batches(split, 8, on_device=True))
  assert len(got) == len(want) == 2
  for g, w in zip(got, want):
    assert set(g) == set(w)
    for key in w:
      assert g[key].dtype == w[key].dtype, key
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)
  np.testing.assert_array_equal(got[1]['mask'], [1, 1, 0, 0, 0, 0, 0, 0])


def test_numpy_feed_refuses_host_augmentation():
  with pytest.raises(ValueError, match='on-device augmentation only'):
    train_loop.make_data(_config(on_device='off'), 16, 5, 1, 'numpy')
  with pytest.raises(ValueError, match="allowed: auto, tf, numpy"):
    train_loop.resolve_feed('torch')


def test_too_few_steps_to_time_are_refused():
  with pytest.raises(ValueError, match='fewer than two log intervals'):
    train_loop.time_loop(_config(steps=3, log_every=2), None, None)


def test_loop_and_step_alone_are_reported(tmp_path):
  out = tmp_path / 'loop.md'
  proc = subprocess.run(
      [sys.executable, 'benchmarks/train_loop.py', '--model=small_resnet',
       '--batch=8', '--steps=6', '--log_every=2', '--step_steps=2',
       '--warmup=1', '--feed=numpy', '--augment_on_device=on', f'--out={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  loop, alone = [json.loads(line) for line in proc.stdout.splitlines()
                 if line.startswith('{')]
  assert loop['what'].startswith('training loop')
  assert (loop['feed'], loop['on_device'], loop['loop_steps']) == (
      'numpy', True, 6)
  # Three log intervals; the first (compiling) is not in the median.
  assert len(loop['loop_intervals_img_per_s']) == 3
  assert loop['img_per_s'] == pytest.approx(
      np.median(loop['loop_intervals_img_per_s'][1:]), rel=1e-3)
  assert alone['img_per_s'] > 0 and alone['x_step'] == 1.0
  assert loop['x_step'] == pytest.approx(
      loop['img_per_s'] / alone['img_per_s'], rel=1e-2)
  report = out.read_text()
  assert '| training loop (train_and_evaluate) |' in report, report
  assert '- feed: numpy' in report
