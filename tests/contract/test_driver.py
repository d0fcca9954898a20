"""One contract for every driver: ``process``, ``docker`` (``-m docker`` / ``-m "not docker"``)
and ``kubernetes``.

Each test deploys a tiny function folder (written into tmp_path) as a revision, starts
replicas through the driver and talks to them over loopback HTTP. The docker variant
FAILS (never skips) when no Docker Engine answers: CI installs one with
.ci/install-docker.sh. The kubernetes variant runs against tests/k8s_sim.py, a simulated
API server whose "kubelet" runs each Pod as a local process of the generic runtime
(``torpor/runtime/fetch.py``, which fetches the revision's archive from a loopback archive
server) at a Pod IP of its own in 127.0.0.0/8; the Pod's hardening is not enforced there
(see the sim's docstring). Everything a test starts or builds is removed afterwards.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from torpor.drivers.base import Running
from torpor.model import Revision, Spec

HANDLER = """\
import os
import time

print("torpor-test: handler imported", flush=True)


def handle(request):
    if request.path == "/slow":
        print("torpor-test: slow started", flush=True)
        time.sleep(2.0)
        return "slow done"
    if request.path == "/env":
        return os.environ.get("GREETING", "<unset>")
    if request.path == "/log":
        print("torpor-test: logged a line", flush=True)
        return "logged"
    if request.path == "/contract":
        import select
        import tempfile

        with tempfile.NamedTemporaryFile(dir="/tmp") as f:
            f.write(b"x")
        ready, _, _ = select.select([0], [], [], 0)
        stdin = "eof" if ready and os.read(0, 1) == b"" else "open"
        env = {k: os.environ.get(k) for k in ("K_SERVICE", "K_CONFIGURATION", "K_REVISION")}
        return {**env, "PORT": os.environ.get("PORT"), "tmp": "writable", "stdin": stdin}
    return "hello from torpor"
"""

BROKEN = """\
raise RuntimeError("this module fails to import")


def handle(request):
    return "never"
"""

HEALTH_TIMEOUT = 30.0


class Harness:
    """A driver plus bookkeeping so that every test cleans up after itself."""

    def __init__(
        self,
        kind: str,
        tmp: Path,
        make: Callable[[Path], Any],
        on_revision: Callable[[Revision], None] | None = None,
    ) -> None:
        self.kind = kind
        self.tmp = tmp
        self.state = tmp / "state"
        self.make = make
        self.on_revision = on_revision  # what a deploy would add (kubernetes: the archive)
        self.driver = make(self.state)
        self.drivers = [self.driver]
        self.prepared: list[Revision] = []
        self.finalizers: list[Callable[[], None]] = []
        self._n = 0

    def new_driver(self) -> Any:
        """Another driver instance on the same state directory (a restarted controller)."""
        d = self.make(self.state)
        self.drivers.append(d)
        return d

    def revision(self, handler: str = HANDLER, env: dict[str, str] | None = None) -> Revision:
        self._n += 1
        fn = f"ct-{uuid.uuid4().hex[:8]}"
        src = self.tmp / f"src{self._n}"
        src.mkdir()
        (src / "handler.py").write_text(handler)
        (src / "torpor.yaml").write_text(f"name: {fn}\nhandler: handler:handle\n")
        rev_dir = self.tmp / f"rev{self._n}"  # the immutable copy a deploy makes
        shutil.copytree(src, rev_dir)
        spec = Spec(name=fn, handler="handler:handle", env=dict(env or {}))
        rev = Revision(name=f"{fn}-00001", function=fn, number=1, spec=spec, source=str(rev_dir))
        if self.on_revision is not None:
            self.on_revision(rev)
        return rev

    async def prepare(self, rev: Revision) -> Revision:
        self.prepared.append(rev)
        return await self.driver.prepare(rev, progress=lambda _line: None)

    async def start(self, rev: Revision, replica: str | None = None) -> Running:
        replica = replica or f"{rev.name}-r{uuid.uuid4().hex[:5]}"
        return await self.driver.start(rev, replica)

    async def up(self, **kw: Any) -> tuple[Revision, Running]:
        rev = await self.prepare(self.revision(**kw))
        running = await self.start(rev)
        await wait_healthy(running.endpoint)
        return rev, running

    async def cleanup(self) -> None:
        for d in self.drivers:
            for r in await d.list():
                await d.stop(r, grace=0)
        for rev in self.prepared:
            await self.driver.remove(rev)
        for d in self.drivers:
            await d.close()
        for fin in self.finalizers:
            fin()


def _process(state: Path) -> Any:
    from torpor.drivers.process import ProcessDriver

    return ProcessDriver(state)


def _docker(state: Path) -> Any:
    import docker

    from torpor.drivers.baseimage import BaseImageError, build_base_image
    from torpor.drivers.docker import DockerDriver

    try:
        client = docker.from_env(timeout=10)
        client.ping()
        client.close()
    except Exception as e:
        pytest.fail(f"Docker Engine unreachable ({e}); install and start it: .ci/install-docker.sh")
    try:
        build_base_image(progress=lambda _line: None)  # no-op when present
    except BaseImageError as e:
        pytest.fail(f"base image unavailable: {e}")
    return DockerDriver(state)


def _wildcard_free_port() -> int:
    """A port nothing listens on, not even on 0.0.0.0 (which would clash with a Pod IP)."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def _kubernetes_harness(tmp: Path) -> Harness:
    from archive_server import ArchiveServer
    from k8s_sim import SimCluster
    from lightkube import KubeConfig

    from torpor.drivers.kubernetes import KubernetesDriver
    from torpor.runtime import fetch

    image = "torpor/runtime:contract"
    sim = SimCluster(
        ("torpor-test",), images={image: [sys.executable, "-s", fetch.__file__]}
    ).start()
    key = os.urandom(32)
    archives = ArchiveServer(key=key).start()  # each Pod must bring its archive's own token
    config = KubeConfig.from_dict(sim.kubeconfig())

    def make(state: Path) -> Any:
        from torpor.drivers.docker import instance_id

        d = KubernetesDriver(
            instance_id(state),
            "torpor-test",
            config,
            runtime_image=image,
            archive_url_base=archives.base,
            trust_env=False,
        )
        d.use_archive_key(key)  # as the controller does at start
        return d

    def on_revision(rev: Revision) -> None:  # what cluster mode's API records on deploy
        assert rev.source is not None
        rev.source_sha256 = archives.add_folder(Path(rev.source))
        rev.spec.port = _wildcard_free_port()  # every Pod of the revision on it, each at its own IP

    harness = Harness("kubernetes", tmp, make, on_revision)
    harness.finalizers += [sim.stop, archives.stop]
    return harness


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker), "kubernetes"])
async def h(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    if request.param == "kubernetes":
        harness = _kubernetes_harness(tmp_path)
    else:
        harness = Harness(
            request.param, tmp_path, _process if request.param == "process" else _docker
        )
    try:
        yield harness
    finally:
        await harness.cleanup()


async def wait_healthy(endpoint: str, timeout: float = HEALTH_TIMEOUT) -> None:
    assert endpoint, "replica has no endpoint"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: object = None
    async with httpx.AsyncClient(trust_env=False) as client:
        while loop.time() < deadline:
            try:
                r = await client.get(f"http://{endpoint}/_torpor/health", timeout=2.0)
                if r.status_code == 200:
                    return
                last = r.status_code
            except httpx.TransportError as e:
                last = repr(e)
            await asyncio.sleep(0.05)
    pytest.fail(f"{endpoint} not healthy within {timeout}s (last: {last})")


async def get(endpoint: str, path: str = "/", timeout: float = 10.0) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False) as client:
        return await client.get(f"http://{endpoint}{path}", timeout=timeout)


async def refuses(endpoint: str, timeout: float = 10.0) -> bool:
    """True once nothing serves on ``endpoint`` (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        try:
            await get(endpoint, "/_torpor/health", timeout=1.0)
        except httpx.TransportError:
            return True
        await asyncio.sleep(0.1)
    return False


async def wait_for_log(driver: Any, running: Running, text: str, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        lines = [line async for line in driver.logs(running, tail=100)]
        if any(text in line for line in lines):
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"{text!r} not in the logs of {running.replica} within {timeout}s")


async def find(driver: Any, replica: str) -> Running | None:
    for r in await driver.list():
        if r.replica == replica:
            return r
    return None


async def test_start_serves_the_handler(h: Harness) -> None:
    rev, running = await h.up()
    assert running.function == rev.function
    assert running.revision == rev.name
    host = running.endpoint.rpartition(":")[0]
    assert ipaddress.ip_address(
        host
    ).is_loopback  # 127.0.0.1 (process, docker) or a Pod IP in 127/8 (sim)
    assert running.driver_id
    r = await get(running.endpoint)
    assert r.status_code == 200
    assert r.text == "hello from torpor"


async def test_env_from_spec_reaches_the_handler(h: Harness) -> None:
    _, running = await h.up(env={"GREETING": "bonjour"})
    r = await get(running.endpoint, "/env")
    assert r.status_code == 200
    assert r.text == "bonjour"


async def test_replicas_see_the_knative_runtime_contract(h: Harness) -> None:
    """K_SERVICE, K_CONFIGURATION and K_REVISION next to PORT, a writable /tmp, stdin at EOF."""
    rev, running = await h.up()
    r = await get(running.endpoint, "/contract")
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["PORT"] == running.endpoint.rpartition(":")[2] or h.kind != "process"
    assert int(got["PORT"]) > 0
    assert {k: got[k] for k in ("K_SERVICE", "K_CONFIGURATION", "K_REVISION")} == {
        "K_SERVICE": rev.function,
        "K_CONFIGURATION": rev.function,
        "K_REVISION": rev.name,
    }
    assert (got["tmp"], got["stdin"]) == ("writable", "eof")


async def test_list_shows_the_replica_with_its_labels(h: Harness) -> None:
    rev, running = await h.up()
    found = await find(h.driver, running.replica)
    assert found is not None
    assert (found.function, found.revision, found.replica) == (
        rev.function,
        rev.name,
        running.replica,
    )
    assert found.alive
    assert found.exit_code is None
    assert found.endpoint == running.endpoint
    assert found.driver_id == running.driver_id


async def test_stop_removes_the_replica_and_its_endpoint(h: Harness) -> None:
    _, running = await h.up()
    await h.driver.stop(running, grace=5)
    found = await find(h.driver, running.replica)
    assert found is None or not found.alive
    assert await refuses(running.endpoint)
    await h.driver.stop(running, grace=5)  # idempotent


async def test_stop_drains_an_in_flight_request(h: Harness) -> None:
    _, running = await h.up()
    slow = asyncio.create_task(get(running.endpoint, "/slow", timeout=20.0))
    await wait_for_log(h.driver, running, "torpor-test: slow started")  # in the handler now
    await h.driver.stop(running, grace=10)
    r = await asyncio.wait_for(slow, 20.0)
    assert r.status_code == 200
    assert r.text == "slow done"
    assert await refuses(running.endpoint)


async def test_a_handler_that_fails_to_import_exits(h: Harness) -> None:
    rev = await h.prepare(h.revision(handler=BROKEN))
    running = await h.start(rev)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + HEALTH_TIMEOUT
    found = await find(h.driver, running.replica)
    while loop.time() < deadline and found is not None and found.alive:
        await asyncio.sleep(0.1)
        found = await find(h.driver, running.replica)
    assert found is not None, "an exited replica stays listed until stopped"
    assert not found.alive
    assert found.exit_code is not None and found.exit_code != 0
    await h.driver.stop(found, grace=1)
    assert await find(h.driver, running.replica) is None


async def test_a_new_driver_adopts_what_the_first_started(h: Harness) -> None:
    rev, running = await h.up()
    second = h.new_driver()
    found = await find(second, running.replica)
    assert found is not None
    assert found.alive
    assert (found.function, found.revision) == (rev.function, rev.name)
    assert found.endpoint == running.endpoint
    r = await get(found.endpoint)
    assert r.text == "hello from torpor"
    await second.stop(found, grace=5)
    assert await refuses(running.endpoint)
    gone = await find(h.driver, running.replica)
    assert gone is None or not gone.alive


async def test_logs_tail_and_follow(h: Harness) -> None:
    _, running = await h.up()

    async def collect(follow: bool, until: str, into: list[str] | None = None) -> list[str]:
        lines: list[str] = [] if into is None else into
        gen = h.driver.logs(running, follow=follow, tail=50)
        try:
            async for line in gen:
                lines.append(line)
                if until in line:
                    break
        finally:
            await gen.aclose()
        return lines

    lines = await asyncio.wait_for(collect(False, "handler imported"), 15)
    assert any("torpor-test: handler imported" in line for line in lines)

    followed: list[str] = []
    follower = asyncio.create_task(collect(True, "logged a line", followed))
    # the follower is attached once it has the tail; the next line must reach it live
    deadline = asyncio.get_running_loop().time() + 15
    while not any("handler imported" in line for line in followed):
        assert asyncio.get_running_loop().time() < deadline, "the follower got no tail"
        assert not follower.done(), follower
        await asyncio.sleep(0.01)
    assert (await get(running.endpoint, "/log")).text == "logged"
    lines = await asyncio.wait_for(follower, 15)
    assert any("torpor-test: logged a line" in line for line in lines)


async def test_remove_is_idempotent(h: Harness) -> None:
    rev = await h.prepare(h.revision())
    await h.driver.remove(rev)
    await h.driver.remove(rev)
