"""The gateway bounds what a client can hold: deadlines, body limits, pipelining, caps,
the activator queue, and forwarding headers from what the gateway saw itself.

The real ``torpor.gateway.server.Server`` on real loopback ports, alone or in front of
the real ``Gateway`` app, whose replica is another ``Server`` running a recording app
(the whole chain on a real ``torpor up``: test_gateway_limits_up.py). Deadlines are set
small here (fractions of a second) so that nothing waits long; the tests assert what
happens, never how fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from torpor.gateway.app import Gateway
from torpor.gateway.forwarded import parse_trusted_proxies
from torpor.gateway.routes import RevisionRoute
from torpor.gateway.server import Server
from torpor.model import Function, Replica, Revision, Spec, TrafficTarget
from torpor.store.embedded import EmbeddedStore

TIMEOUT = 10.0  # bound on every wait in these tests
MiB = 1024 * 1024
HOST = b"fn.torpor.localhost"
REV = "fn-00001"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every async test here runs on both loops (the gateway runs on uvloop)."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.EventLoopPolicy()  # type: ignore[no-any-return]
    return asyncio.DefaultEventLoopPolicy()


# ---------------------------------------------------------------------------
# Helpers.


async def read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return b"".join(parts)
        parts.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            return b"".join(parts)


async def reply(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Recorder:
    """An ASGI app that records each request it gets. ``/big`` streams 32 MiB; any
    other path answers what it saw as JSON."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        headers: dict[str, list[str]] = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.decode(), []).append(v.decode())
        seen = {"path": scope["path"], "headers": headers, "len": len(body)}
        self.calls.append(seen)
        if scope["path"] == "/big":
            size = 32 * MiB
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", str(size).encode())],
                }
            )
            block = b"x" * (256 * 1024)
            for i in range(size // len(block)):
                await send(
                    {
                        "type": "http.response.body",
                        "body": block,
                        "more_body": i < size // len(block) - 1,
                    }
                )
            return
        await reply(send, 200, json.dumps(seen).encode())


@contextlib.asynccontextmanager
async def running(app: Any, **kw: Any) -> AsyncIterator[Server]:
    server = Server(app, "127.0.0.1", 0, **kw)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(TIMEOUT):
        while not server.started:
            if task.done():
                await task
            await asyncio.sleep(0.005)
    try:
        yield server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, TIMEOUT)


class Raw:
    """A raw HTTP/1.1 client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> Raw:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        lines = raw[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        n = int(headers.get(b"content-length", b"0"))
        body = await asyncio.wait_for(self.reader.readexactly(n), TIMEOUT)
        return status, headers, body

    async def closed_by_server(self) -> bool:
        """True once the server has closed the connection (EOF, nothing else sent)."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), TIMEOUT)
        except ConnectionResetError:
            return True
        return data == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), TIMEOUT)


async def until(predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    async with asyncio.timeout(timeout):
        while not (value := predicate()):
            await asyncio.sleep(0.01)
    return value


def get(path: str, host: bytes = HOST, extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + extra + b"\r\n"


class Counter:
    """The smallest app: 200 ``ok`` to everything, counting the requests."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        await read_body(receive)
        await reply(send, 200, b"ok")


@dataclass
class Env:
    store: EmbeddedStore
    gateway: Gateway
    server: Server  # the gateway's
    replica: Recorder
    replica_port: int
    pokes: list[int]  # queue lengths the activator poked with, recorded as it pokes

    @property
    def rr(self) -> RevisionRoute:
        return self.gateway.table.revisions[REV]

    @property
    def port(self) -> int:
        return self.server.port

    async def add_replica(self) -> None:
        await self.store.put_replica(
            Replica(
                name=f"{REV}-r1",
                function="fn",
                revision=REV,
                state="ready",
                endpoint=f"127.0.0.1:{self.replica_port}",
            )
        )
        await until(lambda: self.rr.balancer.backends, "the replica in the gateway's routes")


@contextlib.asynccontextmanager
async def gateway(
    spec: Spec | None = None,
    *,
    ready: bool = True,
    gateway_kw: dict[str, Any] | None = None,
    **server_kw: Any,
) -> AsyncIterator[Env]:
    """A Gateway on a real Server, routing fn.torpor.localhost to one revision whose
    replica (a Recorder) is ready, or not yet (``ready=False``: the function is at zero)."""
    store = EmbeddedStore(None)
    replica = Recorder()
    async with running(replica) as upstream:
        fn = Function(
            name="fn",
            revisions=[
                Revision(
                    name=REV, function="fn", number=1, spec=spec or Spec(name="fn"), status="ready"
                )
            ],
            traffic=[TrafficTarget(revision=REV, percent=100)],
            next_number=2,
        )
        await store.update_function("fn", lambda cur: fn)
        gw = Gateway(store, **(gateway_kw or {}))
        pokes: list[int] = []
        real_poke = gw.table.poke

        def poke(function: str, revision: str, queued: int) -> None:  # noqa: E306
            pokes.append(queued)
            real_poke(function, revision, queued)

        gw.table.poke = poke  # before the routes exist: each activator pokes through it
        await gw.start()
        env = Env(store, gw, None, replica, upstream.port, pokes)  # type: ignore[arg-type]
        if ready:
            await env.add_replica()
        try:
            async with running(gw, **server_kw) as server:
                env.server = server
                yield env
        finally:
            await gw.stop(drain=TIMEOUT)
            await store.close()


# ---------------------------------------------------------------------------
# Deadlines.


@pytest.mark.security
async def test_slowloris_head_gets_408_and_close(attack: Any) -> None:
    """Slowloris: dribble a request head a byte at a time to hold a connection forever"""
    app = Counter()
    async with running(app, head_timeout=0.4) as server:
        raw = await Raw.connect(server.port)

        async def dribble() -> None:
            for byte in b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 5000:
                raw.writer.write(bytes([byte]))
                await asyncio.sleep(0.02)

        task = asyncio.create_task(dribble())
        try:
            status, headers, body = await raw.response()
        finally:
            task.cancel()
        assert status == 408 and headers[b"connection"] == b"close"
        assert await raw.closed_by_server()
        assert app.calls == 0
        await raw.close()
        await until(lambda: not server.conns, "the server to let the connection go")
    attack.ended(f"{status} {json.loads(body)['error']}, connection closed (head_timeout)")


@pytest.mark.security
async def test_head_timeout_408_survives_a_client_that_keeps_sending(attack: Any) -> None:
    """Slowloris that never pauses: bytes keep arriving while the 408 goes out"""
    app = Counter()
    async with running(app, head_timeout=0.3) as server:
        for _ in range(3):
            raw = await Raw.connect(server.port)
            stop = asyncio.Event()

            async def dribble(raw: Raw = raw, stop: asyncio.Event = stop) -> None:
                raw.writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ")
                while not stop.is_set():  # written after the server closed, too
                    with contextlib.suppress(ConnectionError):
                        raw.writer.write(b"a" * 64)
                    await asyncio.sleep(0.005)

            task = asyncio.create_task(dribble())
            try:
                # A client slow to read (a loaded machine): it reads only after the head
                # timeout, still sending. A server that closes with input unread answers
                # those bytes with a reset, and the reset destroys the 408 unread.
                await asyncio.sleep(0.3 + 0.3)
                status, headers, body = await raw.response()
                assert status == 408 and headers[b"connection"] == b"close"
                # a FIN, not a reset, while bytes still arrive
                assert await asyncio.wait_for(raw.reader.read(1), TIMEOUT) == b""
            finally:
                stop.set()
                await task
            await raw.close()
        await until(lambda: not server.conns, "the server to let the connections go")
        assert app.calls == 0
    attack.ended(f"{status} {json.loads(body)['error']} each time, then FIN (lingering close)")


async def test_silent_new_connection_closes_after_head_timeout() -> None:
    async with running(Counter(), head_timeout=0.3, keep_alive=60) as server:
        raw = await Raw.connect(server.port)
        assert await raw.closed_by_server()  # nothing sent: no 408, just closed
        await raw.close()


@pytest.mark.security
async def test_stalled_body_gets_408_without_reaching_the_replica(attack: Any) -> None:
    """Stalled upload: send a head and part of the body, then nothing, to hold a replica slot"""
    async with gateway(body_timeout=0.4) as env:
        raw = await Raw.connect(env.port)
        await raw.send(
            b"POST /up HTTP/1.1\r\nHost: fn.torpor.localhost\r\nContent-Length: 100\r\n\r\n"
            + b"x" * 10
        )
        await until(lambda: env.server.in_flight == 1, "the request at the gateway")
        # while it stalls: nothing at the replica, nothing the autoscaler would see
        assert env.replica.calls == [] and env.rr.in_flight == 0 and len(env.rr.activator) == 0
        status, headers, body = await raw.response()
        assert status == 408 and headers[b"connection"] == b"close"
        assert await raw.closed_by_server()
        assert env.replica.calls == [] and env.rr.stats.requests == 0 and env.gateway.buffered == 0
        await raw.close()
    attack.ended(
        f"{status} {json.loads(body)['error']} after body_timeout; the replica never saw it"
    )


@pytest.mark.security
async def test_dribbled_body_holds_no_replica_slot_and_no_concurrency(attack: Any) -> None:
    """Slow upload: dribble a body within every idle deadline to hold a replica slot and inflate the autoscaler"""
    async with gateway(body_timeout=5) as env:
        raw = await Raw.connect(env.port)
        await raw.send(
            b"POST /up HTTP/1.1\r\nHost: fn.torpor.localhost\r\nContent-Length: 30\r\n\r\n"
        )
        for _ in range(20):
            await raw.send(b"y")
            await asyncio.sleep(0.02)
            # what the sampler reports to the autoscaler: in flight at replicas + queued
            assert env.rr.in_flight + len(env.rr.activator) == 0
            assert env.replica.calls == [] and env.gateway.in_flight == 0
        await raw.send(b"z" * 10)
        status, _, body = await raw.response()
        assert status == 200 and json.loads(body)["len"] == 30
        assert [c["path"] for c in env.replica.calls] == ["/up"]
        await raw.close()
    attack.ended(
        "the body was buffered whole: 0 in flight while it dribbled, then dispatched (200)"
    )


@pytest.mark.security
async def test_client_that_never_reads_is_cut_off_and_the_replica_slot_freed(attack: Any) -> None:
    """Never read a 32 MiB response, to hold the replica's slot and its upstream connection"""
    async with gateway(write_timeout=0.4) as env:
        raw = await Raw.connect(env.port)
        await raw.send(get("/big"))  # and never read
        await until(lambda: env.rr.in_flight == 1, "the request at the replica")
        await until(lambda: env.rr.in_flight == 0, "the replica slot released")
        await until(lambda: not env.server.conns, "the client connection closed")
        assert env.gateway.in_flight == 0
        await raw.close()
    attack.ended("connection aborted after write_timeout; replica in-flight back to 0")


# ---------------------------------------------------------------------------
# Pipelining.


@pytest.mark.security
async def test_huge_head_pipelined_behind_a_tiny_request_gets_431(attack: Any) -> None:
    """Pipeline a tiny request and a 16 KiB head in one write, to slip past the per-read head limit"""
    app = Counter()
    async with running(app, max_head=4096) as server:
        raw = await Raw.connect(server.port)
        await raw.send(
            get("/a", b"t") + b"GET /b HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 16000 + b"\r\n\r\n"
        )
        first = await raw.response()
        second = await raw.response()
        assert first[0] == 200 and second[0] == 431
        assert await raw.closed_by_server()
        assert app.calls == 1
        await raw.close()
    attack.ended(f"first 200, then {second[0]} {json.loads(second[2])['error']}, closed")


@pytest.mark.security
async def test_hundred_pipelined_requests_in_one_write_are_bounded(attack: Any) -> None:
    """Pipeline 100 requests in one write, to make the server queue them all at once"""
    app = Counter()
    async with running(app) as server:  # max_pipeline: 16
        raw = await Raw.connect(server.port)
        await raw.send(b"".join(get(f"/{i}", b"t") for i in range(100)))
        answered = []
        while True:
            try:
                answered.append(await raw.response())
            except asyncio.IncompleteReadError:
                break
        assert 1 <= len(answered) <= 1 + server.max_pipeline
        assert all(status == 200 for status, _, _ in answered)
        assert answered[-1][1][b"connection"] == b"close"
        assert app.calls == len(answered)
        await raw.close()
    attack.ended(f"{len(answered)} answered (1 + max_pipeline 16), then Connection: close")


# ---------------------------------------------------------------------------
# Body limits.


@pytest.mark.security
async def test_oversized_content_length_is_413_and_wakes_nothing(attack: Any) -> None:
    """Announce a 20 MiB body to a function at zero, to wake it and fill the gateway"""
    async with gateway(ready=False) as env:  # max_body: 10Mi by default
        raw = await Raw.connect(env.port)
        await raw.send(
            b"POST / HTTP/1.1\r\nHost: fn.torpor.localhost\r\nContent-Length: %d\r\n"
            b"Expect: 100-continue\r\n\r\n" % (20 * MiB)
        )
        status, headers, body = await raw.response()  # not a 100 Continue
        assert status == 413 and headers[b"connection"] == b"close"
        err = json.loads(body)
        assert err["field"] == "max_body" and "10Mi" in err["detail"]
        assert await raw.closed_by_server()
        assert env.pokes == [] and len(env.rr.activator) == 0 and env.rr.stats.requests == 0
        assert env.gateway.buffered == 0
        await raw.close()
    attack.ended(f"413 {err['error']} before any read of the body; no poke, nothing queued")


@pytest.mark.security
async def test_chunked_body_over_max_body_is_413_and_never_reaches_the_replica(attack: Any) -> None:
    """Stream a chunked body past max_body (no Content-Length to refuse up front)"""
    spec = Spec(name="fn", max_body=1000)
    async with gateway(spec) as env:
        raw = await Raw.connect(env.port)
        await raw.send(
            b"POST / HTTP/1.1\r\nHost: fn.torpor.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"258\r\n"
            + b"c" * 600
            + b"\r\n"
            + b"258\r\n"
            + b"c" * 600
            + b"\r\n"
        )
        status, headers, body = await raw.response()
        assert status == 413 and headers[b"connection"] == b"close"
        assert json.loads(body)["field"] == "max_body"
        assert await raw.closed_by_server()
        assert env.replica.calls == [] and env.rr.stats.requests == 0 and env.gateway.buffered == 0
        await raw.close()
        # a chunked body within the limit goes through
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:

            async def small() -> AsyncIterator[bytes]:
                yield b"a" * 500
                yield b"b" * 500

            r = await client.post(
                f"http://127.0.0.1:{env.port}/", headers={"Host": HOST.decode()}, content=small()
            )
        assert r.status_code == 200 and r.json()["len"] == 1000
    attack.ended("413 once the body passed max_body (1000 B); the replica never saw it")


async def test_a_413_reaches_a_client_that_sends_its_body_regardless() -> None:
    # No Expect: 100-continue, the body follows the head at once (as curl does for small
    # uploads): the answer comes while bytes are still arriving, and must not be lost to
    # a reset. The server half-closes and drops the rest (lingering close).
    async with gateway(Spec(name="fn", max_body=1000)) as env:
        for _ in range(3):
            raw = await Raw.connect(env.port)
            raw.writer.write(
                b"POST / HTTP/1.1\r\nHost: fn.torpor.localhost\r\nContent-Length: %d\r\n\r\n"
                % (4 * MiB)
                + b"x" * (4 * MiB)
            )
            status, headers, _ = await raw.response()
            assert status == 413 and headers[b"connection"] == b"close"
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(
                    raw.writer.drain(), TIMEOUT
                )  # the server reads and drops the rest
            assert await raw.closed_by_server()
            await raw.close()
        assert env.replica.calls == []
        await until(lambda: not env.server.conns, "lingering connections closed")


async def test_oversized_chunked_body_at_zero_wakes_nothing() -> None:
    async with gateway(Spec(name="fn", max_body=100), ready=False) as env:
        raw = await Raw.connect(env.port)
        await raw.send(
            b"POST / HTTP/1.1\r\nHost: fn.torpor.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"c8\r\n" + b"c" * 200 + b"\r\n"
        )
        assert (await raw.response())[0] == 413
        assert env.pokes == [] and len(env.rr.activator) == 0
        await raw.close()


@pytest.mark.security
async def test_concurrent_uploads_past_the_gateway_buffer_get_503(attack: Any) -> None:
    """Open many large uploads at once, to exhaust the gateway's memory with buffered bodies"""
    async with gateway(gateway_kw={"max_buffered": 1000}) as env:
        a = await Raw.connect(env.port)
        await a.send(
            b"POST /a HTTP/1.1\r\nHost: fn.torpor.localhost\r\nContent-Length: 800\r\n\r\n"
            + b"a" * 10
        )
        await until(lambda: env.gateway.buffered == 800, "the first upload holding its 800 bytes")
        b = await Raw.connect(env.port)
        await b.send(
            b"POST /b HTTP/1.1\r\nHost: fn.torpor.localhost\r\nContent-Length: 800\r\n\r\n"
            + b"b" * 800
        )
        status, headers, body = await b.response()
        assert (
            status == 503 and headers[b"retry-after"] == b"1" and headers[b"connection"] == b"close"
        )
        await b.close()
        await a.send(b"a" * 790)  # the first completes and is served
        assert (await a.response())[0] == 200
        assert [c["path"] for c in env.replica.calls] == ["/a"]
        await until(lambda: env.gateway.buffered == 0, "the buffer released")
        # past the whole buffer: never fits, so 413 rather than "retry"
        c = await Raw.connect(env.port)
        await c.send(
            b"POST /c HTTP/1.1\r\nHost: fn.torpor.localhost\r\nContent-Length: 1001\r\n\r\n"
        )
        assert (await c.response())[0] == 413
        await a.close()
        await c.close()
    attack.ended(f"{status} {json.loads(body)['error']} (Retry-After: 1) past max_buffered")


# ---------------------------------------------------------------------------
# Caps.


@pytest.mark.security
async def test_connections_past_the_cap_get_503_retry_after(attack: Any) -> None:
    """Open more connections than the gateway can hold, to starve other clients of file descriptors"""
    app = Counter()
    async with running(app, max_connections=2) as server:
        held = [await Raw.connect(server.port) for _ in range(2)]
        await until(lambda: len(server.conns) == 2, "two connections held")
        extra = await Raw.connect(server.port)
        await extra.send(get("/", b"t"))
        status, headers, body = await extra.response()
        assert (
            status == 503 and headers[b"retry-after"] == b"1" and headers[b"connection"] == b"close"
        )
        assert await extra.closed_by_server()
        assert app.calls == 0
        await extra.close()
        await held[0].close()  # room again
        await until(lambda: len(server.conns) == 1, "one connection left")
        again = await Raw.connect(server.port)
        await again.send(get("/", b"t"))
        assert (await again.response())[0] == 200
        for r in (again, held[1]):
            await r.close()
    attack.ended(f"{status} {json.loads(body)['error']} with Retry-After: 1, then closed")


# ---------------------------------------------------------------------------
# The activator.


@pytest.mark.security
async def test_client_leaving_the_activator_queue_is_not_run_later(attack: Any) -> None:
    """Queue requests at a function at zero and hang up, so that they run and count for scaling anyway"""
    async with gateway(ready=False) as env:
        raw = await Raw.connect(env.port)
        await raw.send(get("/abandoned"))
        await until(lambda: len(env.rr.activator) == 1, "the request queued at the activator")
        assert env.pokes == [1]
        await raw.close()  # the client leaves
        await until(lambda: len(env.rr.activator) == 0, "the queue emptied", timeout=5)
        await env.add_replica()
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            r = await client.get(
                f"http://127.0.0.1:{env.port}/sentinel", headers={"Host": HOST.decode()}
            )
        assert r.status_code == 200
        assert [c["path"] for c in env.replica.calls] == [
            "/sentinel"
        ]  # the abandoned one never ran
        assert env.rr.stats.requests == 1 and env.gateway.in_flight == 0
    attack.ended("left the queue at once (length 0); never sent to the replica, not counted")


# ---------------------------------------------------------------------------
# Forwarding headers.


@pytest.mark.security
async def test_spoofed_forwarding_headers_are_replaced(attack: Any) -> None:
    """Send X-Forwarded-For: 1.2.3.4 (and Forwarded, -Host, -Proto) to pose as another client"""
    async with gateway() as env, httpx.AsyncClient(timeout=TIMEOUT) as client:
        r = await client.get(
            f"http://127.0.0.1:{env.port}/who",
            headers={
                "Host": HOST.decode(),
                "X-Forwarded-For": "1.2.3.4",
                "Forwarded": "for=1.2.3.4;proto=https",
                "X-Forwarded-Host": "bank.example",
                "X-Forwarded-Proto": "https",
            },
        )
        seen = r.json()["headers"]
        assert seen["x-forwarded-for"] == ["127.0.0.1"]
        assert seen["forwarded"] == ['for=127.0.0.1;host="fn.torpor.localhost";proto=http']
        assert seen["x-forwarded-host"] == ["fn.torpor.localhost"]
        assert seen["x-forwarded-proto"] == ["http"]
    attack.ended("replaced: the replica saw X-Forwarded-For 127.0.0.1 (the socket's peer)")


async def test_a_trusted_proxy_is_appended_to() -> None:
    trusted = parse_trusted_proxies("10.0.0.0/8, 127.0.0.1")
    async with (
        gateway(gateway_kw={"trusted_proxies": trusted}) as env,
        httpx.AsyncClient(timeout=TIMEOUT) as client,
    ):
        r = await client.get(
            f"http://127.0.0.1:{env.port}/who",
            headers={
                "Host": HOST.decode(),
                "X-Forwarded-For": "1.2.3.4",
                "Forwarded": "for=1.2.3.4;proto=https",
                "X-Forwarded-Host": "fn.example.com",
                "X-Forwarded-Proto": "https",
            },
        )
        seen = r.json()["headers"]
        assert seen["x-forwarded-for"] == ["1.2.3.4, 127.0.0.1"]
        assert seen["forwarded"] == [
            'for=1.2.3.4;proto=https, for=127.0.0.1;host="fn.torpor.localhost";proto=http'
        ]
        assert seen["x-forwarded-host"] == ["fn.example.com"] and seen["x-forwarded-proto"] == [
            "https"
        ]
        # a trusted proxy that sent none: ours
        r = await client.get(f"http://127.0.0.1:{env.port}/who", headers={"Host": HOST.decode()})
        seen = r.json()["headers"]
        assert seen["x-forwarded-for"] == ["127.0.0.1"] and seen["x-forwarded-proto"] == ["http"]


async def test_path_routing_forwards_the_host_the_client_used() -> None:
    async with gateway() as env, httpx.AsyncClient(timeout=TIMEOUT) as client:
        r = await client.get(f"http://127.0.0.1:{env.port}/function/fn/who")
        seen = r.json()["headers"]
        host = f"127.0.0.1:{env.port}"
        assert seen["forwarded"] == [f'for=127.0.0.1;host="{host}";proto=http']
        assert seen["x-forwarded-host"] == [host] and r.json()["path"] == "/who"
