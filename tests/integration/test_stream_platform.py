"""Streams and WebSockets end to end: a real `torpor up` (process driver, and the docker
driver for the cases marked so), the gateway between client and replica."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
import yaml
from platform_proc import DOMAIN, Torpor, torpor_up

pytestmark = pytest.mark.slow

MiB = 1024 * 1024

HANDLER = """
import asyncio, hashlib, os, resource, time
from torpor_runtime import sse

VERSION = os.environ.get("VERSION", "1")

def peak_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

def handle(request):
    q = request.query
    if request.path == "/ticks":
        n, every = int(q.get("n", "4")), float(q.get("every", "0.4"))
        def ticks():
            for i in range(n):
                yield f"{i} {time.time():.3f}\\n"
                if i + 1 < n:
                    time.sleep(every)
        return ticks()
    if request.path == "/events":
        return sse({"id": i, "data": {"i": i}} for i in range(3))
    if request.path == "/upload":
        digest, size = hashlib.sha256(), 0
        for piece in request.stream():
            digest.update(piece)
            size += len(piece)
        return {"bytes": size, "sha256": digest.hexdigest(), "peak_kib": peak_kib()}
    return {"version": VERSION, "peak_kib": peak_kib()}

async def ws(sock):
    async for message in sock:
        if message == "version":
            await sock.send(VERSION)
        else:
            await sock.send(message)
"""


def make_fn(tmp: Path, name: str = "streamy", version: str = "1", **spec: Any) -> Path:
    folder = tmp / f"{name}-{version}-{os.urandom(2).hex()}"
    folder.mkdir()
    (folder / "handler.py").write_text(HANDLER)
    doc = {
        "name": name,
        "handler": "handler:handle",
        "websocket": "handler:ws",
        "env": {"VERSION": version},
        "scale": {"idle": "2s"},
        **spec,
    }
    (folder / "torpor.yaml").write_text(yaml.safe_dump(doc))
    return folder


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Torpor]:
    with torpor_up(tmp_path / "state") as t:
        yield t


def ws_connect(t: Torpor, name: str, path: str = "/", **kw: Any) -> Any:
    """A websockets client connection to ``name`` by Host through the gateway."""
    return websockets.connect(
        f"ws://{name}.{DOMAIN}:{t.port}{path}", host="127.0.0.1", port=t.port, open_timeout=60, **kw
    )


def at_zero(t: Torpor, name: str, timeout: float = 60) -> None:
    t.wait_for(lambda: not t.function(name)["replicas"], timeout, f"{name} at zero replicas")


def lines_in_time(
    t: Torpor, name: str, path: str
) -> tuple[httpx.Response, list[tuple[float, str]]]:
    out = []
    with httpx.stream(
        "GET", t.gateway + path, headers={"Host": f"{name}.{DOMAIN}"}, timeout=60
    ) as r:
        t0 = time.monotonic()
        for line in r.iter_lines():
            out.append((time.monotonic() - t0, line))
    return r, out


# --------------------------------------------------------------------------- streamed responses


def test_generator_events_arrive_spread_out_from_zero(up: Torpor, tmp_path: Path) -> None:
    up.deploy(make_fn(tmp_path))
    at_zero(up, "streamy")
    r, lines = lines_in_time(up, "streamy", "/ticks?n=4&every=0.5")
    assert r.status_code == 200 and r.headers["x-torpor-cold-start"] == "true"
    assert [line.split()[0] for _, line in lines] == ["0", "1", "2", "3"]
    # each arrived when it was produced: the first long before the last
    assert lines[-1][0] - lines[0][0] >= 1.0
    r = up.request("streamy", "/events")
    assert r.headers["content-type"].startswith("text/event-stream") and r.text.count("data: ") == 3


def test_stream_idle_ends_a_silent_stream_and_timeout_bounds_the_first_byte(
    up: Torpor, tmp_path: Path
) -> None:
    up.deploy(make_fn(tmp_path, stream_idle="1s", timeout="2s"))
    # a stream with pauses under stream_idle runs past `timeout` (it only bounds the first byte)
    r, lines = lines_in_time(up, "streamy", "/ticks?n=5&every=0.6")
    assert r.status_code == 200 and len(lines) == 5
    # a pause longer than stream_idle ends it: the client sees a truncated body, not a hang
    got: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream(
            "GET",
            up.gateway + "/ticks?n=2&every=4",
            headers={"Host": f"streamy.{DOMAIN}"},
            timeout=30,
        ) as resp:
            for line in resp.iter_lines():
                got.append(line)
    assert len(got) == 1 and time.monotonic() - t0 < 3.5


def test_a_stream_counts_in_flight_and_keeps_its_replica_past_idle(
    up: Torpor, tmp_path: Path
) -> None:
    up.deploy(make_fn(tmp_path, scale={"idle": "1s"}))
    r, lines = lines_in_time(up, "streamy", "/ticks?n=7&every=0.8")  # ~5 s, idle is 1 s
    assert r.status_code == 200 and len(lines) == 7  # not cut by a scale-down
    at_zero(up, "streamy")  # and it goes to zero after


def test_scale_down_drains_a_stream_in_progress(up: Torpor, tmp_path: Path) -> None:
    up.deploy(make_fn(tmp_path, scale={"idle": "30s"}))
    assert up.request("streamy", "/").status_code == 200
    got: list[str] = []
    with httpx.stream(
        "GET",
        up.gateway + "/ticks?n=6&every=0.5",
        headers={"Host": f"streamy.{DOMAIN}"},
        timeout=60,
    ) as r:
        for line in r.iter_lines():
            got.append(line)
            if len(got) == 1:  # mid-stream: take the function to zero by hand
                up.cli("scale", "streamy", "--replicas", "0")
    assert len(got) == 6  # the draining replica finished the stream within its grace
    at_zero(up, "streamy", 30)


def _gateway_rss_kib(t: Torpor) -> int:
    assert t.proc is not None
    for line in Path(f"/proc/{t.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _gen_upload(size: int, digest: Any, rss: list[int], t: Torpor) -> Iterator[bytes]:
    block = os.urandom(MiB)
    for i in range(size // MiB):
        digest.update(block)
        if i % 10 == 0:
            rss.append(_gateway_rss_kib(t))
        yield block


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_100_mib_upload_streams_through_gateway_and_replica(
    up: Torpor, tmp_path: Path, chunked: bool
) -> None:
    up.deploy(make_fn(tmp_path, max_body="200Mi", scale={"idle": "30s"}))
    before = up.request("streamy", "/").json()["peak_kib"]
    digest = hashlib.sha256()
    rss = [_gateway_rss_kib(up)]
    size = 100 * MiB
    headers = {"Host": f"streamy.{DOMAIN}"}
    if not chunked:
        headers["Content-Length"] = str(size)
    r = httpx.post(
        up.gateway + "/upload",
        content=_gen_upload(size, digest, rss, up),
        headers=headers,
        timeout=120,
    )
    rss.append(_gateway_rss_kib(up))
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["bytes"] == size and got["sha256"] == digest.hexdigest()
    # the replica's peak RSS barely moved (one piece at a time), nor did the gateway's
    assert got["peak_kib"] - before < 24 * 1024, (before, got["peak_kib"])
    assert max(rss) - rss[0] < 48 * 1024, rss


@pytest.mark.security
def test_a_chunked_upload_past_max_body_is_cut_at_the_gateway(
    up: Torpor, tmp_path: Path, attack: Any
) -> None:
    """Stream a chunked upload past max_body, now that large bodies are not buffered whole"""
    up.deploy(make_fn(tmp_path, max_body="3Mi"))

    def body() -> Iterator[bytes]:
        for _ in range(50):
            yield b"x" * MiB

    try:
        r = httpx.post(
            up.gateway + "/upload",
            content=body(),
            headers={"Host": f"streamy.{DOMAIN}"},
            timeout=60,
        )
        status, detail = r.status_code, r.json()
    except httpx.HTTPError as exc:  # the gateway may close while the client still sends
        status, detail = 0, {"error": type(exc).__name__}
    assert status in (413, 0), (status, detail)
    if status:
        assert detail["field"] == "max_body"
    r = up.request("streamy", "/")
    assert r.status_code == 200  # the function is fine
    attack.ended(f"{status or 'closed'} {detail.get('error')}: cut past max_body (3Mi) mid-stream")


# --------------------------------------------------------------------------- WebSockets


def test_a_websocket_wakes_a_function_from_zero_and_echoes(up: Torpor, tmp_path: Path) -> None:
    up.deploy(make_fn(tmp_path))
    at_zero(up, "streamy")

    async def talk() -> None:
        async with ws_connect(up, "streamy", "/chat") as ws:
            assert ws.response.headers["x-torpor-cold-start"] == "true"
            assert ws.response.headers["x-torpor-revision"] == "streamy-00001"
            await ws.send("hello")
            assert await ws.recv() == "hello"
            await ws.send(b"\x00" * 300_000)
            assert await ws.recv() == b"\x00" * 300_000
        # by path routing too
        async with websockets.connect(
            f"ws://127.0.0.1:{up.port}/function/streamy/chat", open_timeout=60
        ) as ws:
            await ws.send("by path")
            assert await ws.recv() == "by path"

    asyncio.run(talk())


def test_an_open_socket_keeps_its_replica_past_idle_then_it_scales_to_zero(
    up: Torpor, tmp_path: Path
) -> None:
    up.deploy(make_fn(tmp_path, scale={"idle": "1s"}))

    async def hold() -> None:
        async with ws_connect(up, "streamy") as ws:
            held_since = time.monotonic()
            name = None
            while time.monotonic() - held_since < 6:  # six times `idle`
                await ws.send("version")
                assert await ws.recv() == "1"
                reps = await asyncio.to_thread(up.ready_replicas, "streamy")
                assert len(reps) == 1, reps  # never scaled away under the open socket
                assert name in (None, reps[0]["name"])
                name = reps[0]["name"]
                await asyncio.sleep(0.5)

    asyncio.run(hold())
    at_zero(up, "streamy", 30)


def test_a_rollout_leaves_open_sockets_on_their_revision(up: Torpor, tmp_path: Path) -> None:
    up.deploy(make_fn(tmp_path, version="1"))

    async def run() -> tuple[int | None, float]:
        async with ws_connect(up, "streamy") as old:
            assert old.response.headers["x-torpor-revision"] == "streamy-00001"
            await old.send("version")
            assert await old.recv() == "1"
            await asyncio.to_thread(up.deploy, make_fn(tmp_path, version="2", env={"VERSION": "2"}))
            async with ws_connect(up, "streamy") as new:  # the split applies per new connection
                assert new.response.headers["x-torpor-revision"] == "streamy-00002"
                await new.send("version")
                assert await new.recv() == "2"
                await old.send("version")  # the open one stays where it was
                assert await old.recv() == "1"
                # the retired revision drains: its socket gets its grace, then 1001
                t0 = time.monotonic()
                with pytest.raises(websockets.ConnectionClosed):
                    while True:
                        await old.send("version")
                        assert await asyncio.wait_for(old.recv(), 60) == "1"
                        await asyncio.sleep(0.2)
                await new.send("version")
                assert await new.recv() == "2"
                return old.close_code, time.monotonic() - t0

    code, took = asyncio.run(run())
    assert code == 1001
    assert took >= 5  # not cut at once: most of the replica's drain grace (30 s by default)


def test_max_connection_bounds_a_socket(up: Torpor, tmp_path: Path) -> None:
    up.deploy(make_fn(tmp_path, max_connection="2s"))

    async def run() -> float:
        async with ws_connect(up, "streamy") as ws:
            t0 = time.monotonic()
            with pytest.raises(websockets.ConnectionClosed):
                while time.monotonic() - t0 < 20:
                    await ws.send("x")
                    await asyncio.wait_for(ws.recv(), 10)
                    await asyncio.sleep(0.2)
            return time.monotonic() - t0

    took = asyncio.run(run())
    assert 1.5 <= took < 10


def test_scale_concurrency_counts_an_open_socket(up: Torpor, tmp_path: Path) -> None:
    up.deploy(make_fn(tmp_path, scale={"idle": "30s", "max": 1, "concurrency": 1}, timeout="2s"))

    async def run() -> int:
        async with ws_connect(up, "streamy") as ws:
            await ws.send("version")
            assert await ws.recv() == "1"
            # the one slot is the socket's: a request waits, then times out (max 1 replica)
            r = await asyncio.to_thread(up.request, "streamy", "/")
            return r.status_code

    assert asyncio.run(run()) == 504
    assert up.request("streamy", "/").status_code == 200  # the slot is free once it closed


def test_invoke_ws_sends_stdin_lines_and_prints_replies(up: Torpor, tmp_path: Path) -> None:
    up.deploy(make_fn(tmp_path))
    r = subprocess.run(
        [sys.executable, "-m", "torpor.cli.main", "invoke", "streamy", "--ws", "--path", "/x"],
        input="one\nversion\n",
        env=up.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "one\n1\n"
    assert "closed: 1000" in r.stderr
    # a function without a websocket handler: the upgrade is refused, said in one line
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "handler.py").write_text("def handle(request):\n    return 'plain'\n")
    (plain / "torpor.yaml").write_text("name: plain\nhandler: handler:handle\n")
    up.deploy(plain)
    r = subprocess.run(
        [sys.executable, "-m", "torpor.cli.main", "invoke", "plain", "--ws"],
        input="",
        env=up.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "HTTP 200" in r.stderr


def test_streamed_invoke_prints_as_it_comes(up: Torpor, tmp_path: Path) -> None:
    up.deploy(make_fn(tmp_path))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torpor.cli.main",
            "invoke",
            "streamy",
            "--path",
            "/ticks?n=3&every=1",
        ],
        env=up.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    t_first = time.monotonic()
    rest = proc.stdout.read()
    assert proc.wait(60) == 0
    assert first.startswith("0 ") and rest.count("\n") == 2
    assert time.monotonic() - t_first >= 1.5  # the first line came before the stream ended


# --------------------------------------------------------------------------- docker


@pytest.mark.docker
def test_docker_websocket_from_zero_and_streamed_response(tmp_path: Path) -> None:
    import docker

    docker.from_env(timeout=30).ping()  # fails (not skips) without an engine
    with torpor_up(tmp_path / "state", driver="docker") as t:
        t.deploy(make_fn(tmp_path, scale={"idle": "3s"}))
        at_zero(t, "streamy", 90)

        async def talk() -> None:
            async with ws_connect(t, "streamy", "/chat") as ws:
                assert ws.response.headers["x-torpor-cold-start"] == "true"
                await ws.send("from a container")
                assert await ws.recv() == "from a container"
                await ws.send("version")
                assert await ws.recv() == "1"

        asyncio.run(talk())
        r, lines = lines_in_time(t, "streamy", "/ticks?n=4&every=0.5")
        assert r.status_code == 200 and len(lines) == 4
        assert lines[-1][0] - lines[0][0] >= 1.0
        r = httpx.post(
            t.gateway + "/upload",
            content=b"z" * (3 * MiB),
            headers={"Host": f"streamy.{DOMAIN}"},
            timeout=60,
        )
        assert r.json()["bytes"] == 3 * MiB
        assert json.loads(t.cli("describe", "streamy", "--json").stdout)["name"] == "streamy"
