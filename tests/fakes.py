"""Fakes for unit tests of pure logic (never for integration tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping

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
