"""Shared helpers of the benchmark scripts: machine description, tables, output.

Imported by the scripts in this folder (``python benchmarks/<script>.py`` puts
this folder on ``sys.path``). Only the standard library here, so the PyTorch
reference can use it without JAX.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def add_repo_to_path():
  """Makes ``dtq_jax`` and ``configs`` importable from the repository root."""
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def cpu_model():
  """The CPU's model name from /proc/cpuinfo (or platform's guess)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.lower().startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_family_model():
  """'family F model M' from /proc/cpuinfo: tells CPU generations apart that
  share a model name (an 'AMD EPYC' is Zen 3 at family 25 model 1 and Zen 4
  at family 25 model 17)."""
  fields = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        key, _, value = line.partition(':')
        key = key.strip()
        if key in ('cpu family', 'model') and key not in fields:
          fields[key] = value.strip()
        if not line.strip():
          break
  except OSError:
    pass
  if len(fields) < 2:
    return 'unknown'
  return f'family {fields["cpu family"]} model {fields["model"]}'


def cpu_flags_summary():
  """Which of the SIMD extensions that matter for GEMM the CPU has."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('flags'):
          flags = set(line.split(':', 1)[1].split())
          wanted = ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni',
                    'amx_bf16')
          return ','.join(w for w in wanted if w in flags) or 'none'
  except OSError:
    pass
  return 'unknown'


def usable_cores():
  """CPU cores this process may run on (affinity), else os.cpu_count()."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def load_average():
  try:
    return tuple(round(x, 2) for x in os.getloadavg())
  except OSError:
    return None


def git_commit():
  """``<sha>`` of HEAD, with ``+dirty`` when the working tree has changes."""
  def git(*args):
    return subprocess.run(['git', '-C', REPO_ROOT, *args], capture_output=True,
                          text=True, check=False).stdout.strip()
  sha = git('rev-parse', 'HEAD') or 'unknown'
  dirty = git('status', '--porcelain', '--untracked-files=no')
  return sha + ('+dirty' if dirty else '')


def command_line():
  """The command that ran this script, quoted so that it can be pasted."""
  exe = os.path.relpath(sys.executable, REPO_ROOT) if sys.executable.startswith(
      REPO_ROOT) else sys.executable
  script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO_ROOT)
  return ' '.join(shlex.quote(a) for a in [exe, script, *sys.argv[1:]])


def parse_bits(text):
  """'4' -> (4, 4); '4/8' -> (4, 8) (weights / activations)."""
  parts = text.split('/')
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2:
    raise argparse.ArgumentTypeError(f'--bits {text!r}: use K or W/A')
  return int(parts[0]), int(parts[1])


def add_step_args(parser, models, variants, allocator='keep'):
  """The options train_step.py and torch_reference.py share.

  --model, --bits, --steps, --warmup, --rounds, --variants, --allocator and
  --take_turns; checked by ``check_model_variant_args`` after parsing.

  Args:
    parser: an argparse parser.
    models: allowed model names.
    variants: allowed variant names (all by default).
    allocator: the default of --allocator (``dtq_jax.infra.allocator`` mode).
  """
  parser.add_argument('--model', default='resnet50',
                      help='comma-separated: ' + ', '.join(models))
  parser.add_argument('--bits', type=parse_bits, default=(4, 4),
                      help='student bits: K or W/A (default 4)')
  parser.add_argument('--steps', type=int, default=5, help='timed steps')
  # A caching allocator (tcmalloc) needs about three steps of a large step
  # before it holds all the step's buffers; later steps are the steady state.
  parser.add_argument('--warmup', type=int, default=3,
                      help='untimed steps after building the step')
  parser.add_argument('--rounds', type=int, default=1,
                      help='time all variants this many times in turn '
                      '(--steps each round; the median is over all timed '
                      'steps)')
  parser.add_argument('--variants', default=','.join(variants),
                      help='comma-separated subset of ' + ', '.join(variants))
  parser.add_argument('--allocator', default=allocator,
                      choices=('keep', 'default'),
                      help='dtq_jax.infra.allocator mode: keep (glibc keeps freed '
                      'memory, main.py\'s default) or default (glibc as it '
                      f'is); default {allocator}; $DTQ_ALLOCATOR wins')
  parser.add_argument('--take_turns', default=None, metavar='FILE:ME:NEXT',
                      help='time each round only when FILE holds ME, then '
                      'write NEXT into it: processes started with the same '
                      'FILE time their rounds alternately (e.g. JAX and '
                      'PyTorch, FILE:jax:torch and FILE:torch:jax, one of '
                      'them named in FILE at start)')


def check_model_variant_args(parser, args, models, variants):
  """Splits --model/--variants into lists (each name checked) and checks the
  step counts: the options train_step.py and torch_reference.py share.

  Args:
    parser: the argparse parser (its ``error`` reports a bad value).
    args: the parsed namespace; ``model`` and ``variants`` are replaced by
      lists.
    models: allowed model names.
    variants: allowed variant names.
  """
  for flag, allowed in (('model', models), ('variants', variants)):
    names = [n.strip() for n in getattr(args, flag).split(',') if n.strip()]
    for n in names:
      if n not in allowed:
        parser.error(f'--{flag} {n!r}: allowed {", ".join(allowed)}')
    setattr(args, flag, names)
  if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
    parser.error('--steps and --rounds must be >= 1 and --warmup >= 0')
  if args.take_turns is not None:
    parts = args.take_turns.rsplit(':', 2)
    if len(parts) != 3 or not all(parts):
      parser.error(f'--take_turns {args.take_turns!r}: use FILE:ME:NEXT')
    args.take_turns = tuple(parts)


def configure_allocator(mode):
  """Applies ``dtq_jax.infra.allocator.configure(mode)``; returns its description.

  Call it before the benchmark allocates its step (right after parsing).
  """
  add_repo_to_path()
  from dtq_jax.infra import allocator  # pylint: disable=g-import-not-at-top
  return allocator.configure(mode)


def machine_info(**extra):
  """A dict describing the machine; ``extra`` adds library/device fields."""
  info = {
      'date_utc': datetime.datetime.now(datetime.timezone.utc).strftime(
          '%Y-%m-%d %H:%M:%S'),
      'cpu': cpu_model(),
      'cpu_family_model': cpu_family_model(),
      'cpu_simd': cpu_flags_summary(),
      'cores_usable': usable_cores(),
      'cores_total': os.cpu_count(),
      'python': platform.python_version(),
      'load_average_at_start': load_average(),
      'git_commit': git_commit(),
      # A preloaded allocator (e.g. tcmalloc) changes CPU step times.
      'ld_preload': os.environ.get('LD_PRELOAD', ''),
  }
  info.update(extra)
  return info


def median(xs):
  return statistics.median(xs) if xs else float('nan')


def emit(record):
  """Prints one JSON line (flushed, so partial runs still leave results)."""
  print(json.dumps(record, sort_keys=False), flush=True)


# How long a process taking turns waits for its turn before giving up (the
# other process may have died).
TURN_TIMEOUT_S = 3 * 3600


def _wait_for_turn(path, me):
  start = time.monotonic()
  while True:
    try:
      with open(path) as f:
        if f.read().strip() == me:
          return
    except FileNotFoundError:
      pass
    if time.monotonic() - start > TURN_TIMEOUT_S:
      sys.exit(f'--take_turns: {path} did not name {me!r} within '
               f'{TURN_TIMEOUT_S} s')
    time.sleep(0.2)


def time_rounds(model, variants, rounds, steps, take_turns=None):
  """Times ``variants`` in turn, ``rounds`` times (``v.time_steps(steps)``).

  Interleaving spreads load changes of a shared machine over all variants.

  Args:
    model: the model's name (progress messages).
    variants: objects with ``name`` and ``time_steps(steps)``.
    rounds: how many times to time every variant.
    steps: steps per variant and round.
    take_turns: None, or (FILE, ME, NEXT): wait before each round until FILE
      holds ME, write NEXT after it, so that processes time alternately.

  Returns:
    The load averages (1, 5, 15 min) at the start of each round.
  """
  loads = []
  for r in range(rounds):
    if take_turns:
      _wait_for_turn(take_turns[0], take_turns[1])
    loads.append(load_average())
    for v in variants:
      print(f'# {model} {v.name}: timing round {r + 1}/{rounds} ...',
            file=sys.stderr, flush=True)
      v.time_steps(steps)
    if take_turns:
      write_text_atomic(take_turns[0], take_turns[2])
  return loads


def fmt(value, digits=3):
  """Short human formatting for table cells."""
  if value is None:
    return '-'
  if isinstance(value, float):
    if value != value:  # NaN
      return '-'
    if abs(value) >= 100:
      return f'{value:.0f}'
    if abs(value) >= 10:
      return f'{value:.1f}'
    return f'{value:.{digits}g}'
  return str(value)


def mean_std(values, digits=2):
  """``'mean ± std'`` (population std) of the values that are not None.

  One value is shown alone, none as '-'.
  """
  values = [v for v in values if v is not None]
  if not values:
    return '-'
  if len(values) == 1:
    return f'{values[0]:.{digits}f}'
  return (f'{statistics.fmean(values):.{digits}f} ± '
          f'{statistics.pstdev(values):.{digits}f}')


# compare.py's cell folders: <variant>-<bits>bit[-<shots>shots].
CELL_NAME = re.compile(
    r'(?P<variant>[\w.-]+?)-(?P<bits>\d+)bit(?:-(?P<shots>\d+)shots)?$')


def cell_name(variant, bits, shots=None):
  """The folder name of one compare.py cell (``CELL_NAME`` reads it back)."""
  return f'{variant}-{bits}bit' + (f'-{shots}shots' if shots else '')


def markdown_table(rows, columns):
  """``columns``: list of (header, key or callable(row))."""
  lines = ['| ' + ' | '.join(h for h, _ in columns) + ' |',
           '|' + '|'.join('---' for _ in columns) + '|']
  for row in rows:
    cells = []
    for _, key in columns:
      value = key(row) if callable(key) else row.get(key)
      cells.append(fmt(value))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def write_report(path, title, info, table, records, notes=()):
  """Writes the Markdown report: command, commit, machine, table, raw JSON."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  info = dict(info, load_average_at_end=load_average())
  lines = [f'# {title}', '', 'Command (from the repository root):', '',
           '```sh', command_line(), '```', '']
  lines += [f'- {k}: {v}' for k, v in info.items()]
  lines += ['', table, '']
  if notes:
    lines += [*notes, '']
  lines += ['Raw records (one JSON object per measured variant):', '',
            '```json']
  lines += [json.dumps(r) for r in records]
  lines += ['```', '']
  write_text_atomic(path, '\n'.join(lines))
  print(f'wrote {path}', file=sys.stderr)


def write_text_atomic(path, text):
  """Writes ``text`` to ``path`` under a temporary name, then renames it.

  A killed benchmark leaves the previous table intact, never half of one.
  """
  tmp = f'{path}.tmp.{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
