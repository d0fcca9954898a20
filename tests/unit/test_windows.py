"""TimedWindow: bucketed averages with synthetic times."""

from __future__ import annotations

import pytest

from torpor.autoscaler.windows import TimedWindow

Rec = tuple[float, float, str]  # (now, value, source)


@pytest.mark.parametrize(
    ("name", "duration", "records", "now", "expected"),
    [
        ("empty window", 60, [], 10.0, None),
        ("one sample", 60, [(10.2, 7.0, "a")], 10.9, 7.0),
        ("sum across sources in a bucket", 60, [(10.2, 3.0, "a"), (10.7, 4.0, "b")], 10.9, 7.0),
        ("latest value per source wins", 60, [(10.2, 3.0, "a"), (10.8, 5.0, "a")], 10.9, 5.0),
        (
            "latest per source, summed with the other source",
            60,
            [(10.1, 3.0, "a"), (10.2, 9.0, "b"), (10.8, 5.0, "a")],
            10.9,
            14.0,
        ),
        ("default source is one source", 60, [(3.1, 2.0, ""), (3.5, 6.0, "")], 3.9, 6.0),
        (
            "averaging ignores empty buckets",
            60,
            [(0.5, 10.0, "a"), (5.5, 20.0, "a")],
            6.0,
            15.0,  # not 30 / 7 buckets
        ),
        (
            "zeros are data",
            60,
            [(0.5, 30.0, "a"), (1.5, 0.0, "a"), (2.5, 0.0, "a")],
            3.0,
            10.0,
        ),
        (
            "bucket averages, not sample averages",
            60,
            [(0.1, 10.0, "a"), (0.2, 10.0, "b"), (1.1, 40.0, "a")],
            1.5,
            30.0,  # buckets 20 and 40
        ),
        (
            "window start is exclusive of older buckets (6 s: buckets 1..6 at t=6.5)",
            6,
            [(0.5, 100.0, "a"), (6.5, 0.0, "a")],
            6.5,
            0.0,
        ),
        (
            "a bucket stamped after now still counts (callers' clocks a hair apart)",
            6,
            [(0.5, 10.0, "a"), (2.5, 30.0, "a")],
            1.9,
            20.0,
        ),
        ("data older than the window -> None", 6, [(0.5, 100.0, "a")], 6.0, None),
        ("data just inside the window", 6, [(0.5, 100.0, "a")], 5.999, 100.0),
        (
            "60 * 0.1 s makes a 6-bucket window",
            60 * 0.1,
            [(0.5, 100.0, "a"), (5.5, 10.0, "a")],
            6.5,
            10.0,  # bucket 0 is out: a 7-bucket window would say 55
        ),
    ],
)
def test_average(
    name: str, duration: float, records: list[Rec], now: float, expected: float | None
) -> None:
    w = TimedWindow(duration)
    for t, v, src in records:
        w.record(t, v, src)
    got = w.average(now)
    if expected is None:
        assert got is None, name
        assert w.is_empty(now), name
    else:
        assert got == pytest.approx(expected), name
        assert not w.is_empty(now), name


def test_buckets_count() -> None:
    assert TimedWindow(60).buckets == 60
    assert TimedWindow(60 * 0.1).buckets == 6
    assert TimedWindow(0.5).buckets == 1
    assert TimedWindow(2.5).buckets == 3
    assert TimedWindow(1, granularity=0.25).buckets == 4


def test_sub_second_granularity() -> None:
    w = TimedWindow(1.0, granularity=0.25)
    w.record(0.3, 4.0)  # bucket 1 (0.25..0.5)
    w.record(0.6, 8.0)  # bucket 2
    assert w.average(0.7) == pytest.approx(6.0)
    assert w.average(1.3) == pytest.approx(8.0)  # bucket 1 has left the window
    assert w.average(1.5) is None


def test_pruning_bounds_memory() -> None:
    w = TimedWindow(60)
    for i in range(10_000):
        w.record(i + 0.5, float(i), "a")
        w.record(i + 0.6, 1.0, "b")
        assert len(w) <= w.buckets
    assert w.average(9_999.9) == pytest.approx(sum(range(9_940, 10_000)) / 60 + 1.0)


def test_old_sample_ignored() -> None:
    w = TimedWindow(10)
    w.record(100.5, 5.0)
    w.record(50.5, 1000.0)  # a window older than the newest: dropped, not stored
    assert len(w) == 1
    assert w.average(100.5) == pytest.approx(5.0)


def test_late_sample_within_window_counts() -> None:
    w = TimedWindow(10)
    w.record(100.5, 5.0, "a")
    w.record(95.5, 15.0, "b")  # late but inside the window
    assert w.average(100.5) == pytest.approx(10.0)


def test_latest() -> None:
    w = TimedWindow(10)
    assert w.latest(0.0) is None
    w.record(1.5, 4.0, "a")
    w.record(2.5, 1.0, "a")
    w.record(2.6, 2.0, "b")
    assert w.latest(3.0) == pytest.approx(3.0)
    assert w.latest(11.9) == pytest.approx(3.0)
    assert w.latest(12.0) is None


def test_resize_keeps_data_and_prunes() -> None:
    w = TimedWindow(60)
    for i in range(60):
        w.record(i + 0.5, 10.0 if i < 50 else 20.0)
    assert w.average(59.5) == pytest.approx((50 * 10 + 10 * 20) / 60)
    w.resize(10)
    assert w.duration == 10
    assert len(w) == 10
    assert w.average(59.5) == pytest.approx(20.0)
    w.resize(60)  # growing does not bring pruned data back
    assert w.average(59.5) == pytest.approx(20.0)


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_invalid_arguments(bad: float) -> None:
    with pytest.raises(ValueError):
        TimedWindow(bad)
    with pytest.raises(ValueError):
        TimedWindow(60, granularity=bad)


def test_non_finite_values_ignored() -> None:
    w = TimedWindow(60)
    w.record(1.5, float("nan"))
    w.record(float("inf"), 1.0)
    assert w.is_empty(2.0)
    assert len(w) == 0
