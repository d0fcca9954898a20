"""The Docker driver's warm pool against a real engine: a pooled container becomes a
replica of exactly one revision (its archive checked by hash, its env and secrets), is
never handed to another function, and is adopted again after a restart from the
controller's record; pool size 0 is the plain ``docker run`` of before.

Marked ``docker``: these FAIL (never skip) when no engine answers."""

from __future__ import annotations

import asyncio
import http.client
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest

from torpor.drivers.base import BuildError, Running
from torpor.drivers.baseimage import BaseImageError, build_base_image
from torpor.drivers.docker import INSTANCE, DockerDriver
from torpor.drivers.dockerpool import POOL_LABEL, SPECIALISE_PATH
from torpor.model import MiB, Resources, Revision, Spec
from torpor.sources import pack

pytestmark = pytest.mark.docker

HANDLER = """\
import json
import os


def handle(request):
    if request.path == "/env":
        return json.dumps({k: os.environ.get(k) for k in
                           ("GREETING", "API_KEY", "TORPOR_POOL_TOKEN", "TORPOR_FUNCTION",
                            "TORPOR_REPLICA", "K_REVISION", "PORT")})
    if request.path == "/whoami":
        try:
            open("/tmp/fn/written-by-replica", "w").close()
            writable = True
        except OSError:
            writable = False
        return json.dumps({"uid": os.getuid(), "gid": os.getgid(), "fn_writable": writable})
    return "hello from " + os.environ["TORPOR_FUNCTION"]
"""


@pytest.fixture(scope="module")
def engine() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as e:
        pytest.fail(f"Docker Engine unreachable ({e}); install and start it: .ci/install-docker.sh")
    try:
        build_base_image(progress=lambda _line: None)  # no-op when present
    except BaseImageError as e:
        pytest.fail(f"base image unavailable: {e}")
    yield client
    client.close()


class Env:
    def __init__(self, tmp: Path, engine: docker.DockerClient, pool: int) -> None:
        self.tmp = tmp
        self.engine = engine
        self.pool = pool
        self.driver = DockerDriver(tmp / "state", pool_size=pool)
        self.prepared: list[Revision] = []
        self._n = 0

    def revision(self, handler: str = HANDLER, **spec: Any) -> Revision:
        self._n += 1
        fn = f"pl-{uuid.uuid4().hex[:8]}"
        src = self.tmp / f"rev{self._n}"
        src.mkdir()
        (src / "handler.py").write_text(handler)
        s = Spec(name=fn, handler="handler:handle", **spec)
        rev = Revision(name=f"{fn}-00001", function=fn, number=1, spec=s, source=str(src))
        rev.source_sha256 = pack(src).sha256  # as the API stores it
        return rev

    async def prepare(self, rev: Revision) -> Revision:
        self.prepared.append(rev)
        rev = await self.driver.prepare(rev)
        if self.pool:
            self.driver.pool.start()
            assert await self.driver.pool.wait_full(120), "the pool did not fill"
        return rev

    def containers(self) -> list[Any]:
        mine = {"label": f"{INSTANCE}={self.driver.instance}"}
        return list(self.engine.containers.list(all=True, filters=mine))

    async def cleanup(self) -> None:
        for r in await self.driver.list():
            await self.driver.stop(r, grace=0)
        for rev in self.prepared:
            await self.driver.remove(rev)
        await self.driver.close()
        for c in self.containers():  # whatever a failed test left
            c.remove(force=True)


@pytest.fixture
async def env(tmp_path: Path, engine: docker.DockerClient) -> AsyncIterator[Env]:
    e = Env(tmp_path, engine, pool=2)
    try:
        yield e
    finally:
        await e.cleanup()


async def wait_healthy(endpoint: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with httpx.AsyncClient(trust_env=False) as client:
        while loop.time() < deadline:
            try:
                r = await client.get(f"http://{endpoint}/_torpor/health", timeout=2.0)
                if r.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.02)
    pytest.fail(f"{endpoint} not healthy within {timeout}s")


async def get(endpoint: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False) as client:
        return await client.get(f"http://{endpoint}{path}", timeout=10.0)


async def up(env: Env, rev: Revision, secrets: dict[str, str] | None = None) -> Running:
    running = await env.driver.start(rev, f"{rev.name}-r{uuid.uuid4().hex[:5]}", secret_env=secrets)
    await wait_healthy(running.endpoint)
    return running


async def test_a_pooled_replica_serves_its_function_with_its_env_and_secrets(env: Env) -> None:
    rev = await env.prepare(
        env.revision(env={"GREETING": "hi"}, resources=Resources(cpu=0.25, memory=128 * MiB))
    )
    waiting = env.driver.pool.ids()
    running = await up(env, rev, secrets={"API_KEY": "s3cr3t"})
    assert running.driver_id in waiting, "the start took a pool member"
    assert running.driver_id not in env.driver.pool.ids()
    assert env.engine.containers.get(running.driver_id).name == f"torpor-{running.replica}"

    r = await get(running.endpoint, "/")
    assert r.status_code == 200 and r.text == f"hello from {rev.function}"
    seen = json.loads((await get(running.endpoint, "/env")).text)
    assert seen == {
        "GREETING": "hi",
        "API_KEY": "s3cr3t",
        "TORPOR_POOL_TOKEN": None,  # the pool's token never reaches the function
        "TORPOR_FUNCTION": rev.function,
        "TORPOR_REPLICA": running.replica,
        "K_REVISION": rev.name,
        "PORT": "8080",
    }
    who = json.loads((await get(running.endpoint, "/whoami")).text)
    assert who == {"uid": 65534, "gid": 65534, "fn_writable": False}

    c = env.engine.containers.get(running.driver_id)
    hc = c.attrs["HostConfig"]
    assert hc["Memory"] == 128 * MiB  # docker update: the revision's limits, not the class's
    assert hc["NanoCpus"] == 250_000_000
    assert hc["ReadonlyRootfs"] is True and hc["Privileged"] is False
    assert hc["CapDrop"] == ["ALL"] and "no-new-privileges" in hc["SecurityOpt"]
    assert hc["PidsLimit"] and hc["PidsLimit"] > 0
    assert not hc.get("Binds") and not c.attrs.get("Mounts")
    assert c.attrs["Config"]["User"] == "65534:65534"
    assert all(b["HostIp"] == "127.0.0.1" for b in hc["PortBindings"]["8080/tcp"])
    env_config = "\n".join(c.attrs["Config"]["Env"])
    assert "s3cr3t" not in env_config, "secrets travel in the specialise request only"
    nets = c.attrs["NetworkSettings"]["Networks"]
    (net,) = nets
    options = env.engine.networks.get(net).attrs["Options"]
    assert options["com.docker.network.bridge.enable_icc"] == "false"

    (listed,) = [x for x in await env.driver.list() if x.driver_id == running.driver_id]
    assert (listed.function, listed.revision, listed.replica) == (
        rev.function,
        rev.name,
        running.replica,
    )
    assert listed.alive and listed.endpoint == running.endpoint


async def test_waiting_members_are_no_replicas_and_refuse_a_wrong_token(env: Env) -> None:
    await env.prepare(env.revision())
    assert await env.driver.list() == []  # two members wait, no replica
    member = env.driver.pool.idle[0]
    host, _, port = member.endpoint.rpartition(":")
    for token in ("wrong", ""):
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        try:
            conn.request(
                "POST", SPECIALISE_PATH, body=b"{}\n", headers={"Authorization": f"Bearer {token}"}
            )
            with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
                conn.getresponse()  # closed without an answer
        finally:
            conn.close()
    with pytest.raises(httpx.TransportError):  # any status line would read "ready"
        await get(member.endpoint, "/_torpor/health")
    assert env.driver.pool.ids() >= {member.container_id}, "still waiting for the real one"


async def test_a_used_container_never_serves_another_function(env: Env) -> None:
    first = await env.prepare(env.revision())
    a = await up(env, first)
    second = await env.prepare(env.revision())
    await env.driver.stop(a, grace=0)
    assert a.driver_id not in env.driver.pool.ids()
    b = await up(env, second)
    assert b.driver_id != a.driver_id
    assert (await get(b.endpoint, "/")).text == f"hello from {second.function}"
    with pytest.raises(docker.errors.NotFound):
        env.engine.containers.get(a.driver_id)  # stopped is removed, not pooled again


async def test_a_specialised_container_takes_no_second_specialise_request(env: Env) -> None:
    rev = await env.prepare(env.revision())
    member = env.driver.pool.idle[0]
    running = await up(env, rev)
    assert running.driver_id == member.container_id
    other = env.revision(handler="def handle(r):\n    return 'hijacked'\n")
    packed = pack(Path(other.source or ""))
    meta = json.dumps({"sha256": packed.sha256, "env": {}}).encode()
    host, port = member.endpoint.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request(
            "POST",
            SPECIALISE_PATH,
            body=meta + b"\n" + packed.data,
            headers={"Authorization": f"Bearer {member.token}"},
        )
        resp = conn.getresponse()
        assert resp.status == 404  # the function's runtime now: /_torpor/ is reserved
    finally:
        conn.close()
    assert (await get(running.endpoint, "/")).text == f"hello from {rev.function}"


async def test_a_tampered_archive_is_refused_and_the_container_discarded(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    rev = await env.prepare(env.revision())
    honest = env.driver._archive

    def tampered(r: Revision) -> tuple[str, bytes]:  # bytes changed on the way, same hash
        want, _ = honest(r)
        evil = env.revision(handler="def handle(r):\n    return 'tampered'\n")
        return want, pack(Path(evil.source or "")).data

    monkeypatch.setattr(env.driver, "_archive", tampered)
    waiting = env.driver.pool.ids()
    with pytest.raises(BuildError, match="sha256 mismatch"):
        await env.driver.start(rev, f"{rev.name}-rbad")
    gone = waiting - env.driver.pool.ids()
    assert len(gone) == 1
    with pytest.raises(docker.errors.NotFound):
        env.engine.containers.get(gone.pop())
    assert await env.driver.list() == []


async def test_a_folder_that_no_longer_matches_its_hash_runs_its_image(env: Env) -> None:
    rev = await env.prepare(env.revision())
    Path(rev.source or "", "handler.py").write_text("def handle(r):\n    return 'changed'\n")
    waiting = env.driver.pool.ids()
    running = await up(env, rev)
    assert running.driver_id not in waiting and env.driver.pool.ids() == waiting
    assert env.engine.containers.get(running.driver_id).image.tags == [rev.image]
    assert (await get(running.endpoint, "/")).text == f"hello from {rev.function}"


async def test_a_restarted_driver_adopts_a_pooled_replica_from_the_record(
    env: Env, tmp_path: Path
) -> None:
    rev = await env.prepare(env.revision())
    env.driver.pool.size = 1  # no refill after the take: the run "dies" with one waiting
    running = await up(env, rev)
    left_waiting = env.driver.pool.ids()
    assert left_waiting
    want = [(running.driver_id, rev.function, rev.name, running.replica)]
    # the controller dies (no close): a new driver on the same state directory
    again = DockerDriver(tmp_path / "state", pool_size=2)
    elsewhere = DockerDriver(tmp_path / "elsewhere", pool_size=0)  # a store shared by another
    elsewhere.use_instance(env.driver.instance)
    try:
        listed = await again.list()
        assert [(r.driver_id, r.function, r.revision, r.replica) for r in listed] == want
        assert [r for r in await elsewhere.list() if r.driver_id == running.driver_id] == [], (
            "without a record a pool member is no replica"
        )
        await elsewhere.recall(want)  # the controller's replica records
        assert [
            (r.driver_id, r.function, r.revision, r.replica) for r in await elsewhere.list()
        ] == want
        await again.recall(want)
        assert [
            (r.driver_id, r.function, r.revision, r.replica) for r in await again.list()
        ] == want

        def gone(cid: str) -> bool:
            try:
                env.engine.containers.get(cid)
            except docker.errors.NotFound:
                return True
            return False

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not all(gone(cid) for cid in left_waiting):  # removed in the background
            assert loop.time() < deadline, "the dead run's waiting members are still there"
            await asyncio.sleep(0.05)
        assert (await get(listed[0].endpoint, "/")).text == f"hello from {rev.function}"
        assert await again.pool.wait_full(120)
        await again.stop(listed[0], grace=0)
        assert await again.list() == []
    finally:
        env.driver.pool.idle.clear()  # removed above; the old driver must not count them
        await again.close()
        await elsewhere.close()
    assert [c.id for c in env.containers() if POOL_LABEL in c.labels] == []


async def test_pool_size_zero_is_a_plain_docker_run(
    tmp_path: Path, engine: docker.DockerClient
) -> None:
    e = Env(tmp_path, engine, pool=0)
    try:
        rev = await e.prepare(e.revision())
        running = await up(e, rev)
        c = engine.containers.get(running.driver_id)
        assert c.name == f"torpor-{running.replica}"
        assert c.labels["torpor.function"] == rev.function
        assert c.labels["torpor.replica"] == running.replica
        assert POOL_LABEL not in c.labels
        assert c.image.tags == [rev.image]
        assert [x.id for x in e.containers()] == [c.id], "no pool container is made"
    finally:
        await e.cleanup()
