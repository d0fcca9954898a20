"""Docker-only behaviour of the docker driver, against a real Docker Engine.

Marked ``docker``: these FAIL (never skip) when no engine answers; CI installs one with
.ci/install-docker.sh. Every container and image a test creates is removed afterwards.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx
import pytest
from archives import pip_shadow, sdist

from torpor.drivers.base import BuildError, Running
from torpor.drivers.baseimage import BaseImageError, build_base_image, debian_mirror
from torpor.drivers.docker import DockerDriver, image_name
from torpor.model import MiB, Resources, Revision, Spec

pytestmark = pytest.mark.docker

HANDLER = """\
import json
import os


def handle(request):
    if request.path == "/whoami":
        try:
            open("/fn/written-by-replica", "w").close()
            writable = True
        except OSError:
            writable = False
        try:
            open("/tmp/scratch", "w").close()
            tmp_writable = True
        except OSError:
            tmp_writable = False
        return json.dumps({"uid": os.getuid(), "gid": os.getgid(),
                           "root_writable": writable, "tmp_writable": tmp_writable})
    if request.path == "/leak":
        try:
            with open("leak.txt") as f:
                return f.read()
        except OSError as e:
            return type(e).__name__
    if request.path == "/six":
        import six
        return json.dumps({"version": six.__version__, "file": six.__file__})
    return "hello from docker"
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
    def __init__(self, tmp: Path, engine: docker.DockerClient, pool: int = 0) -> None:
        self.tmp = tmp
        self.engine = engine
        self.pool = pool  # members of the warm pool (0: every start is a docker run)
        self.driver = DockerDriver(tmp / "state", pool_size=pool)
        self.prepared: list[Revision] = []
        self.extra_images: list[str] = []
        self._n = 0

    def revision(
        self,
        handler: str = HANDLER,
        requirements: str | None = None,
        image: str | None = None,
        resources: Resources | None = None,
    ) -> Revision:
        self._n += 1
        fn = f"it-{uuid.uuid4().hex[:8]}"
        src = self.tmp / f"rev{self._n}"
        src.mkdir()
        (src / "handler.py").write_text(handler)
        (src / "torpor.yaml").write_text(f"name: {fn}\nhandler: handler:handle\n")
        if requirements is not None:
            (src / "requirements.txt").write_text(requirements)
        spec = Spec(
            name=fn,
            handler=None if image else "handler:handle",
            image=image,
            resources=resources or Resources(),
        )
        return Revision(name=f"{fn}-00001", function=fn, number=1, spec=spec, source=str(src))

    async def prepare(self, rev: Revision, lines: list[str] | None = None) -> Revision:
        self.prepared.append(rev)
        sink = lines.append if lines is not None else (lambda _line: None)
        return await self.driver.prepare(rev, progress=sink)

    async def up(self, rev: Revision) -> Running:
        if self.pool:  # the start must take a member, not fall back to a docker run
            self.driver.pool.start()
            assert await self.driver.pool.wait_full(120), "the pool did not fill"
            waiting = self.driver.pool.ids()
        running = await self.driver.start(rev, f"{rev.name}-r{uuid.uuid4().hex[:5]}")
        if self.pool:
            assert running.driver_id in waiting, "not a pooled replica"
        await wait_healthy(running.endpoint)
        return running

    async def cleanup(self) -> None:
        for r in await self.driver.list():
            await self.driver.stop(r, grace=0)
        for rev in self.prepared:
            await self.driver.remove(rev)
        for image in self.extra_images:
            try:
                self.engine.images.remove(image, force=True)
            except docker.errors.ImageNotFound:
                pass
        await self.driver.close()


@pytest.fixture
async def env(
    request: pytest.FixtureRequest, tmp_path: Path, engine: docker.DockerClient
) -> AsyncIterator[Env]:
    e = Env(tmp_path, engine, pool=getattr(request, "param", 0))
    try:
        yield e
    finally:
        await e.cleanup()


async def wait_healthy(endpoint: str, timeout: float = 30.0) -> None:
    assert endpoint
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
            await asyncio.sleep(0.05)
    pytest.fail(f"{endpoint} not healthy within {timeout}s")


async def get_json(endpoint: str, path: str) -> Any:
    async with httpx.AsyncClient(trust_env=False) as client:
        r = await client.get(f"http://{endpoint}{path}", timeout=10.0)
    assert r.status_code == 200, r.text
    return json.loads(r.text)


POOL_ON_OFF = pytest.mark.parametrize("env", [0, 2], ids=["no-pool", "pool"], indirect=True)


@POOL_ON_OFF
async def test_container_is_locked_down(env: Env) -> None:
    res = Resources(cpu=0.25, memory=128 * MiB)
    rev = await env.prepare(env.revision(resources=res))
    running = await env.up(rev)
    c = env.engine.containers.get(running.driver_id)
    labels = c.labels
    if env.pool:  # a pool member's labels are fixed before it knows its function
        assert labels["torpor.pool"] and labels["torpor.function"] == "-pool"
        assert "torpor.replica" not in labels
        (listed,) = await env.driver.list()
        assert (listed.function, listed.revision, listed.replica) == (
            rev.function,
            rev.name,
            running.replica,
        )
    else:
        assert labels["torpor.function"] == rev.function
        assert labels["torpor.revision"] == rev.name
        assert labels["torpor.replica"] == running.replica
    assert labels["torpor.managed"] == "true"
    assert c.name == f"torpor-{running.replica}"

    hc = c.attrs["HostConfig"]
    assert hc["Memory"] == 128 * MiB
    assert hc["NanoCpus"] == 250_000_000
    assert hc["ReadonlyRootfs"] is True
    assert hc["Privileged"] is False
    assert hc["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in hc["SecurityOpt"]
    assert hc["PidsLimit"] and hc["PidsLimit"] > 0
    assert not hc.get("Binds")
    assert not any("docker.sock" in json.dumps(m) for m in c.attrs.get("Mounts") or [])
    assert c.attrs["Config"]["User"] == "65534:65534"
    bindings = hc["PortBindings"]
    assert list(bindings) == ["8080/tcp"]
    assert all(b["HostIp"] == "127.0.0.1" for b in bindings["8080/tcp"])
    published = c.attrs["NetworkSettings"]["Ports"]["8080/tcp"]
    assert published and all(b["HostIp"] == "127.0.0.1" for b in published)
    assert running.endpoint == f"127.0.0.1:{published[0]['HostPort']}"

    who = await get_json(running.endpoint, "/whoami")
    assert who == {"uid": 65534, "gid": 65534, "root_writable": False, "tmp_writable": True}


async def test_built_image_is_labelled(env: Env) -> None:
    rev = await env.prepare(env.revision())
    assert rev.image == image_name(rev, env.driver.instance)
    assert rev.image == f"torpor/fn-{rev.function}:{rev.name}-{env.driver.instance[:8]}"
    img = env.engine.images.get(rev.image)
    assert img.labels["torpor.function"] == rev.function
    assert img.labels["torpor.revision"] == rev.name


async def test_missing_image_is_a_build_error(env: Env) -> None:
    rev = env.revision(image=f"torpor-test/does-not-exist-{uuid.uuid4().hex[:6]}:1")
    with pytest.raises(BuildError, match="not found locally"):
        await env.prepare(rev)


async def test_bad_requirements_is_a_build_error_with_the_reason(env: Env) -> None:
    rev = env.revision(requirements="six\nthis is not ! a valid requirement ===\n")
    with pytest.raises(BuildError) as err:
        await env.prepare(rev)
    msg = str(err.value)
    assert msg.startswith("requirements.txt:2: 'this is not ! a valid requirement ==='"), msg
    assert "not a valid requirement" in msg and "expected a package name" in msg
    rev = env.revision(requirements="this-package-does-not-exist-torpor==0.0.1\n")
    with pytest.raises(BuildError) as err:
        await env.prepare(rev)
    msg = str(err.value)
    assert "pip install -r requirements.txt failed" in msg
    assert "No matching distribution" in msg or "Could not find a version" in msg, msg


@pytest.mark.security
async def test_an_sdist_shipped_in_the_upload_is_never_built_on_the_host(env: Env, attack) -> None:
    """Deploy (docker driver) with requirements.txt p-1.0.tar.gz, an sdist of the upload."""
    marker = env.tmp / "built-on-host"
    rev = env.revision(requirements="p-1.0.tar.gz\n")
    assert rev.source
    (Path(rev.source) / "p-1.0.tar.gz").write_bytes(sdist(str(marker)))
    with pytest.raises(BuildError) as err:
        await env.prepare(rev)
    assert str(err.value).startswith("requirements.txt:1: 'p-1.0.tar.gz': a file name"), err.value
    assert not marker.exists(), "the upload's build backend ran on the host"
    attack.ended(f"BuildError {str(err.value)[:120]}")


@pytest.mark.security
async def test_a_pip_module_in_the_upload_never_runs_on_the_host(env: Env, attack) -> None:
    """Deploy (docker driver) a folder holding pip/__main__.py, so `python -m pip` from it runs it."""
    marker = env.tmp / "ran-on-host"
    rev = env.revision(requirements="six\n")
    assert rev.source
    for name, code in pip_shadow(str(marker)).items():
        (Path(rev.source) / name).parent.mkdir(exist_ok=True)
        (Path(rev.source) / name).write_text(code)
    lines: list[str] = []
    rev = await env.prepare(rev, lines)
    assert not marker.exists(), "the upload's pip package ran on the host"
    assert any("Successfully installed six" in line for line in lines), lines[-5:]
    attack.ended("built with the real pip from an empty directory; the upload's pip/ never ran")


async def test_requirements_may_not_point_beyond_the_package_index(env: Env) -> None:
    for bad in ("--index-url http://127.0.0.1:9/simple\nsix\n", "-e .\n", "pkg @ file:///etc\n"):
        rev = env.revision(requirements=bad)
        with pytest.raises(BuildError, match="not accepted"):
            await env.prepare(rev)


async def test_a_symlink_to_a_host_file_is_not_copied_into_the_image(env: Env) -> None:
    secret = env.tmp / "host-secret.txt"
    secret.write_text("host secret")
    rev = env.revision()
    assert rev.source
    (Path(rev.source) / "leak.txt").symlink_to(secret)
    running = await env.up(await env.prepare(rev))
    async with httpx.AsyncClient(trust_env=False) as client:
        r = await client.get(f"http://{running.endpoint}/leak", timeout=10.0)
    assert r.status_code == 200
    assert "host secret" not in r.text
    assert r.text == "FileNotFoundError"


async def test_missing_base_image_is_a_build_error(env: Env, tmp_path: Path) -> None:
    env.driver = DockerDriver(tmp_path / "state", base_image="torpor-test/no-such-base:1")
    with pytest.raises(BuildError, match="base image torpor-test/no-such-base:1 not found"):
        await env.prepare(env.revision())


async def test_requirements_are_vendored_into_the_image(env: Env) -> None:
    lines: list[str] = []
    rev = await env.prepare(env.revision(requirements="six\n"), lines)
    assert any("pip install" in line for line in lines)
    running = await env.up(rev)
    six = await get_json(running.endpoint, "/six")
    assert six["file"].startswith("/fn/.deps/")
    assert six["version"]


async def test_image_spec_runs_a_given_image_and_remove_keeps_it(env: Env) -> None:
    built = await env.prepare(env.revision())
    given = f"torpor-test/given-{uuid.uuid4().hex[:6]}:1"
    assert built.image
    env.engine.images.get(built.image).tag(given)
    env.extra_images.append(given)

    rev = env.revision(image=given)
    rev = await env.prepare(rev)
    assert rev.image == given
    running = await env.up(rev)
    async with httpx.AsyncClient(trust_env=False) as client:
        r = await client.get(f"http://{running.endpoint}/", timeout=10.0)
    assert r.text == "hello from docker"
    await env.driver.stop(running, grace=1)
    await env.driver.remove(rev)
    env.engine.images.get(given)  # a user's image is never deleted


async def test_remove_deletes_the_built_image(env: Env) -> None:
    rev = await env.prepare(env.revision())
    assert rev.image
    env.engine.images.get(rev.image)
    await env.driver.remove(rev)
    with pytest.raises(docker.errors.ImageNotFound):
        env.engine.images.get(rev.image)


async def test_start_of_a_vanished_image_fails_without_pulling_or_leftovers(env: Env) -> None:
    rev = await env.prepare(env.revision())
    await env.driver.remove(rev)  # the image is gone; nothing may be pulled
    with pytest.raises(BuildError, match="not found locally"):
        await env.driver.start(rev, f"{rev.name}-rgone")
    assert await env.driver.list() == []


async def test_start_replaces_a_stale_container_of_the_same_name(env: Env) -> None:
    rev = await env.prepare(env.revision())
    replica = f"{rev.name}-rstale"
    first = await env.driver.start(rev, replica)
    second = await env.driver.start(rev, replica)  # e.g. a retry after a lost reply
    assert second.driver_id != first.driver_id
    listed = [r for r in await env.driver.list() if r.replica == replica]
    assert [r.driver_id for r in listed] == [second.driver_id]


async def test_drivers_on_other_state_dirs_do_not_see_each_other(env: Env, tmp_path: Path) -> None:
    rev = await env.prepare(env.revision())
    running = await env.up(rev)
    other = DockerDriver(tmp_path / "other-state")
    try:
        assert running.replica not in [r.replica for r in await other.list()]
    finally:
        await other.close()


async def test_two_installations_build_the_same_revision_into_their_own_images(
    env: Env, tmp_path: Path
) -> None:
    rev = await env.prepare(env.revision())
    other = DockerDriver(tmp_path / "other-state")
    twin = Revision(
        name=rev.name, function=rev.function, number=1, spec=rev.spec, source=rev.source
    )
    try:
        await other.prepare(twin, progress=lambda _line: None)
        assert twin.image and rev.image and twin.image != rev.image
        await other.remove(twin)  # the other installation deletes its function...
        with pytest.raises(docker.errors.ImageNotFound):
            env.engine.images.get(twin.image)
        env.engine.images.get(rev.image)  # ...and ours keeps its image
        running = await env.up(rev)
        assert running.endpoint
    finally:
        await other.remove(twin)
        await other.close()


def test_debian_mirror_reads_one_line_and_deb822_sources(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\nTypes: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n"
    )
    assert debian_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [arch=amd64] http://one.example/debian bookworm main\n"
    )
    assert debian_mirror(tmp_path) == "http://one.example/debian"
    assert debian_mirror(tmp_path / "nowhere") == "http://deb.debian.org/debian"
