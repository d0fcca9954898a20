"""Canary rollouts: move traffic step by step, judge the canary on the gateway's metrics,
promote or roll back by themselves.

Two halves, as with the autoscaler:

- ``judge(policy, canary, stable, step_age) -> Verdict`` is pure: numbers in, a decision
  out ("wait", "advance" or "rollback", with the reason in words).
- ``Rollouts`` is the I/O shell the controller drives: ``observe(report)`` adds each
  gateway stats report to the current step's ``StepStats`` of the revisions under a
  rollout; ``reconcile(fn)`` judges and applies the verdict through the store (pure
  mutators from :mod:`torpor.controller.traffic`) and records ``rollout`` events.

All rollout state lives in the store (``Function.rollout``: step, wall-clock
``step_started``, state, reason), so a rollout survives a controller restart and resumes
at its step. The step's measurement lives in memory only: after a restart (or a resume)
the current step is measured afresh.

How a step is judged (``judge``):

1. Fewer than ``min_requests`` (at least 1) canary requests this step: wait.
2. The canary's 5xx ratio above ``max_error_ratio``: roll back, at once (no waiting for
   the interval).
3. The canary's p95 latency above ``max_p95_ratio`` x the stable revision's p95: roll
   back. Both p95s are estimated from the gateway's latency buckets (linear within a
   bucket, as Prometheus' ``histogram_quantile``); the stable p95 counts as at least
   ``P95_FLOOR`` so that differences below the histogram's resolution never breach.
   Each p95 needs ``min_requests`` latency samples this step.
4. The step's ``interval`` not yet over, or too few latency samples yet: wait.
5. Otherwise: advance (a step of 100 % promotes).

Warm-up: latency is only sampled from a gateway's report when that gateway also had a
ready replica of the revision in its previous report. A canary that starts at zero is
not judged on its cold start (which its stable rival, already warm, does not pay);
its requests and 5xx count from the first one, so a canary that never becomes ready
(its requests end as 503/504) is still rolled back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torpor.controller import traffic
from torpor.messages import parse_stats
from torpor.model import LATENCY_BUCKETS, Event, Function, Rollout, RolloutPolicy
from torpor.store.base import Store

log = logging.getLogger("torpor.rollout")

P95_FLOOR = 0.01  # seconds: a stable p95 below this counts as this (bucket resolution)
FORGET_AFTER = 30.0  # seconds without a reconcile before a watch is dropped


@dataclass
class StepStats:
    """What the gateways saw of one revision during the current step."""

    requests: int = 0
    errors: int = 0  # 5xx, the gateway's own 503/504 included
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))

    def add(self, report: Mapping[str, Any], latency: bool = True) -> None:
        """One revision's entry of a gateway report (``Sampler.collect``); its latency
        buckets only if ``latency`` (not a cold-start period)."""
        self.requests += int(report.get("requests", 0) or 0)
        self.errors += int(report.get("errors", 0) or 0)
        lat = report.get("latency") or []
        if latency:
            for i, n in enumerate(lat[: len(self.latency)]):
                self.latency[i] += int(n)

    @property
    def samples(self) -> int:
        """Requests with a latency sample."""
        return sum(self.latency)

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def p95(self) -> float | None:
        return quantile(0.95, self.latency)


def quantile(
    q: float, counts: Sequence[int], bounds: Sequence[float] = LATENCY_BUCKETS
) -> float | None:
    """Estimate the ``q`` quantile from bucket counts (``counts[i]`` = observations in
    ``(bounds[i-1], bounds[i]]``, the last one above ``bounds[-1]``). Linear within a
    bucket; the open last bucket answers its lower bound. None without observations."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n > 0 and seen + n >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lo = bounds[i - 1] if i > 0 else 0.0
            return lo + (bounds[i] - lo) * max(rank - seen, 0.0) / n
        seen += n
    return float(bounds[-1])


@dataclass(frozen=True)
class Verdict:
    action: Literal["wait", "advance", "rollback"]
    reason: str


def _fmt_s(x: float) -> str:
    return f"{x * 1000:.0f}ms" if x < 1 else f"{x:.2f}s"


def judge(
    policy: RolloutPolicy,
    canary: StepStats,
    stable: StepStats,
    step_age: float,
    floor: float = P95_FLOOR,
) -> Verdict:
    """Decide one step of a rollout (pure). ``step_age``: seconds since the step began."""
    need = max(policy.min_requests, 1)
    if canary.requests < need:
        return Verdict("wait", f"{canary.requests}/{need} canary requests")
    ratio = canary.error_ratio
    if ratio > policy.max_error_ratio:
        return Verdict(
            "rollback",
            f"5xx ratio {ratio:.1%} > {policy.max_error_ratio:.1%} "
            f"({canary.errors} of {canary.requests} canary requests)",
        )
    cp95, sp95 = canary.p95(), stable.p95()
    measured = canary.samples >= need and cp95 is not None
    baseline = stable.samples >= need and sp95 is not None
    if measured and baseline and cp95 is not None and sp95 is not None:
        limit = policy.max_p95_ratio * max(sp95, floor)
        if cp95 > limit:
            return Verdict(
                "rollback",
                f"p95 {_fmt_s(cp95)} > {policy.max_p95_ratio:g} x stable p95 "
                f"{_fmt_s(sp95)} ({canary.samples} canary requests timed)",
            )
    if step_age < policy.interval:
        return Verdict(
            "wait", f"healthy so far; {policy.interval - step_age:.0f}s of the interval left"
        )
    if not measured:
        return Verdict("wait", f"{canary.samples}/{need} canary requests timed (warming up)")
    if not baseline:
        return Verdict("wait", f"{stable.samples}/{need} stable requests for a p95 baseline")
    assert cp95 is not None and sp95 is not None
    return Verdict(
        "advance",
        f"5xx {ratio:.1%} of {canary.requests}, p95 {_fmt_s(cp95)} vs stable {_fmt_s(sp95)}",
    )


# -- the I/O shell ---------------------------------------------------------------------------
Key = tuple[str, str, int, float, str]


def _key(ro: Rollout) -> Key:
    return (ro.to, ro.stable, ro.step, ro.step_started, ro.state)


@dataclass
class _Watch:
    key: Key
    seen: float


def _describe_step(ro: Rollout) -> str:
    pct = ro.steps[min(ro.step, len(ro.steps) - 1)]
    return f"step {ro.step + 1}/{len(ro.steps)}: {ro.to} at {pct}%, {ro.stable} at {100 - pct}%"


class Rollouts:
    def __init__(
        self, store: Store, clock: Callable[[], float], wall: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.clock = clock  # monotonic: bookkeeping only
        self.wall = wall  # wall clock: step_started is stored and must survive restarts
        self.stats: dict[str, StepStats] = {}  # revision -> current step's stats
        self.watching: dict[str, _Watch] = {}  # function -> the step being measured
        self.last: dict[str, Verdict] = {}  # function -> last verdict (for describe/debugging)
        self.warm: dict[
            tuple[str, str], bool
        ] = {}  # (gateway, revision) -> had a ready replica last report

    def observe(self, payload: object) -> None:
        """One gateway stats report off the bus (``torpor.messages.StatsReport``), parsed
        by ``parse_stats``: a malformed one, or a malformed entry of it, is dropped."""
        if not self.stats:
            return
        report = parse_stats(payload)
        if report is None:
            return
        revisions = report["revisions"]
        gateway = report["gateway"]
        for k in [k for k in self.warm if k[0] == gateway and k[1] not in revisions]:
            del self.warm[k]  # no entry: no replica, no traffic at that gateway
        for name, entry in revisions.items():
            st = self.stats.get(name)
            if st is None:
                continue
            ready = entry["ready"] > 0
            st.add(entry, latency=ready and self.warm.get((gateway, name), False))
            self.warm[(gateway, name)] = ready

    def _watch(self, fn: Function, ro: Rollout) -> bool:
        """Track ``ro``'s current step; True when it is a step not measured before."""
        now = self.clock()
        w = self.watching.get(fn.name)
        if w is not None and w.key == _key(ro):
            w.seen = now
            return False
        if w is not None:
            self._unwatch_revisions(w.key, keep={ro.to, ro.stable})
        self.watching[fn.name] = _Watch(_key(ro), now)
        self.stats[ro.to] = StepStats()
        self.stats[ro.stable] = StepStats()
        return True

    def _unwatch_revisions(self, key: Key, keep: set[str] | None = None) -> None:
        busy = {r for w in self.watching.values() if w.key != key for r in w.key[:2]} | (
            keep or set()
        )
        for rev in key[:2]:
            if rev not in busy:
                self.stats.pop(rev, None)
                for k in [k for k in self.warm if k[1] == rev]:
                    del self.warm[k]

    def forget(self, function: str) -> None:
        w = self.watching.pop(function, None)
        self.last.pop(function, None)
        if w is not None:
            self._unwatch_revisions(w.key)

    def _expire(self) -> None:
        now = self.clock()
        for name in [n for n, w in self.watching.items() if now - w.seen > FORGET_AFTER]:
            self.forget(name)

    async def reconcile(self, fn: Function) -> None:
        """Advance, promote or roll back ``fn.rollout`` (running or paused). Never raises:
        a rollout that cannot be judged must not stop the controller's pass."""
        try:
            await self._reconcile(fn)
        except Exception:
            log.exception("rollout of %s: reconcile failed; retrying next pass", fn.name)

    async def _reconcile(self, fn: Function) -> None:
        self._expire()
        cur = await self.store.get_function(fn.name)  # the controller's copy may lag our own writes
        ro = cur.rollout if cur is not None else None
        if cur is None or ro is None or ro.state not in traffic.ACTIVE:
            self.forget(fn.name)
            return
        if self._watch(cur, ro):
            what = "paused at" if ro.state == "paused" else "measuring"
            await self._event(
                fn.name, f"rollout {ro.stable} -> {ro.to}: {what} {_describe_step(ro)}", ro
            )
        if ro.state == "paused":
            return
        verdict = judge(
            ro.policy, self.stats[ro.to], self.stats[ro.stable], self.wall() - ro.step_started
        )
        self.last[fn.name] = verdict
        if verdict.action == "wait":
            return
        await self._apply(fn.name, ro, verdict)

    async def _apply(self, name: str, seen: Rollout, verdict: Verdict) -> None:
        key = _key(seen)
        applied: list[Rollout] = []
        now = self.wall()
        step_no = seen.step + 1

        def mutate(cur: Function | None) -> Function | None:
            applied.clear()
            ro = cur.rollout if cur is not None else None
            if cur is None or ro is None or _key(ro) != key:
                return None  # changed meanwhile (by hand, or by another controller)
            if verdict.action == "rollback":
                traffic.roll_back(cur, ro, f"step {step_no}: {verdict.reason}")
            else:
                traffic.advance(cur, ro, now, f"step {step_no} healthy: {verdict.reason}")
            applied.append(ro)
            return cur

        await self.store.update_function(name, mutate)
        if not applied:
            return
        ro = applied[0]
        if ro.state == "rolled_back":
            msg = f"rolled back to {ro.stable} (100%): {ro.to} breached at {ro.reason}"
        elif ro.state == "promoted":
            msg = f"promoted {ro.to} to 100% ({ro.reason})"
        else:
            msg = f"{_describe_step(ro)} ({ro.reason})"
            self._watch_new_step(name, ro)
        await self._event(name, f"rollout {seen.stable} -> {seen.to}: {msg}", ro)
        if ro.state not in traffic.ACTIVE:
            self.forget(name)

    def _watch_new_step(self, name: str, ro: Rollout) -> None:
        self.watching[name] = _Watch(_key(ro), self.clock())
        self.stats[ro.to] = StepStats()
        self.stats[ro.stable] = StepStats()

    async def _event(self, function: str, message: str, ro: Rollout) -> None:
        try:
            await self.store.add_event(
                Event(
                    function=function,
                    kind="rollout",
                    message=message,
                    data={
                        "to": ro.to,
                        "stable": ro.stable,
                        "step": ro.step,
                        "steps": ro.steps,
                        "state": ro.state,
                        "reason": ro.reason,
                    },
                )
            )
        except Exception:
            log.exception("rollout: recording an event for %s failed", function)
