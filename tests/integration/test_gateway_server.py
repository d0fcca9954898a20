"""torpor.gateway.server.Server on real loopback sockets.

Each test starts a Server on port 0 inside its own event loop and talks to it with
httpx or raw sockets (asyncio streams). Every test runs twice, on the standard asyncio
loop and on uvloop, the loop the gateway uses in production (``event_loop_policy``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from torpor.gateway.server import Server

TIMEOUT = 10.0  # bound on every wait in these tests
MiB = 1024 * 1024

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
# The app under test.


class App:
    """A small ASGI app; records what it saw for the tests to check."""

    def __init__(self) -> None:
        self.events: dict[str, asyncio.Event] = {}
        self.seen: dict[str, Any] = {}

    def event(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        path = scope["path"]
        if path.startswith("/echo"):
            body, messages = await read_body(receive)
            out = {
                "method": scope["method"],
                "path": path,
                "raw_path": scope["raw_path"].decode(),
                "query": scope["query_string"].decode(),
                "http_version": scope["http_version"],
                "scheme": scope["scheme"],
                "root_path": scope["root_path"],
                "asgi": scope["asgi"],
                "client_port": scope["client"][1],
                "server_port": scope["server"][1],
                "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
                "len": len(body),
                "sha256": hashlib.sha256(body).hexdigest(),
                "messages": messages,
            }
            await reply(
                send, 200, json.dumps(out).encode(), [(b"content-type", b"application/json")]
            )
        elif path == "/big":
            size = int(scope["query_string"] or 2 * MiB)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", str(size).encode())],
                }
            )
            sent = 0
            while sent < size:
                piece = BLOCK[: min(len(BLOCK), size - sent)]
                sent += len(piece)
                await send({"type": "http.response.body", "body": piece, "more_body": sent < size})
        elif path == "/chunked":  # no length
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for i in range(3):
                await send(
                    {"type": "http.response.body", "body": b"part%d;" % i, "more_body": True}
                )
                await asyncio.sleep(0.01)
            await send({"type": "http.response.body", "body": b"end"})
        elif path == "/chunked-big":  # no length, pieces above the no-copy threshold
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for _ in range(3):
                await send({"type": "http.response.body", "body": BLOCK * 2, "more_body": True})
            await send({"type": "http.response.body", "body": BLOCK * 2, "more_body": False})
        elif path == "/late":  # the head first, the body once the test says so
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await self.event("late-go").wait()
            await send({"type": "http.response.body", "body": b"late body"})
        elif path == "/lazy-reader":  # reads the body only once the test says so
            await self.event("read-go").wait()
            body, messages = await read_body(receive)
            out = {"len": len(body), "sha256": hashlib.sha256(body).hexdigest()}
            await reply(send, 200, json.dumps(out).encode())
        elif path == "/firehose":  # 32 MiB to a client that may not read
            size = 32 * MiB
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", str(size).encode())],
                }
            )
            sent = 0
            while sent < size:
                await send({"type": "http.response.body", "body": BLOCK, "more_body": True})
                sent += len(BLOCK)
                self.seen["firehose-sent"] = sent
            await send({"type": "http.response.body", "body": b""})
        elif path == "/close":
            await reply(send, 200, b"bye", [(b"connection", b"close")])
        elif path == "/nocontent":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b"ignored"})
        elif path == "/slow":
            self.event("slow-started").set()
            await asyncio.sleep(float(scope["query_string"] or 0.5))
            await reply(send, 200, b"slow done")
        elif path == "/hold":
            # Start a streamed response, then wait for the client to leave.
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            self.event("hold-started").set()
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    break
            self.seen["hold"] = msg["type"]
            await send({"type": "http.response.body", "body": b"late", "more_body": True})
            self.seen["hold-send-after-disconnect"] = "returned"
            self.event("hold-done").set()
        elif path == "/boom":
            raise RuntimeError("boom")
        elif path == "/boom-late":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            raise RuntimeError("boom after start")
        elif path == "/nothing":
            return
        else:
            await reply(send, 404, b"no such route")


BLOCK = bytes(range(256)) * 256  # 64 KiB


async def read_body(receive: Receive) -> tuple[bytes, int]:
    parts, n = [], 0
    while True:
        msg = await receive()
        assert msg["type"] == "http.request", msg
        parts.append(msg.get("body", b""))
        n += 1
        if not msg.get("more_body", False):
            return b"".join(parts), n


async def reply(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------
# Helpers.


@contextlib.asynccontextmanager
async def running(app: Any, **kw: Any) -> AsyncIterator[Server]:
    server = Server(app, "127.0.0.1", 0, **kw)
    task = asyncio.create_task(server.serve())
    async with asyncio.timeout(TIMEOUT):
        while not server.started:
            if task.done():
                await task  # raises what serve() raised
            await asyncio.sleep(0.005)
    try:
        yield server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, TIMEOUT)


def url(server: Server, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def until(predicate: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> Any:
    """Poll ``predicate`` until it returns something true (returned); fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (got := predicate()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)
    return got


class Raw:
    """A raw HTTP/1.1 client connection (asyncio streams)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, server: Server) -> Raw:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", server.port), TIMEOUT
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def head(self) -> tuple[int, dict[bytes, bytes], bytes]:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        lines = raw[:-4].split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            assert name.lower() not in headers, f"duplicate header {name!r}"
            headers[name.lower()] = value.strip()
        return status, headers, raw

    async def response(self, head_only: bool = False) -> tuple[int, dict[bytes, bytes], bytes]:
        """One response; body framed by content-length, chunked, or the server closing."""
        status, headers, _ = await self.head()
        if head_only or status in (204, 304):
            return status, headers, b""
        if b"content-length" in headers:
            n = int(headers[b"content-length"])
            body = await asyncio.wait_for(self.reader.readexactly(n), TIMEOUT)
        elif headers.get(b"transfer-encoding") == b"chunked":
            parts = []
            while True:
                size_line = await asyncio.wait_for(self.reader.readuntil(b"\r\n"), TIMEOUT)
                size = int(size_line.strip(), 16)
                data = await asyncio.wait_for(self.reader.readexactly(size + 2), TIMEOUT)
                assert data.endswith(b"\r\n")
                if size == 0:
                    break
                parts.append(data[:-2])
            body = b"".join(parts)
        else:
            body = await asyncio.wait_for(self.reader.read(), TIMEOUT)
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


# ---------------------------------------------------------------------------
# The tests (each runs on both loops, see event_loop_policy).


async def test_get_post_round_trip() -> None:
    async with running(App()) as server, httpx.AsyncClient(timeout=TIMEOUT) as client:
        r = await client.get(url(server, "/echo/a%20b/c?x=1&y=%20"))
        assert r.status_code == 200
        d = r.json()
        assert d["method"] == "GET"
        assert d["path"] == "/echo/a b/c"
        assert d["raw_path"] == "/echo/a%20b/c"
        assert d["query"] == "x=1&y=%20"
        assert d["http_version"] == "1.1"
        assert d["scheme"] == "http" and d["root_path"] == "" and d["asgi"]["version"] == "3.0"
        assert d["server_port"] == server.port
        assert ["host", f"127.0.0.1:{server.port}"] in d["headers"]
        assert all(k == k.lower() for k, _ in d["headers"])
        assert "date" not in r.headers and "server" not in r.headers
        assert r.headers["content-type"] == "application/json"

        r = await client.post(url(server, "/echo"), content=b"hello body", headers={"X-Thing": "1"})
        assert r.status_code == 200
        d = r.json()
        assert d["method"] == "POST" and d["len"] == 10
        assert d["sha256"] == hashlib.sha256(b"hello body").hexdigest()
        assert ["x-thing", "1"] in d["headers"]

        r = await client.get(url(server, "/missing"))
        assert r.status_code == 404 and r.content == b"no such route"


async def test_streamed_request_body_2mib() -> None:
    payload = bytes(range(256)) * (8 * 1024)  # 2 MiB
    async with running(App()) as server, httpx.AsyncClient(timeout=TIMEOUT) as client:
        r = await client.post(url(server, "/echo"), content=payload)
        assert r.status_code == 200
        d = r.json()
        assert d["len"] == len(payload) == 2 * MiB
        assert d["sha256"] == hashlib.sha256(payload).hexdigest()
        assert d["messages"] > 1


async def test_chunked_request_body() -> None:
    pieces = [bytes([i]) * (10_000 + i) for i in range(40)]
    payload = b"".join(pieces)

    async def gen() -> AsyncIterator[bytes]:
        for p in pieces:
            yield p

    async with running(App()) as server, httpx.AsyncClient(timeout=TIMEOUT) as client:
        r = await client.post(url(server, "/echo"), content=gen())
        assert r.status_code == 200
        d = r.json()
        assert ["transfer-encoding", "chunked"] in d["headers"]
        assert d["len"] == len(payload)
        assert d["sha256"] == hashlib.sha256(payload).hexdigest()


async def test_streamed_response_2mib() -> None:
    async with running(App()) as server, httpx.AsyncClient(timeout=TIMEOUT) as client:
        h = hashlib.sha256()
        n = 0
        async with client.stream("GET", url(server, "/big")) as r:
            assert r.status_code == 200
            assert r.headers["content-length"] == str(2 * MiB)
            async for chunk in r.aiter_raw():
                h.update(chunk)
                n += len(chunk)
        assert n == 2 * MiB
        assert h.hexdigest() == hashlib.sha256(BLOCK * 32).hexdigest()
        # the connection is still good
        r2 = await client.get(url(server, "/echo"))
        assert r2.status_code == 200


async def test_chunked_response_without_length() -> None:
    async with running(App()) as server:
        raw = await Raw.connect(server)
        try:
            await raw.send(b"GET /chunked HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = await raw.response()
            assert status == 200
            assert headers[b"transfer-encoding"] == b"chunked"
            assert b"content-length" not in headers
            assert body == b"part0;part1;part2;end"
            # keep-alive after a chunked response
            await raw.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _, _ = await raw.response()
            assert status == 200
        finally:
            await raw.close()
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            r = await client.get(url(server, "/chunked"))
            assert r.content == b"part0;part1;part2;end"


async def test_streamed_head_not_held_back_and_big_chunks() -> None:
    app = App()
    async with running(app) as server:
        raw = await Raw.connect(server)
        try:
            # the head of a streamed response is not held back until the body comes
            await raw.send(b"GET /late HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, _ = await raw.head()
            assert status == 200 and headers[b"transfer-encoding"] == b"chunked"
            app.event("late-go").set()
            size = int(await asyncio.wait_for(raw.reader.readuntil(b"\r\n"), TIMEOUT), 16)
            assert await raw.reader.readexactly(size + 2) == b"late body\r\n"
            assert await raw.reader.readexactly(5) == b"0\r\n\r\n"
            # chunks big enough to be written without a copy
            await raw.send(b"GET /chunked-big HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = await raw.response()
            assert status == 200 and body == BLOCK * 8
        finally:
            await raw.close()


async def test_request_body_flow_control() -> None:
    app = App()
    payload = bytes(range(256)) * (128 * 1024)  # 32 MiB: more than socket buffers hold
    async with running(app) as server:
        raw = await Raw.connect(server)
        try:
            raw.writer.write(
                b"POST /lazy-reader HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                % len(payload)
            )
            raw.writer.write(payload)
            drain = asyncio.create_task(raw.writer.drain())
            # The app reads nothing yet: the server stops reading instead of buffering.
            await until(
                lambda: len(server.conns) == 1 and next(iter(server.conns)).read_paused,
                "the server to stop reading",
            )
            (conn,) = server.conns
            assert conn.read_paused
            assert conn.active is not None and conn.active.buffered <= 2 * MiB
            assert not drain.done()  # the client cannot send it all
            app.event("read-go").set()
            await asyncio.wait_for(drain, TIMEOUT)
            status, _, body = await raw.response()
            d = json.loads(body)
            assert status == 200 and d["len"] == len(payload)
            assert d["sha256"] == hashlib.sha256(payload).hexdigest()
        finally:
            await raw.close()


async def test_response_flow_control() -> None:
    app = App()
    async with running(app) as server:
        raw = await Raw.connect(server)
        try:
            await raw.send(b"GET /firehose HTTP/1.1\r\nHost: t\r\n\r\n")
            # the client reads nothing meanwhile: the server stops writing instead of buffering
            await until(
                lambda: len(server.conns) == 1 and next(iter(server.conns)).write_paused,
                "the server to stop writing",
            )
            (conn,) = server.conns
            assert conn.write_paused
            assert conn.transport.get_write_buffer_size() <= 2 * MiB
            assert app.seen["firehose-sent"] < 32 * MiB  # send() waits
            status, headers, _ = await raw.head()
            assert status == 200
            n = 0
            h = hashlib.sha256()
            while n < 32 * MiB:
                data = await asyncio.wait_for(raw.reader.read(1 << 20), TIMEOUT)
                assert data
                n += len(data)
                h.update(data)
            assert n == 32 * MiB and h.hexdigest() == hashlib.sha256(BLOCK * 512).hexdigest()
        finally:
            await raw.close()


async def test_keep_alive_head_and_204() -> None:
    async with running(App()) as server:
        raw = await Raw.connect(server)
        try:
            await raw.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = await raw.response()
            assert status == 200 and b"connection" not in headers
            port1 = json.loads(body)["client_port"]
            # HEAD: the app's Content-Length, no body bytes; the connection goes on
            await raw.send(b"HEAD /big HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, _ = await raw.response(head_only=True)
            assert status == 200 and headers[b"content-length"] == str(2 * MiB).encode()
            await raw.send(b"HEAD /chunked HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, _ = await raw.response(head_only=True)
            assert status == 200 and b"transfer-encoding" not in headers
            # 204: whatever body the app sends is not written
            await raw.send(b"GET /nocontent HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, _ = await raw.response()
            assert status == 204
            assert b"transfer-encoding" not in headers and b"content-length" not in headers
            await raw.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
            status, _, body = await raw.response()
            d = json.loads(body)
            assert status == 200 and d["len"] == 3 and d["client_port"] == port1
        finally:
            await raw.close()

    # the same through httpx: one connection for two requests
    async with running(App()) as server, httpx.AsyncClient(timeout=TIMEOUT) as client:
        a = (await client.get(url(server, "/echo"))).json()["client_port"]
        b = (await client.get(url(server, "/echo"))).json()["client_port"]
        assert a == b


async def test_connection_close_honoured() -> None:
    async with running(App()) as server:
        # the client asks
        raw = await Raw.connect(server)
        try:
            await raw.send(b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            status, headers, _ = await raw.response()
            assert status == 200 and headers[b"connection"] == b"close"
            assert await raw.closed_by_server()
        finally:
            await raw.close()
        # the app says so
        raw = await Raw.connect(server)
        try:
            await raw.send(b"GET /close HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = await raw.response()
            assert (status, body) == (200, b"bye") and headers[b"connection"] == b"close"
            assert await raw.closed_by_server()
        finally:
            await raw.close()
        # HTTP/1.0, no length: close-delimited
        raw = await Raw.connect(server)
        try:
            await raw.send(b"GET /chunked HTTP/1.0\r\n\r\n")
            status, headers, body = await raw.response()
            assert status == 200 and b"transfer-encoding" not in headers
            assert body == b"part0;part1;part2;end"
        finally:
            await raw.close()


async def test_expect_100_continue() -> None:
    async with running(App()) as server:
        raw = await Raw.connect(server)
        try:
            await raw.send(
                b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            status, _, interim = await raw.head()  # before any body byte was sent
            assert status == 100 and interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            await raw.send(b"hello")
            status, _, body = await raw.response()
            assert status == 200 and json.loads(body)["len"] == 5
        finally:
            await raw.close()


async def test_pipelined_requests_answered_in_order() -> None:
    async with running(App()) as server:
        raw = await Raw.connect(server)
        try:
            await raw.send(
                b"GET /slow?0.05 HTTP/1.1\r\nHost: t\r\n\r\n"
                b"POST /echo/2 HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi"
                b"GET /chunked HTTP/1.1\r\nHost: t\r\n\r\n"
                b"GET /echo/4 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            )
            assert (await raw.response())[2] == b"slow done"
            d = json.loads((await raw.response())[2])
            assert (d["path"], d["len"]) == ("/echo/2", 2)
            assert (await raw.response())[2] == b"part0;part1;part2;end"
            status, headers, body = await raw.response()
            assert json.loads(body)["path"] == "/echo/4" and headers[b"connection"] == b"close"
            assert await raw.closed_by_server()
        finally:
            await raw.close()


async def test_errors_400_431_500() -> None:
    async with running(App(), max_head=4096) as server:
        raw = await Raw.connect(server)
        try:
            await raw.send(b"NOT HTTP AT ALL\r\n\r\n")
            status, headers, body = await raw.response()
            assert status == 400 and headers[b"connection"] == b"close"
            assert json.loads(body)["error"] == "bad request"
            assert await raw.closed_by_server()
        finally:
            await raw.close()

        raw = await Raw.connect(server)
        try:
            await raw.send(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
            status, _, _ = await raw.response()
            assert status == 431
            assert await raw.closed_by_server()
        finally:
            await raw.close()

        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            r = await client.get(url(server, "/boom"))
            assert r.status_code == 500 and r.json() == {"error": "internal server error"}
            r = await client.get(url(server, "/nothing"))
            assert r.status_code == 500 and r.json() == {"error": "internal server error"}
            # after the response started: the connection is closed, the body truncated
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(url(server, "/boom-late"))
            # the server still serves
            assert (await client.get(url(server, "/echo"))).status_code == 200


async def test_client_disconnect_mid_response() -> None:
    app = App()
    async with running(app) as server:
        raw = await Raw.connect(server)
        await raw.send(b"GET /hold HTTP/1.1\r\nHost: t\r\n\r\n")
        status, headers, _ = await raw.head()
        assert status == 200 and headers[b"transfer-encoding"] == b"chunked"
        await asyncio.wait_for(app.event("hold-started").wait(), TIMEOUT)
        await raw.close()
        await asyncio.wait_for(app.event("hold-done").wait(), TIMEOUT)
        assert app.seen["hold"] == "http.disconnect"
        assert app.seen["hold-send-after-disconnect"] == "returned"


async def test_graceful_shutdown() -> None:
    app = App()
    server = Server(app, "127.0.0.1", 0)
    serve = asyncio.create_task(server.serve())
    async with asyncio.timeout(TIMEOUT):
        while not server.started:
            await asyncio.sleep(0.005)
    port = server.port
    idle = await Raw.connect(server)  # an idle keep-alive connection
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        slow = asyncio.create_task(client.get(f"http://127.0.0.1:{port}/slow?0.5"))
        await asyncio.wait_for(app.event("slow-started").wait(), TIMEOUT)
        server.should_exit = True
        await until(lambda: server.stopping, "the server to begin its shutdown")
        assert not serve.done()  # still waiting for the slow request
        with pytest.raises(OSError):  # new connections are refused
            _, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
            w.close()
        assert await idle.closed_by_server()  # idle keep-alive connections are closed
        r = await asyncio.wait_for(slow, TIMEOUT)
        assert r.status_code == 200 and r.content == b"slow done"
        assert r.headers["connection"] == "close"
    await asyncio.wait_for(serve, TIMEOUT)
    await idle.close()


async def test_graceful_timeout_cancels_stragglers() -> None:
    app = App()
    server = Server(app, "127.0.0.1", 0, graceful_timeout=0.2)
    serve = asyncio.create_task(server.serve())
    async with asyncio.timeout(TIMEOUT):
        while not server.started:
            await asyncio.sleep(0.005)
    raw = await Raw.connect(server)
    await raw.send(b"GET /slow?30 HTTP/1.1\r\nHost: t\r\n\r\n")
    await asyncio.wait_for(app.event("slow-started").wait(), TIMEOUT)
    server.should_exit = True
    await asyncio.wait_for(serve, TIMEOUT)  # well before the 30 s request ends
    assert await raw.closed_by_server()
    assert server.in_flight == 0
    await raw.close()


async def test_idle_keep_alive_connection_closed() -> None:
    async with running(App(), keep_alive=0.2) as server:
        raw = await Raw.connect(server)
        try:
            await raw.send(b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            assert (await raw.response())[0] == 200
            assert await raw.closed_by_server()
        finally:
            await raw.close()


# ---------------------------------------------------------------------------
# The real gateway app on this server.


async def test_gateway_app() -> None:
    from torpor.gateway.app import Gateway
    from torpor.model import Function, Replica, Revision, Spec, TrafficTarget
    from torpor.store.embedded import EmbeddedStore

    async def upstream_app(scope: Scope, receive: Receive, send: Send) -> None:
        body, _ = await read_body(receive)
        out = json.dumps({"path": scope["path"], "len": len(body)}).encode()
        await reply(send, 200, out, [(b"content-type", b"application/json")])

    store = EmbeddedStore(None)
    async with running(upstream_app) as upstream:
        rev = "hello-00001"
        fn = Function(
            name="hello",
            revisions=[
                Revision(
                    name=rev, function="hello", number=1, spec=Spec(name="hello"), status="ready"
                )
            ],
            traffic=[TrafficTarget(revision=rev, percent=100)],
            next_number=2,
        )
        await store.update_function("hello", lambda cur: fn)
        await store.put_replica(
            Replica(
                name=f"{rev}-r1",
                function="hello",
                revision=rev,
                state="ready",
                endpoint=f"127.0.0.1:{upstream.port}",
            )
        )
        gateway = Gateway(store)
        await gateway.start()
        try:
            async with running(gateway) as server, httpx.AsyncClient(timeout=TIMEOUT) as client:
                r = await client.get(url(server, "/function/hello/x/y?q=1"))
                assert r.status_code == 200, r.text
                assert r.headers["x-torpor-revision"] == rev
                assert r.headers["x-torpor-cold-start"] == "false"
                assert r.json() == {"path": "/x/y", "len": 0}
                r = await client.post(
                    url(server, "/"),
                    headers={"Host": "hello.torpor.localhost"},
                    content=b"x" * 100_000,
                )
                assert r.status_code == 200 and r.json() == {"path": "/", "len": 100_000}
                assert r.headers["x-torpor-revision"] == rev
                r = await client.get(url(server, "/function/nope/"))
                assert r.status_code == 404
                r = await client.get(url(server, "/healthz"))
                assert r.status_code == 200 and r.json() == {"status": "ok"}
        finally:
            await gateway.stop(drain=TIMEOUT)
            await store.close()


async def test_bind_failure_raises() -> None:
    async with running(App()) as server:
        other = Server(App(), "127.0.0.1", server.port)
        with pytest.raises(OSError):
            await asyncio.wait_for(other.serve(), TIMEOUT)
        assert not other.started
