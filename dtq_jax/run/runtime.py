"""The device mesh, its shardings and the XLA options of the run's jits.

Training is data-parallel over a one-axis ``('data',)`` mesh of every device
(of every process): the state and the teacher are replicated, each batch is
split along its first axis.
"""

import collections
import itertools

import jax
import numpy as np

from dtq_jax.run import config_validation


# jaxlib 0.10 hands dots, reductions and convolutions to YNNPACK
# (DebugOptions.xla_cpu_experimental_ynn_fusion_type); 'eigen' keeps the first
# two and leaves convolutions to XLA's Eigen kernels. A compiler option replaces
# the whole list, so it names the two it keeps (measured in
# benchmarks/README.md: dropping them too is slower).
_YNN_ALL_BUT_CONVOLUTIONS = ('LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,'
                             'LIBRARY_FUSION_TYPE_REDUCE')


def compiler_options(config, backend=None):
  """XLA compiler options for the run's jitted functions.

  On XLA:CPU, YNNPACK's convolutions (jaxlib 0.10's default) run the 1x1 and
  56 px 3x3 convolutions of ResNet-50 1.5-4x slower than Eigen's on the
  2-core AVX-512 machines measured in benchmarks/; ``config.cpu_convolutions
  = 'eigen'`` (the default) selects Eigen. Other backends take no options.

  Args:
    config: the run config (``cpu_convolutions``: 'eigen', or
      'jaxlib_default' for no options).
    backend: platform name; default ``jax.default_backend()``.

  Returns:
    A dict for ``jax.jit(..., compiler_options=...)``, or None.

  Raises:
    ValueError: unknown ``config.cpu_convolutions``.
  """
  choice = config.get('cpu_convolutions',
                      config_validation.DEFAULT_CPU_CONVOLUTIONS)
  if choice not in config_validation.CPU_CONVOLUTIONS:
    raise ValueError(f'config.cpu_convolutions={choice!r}; allowed: '
                     f'{", ".join(config_validation.CPU_CONVOLUTIONS)}.')
  if (backend or jax.default_backend()) != 'cpu' or choice != 'eigen':
    return None
  return {'xla_cpu_experimental_ynn_fusion_type': _YNN_ALL_BUT_CONVOLUTIONS}


class Runtime:
  """The device mesh, its shardings and the XLA options of the run's jits."""

  # pylint: disable-next=redefined-outer-name
  def __init__(self, devices=None, compiler_options=None):
    devices = jax.devices() if devices is None else devices
    self.mesh = jax.sharding.Mesh(np.array(devices), ('data',))
    self.replicated = jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec())
    self.batch = jax.sharding.NamedSharding(
        self.mesh, jax.sharding.PartitionSpec('data'))
    self.is_main = jax.process_index() == 0
    self.compiler_options = compiler_options

  def jit(self, fn, **kwargs):
    """``jax.jit(fn, **kwargs)`` with the run's compiler options."""
    return jax.jit(fn, compiler_options=self.compiler_options, **kwargs)

  def jit_train_step(self, train_step):
    """A train step on this mesh: the state replicated and donated.

    Args:
      train_step: ``step(state, batch, frozen) -> (state, metrics)``
        (``step.make_train_step``).

    Returns:
      The step, jitted once for this mesh.
    """
    return self.jit(
        train_step,
        in_shardings=(self.replicated, self.batch, self.replicated),
        out_shardings=(self.replicated, self.replicated),
        donate_argnums=(0,))

  def put_batch(self, local_batch):
    """Builds global arrays from this process's slice of a global batch."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch, x),
        local_batch)

  def prefetch(self, batches, ahead=1):
    """``put_batch`` of each of ``batches``, ``ahead`` transfers early.

    When the loop takes batch ``n`` (and dispatches its step), the
    transfers of batches ``n + 1 .. n + ahead`` are already issued, so a
    step never waits for its input's host-to-device copy, and the input
    pipeline's next batch is read while the step runs. The batches and
    their order are those of ``batches``; batches fetched ahead of a stop
    are dropped (a resumed run rebuilds its batches from its step).

    Args:
      batches: an iterator of this process's slices of global batches.
      ahead: batches in flight beyond the current one (0: none, the
        transfer is issued when the batch is taken).

    Yields:
      Global device arrays, as ``put_batch`` returns them.
    """
    batches = iter(batches)
    queue = collections.deque(
        self.put_batch(b) for b in itertools.islice(batches, ahead + 1))
    while queue:
      yield queue.popleft()
      queue.extend(self.put_batch(b) for b in itertools.islice(batches, 1))

  def replicate(self, tree):
    """Places ``tree`` on every device of the mesh."""
    return jax.device_put(tree, self.replicated)
