"""The training progress bar: monotonic elapsed time, a rate without compiling.

Issue #29: the bar's elapsed time went back to 0 after the first step
(``1/172 [00:12<36:05]``, then ``20/172 [00:03<32:04]``), and the first ETA
counted the compilation (``1/468 [00:06<47:38]``).
"""

import io
import re

import pytest
import tqdm.std

from dtq_jax.run import train


class _Clock:
  """A settable ``time.time`` for tqdm."""

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


@pytest.fixture(name='clock')
def clock_fixture(monkeypatch):
  clock = _Clock()
  # tqdm reads its module's ``time`` when a bar is made.
  monkeypatch.setattr(tqdm.std, 'time', clock)
  return clock


def _bar(out, total=172, initial=0):
  return train.ProgressBar(total=total, initial=initial, file=out, ncols=100,
                           mininterval=0, miniters=1, desc='seed_1')


def _shown(out):
  """``[(elapsed s, remaining s or None)]`` of every line the bar drew."""
  shown = []
  for m in re.finditer(r'\[(\d+):(\d+)<(\?|(\d+):(\d+))', out.getvalue()):
    elapsed = int(m.group(1)) * 60 + int(m.group(2))
    remaining = (None if m.group(3) == '?' else
                 int(m.group(4)) * 60 + int(m.group(5)))
    shown.append((elapsed, remaining))
  return shown


def test_the_compiling_step_gives_no_rate_and_the_clock_runs_on(clock):
  out = io.StringIO()
  bar = _bar(out)
  clock.now += 12.0  # The first step compiles.
  bar.update(1)
  assert bar.format_dict['rate'] is None
  assert '00:12<?' in str(bar)
  bar.restart_clock()
  clock.now += 3.0  # 19 steps at 6.33 steps/s.
  bar.update(19)
  fields = bar.format_dict
  assert fields['elapsed'] == pytest.approx(15.0)  # Not 3 s: no reset.
  assert fields['rate'] == pytest.approx(19 / 3)
  # 152 steps at 19/3 steps/s: 24 s, not the 36 min of a rate over the
  # compilation.
  assert '00:15<00:24' in str(bar)
  clock.now += 30.0
  bar.update(152)
  bar.close()
  shown = _shown(out)
  assert [e for e, _ in shown] == sorted(e for e, _ in shown), shown
  assert shown[-1][0] == 45 and shown[-1][1] == 0
  # The last line (drawn by close) keeps the rate without the compilation:
  # 171 steps in 33 s.
  assert out.getvalue().rstrip().endswith('5.18it/s]'), out.getvalue()[-200:]
  assert not [r for e, r in shown if e == 12 and r is not None], shown


def test_a_resumed_run_rates_only_the_steps_after_its_first(clock):
  out = io.StringIO()
  bar = _bar(out, total=100, initial=40)
  clock.now += 20.0
  bar.update(1)
  assert bar.format_dict['rate'] is None
  bar.restart_clock()
  assert bar.clock == (clock.now, 41)
  clock.now += 2.0
  bar.update(10)
  assert bar.format_dict['rate'] == pytest.approx(5.0)
  assert bar.format_dict['elapsed'] == pytest.approx(22.0)
  assert '51/100 [00:22<00:09' in str(bar)


def test_a_disabled_bar_has_the_same_interface(clock):
  # The bar of a process other than the first.
  bar = train.ProgressBar(total=10, disable=True)
  bar.update(1)
  bar.restart_clock()
  bar.update(1)
  assert bar.clock is None and bar.format_dict['total'] == 10
  bar.close()
