"""dtq_jax.infra.allocator: mallopt with glibc's constants, or nothing at all."""

import pytest

from dtq_jax.infra import allocator
from dtq_jax.infra import errors


class _FakeFunction:
  """A ctypes function stand-in: takes argtypes/restype, records calls."""

  def __init__(self, calls, result):
    self.calls, self.result = calls, result

  def __call__(self, param, value):
    self.calls.append((param, value))
    return self.result


class _FakeProcess:
  """ctypes.CDLL(None) stand-in: records mallopt calls; extra symbols."""

  def __init__(self, symbols=(), result=1):
    self.calls = []
    self.mallopt = _FakeFunction(self.calls, result)
    for name in symbols:
      setattr(self, name, object())


@pytest.fixture
def fake_process(monkeypatch):
  """Installs a fake process handle; returns a function making it."""
  monkeypatch.delenv(allocator.ENV_VAR, raising=False)
  monkeypatch.setattr(allocator, '_glibc_version', lambda: 'glibc 2.36')

  def install(**kwargs):
    process = _FakeProcess(**kwargs)
    monkeypatch.setattr(allocator.ctypes, 'CDLL', lambda name: process)
    return process

  return install


def test_keep_calls_mallopt_with_glibc_constants(fake_process):
  process = fake_process()
  assert allocator.configure('keep').startswith('keep')
  # <malloc.h>: M_MMAP_MAX = -4, M_TRIM_THRESHOLD = -1, M_ARENA_MAX = -8.
  assert process.calls == [(-4, 0), (-1, -1), (-8, 1)]


@pytest.mark.parametrize('how', ['argument', 'environment'])
def test_default_mode_changes_nothing(fake_process, monkeypatch, how):
  process = fake_process()
  if how == 'environment':
    monkeypatch.setenv(allocator.ENV_VAR, 'default')
  mode = 'default' if how == 'argument' else 'keep'
  assert allocator.configure(mode) == 'default'
  assert not process.calls


def test_environment_turns_it_on_too(fake_process, monkeypatch):
  process = fake_process()
  monkeypatch.setenv(allocator.ENV_VAR, 'keep')
  assert allocator.configure('default').startswith('keep')
  assert process.calls


@pytest.mark.parametrize('symbol,name', [('tc_malloc', 'tcmalloc'),
                                         ('mallctl', 'jemalloc')])
def test_preloaded_allocator_is_left_alone(fake_process, symbol, name):
  process = fake_process(symbols=[symbol])
  assert allocator.configure('keep') == f'default ({name} preloaded)'
  assert not process.calls


def test_not_glibc_is_a_noop(fake_process, monkeypatch):
  process = fake_process()
  monkeypatch.setattr(allocator, '_glibc_version', lambda: None)
  assert 'not glibc' in allocator.configure('keep')
  assert not process.calls


def test_failed_mallopt_is_reported(fake_process):
  fake_process(result=0)
  assert 'failed' in allocator.configure('keep')


@pytest.mark.parametrize('how', ['argument', 'environment'])
def test_unknown_mode_is_a_user_error(monkeypatch, how):
  monkeypatch.delenv(allocator.ENV_VAR, raising=False)
  if how == 'environment':
    monkeypatch.setenv(allocator.ENV_VAR, 'fast')
  with pytest.raises(errors.UserError, match='DTQ_ALLOCATOR' if how ==
                     'environment' else 'allocator mode'):
    allocator.configure('keep' if how == 'environment' else 'fast')


def test_real_process(monkeypatch):
  """On this machine's C library: applied, or a no-op with its reason."""
  monkeypatch.delenv(allocator.ENV_VAR, raising=False)
  result = allocator.configure('keep')
  assert result.startswith('keep (mallopt') or result.startswith('default (')
