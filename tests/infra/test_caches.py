"""dtq_jax.infra.caches: the cache root and the compilation cache under it."""

import os

import jax
import ml_collections
import pytest

from dtq_jax.infra import caches


def test_root_is_the_config_s_or_under_xdg_cache_home(tmp_path, monkeypatch):
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  config = ml_collections.ConfigDict({'cache_dir': ''})
  assert caches.root(config) == os.path.join(str(tmp_path / 'xdg'), 'dtq_jax')
  # A config saved before the field existed.
  assert caches.root(ml_collections.ConfigDict()) == caches.root(config)
  config.cache_dir = str(tmp_path / 'mine')
  assert caches.root(config) == str(tmp_path / 'mine')


@pytest.mark.parametrize('environment, expected', [
    (None, 'root/xla'),
    # One cache that several jobs (or a test session's processes) share.
    ('shared', 'shared'),
])
def test_compilation_cache_dir(environment, expected, tmp_path, monkeypatch):
  if environment:
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / environment))
  else:
    monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
  before = (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs)
  try:
    caches.enable_compilation_cache(
        ml_collections.ConfigDict({'cache_dir': str(tmp_path / 'root')}))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / expected)
  finally:
    jax.config.update('jax_compilation_cache_dir', before[0])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', before[1])
