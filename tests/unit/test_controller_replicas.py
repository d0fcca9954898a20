"""The replica lifecycle of a controller, with no subprocess: the embedded store in
memory, an engine in memory (``fakes.FakeDriver``: readiness is its word, no replica is
ever connected to) and a clock that moves only when the test moves it. Passes are run
by the test (``reconcile()``), so every step is where the test puts it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from fakes import Clock, FakeDriver, PausableFakeDriver

from torpor.controller.reconcile import HEAD_START, Controller, Settings
from torpor.drivers.base import Running
from torpor.model import Function, Revision, Scale, ScaleOverride, Spec, TrafficTarget
from torpor.store.embedded import EmbeddedStore

REV = "hello-00001"


def _function(scale: ScaleOverride, idle: float = 30.0) -> Function:
    rev = Revision(
        name=REV,
        function="hello",
        number=1,
        spec=Spec(name="hello", scale=Scale(idle=idle)),
        status="ready",
        image="img",
    )
    return Function(name="hello", revisions=[rev], traffic=[TrafficTarget(REV, 100)], scale=scale)


async def _controller(
    driver: FakeDriver, clock: Clock, fn: Function, **settings: float
) -> tuple[EmbeddedStore, Controller]:
    store = EmbeddedStore(None)
    await store.update_function(fn.name, lambda _: fn)
    ctl = Controller(store, driver, settings=Settings(**settings), clock=clock)  # type: ignore[arg-type]
    ctl.functions = {fn.name: fn}
    ctl.synced.set()  # as start() does once it adopted what runs (nothing here)
    return store, ctl


async def _until(pred: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not in time: {what}")
        await asyncio.sleep(0.005)


async def _settle(ctl: Controller, pred: Callable[[], object], what: str = "") -> None:
    """Run passes (at the clock's present time) until ``pred`` holds."""
    deadline = time.monotonic() + 5.0
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"the controller did not get there: {what}")
        await ctl.reconcile()
        await asyncio.sleep(0.005)


async def _messages(store: EmbeddedStore, kind: str = "replica") -> list[str]:
    return [e.message for e in await store.list_events("hello", 500) if e.kind == kind]


def _state(ctl: Controller, replica: str) -> str | None:
    tr = ctl.tracked.get(replica)
    return tr.replica.state if tr else None


def _ready(ctl: Controller) -> list[str]:
    return [n for n, t in ctl.tracked.items() if t.replica.state == "ready"]


@pytest.mark.parametrize(
    ("base", "cap", "delays"),
    [
        (0.5, 30.0, [0.5, 1.0, 2.0, 4.0, 8.0]),  # the defaults: doubling from 0.5 s
        (0.5, 3.0, [0.5, 1.0, 2.0, 3.0, 3.0]),  # capped at backoff_max
    ],
)
async def test_a_crash_looping_revision_backs_off_doubling_each_time(
    base: float, cap: float, delays: list[float]
) -> None:
    driver, clock = FakeDriver(), Clock()
    driver.broken[REV] = "image not found"
    store, ctl = await _controller(
        driver, clock, _function(ScaleOverride(min=1)), backoff_base=base, backoff_max=cap
    )
    for i, delay in enumerate(delays):
        n = i + 1

        def started_n(n: int = n) -> bool:
            return len(driver.started()) == n

        def failed_n(n: int = n) -> bool:
            return ctl.revs[REV].failures == n and not ctl.tracked

        await _settle(ctl, started_n, f"start {n}")
        await _until(failed_n, what="failed")
        failed_at = clock.now
        clock.now = failed_at + delay - 0.01  # just before the backoff ends: no start
        for _ in range(3):
            await ctl.reconcile()
            assert not ctl.tracked, f"started again before {delay}s"  # a start is tracked at once
        assert len(driver.started()) == i + 1
        clock.now = failed_at + delay
    said = [m.split("next start in ")[1].split(":")[0] for m in await _messages(store)]
    assert said == [f"{d:g}s" for d in delays]
    assert all("start failed: image not found" in m for m in await _messages(store))
    await ctl.stop()
    await store.close()


async def test_a_replica_that_crashes_after_ready_backs_off_and_ten_ready_seconds_forgive() -> None:
    driver, clock = FakeDriver(), Clock()
    store, ctl = await _controller(driver, clock, _function(ScaleOverride(min=1)))

    async def crash_and_restart(expect_delay: float) -> None:
        (name,) = _ready(ctl)
        driver.crash(name, code=3)
        clock.now += 0.3  # a new listing (one is reused for 0.2 s)
        await _settle(ctl, lambda: name not in ctl.tracked, "the crash seen")
        assert ctl.revs[REV].next_start == pytest.approx(clock.now + expect_delay)
        clock.now += expect_delay
        await _settle(ctl, lambda: len(_ready(ctl)) == 1, "restarted")

    await _settle(ctl, lambda: len(_ready(ctl)) == 1, "first ready")
    await crash_and_restart(0.5)
    await crash_and_restart(1.0)
    clock.now += 10.5  # ready for more than 10 s: the failures are forgotten
    await ctl.reconcile()
    assert ctl.revs[REV].failures == 0
    await crash_and_restart(0.5)
    exits = [m for m in await _messages(store) if "exited (code 3)" in m]
    assert [m.split("next start in ")[1] for m in exits] == ["0.5s", "1s", "0.5s"]
    await ctl.stop()
    await store.close()


async def test_from_zero_the_first_replica_starts_alone_until_it_is_ready() -> None:
    driver, clock = FakeDriver(), Clock()
    driver.auto_ready = False
    store, ctl = await _controller(driver, clock, _function(ScaleOverride(min=3, max=3)))
    await _settle(ctl, lambda: driver.started(), "a start")
    (first,) = driver.started()
    await _until(lambda: ctl.tracked[first].running is not None, what="running")
    for _ in range(5):  # more passes, same time: the others wait
        await ctl.reconcile()
        assert list(ctl.tracked) == [first]  # a start is tracked as soon as it is decided
    driver.ready.add(first)
    await _until(lambda: _state(ctl, first) == "ready", what="first ready")
    await ctl.reconcile()
    assert len(ctl.tracked) == 3  # ready sooner than HEAD_START: the rest follow at once
    await _until(lambda: len(driver.started()) == 3, what="their starts")
    await ctl.stop()
    await store.close()


async def test_a_first_replica_ready_wakes_the_loop_for_the_ones_held_back() -> None:
    """The loop's next pass comes at once, not at the HEAD_START timer (a Docker pool
    member is ready in tens of ms; a burst's other replicas must not wait 0.5 s)."""
    driver, clock = FakeDriver(), Clock()
    driver.auto_ready = False
    store, ctl = await _controller(driver, clock, _function(ScaleOverride(min=3, max=3)))
    await _settle(ctl, lambda: driver.started(), "a start")
    (first,) = driver.started()
    await _until(lambda: ctl.tracked[first].running is not None, what="running")
    ctl._wake.clear()  # what the loop does before each pass
    driver.ready.add(first)
    await _until(lambda: _state(ctl, first) == "ready", what="first ready")
    assert ctl._wake.is_set()
    await ctl.stop()
    await store.close()


async def test_the_head_start_ends_after_HEAD_START_s_of_a_running_first_replica() -> None:
    driver, clock = FakeDriver(), Clock()
    driver.auto_ready = False
    driver.hold_starts = asyncio.Event()
    store, ctl = await _controller(driver, clock, _function(ScaleOverride(min=3, max=3)))
    await _settle(ctl, lambda: driver.started(), "a start")
    clock.now += 10 * HEAD_START  # still in the driver's start: no head start clock yet
    await ctl.reconcile()
    assert len(ctl.tracked) == 1
    driver.hold_starts.set()
    (first,) = driver.started()
    await _until(lambda: ctl.tracked[first].running is not None, what="running")
    clock.now += HEAD_START - 0.01
    await ctl.reconcile()
    assert len(ctl.tracked) == 1
    clock.now += 0.01
    await ctl.reconcile()
    assert len(ctl.tracked) == 3
    await _until(lambda: len(driver.started()) == 3, what="their starts")
    assert _state(ctl, first) == "starting"  # never ready: the head start ran out
    await ctl.stop()
    await store.close()


async def test_a_listing_begun_before_a_start_does_not_read_the_new_replica_as_vanished() -> None:
    driver, clock = FakeDriver(), Clock()
    store, ctl = await _controller(driver, clock, _function(ScaleOverride(min=1, max=2)))
    await _settle(ctl, lambda: len(_ready(ctl)) == 1, "one ready")
    ctl.functions = {"hello": _function(ScaleOverride(min=2, max=2))}
    driver.auto_ready, driver.hold_starts = False, asyncio.Event()
    clock.now += 1
    await _settle(ctl, lambda: len(driver.started()) == 2, "the second start")
    second = driver.started()[1]

    gate = driver.hold_next_list()  # a pass lists the engine, before the second replica runs
    lists = driver.lists
    clock.now += 1
    slow_pass = asyncio.create_task(ctl.reconcile())
    await _until(lambda: driver.lists == lists + 1, what="the held listing begun")
    clock.now += 1
    driver.hold_starts.set()  # the start returns while that listing is still in flight
    await _until(lambda: ctl.tracked[second].running is not None, what="second running")
    clock.now += 0.3  # its readiness wait asks whether it is still alive
    await _until(lambda: driver.lists == lists + 2, what="a listing of its own")
    driver.ready.add(second)
    await _until(lambda: _state(ctl, second) == "ready", what="second ready")
    gate.set()  # the old listing (without the second replica) comes back now
    await slow_pass
    assert sorted(_ready(ctl)) == sorted(driver.started())
    assert ("stop", second) not in driver.actions
    assert not [m for m in await _messages(store) if "vanished" in m or "exited" in m]
    await ctl.stop()
    await store.close()


async def test_scale_down_drains_the_newest_ready_replica_out_of_rotation_first() -> None:
    store_states: list[str] = []

    class Watching(FakeDriver):
        async def stop(self, running: Running, grace: float = 10.0) -> None:
            reps = {r.name: r.state for r in await store.list_replicas("hello")}
            store_states.append(reps.get(running.replica, "absent"))
            await super().stop(running, grace)

    driver, clock = Watching(), Clock()
    store, ctl = await _controller(
        driver, clock, _function(ScaleOverride(min=2, max=2)), drain_grace=45.0
    )
    await _settle(ctl, lambda: len(_ready(ctl)) == 2, "two ready")
    older, newer = sorted(ctl.tracked, key=lambda n: ctl.tracked[n].replica.started)
    ctl.functions = {"hello": _function(ScaleOverride(min=1, max=1))}
    await _settle(ctl, lambda: newer not in ctl.tracked, "drained")
    assert driver.stops == [(newer, 45.0)]  # the drain grace (> the revision's 30 s timeout)
    assert store_states == ["draining"]  # gateways saw it leave rotation before it stopped
    assert _ready(ctl) == [older] and set(driver.running) == {older}
    assert {r.name for r in await store.list_replicas("hello")} == {older}
    assert f"{newer} stopped: scale down to 1" in await _messages(store)
    await ctl.stop()
    await store.close()


async def test_scale_down_stops_a_replica_still_starting_before_a_ready_one() -> None:
    driver, clock = FakeDriver(), Clock()
    store, ctl = await _controller(driver, clock, _function(ScaleOverride(min=1, max=2)))
    await _settle(ctl, lambda: len(_ready(ctl)) == 1, "one ready")
    (ready,) = _ready(ctl)
    driver.auto_ready = False
    ctl.functions = {"hello": _function(ScaleOverride(min=2, max=2))}
    await _settle(ctl, lambda: len(driver.started()) == 2, "a second start")
    starting = driver.started()[1]
    await _until(lambda: ctl.tracked[starting].running is not None, what="running")
    ctl.functions = {"hello": _function(ScaleOverride(min=1, max=1))}
    await _settle(ctl, lambda: starting not in ctl.tracked, "drained")
    assert driver.stops == [(starting, 1.0)]  # never served: no drain grace
    assert _ready(ctl) == [ready]
    await ctl.stop()
    await store.close()


async def test_an_idle_replica_is_paused_woken_by_a_poke_and_stopped_after_pause_for() -> None:
    driver, clock = PausableFakeDriver(), Clock()
    store, ctl = await _controller(
        driver, clock, _function(ScaleOverride(min=0), idle=5.0), pause_for=30.0
    )
    quiet = {"gateway": "g", "revisions": {REV: {"concurrency": 0.0, "requests": 0}}}

    def poke() -> None:
        ctl._on_poke({"function": "hello", "revision": REV, "queued": 1, "gateway": "g"})

    async def go_idle(name: str) -> None:
        ctl._on_stats(quiet)  # the gateway's report after the wake: nothing in flight
        clock.now += 6.0  # past scale.idle
        ctl._on_stats(quiet)
        await _settle(ctl, lambda: name in ctl.paused, "paused")

    poke()
    await _settle(ctl, lambda: len(_ready(ctl)) == 1, "woken")
    (name,) = _ready(ctl)
    await go_idle(name)
    assert driver.paused == {name} and name in driver.running  # frozen, not stopped
    assert ("stop", name) not in driver.actions
    assert await store.list_replicas("hello") == []  # out of rotation
    assert any(m.startswith(f"{name} paused (scaled to zero") for m in await _messages(store))

    poke()  # a request at zero: the paused replica is woken, no new one started
    await _settle(ctl, lambda: _ready(ctl) == [name], "unpaused")
    assert driver.started() == [name] and driver.paused == set()
    assert [r.state for r in await store.list_replicas("hello")] == ["ready"]
    await _until(
        lambda: any(a == ("unpause", name) for a in driver.actions), what="the driver unpaused"
    )

    await go_idle(name)
    clock.now += 31.0  # past pause_for
    await _settle(ctl, lambda: not driver.running, "expired")
    assert driver.stops == [(name, ctl.settings.drain_grace)]
    assert f"{name} stopped: paused too long" in await _messages(store)
    assert not ctl.paused and not ctl.tracked
    await ctl.stop()
    await store.close()
