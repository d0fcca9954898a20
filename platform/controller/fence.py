"""Fencing: what a controller may do only while it leads.

A leader's view of the platform is wrapped so that a deposed leader that wakes up late
(SIGSTOP, a long pause, a partition) cannot act:

- ``FencedDriver`` asks ``check()`` (the leadership's local validity) before every driver
  action (prepare, start, stop, pause, unpause, remove; pause and unpause exist only when
  the driver has them, so that ``hasattr`` still tells). Reads (list, logs) pass.
- ``FencedStore`` asks ``check()`` before every write, and on a Redis store writes
  through ``RedisStore.fenced(lease key, token)``, so Redis itself refuses a write whose
  token is not the lease's current one (``FencedError``), even if the local check passed
  a moment before.

Both raise ``FencedError``; the controller treats it as "I no longer lead".
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from torpor.drivers.base import Driver, Progress, Running
from torpor.model import Event, Function, Replica, Revision, SecretInfo
from torpor.store.base import FencedError, Mutator, Store

__all__ = ["FencedDriver", "FencedError", "FencedStore", "fence_store"]

Check = Callable[[], bool]


def _require(check: Check, what: str) -> None:
    if not check():
        raise FencedError(f"{what}: this controller no longer holds the lease")


class FencedDriver:
    """``driver`` with a lease check before every action."""

    def __init__(self, driver: Driver, check: Check) -> None:
        self.inner = driver
        self.check = check
        self.name = driver.name
        self.busy: set[str] = set()  # replicas being started or stopped right now

    def __getattr__(self, name: str) -> Any:  # anything else of the driver (ping, instance...)
        if name in ("pause", "unpause"):  # only a driver that can (``drivers.base.Pausable``)
            action = getattr(self.inner, name)  # AttributeError: this one cannot
            return functools.partial(self._fenced, name, action)
        return getattr(self.inner, name)

    async def _fenced(self, what: str, action: Any, running: Running) -> None:
        _require(self.check, f"{what} of {running.replica}")
        await action(running)

    async def prepare(self, revision: Revision, progress: Progress | None = None) -> Revision:
        _require(self.check, f"build of {revision.name}")
        return await self.inner.prepare(revision, progress)

    async def start(
        self, revision: Revision, replica: str, secret_env: Mapping[str, str] | None = None
    ) -> Running:
        _require(self.check, f"start of {replica}")
        self.busy.add(replica)
        try:
            return await self.inner.start(revision, replica, secret_env=secret_env)
        finally:
            self.busy.discard(replica)

    async def stop(self, running: Running, grace: float = 10.0) -> None:
        _require(self.check, f"stop of {running.replica}")
        self.busy.add(running.replica)
        try:
            await self.inner.stop(running, grace=grace)
        finally:
            self.busy.discard(running.replica)

    async def remove(self, revision: Revision) -> None:
        _require(self.check, f"removal of {revision.name}")
        await self.inner.remove(revision)

    async def list(self) -> list[Running]:
        return await self.inner.list()

    def logs(self, running: Running, follow: bool = False, tail: int = 200) -> AsyncIterator[str]:
        return self.inner.logs(running, follow=follow, tail=tail)

    async def close(self) -> None:
        await self.inner.close()


class FencedStore:
    """``store`` (or its Redis fenced view) with a lease check before every write."""

    def __init__(self, store: Store, check: Check) -> None:
        self.inner = store
        self.check = check

    def __getattr__(self, name: str) -> Any:  # reads, the bus, presence: the store's own
        return getattr(self.inner, name)

    async def update_function(self, name: str, mutate: Mutator) -> Function | None:
        _require(self.check, f"update of function {name!r}")
        return await self.inner.update_function(name, mutate)

    async def delete_function(self, name: str) -> bool:
        _require(self.check, f"deletion of function {name!r}")
        return await self.inner.delete_function(name)

    async def put_replica(self, replica: Replica) -> None:
        _require(self.check, f"write of replica {replica.name!r}")
        await self.inner.put_replica(replica)

    async def delete_replica(self, function: str, name: str) -> None:
        _require(self.check, f"deletion of replica {name!r}")
        await self.inner.delete_replica(function, name)

    async def add_event(self, event: Event) -> None:
        _require(self.check, f"event of {event.function!r}")
        await self.inner.add_event(event)

    async def put_secret(self, name: str, value: bytes) -> SecretInfo:
        _require(self.check, f"write of secret {name!r}")
        return await self.inner.put_secret(name, value)

    async def delete_secret(self, name: str) -> bool:
        _require(self.check, f"deletion of secret {name!r}")
        return await self.inner.delete_secret(name)

    async def put_blob(self, sha: str, data: bytes) -> None:
        _require(self.check, f"write of blob {sha[:12]}")
        await self.inner.put_blob(sha, data)

    async def delete_blob(self, sha: str) -> bool:
        _require(self.check, f"deletion of blob {sha[:12]}")
        return await self.inner.delete_blob(sha)

    async def close(self) -> None:
        """The view never closes the store it wraps."""


def fence_store(store: Store, lease_key: str | None, token: int, check: Check) -> Store:
    """The leader's view of ``store``: checked locally, and by Redis itself when the
    store is a ``RedisStore`` and the lease lives in it (``lease_key``)."""
    fenced = getattr(store, "fenced", None)
    inner = fenced(lease_key, token) if fenced is not None and lease_key else store
    return FencedStore(inner, check)  # type: ignore[return-value]
