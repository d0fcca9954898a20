"""Readiness of process replicas reported by the replicas themselves (``wait_ready``).

Against the real ProcessDriver and its zygote: a forked replica reports once it listens
with its handler loaded, and answers at once when it has; one that listens (something
in its import binds the port) but never gets to serve, or that dies before serving, is
never reported ready; a replica the driver cannot hear from (a plain spawn, one adopted
by a new driver) is left to the controller's probe (None). Each runs twice: the start
forked by the zygote, and the start taken by a spare the driver leased ahead. The spares,
forked ahead of any request, hold nothing of a function and go away with the driver.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from torpor.drivers import zygoteclient
from torpor.drivers.base import Running
from torpor.drivers.process import ProcessDriver
from torpor.model import Revision, Spec

HELLO = 'def handle(request):\n    return "hello"\n'

# listens on the replica's port during its import, then never returns from it: a
# connection is accepted by the kernel, nothing ever answers
LISTENS_SILENTLY = """\
import os, socket, time
_s = socket.socket()
_s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
_s.bind((os.environ["TORPOR_HOST"], int(os.environ["PORT"])))
_s.listen(16)
time.sleep(3600)
def handle(request):
    return "never"
"""

RAISES = 'raise RuntimeError("broken at import")\n'


async def until(
    check: Callable[[], Awaitable[Any]], timeout: float = 20.0, what: str = "condition"
) -> Any:
    """Poll ``check()`` until it returns something other than False/None."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        got = await check()
        if got not in (False, None):
            return got
        await asyncio.sleep(0.02)
    pytest.fail(f"no {what} within {timeout}s")


class Drv:
    def __init__(self, tmp: Path, zygote: bool = True) -> None:
        self.tmp = tmp
        self.driver = ProcessDriver(tmp / "state", zygote=zygote)
        self.leased: int | None = None  # the leased spare's pid the next start must use

    def revision(self, source: str, env: dict[str, str] | None = None) -> Revision:
        fn = f"rdy-{uuid.uuid4().hex[:8]}"
        src = self.tmp / fn
        src.mkdir()
        (src / "handler.py").write_text(source)
        spec = Spec(name=fn, handler="handler:handle", env=dict(env or {}))
        return Revision(name=f"{fn}-00001", function=fn, number=1, spec=spec, source=str(src))

    async def start(self, source: str, env: dict[str, str] | None = None) -> Running:
        rev = self.revision(source, env)
        running = await self.driver.start(rev, f"{rev.name}-r{uuid.uuid4().hex[:5]}")
        if self.leased is not None:
            assert running.driver_id == str(self.leased), "the start did not take the lease"
            self.leased = None
        return running

    async def state(self, running: Running) -> Running:
        return next(r for r in await self.driver.list() if r.replica == running.replica)


@pytest.fixture(params=["fork", "leased"])
async def drv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Drv]:
    """The driver, its next start either forked by the zygote (the first start of a
    driver) or taken by the spare the driver leased after an earlier start."""
    d = Drv(tmp_path)
    try:
        if request.param == "leased":
            first = await d.start(HELLO)
            assert await until(lambda: d.driver.wait_ready(first, 1.0), what="report") is True
            await d.driver.stop(first, grace=2)

            async def leased() -> bool:
                return d.driver._lease is not None

            await until(leased, what="a leased spare")
            d.leased = d.driver._lease.pid  # type: ignore[union-attr]
        yield d
    finally:
        for r in await d.driver.list():
            await d.driver.stop(r, grace=2)
        await d.driver.close()


def get_once(endpoint: str, timeout: float = 5.0) -> bytes:
    """One raw GET, no retry: the status line, or b"" if nothing answered."""
    host, _, port = endpoint.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(b"GET /_torpor/health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        try:
            return s.recv(4096).split(b"\r\n", 1)[0]
        except TimeoutError:
            return b""


async def test_a_forked_replica_reports_ready_and_answers_at_once(drv: Drv) -> None:
    running = await drv.start(HELLO)
    ready = await until(lambda: drv.driver.wait_ready(running, 1.0), what="report")
    assert ready is True  # the replica's own word, not "probe it" (None)
    # ready means it can answer: the first connection, no retry
    assert (await asyncio.to_thread(get_once, running.endpoint)).startswith(b"HTTP/1.1 200")
    assert await drv.driver.wait_ready(running, 0.0) is True  # stays ready


async def test_a_replica_that_listens_but_never_serves_is_never_ready(drv: Drv) -> None:
    running = await drv.start(LISTENS_SILENTLY)
    host, _, port = running.endpoint.rpartition(":")

    def connects() -> bool:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return True
        except OSError:
            return False

    # its port accepts connections (a connect-only check would call it ready)...
    await until(lambda: asyncio.to_thread(connects), what="a listening port")
    # ...but it never reports, and stays not ready (False: keep waiting, don't probe)
    loop = asyncio.get_running_loop()
    end = loop.time() + 2.0
    while loop.time() < end:
        assert await drv.driver.wait_ready(running, 0.5) is False
    assert (await drv.state(running)).alive
    assert await asyncio.to_thread(get_once, running.endpoint, 1.0) == b""


@pytest.mark.parametrize("source", [RAISES, "import os\nos._exit(7)\n"], ids=["raises", "exits"])
async def test_a_replica_that_dies_before_serving_is_never_ready(drv: Drv, source: str) -> None:
    running = await drv.start(source)

    async def settled() -> bool:
        return await drv.driver.wait_ready(running, 0.5) is not False

    await until(settled, what="an answer from wait_ready")
    # no word (the connection closed without a report): the controller's probe decides,
    # and there is nothing to answer it
    assert await drv.driver.wait_ready(running, 0.0) is None
    state = await until(
        lambda: _dead(drv, running), what="the replica seen dead with its exit code"
    )
    assert state.exit_code == (3 if source == RAISES else 7)  # 3: EXIT_IMPORT


async def _dead(drv: Drv, running: Running) -> Running | None:
    state = await drv.state(running)
    return state if not state.alive and state.exit_code is not None else None


async def test_a_killed_replica_is_not_ready_and_an_unpaused_one_is(drv: Drv) -> None:
    running = await drv.start(HELLO)
    assert await until(lambda: drv.driver.wait_ready(running, 1.0), what="report") is True
    await drv.driver.pause(running)
    await drv.driver.unpause(running)
    assert await drv.driver.wait_ready(running, 0.0) is True
    assert (await asyncio.to_thread(get_once, running.endpoint)).startswith(b"HTTP/1.1 200")
    os.kill(int(running.driver_id), signal.SIGKILL)

    async def not_ready() -> bool:
        return await drv.driver.wait_ready(running, 0.0) is False

    await until(not_ready, what="the killed replica not ready")


async def test_replicas_the_driver_cannot_hear_from_are_left_to_the_probe(tmp_path: Path) -> None:
    spawn = Drv(tmp_path, zygote=False)
    try:
        plain = await spawn.start(HELLO)
        assert await spawn.driver.wait_ready(plain, 0.2) is None  # a plain spawn: probe it
        # a new driver on the same state dir adopts it and has no report of it either
        again = ProcessDriver(tmp_path / "state")
        adopted = next(r for r in await again.list() if r.replica == plain.replica)
        assert adopted.alive
        assert await again.wait_ready(adopted, 0.2) is None
        await again.close()
    finally:
        for r in await spawn.driver.list():
            await spawn.driver.stop(r, grace=2)
        await spawn.driver.close()


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
            out.append(int(entry))
    return out


@pytest.mark.security
async def test_the_zygotes_spare_holds_nothing_of_a_function(drv: Drv, attack: Any) -> None:
    """The pre-forked spare replica is read for a function's secret before its request"""
    secret = "sec-" + uuid.uuid4().hex
    running = await drv.start(HELLO, env={"API_KEY": secret})
    assert await until(lambda: drv.driver.wait_ready(running, 1.0), what="report") is True
    zygote = int(Path(f"/proc/{running.driver_id}/stat").read_text().split(") ")[1].split()[1])
    assert "zygote.py" in Path(f"/proc/{zygote}/cmdline").read_text()

    async def spares() -> list[int] | None:
        # the zygote's own spare and the one the driver leased for its next start
        others = [p for p in _children(zygote) if p != int(running.driver_id)]
        return others if len(others) == 2 else None

    pids = await until(spares, what="the next spares")
    seen = []
    for pid in pids:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        cwd = os.readlink(f"/proc/{pid}/cwd")
        fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        seen += [
            f"{where} of {pid}"
            for where, blob in (("environ", environ), ("fds", str(fds).encode()))
            if secret.encode() in blob
        ]
        assert b"API_KEY" not in environ and b"TORPOR_FUNCTION" not in environ
        assert running.function not in cwd
        assert not any(running.replica in f for f in fds)  # no replica's log
    attack.ended(
        f"secret seen in {seen}" if seen else "the spares hold no function's env, cwd or log"
    )
    assert not seen
    await drv.driver.close()  # the zygote and the lease go: the spares go with them

    async def gone() -> bool:
        return all(
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1]
            for pid in pids
        )

    await until(gone, what="the spares gone after the driver closed")


async def test_a_spare_leased_from_a_zygote_that_died_is_not_used(tmp_path: Path) -> None:
    d = Drv(tmp_path)
    try:
        first = await d.start(HELLO)
        assert await until(lambda: d.driver.wait_ready(first, 1.0), what="report") is True

        async def leased() -> bool:
            return d.driver._lease is not None

        await until(leased, what="a leased spare")
        stale = d.driver._lease.pid  # type: ignore[union-attr]
        zygote = d.driver._zygote
        assert zygote is not None
        zygote.kill()  # the next start restarts it; the spare it leased has no one to reap it
        await asyncio.to_thread(zygote.wait, 10)
        running = await d.start(RAISES)
        assert running.driver_id != str(stale)

        async def settled() -> bool:
            return await d.driver.wait_ready(running, 0.5) is not False

        await until(settled, what="an answer from wait_ready")
        state = await until(lambda: _dead(d, running), what="its exit code")
        assert state.exit_code == 3  # written by the new zygote
    finally:
        for r in await d.driver.list():
            await d.driver.stop(r, grace=2)
        await d.driver.close()


def _unix_paths(pid: int) -> list[str]:
    """Paths of the Unix sockets ``pid`` holds (a connection accepted on a bound path
    shows that path)."""
    paths = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 8:
            paths[parts[6]] = parts[7]
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in paths:
            held.append(paths[target[8:-1]])
    return held


async def test_spares_hold_no_connection_of_the_zygote(tmp_path: Path) -> None:
    d = Drv(tmp_path)
    try:
        assert await d.driver._ensure_zygote()
        path = str(d.driver._zygote_sock)
        # the first takes the zygote's spare; the second has it fork one meanwhile, while
        # the lease request's connection is open
        leases = [await zygoteclient.lease(path, str(tmp_path / f"{i}.exit")) for i in range(2)]
        for lease in leases:
            assert lease is not None
            # the pid is sent as soon as the fork returns, maybe before the child has run
            # the closes that follow it: the spare must let go of them within moments
            deadline = time.monotonic() + 2.0
            while path in _unix_paths(lease.pid) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert path not in _unix_paths(lease.pid), f"spare {lease.pid} holds {path}"
            lease.sock.close()
    finally:
        await d.driver.close()
