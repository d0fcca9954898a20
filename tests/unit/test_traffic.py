"""Traffic tables (pure): rollout step math, routing a newly ready revision, tags,
rollback targets, and which retired revisions retention collects."""

from __future__ import annotations

import pytest

from torpor.controller.retention import collectable
from torpor.controller.traffic import (
    RolloutError,
    advance,
    apply_on_ready,
    canary_steps,
    main_revision,
    roll_back,
    rollback_target,
    split,
    start_rollout,
    step_traffic,
    step_weights,
    validate_steps,
)
from torpor.model import Function, OnReady, Revision, Rollout, RolloutPolicy, Spec, TrafficTarget
from torpor.model import TrafficTarget as T


def rev(
    n: int, status: str = "ready", on_ready: OnReady | None = None, tag: str | None = None
) -> Revision:
    r = Revision(
        name=f"fn-{n:05d}",
        function="fn",
        number=n,
        spec=Spec(name="fn"),
        on_ready=on_ready or OnReady(),
        tag=tag,
    )
    r.status = status  # type: ignore[assignment]
    return r


def fn_with(
    n: int, traffic: list[TrafficTarget], statuses: dict[int, str] | None = None
) -> Function:
    statuses = statuses or {}
    return Function(
        name="fn",
        revisions=[rev(i, statuses.get(i, "ready")) for i in range(1, n + 1)],
        traffic=traffic,
        next_number=n + 1,
    )


def table(fn: Function) -> list[tuple[str, int, str | None]]:
    return [(t.revision, t.percent, t.tag) for t in fn.traffic]


# -- step math ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "steps", [[10, 25, 50, 100], [1, 100], [50, 100], [100], [5, 10, 20, 40, 80, 99, 100]]
)
def test_each_step_splits_canary_and_stable_to_100(steps: list[int]) -> None:
    for pct in steps:
        w = dict(step_weights("fn-00002", "fn-00001", pct))
        assert w["fn-00002"] == pct and w["fn-00001"] == 100 - pct
        assert sum(w.values()) == 100
        tr = step_traffic([T("fn-00001", 100)], "fn-00002", "fn-00001", pct)
        assert sum(t.percent for t in tr) == 100
        assert all(t.percent > 0 or t.tag for t in tr)


def test_a_rollout_walks_its_steps_then_promotes() -> None:
    fn = fn_with(2, [T("fn-00001", 100)])
    ro = start_rollout(fn, "fn-00002", RolloutPolicy(), now=10.0, steps=[10, 25, 50, 100])
    seen = [table(fn)]
    while ro.state == "running":
        advance(fn, ro, now=20.0, reason="healthy")
        seen.append(table(fn))
    assert seen == [
        [("fn-00002", 10, None), ("fn-00001", 90, None)],
        [("fn-00002", 25, None), ("fn-00001", 75, None)],
        [("fn-00002", 50, None), ("fn-00001", 50, None)],
        [("fn-00002", 100, None)],
    ]
    assert ro.state == "promoted" and ro.step == 3 and fn.rollout is ro


def test_promote_and_rollback_keep_tags_at_zero() -> None:
    fn = fn_with(3, [T("fn-00001", 100, "stable"), T("fn-00003", 0, "next")])
    ro = start_rollout(
        fn, "fn-00002", RolloutPolicy(), now=0, steps=[25, 100], tags={"fn-00002": "canary"}
    )
    assert table(fn) == [
        ("fn-00002", 25, "canary"),
        ("fn-00001", 75, "stable"),
        ("fn-00003", 0, "next"),
    ]
    advance(fn, ro, now=1, reason="ok")
    assert table(fn) == [
        ("fn-00002", 100, "canary"),
        ("fn-00001", 0, "stable"),
        ("fn-00003", 0, "next"),
    ]
    fn2 = fn_with(3, [T("fn-00001", 100, "stable")])
    ro2 = start_rollout(
        fn2, "fn-00002", RolloutPolicy(), now=0, steps=[25, 100], tags={"fn-00002": "canary"}
    )
    roll_back(fn2, ro2, "5xx")
    assert ro2.state == "rolled_back" and ro2.reason == "5xx"
    assert table(fn2) == [("fn-00001", 100, "stable"), ("fn-00002", 0, "canary")]


def test_split_moves_an_explicit_tag_and_drops_untagged_zeros() -> None:
    cur = [T("fn-00001", 60), T("fn-00002", 40, "canary"), T("fn-00003", 0, "old")]
    out = split(cur, [("fn-00004", 100)], {"fn-00004": "canary"})
    assert [(t.revision, t.percent, t.tag) for t in out] == [
        ("fn-00004", 100, "canary"),
        ("fn-00003", 0, "old"),
    ]
    out = split(cur, [("fn-00001", 0), ("fn-00002", 100)])
    assert [(t.revision, t.percent, t.tag) for t in out] == [
        ("fn-00002", 100, "canary"),
        ("fn-00003", 0, "old"),
    ]


def test_start_rollout_refusals_and_stable_choice() -> None:
    fn = fn_with(3, [T("fn-00001", 30), T("fn-00002", 70)], statuses={3: "building"})
    with pytest.raises(RolloutError, match="not ready"):
        start_rollout(fn, "fn-00003", RolloutPolicy(), now=0)
    with pytest.raises(RolloutError, match="no revision"):
        start_rollout(fn, "fn-00009", RolloutPolicy(), now=0)
    fn.revisions[2].status = "ready"
    with pytest.raises(RolloutError, match="steps"):
        start_rollout(fn, "fn-00003", RolloutPolicy(), now=0, steps=[10, 50])
    ro = start_rollout(fn, "fn-00003", RolloutPolicy(), now=0, steps=[10, 100])
    assert ro.stable == "fn-00002"  # the one with the most traffic
    assert table(fn) == [("fn-00003", 10, None), ("fn-00002", 90, None)]
    alone = fn_with(1, [T("fn-00001", 100)])
    with pytest.raises(RolloutError, match="nothing to replace"):
        start_rollout(alone, "fn-00001", RolloutPolicy(), now=0)


def test_a_new_rollout_supersedes_a_running_one_and_keeps_its_stable() -> None:
    fn = fn_with(3, [T("fn-00001", 100)])
    first = start_rollout(fn, "fn-00002", RolloutPolicy(), now=0, steps=[50, 100])
    assert table(fn) == [("fn-00002", 50, None), ("fn-00001", 50, None)]
    second = start_rollout(fn, "fn-00003", RolloutPolicy(), now=1, steps=[10, 100])
    assert first.state == "aborted" and "superseded" in first.reason
    assert second.stable == "fn-00001" and fn.rollout is second
    assert table(fn) == [("fn-00003", 10, None), ("fn-00001", 90, None)]


def test_a_first_step_of_100_promotes_at_once() -> None:
    fn = fn_with(2, [T("fn-00001", 100)])
    ro = start_rollout(fn, "fn-00002", RolloutPolicy(), now=0, steps=[100])
    assert ro.state == "promoted" and table(fn) == [("fn-00002", 100, None)]


@pytest.mark.parametrize(
    ("steps", "ok"),
    [
        ([10, 25, 50, 100], True),
        ([100], True),
        ([1, 2, 3, 100], True),
        ([], False),
        ([50, 25, 100], False),
        ([10, 10, 100], False),
        ([0, 100], False),
        ([10, 50], False),
        ([10, 101], False),
        ([10.5, 100], False),
        ([True, 100], False),
        ("10,100", False),
    ],
)
def test_validate_steps(steps: object, ok: bool) -> None:
    assert (validate_steps(steps) is None) == ok


def test_canary_steps() -> None:
    assert canary_steps(10, [10, 25, 50, 100]) == [10, 25, 50, 100]
    assert canary_steps(30, [10, 25, 50, 100]) == [30, 50, 100]
    assert canary_steps(99, [10, 25, 50, 100]) == [99, 100]
    assert canary_steps(5, [10, 25, 50, 100]) == [5, 10, 25, 50, 100]


# -- apply_on_ready -------------------------------------------------------------------------
def test_first_revision_takes_all_traffic_whatever_it_asked() -> None:
    for intent in (OnReady(), OnReady("none"), OnReady.canary(10)):
        fn = Function(name="fn", revisions=[rev(1, on_ready=intent)])
        apply_on_ready(fn, fn.revisions[0], now=0)
        assert table(fn) == [("fn-00001", 100, None)] and fn.rollout is None


def test_promote_keeps_tags_and_supersedes_a_rollout() -> None:
    fn = fn_with(3, [T("fn-00001", 100, "old")])
    start_rollout(fn, "fn-00002", RolloutPolicy(), now=0, steps=[50, 100])
    new = fn.revisions[2]
    new.tag = "v3"
    apply_on_ready(fn, new, now=1)
    assert table(fn) == [("fn-00003", 100, "v3"), ("fn-00001", 0, "old")]
    assert fn.rollout is not None and fn.rollout.state == "aborted"


def test_canary_deploy_starts_a_rollout_from_its_policy() -> None:
    fn = fn_with(2, [T("fn-00001", 100)])
    new = fn.revisions[1]
    new.on_ready, new.tag = OnReady.canary(20), "canary"
    new.spec.rollout = RolloutPolicy(steps=[10, 25, 50, 100], interval=7, min_requests=3)
    apply_on_ready(fn, new, now=123.0)
    ro = fn.rollout
    assert ro is not None and ro.state == "running" and ro.step == 0 and ro.step_started == 123.0
    assert (ro.to, ro.stable, ro.steps) == ("fn-00002", "fn-00001", [20, 25, 50, 100])
    assert (
        ro.policy.interval == 7
        and ro.policy.min_requests == 3
        and ro.policy.steps == [20, 25, 50, 100]
    )
    assert table(fn) == [("fn-00002", 20, "canary"), ("fn-00001", 80, None)]
    # the rollout round-trips through the store's JSON
    again = Function.from_dict(fn.to_dict())
    assert again.rollout == ro


def test_no_traffic_deploy_only_gets_its_tag() -> None:
    fn = fn_with(2, [T("fn-00001", 100, "t")])
    new = fn.revisions[1]
    new.on_ready = OnReady("none")
    apply_on_ready(fn, new, now=0)
    assert table(fn) == [("fn-00001", 100, "t")]
    new.tag = "t"  # takes the tag over
    apply_on_ready(fn, new, now=0)
    assert table(fn) == [("fn-00001", 100, None), ("fn-00002", 0, "t")]


# -- rollback targets -------------------------------------------------------------------------
def test_rollback_target() -> None:
    fn = fn_with(3, [T("fn-00003", 100)])
    assert rollback_target(fn) == "fn-00002"
    fn.revisions[1].status = "failed"
    assert rollback_target(fn) == "fn-00001"
    fn = fn_with(3, [T("fn-00001", 100)])
    ro = start_rollout(fn, "fn-00003", RolloutPolicy(), now=0, steps=[10, 100])
    assert rollback_target(fn) == "fn-00001"  # running: its stable
    advance(fn, ro, now=1, reason="ok")
    assert (
        ro.state == "promoted" and rollback_target(fn) == "fn-00001"
    )  # promoted: still its stable
    assert rollback_target(fn_with(1, [T("fn-00001", 100)])) is None
    assert main_revision(fn_with(2, [T("fn-00001", 50), T("fn-00002", 50)])) == "fn-00002"


# -- retention ----------------------------------------------------------------------------------
def test_collectable_keeps_routed_latest_rollout_and_newest_retired() -> None:
    fn = fn_with(9, [T("fn-00008", 100), T("fn-00002", 0, "pinned")])
    # routed: 8 (traffic), 2 (tag); latest: 9; retired: 1, 3, 4, 5, 6, 7
    assert collectable(fn, keep=5) == ["fn-00001"]
    assert collectable(fn, keep=2) == ["fn-00001", "fn-00003", "fn-00004", "fn-00005"]
    assert collectable(fn, keep=0) == [
        "fn-00001",
        "fn-00003",
        "fn-00004",
        "fn-00005",
        "fn-00006",
        "fn-00007",
    ]
    assert collectable(fn, keep=10) == []


def test_collectable_spares_a_running_rollout_and_builds() -> None:
    fn = fn_with(6, [T("fn-00005", 100)], statuses={3: "building", 4: "failed"})
    fn.rollout = Rollout(to="fn-00002", stable="fn-00001", steps=[10, 100], state="paused")
    # routed 5, latest 6, rollout 1+2, building 3: only the failed 4 is retired
    assert collectable(fn, keep=0) == ["fn-00004"]
    fn.rollout.state = "rolled_back"
    assert collectable(fn, keep=0) == ["fn-00001", "fn-00002", "fn-00004"]
    assert collectable(fn, keep=1) == ["fn-00001", "fn-00002"]


def test_collectable_never_takes_the_only_revision() -> None:
    fn = Function(name="fn", revisions=[rev(1)])
    assert collectable(fn, keep=0) == []
