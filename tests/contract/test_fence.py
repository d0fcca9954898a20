"""Fencing: a deposed controller's writes and driver actions fail, with an injected clock for
the local check and a real redis-server for the store's own check of the token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping

import pytest

from torpor.controller.fence import FencedDriver, fence_store
from torpor.controller.leader import Leadership
from torpor.drivers.base import Progress, Running
from torpor.lease import MemoryLease, RedisLease
from torpor.model import Event, Function, Replica, Revision, Spec
from torpor.store.base import FencedError, Store
from torpor.store.embedded import EmbeddedStore
from torpor.store.redis import RedisStore

TTL = 1.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CountingDriver:
    name = "counting"

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def prepare(self, revision: Revision, progress: Progress | None = None) -> Revision:
        self.calls.append("prepare")
        return revision

    async def start(
        self, revision: Revision, replica: str, secret_env: Mapping[str, str] | None = None
    ) -> Running:
        self.calls.append("start")
        return Running(replica, revision.function, revision.name, "id", "127.0.0.1:1")

    async def stop(self, running: Running, grace: float = 10.0) -> None:
        self.calls.append("stop")

    async def list(self) -> list[Running]:
        self.calls.append("list")
        return []

    async def logs(
        self, running: Running, follow: bool = False, tail: int = 200
    ) -> AsyncIterator[str]:
        if False:
            yield ""

    async def remove(self, revision: Revision) -> None:
        self.calls.append("remove")

    async def close(self) -> None:
        pass


def _fn(name: str = "hello") -> Function:
    rev = Revision(
        name=f"{name}-00001", function=name, number=1, spec=Spec(name=name), status="ready"
    )
    return Function(name=name, revisions=[rev])


async def _writes(store: Store, tag: str) -> None:
    """One of each write a controller makes; each must raise FencedError when fenced out."""
    for write in (
        store.update_function("hello", lambda f: _fn()),
        store.put_replica(
            Replica(name=f"hello-00001-{tag}", function="hello", revision="hello-00001")
        ),
        store.delete_replica("hello", "hello-00001-keep"),
        store.add_event(Event(function="hello", kind="replica", message=f"by {tag}")),
    ):
        with pytest.raises(FencedError):
            await write


async def test_a_leader_frozen_past_its_lease_can_neither_write_nor_act() -> None:
    """The local check: with the clock moved past the lease's validity (a SIGSTOP, a long
    pause), every store write and driver action is refused before it is sent."""
    clock = Clock()
    lease = MemoryLease(clock)
    store = EmbeddedStore(None)
    await store.put_replica(
        Replica(name="hello-00001-keep", function="hello", revision="hello-00001")
    )
    a = Leadership(lease, "a", ttl=TTL, renew_every=0.1, clock=clock)
    a.held = await lease.acquire("a", TTL)
    assert a.held is not None and a.valid()
    view = fence_store(store, None, a.held.token, a.valid)
    driver = CountingDriver()
    fenced = FencedDriver(driver, a.valid)  # type: ignore[arg-type]
    rev = _fn().revisions[0]
    await view.update_function("hello", lambda f: _fn())  # while valid: lands
    await fenced.start(rev, "hello-00001-aaa")
    assert driver.calls == ["start"]
    clock.now += TTL  # frozen for a whole ttl: the lease is no longer ours, locally
    assert not a.valid()
    await _writes(view, "late")
    for action in (
        fenced.start(rev, "hello-00001-bbb"),
        fenced.stop(Running("x", "hello", rev.name, "i", "e")),
        fenced.prepare(rev),
        fenced.remove(rev),
    ):
        with pytest.raises(FencedError):
            await action
    assert await fenced.list() == []  # reads still pass
    assert driver.calls == ["start", "list"]
    assert [r.name for r in await store.list_replicas()] == ["hello-00001-keep"]
    assert await store.list_events("hello") == []
    # and a newer holder takes the lease with a higher token
    held_b = await lease.acquire("b", TTL)
    assert held_b is not None and held_b.token > a.held.token


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis_url, prefix="fence")
    try:
        yield store
    finally:
        await store.close()


async def _expired(lease: RedisLease, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while await lease.current() is not None:
        assert time.monotonic() < deadline, "the lease did not expire"
        await asyncio.sleep(0.02)


async def test_redis_refuses_a_stale_token_even_when_the_local_check_passes(
    redis_store: RedisStore,
) -> None:
    """The store's own check: a deposed leader whose local clock still believes in its lease
    (the injected clock never moves) writes with its old token, and Redis refuses every write
    because the lease key now holds a newer one."""
    clock = Clock()  # a's view of time: frozen, so its local check keeps saying "valid"
    lease_a = RedisLease(redis_store._redis, "fence", clock=clock)
    lease_b = RedisLease(redis_store._redis, "fence")
    await redis_store.put_replica(
        Replica(name="hello-00001-keep", function="hello", revision="hello-00001")
    )
    held_a = await lease_a.acquire("a", 0.2)
    assert held_a is not None
    a = Leadership(lease_a, "a", ttl=0.2, renew_every=0.1, clock=clock)
    a.held = held_a
    view_a = fence_store(redis_store, lease_a.key, held_a.token, a.valid)
    await view_a.update_function("hello", lambda f: _fn())  # current token: lands
    await _expired(lease_a)
    held_b = await lease_b.acquire("b", 5.0)
    assert held_b is not None and held_b.token > held_a.token
    assert a.valid()  # a does not know: only the token can stop it now
    before = await redis_store.get_function("hello")
    await _writes(view_a, "late")
    assert await redis_store.get_function("hello") == before
    assert [r.name for r in await redis_store.list_replicas()] == ["hello-00001-keep"]
    assert await redis_store.list_events("hello") == []
    # the new leader's writes with its token land
    view_b = fence_store(redis_store, lease_b.key, held_b.token, lambda: True)
    await view_b.put_replica(
        Replica(name="hello-00001-new", function="hello", revision="hello-00001")
    )
    await view_b.delete_replica("hello", "hello-00001-keep")
    await view_b.add_event(Event(function="hello", kind="replica", message="by b"))
    fn = await view_b.update_function("hello", lambda f: _fn())
    assert fn is not None
    assert [r.name for r in await redis_store.list_replicas()] == ["hello-00001-new"]
    assert [e.message for e in await redis_store.list_events("hello")] == ["by b"]


async def test_redis_refuses_a_token_whose_lease_ran_out_with_no_new_holder(
    redis_store: RedisStore,
) -> None:
    lease = RedisLease(redis_store._redis, "fence")
    held = await lease.acquire("a", 0.2)
    assert held is not None
    view = fence_store(redis_store, lease.key, held.token, lambda: True)
    await view.add_event(Event(function="hello", kind="x", message="in time"))
    await _expired(lease)
    await _writes(view, "late")
    assert [e.message for e in await redis_store.list_events("hello")] == ["in time"]


async def test_a_fenced_view_shares_the_store_and_never_closes_it(redis_store: RedisStore) -> None:
    lease = RedisLease(redis_store._redis, "fence")
    held = await lease.acquire("a", 5.0)
    assert held is not None
    view = redis_store.fenced(lease.key, held.token)
    async with redis_store.subscribe("changes") as sub:
        await view.put_replica(
            Replica(name="hello-00001-x", function="hello", revision="hello-00001")
        )
        msg = await asyncio.wait_for(sub.__anext__(), 5)
        assert msg == {"kind": "replica", "function": "hello"}
    await view.close()
    assert [r.name for r in await redis_store.list_replicas()] == ["hello-00001-x"]
