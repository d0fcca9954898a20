"""One contract for every call queue: EmbeddedCallQueue (journal in a tmp dir) and
RedisCallQueue (Redis Streams on a real redis-server). Specific behaviour at the end."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from torpor.model import Call, new_id
from torpor.store import callq as callq_mod
from torpor.store.callq import CallQueue, EmbeddedCallQueue, QueueFull, open_queue
from torpor.store.embedded import EmbeddedStore
from torpor.store.redis import RedisStore


@pytest.fixture(params=["embedded", "redis"])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """{"q": a queue, "reopen": coroutine giving a fresh queue on the same durable state}."""
    stores: list[Any] = []

    async def make() -> CallQueue:
        if request.param == "embedded":
            s: Any = EmbeddedStore(tmp_path / "state")
        else:
            s = RedisStore(request.getfixturevalue("redis_url") if not stores else stores[0].url)
        stores.append(s)
        return open_queue(s)

    q = await make()

    async def reopen() -> CallQueue:
        await callq_mod.close_queue(stores[-1])
        return await make()

    try:
        yield {"q": q, "reopen": reopen, "kind": request.param}
    finally:
        for s in stores:
            await callq_mod.close_queue(s)
            await s.close()


def call(fn: str = "hello", body: bytes = b"payload", **kw: Any) -> Call:
    return Call(
        id=new_id(),
        function=fn,
        method="POST",
        path="/x",
        query="a=1",
        headers=[("content-type", "text/plain")],
        body=body,
        **kw,
    )


async def test_put_get_roundtrip(env: dict[str, Any]) -> None:
    q: CallQueue = env["q"]
    c = call(body=bytes(range(256)), callback="http://127.0.0.1:9/cb")
    await q.put(c)
    got = await q.get(c.id)
    assert got is not None
    assert (got.state, got.body, got.headers, got.path, got.query, got.callback) == (
        "queued",
        bytes(range(256)),
        [("content-type", "text/plain")],
        "/x",
        "a=1",
        "http://127.0.0.1:9/cb",
    )
    assert await q.get(new_id()) is None


async def test_claim_is_fifo_and_bounded_by_limit(env: dict[str, Any]) -> None:
    q: CallQueue = env["q"]
    calls = [call() for _ in range(5)]
    for c in calls:
        await q.put(c)
    first = await q.claim("hello", 10, 2, "w1")
    assert [c.id for c in first] == [calls[0].id, calls[1].id]
    # the limit counts what every consumer holds
    assert await q.claim("hello", 10, 2, "w2") == []
    assert (await q.counts())["hello"] == (3, 2)
    await q.finish(first[0])
    more = await q.claim("hello", 10, 2, "w2")
    assert [c.id for c in more] == [calls[2].id]
    assert await q.claim("other", 10, 5, "w1") == []


async def test_finish_keeps_record_without_body(env: dict[str, Any]) -> None:
    q: CallQueue = env["q"]
    c = call()
    await q.put(c)
    [held] = await q.claim("hello", 1, 5, "w1")
    held.state, held.attempts = "running", 1
    await q.save(held)
    assert (await q.get(c.id)).attempts == 1  # type: ignore[union-attr]
    held.state, held.status, held.result_body, held.finished = "done", 201, b"ok", 123.0
    await q.finish(held)
    got = await q.get(c.id)
    assert got is not None and (got.state, got.status, got.result_body, got.body) == (
        "done",
        201,
        b"ok",
        b"",
    )
    assert "hello" not in await q.counts()
    assert await q.claim("hello", 5, 5, "w1") == []


async def test_recent_newest_first(env: dict[str, Any]) -> None:
    q: CallQueue = env["q"]
    ids = []
    for i in range(4):
        c = call(created=1000.0 + i)
        ids.append(c.id)
        await q.put(c)
    await q.put(call(fn="other"))
    assert [c.id for c in await q.recent("hello", 3)] == ids[::-1][:3]
    assert await q.recent("nobody") == []


async def test_calls_survive_reopen_and_held_ones_run_again(env: dict[str, Any]) -> None:
    q: CallQueue = env["q"]
    a, b = call(), call()
    await q.put(a)
    await q.put(b)
    [held] = await q.claim("hello", 1, 5, "dead-worker")
    held.state, held.attempts = "running", 1
    await q.save(held)
    q2: CallQueue = await env["reopen"]()
    got = await q2.get(b.id)
    assert got is not None and got.state == "queued" and got.body == b"payload"
    if env["kind"] == "embedded":  # the restarted process holds nothing: running -> queued
        ids = [c.id for c in await q2.claim("hello", 5, 5, "w2")]
    else:  # another process: the dead worker's call is taken over once it is idle
        assert await q2.reclaim("w2", 60.0) == []  # not silent long enough yet
        await asyncio.sleep(0.3)
        ids = [c.id for c in await q2.claim("hello", 5, 5, "w2")]
        assert ids == [b.id]
        ids += [c.id for c in await q2.reclaim("w2", 0.2)]  # a only: b was just claimed
    assert sorted(ids) == sorted([a.id, b.id])
    taken = next(c for c in [await q2.get(a.id)] if c)
    assert taken.attempts == 1  # the record kept the attempt it had made
    assert taken.body == b"payload"  # and the body its first line had (state lines carry none)


async def test_heartbeat_keeps_a_call_from_being_reclaimed(env: dict[str, Any]) -> None:
    q: CallQueue = env["q"]
    c = call()
    await q.put(c)
    held = await q.claim("hello", 1, 5, "w1")
    await asyncio.sleep(0.3)
    await q.heartbeat("w1", held)
    assert await q.reclaim("w2", 0.2) == []


async def test_queue_full(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    q: CallQueue = env["q"]
    import torpor.store.callq_redis as rq

    monkeypatch.setattr(callq_mod, "MAX_QUEUED", 3)
    monkeypatch.setattr(rq, "MAX_QUEUED", 3)
    for _ in range(3):
        await q.put(call())
    with pytest.raises(QueueFull):
        await q.put(call())
    await q.put(call(fn="other"))  # per function


async def test_concurrent_puts_all_durable(env: dict[str, Any]) -> None:
    q: CallQueue = env["q"]
    calls = [call(body=str(i).encode()) for i in range(200)]
    await asyncio.gather(*(q.put(c) for c in calls))
    q2: CallQueue = await env["reopen"]()
    got = await q2.claim("hello", 500, 500, "w")
    assert sorted(c.id for c in got) == sorted(c.id for c in calls)


# -- embedded specifics ------------------------------------------------------------------------


async def test_embedded_journal_skips_torn_line_and_compacts(tmp_path: Path) -> None:
    q = EmbeddedCallQueue(tmp_path)
    c = call()
    await q.put(c)
    await q.close()
    with (tmp_path / "calls.jsonl").open("a") as f:
        f.write('{"id": "torn", "func')  # an interrupted write
    q2 = EmbeddedCallQueue(tmp_path)
    assert (await q2.get(c.id)) is not None
    lines = (tmp_path / "calls.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [c.id]
    await q2.close()


async def test_embedded_journal_is_private(tmp_path: Path) -> None:
    q = EmbeddedCallQueue(tmp_path)
    await q.put(call())
    assert (tmp_path / "calls.jsonl").stat().st_mode & 0o777 == 0o600  # it holds request headers
    await q.close()
    EmbeddedCallQueue(tmp_path)  # rewritten on load: still private
    assert (tmp_path / "calls.jsonl").stat().st_mode & 0o777 == 0o600


async def test_embedded_prune_forgets_old_finished(tmp_path: Path) -> None:
    q = EmbeddedCallQueue(tmp_path)
    c = call()
    await q.put(c)
    [held] = await q.claim("hello", 1, 1, "w")
    held.state, held.finished = "done", 1.0
    await q.finish(held)
    assert await q.prune(now=10**6) == 1
    assert await q.get(c.id) is None
    await q.close()
    q2 = EmbeddedCallQueue(tmp_path)
    assert await q2.get(c.id) is None
    await q2.close()


async def test_open_queue_is_one_per_store(tmp_path: Path) -> None:
    s = EmbeddedStore(tmp_path)
    assert open_queue(s) is open_queue(s)
    with pytest.raises(QueueFull):
        q = open_queue(s)
        assert isinstance(q, EmbeddedCallQueue)
        q._bytes = callq_mod.MAX_QUEUED_BYTES
        await q.put(call())
    await callq_mod.close_queue(s)
    await s.close()


async def test_only_the_newest_calls_are_kept_per_function(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    q: CallQueue = env["q"]
    import torpor.store.callq_redis as rq

    monkeypatch.setattr(callq_mod, "LISTED", 3)
    monkeypatch.setattr(rq, "LISTED", 3)
    first = call(created=1.0)
    await q.put(first)
    [held] = await q.claim("hello", 1, 1, "w")
    held.state, held.finished = "done", 2.0
    await q.finish(held)
    waiting = call(created=3.0)
    await q.put(waiting)
    for i in range(3):
        await q.put(call(created=10.0 + i))
    assert len(await q.recent("hello", 10)) == 3
    assert await q.get(first.id) is None  # final and out of the newest: forgotten
    assert await q.get(waiting.id) is not None  # not final: kept (and still runs)
