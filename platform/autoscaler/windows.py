"""Bucketed time windows for the autoscaler: pure, no clock of their own.

Time is always passed in as ``now`` (seconds, any monotonic origin). Samples fall
into buckets of ``granularity`` seconds. Inside one bucket each *source* (one
gateway) keeps only its latest value, and the bucket's value is the sum over
sources: several gateways each report their own average in-flight for their last
period, and the revision's concurrency is the sum of those.

``average(now)`` is the plain mean of the buckets *that have data* within the
window. Unlike Knative's ring buffer (which counts gaps inside the window as
zeros), a bucket nobody reported into does not pull the average down: a revision
that just came up is not averaged over empty time, and a gateway that skipped a
second does not look like a drop in load. Gateways that are alive report zeros,
and zeros are data.
"""

from __future__ import annotations

import math

# Tolerance for float bucket arithmetic: 60 * 0.1 == 6.000000000000001 must still
# make a 6-bucket window, and 0.3 / 0.1 must land in bucket 3.
_EPS = 1e-9


class _Bucket:
    __slots__ = ("by_source", "total")

    def __init__(self) -> None:
        self.by_source: dict[str, float] = {}
        self.total = 0.0

    def put(self, source: str, value: float) -> None:
        self.total += value - self.by_source.get(source, 0.0)
        self.by_source[source] = value


class TimedWindow:
    """Per-bucket sums over sources, averaged over the buckets with data in a window.

    Memory is bounded: buckets older than the window (relative to the newest bucket
    written) are dropped on every ``record``, so at most ``buckets + 1`` are held.
    """

    def __init__(self, duration: float, granularity: float = 1.0) -> None:
        if not granularity > 0 or not math.isfinite(granularity):
            raise ValueError(f"granularity must be a positive number, got {granularity!r}")
        self._granularity = float(granularity)
        self._duration = 0.0
        self._n = 1
        self._buckets: dict[int, _Bucket] = {}
        self._newest: int | None = None
        self.resize(duration)

    @property
    def duration(self) -> float:
        return self._duration

    @property
    def granularity(self) -> float:
        return self._granularity

    @property
    def buckets(self) -> int:
        """Number of buckets the window spans (``ceil(duration / granularity)``, >= 1)."""
        return self._n

    def __len__(self) -> int:
        """Number of buckets currently held in memory (for tests and introspection)."""
        return len(self._buckets)

    def resize(self, duration: float) -> None:
        """Change the window length; data already held is kept (then pruned to the new length)."""
        if not duration > 0 or not math.isfinite(duration):
            raise ValueError(f"duration must be a positive number, got {duration!r}")
        self._duration = float(duration)
        self._n = max(1, math.ceil(self._duration / self._granularity - _EPS))
        if self._newest is not None:
            self._prune(self._newest)

    def _index(self, now: float) -> int:
        return math.floor(now / self._granularity + _EPS)

    def _prune(self, newest: int) -> None:
        oldest_kept = newest - self._n + 1
        for idx in [i for i in self._buckets if i < oldest_kept]:
            del self._buckets[idx]

    def record(self, now: float, value: float, source: str = "") -> None:
        """Put ``value`` from ``source`` into the bucket of ``now`` (latest per source wins).

        Values that are not finite are ignored; a sample older than the window,
        measured from the newest bucket written, is ignored too.
        """
        if not math.isfinite(value) or not math.isfinite(now):
            return
        idx = self._index(now)
        if self._newest is not None and idx <= self._newest - self._n:
            return  # too old to matter: it would be pruned at once
        bucket = self._buckets.get(idx)
        if bucket is None:
            bucket = self._buckets[idx] = _Bucket()
        bucket.put(source, float(value))
        if self._newest is None or idx > self._newest:
            self._newest = idx
            self._prune(idx)

    def _in_window(self, now: float) -> list[tuple[int, _Bucket]]:
        # Buckets stamped after `now` (callers' clocks a hair apart) still count.
        oldest = self._index(now) - self._n + 1
        return [(i, b) for i, b in self._buckets.items() if i >= oldest]

    def average(self, now: float) -> float | None:
        """Mean of the bucket values within ``duration`` before ``now``; None if none has data."""
        live = self._in_window(now)
        if not live:
            return None
        return sum(b.total for _, b in live) / len(live)

    def latest(self, now: float) -> float | None:
        """Value of the newest bucket with data within the window; None if there is none."""
        live = self._in_window(now)
        if not live:
            return None
        return max(live, key=lambda ib: ib[0])[1].total

    def is_empty(self, now: float) -> bool:
        """True when no bucket within ``duration`` before ``now`` has data."""
        return not self._in_window(now)
