"""Multi-process start-up through JAX's own distributed runtime.

A run is multi-process when the user names a coordinator (flags or the
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``
environment variables), when a cluster launcher that JAX detects by itself
started several processes (SLURM's ``srun``, Open MPI's ``mpirun``), or on a
Cloud TPU VM (JAX finds the other workers of a pod slice itself). Everything
else (the data slices, the sharded step, orbax's multi-host checkpoints)
follows from ``jax.process_index()`` and ``jax.process_count()``.
"""

import glob
import importlib.util
import os
import sys

import jax

from dtq_jax import errors

# PCI vendor id of Google's TPU chips (as jax's own hardware detection).
_GOOGLE_PCI_VENDOR = '0x1ae0'


def _cluster_processes():
  """Processes a launcher started, from its environment (0 if none).

  SLURM: the job step's task count, set by ``srun`` only, so that a plain
  ``python main.py`` in a batch script runs as one process instead of
  waiting for tasks that were never started.
  """
  for var in ('OMPI_COMM_WORLD_SIZE', 'SLURM_STEP_NUM_TASKS'):
    if os.environ.get(var, '').isdigit():
      return int(os.environ[var])
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len(hosts.split(',')) if hosts else 0


def _on_cloud_tpu_vm():
  """libtpu is installed and a TPU chip is attached (no backend started)."""
  if importlib.util.find_spec('libtpu') is None:
    return False
  for path in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(path) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def maybe_initialize(coordinator_address=None, num_processes=None,
                     process_id=None):
  """Calls ``jax.distributed.initialize`` for a (possibly) multi-process run.

  Must run before anything else touches a JAX backend. Processes other than
  process 0 then write nothing to stdout (summaries, progress and tables come
  from process 0; errors still reach stderr).

  Args:
    coordinator_address: 'host:port' of process 0 (None: environment or
      auto-detection).
    num_processes: total processes.
    process_id: this process's index.

  Returns:
    True if the run has several processes.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get(
      'JAX_COORDINATOR_ADDRESS')
  if num_processes is None and env.get('JAX_NUM_PROCESSES'):
    num_processes = int(env['JAX_NUM_PROCESSES'])
  if process_id is None and env.get('JAX_PROCESS_ID'):
    process_id = int(env['JAX_PROCESS_ID'])
  on_tpu_vm = False
  if not coordinator_address and _cluster_processes() <= 1:
    on_tpu_vm = _on_cloud_tpu_vm()
    if not on_tpu_vm:
      if num_processes not in (None, 1) or process_id not in (None, 0):
        raise errors.UserError(
            '--num_processes and --process_id need --coordinator_address='
            'HOST:PORT of process 0 (or JAX_COORDINATOR_ADDRESS).')
      return False
  # CPU devices of different processes talk through gloo; the setting does
  # not affect GPU or TPU backends.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  except ValueError as e:
    if not on_tpu_vm:
      raise
    # A TPU VM outside a pod slice whose metadata JAX cannot read (e.g. a
    # notebook runtime): one process.
    print(f'warning: not starting JAX\'s distributed runtime ({e}); running '
          'as a single process.', file=sys.stderr)
    return False
  if jax.process_index() != 0:
    sys.stdout = open(os.devnull, 'w')  # pylint: disable=consider-using-with
  return jax.process_count() > 1
