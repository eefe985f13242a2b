"""tools/bench_common.py: the summary of repeated timings every benchmark prints (median, range, count)."""

from __future__ import annotations

import doctest
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    import bench_common

    yield bench_common
    sys.modules.pop("bench_common", None)


def test_timing_is_the_median_range_and_count_worked_by_hand(common):
    # 2.0, 2.2, 2.4, 26.4 sorted: median (2.2 + 2.4) / 2 = 2.3; the mean would be 33.0 / 4 = 8.25
    t = common.Timing.of([2.4, 26.4, 2.0, 2.2])
    assert (t.median, t.low, t.high, t.n) == (pytest.approx(2.3), 2.0, 26.4, 4)
    assert str(t) == "2.300 s (2.000-26.400, n=4)"
    assert str(common.Timing.of([0.25])) == "0.250 s (n=1)"  # one run: no range to show
    assert common.Timing.of(x for x in (3.0, 1.0, 2.0)).median == 2.0  # any iterable, odd count: the middle one
    with pytest.raises(ValueError):
        common.Timing.of([])


def test_the_docstring_examples_hold(common):
    failed, attempted = doctest.testmod(common, verbose=False)
    assert attempted > 0 and failed == 0


def test_interleaved_timings_alternates_methods_and_keeps_every_run(common, monkeypatch):
    calls, clock = [], iter(range(100))
    monkeypatch.setattr(common.time, "perf_counter", lambda: float(next(clock)))  # every call takes 1 s
    warmup, timings = common.interleaved_timings({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] * 4  # one warm-up each, then a, b, a, b, a, b
    assert warmup == {"a": 1.0, "b": 1.0}
    assert timings == {"a": common.Timing(1.0, 1.0, 1.0, 3), "b": common.Timing(1.0, 1.0, 1.0, 3)}
