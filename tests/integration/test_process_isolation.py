"""What a process replica can read of the platform, and the limits it runs under.

Against the real ProcessDriver (forked from the zygote, and plain spawns) and a real
``torpor up``: a replica's environment is exactly its own, ``/proc/self/environ`` and the
zygote's ``/proc/<ppid>/environ`` hold nothing of the platform's, it holds no file
descriptor of the platform, has a private empty HOME, and runs under rlimits.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from platform_proc import torpor_up

from torpor.drivers.process import BASE_DATA, NOFILE, ProcessDriver, _thread_stack
from torpor.model import MiB, Resources, Revision, Spec

# Fake platform secrets: `torpor up` (or the test process hosting the driver) has them in
# its environment; no replica may see them anywhere.
TOKEN = "tok-" + uuid.uuid4().hex
AWS_SECRET = "aws-" + uuid.uuid4().hex

HANDLER = """\
import json
import os
import resource


def _environ(path):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        return {"<error>": type(e).__name__}
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw.split(b"\\0") if item)


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def handle(request):
    if request.path == "/env":
        ppid = os.getppid()
        return json.dumps({
            "os_environ": dict(os.environ),
            "proc_self": _environ("/proc/self/environ"),
            "proc_parent": _environ(f"/proc/{ppid}/environ"),
            "parent_cmdline": _cmdline(ppid),
            "pid": os.getpid(),
        })
    if request.path == "/limits":
        names = ("RLIMIT_DATA", "RLIMIT_AS", "RLIMIT_NOFILE", "RLIMIT_CORE")
        return json.dumps({n: list(resource.getrlimit(getattr(resource, n))) for n in names})
    if request.path == "/alloc":
        n = int(request.query["bytes"])
        try:
            block = bytes(n)  # calloc: fresh zero pages, nothing touched if it succeeds
        except MemoryError:
            return "MemoryError"
        return f"allocated {len(block)}"
    if request.path == "/fds":
        fds = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass  # the listing's own fd, closed already
        unix = {}
        with open("/proc/net/unix") as f:
            for line in f.read().splitlines()[1:]:
                parts = line.split()
                if len(parts) >= 8:
                    unix[parts[6]] = parts[7]
        held = [unix.get(t[8:-1]) for t in fds.values() if t.startswith("socket:[")]
        return json.dumps({"fds": fds, "unix_paths": [p for p in held if p]})
    if request.path == "/home":
        home = os.environ["HOME"]
        return json.dumps({"home": home, "tmpdir": os.environ.get("TMPDIR"),
                           "entries": os.listdir(home), "cwd": os.getcwd(),
                           "mode": oct(os.stat(home).st_mode & 0o777)})
    return "hello"
"""


def _has_secret(blob: Any, secrets: list[str]) -> list[str]:
    text = json.dumps(blob)
    return [s for s in secrets if s in text]


class Drv:
    def __init__(self, tmp: Path, zygote: bool) -> None:
        self.tmp = tmp
        self.driver = ProcessDriver(tmp / "state", zygote=zygote)
        self.started: list[Any] = []

    def revision(self, memory: int = 256 * MiB, env: dict[str, str] | None = None) -> Revision:
        fn = f"iso-{uuid.uuid4().hex[:8]}"
        src = self.tmp / fn
        src.mkdir()
        (src / "handler.py").write_text(HANDLER)
        spec = Spec(
            name=fn,
            handler="handler:handle",
            env=dict(env or {}),
            resources=Resources(memory=memory),
        )
        return Revision(name=f"{fn}-00001", function=fn, number=1, spec=spec, source=str(src))

    async def up(self, rev: Revision) -> Any:
        running = await self.driver.start(rev, f"{rev.name}-r{uuid.uuid4().hex[:5]}")
        self.started.append(running)
        await wait_healthy(running.endpoint)
        return running


@pytest.fixture(params=[True, False], ids=["zygote", "spawn"])
async def drv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Drv]:
    d = Drv(tmp_path, zygote=request.param)
    try:
        yield d
    finally:
        for r in await d.driver.list():
            await d.driver.stop(r, grace=2)
        await d.driver.close()


async def wait_healthy(endpoint: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with httpx.AsyncClient(trust_env=False) as client:
        while loop.time() < deadline:
            try:
                if (
                    await client.get(f"http://{endpoint}/_torpor/health", timeout=2.0)
                ).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    pytest.fail(f"{endpoint} not healthy within {timeout}s")


async def get(endpoint: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False) as client:
        return await client.get(f"http://{endpoint}{path}", timeout=30.0)


# -- environment ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "drv",
    [pytest.param(True, id="zygote", marks=pytest.mark.security), pytest.param(False, id="spawn")],
    indirect=True,
)
async def test_a_replica_reads_the_drivers_environment(
    drv: Drv, monkeypatch: pytest.MonkeyPatch, attack: Any
) -> None:
    """Handler reads os.environ, /proc/{self,zygote}/environ for host keys"""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.setenv("TORPOR_TOKEN", TOKEN)
    running = await drv.up(drv.revision(env={"GREETING": "hi"}))
    seen = (await get(running.endpoint, "/env")).json()
    env = seen["os_environ"]
    if drv.driver.use_zygote:
        assert "zygote.py" in seen["parent_cmdline"], "the replica was not forked from the zygote"
    leaks = {
        where: _has_secret(seen[where], [TOKEN, AWS_SECRET])
        for where in ("os_environ", "proc_self", "proc_parent")
    }
    attack.ended(
        f"none of the driver's keys seen: {leaks}"
        if not any(leaks.values())
        else f"leaked: {leaks}"
    )
    assert not any(leaks.values()), leaks
    # exactly its own environment: the spec's env, the runtime's variables, PATH/LANG/HOME
    assert env["GREETING"] == "hi"
    assert env["TORPOR_FUNCTION"] == running.function
    allowed = {
        "PATH",
        "LANG",
        "HOME",
        "TMPDIR",
        "GREETING",
        "PORT",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONUNBUFFERED",
        "K_SERVICE",
        "K_CONFIGURATION",
        "K_REVISION",
    }  # K_*: Knative's contract
    assert {k for k in env if not k.startswith("TORPOR_")} <= allowed, sorted(env)
    assert {k for k in seen["proc_self"] if not k.startswith("TORPOR_")} <= allowed, sorted(
        seen["proc_self"]
    )


@pytest.mark.security
def test_a_replica_of_torpor_up_reads_the_platforms_secrets(
    tmp_path: Path, redis_url: str, attack: Any
) -> None:
    """Function on torpor up reads TORPOR_TOKEN, TORPOR_REDIS, AWS key"""
    fn = f"peek-{uuid.uuid4().hex[:6]}"
    src = tmp_path / fn
    src.mkdir()
    (src / "handler.py").write_text(HANDLER)
    (src / "torpor.yaml").write_text(f"name: {fn}\nhandler: handler:handle\n")
    secrets = [TOKEN, AWS_SECRET, redis_url]
    env = {"TORPOR_TOKEN": TOKEN, "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "TORPOR_REDIS": redis_url}
    with torpor_up(tmp_path / "state", driver="process", env=env) as t:
        t.deploy(src)
        r = t.request(fn, "/env")
        assert r.status_code == 200, r.text
        seen = r.json()
    assert "zygote.py" in seen["parent_cmdline"], "the replica was not forked from the zygote"
    leaks = {
        where: _has_secret(seen[where], secrets)
        for where in ("os_environ", "proc_self", "proc_parent")
    }
    attack.ended(
        f"none seen in os.environ, /proc/self/environ, /proc/<zygote>/environ: {leaks}"
        if not any(leaks.values())
        else f"leaked: {leaks}"
    )
    assert not any(leaks.values()), leaks
    assert seen["proc_parent"], "the zygote's environ was not readable: nothing was checked"
    assert "PATH" in seen["proc_parent"]


async def test_a_replica_holds_no_file_descriptor_of_the_platform(drv: Drv) -> None:
    first = await drv.up(drv.revision())
    second = await drv.up(drv.revision())
    seen = (await get(second.endpoint, "/fds")).json()
    own_log = str(drv.driver.dir / f"{second.replica}.log")
    assert seen["fds"]["0"] == "/dev/null"
    assert seen["fds"]["1"] == seen["fds"]["2"] == own_log
    files = [t for fd, t in seen["fds"].items() if fd not in ("0", "1", "2") and t.startswith("/")]
    assert files == [], files  # no log of another replica, no store file
    assert f"{first.replica}.log" not in json.dumps(seen)
    assert seen["unix_paths"] == [], seen["unix_paths"]  # not the zygote's socket


async def test_a_replica_has_a_private_empty_home_removed_when_it_stops(drv: Drv) -> None:
    rev = drv.revision()
    running = await drv.up(rev)
    seen = (await get(running.endpoint, "/home")).json()
    home = Path(seen["home"])
    assert seen["tmpdir"] == seen["home"]
    assert seen["entries"] == []
    assert seen["mode"] == "0o700"
    assert home != drv.driver.dir.parent and drv.driver.dir not in home.parents
    assert seen["cwd"] == rev.source
    await drv.driver.stop(running, grace=2)
    assert not home.exists()


# -- rlimits ----------------------------------------------------------------------------------


@pytest.mark.security
async def test_a_replica_allocates_far_beyond_its_memory(drv: Drv, attack: Any) -> None:
    """A handler of a 64Mi function allocates 4 GiB at once"""
    memory = 64 * MiB
    running = await drv.up(drv.revision(memory=memory))
    limits = (await get(running.endpoint, "/limits")).json()
    data = memory + 64 * _thread_stack() + BASE_DATA
    assert limits["RLIMIT_DATA"] == [data, data]
    assert (
        limits["RLIMIT_NOFILE"][0] <= NOFILE
        and limits["RLIMIT_NOFILE"][0] == limits["RLIMIT_NOFILE"][1]
    )
    assert limits["RLIMIT_CORE"] == [0, 0]
    pid = (await get(running.endpoint, "/env")).json()["pid"]
    r = await get(running.endpoint, f"/alloc?bytes={4 << 30}")
    attack.ended(
        f"{r.status_code} {r.text} (RLIMIT_DATA {data // MiB} MiB); the replica keeps serving"
    )
    assert r.text == "MemoryError"
    # the replica was not killed: the same process answers the next requests
    assert (await get(running.endpoint, "/alloc?bytes=1048576")).text == "allocated 1048576"
    assert (await get(running.endpoint, "/env")).json()["pid"] == pid


async def test_a_replica_without_a_memory_size_has_no_data_limit_but_the_others(drv: Drv) -> None:
    running = await drv.up(drv.revision(memory=0))
    limits = (await get(running.endpoint, "/limits")).json()
    assert limits["RLIMIT_CORE"] == [0, 0]
    assert limits["RLIMIT_NOFILE"][1] <= NOFILE
    assert limits["RLIMIT_DATA"][0] == limits["RLIMIT_DATA"][1]
    # RLIMIT_DATA as inherited: unlimited here unless the platform itself runs under one
    import resource

    assert limits["RLIMIT_DATA"] == list(resource.getrlimit(resource.RLIMIT_DATA))


def test_the_zygote_runs_with_a_minimal_environment(tmp_path: Path) -> None:
    env = ProcessDriver(tmp_path / "state")._zygote_env()
    assert set(env) == {"PATH", "LANG", "HOME", "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED"}
    assert os.listdir(env["HOME"]) == []
