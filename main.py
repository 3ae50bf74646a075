"""Runs DTQ (or a baseline) as a config describes.

  python main.py                                   # the offline demo
  python main.py --config=configs/mit67.py --workdir=runs/mit67
  python main.py --config=configs/mit67.py:mobilenet_v2,5bit --config.repeats=5

Rerunning with the same --workdir resumes an unfinished run and only prints
the summary of a finished one (a larger --config.repeats adds seeds to it).
main.py runs from any directory; --config and --workdir paths are relative to
the current one. This file holds the flags; what they start is
dtq_jax/run/launch.py.
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from dtq_jax.run import launch

# Found next to this file, so that main.py runs from any directory.
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               'configs', 'fmnist.py')

try:
  _CONFIG = config_flags.DEFINE_config_file(
      'config', _DEFAULT_CONFIG, 'Config file (FILE or FILE:VARIANTS).',
      lock_config=True)
except (AttributeError, KeyError):
  # Without --config, the overrides are applied here: a misspelled field.
  launch.exit_if_unknown_field(sys.argv, _DEFAULT_CONFIG)
  raise
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output folder (default: runs/<config>-<time>).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'Multi-process runs: host:port of process 0 (TPU pods, SLURM and Open MPI '
    'are detected without it).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Multi-process runs: process count.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'Multi-process runs: this process.')
_INIT_TIMEOUT = flags.DEFINE_float(
    'init_timeout_s', 300.0,
    'Multi-process runs: seconds to wait for every process to join; then '
    'the run stops with one line naming the processes that did not.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  return launch.run(launch.Command(
      config=_CONFIG.value, config_file=flags.FLAGS['config'].config_filename,
      workdir=_WORKDIR.value, argv=tuple(sys.argv),
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
      init_timeout_s=_INIT_TIMEOUT.value,
      verbose=flags.FLAGS['verbosity'].present))


if __name__ == '__main__':
  app.run(main, flags_parser=lambda argv: launch.parse_flags(
      argv, _DEFAULT_CONFIG))
