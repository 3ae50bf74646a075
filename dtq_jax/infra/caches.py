"""Where runs keep what is computed once: the cache root and the XLA cache.

The root is ``config.cache_dir``, else ``$XDG_CACHE_HOME/dtq_jax`` (or
``~/.cache/dtq_jax``). Below it: ``pretrained/`` (downloaded and converted
weights), ``teachers/`` (the demo's trained teachers), ``images/`` (decoded
images, unless ``dataset.cache_dir`` says otherwise) and ``xla/`` (compiled
programs, unless ``JAX_COMPILATION_CACHE_DIR`` says otherwise).
"""

import os

import jax


def default_root():
  """``$XDG_CACHE_HOME/dtq_jax``, or ``~/.cache/dtq_jax``."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'dtq_jax')


def root(config):
  """The cache root: ``config.cache_dir``, else ``default_root()``."""
  # .get: configs saved before the field (an export's manifest) lack it.
  return config.get('cache_dir') or default_root()


def enable_compilation_cache(config):
  """Keeps compiled XLA programs under the cache root across runs.

  Compiling the train and eval steps takes tens of seconds on a CPU; with the
  cache, rerunning the demo (or resuming a run) skips most of it. An explicit
  ``JAX_COMPILATION_CACHE_DIR`` in the environment wins over the root: one
  cache that a cluster's jobs (or a test session's processes) share.

  Args:
    config: the run's config (only ``cache_dir`` is read).
  """
  path = (os.environ.get('JAX_COMPILATION_CACHE_DIR') or
          os.path.join(root(config), 'xla'))
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
