"""Rollout judgement as a table of synthetic numbers, the p95 estimate from latency
buckets, and the Rollouts shell over a real (in-memory) EmbeddedStore with a fake clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from torpor.api.app import ApiConfig, create_app
from torpor.controller.rollout import P95_FLOOR, Rollouts, StepStats, judge, quantile
from torpor.controller.traffic import start_rollout
from torpor.model import LATENCY_BUCKETS, Function, Revision, RolloutPolicy, Spec, TrafficTarget
from torpor.store.embedded import EmbeddedStore

NB = len(LATENCY_BUCKETS) + 1


def bucket_of(seconds: float) -> int:
    for i, b in enumerate(LATENCY_BUCKETS):
        if seconds <= b:
            return i
    return len(LATENCY_BUCKETS)


def stats(
    requests: int, errors: int = 0, at: float = 0.04, slow: int = 0, slow_at: float = 1.5
) -> StepStats:
    """``requests`` requests, ``slow`` of them at ``slow_at`` seconds, the rest at ``at``."""
    lat = [0] * NB
    lat[bucket_of(at)] += requests - slow
    lat[bucket_of(slow_at)] += slow
    return StepStats(requests=requests, errors=errors, latency=lat)


POLICY = RolloutPolicy(
    steps=[10, 50, 100], interval=30.0, max_error_ratio=0.05, max_p95_ratio=2.0, min_requests=20
)


@dataclass
class Row:
    name: str
    canary: StepStats
    stable: StepStats
    age: float
    action: str
    reason: str  # substring of the verdict's reason
    policy: RolloutPolicy = field(default_factory=lambda: POLICY)


ROWS = [
    Row("no canary requests yet", stats(0), stats(500), 100, "wait", "0/20 canary requests"),
    Row(
        "too few canary requests, even with errors",
        stats(19, errors=19),
        stats(500),
        100,
        "wait",
        "19/20",
    ),
    Row(
        "healthy but interval not over",
        stats(40),
        stats(400),
        10,
        "wait",
        "20s of the interval left",
    ),
    Row("healthy and interval over", stats(40), stats(400), 30, "advance", "5xx 0.0% of 40"),
    Row(
        "errors at the limit are healthy",
        stats(100, errors=5),
        stats(400),
        31,
        "advance",
        "5xx 5.0%",
    ),
    Row(
        "errors above the limit roll back at once",
        stats(100, errors=6),
        stats(400),
        1,
        "rollback",
        "5xx ratio 6.0% > 5.0% (6 of 100",
    ),
    Row(
        "30% failures roll back as soon as min_requests are in",
        stats(20, errors=6),
        stats(100),
        0.5,
        "rollback",
        "5xx ratio 30.0%",
    ),
    Row(
        "slow canary rolls back before the interval",
        stats(100, slow=10),
        stats(400),
        2,
        "rollback",
        "x stable p95",
    ),
    Row(
        "a few slow canary requests (under 5%) are fine",
        stats(100, slow=4),
        stats(400),
        30,
        "advance",
        "p95",
    ),
    Row(
        "slow stable and slow canary alike are fine",
        stats(100, at=1.5),
        stats(400, at=1.5),
        30,
        "advance",
        "",
    ),
    Row(
        "canary one bucket slower, within a ratio of 2.5",
        stats(100, at=0.08),
        stats(400, at=0.04),
        30,
        "advance",
        "",
        RolloutPolicy(max_p95_ratio=2.5, min_requests=20, interval=30),
    ),
    Row(
        "canary much slower than the ratio allows",
        stats(100, at=0.4),
        stats(400, at=0.04),
        30,
        "rollback",
        "p95 ",
    ),
    Row(
        "sub-floor latencies never breach",
        stats(100, at=0.009),
        stats(400, at=0.001),
        30,
        "advance",
        "",
    ),
    Row(
        "no stable baseline: no latency verdict, wait",
        stats(100, at=5.0),
        stats(5),
        30,
        "wait",
        "5/20 stable requests",
    ),
    Row(
        "no stable baseline but errors: roll back anyway",
        stats(100, errors=50),
        stats(0),
        1,
        "rollback",
        "5xx",
    ),
    Row(
        "cold canary: enough requests, too few timed",
        StepStats(40, 0, stats(5).latency),
        stats(400),
        30,
        "wait",
        "5/20 canary requests timed (warming up)",
    ),
    Row(
        "cold canary with errors rolls back",
        StepStats(40, 10, [0] * NB),
        stats(400),
        1,
        "rollback",
        "25.0%",
    ),
    Row(
        "min_requests 0 still needs one request",
        stats(0),
        stats(0),
        100,
        "wait",
        "0/1",
        RolloutPolicy(min_requests=0, interval=1),
    ),
    Row(
        "zero error budget: one 5xx rolls back",
        stats(20, errors=1),
        stats(100),
        0,
        "rollback",
        "5.0% > 0.0%",
        RolloutPolicy(max_error_ratio=0.0, min_requests=20),
    ),
    Row(
        "error budget 1.0 never rolls back on errors",
        stats(20, errors=20),
        stats(100),
        30,
        "advance",
        "100.0%",
        RolloutPolicy(max_error_ratio=1.0, min_requests=20, interval=30),
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_judge(row: Row) -> None:
    v = judge(row.policy, row.canary, row.stable, row.age)
    assert v.action == row.action, v.reason
    assert row.reason in v.reason


def test_judge_is_pure() -> None:
    c, s = stats(100, errors=1), stats(300)
    before = (c.requests, c.errors, list(c.latency), s.requests, list(s.latency))
    assert judge(POLICY, c, s, 40) == judge(POLICY, c, s, 40)
    assert before == (c.requests, c.errors, list(c.latency), s.requests, list(s.latency))


def test_quantile_from_buckets() -> None:
    assert quantile(0.95, [0] * NB) is None
    one = [0] * NB
    one[bucket_of(0.04)] = 100  # all in (0.025, 0.05]
    assert 0.025 < quantile(0.95, one) <= 0.05  # type: ignore[operator]
    assert quantile(0.95, one) == pytest.approx(0.025 + 0.025 * 0.95)
    mixed = [0] * NB
    mixed[0], mixed[bucket_of(0.2)] = 90, 10  # 90 fast, 10 in (0.1, 0.25]
    p95 = quantile(0.95, mixed)
    assert p95 == pytest.approx(0.1 + 0.15 * 0.5)
    assert quantile(0.5, mixed) == pytest.approx(0.005 * 50 / 90)
    inf = [0] * NB
    inf[-1] = 3
    assert quantile(0.95, inf) == LATENCY_BUCKETS[-1]
    # monotone in q
    qs = [quantile(q, mixed) for q in (0.1, 0.5, 0.9, 0.95, 0.99)]
    assert qs == sorted(qs)


def test_step_stats_add_and_ratio() -> None:
    s = StepStats()
    assert s.error_ratio == 0.0 and s.p95() is None
    s.add({"requests": 10, "errors": 2, "latency": [10] + [0] * (NB - 1)})
    s.add({"requests": 5, "errors": 0, "latency": [0, 5] + [0] * (NB - 2)})
    s.add({})  # a report without the fields adds nothing
    assert (s.requests, s.errors) == (15, 2)
    assert s.error_ratio == pytest.approx(2 / 15)
    assert s.latency[:2] == [10, 5]
    assert P95_FLOOR > 0


# -- the shell -------------------------------------------------------------------------------
def rev(n: int, name: str = "fn") -> Revision:
    return Revision(
        name=f"{name}-{n:05d}", function=name, number=n, spec=Spec(name=name), status="ready"
    )


def report(
    revisions: dict[str, tuple[int, int, float]],
    ready: int | dict[str, int] = 1,
    gateway: str = "gw-1",
) -> dict[str, object]:
    out = {}
    for name, (req, err, at) in revisions.items():
        lat = [0] * NB
        lat[bucket_of(at)] = req
        n = ready.get(name, 1) if isinstance(ready, dict) else ready
        out[name] = {
            "function": "fn",
            "requests": req,
            "errors": err,
            "latency": lat,
            "concurrency": 1.0,
            "ready": n,
            "queued": 0,
        }
    return {"gateway": gateway, "time": 0.0, "revisions": out}


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def setup(policy: RolloutPolicy, wall: Clock) -> tuple[EmbeddedStore, Rollouts]:
    store = EmbeddedStore()

    def create(cur: Function | None) -> Function:
        fn = Function(
            name="fn",
            revisions=[rev(1), rev(2)],
            traffic=[TrafficTarget("fn-00001", 100)],
            next_number=3,
        )
        start_rollout(fn, "fn-00002", policy, wall())
        return fn

    await store.update_function("fn", create)
    return store, Rollouts(store, clock=wall, wall=wall)


async def current(store: EmbeddedStore) -> Function:
    fn = await store.get_function("fn")
    assert fn is not None
    return fn


async def test_healthy_rollout_steps_then_promotes() -> None:
    wall = Clock()
    policy = RolloutPolicy(steps=[25, 50, 100], interval=5, min_requests=10)
    store, ro = await setup(policy, wall)
    fn = await current(store)
    assert [(t.revision, t.percent) for t in fn.traffic] == [("fn-00002", 25), ("fn-00001", 75)]
    await ro.reconcile(fn)  # first sight: measuring step 1
    ro.observe(report({"fn-00002": (12, 0, 0.04), "fn-00001": (36, 0, 0.04)}))  # warm-up: not timed
    ro.observe(report({"fn-00002": (12, 0, 0.04), "fn-00001": (36, 0, 0.04)}))
    await ro.reconcile(fn)
    assert (await current(store)).rollout.step == 0  # type: ignore[union-attr]  # interval not over
    wall.t += 5
    await ro.reconcile(fn)
    fn = await current(store)
    assert fn.rollout is not None and fn.rollout.step == 1 and fn.rollout.state == "running"
    assert fn.rollout.step_started == wall.t
    assert [(t.revision, t.percent) for t in fn.traffic] == [("fn-00002", 50), ("fn-00001", 50)]
    # the new step is measured afresh: the old numbers do not count
    wall.t += 5
    await ro.reconcile(fn)
    assert (await current(store)).rollout.step == 1  # type: ignore[union-attr]
    ro.observe(
        report({"fn-00002": (10, 0, 0.04), "fn-00001": (10, 0, 0.04), "other-00001": (99, 99, 9.0)})
    )
    await ro.reconcile(fn)
    fn = await current(store)
    assert fn.rollout is not None and fn.rollout.state == "promoted"
    assert [(t.revision, t.percent) for t in fn.traffic] == [("fn-00002", 100)]
    events = [e.message for e in await store.list_events("fn") if e.kind == "rollout"]
    assert any("step 2/3" in m for m in events) and "promoted fn-00002" in events[-1]
    assert ro.stats == {} and ro.watching == {}


async def test_failing_canary_rolls_back_before_the_interval() -> None:
    wall = Clock()
    store, ro = await setup(RolloutPolicy(steps=[25, 50, 100], interval=60, min_requests=20), wall)
    fn = await current(store)
    await ro.reconcile(fn)
    ro.observe(report({"fn-00002": (15, 5, 0.04), "fn-00001": (45, 0, 0.04)}))
    await ro.reconcile(fn)
    assert (await current(store)).rollout.state == "running"  # type: ignore[union-attr]  # 15 < min_requests
    ro.observe(report({"fn-00002": (10, 4, 0.04), "fn-00001": (30, 0, 0.04)}))
    await ro.reconcile(fn)
    fn = await current(store)
    assert fn.rollout is not None and fn.rollout.state == "rolled_back"
    assert "5xx ratio 36.0%" in fn.rollout.reason and "step 1" in fn.rollout.reason
    assert [(t.revision, t.percent) for t in fn.traffic] == [("fn-00001", 100)]
    last = (await store.list_events("fn"))[-1]
    assert (
        last.kind == "rollout"
        and "rolled back to fn-00001" in last.message
        and "5xx ratio" in last.message
    )


async def test_paused_rollout_waits_and_a_restart_measures_the_step_afresh() -> None:
    wall = Clock()
    store, ro = await setup(RolloutPolicy(steps=[25, 50, 100], interval=5, min_requests=10), wall)
    fn = await current(store)
    await ro.reconcile(fn)
    ro.observe(report({"fn-00002": (50, 0, 0.04), "fn-00001": (150, 0, 0.04)}))

    def pause(cur: Function | None) -> Function | None:
        assert cur is not None and cur.rollout is not None
        cur.rollout.state = "paused"
        return cur

    await store.update_function("fn", pause)
    wall.t += 100
    await ro.reconcile(await current(store))
    assert (await current(store)).rollout.step == 0  # type: ignore[union-attr]

    # a new controller (restart): nothing measured yet, so it waits even though the step is old
    def resume(cur: Function | None) -> Function | None:
        assert cur is not None and cur.rollout is not None
        cur.rollout.state = "running"
        return cur

    await store.update_function("fn", resume)
    fresh = Rollouts(store, clock=wall, wall=wall)
    await fresh.reconcile(await current(store))
    assert (await current(store)).rollout.step == 0  # type: ignore[union-attr]
    fresh.observe(report({"fn-00002": (10, 0, 0.04), "fn-00001": (30, 0, 0.04)}))
    await fresh.reconcile(await current(store))
    assert (await current(store)).rollout.step == 0  # type: ignore[union-attr]  # warming up: nothing timed
    fresh.observe(report({"fn-00002": (10, 0, 0.04), "fn-00001": (30, 0, 0.04)}))
    await fresh.reconcile(await current(store))
    assert (await current(store)).rollout.step == 1  # type: ignore[union-attr]  # step age was already past


async def test_a_rollout_changed_by_hand_is_left_alone() -> None:
    wall = Clock()
    store, ro = await setup(RolloutPolicy(steps=[25, 100], interval=0.1, min_requests=1), wall)
    stale = await current(store)
    await ro.reconcile(stale)

    def abort(cur: Function | None) -> Function | None:
        assert cur is not None and cur.rollout is not None
        cur.rollout.state, cur.traffic = "aborted", [TrafficTarget("fn-00001", 100)]
        return cur

    await store.update_function("fn", abort)
    ro.observe(report({"fn-00002": (10, 10, 0.04), "fn-00001": (30, 0, 0.04)}))
    await ro.reconcile(stale)  # the controller's copy still says running
    fn = await current(store)
    assert fn.rollout is not None and fn.rollout.state == "aborted"
    assert ro.watching == {}


async def test_cold_start_latency_is_not_judged_but_its_errors_are() -> None:
    wall = Clock()
    store, ro = await setup(
        RolloutPolicy(steps=[25, 100], interval=0, min_requests=10, max_p95_ratio=2), wall
    )
    fn = await current(store)
    await ro.reconcile(fn)
    # the canary wakes from zero: its first reports are slow, the stable one is warm
    ro.observe(report({"fn-00001": (30, 0, 0.04)}))
    ro.observe(report({"fn-00002": (10, 0, 2.0), "fn-00001": (30, 0, 0.04)}, ready={"fn-00002": 0}))
    ro.observe(
        report({"fn-00002": (10, 0, 0.9), "fn-00001": (30, 0, 0.04)})
    )  # became ready within this one
    assert ro.stats["fn-00002"].requests == 20 and ro.stats["fn-00002"].samples == 0
    await ro.reconcile(fn)
    assert ro.last["fn"].action == "wait" and "warming up" in ro.last["fn"].reason
    ro.observe(report({"fn-00002": (10, 0, 0.04), "fn-00001": (30, 0, 0.04)}))
    await ro.reconcile(fn)
    assert (await current(store)).rollout.state == "promoted"  # type: ignore[union-attr]
    # a canary that never becomes ready is rolled back on its 503/504s
    store, ro = await setup(RolloutPolicy(steps=[25, 100], interval=60, min_requests=10), wall)
    fn = await current(store)
    await ro.reconcile(fn)
    for _ in range(3):
        ro.observe(report({"fn-00002": (5, 5, 5.0)}, ready=0))
    await ro.reconcile(fn)
    fn = await current(store)
    assert (
        fn.rollout is not None
        and fn.rollout.state == "rolled_back"
        and "5xx ratio 100.0%" in fn.rollout.reason
    )


async def test_warmth_is_per_gateway() -> None:
    wall = Clock()
    store, ro = await setup(RolloutPolicy(steps=[25, 100], interval=0, min_requests=1), wall)
    await ro.reconcile(await current(store))
    ro.observe(report({"fn-00002": (1, 0, 0.04)}, gateway="a"))
    ro.observe(report({"fn-00002": (1, 0, 0.04)}, gateway="b"))
    assert ro.stats["fn-00002"].samples == 0
    ro.observe(report({"fn-00002": (1, 0, 0.04)}, gateway="a"))
    assert ro.stats["fn-00002"].samples == 1
    ro.observe(report({}, gateway="a"))  # no entry: a lost its replicas
    ro.observe(report({"fn-00002": (1, 0, 0.04)}, gateway="a"))
    ro.observe(report({"fn-00002": (1, 0, 0.04)}, gateway="b"))
    assert ro.stats["fn-00002"].samples == 2 and ro.stats["fn-00002"].requests == 5


# -- the API ----------------------------------------------------------------------------------
async def test_rollout_api_validates_and_acts(tmp_path: Path) -> None:
    store = EmbeddedStore()

    def create(cur: Function | None) -> Function:
        return Function(
            name="fn",
            revisions=[rev(1), rev(2), rev(3)],
            traffic=[TrafficTarget("fn-00001", 100)],
            next_number=4,
        )

    await store.update_function("fn", create)
    app = create_app(store, ApiConfig(state_dir=tmp_path, token="unit-test-token-0123456789"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://127.0.0.1",
        headers={"Authorization": "Bearer unit-test-token-0123456789"},
    ) as c:
        url = "/v1/functions/fn/rollout"
        assert (await c.get(url)).json() == {
            "rollout": None,
            "traffic": [{"revision": "fn-00001", "percent": 100, "tag": None}],
        }
        for body, field_name in [
            ({"to": "fn-00009"}, "to"),
            ({"to": "fn-00002", "steps": [10, 50]}, "steps"),
            ({"to": "fn-00002", "interval": "soon"}, "interval"),
            ({"to": "fn-00002", "interval": 0}, "interval"),
            ({"to": "fn-00002", "max_error_ratio": 2}, "max_error_ratio"),
            ({"to": "fn-00002", "max_p95_ratio": 0.5}, "max_p95_ratio"),
            ({"to": "fn-00002", "min_requests": -1}, "min_requests"),
            ({"to": "fn-00002", "min_requests": True}, "min_requests"),
            ({"to": "fn-00002", "color": "red"}, "color"),
        ]:
            r = await c.post(url, json=body)
            assert r.status_code == 400 and r.json()["field"] == field_name, (body, r.text)
        assert (
            await c.post(url, content=b"[1]", headers={"Content-Type": "application/json"})
        ).status_code == 400
        assert (
            await c.post(url, json={"to": "fn-00001"})
        ).status_code == 409  # already has all traffic
        assert (await c.post(url + "/pause")).status_code == 409  # nothing to pause
        r = await c.post(
            url,
            json={
                "to": "fn-00002",
                "steps": [20, 100],
                "interval": "1m30s",
                "min_requests": 7,
                "max_error_ratio": 0.1,
                "max_p95_ratio": 3,
            },
        )
        assert r.status_code == 201, r.text
        ro = r.json()["rollout"]
        assert (ro["to"], ro["stable"], ro["steps"], ro["state"]) == (
            "fn-00002",
            "fn-00001",
            [20, 100],
            "running",
        )
        assert ro["policy"] == {
            "steps": [20, 100],
            "interval": 90.0,
            "max_error_ratio": 0.1,
            "max_p95_ratio": 3.0,
            "min_requests": 7,
        }
        assert (await c.post(url, json={"to": "fn-00003"})).status_code == 409  # one at a time
        assert (await c.post(url + "/pause")).json()["rollout"]["state"] == "paused"
        assert (await c.post(url + "/pause")).status_code == 409
        before = (await c.get(url)).json()["rollout"]["step_started"]
        resumed = (await c.post(url + "/resume")).json()["rollout"]
        assert resumed["state"] == "running" and resumed["step_started"] >= before
        assert (await c.post(url + "/bogus")).status_code == 404
        r = await c.post(url + "/abort")
        assert r.json()["rollout"]["state"] == "aborted"
        assert r.json()["traffic"] == [{"revision": "fn-00001", "percent": 100, "tag": None}]
        r = await c.post("/v1/functions/fn/rollback")
        assert r.status_code == 409  # nothing older than fn-00001
        await c.post(url, json={"to": "fn-00003", "steps": [50, 100]})
        r = await c.post(url + "/promote")
        assert r.json()["traffic"] == [{"revision": "fn-00003", "percent": 100, "tag": None}]
        r = await c.post("/v1/functions/fn/rollback")
        assert r.status_code == 200 and r.json()["revision"] == "fn-00001"
        assert (await c.post("/v1/functions/nope/rollback")).status_code == 404
        kinds = [e.message for e in await store.list_events("fn") if e.kind == "rollout"]
        assert any("started" in m for m in kinds) and any(
            "rolled back to fn-00001 by hand" in m for m in kinds
        )
