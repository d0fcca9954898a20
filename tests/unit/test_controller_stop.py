"""``Controller.stop`` leaves nothing behind: every task the controller started (loops,
builds, starts, drains, listings, event writes) has ended when it returns, and no timer
of it is still due, whether it stops the replicas or leaves them to the next run."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from fakes import Clock, FakeDriver

from torpor.controller.reconcile import Controller, Settings
from torpor.model import Function, Revision, ScaleOverride, Spec, TrafficTarget
from torpor.store.embedded import EmbeddedStore


def _function(name: str, status: str = "ready", min_: int = 1) -> Function:
    rev = Revision(
        name=f"{name}-00001",
        function=name,
        number=1,
        spec=Spec(name=name),
        status=status,  # type: ignore[arg-type]
        image="img" if status == "ready" else None,
    )
    return Function(
        name=name,
        revisions=[rev],
        traffic=[TrafficTarget(rev.name, 100)] if status == "ready" else [],
        scale=ScaleOverride(min=min_),
    )


async def _until(pred: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not in time: {what}")
        await asyncio.sleep(0.005)


def _pending(before: set[asyncio.Task[object]]) -> list[str]:
    current = asyncio.current_task()
    return sorted(
        t.get_name()
        for t in asyncio.all_tasks()
        if t not in before and t is not current and not t.done()
    )


@pytest.mark.parametrize("stop_replicas", [True, False])
async def test_stop_leaves_no_pending_task_and_no_timer(stop_replicas: bool) -> None:
    before = asyncio.all_tasks()
    store, driver, clock = EmbeddedStore(None), FakeDriver(), Clock()
    functions = {
        "up": _function("up"),  # a ready replica (drained, or left running)
        "build": _function("build", status="building"),  # a build hung in the driver
        "crash": _function("crash"),  # a replica whose start failed: a timer to forget it
    }
    for fn in functions.values():
        await store.update_function(fn.name, lambda _, fn=fn: fn)  # type: ignore[misc]
    driver.broken["crash-00001"] = "image not found"
    driver.hold_prepares = asyncio.Event()
    ctl = Controller(store, driver, settings=Settings(tick=0.02), clock=clock)  # type: ignore[arg-type]
    await ctl.start()
    await _until(
        lambda: any(t.replica.state == "ready" for t in ctl.tracked.values()), what="up ready"
    )
    (up,) = [n for n in driver.started() if n.startswith("up-")]
    await _until(lambda: ("prepare", "build-00001") in driver.actions, what="the build begun")
    await _until(lambda: ctl.revs["crash-00001"].failures, what="the failed start")
    await _until(lambda: ctl._timers, what="the timer to forget the failed replica")
    if not stop_replicas:
        # and a start still in the driver (left to the next run, which sweeps it up)
        driver.hold_starts = asyncio.Event()
        await store.update_function("up", lambda _: _function("up", min_=2))
        await _until(
            lambda: len([n for n in driver.started() if n.startswith("up-")]) == 2,
            what="a second start in flight",
        )
    assert _pending(before)  # plenty in flight

    await ctl.stop(stop_replicas=stop_replicas)
    assert _pending(before) == []
    assert not ctl._work and not ctl._timers
    assert set(driver.running) == (set() if stop_replicas else {up})
    await store.close()


async def test_stop_cancels_the_timers_it_set() -> None:
    """A failed replica's record is deleted a few seconds later (a timer on the loop); a
    controller stopped before then leaves no such timer due (the next run cleans the
    record up when it adopts)."""
    store, driver = EmbeddedStore(None), FakeDriver()
    await store.update_function("crash", lambda _: _function("crash"))
    driver.broken["crash-00001"] = "image not found"
    ctl = Controller(store, driver, settings=Settings(tick=0.02))  # type: ignore[arg-type]
    await ctl.start()
    await _until(lambda: ctl._timers, what="a timer")
    handles = list(ctl._timers)
    await ctl.stop()
    assert all(h.cancelled() for h in handles)
    await store.close()
