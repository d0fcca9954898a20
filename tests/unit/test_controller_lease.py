"""The controller under a lease: a standby never acts; the one elected syncs, adopts what
runs and starts no duplicate; a deposed one stops acting at once and leaves its replicas
running. Two controllers share one in-memory store and one fake engine (a recording
driver whose replicas answer probes on one loopback listener)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping

from torpor.controller.leader import Leadership
from torpor.controller.reconcile import Controller, Settings
from torpor.drivers.base import Progress, Running
from torpor.lease import MemoryLease
from torpor.model import Function, Revision, ScaleOverride, Spec, TrafficTarget
from torpor.store.embedded import EmbeddedStore

TTL = 0.6


class Engine:
    """What runs, shared by every driver (one Docker Engine, say)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.running: dict[str, Running] = {}
        self.log: list[tuple[str, str, str]] = []  # (driver, action, replica)


class FakeDriver:
    name = "fake"

    def __init__(self, engine: Engine, who: str, start_delay: float = 0.0) -> None:
        self.engine, self.who, self.start_delay = engine, who, start_delay

    async def prepare(self, revision: Revision, progress: Progress | None = None) -> Revision:
        return revision

    async def start(
        self, revision: Revision, replica: str, secret_env: Mapping[str, str] | None = None
    ) -> Running:
        self.engine.log.append((self.who, "start", replica))
        await asyncio.sleep(self.start_delay)
        r = Running(
            replica, revision.function, revision.name, f"id-{replica}", self.engine.endpoint
        )
        self.engine.running[replica] = r
        return r

    async def stop(self, running: Running, grace: float = 10.0) -> None:
        self.engine.log.append((self.who, "stop", running.replica))
        self.engine.running.pop(running.replica, None)

    async def list(self) -> list[Running]:
        return [
            Running(r.replica, r.function, r.revision, r.driver_id, r.endpoint)
            for r in self.engine.running.values()
        ]

    async def logs(
        self, running: Running, follow: bool = False, tail: int = 200
    ) -> AsyncIterator[str]:
        if False:
            yield ""

    async def remove(self, revision: Revision) -> None:
        pass

    async def close(self) -> None:
        pass


async def _probe_server() -> tuple[asyncio.Server, str]:
    async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readline()
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await w.drain()
        w.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"127.0.0.1:{port}"


async def _until(pred: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def _function(store: EmbeddedStore, replicas: int = 1) -> None:
    rev = Revision(
        name="hello-00001",
        function="hello",
        number=1,
        spec=Spec(name="hello"),
        status="ready",
        image="img",
    )
    fn = Function(
        name="hello",
        revisions=[rev],
        traffic=[TrafficTarget(rev.name, 100)],
        scale=ScaleOverride(min=replicas, max=replicas),
    )
    await store.update_function("hello", lambda _: fn)


def _controller(
    store: EmbeddedStore, engine: Engine, lease: MemoryLease, who: str, start_delay: float = 0.0
) -> Controller:
    return Controller(
        store,
        FakeDriver(engine, who, start_delay),
        settings=Settings(tick=0.05),  # type: ignore[arg-type]
        leadership=Leadership(lease, who, ttl=TTL, renew_every=0.1, poll=0.02),
    )


async def test_standby_never_acts_and_the_next_leader_adopts_without_duplicates() -> None:
    server, endpoint = await _probe_server()
    store, engine, lease = EmbeddedStore(None), Engine(endpoint), MemoryLease()
    await _function(store, replicas=2)
    a = _controller(store, engine, lease, "a")
    await a.start()
    assert a.role == "leader"
    await _until(
        lambda: (
            len(engine.running) == 2
            and len(a.tracked) == 2
            and all(t.replica.state == "ready" for t in a.tracked.values())
        )
    )
    b = _controller(store, engine, lease, "b")
    await b.start()
    assert b.role == "standby" and b.ready() and not b.synced.is_set()
    await asyncio.sleep(TTL)  # many of a's renewals and b's polls
    assert {who for who, _, _ in engine.log} == {"a"}  # b never started or stopped anything
    assert not b.tracked
    # a goes away, leaving its replicas (a controller alone does): b takes over and adopts them
    await a.stop(stop_replicas=False)
    await _until(lambda: b.role == "leader" and len(b.tracked) == 2, timeout=TTL * 3)
    await _until(lambda: all(t.replica.state == "ready" for t in b.tracked.values()))
    await asyncio.sleep(0.3)  # several passes: b starts no duplicate and stops nothing
    assert [x for x in engine.log if x[0] == "b"] == []
    assert len(engine.running) == 2
    assert {r.name for r in await store.list_replicas()} == set(engine.running)
    await b.stop(stop_replicas=True)
    assert engine.running == {}
    server.close()


async def test_a_deposed_leader_stops_acting_at_once_and_leaves_its_replicas() -> None:
    server, endpoint = await _probe_server()
    store, engine, lease = EmbeddedStore(None), Engine(endpoint), MemoryLease()
    await _function(store, replicas=1)
    a = _controller(store, engine, lease, "a", start_delay=0.0)
    await a.start()
    await _until(lambda: len(engine.running) == 1)
    await _until(lambda: all(t.replica.state == "ready" for t in a.tracked.values()) and a.tracked)
    # ask for more replicas, with slow starts, then take the lease away mid-start
    a.driver.inner.start_delay = 5.0  # type: ignore[attr-defined]
    await _function(store, replicas=3)
    await _until(lambda: sum(1 for w, act, _ in engine.log if act == "start") >= 2)
    lease._holder, lease._expires = None, 0.0  # the lease ran out under a (a partition, say)
    assert await lease.acquire("b", TTL) is not None  # and another controller took it
    await _until(lambda: a.role == "standby" and not a.tracked, timeout=TTL * 2)
    assert not a.synced.is_set()
    assert not [x for x in engine.log if x[1] == "stop"]  # nothing was stopped
    assert len(engine.running) == 1  # the slow starts were cancelled, the running replica runs on
    starts = len([x for x in engine.log if x[1] == "start"])
    await asyncio.sleep(0.3)
    assert len([x for x in engine.log if x[1] == "start"]) == starts  # and a acts no more
    await a.stop(stop_replicas=True)  # not the leader: leaves the replicas to whoever leads
    assert len(engine.running) == 1
    server.close()
