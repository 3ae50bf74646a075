"""Tests of dtq_jax.data.augment: on-device crop, flip and normalisation, and the
train and eval steps that use it for uint8 batches."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_files
from configs import fmnist
from dtq_jax.data import augment
from dtq_jax.data import input_pipeline as ip
from dtq_jax.data import sources
from dtq_jax.infra import errors
from dtq_jax.method import networks
from dtq_jax.method import step as step_lib
from dtq_jax.models import create_model

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _images(n, height, width, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, height, width, channels), dtype=np.uint8)


def _reference_normalize(x, mean, std):
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (x.astype(np.float32) / 255.0 - mean) / std


def test_random_crop_flip_matches_numpy_reference():
  images = _images(6, 12, 10)
  key = jax.random.PRNGKey(3)
  size, padding = 8, 2
  out = np.asarray(augment.random_crop_flip_normalize(
      key, jnp.asarray(images), size, MEAN, STD, padding))
  top, left, flip = map(np.asarray, augment.crop_flip_draws(
      key, 6, 12, 10, size, padding))
  padded = np.pad(images, ((0, 0), (padding,) * 2, (padding,) * 2, (0, 0)))
  for i in range(6):
    crop = padded[i, top[i]:top[i] + size, left[i]:left[i] + size]
    if flip[i]:
      crop = crop[:, ::-1]
    np.testing.assert_allclose(out[i], _reference_normalize(crop, MEAN, STD),
                               rtol=1e-5, atol=1e-5)
  assert out.shape == (6, size, size, 3) and out.dtype == np.float32
  # The same key gives the same batch; another key other crops.
  again = augment.random_crop_flip_normalize(key, jnp.asarray(images), size,
                                             MEAN, STD, padding)
  np.testing.assert_array_equal(out, again)
  other = augment.random_crop_flip_normalize(
      jax.random.PRNGKey(4), jnp.asarray(images), size, MEAN, STD, padding)
  assert not np.array_equal(out, other)


def _host_draws(num, height, size, padding):
  """(top, left, flip) of the host pipeline's random crops, read back from
  images whose pixels hold their coordinates."""
  y, x = np.meshgrid(np.arange(height), np.arange(height), indexing='ij')
  # Channel 0: row + 1, channel 1: column + 1 (0 marks the zero padding).
  coords = np.stack([y + 1, x + 1, np.zeros_like(y)], -1).astype(np.uint8)
  split = sources.Split(np.broadcast_to(coords, (num,) + coords.shape).copy(),
                        np.zeros(num, np.int32), ['c'])
  batch = next(ip.train_batches(split, num, size, seed=0, mean=(0.0,),
                                std=(1.0,), crop_padding=padding))
  pix = np.rint(batch['image'] * 255).astype(int)
  top, flip = [], []
  for example in pix:
    # Row i of the crop is padded row top + i, real row top + i - padding,
    # which holds that + 1 (0 in the padding).
    rows = example[..., 0].max(axis=1)
    i = int(np.argmax(rows > 0))
    top.append(int(rows[i]) - 1 + padding - i)
    cols = example[..., 1].max(axis=0)
    real = cols[cols > 0]
    flip.append(bool(real[0] > real[-1]))
  return np.array(top), np.array(flip)


def test_draws_have_the_host_pipelines_distribution():
  height, size, padding, num = 10, 8, 2, 2000
  top, _, flip = map(np.asarray, augment.crop_flip_draws(
      jax.random.PRNGKey(0), num, height, height, size, padding))
  host_top, host_flip = _host_draws(num, height, size, padding)
  positions = height + 2 * padding - size + 1
  for t in (top, host_top):
    counts = np.bincount(t, minlength=positions)
    assert len(counts) == positions  # every offset 0..H+2p-S, nothing else
    expected = num / positions
    assert np.all(np.abs(counts - expected) < 0.25 * expected), counts
  for f in (flip, host_flip):
    assert abs(f.mean() - 0.5) < 0.05


def test_center_crop_equals_host_path():
  images = _images(5, 13, 11)
  split = sources.Split(images, np.zeros(5, np.int32), ['c'])
  host = next(ip.eval_batches(split, 5, 8, mean=MEAN, std=STD))['image']
  device = augment.center_crop_normalize(jnp.asarray(images), 8, MEAN, STD)
  np.testing.assert_allclose(device, host, rtol=1e-6, atol=1e-6)
  # The uint8 batches the host sends for it are the images themselves.
  raw = next(ip.eval_batches(split, 5, 8, on_device=True))
  assert raw['image'].dtype == np.uint8
  np.testing.assert_array_equal(raw['image'], images)


def test_bad_sizes_are_clear_errors():
  with pytest.raises(ValueError, match='larger than the 6x6'):
    augment.random_crop_flip_normalize(jax.random.PRNGKey(0),
                                       jnp.zeros((1, 6, 6, 3), jnp.uint8), 8,
                                       MEAN, STD)
  with pytest.raises(ValueError, match='need 3 value'):
    augment.center_crop_normalize(jnp.zeros((1, 8, 8, 3), jnp.uint8), 8,
                                  (0.5, 0.5), STD)
  floats = jnp.ones((1, 4, 4, 1))
  assert augment.step_inputs(floats, None) is floats
  with pytest.raises(ValueError, match='dataset config'):
    augment.step_inputs(jnp.zeros((1, 4, 4, 1), jnp.uint8), None)


def _tiny_step_setup():
  config = fmnist.get_config('quick')
  config.method = 'ft'  # the smallest step: the hook is the same for all
  config.model_kwargs.widths = (4, 8, 8, 8)
  teacher = dict(create_model(config.model, num_classes=5,
                              **config.model_kwargs).init(
                                  jax.random.PRNGKey(0),
                                  jnp.zeros((1, 28, 28, 1))))
  nets = networks.build_networks(config, 3, 5)
  params, batch_stats = networks.init_params(nets, jax.random.PRNGKey(1),
                                             (28, 28, 1), teacher)
  tx, _ = step_lib.make_optimizer(config, params, 'fc', 10, 3)
  state = step_lib.create_train_state(config, nets, params, batch_stats, tx,
                                      jax.random.PRNGKey(2), (28, 28, 1))
  return config, nets, tx, state, {'teacher': teacher}


def test_steps_preprocess_uint8_batches_and_compile_once():
  config, nets, tx, state, frozen = _tiny_step_setup()
  d = config.dataset
  rng = np.random.RandomState(0)
  batches = [{'image': rng.randint(0, 256, (8, 28, 28, 1)).astype(np.uint8),
              'label': rng.randint(0, 3, 8).astype(np.int32)}
             for _ in range(2)]
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(
      step_lib.make_train_step(config, nets, tx), n=1))
  s = state
  for batch in batches:
    s, metrics = step(s, batch, frozen)
  assert int(s.step) == 2 and bool(metrics['finite'])
  # The uint8 step equals the float step fed the crops it drew: the step's
  # dropout key feeds augment.step_inputs.
  _, dropout_rng = jax.random.split(state.rng)
  crops = augment.step_inputs(jnp.asarray(batches[0]['image']), d,
                              dropout_rng)
  assert crops.shape == (8, 28, 28, 1) and crops.dtype == jnp.float32
  float_step = jax.jit(step_lib.make_train_step(config, nets, tx))
  _, m_uint8 = step(state, batches[0], frozen)
  _, m_float = float_step(state, dict(batches[0], image=crops), frozen)
  np.testing.assert_allclose(m_uint8['loss'], m_float['loss'], rtol=1e-5)

  eval_step = jax.jit(step_lib.make_eval_step(nets, dataset=d))
  batch = dict(batches[1], mask=np.array([1] * 6 + [0] * 2, np.float32))
  out = eval_step(state.params, state.batch_stats, batch)
  centre = augment.center_crop_normalize(jnp.asarray(batch['image']), 28,
                                         d.mean, d.std)
  expected = jax.jit(step_lib.make_eval_step(nets))(
      state.params, state.batch_stats, dict(batch, image=centre))
  chex.assert_trees_all_close(out, expected, rtol=1e-5)
  assert float(out['count']) == 6


@pytest.mark.parametrize('setting, backend, expected', [
    ('on', 'cpu', True), ('off', 'gpu', False), ('auto', 'cpu', False),
    ('auto', 'gpu', True), ('auto', 'tpu', True)])
def test_runs_on_device_resolves_the_setting_per_platform(
    monkeypatch, setting, backend, expected):
  monkeypatch.setattr(jax, 'default_backend', lambda: backend)
  dataset = fmnist.get_config().dataset
  dataset.augment_on_device = setting
  assert augment.runs_on_device(dataset) is expected


def test_runs_on_device_names_the_field_of_a_bad_setting():
  dataset = fmnist.get_config().dataset
  dataset.augment_on_device = 'gpu'
  with pytest.raises(errors.ConfigError) as e:
    augment.runs_on_device(dataset)
  data_files.assert_one_line(e, 'dataset.augment_on_device', 'auto, on, off')
