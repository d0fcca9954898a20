"""A revision whose container never becomes ready (it runs, but never answers on its
port) is marked failed with the reason, within the startup timeout; the traffic that was
there stays. A driver stands in whose replica is alive and silent: a loopback port
nothing listens on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping

from helpers import free_port

from torpor.controller.reconcile import Controller, Settings
from torpor.drivers.base import Progress, Running
from torpor.model import Function, Revision, Spec, TrafficTarget
from torpor.store.embedded import EmbeddedStore


class SilentDriver:
    name = "silent"

    def __init__(self) -> None:
        self.running: dict[str, Running] = {}
        self.stopped: list[str] = []

    async def prepare(self, revision: Revision, progress: Progress | None = None) -> Revision:
        revision.image = revision.spec.image
        return revision

    async def start(
        self, revision: Revision, replica: str, secret_env: Mapping[str, str] | None = None
    ) -> Running:
        r = Running(
            replica=replica,
            function=revision.function,
            revision=revision.name,
            driver_id=replica,
            endpoint=f"127.0.0.1:{free_port()}",
        )
        self.running[replica] = r
        return r

    async def stop(self, running: Running, grace: float = 10.0) -> None:
        self.stopped.append(running.replica)
        self.running.pop(running.replica, None)

    async def list(self) -> list[Running]:
        return list(self.running.values())

    async def logs(
        self, running: Running, follow: bool = False, tail: int = 200
    ) -> AsyncIterator[str]:
        yield "listening on the wrong port"

    async def remove(self, revision: Revision) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_a_revision_that_never_answers_fails_with_the_reason() -> None:
    store = EmbeddedStore(None)
    good = Revision(
        name="app-00001",
        function="app",
        number=1,
        spec=Spec(name="app", handler=None, image="i:1"),
        status="ready",
        image="i:1",
    )
    new = Revision(
        name="app-00002", function="app", number=2, spec=Spec(name="app", handler=None, image="i:2")
    )
    await store.update_function(
        "app",
        lambda _: Function(
            name="app",
            revisions=[good, new],
            next_number=3,
            traffic=[TrafficTarget(good.name, 100)],
        ),
    )
    driver = SilentDriver()
    ctl = Controller(store, driver, settings=Settings(startup_timeout=1.0, tick=0.05))  # type: ignore[arg-type]
    await ctl.start()
    try:
        deadline = time.monotonic() + 20
        rev = None
        while time.monotonic() < deadline:
            fn = await store.get_function("app")
            rev = fn.revision("app-00002") if fn else None
            if rev is not None and rev.status == "failed":
                break
            await asyncio.sleep(0.05)
        assert rev is not None and rev.status == "failed", rev
        assert rev.reason.startswith("replica not ready within 1s"), rev.reason
        assert "listening on the wrong port" in rev.reason  # the log's tail comes with it
        fn = await store.get_function("app")
        assert fn is not None and [(t.revision, t.percent) for t in fn.traffic] == [
            ("app-00001", 100)
        ]
        assert driver.stopped  # the silent replica was stopped
    finally:
        await ctl.stop()
