"""Pure parts of the gateway: weighted slots, the route table, the balancer, the activator."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from torpor.gateway.activator import Activator, QueueFull
from torpor.gateway.balancer import Backend, Balancer
from torpor.gateway.routes import RouteTable, weighted_slots
from torpor.gateway.upstream import Pools
from torpor.model import Function, Replica, Revision, ScaleOverride, Spec, TrafficTarget


@pytest.mark.parametrize(
    "weights",
    [
        [("a", 90), ("b", 10)],
        [("a", 50), ("b", 50)],
        [("a", 1), ("b", 99)],
        [("a", 33), ("b", 33), ("c", 34)],
        [("a", 100)],
    ],
)
def test_weighted_slots_are_exact_and_interleaved(weights: list[tuple[str, int]]) -> None:
    slots = weighted_slots(weights)
    assert len(slots) == 100
    assert Counter(slots) == {n: w for n, w in weights}
    # interleaved: in any window of 20 slots a 50% revision gets 10 (+-1)
    if dict(weights).get("a") == 50:
        for i in range(0, 80):
            assert 9 <= slots[i : i + 20].count("a") <= 11


def test_zero_weights_take_no_slot() -> None:
    assert Counter(weighted_slots([("a", 100), ("b", 0)])) == {"a": 100}


def _fn(traffic: list[TrafficTarget], n: int = 2, scale: ScaleOverride | None = None) -> Function:
    revs = [
        Revision(name=f"f-{i:05d}", function="f", number=i, spec=Spec(name="f"), status="ready")
        for i in range(1, n + 1)
    ]
    return Function(name="f", revisions=revs, traffic=traffic, scale=scale or ScaleOverride())


def _ready(rev: str, i: int) -> Replica:
    return Replica(
        name=f"{rev}-r{i}",
        function="f",
        revision=rev,
        state="ready",
        endpoint=f"127.0.0.1:{9000 + i}",
    )


def test_route_table_split_tags_and_backends() -> None:
    pokes: list[tuple[str, str]] = []
    table = RouteTable(Pools(), lambda f, r, q: pokes.append((f, r)))
    fn = _fn([TrafficTarget("f-00001", 90), TrafficTarget("f-00002", 10, "canary")])
    table.apply(
        "f",
        fn,
        [
            _ready("f-00001", 1),
            _ready("f-00002", 2),
            Replica(name="x", function="f", revision="f-00001", state="starting"),
        ],
    )
    fr, rr = table.hosts["f"]
    assert rr is None
    picks = Counter(fr.pick().name for _ in range(10_000))  # type: ignore[union-attr]
    assert picks == {"f-00001": 9000, "f-00002": 1000}
    _, tagged = table.hosts["canary-f"]
    assert tagged is not None and tagged.name == "f-00002"
    assert [b.name for b in table.revisions["f-00001"].balancer.backends] == ["f-00001-r1"]
    # a replica leaves: its endpoint is returned for the pool to be dropped
    dropped = table.apply("f", fn, [_ready("f-00002", 2)])
    assert dropped == ["127.0.0.1:9001"]
    # held at zero by hand
    table.apply("f", _fn([TrafficTarget("f-00001", 100)], scale=ScaleOverride(min=0, max=0)), [])
    assert table.revisions["f-00001"].held_at_zero
    assert "canary-f" not in table.hosts and "f-00002" not in table.revisions
    # deleted
    table.apply("f", None, [])
    assert "f" not in table.hosts and not table.revisions


def _backend(name: str) -> Backend:
    return Backend(name, f"{name}:1", Pools().get("127.0.0.1:1"))


def test_balancer_least_in_flight_and_hard_limit() -> None:
    bal = Balancer(limit=2)
    a, b = _backend("a"), _backend("b")
    bal.backends = [a, b]
    got = [bal.pick() for _ in range(4)]
    assert [x.name for x in got if x] == ["a", "b", "a", "b"]
    assert bal.pick() is None  # both at the limit
    unlimited = Balancer()
    unlimited.backends = [a]
    assert unlimited.pick() is a and a.in_flight == 3


async def test_activator_queues_pokes_and_hands_out_in_order() -> None:
    bal = Balancer(limit=1)
    pokes: list[int] = []
    act = Activator(bal, pokes.append, limit=3)
    waiters = [asyncio.create_task(act.wait(5)) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert len(act) == 3 and pokes == [1, 2]  # with the queue length; not one per request
    with pytest.raises(QueueFull):
        await act.wait(5)
    a = _backend("a")
    bal.backends = [a]
    act.dispatch()  # a replica became ready: one slot, first waiter gets it
    await asyncio.sleep(0.01)
    assert waiters[0].done() and not waiters[1].done()
    act.release(await waiters[0])  # its request finished: the slot moves on
    await asyncio.sleep(0.01)
    assert waiters[1].done()
    act.release(await waiters[1])
    act.release(await waiters[2])
    assert a.in_flight == 0 and len(act) == 0


async def test_activator_pokes_again_each_time_the_queue_doubles() -> None:
    pokes: list[int] = []
    act = Activator(Balancer(), pokes.append, limit=1000)
    waiters = [asyncio.create_task(act.wait(5)) for _ in range(100)]
    await asyncio.sleep(0.01)
    assert pokes == [1, 2, 4, 8, 16, 32, 64]  # 7 pokes for 100 requests, sized as they grow
    act.fail_all(LookupError("done"))
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_activator_times_out_and_fails_all() -> None:
    act = Activator(Balancer(), lambda _n: None)
    with pytest.raises(TimeoutError):
        await act.wait(0.05)
    assert len(act) == 0
    task = asyncio.create_task(act.wait(5))
    await asyncio.sleep(0.01)
    act.fail_all(LookupError("gone"))
    with pytest.raises(LookupError):
        await task


def test_sampler_sends_one_trailing_zero_report_after_a_revision_goes_quiet() -> None:
    from torpor.gateway.stats import Sampler

    table = RouteTable(Pools(), lambda f, r: None)
    fn = _fn([TrafficTarget("f-00001", 100)], n=1)
    table.apply("f", fn, [_ready("f-00001", 1)])
    sampler = Sampler(table)
    first = sampler.collect({"f-00001": 30.0}, 10)  # 3 in flight on average
    assert first["f-00001"]["concurrency"] == 3.0
    table.apply("f", fn, [])  # the replica went away within the report period
    trailing = sampler.collect({}, 10)
    assert trailing["f-00001"]["concurrency"] == 0.0 and trailing["f-00001"]["ready"] == 0
    assert "f-00001" not in sampler.collect({}, 10)  # then silence: no report for an idle revision


def test_sampler_counts_a_revision_routed_again_from_zero() -> None:
    """A revision that leaves the traffic and comes back within one report period has
    new counters: its next report counts them, never a negative difference."""
    from torpor.gateway.stats import Sampler
    from torpor.messages import parse_stats

    table = RouteTable(Pools(), lambda f, r, q: None)
    both = _fn([TrafficTarget("f-00001", 50), TrafficTarget("f-00002", 50)])
    table.apply("f", both, [_ready("f-00001", 1), _ready("f-00002", 2)])
    sampler = Sampler(table)
    for _ in range(5):
        table.revisions["f-00002"].stats.observe(503, 0.02)
    assert sampler.collect({}, 10)["f-00002"]["requests"] == 5
    table.apply("f", _fn([TrafficTarget("f-00001", 100)]), [_ready("f-00001", 1)])  # rollback
    table.apply("f", both, [_ready("f-00001", 1), _ready("f-00002", 2)])  # and again
    table.revisions["f-00002"].stats.observe(200, 0.02)
    entry = sampler.collect({}, 10)["f-00002"]
    assert (entry["requests"], entry["errors"], sum(entry["latency"])) == (1, 0, 1)
    parsed = parse_stats({"gateway": "g", "revisions": {"f-00002": entry}})
    assert parsed is not None and "f-00002" in parsed["revisions"]
