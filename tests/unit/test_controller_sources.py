"""The controller hands drivers its own unpacked copy of a revision's archive, fetched from
the store by hash: a recording driver stands in for a real one and shows what it got."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from fakes import Clock, NullDriver

from torpor.controller.reconcile import Controller, Settings
from torpor.drivers.base import Progress, Running
from torpor.model import Function, Revision, ScaleOverride, Spec, TrafficTarget
from torpor.sources import pack
from torpor.store.embedded import EmbeddedStore


class RecordingDriver(NullDriver):
    name = "recording"

    def __init__(self) -> None:
        self.prepared: list[tuple[str, str | None]] = []
        self.started: list[tuple[str, str | None]] = []
        self.seen_files: list[str] = []

    async def prepare(self, revision: Revision, progress: Progress | None = None) -> Revision:
        self.prepared.append((revision.name, revision.source))
        return revision

    async def start(
        self, revision: Revision, replica: str, secret_env: Mapping[str, str] | None = None
    ) -> Running:
        self.started.append((revision.name, revision.source))
        assert revision.source is not None
        self.seen_files.append((Path(revision.source) / "handler.py").read_text())
        raise RuntimeError("no engine here")  # all the test needs is what start() was given


async def _setup(
    tmp: Path, status: str = "ready", image: str | None = ""
) -> tuple[EmbeddedStore, RecordingDriver, Controller, str]:
    src = tmp / "src"
    src.mkdir()
    (src / "handler.py").write_text("def handle(request):\n    return 'from the archive'\n")
    packed = pack(src)
    store = EmbeddedStore(tmp / "store")
    await store.put_blob(packed.sha256, packed.data)
    rev = Revision(
        name="hello-00001",
        function="hello",
        number=1,
        spec=Spec(name="hello"),
        status=status,  # type: ignore[arg-type]
        image=image,
        source_sha256=packed.sha256,
    )
    fn = Function(
        name="hello",
        revisions=[rev],
        traffic=[TrafficTarget(rev.name, 100)],
        scale=ScaleOverride(min=1),
    )
    await store.update_function("hello", lambda _cur: fn)
    driver = RecordingDriver()
    ctl = Controller(
        store,
        driver,
        settings=Settings(backoff_base=1000.0, source_cache=tmp / "cache"),  # type: ignore[arg-type]
        clock=Clock(),
    )
    ctl.functions = {"hello": fn}
    ctl.synced.set()
    return store, driver, ctl, packed.sha256


async def _settle(ctl: Controller, until: Any) -> None:
    for _ in range(200):
        if until():
            return
        await ctl.reconcile()
        await asyncio.sleep(0.01)
    raise AssertionError("the controller did not get there")


async def test_a_start_gets_the_controllers_own_copy_and_a_new_copy_is_prepared_again(
    tmp_path: Path,
) -> None:
    store, driver, ctl, sha = await _setup(tmp_path)
    await _settle(ctl, lambda: driver.started)
    cached = str(tmp_path / "cache" / sha)
    assert driver.started[0] == ("hello-00001", cached)
    assert driver.seen_files[0] == "def handle(request):\n    return 'from the archive'\n"
    # a ready revision prepared into its folder (no image): this controller's copy is new,
    # so what the driver installs there (the process driver's .deps) is made again
    assert driver.prepared == [("hello-00001", cached)]
    # the revision in the store still names no folder
    fn = await store.get_function("hello")
    assert fn is not None and fn.revisions[0].source is None
    await store.close()


async def test_a_build_is_prepared_on_the_cached_copy(tmp_path: Path) -> None:
    store, driver, ctl, sha = await _setup(tmp_path, status="building", image=None)
    await _settle(ctl, lambda: driver.started)
    cached = str(tmp_path / "cache" / sha)
    assert driver.prepared == [("hello-00001", cached)]  # once: the build; the start found the copy
    assert driver.started[0] == ("hello-00001", cached)
    await store.close()


async def test_an_archive_missing_from_the_store_fails_the_build_with_a_reason(
    tmp_path: Path,
) -> None:
    store, driver, ctl, sha = await _setup(tmp_path, status="building", image=None)
    await store.delete_blob(sha)

    async def failed() -> bool:
        fn = await store.get_function("hello")
        return fn is not None and fn.revisions[0].status == "failed"

    for _ in range(200):
        if await failed():
            break
        await ctl.reconcile()
        await asyncio.sleep(0.01)
    fn = await store.get_function("hello")
    assert fn is not None and "not in the store" in fn.revisions[0].reason, fn.revisions[0].reason
    assert driver.prepared == [] and driver.started == []
    await store.close()


@pytest.mark.security
async def test_an_archive_changed_in_the_store_is_never_run(tmp_path: Path, attack: Any) -> None:
    """Replace a function's archive in the store's files with other code (same name, other bytes)"""
    store, driver, ctl, sha = await _setup(tmp_path, status="building", image=None)
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "handler.py").write_text(
        "import os\ndef handle(request):\n    return str(os.environ)\n"
    )
    (tmp_path / "store" / "blobs" / sha).write_bytes(pack(evil).data)  # behind the store's back

    for _ in range(200):
        fn = await store.get_function("hello")
        if fn is not None and fn.revisions[0].status == "failed":
            break
        await ctl.reconcile()
        await asyncio.sleep(0.01)
    fn = await store.get_function("hello")
    assert fn is not None and fn.revisions[0].status == "failed"
    assert "does not match its hash" in fn.revisions[0].reason
    assert driver.prepared == [] and driver.started == []
    assert not (tmp_path / "cache" / sha).exists()
    attack.ended(f"build failed: {fn.revisions[0].reason}")
    await store.close()
