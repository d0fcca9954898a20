"""Fakes for unit tests of pure logic (never for integration tests)."""

from __future__ import annotations

import asyncio
import builtins
import itertools
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace

from torpor.drivers.base import Progress, Running
from torpor.model import Revision


class NullDriver:
    """A Driver that builds nothing, runs nothing and lists nothing: ``start`` raises, as
    an engine that is down would. Subclasses record what the controller asked of it."""

    name = "null"

    async def prepare(self, revision: Revision, progress: Progress | None = None) -> Revision:
        return revision

    async def start(
        self, revision: Revision, replica: str, secret_env: Mapping[str, str] | None = None
    ) -> Running:
        raise RuntimeError("no engine here")

    async def stop(self, running: Running, grace: float = 10.0) -> None:
        pass

    async def list(self) -> list[Running]:
        return []

    async def logs(
        self, running: Running, follow: bool = False, tail: int = 200
    ) -> AsyncIterator[str]:
        if False:
            yield ""

    async def remove(self, revision: Revision) -> None:
        pass

    async def close(self) -> None:
        pass


class Clock:
    """A clock that moves only when a test sets ``now``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeDriver(NullDriver):
    """An engine in memory for controller tests: ``start`` runs a replica at once (or once
    ``hold_starts`` is set), ``list`` reports what ran when it was asked (a listing can be
    held open with ``hold_next_list``), and readiness is the driver's word (``wait_ready``,
    as a ``ReportsReadiness`` driver), so no replica is ever connected to. What the
    controller asked for is in ``actions`` (action, replica) and ``stops`` (replica, grace)."""

    name = "fake"

    def __init__(self) -> None:
        self.running: dict[str, Running] = {}
        self.ready: set[str] = set()  # replicas that answer their readiness check
        self.auto_ready = True  # a started replica answers at once
        self.broken: dict[str, str] = {}  # revision -> the error its starts raise
        self.hold_starts: asyncio.Event | None = None  # starts wait for it
        self.hold_prepares: asyncio.Event | None = None  # prepares (builds) wait for it
        self.lists = 0  # list() calls so far
        self.actions: list[tuple[str, str]] = []
        self.stops: list[tuple[str, float]] = []
        self.output: dict[str, list[str]] = {}  # replica -> its log lines
        self._held_lists: list[asyncio.Event] = []
        self._ports = itertools.count(20000)

    async def start(
        self, revision: Revision, replica: str, secret_env: Mapping[str, str] | None = None
    ) -> Running:
        self.actions.append(("start", replica))
        if revision.name in self.broken:
            raise RuntimeError(self.broken[revision.name])
        if self.hold_starts is not None:
            await self.hold_starts.wait()
        return self.run(replica, revision.function, revision.name)

    async def prepare(self, revision: Revision, progress: Progress | None = None) -> Revision:
        self.actions.append(("prepare", revision.name))
        if self.hold_prepares is not None:
            await self.hold_prepares.wait()
        return revision

    def run(self, replica: str, function: str, revision: str, ready: bool | None = None) -> Running:
        """Put a replica in the engine (as a start would, or as an earlier run left it)."""
        r = Running(replica, function, revision, f"id-{replica}", f"127.0.0.1:{next(self._ports)}")
        self.running[replica] = r
        if self.auto_ready if ready is None else ready:
            self.ready.add(replica)
        return replace(r)

    def crash(self, replica: str, code: int | None = 1) -> None:
        """The replica's process exits under the controller (crash, OOM, kill)."""
        r = self.running[replica]
        r.alive, r.exit_code = False, code
        self.ready.discard(replica)

    def hold_next_list(self) -> asyncio.Event:
        """The next ``list()`` takes its snapshot at once but returns only once the event
        is set (a listing in flight while other things happen)."""
        gate = asyncio.Event()
        self._held_lists.append(gate)
        return gate

    async def wait_ready(self, running: Running, timeout: float) -> bool | None:
        await asyncio.sleep(0)
        return running.replica in self.ready

    async def stop(self, running: Running, grace: float = 10.0) -> None:
        self.actions.append(("stop", running.replica))
        self.stops.append((running.replica, grace))
        self.running.pop(running.replica, None)
        self.ready.discard(running.replica)

    async def list(self) -> list[Running]:
        self.lists += 1
        snapshot = [replace(r) for r in self.running.values()]
        if self._held_lists:
            await self._held_lists.pop(0).wait()
        return snapshot

    async def logs(
        self, running: Running, follow: bool = False, tail: int = 200
    ) -> AsyncIterator[str]:
        for line in self.output.get(running.replica, [])[-tail:]:
            yield line

    def started(self) -> builtins.list[str]:
        return [name for action, name in self.actions if action == "start"]


class PausableFakeDriver(FakeDriver):
    """A ``FakeDriver`` that can freeze replicas (``drivers.base.Pausable``)."""

    name = "fake-pausable"

    def __init__(self) -> None:
        super().__init__()
        self.paused: set[str] = set()

    async def pause(self, running: Running) -> None:
        self.actions.append(("pause", running.replica))
        self.paused.add(running.replica)

    async def unpause(self, running: Running) -> None:
        self.actions.append(("unpause", running.replica))
        self.paused.discard(running.replica)
