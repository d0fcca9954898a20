"""Adoption, with no subprocess: a controller that starts finds what an earlier run left
in the engine (``fakes.FakeDriver``, replicas known by their labels) and takes over the
replicas of ready revisions, stops the rest and forgets records without a process; a
leader's sweep adopts or stops replicas no one tracks once it has seen them twice."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from fakes import Clock, FakeDriver, PausableFakeDriver

from torpor.controller.fence import FencedDriver
from torpor.controller.leader import Leadership
from torpor.controller.reconcile import SWEEP_EVERY, Controller, Settings
from torpor.lease import MemoryLease
from torpor.model import Function, Replica, Revision, ScaleOverride, Spec, TrafficTarget
from torpor.store.base import FencedError
from torpor.store.embedded import EmbeddedStore

REV = "hello-00001"


async def _store(scale: ScaleOverride, *names: str) -> EmbeddedStore:
    store = EmbeddedStore(None)
    for name in names or ("hello",):
        rev = Revision(
            name=f"{name}-00001",
            function=name,
            number=1,
            spec=Spec(name=name),
            status="ready",
            image="i",
        )
        fn = Function(name=name, revisions=[rev], traffic=[TrafficTarget(rev.name, 100)])
        fn.scale = scale
        await store.update_function(name, lambda _, fn=fn: fn)  # type: ignore[misc]
    return store


async def _until(pred: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not in time: {what}")
        await asyncio.sleep(0.005)


async def _messages(store: EmbeddedStore, function: str = "hello") -> list[str]:
    return [e.message for e in await store.list_events(function, 500) if e.kind == "replica"]


async def test_a_restarted_controller_adopts_what_runs_by_its_labels_and_stops_the_rest() -> None:
    store = await _store(ScaleOverride(min=2, max=2))
    driver = PausableFakeDriver()
    kept = driver.run("hello-00001-aaaaaa", "hello", REV)
    paused = driver.run("hello-00001-bbbbbb", "hello", REV)
    driver.paused.add(paused.replica)  # an earlier run paused it and went away
    old = driver.run("hello-00000-cccccc", "hello", "hello-00000")  # no such revision any more
    dead = driver.run("hello-00001-dddddd", "hello", REV)
    driver.crash(dead.replica, code=137)
    other = driver.run("gone-00001-eeeeee", "gone", "gone-00001")  # no such function
    await store.put_replica(Replica(kept.replica, "hello", REV, state="ready"))
    await store.put_replica(
        Replica("hello-00001-ffffff", "hello", REV, state="ready")
    )  # no process

    ctl = Controller(store, driver, settings=Settings(tick=0.05), clock=Clock())  # type: ignore[arg-type]
    await ctl.start()
    try:
        assert set(ctl.tracked) == {kept.replica, paused.replica}
        await _until(
            lambda: all(t.replica.state == "ready" for t in ctl.tracked.values()), what="ready"
        )
        assert driver.paused == set()  # the one left paused was unpaused
        assert ("unpause", paused.replica) in driver.actions
        assert {n for a, n in driver.actions if a == "stop"} == {
            old.replica,
            dead.replica,
            other.replica,
        }
        assert driver.started() == []  # two adopted, two desired: nothing new
        assert {r.name for r in await store.list_replicas()} == {kept.replica, paused.replica}
        said = await _messages(store)
        assert f"adopted {kept.replica} ({kept.endpoint})" in said
        assert f"adopted {paused.replica} ({paused.endpoint})" in said
    finally:
        await ctl.stop(stop_replicas=False)
    assert set(driver.running) == {kept.replica, paused.replica}  # left for the next run
    await store.close()


async def test_a_leaders_sweep_adopts_or_stops_an_untracked_replica_once_seen_twice() -> None:
    # nothing desired: only what the sweep finds (one replica of each function at most)
    store = await _store(ScaleOverride(min=0, max=1), "hello", "other")
    driver, clock = FakeDriver(), Clock()
    ctl = Controller(
        store,
        driver,
        settings=Settings(tick=0.02),  # type: ignore[arg-type]
        clock=clock,
        leadership=Leadership(MemoryLease(), "a", ttl=5.0, renew_every=0.5, poll=0.02),
    )
    await ctl.start()
    try:
        assert ctl.role == "leader"
        # replicas a deposed leader's starts left behind, after this leader listed the engine
        ours = driver.run("hello-00001-aaaaaa", "hello", REV)
        stray = driver.run("gone-00001-bbbbbb", "gone", "gone-00001")

        async def sweep() -> None:
            clock.now += SWEEP_EVERY
            lists = driver.lists
            ctl.wake()
            await _until(lambda: driver.lists > lists, what="a sweep")

        await sweep()  # seen once: might be a start in flight, so left alone
        await _until(lambda: {ours.replica, stray.replica} <= set(ctl._orphans), what="seen")
        assert not ctl.tracked and set(driver.running) == {ours.replica, stray.replica}
        late = driver.run("other-00001-cccccc", "other", "other-00001")  # between two sweeps
        await sweep()  # seen twice: adopted (a ready revision) or stopped (nothing owns it)
        await _until(lambda: ours.replica in ctl.tracked, what="adopted")
        await _until(lambda: stray.replica not in driver.running, what="stopped")
        assert late.replica in driver.running and late.replica not in ctl.tracked
        assert late.replica in ctl._orphans  # seen once so far
        await sweep()
        await _until(lambda: late.replica in ctl.tracked, what="the late one adopted")
        await _until(
            lambda: all(t.replica.state == "ready" for t in ctl.tracked.values()), what="ready"
        )
        assert driver.started() == []
        said = await _messages(store)
        assert f"adopted {ours.replica} ({ours.endpoint})" in said
        assert {r.name for r in await store.list_replicas()} == {ours.replica, late.replica}
        assert f"adopted {late.replica} ({late.endpoint})" in await _messages(store, "other")
    finally:
        await ctl.stop(stop_replicas=False)
    await store.close()


async def test_a_leaders_driver_can_pause_only_if_the_driver_itself_can() -> None:
    """Under a lease the controller sees the driver through ``FencedDriver``: ``hasattr``
    must still tell whether it can pause (else an adoption "unpauses" with an error, and a
    scale to zero "pauses" a driver that cannot)."""
    leading = [True]
    plain = FencedDriver(FakeDriver(), lambda: leading[0])  # type: ignore[arg-type]
    assert not hasattr(plain, "pause") and not hasattr(plain, "unpause")
    inner = PausableFakeDriver()
    fenced = FencedDriver(inner, lambda: leading[0])  # type: ignore[arg-type]
    running = inner.run("hello-00001-aaaaaa", "hello", REV)
    await fenced.pause(running)
    assert inner.paused == {running.replica}
    leading[0] = False  # deposed: refused before it reaches the driver
    with pytest.raises(FencedError):
        await fenced.unpause(running)
    assert inner.paused == {running.replica}
