"""The log bus (torpor.logs) over every Store: an API process without a driver asks a
LogServer for a function's replica lines. Real stores (embedded and a real Redis); the
line source is a scripted async generator standing in for the driver."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from torpor import logs as logbus
from torpor.logs import LogServer, LogsUnavailable, remote_reader
from torpor.store.base import Store
from torpor.store.embedded import EmbeddedStore
from torpor.store.redis import RedisStore

WAIT = 5.0


@pytest.fixture(params=["embedded", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = (
        EmbeddedStore(tmp_path / "state")
        if request.param == "embedded"
        else RedisStore(request.getfixturevalue("redis_url"))
    )
    try:
        yield s
    finally:
        await s.close()


class Source:
    """Lines per function; with follow, more lines arrive through ``feed``. Records how
    it was called and whether its generator was closed."""

    def __init__(self, lines: dict[str, list[str]]) -> None:
        self.lines = lines
        self.calls: list[tuple[str, bool, int]] = []
        self.more: asyncio.Queue[str] = asyncio.Queue()
        self.closed = asyncio.Event()

    async def __call__(self, function: str, follow: bool, tail: int) -> AsyncIterator[str]:
        self.calls.append((function, follow, tail))
        try:
            for line in self.lines.get(function, [])[-tail:]:
                yield line
            while follow:
                yield await self.more.get()
        finally:
            self.closed.set()


async def serving(store: Store, source: Any) -> tuple[LogServer, asyncio.Task[None]]:
    server = LogServer(store, source)
    task = asyncio.create_task(server.run())
    await asyncio.wait_for(
        server.listening.wait(), WAIT
    )  # its subscription is up (Redis: a round trip)
    return server, task


async def until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


async def collect(lines: AsyncIterator[str]) -> list[str]:
    return [line async for line in lines]


async def test_tail_arrives_in_order_and_ends(store: Store) -> None:
    source = Source({"hello": [f"line {i}" for i in range(300)], "other": ["not mine"]})
    _, task = await serving(store, source)
    try:
        got = await asyncio.wait_for(collect(await remote_reader(store, "hello", False, 150)), WAIT)
        assert got == [f"line {i}" for i in range(150, 300)]  # batched on the wire, in order here
        assert source.calls == [("hello", False, 150)]
    finally:
        task.cancel()


async def test_follow_streams_new_lines_and_a_cancel_ends_the_source(store: Store) -> None:
    source = Source({"hello": ["old"]})
    server, task = await serving(store, source)
    try:
        lines = await remote_reader(store, "hello", True, 10)
        assert await asyncio.wait_for(anext(lines), WAIT) == "old"
        source.more.put_nowait("new 1")
        source.more.put_nowait("new 2")
        assert await asyncio.wait_for(anext(lines), WAIT) == "new 1"
        assert await asyncio.wait_for(anext(lines), WAIT) == "new 2"
        await lines.aclose()  # type: ignore[attr-defined]  # the client went away: a cancel is published
        await asyncio.wait_for(source.closed.wait(), WAIT)
        await asyncio.wait_for(until(lambda: not server.sessions), WAIT)
    finally:
        task.cancel()


async def test_no_server_is_unavailable_not_a_hang(store: Store) -> None:
    with pytest.raises(LogsUnavailable, match="no controller answered"):
        await remote_reader(store, "hello", False, 10, timeout=0.5)


async def test_a_failing_source_ends_the_stream_with_its_error(store: Store) -> None:
    async def broken(function: str, follow: bool, tail: int) -> AsyncIterator[str]:
        yield "first"
        raise RuntimeError("driver lost")

    _, task = await serving(store, broken)
    try:
        got = await asyncio.wait_for(collect(await remote_reader(store, "hello", False, 10)), WAIT)
        assert got[0] == "first" and "driver lost" in got[-1]
    finally:
        task.cancel()


async def test_a_follower_that_vanishes_is_ended_after_its_lease(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logbus, "LEASE", 0.5)
    source = Source({"hello": []})
    server, task = await serving(store, source)
    try:
        # an API that asks to follow, then dies: no keep-alive, no cancel
        await store.publish(
            logbus.LOGS, {"id": "gone", "function": "hello", "follow": True, "tail": 5}
        )
        await asyncio.wait_for(until(lambda: "gone" in server.sessions), WAIT)
        await asyncio.wait_for(source.closed.wait(), WAIT)  # the reaper runs every second
        await asyncio.wait_for(until(lambda: not server.sessions), WAIT)
    finally:
        task.cancel()


async def test_a_tail_whose_controller_dies_mid_stream_ends_instead_of_hanging(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logbus, "TAIL_STALL", 0.5)
    requests = store.subscribe(logbus.LOGS)

    async def half_a_controller() -> None:  # answers "start" and one batch, then is gone
        msg = await anext(aiter(requests))
        await store.publish(logbus.answer_channel(msg["id"]), {"start": True})
        await store.publish(logbus.answer_channel(msg["id"]), {"lines": ["only line"]})

    task = asyncio.create_task(half_a_controller())
    try:
        got = await asyncio.wait_for(collect(await remote_reader(store, "hello", False, 10)), WAIT)
        assert got[0] == "only line" and "no answer from the controller" in got[-1]
    finally:
        task.cancel()
        await requests.aclose()  # type: ignore[attr-defined]
