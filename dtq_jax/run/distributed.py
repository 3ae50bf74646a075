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
import socket
import sys
import threading

import jax

from dtq_jax.infra import errors

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


def _settings(coordinator_address, num_processes, process_id):
  """The arguments, completed from the ``JAX_*`` environment variables."""
  env = os.environ
  coordinator_address = coordinator_address or env.get(
      'JAX_COORDINATOR_ADDRESS')
  if num_processes is None and env.get('JAX_NUM_PROCESSES'):
    num_processes = int(env['JAX_NUM_PROCESSES'])
  if process_id is None and env.get('JAX_PROCESS_ID'):
    process_id = int(env['JAX_PROCESS_ID'])
  return coordinator_address, num_processes, process_id


def launched(coordinator_address=None, num_processes=None, process_id=None):
  """Whether flags, environment or a launcher ask for several processes.

  Starts nothing, so that main.py can check what every process needs (a
  shared --workdir) before connecting; a Cloud TPU VM, which only JAX's
  start-up can tell apart from a single host, is not counted.

  Args:
    coordinator_address: as for ``maybe_initialize``.
    num_processes: as for ``maybe_initialize``.
    process_id: as for ``maybe_initialize``.

  Returns:
    True if the run is multi-process.
  """
  coordinator_address, num_processes, _ = _settings(
      coordinator_address, num_processes, process_id)
  if coordinator_address:
    return num_processes != 1
  return _cluster_processes() > 1


def _timeout_message(coordinator_address, num_processes, process_id,
                     timeout_s):
  """One line: who waited for whom, and what the user can do."""
  where = coordinator_address or '(found by the cluster launcher)'
  if num_processes and process_id is not None:
    who = f'process {process_id} of {num_processes}'
    if (process_id != 0 and coordinator_address and
        not _answers(coordinator_address)):
      missing = ('nothing answers there (process 0 has not started, or the '
                 'address is wrong)')
    else:
      # Process 0 answers: the missing ones are among the others.
      others = [i for i in range(1, num_processes) if i != process_id]
      missing = (f'process {others[0]} did not join' if len(others) == 1
                 else f'not all of processes {", ".join(map(str, others))} '
                 'joined')
  else:
    who, missing = 'this process', 'not every process joined'
  return (f'{who} waited {timeout_s:g} s (--init_timeout_s) at the '
          f'coordinator {where}: {missing}; start every process with the '
          'same --coordinator_address and --num_processes, each with its own '
          '--process_id.')


def _answers(address):
  """Whether something accepts TCP connections at 'host:port'."""
  host, _, port = address.rpartition(':')
  try:
    with socket.create_connection((host.strip('[]'), int(port)), timeout=2):
      return True
  except (OSError, ValueError):
    return False


def _watchdog(message, timeout_s):
  """A started timer that ends the process with ``message`` on one line.

  ``jax.distributed.initialize`` waits in C++ for the other processes and,
  at its own deadline, aborts the process with a C++ stack trace; the
  timer (which runs, as the wait releases the GIL) ends it first.
  """
  def expire():
    print(f'error: {message()}', file=sys.stderr, flush=True)
    os._exit(2)  # pylint: disable=protected-access
  timer = threading.Timer(timeout_s, expire)
  timer.daemon = True
  timer.start()
  return timer


# Seconds JAX's own deadline comes after ours, which is then always first.
_JAX_DEADLINE_MARGIN_S = 60


def maybe_initialize(coordinator_address=None, num_processes=None,
                     process_id=None, timeout_s=None):
  """Calls ``jax.distributed.initialize`` for a (possibly) multi-process run.

  Must run before anything else touches a JAX backend. Processes other than
  process 0 then write nothing to stdout (summaries, progress and tables come
  from process 0; errors still reach stderr).

  Args:
    coordinator_address: 'host:port' of process 0 (None: environment or
      auto-detection).
    num_processes: total processes.
    process_id: this process's index.
    timeout_s: seconds to wait for every process to join; then the process
      ends with one ``error:`` line naming the coordinator and the processes
      that did not join, exit status 2 (None: JAX's default wait, 300 s,
      then JAX's own abort).

  Returns:
    True if the run has several processes.
  """
  coordinator_address, num_processes, process_id = _settings(
      coordinator_address, num_processes, process_id)
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
  kwargs = dict(coordinator_address=coordinator_address,
                num_processes=num_processes, process_id=process_id)
  timer = None
  if timeout_s is not None:
    kwargs['initialization_timeout'] = int(timeout_s) + _JAX_DEADLINE_MARGIN_S
    timer = _watchdog(lambda: _timeout_message(
        coordinator_address, num_processes, process_id, timeout_s), timeout_s)
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:
    if not on_tpu_vm:
      raise
    # A TPU VM outside a pod slice whose metadata JAX cannot read (e.g. a
    # notebook runtime): one process.
    print(f'warning: not starting JAX\'s distributed runtime ({e}); running '
          'as a single process.', file=sys.stderr)
    return False
  finally:
    if timer is not None:
      timer.cancel()
  if jax.process_index() != 0:
    sys.stdout = open(os.devnull, 'w')  # pylint: disable=consider-using-with
  return jax.process_count() > 1
