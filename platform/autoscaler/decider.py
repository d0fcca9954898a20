"""The autoscaler's decision for one revision, KPA-style, as pure logic.

No I/O, no clock, no store, no asyncio: every method takes ``now`` (seconds, the
caller's monotonic clock) and ``decide`` takes the number of *ready* replicas.

How a decision is made (``RevisionScaler.decide``):

1. Windows. Gateway reports go into a stable window (``scale.window``, 60 s) and a
   panic window (``scale.panic_window`` percent of it, 10 % = 6 s by default; at least 2 s), 1 s buckets, summed over gateways, averaged over
   the buckets that have data. ``desired_stable = ceil(stable_avg / target)``,
   ``desired_panic = ceil(panic_avg / target)``.
2. No data in the stable window (gateways silent) -> ``desired=None`` ("keep what
   runs"), never zero. Two exceptions, so that decide agrees with the controller:
   a request that woke the revision at zero (``poke``) asks for 1, and a replica
   count outside ``[min, max]`` is brought back inside the bounds. A poke that
   carries the gateway's queue length at zero is also a concurrency sample of that
   gateway (as Knative's activator reports at once on a cold start): 60 requests
   waiting with target 5 ask for 12 replicas at once, through the panic rule.
3. Rate limits, relative to ``ready``: up to ``ceil(1000 x ready)``; down to no less
   than ``ceil(ready / 2)``. From zero there is no up limit (what is needed).
4. Panic. The threshold is ``desired_panic >= 2 x max(ready, 1)`` (``scale.panic_threshold``,
   200 % by default). With replicas
   ready that is Knative's 200 %. At zero, the one replica a wake provides counts as
   the base: a load one replica carries is a plain wake, a load that needs two or
   more replicas is a burst and panics. While panicking the desired count is the
   highest of (stable, panic, ready) seen since the panic began: never down.
   Panic ends once a full stable window has passed since the last decision that
   met the threshold.
5. Scale to zero. Activity is a report with in-flight > 0 or requests > 0, or a
   poke. After ``scale.idle`` seconds without activity (measured from the first
   thing this scaler saw when there was never any activity) desired becomes 0 --
   not after idle plus the stable window as in Knative: the stable average still
   remembers the traffic, but nothing has happened for ``idle``. Idle also ends a
   panic. Not zero while any gateway's latest report (within the stable window)
   shows in-flight requests, nor while a poke has not yet been followed by a
   report. Before idle has passed, desired is at least 1 when a replica is ready
   or there was activity. The scale-down rate limit does not apply to the last
   replica: going to zero is the idle rule's decision alone.
6. Bounds last: clamp to ``[scale.min, scale.max]``; if ``max < min``, max wins
   (never exceed max; ``max == 0`` holds the revision at zero, even on a poke).
   Bounds beat the rate limits (a lowered max applies at once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torpor.autoscaler.windows import TimedWindow
from torpor.model import Scale

PANIC_WINDOW_FRACTION = 0.1  # default panic window = 10 % of the stable window (scale.panic_window)
PANIC_THRESHOLD = (
    2.0  # default desired_panic / ready that starts panic mode (200 %, scale.panic_threshold)
)
MAX_QUEUED_SAMPLE = 1e6  # a poke's queue length is capped at this (it comes off the bus)
MAX_SCALE_UP_RATE = 1000.0  # at most this x ready per decision
MAX_SCALE_DOWN_RATE = 2.0  # at least ready / this per decision
GRANULARITY = 1.0  # bucket size, seconds
MIN_PANIC_WINDOW = 2 * GRANULARITY  # two report periods (see panic_window)


def panic_window(window: float, percent: float = PANIC_WINDOW_FRACTION * 100) -> float:
    """``percent`` (10 by default) of the stable window, but at least two buckets: gateways
    report once a second, so a one-bucket window is empty whenever a decision falls just
    before that second's report, and a burst would be judged on the stable average alone."""
    return max(window * percent / 100, MIN_PANIC_WINDOW)


@dataclass(frozen=True)
class Decision:
    desired: int | None  # None = no decision (keep what runs)
    panic: bool
    reason: str
    stable: float | None  # observed stable-window concurrency
    panicked: float | None  # observed panic-window concurrency


def _fmt(x: float) -> str:
    return f"{x:g}"


def _validate(scale: Scale) -> None:
    if not scale.target > 0 or not math.isfinite(scale.target):
        raise ValueError(f"scale.target must be > 0, got {scale.target!r}")
    if not scale.window > 0 or not math.isfinite(scale.window):
        raise ValueError(f"scale.window must be > 0, got {scale.window!r}")
    if scale.idle < 0 or not math.isfinite(scale.idle):
        raise ValueError(f"scale.idle must be >= 0, got {scale.idle!r}")
    if scale.min < 0 or scale.max < 0:
        raise ValueError(f"scale.min and scale.max must be >= 0, got {scale.min}, {scale.max}")


class RevisionScaler:
    """Per-revision state: windows + panic state + last activity. Pure: methods take `now`."""

    def __init__(self, scale: Scale) -> None:
        _validate(scale)
        self._scale = scale
        self._stable = TimedWindow(scale.window, GRANULARITY)
        self._panic = TimedWindow(panic_window(scale.window, scale.panic_window), GRANULARITY)
        self._first_seen: float | None = None  # first `now` given to any method
        self._last_activity: float | None = None
        self._poked_at: float | None = None  # a poke not yet followed by a report
        self._last_report: dict[str, tuple[float, float]] = {}  # source -> (time, in-flight)
        self._panic_trigger: float | None = None  # last time the panic threshold was met
        self._panic_max = 0

    # -- state the controller / `torpor top` may want to show -------------------------

    @property
    def scale(self) -> Scale:
        return self._scale

    @property
    def panicking(self) -> bool:
        return self._panic_trigger is not None

    @property
    def last_activity(self) -> float | None:
        return self._last_activity

    # -- inputs -------------------------------------------------------------------------

    def update_scale(self, scale: Scale) -> None:
        """New bounds/target/idle/window (``torpor scale``); data and panic state are kept."""
        _validate(scale)
        if scale.window != self._scale.window or scale.panic_window != self._scale.panic_window:
            self._stable.resize(scale.window)
            self._panic.resize(panic_window(scale.window, scale.panic_window))
        self._scale = scale

    def _seen(self, now: float) -> None:
        if self._first_seen is None or now < self._first_seen:
            self._first_seen = now

    def _active(self, now: float) -> None:
        if self._last_activity is None or now > self._last_activity:
            self._last_activity = now

    def record(self, now: float, concurrency: float, requests: int, source: str = "") -> None:
        """One gateway report: average in-flight over its last period (queued requests in
        the activator included) and the number of requests it started in that period."""
        if not (math.isfinite(now) and math.isfinite(concurrency)):
            return
        concurrency = max(0.0, float(concurrency))
        self._seen(now)
        self._stable.record(now, concurrency, source)
        self._panic.record(now, concurrency, source)
        prev = self._last_report.get(source)
        if prev is None or now >= prev[0]:
            self._last_report[source] = (now, concurrency)
        if concurrency > 0 or requests > 0:
            self._active(now)
        if self._poked_at is not None and now >= self._poked_at:
            self._poked_at = None  # reports speak for the woken request from here on

    def poke(self, now: float, queued: float = 0.0, source: str = "") -> None:
        """A request arrived while the revision had no ready replica: activity now. A
        gateway's ``queued`` requests (waiting at zero) are a concurrency sample of that
        gateway right now, so a burst is sized before the next periodic report."""
        self._seen(now)
        if math.isfinite(now) and math.isfinite(queued) and queued > 0:
            queued = min(float(queued), MAX_QUEUED_SAMPLE)
            self._stable.record(now, queued, source)
            self._panic.record(now, queued, source)
        self._active(now)
        if self._poked_at is None or now > self._poked_at:
            self._poked_at = now

    # -- the decision ---------------------------------------------------------------------

    def _in_flight(self, now: float) -> bool:
        """Does any gateway's latest report, within the stable window, show in-flight > 0?"""
        horizon = now - self._scale.window
        for src, (t, c) in list(self._last_report.items()):
            if t <= horizon:
                del self._last_report[src]  # a gateway silent for a window is forgotten
            elif c > 0:
                return True
        return False

    def _idle_for(self, now: float) -> float:
        ref = self._last_activity if self._last_activity is not None else self._first_seen
        return 0.0 if ref is None else now - ref

    def _end_panic(self) -> None:
        self._panic_trigger = None
        self._panic_max = 0

    def _clamp(self, desired: int) -> tuple[int, str]:
        s = self._scale
        if desired > s.max:
            return s.max, f" (max {s.max})"
        if desired < s.min:
            return min(s.min, s.max), f" (min {s.min})"
        return desired, ""

    def decide(self, now: float, ready: int) -> Decision:
        self._seen(now)
        s = self._scale
        ready = max(0, int(ready))
        stable = self._stable.average(now)
        panic_avg = self._panic.average(now)
        panic_secs = _fmt(self._panic.duration)

        if self._panic_trigger is not None and now - self._panic_trigger >= s.window:
            self._end_panic()

        idle_for = self._idle_for(now)
        active_recently = self._last_activity is not None and now - self._last_activity < s.idle
        poke_pending = self._poked_at is not None
        in_flight = self._in_flight(now)
        idle_expired = idle_for >= s.idle and not in_flight and not poke_pending

        # -- gateways silent: no decision, unless a wake or the bounds demand one ---------
        if stable is None:
            if ready == 0 and (poke_pending or active_recently):
                desired, why = self._clamp(1)
                reason = f"no data; woken by a request at zero -> {desired}{why}"
                return Decision(desired, self.panicking, reason, None, None)
            if ready < s.min or ready > s.max:
                desired, why = self._clamp(ready)
                reason = f"no data; ready {ready} -> {desired}{why}"
                return Decision(desired, self.panicking, reason, None, None)
            return Decision(None, self.panicking, "no data", None, None)

        # -- idle: scale to zero (or to min) ------------------------------------------------
        if idle_expired:
            self._end_panic()
            desired, _ = self._clamp(0)
            target = "0" if desired == 0 else f"min {desired}"
            return Decision(desired, False, f"idle {_fmt(s.idle)}s -> {target}", stable, panic_avg)

        # -- stable / panic ------------------------------------------------------------------
        stable_pods = math.ceil(stable / s.target)
        panic_pods = math.ceil(panic_avg / s.target) if panic_avg is not None else None

        up_limit = math.ceil(MAX_SCALE_UP_RATE * ready) if ready > 0 else None
        down_limit = math.ceil(ready / MAX_SCALE_DOWN_RATE)

        def limit(x: int) -> int:
            x = max(x, down_limit)
            return x if up_limit is None else min(x, up_limit)

        base = max(ready, 1)
        threshold = self._scale.panic_threshold / 100
        over = panic_pods is not None and panic_pods >= threshold * base
        if over:
            if self._panic_trigger is None:
                self._panic_max = ready
            self._panic_trigger = now

        if self._panic_trigger is not None:
            raw = max(stable_pods, panic_pods or 0)
            want = max(limit(raw), ready)
            self._panic_max = max(self._panic_max, want)
            want = self._panic_max
            shown = f"{panic_avg:.1f}" if panic_avg is not None else "-"
            if over:
                head = (
                    f"panic: {panic_secs}s avg {shown} >= {_fmt(threshold)}x ready"
                    f" {ready} (needs {panic_pods})"
                )
            else:
                ago = now - self._panic_trigger
                head = f"panic (holding, last trigger {ago:.0f}s ago): {panic_secs}s avg {shown}"
            if limit(raw) != raw and want == limit(raw):
                head += f" (rate-limited from {raw})"
        else:
            want = limit(stable_pods)
            head = (
                f"stable: avg {stable:.1f} in-flight over {_fmt(s.window)}s"
                f" / target {_fmt(s.target)}"
            )
            if want != stable_pods:
                head += f" (rate-limited from {stable_pods})"

        if want == 0 and (ready >= 1 or active_recently or in_flight or poke_pending):
            want = 1
            if in_flight:
                head += " (kept 1: requests in flight)"
            elif poke_pending:
                head += " (kept 1: woken by a request)"
            else:
                head += f" (kept 1: idle {idle_for:.0f}s < {_fmt(s.idle)}s)"

        desired, why = self._clamp(want)
        return Decision(desired, self.panicking, f"{head} -> {desired}{why}", stable, panic_avg)
