"""The package's commands as the tests run them.

``export_report`` runs ``python -m dtq_jax.export --check`` in-process and
returns its report.
``python -m dtq_jax.export`` and ``python -m dtq_jax.plot`` must end in one
line naming the extra to install when an optional library is absent; a
subprocess with ``sys.modules[name] = None`` is that install, as far as the
command can tell.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_without(module, argv, blocked, timeout=300):
  """Runs ``python -m module argv...`` as if ``blocked`` were not installed.

  Args:
    module: the command's module, e.g. 'dtq_jax.export'.
    argv: its arguments (without the program name).
    blocked: the top-level package to make missing, e.g. 'matplotlib'.
    timeout: seconds.

  Returns:
    The ``subprocess.CompletedProcess`` (text stdout and stderr).
  """
  code = (f'import runpy, sys; sys.modules[{blocked!r}] = None; '
          f'sys.argv = {[module] + list(argv)!r}; '
          f'runpy.run_module({module!r}, run_name="__main__")')
  return subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def export_report(workdir, out, report_dir, *extra):
  """Exports a run with ``--check`` (command line, in-process); its report.

  Args:
    workdir: the run's method folder.
    out: the file to write (its ending picks the format).
    report_dir: a folder for the report's JSON.
    *extra: further command-line arguments.

  Returns:
    The check's report dict.
  """
  from dtq_jax import export  # pylint: disable=g-import-not-at-top
  report_path = os.path.join(str(report_dir), 'report.json')
  assert export.main(['--workdir', str(workdir), '--out', str(out),
                      '--check', '--report', report_path, *extra]) == 0
  with open(report_path) as f:
    return json.load(f)
