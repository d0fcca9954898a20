"""The gateway's background tasks end with their owner: torpor.gateway.tasks, and the
gateway's pokes and pool closes, which Gateway.stop cancels and awaits."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import pytest

from torpor.gateway.app import Gateway
from torpor.gateway.tasks import Tasks, cancelled
from torpor.store.base import POKES
from torpor.store.embedded import EmbeddedStore

TIMEOUT = 5.0

log = logging.getLogger("test.tasks")


async def _forever(started: asyncio.Event, ended: list[str], name: str) -> None:
    started.set()
    try:
        await asyncio.Event().wait()
    finally:
        ended.append(name)


async def test_a_spawned_task_is_held_until_it_ends_and_close_cancels_and_awaits() -> None:
    tasks = Tasks(log, "test")
    started, ended = asyncio.Event(), list[str]()
    tasks.spawn(_forever(started, ended, "a"), name="a")
    gc.collect()  # the loop holds tasks weakly: only the Tasks keeps it alive
    await asyncio.wait_for(started.wait(), TIMEOUT)
    assert len(tasks) == 1
    await tasks.close()
    assert ended == ["a"] and len(tasks) == 0


async def test_a_finished_task_is_let_go_and_its_failure_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tasks = Tasks(log, "test")

    async def fail() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="test.tasks"):
        task = tasks.spawn(fail(), name="failing")
        await asyncio.wait({task}, timeout=TIMEOUT)
        await asyncio.sleep(0)  # the done callback runs in the next step
    assert len(tasks) == 0
    assert [r.getMessage() for r in caplog.records] == ["test: background task failing failed"]


async def test_close_also_ends_a_task_spawned_while_closing() -> None:
    tasks = Tasks(log, "test")
    started, ended = asyncio.Event(), list[str]()

    async def respawn() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            tasks.spawn(_forever(started, ended, "late"))

    tasks.spawn(respawn())
    await asyncio.sleep(0)
    await asyncio.wait_for(tasks.close(), TIMEOUT)
    assert len(tasks) == 0


async def test_cancelled_returns_once_the_task_has_ended() -> None:
    started, ended = asyncio.Event(), list[str]()
    task = asyncio.ensure_future(_forever(started, ended, "t"))
    await asyncio.wait_for(started.wait(), TIMEOUT)
    await cancelled(task)
    assert task.done() and ended == ["t"]
    await cancelled(task)  # an ended task: nothing more to do


class _HangingBus(EmbeddedStore):
    """An embedded store whose publish never completes (a bus that hangs)."""

    def __init__(self) -> None:
        super().__init__(None)
        self.started = asyncio.Event()
        self.ended: list[str] = []

    async def publish(self, channel: str, payload: dict[str, Any]) -> None:
        await _forever(self.started, self.ended, channel)


async def test_gateway_stop_ends_a_poke_still_being_published() -> None:
    store = _HangingBus()
    gw = Gateway(store)
    gw._poke("f", "f-00001", 1)
    gc.collect()
    await asyncio.wait_for(store.started.wait(), TIMEOUT)
    await asyncio.wait_for(gw.stop(drain=0), TIMEOUT)
    assert store.ended == [POKES]
    await store.close()


@pytest.mark.parametrize("started", [False, True])
async def test_a_pool_close_pending_at_stop_ends_closed(started: bool) -> None:
    """A replica left the routes just before stop: its pool is closed whether or not
    the close had begun when stop cancelled it."""
    store = EmbeddedStore(None)
    gw = Gateway(store)
    pool = gw.pools.get("127.0.0.1:9")
    task = gw._background.spawn(gw.pools.discard("127.0.0.1:9"), name="gateway-pool-close")
    if started:
        await asyncio.wait({task}, timeout=TIMEOUT)
    await asyncio.wait_for(gw.stop(drain=0), TIMEOUT)
    assert pool._closed and len(gw._background) == 0
    await store.close()
