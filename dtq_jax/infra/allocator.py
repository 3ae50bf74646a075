"""Tunes the C memory allocator of this process (glibc's malloc, via mallopt).

With its default settings glibc serves every buffer above its mmap threshold
(at most 32 MB) with a fresh ``mmap`` and gives it back with ``munmap`` when
freed, and returns free memory at the top of the heap to the system. A train
step on 224 px images frees gigabytes of temporaries at its end (XLA:CPU's
buffers; PyTorch's too), so every step faults the same memory in again, page
by page: on ResNet-50 that costs more than a third of the step.

``configure('keep')`` (the default of ``main.py`` and the benchmarks) tells
glibc to keep freed memory for reuse, as tcmalloc does: no mmap for large
blocks (``M_MMAP_MAX`` = 0), no trimming (``M_TRIM_THRESHOLD`` = -1), and one
arena for all threads (``M_ARENA_MAX`` = 1): XLA's worker threads would
otherwise allocate from per-thread arenas, whose 64 MB heaps glibc unmaps as
soon as they are empty, whatever the trim threshold. The process then keeps
the memory of its largest step (as with tcmalloc) instead of returning it
between steps. ``'default'`` leaves glibc as it is.

The environment variable ``DTQ_ALLOCATOR`` overrides the mode given by the
caller: ``DTQ_ALLOCATOR=default python main.py ...`` turns it off.

Where glibc's malloc is not the allocator (tcmalloc or jemalloc preloaded,
musl, macOS) or ctypes cannot find ``mallopt``, ``configure`` changes nothing
and says why in its return value.
"""

import ctypes
import os

from dtq_jax.infra import errors

ENV_VAR = 'DTQ_ALLOCATOR'
MODES = ('keep', 'default')

# glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# (parameter, value) pairs of mode 'keep'. M_MMAP_MAX 0 serves large blocks
# from the heap, whose freed memory is reused instead of unmapped; -1 as
# M_TRIM_THRESHOLD disables trimming (man mallopt); M_ARENA_MAX 1 keeps every
# thread on the main heap (measured with a jitted conv net's gradient: about
# 44000 page faults per call with the first two settings alone, none with
# all three).
KEEP_SETTINGS = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_ARENA_MAX, 1))

# Symbols of allocators that replace glibc's malloc when preloaded; their
# presence means mallopt would tune an allocator nobody uses.
_OTHER_ALLOCATORS = (('tc_malloc', 'tcmalloc'), ('mallctl', 'jemalloc'),
                     ('je_mallctl', 'jemalloc'))


def _glibc_version():
  try:
    return os.confstr('CS_GNU_LIBC_VERSION')
  except (AttributeError, ValueError, OSError):
    return None


def configure(mode='keep'):
  """Applies ``mode`` to this process's malloc (``$DTQ_ALLOCATOR`` wins).

  Call it once at start, before the large allocations; it is cheap and safe to
  call again.

  Args:
    mode: 'keep' (glibc keeps freed memory for reuse) or 'default' (leave the
      allocator alone).

  Returns:
    A short description of what was done, for logs and benchmark reports:
    e.g. ``'keep (mallopt: mmap_max=0, trim_threshold=-1, arena_max=1)'``,
    ``'default'``,
    or ``'default (tcmalloc preloaded)'`` where nothing could be done.

  Raises:
    errors.UserError: if ``mode`` or ``$DTQ_ALLOCATOR`` is not one of MODES.
  """
  env = os.environ.get(ENV_VAR, '').strip()
  if env:
    source, mode = f'${ENV_VAR}', env
  else:
    source = 'allocator mode'
  if mode not in MODES:
    raise errors.UserError(
        f'{source}={mode!r} is not a mode; use one of {", ".join(MODES)}.')
  if mode == 'default':
    return 'default'
  version = _glibc_version()
  if not version:
    return 'default (the C library is not glibc)'
  try:
    process = ctypes.CDLL(None)
  except OSError as e:
    return f'default (ctypes cannot open the process: {e})'
  for symbol, name in _OTHER_ALLOCATORS:
    if hasattr(process, symbol):
      return f'default ({name} preloaded)'
  mallopt = getattr(process, 'mallopt', None)
  if mallopt is None:
    return f'default ({version}: no mallopt)'
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  for param, value in KEEP_SETTINGS:
    # mallopt returns 1 on success, 0 on error.
    if mallopt(param, value) != 1:
      return f'default (mallopt({param}, {value}) failed)'
  return 'keep (mallopt: mmap_max=0, trim_threshold=-1, arena_max=1)'
