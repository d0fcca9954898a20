"""RevisionScaler: KPA-style decisions on synthetic timelines.

A scenario is a timeline of gateway reports ``(t, concurrency, requests)``, pokes at
times, and checks ``(t, ready, desired, panic)``: at time ``t`` the scaler is asked
to decide with ``ready`` replicas and must answer ``desired`` (``panic`` None = not
checked). Reports and pokes stamped at or before a check are fed first. Reports sit
on half seconds, checks mostly on quarter seconds, so bucket edges are unambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from torpor.autoscaler.decider import Decision, RevisionScaler
from torpor.model import Scale

Sample = tuple[float, float, int]  # (t, concurrency, requests)
SourcedSample = tuple[float, float, int, str]  # (t, concurrency, requests, gateway)
Check = tuple[float, int, int | None, bool | None]  # (t, ready, desired, panic)


def steady(t0: float, t1: float, c: float, r: int = 0) -> list[Sample]:
    """One report per second at t0+0.5, t0+1.5, ... below t1."""
    return [(t + 0.5, c, r) for t in range(int(t0), int(t1))]


@dataclass
class Scenario:
    name: str
    checks: list[Check]
    samples: list[Sample] | list[SourcedSample] = field(default_factory=list)
    pokes: list[float | tuple[float, float, str]] = field(
        default_factory=list
    )  # t or (t, queued, gateway)
    scale: dict[str, Any] = field(default_factory=dict)
    reason: dict[float, str] = field(default_factory=dict)  # t -> substring of the reason


def run(sc: Scenario) -> list[Decision]:
    s = RevisionScaler(Scale(**sc.scale))
    events: list[tuple[float, int, Any]] = []
    for t, c, r, *src in sc.samples:
        events.append((t, 0, ("record", c, r, src[0] if src else "")))
    for pk in sc.pokes:
        t, queued, source = pk if isinstance(pk, tuple) else (pk, 0.0, "")
        events.append((t, 0, ("poke", queued, source)))
    events += [(t, 1, ("decide", i)) for i, (t, *_rest) in enumerate(sc.checks)]
    events.sort(key=lambda e: (e[0], e[1]))
    out: list[Decision] = []
    for t, _, ev in events:
        if ev[0] == "record":
            s.record(t, ev[1], ev[2], ev[3])
        elif ev[0] == "poke":
            s.poke(t, ev[1], ev[2])
        else:
            _, ready, desired, panic = sc.checks[ev[1]]
            d = s.decide(t, ready)
            where = f"{sc.name} @ t={t} ready={ready}: {d}"
            assert d.desired == desired, where
            if panic is not None:
                assert d.panic is panic, where
            if t in sc.reason:
                assert sc.reason[t] in d.reason, where
            out.append(d)
    return out


SCENARIOS = [
    # -- stable mode ---------------------------------------------------------------------
    Scenario(
        "steady load",
        samples=steady(0, 120, 50),
        checks=[(10.25, 5, 5, False), (60.25, 5, 5, False), (119.75, 5, 5, False)],
        reason={10.25: "stable: avg 50.0 in-flight over 60s / target 10 -> 5"},
    ),
    Scenario(
        "two gateways: the revision's load is their sum",
        samples=[(t, c, r, "gw-a") for t, c, r in steady(0, 20, 25)]
        + [(t + 0.1, c, r, "gw-b") for t, c, r in steady(0, 20, 25)],
        checks=[(19.75, 5, 5, False)],
    ),
    Scenario(
        "ramp: desired follows the stable average up, no panic",
        samples=[s for k in range(7) for s in steady(10 * k, 10 * k + 10, 100 + 10 * k)],
        checks=[
            (9.75, 10, 10, False),
            (19.75, 10, 11, False),  # avg 105
            (29.75, 11, 11, False),  # avg 110
            (39.75, 11, 12, False),  # avg 115
            (49.75, 12, 12, False),  # avg 120
            (59.75, 12, 13, False),  # avg 125
            (69.75, 13, 14, False),  # buckets 10..69: avg 135
        ],
    ),
    Scenario(
        "a revision that just came up is not averaged over empty time",
        samples=steady(0, 3, 50),
        checks=[(2.75, 5, 5, False)],
    ),
    # -- panic -------------------------------------------------------------------------
    Scenario(
        "burst -> panic, holds without scaling down, ends a full window after the trigger",
        samples=steady(0, 30, 10) + steady(30, 36, 100) + steady(36, 200, 10),
        checks=[
            (29.75, 1, 1, False),
            (35.75, 1, 10, True),  # 6 s avg 100 -> 10 >= 2 x 1; stable says only 3
            (40.75, 10, 10, True),  # burst gone: stable+rate limit would say 5, panic holds
            (60.75, 10, 10, True),
            (95.5, 10, 10, True),  # 59.75 s after the trigger
            (95.75, 10, 5, False),  # 60 s: panic over; down at most 2x
            (96.75, 5, 3, False),
            (97.75, 3, 2, False),
            (98.75, 2, 1, False),
            (99.75, 1, 1, False),
        ],
        reason={
            35.75: "panic: 6s avg 100.0 >= 2x ready 1 (needs 10) -> 10",
            40.75: "panic (holding",
            95.75: "(rate-limited from 1) -> 5",
        },
    ),
    Scenario(
        "a second burst re-arms the panic window",
        scale={"max": 100},
        samples=steady(0, 30, 10)
        + steady(30, 36, 100)
        + steady(36, 80, 10)
        + steady(80, 86, 300)
        + steady(86, 200, 10),
        checks=[
            (35.75, 1, 10, True),
            (85.75, 10, 30, True),  # 6 s avg 300 -> 30 >= 2 x 10
            (96.75, 30, 30, True),  # past the first trigger's window: still held
            (145.5, 30, 30, True),
            (145.75, 30, 15, False),
        ],
    ),
    Scenario(
        "at zero, a load one replica carries is a plain wake, not a panic",
        samples=steady(0, 3, 5),
        checks=[(2.75, 0, 1, False)],
    ),
    Scenario(
        "at zero, a load that needs two or more replicas panics (burst from zero)",
        samples=steady(0, 3, 50),
        checks=[(2.75, 0, 5, True), (3.75, 0, 5, True)],
    ),
    Scenario(
        "panic threshold: desired_panic 4 >= 2 x 2 ready panics",
        samples=steady(0, 10, 40),
        checks=[(9.75, 2, 4, True)],
    ),
    Scenario(
        "panic threshold: desired_panic 3 < 2 x 2 ready does not",
        samples=steady(0, 10, 30),
        checks=[(9.75, 2, 3, False)],
    ),
    # -- rate limits ---------------------------------------------------------------------
    Scenario(
        "scale-up limited to 1000x ready (1 ready)",
        scale={"target": 1, "max": 100_000},
        samples=steady(0, 10, 5000),
        checks=[(9.75, 1, 1000, True)],
        reason={9.75: "(rate-limited from 5000)"},
    ),
    Scenario(
        "scale-up limited to 1000x ready (2 ready)",
        scale={"target": 1, "max": 100_000},
        samples=steady(0, 10, 5000),
        checks=[(9.75, 2, 2000, True)],
    ),
    Scenario(
        "from zero the up limit is what is needed",
        scale={"target": 1, "max": 100_000},
        samples=steady(0, 10, 5000),
        checks=[(9.75, 0, 5000, True)],
    ),
    Scenario(
        "scale-down at most 2x per decision (ceil(ready / 2))",
        samples=steady(0, 100, 10),
        checks=[
            (9.75, 10, 5, False),
            (10.75, 5, 3, False),
            (11.75, 3, 2, False),
            (12.75, 2, 1, False),
            (13.75, 1, 1, False),
            (14.75, 9, 5, False),
        ],
    ),
    # -- bounds ---------------------------------------------------------------------------
    Scenario(
        "never above max",
        samples=steady(0, 10, 500),
        checks=[(9.75, 20, 20, True)],
        reason={9.75: "-> 20 (max 20)"},
    ),
    Scenario(
        "never above max, also from zero",
        samples=steady(0, 10, 500),
        checks=[(9.75, 0, 20, True)],
    ),
    Scenario(
        "min raises a low desired",
        scale={"min": 3},
        samples=steady(0, 10, 10),
        checks=[(9.75, 3, 3, False)],
        reason={9.75: "(min 3)"},
    ),
    Scenario(
        "min applies at zero with data",
        scale={"min": 2},
        samples=steady(0, 10, 0),
        checks=[(9.75, 0, 2, False)],
    ),
    Scenario(
        "max below min: max wins",
        scale={"min": 5, "max": 2},
        samples=steady(0, 10, 10),
        checks=[(9.75, 2, 2, False)],
    ),
    # -- idle and scale to zero ------------------------------------------------------------
    Scenario(
        "idle -> 0 exactly after idle, not before",
        samples=steady(0, 10, 5) + steady(10, 100, 0),  # last activity at 9.5
        checks=[(20.75, 1, 1, False), (39.25, 1, 1, False), (39.5, 1, 0, False)],
        reason={39.5: "idle 30s -> 0"},
    ),
    Scenario(
        "requests started count as activity",
        samples=steady(0, 10, 0, r=3) + steady(10, 100, 0),
        checks=[(39.25, 1, 1, False), (39.5, 1, 0, False)],
    ),
    Scenario(
        "idle counts from the latest activity",
        samples=steady(0, 10, 5) + steady(10, 20, 0) + [(20.5, 0.0, 1)] + steady(21, 100, 0),
        checks=[(39.5, 1, 1, False), (50.25, 1, 1, False), (50.5, 1, 0, False)],
    ),
    Scenario(
        "idle ends a panic",
        samples=steady(0, 6, 100) + steady(6, 100, 0),
        checks=[(5.75, 1, 10, True), (35.25, 10, 10, True), (35.5, 10, 0, False)],
    ),
    Scenario(
        "min > 0: never zero",
        scale={"min": 1},
        samples=steady(0, 10, 5) + steady(10, 200, 0),
        checks=[(39.5, 1, 1, False), (199.75, 1, 1, False)],
        reason={39.5: "idle 30s -> min 1"},
    ),
    Scenario(
        "zeros after traffic: down, then 0 once idle has passed",
        samples=steady(0, 30, 20) + steady(30, 200, 0),  # last activity at 29.5
        checks=[
            (29.75, 2, 2, False),
            (45.75, 2, 2, False),  # stable avg 600/46
            (59.25, 2, 2, False),  # 59.5 not in yet: stable avg 600/59 -> 2
            (59.5, 2, 0, False),  # idle: straight to 0, no 2x down limit on the last step
            (120.75, 0, 0, False),
        ],
    ),
    Scenario(
        "nothing ever happened and nothing runs: 0",
        samples=steady(0, 10, 0),
        checks=[(5.75, 0, 0, False)],
    ),
    Scenario(
        "a replica with no traffic ever goes after idle from when the scaler first saw it",
        samples=steady(100, 200, 0),  # first seen at 100.5
        checks=[(130.25, 1, 1, False), (130.5, 1, 0, False)],
    ),
    Scenario(
        "idle 0: zero as soon as no request is in flight",
        scale={"idle": 0},
        samples=[(0.5, 3.0, 1), (1.5, 0.0, 0)],
        checks=[(0.75, 1, 1, False), (1.75, 1, 0, False)],
    ),
    # -- missing data ---------------------------------------------------------------------
    Scenario(
        "no reports at all: no decision",
        checks=[(10.0, 1, None, False), (10.0, 0, None, False), (1000.0, 3, None, False)],
        reason={10.0: "no data"},
    ),
    Scenario(
        "gateways go silent mid-traffic: keep, never zero",
        samples=steady(0, 10, 5),  # then nothing
        checks=[(39.75, 1, 1, False), (68.75, 1, 1, False), (69.75, 1, None, False)],
    ),
    Scenario(
        "one gateway silent with requests in flight, another reports zeros: 1 until forgotten",
        samples=[(t, c, r, "gw-a") for t, c, r in steady(0, 10, 5)]
        + [(t + 0.1, c, r, "gw-b") for t, c, r in steady(0, 200, 0)],
        checks=[(39.75, 1, 1, False), (69.25, 1, 1, False), (69.75, 1, 0, False)],
    ),
    Scenario(
        "gateways report zeros, then go silent: the zeros were data",
        samples=steady(0, 10, 5) + steady(10, 20, 0),
        checks=[(39.5, 1, 0, False)],
    ),
    Scenario(
        "no data but ready outside the bounds: back inside",
        scale={"min": 2, "max": 4},
        checks=[(1.0, 0, 2, False), (2.0, 6, 4, False), (3.0, 3, None, False)],
    ),
    # -- poke -----------------------------------------------------------------------------
    Scenario(
        "poke at zero, no data yet -> 1",
        pokes=[100.0],
        checks=[(100.0, 0, 1, False), (100.5, 0, 1, False)],
        reason={100.0: "woken by a request"},
    ),
    Scenario(
        "poke at zero over stale zeros -> 1, then 0 after idle from the last activity",
        samples=steady(0, 100, 0) + [(100.5, 1.0, 1)] + steady(101, 200, 0),
        pokes=[100.25],
        checks=[
            (99.75, 0, 0, False),
            (100.25, 0, 1, False),
            (100.75, 0, 1, False),
            (130.25, 1, 1, False),
            (130.5, 1, 0, False),
        ],
    ),
    Scenario(
        "poke with idle 0: held at 1 until a report speaks for the request",
        scale={"idle": 0},
        samples=steady(0, 10, 0) + [(11.5, 1.0, 1), (12.5, 0.0, 0)],
        pokes=[10.25],
        checks=[
            (10.25, 0, 1, False),
            (11.0, 0, 1, False),
            (11.75, 1, 1, False),
            (12.75, 1, 0, False),
        ],
    ),
    Scenario(
        "short window: the panic window keeps two buckets, so a decision just after a second"
        " boundary (before that second's report) still sees the burst",
        scale={"window": 10},  # 10 % would be a single 1 s bucket
        samples=steady(0, 5, 0) + steady(5, 6, 60),
        checks=[(6.1, 1, 6, True)],
        reason={6.1: "panic: 2s avg 60.0 >= 2x ready 1 (needs 6)"},
    ),
    Scenario(
        "pokes carrying the queue at zero size a burst at once: 60 waiting / target 5 -> 12, panic",
        scale={"target": 5},
        pokes=[(100.0, 1, "gw"), (100.01, 2, "gw"), (100.02, 4, "gw"), (100.05, 60, "gw")],
        checks=[(100.0, 0, 1, False), (100.05, 0, 12, True)],
        reason={100.05: "panic: 6s avg 60.0 >= 2x ready 0 (needs 12)"},
    ),
    Scenario(
        "queued pokes from two gateways add up",
        scale={"target": 5},
        pokes=[(50.0, 20, "gw-a"), (50.1, 20, "gw-b")],
        checks=[(50.25, 0, 8, True)],
    ),
    Scenario(
        "a queued poke is a sample, not a verdict: the next report in its bucket replaces it",
        scale={"target": 5, "window": 10},
        pokes=[(20.1, 60, "gw")],
        samples=[(20.5, 5.0, 50, "gw")],
        checks=[(20.75, 0, 1, False)],
    ),
    Scenario(
        "a queue of 1 is a plain wake: 1 replica, no panic",
        pokes=[(7.0, 1, "gw")],
        checks=[(7.0, 0, 1, False), (7.5, 1, 1, False)],
    ),
    Scenario(
        "poke while held at zero by max 0: bounds win",
        scale={"max": 0},
        pokes=[5.0],
        checks=[(5.0, 0, 0, False)],
    ),
]


@pytest.mark.parametrize("sc", SCENARIOS, ids=[sc.name for sc in SCENARIOS])
def test_scenario(sc: Scenario) -> None:
    run(sc)


def test_observed_values_in_decision() -> None:
    s = RevisionScaler(Scale())
    for t, c, r in steady(0, 54, 10) + steady(54, 60, 40):
        s.record(t, c, r)
    d = s.decide(59.75, 2)
    assert d.stable == pytest.approx((54 * 10 + 6 * 40) / 60)
    assert d.panicked == pytest.approx(40.0)
    assert d.panic is True  # ceil(40 / 10) = 4 >= 2 x 2


def test_update_scale_max_lowered_clamps_at_once() -> None:
    s = RevisionScaler(Scale())
    for t, c, r in steady(0, 30, 100):
        s.record(t, c, r)
    assert s.decide(29.75, 10).desired == 10
    s.update_scale(Scale(max=4))
    d = s.decide(29.8, 10)
    assert d.desired == 4  # the 2x down limit (5) loses to max
    assert "(max 4)" in d.reason


def test_update_scale_target() -> None:
    s = RevisionScaler(Scale())
    for t, c, r in steady(0, 30, 50):
        s.record(t, c, r)
    assert s.decide(29.75, 5).desired == 5
    s.update_scale(Scale(target=5))
    assert s.decide(29.8, 5).desired == 10


def test_update_scale_window_resizes_windows() -> None:
    samples = steady(0, 50, 100) + steady(50, 60, 10)
    s = RevisionScaler(Scale())
    for t, c, r in samples:
        s.record(t, c, r)
    d = s.decide(59.75, 10)
    assert d.desired == 9 and d.stable == pytest.approx(85.0)  # (50*100 + 10*10) / 60
    s.update_scale(Scale(window=10))
    d = s.decide(59.75, 10)
    assert d.stable == pytest.approx(10.0)  # only the last 10 s
    assert d.panicked == pytest.approx(10.0)  # panic window is now 1 s
    assert d.desired == 5  # 1, limited to ceil(10 / 2)
    assert "over 10s" in d.reason


@pytest.mark.parametrize(
    "bad",
    [{"target": 0}, {"target": -1}, {"window": 0}, {"idle": -1}, {"min": -1}, {"max": -1}],
)
def test_invalid_scale_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RevisionScaler(Scale(**bad))
    s = RevisionScaler(Scale())
    with pytest.raises(ValueError):
        s.update_scale(Scale(**bad))


def test_hostile_samples_ignored() -> None:
    s = RevisionScaler(Scale())
    s.record(1.5, float("nan"), 0)
    s.record(float("inf"), 5.0, 0)
    assert s.decide(2.0, 1).desired is None
    s.record(2.5, -7.0, 0)  # negative in-flight is read as 0
    assert s.decide(2.75, 0).desired == 0


def test_panicking_property() -> None:
    s = RevisionScaler(Scale())
    for t, c, r in steady(0, 6, 100):
        s.record(t, c, r)
    assert not s.panicking
    s.decide(5.75, 1)
    assert s.panicking
    assert s.last_activity == 5.5


def test_panic_threshold_and_window_come_from_the_scale() -> None:
    """scale.panic_threshold / panic_window (Knative's panic-threshold-percentage and
    panic-window-percentage): the same burst panics at 200 % but not at 400 %, and a
    20 % panic window averages over 12 s instead of 6 s."""
    samples = steady(0, 54, 10) + steady(54, 60, 40)
    default = RevisionScaler(Scale())
    high = RevisionScaler(Scale(panic_threshold=400))
    wide = RevisionScaler(Scale(panic_window=20))
    for s in (default, high, wide):
        for t, c, r in samples:
            s.record(t, c, r)
    assert default.decide(59.75, 2).panic is True  # ceil(40 / 10) = 4 >= 2 x 2
    d = high.decide(59.75, 2)
    assert d.panic is False and d.panicked == pytest.approx(40.0)  # 4 < 4 x 2
    assert wide.decide(59.75, 2).panicked == pytest.approx((6 * 10 + 6 * 40) / 12)
