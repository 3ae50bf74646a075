"""The package's commands run in a subprocess, some modules made missing.

``python -m dtq_jax.export`` and ``python -m dtq_jax.plot`` must end in one
line naming the extra to install when an optional library is absent; a
subprocess with ``sys.modules[name] = None`` is that install, as far as the
command can tell.
"""

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
