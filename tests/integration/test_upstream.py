"""torpor.gateway.upstream against real servers on loopback.

A uvicorn upstream (its own thread and loop) serves well-behaved routes; raw asyncio
servers in the test's loop misbehave on purpose. Most tests call ``proxy`` with a
constructed scope and an in-memory client; the end-to-end tests run a uvicorn
gateway whose whole logic is ``proxy(pools.get(endpoint), ...)`` and talk to it
over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn

from torpor.gateway.upstream import NotSent, Pools, UpstreamPool, proxy

TIMEOUT = 10.0  # bound on every wait in these tests
MiB = 1024 * 1024

# ---------------------------------------------------------------------------
# A well-behaved upstream (uvicorn).

REQUEST_LOG: list[dict[str, Any]] = []  # one entry per request the upstream saw


async def _read_body(receive: Callable[[], Awaitable[dict[str, Any]]]) -> tuple[bytes, int]:
    parts, n = [], 0
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            break
        parts.append(msg.get("body", b""))
        n += 1
        if not msg.get("more_body", False):
            break
    return b"".join(parts), n


async def upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    path = scope["path"]
    headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
    REQUEST_LOG.append(
        {
            "path": path,
            "method": scope["method"],
            "query": scope["query_string"].decode(),
            "port": scope["client"][1],
            "headers": headers,
        }
    )

    async def reply(status: int, body: bytes, extra: list[tuple[bytes, bytes]] = []) -> None:  # noqa: B006
        hdrs = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": hdrs + extra})
        await send({"type": "http.response.body", "body": body})

    if path == "/hello":
        await reply(200, b"hello")
    elif path == "/headers":
        body, _ = await _read_body(receive)
        await reply(
            200, json.dumps({"headers": headers, "query": scope["query_string"].decode()}).encode()
        )
    elif path == "/sha":
        body, n = await _read_body(receive)
        out = {"sha256": hashlib.sha256(body).hexdigest(), "len": len(body), "messages": n}
        await reply(200, json.dumps(out).encode())
    elif path == "/big":
        size = int(scope["query_string"] or 2 * MiB)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(size).encode())],
            }
        )
        block = bytes(range(256)) * 256  # 64 KiB
        sent = 0
        while sent < size:
            piece = block[: min(len(block), size - sent)]
            sent += len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": sent < size})
    elif path == "/stream":  # no length: uvicorn sends it chunked
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(5):
            await send({"type": "http.response.body", "body": b"part%d;" % i, "more_body": True})
            await asyncio.sleep(0.02)
        await send({"type": "http.response.body", "body": b""})
    elif path == "/nocontent":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/close":
        await reply(200, b"bye", [(b"connection", b"close")])
    else:
        await reply(404, b"no such route")


class ThreadServer:
    """uvicorn on a free loopback port in a thread of its own."""

    def __init__(self, app: Any, loop: str = "asyncio") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.endpoint = f"127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            http="httptools",
            loop=loop,
            lifespan="off",
            log_level="warning",
            access_log=False,
            server_header=False,
            date_header=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            assert self.thread.is_alive(), "uvicorn thread died"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(TIMEOUT)
        self.sock.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[ThreadServer]:
    with ThreadServer(upstream_app) as server:
        yield server


def seen(path: str) -> list[dict[str, Any]]:
    return [r for r in REQUEST_LOG if r["path"] == path]


# ---------------------------------------------------------------------------
# In-memory ASGI client for calling proxy() directly.


class Client:
    def __init__(self, messages: list[dict[str, Any]] | None = None) -> None:
        self.inbox = list(messages or [])
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()
        self.started = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if self.inbox:
            return self.inbox.pop(0)
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)
        if msg["type"] == "http.response.body":
            self.started.set()

    @property
    def status(self) -> int:
        return int(self.sent[0]["status"])

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return list(self.sent[0]["headers"])

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k.lower() == name:
                return bytes(v)
        return None

    @property
    def chunks(self) -> list[bytes]:
        return [m.get("body", b"") for m in self.sent[1:]]

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def finished(self) -> bool:
        return len(self.sent) > 1 and not self.sent[-1].get("more_body", False)


def make_scope(
    method: str = "GET",
    path: str = "/hello",
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"fn.torpor.localhost"), *(headers or [])],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }


async def call(
    pool: UpstreamPool,
    scope: dict[str, Any],
    messages: list[dict[str, Any]] | None = None,
    **kw: Any,
) -> tuple[int, Client]:
    client = Client(messages)
    kw.setdefault("timeout", 5.0)
    status = await asyncio.wait_for(proxy(pool, scope, client.receive, client.send, **kw), TIMEOUT)
    return status, client


def body_messages(data: bytes, size: int) -> list[dict[str, Any]]:
    msgs = [
        {"type": "http.request", "body": data[i : i + size], "more_body": True}
        for i in range(0, len(data), size)
    ]
    msgs[-1]["more_body"] = False
    return msgs


@pytest.fixture
async def pool(upstream: ThreadServer) -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(upstream.endpoint)
    yield p
    await p.close()


# ---------------------------------------------------------------------------
# Raw misbehaving servers in the test's own loop.

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    tasks: set[asyncio.Task[None]] = set()

    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.close()
        for t in list(tasks):
            t.cancel()
        await asyncio.wait_for(server.wait_closed(), TIMEOUT)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Read one request (Content-Length bodies only); returns head line, headers, body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    lines = head[:-4].split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get(b"content-length", b"0"))
    body = await asyncio.wait_for(reader.readexactly(n), TIMEOUT) if n else b""
    return lines[0], headers, body


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return int(port)


# ---------------------------------------------------------------------------
# Round trips.


async def test_get_round_trip(pool: UpstreamPool) -> None:
    status, c = await call(pool, make_scope(path="/hello", query=b"a=1&b=%20x"))
    assert status == 200 and c.status == 200
    assert c.body == b"hello"
    assert c.finished
    assert c.header(b"content-length") == b"5"
    assert seen("/hello")[-1]["query"] == "a=1&b=%20x"
    assert pool.idle == 1


async def test_post_round_trip_and_added_headers(pool: UpstreamPool) -> None:
    payload = b'{"x": 1}'
    status, c = await call(
        pool,
        make_scope("POST", "/headers", headers=[(b"content-length", b"8")]),
        [{"type": "http.request", "body": payload, "more_body": False}],
        add_request_headers=[(b"x-forwarded-for", b"10.0.0.9")],
        add_response_headers=[(b"x-torpor-revision", b"hello-1")],
    )
    assert status == 200
    got = dict((k, v) for k, v in json.loads(c.body)["headers"])
    assert got["x-forwarded-for"] == "10.0.0.9"
    assert got["host"] == "fn.torpor.localhost"  # Host preserved
    assert got["content-length"] == "8"
    assert c.header(b"x-torpor-revision") == b"hello-1"


async def test_raw_path_and_query_forwarded(pool: UpstreamPool) -> None:
    scope = make_scope(path="/headers", query=b"q=%2F")
    scope["raw_path"] = b"/head%65rs"  # the raw form wins over the decoded path
    status, c = await call(pool, scope)
    assert status == 200
    assert json.loads(c.body)["query"] == "q=%2F"


async def test_post_2mib_body_intact_streamed(pool: UpstreamPool) -> None:
    data = os.urandom(2 * MiB)
    status, c = await call(
        pool,
        make_scope("POST", "/sha", headers=[(b"content-length", str(len(data)).encode())]),
        body_messages(data, 64 * 1024),
    )
    assert status == 200
    out = json.loads(c.body)
    assert out["len"] == len(data)
    assert out["sha256"] == hashlib.sha256(data).hexdigest()
    assert pool.idle == 1  # body fully sent, response complete: pooled


async def test_2mib_response_streamed_in_chunks(pool: UpstreamPool) -> None:
    status, c = await call(pool, make_scope(path="/big"))
    assert status == 200
    assert c.header(b"content-length") == str(2 * MiB).encode()
    expected = (bytes(range(256)) * 256) * 32
    assert c.body == expected
    assert len([b for b in c.chunks if b]) > 1  # streamed, not buffered whole
    assert c.finished
    assert pool.idle == 1


async def test_chunked_request_body_reencoded(pool: UpstreamPool) -> None:
    data = os.urandom(300_000)
    status, c = await call(
        pool,
        make_scope("POST", "/sha", headers=[(b"transfer-encoding", b"chunked")]),
        body_messages(data, 50_000),
    )
    assert status == 200
    out = json.loads(c.body)
    assert out["sha256"] == hashlib.sha256(data).hexdigest()
    req = seen("/sha")[-1]
    names = {k for k, _ in req["headers"]}
    assert "transfer-encoding" in names and "content-length" not in names


async def test_chunked_request_in_one_message_gets_a_length() -> None:
    got: list[dict[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers, body = await read_request(reader)
        got.append(headers)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        await reader.read()

    async with raw_server(handler) as ep:
        p = UpstreamPool(ep)
        status, c = await call(
            p,
            make_scope("POST", "/", headers=[(b"transfer-encoding", b"chunked")]),
            [{"type": "http.request", "body": b"abc", "more_body": False}],
        )
        await p.close()
    assert status == 200 and c.body == b"abc"
    assert got[0][b"content-length"] == b"3" and b"transfer-encoding" not in got[0]


async def test_chunked_upstream_response(pool: UpstreamPool) -> None:
    status, c = await call(pool, make_scope(path="/stream"))
    assert status == 200
    assert c.body == b"part0;part1;part2;part3;part4;"
    assert len([b for b in c.chunks if b]) > 1
    assert c.header(b"transfer-encoding") is None  # hop-by-hop: the gateway re-frames
    assert c.finished
    assert pool.idle == 1


async def test_close_delimited_response_body() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst;")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"second")
        await writer.drain()
        writer.close()

    async with raw_server(handler) as ep:
        p = UpstreamPool(ep)
        status, c = await call(p, make_scope())
        assert status == 200 and c.body == b"first;second" and c.finished
        assert p.idle == 0
        await p.close()


async def test_reset_during_close_delimited_body_is_not_its_end() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    async with raw_server(handler) as ep:
        p = UpstreamPool(ep)
        client = Client()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(
                proxy(p, make_scope(), client.receive, client.send, timeout=5), TIMEOUT
            )
        assert client.body == b"partial" and not client.finished
        await p.close()


async def test_interim_1xx_response_skipped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    async with raw_server(handler) as ep:
        p = UpstreamPool(ep)
        status, c = await call(p, make_scope())
        assert status == 201 and c.body == b"ok"
        assert p.idle == 1
        await p.close()


# ---------------------------------------------------------------------------
# Hop-by-hop headers.


async def test_hop_by_hop_stripped_both_ways() -> None:
    got: list[dict[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers, _ = await read_request(reader)
        got.append(headers)
        writer.write(
            b"HTTP/1.1 200 OK\r\n"
            b"Content-Length: 2\r\n"
            b"Connection: keep-alive, X-Resp-Hop\r\n"
            b"X-Resp-Hop: secret\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"Trailer: X-T\r\n"
            b"Upgrade: h2c\r\n"
            b"X-End-To-End: yes\r\n"
            b"\r\nok"
        )
        await writer.drain()
        await reader.read()

    req_headers = [
        (b"connection", b"keep-alive, x-req-hop"),
        (b"x-req-hop", b"secret"),
        (b"keep-alive", b"timeout=5"),
        (b"proxy-connection", b"keep-alive"),
        (b"te", b"trailers"),
        (b"trailer", b"x-t"),
        (b"upgrade", b"websocket"),
        (b"x-end-to-end", b"yes"),
    ]
    async with raw_server(handler) as ep:
        p = UpstreamPool(ep)
        status, c = await call(p, make_scope(headers=req_headers))
        await p.close()
    assert status == 200 and c.body == b"ok"
    sent = got[0]
    for name in (
        b"connection",
        b"x-req-hop",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"transfer-encoding",
    ):
        assert name not in sent, name
    assert sent[b"x-end-to-end"] == b"yes"
    assert sent[b"host"] == b"fn.torpor.localhost"
    names = {k for k, _ in c.headers}
    for name in (
        b"connection",
        b"x-resp-hop",
        b"keep-alive",
        b"proxy-connection",
        b"trailer",
        b"upgrade",
    ):
        assert name not in names, name
    assert c.header(b"x-end-to-end") == b"yes"


# ---------------------------------------------------------------------------
# Keep-alive and pooling.


async def test_connection_reused_for_sequential_requests(pool: UpstreamPool) -> None:
    before = len(seen("/hello"))
    for _ in range(10):
        status, c = await call(pool, make_scope(path="/hello"))
        assert status == 200 and c.body == b"hello"
    ports = {r["port"] for r in seen("/hello")[before:]}
    assert len(seen("/hello")) - before == 10
    assert len(ports) == 1
    assert pool.idle == 1


async def test_upstream_connection_close_not_reused(pool: UpstreamPool) -> None:
    status, c = await call(pool, make_scope(path="/close"))
    assert status == 200 and c.body == b"bye"
    assert c.header(b"connection") is None
    assert pool.idle == 0
    await call(pool, make_scope(path="/close"))
    ports = [r["port"] for r in seen("/close")[-2:]]
    assert ports[0] != ports[1]


async def test_idle_connection_closed_by_peer_is_dropped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # keep-alive promised, then closed while idle

    async with raw_server(handler) as ep:
        p = UpstreamPool(ep)
        status, _ = await call(p, make_scope())
        assert status == 200
        assert p.idle == 1
        deadline = time.monotonic() + TIMEOUT
        while p.idle:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        status, c = await call(p, make_scope())  # a fresh connection, not the dead one
        assert status == 200 and c.body == b"ok"
        await p.close()


async def test_pools_registry(upstream: ThreadServer) -> None:
    pools = Pools()
    a = pools.get(upstream.endpoint)
    assert pools.get(upstream.endpoint) is a and upstream.endpoint in pools and len(pools) == 1
    status, _ = await call(a, make_scope())
    assert status == 200 and a.idle == 1
    await pools.discard(upstream.endpoint)
    assert a.idle == 0 and upstream.endpoint not in pools
    b = pools.get(upstream.endpoint)
    assert b is not a
    await pools.close()
    with pytest.raises(NotSent):
        await call(b, make_scope())


# ---------------------------------------------------------------------------
# Responses without a body.


async def test_head_response_has_no_body_and_connection_is_reusable() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, _, _ = await read_request(reader)
            if line.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget")
            await writer.drain()

    async with raw_server(handler) as ep:
        p = UpstreamPool(ep)
        status, c = await call(p, make_scope("HEAD", "/"))
        assert status == 200
        assert c.header(b"content-length") == b"1000"
        assert c.body == b"" and c.finished
        assert p.idle == 1
        status, c = await call(p, make_scope("GET", "/"))  # same connection, fresh parser
        assert status == 200 and c.body == b"get"
        await p.close()


async def test_204_no_body(pool: UpstreamPool) -> None:
    status, c = await call(pool, make_scope(path="/nocontent"))
    assert status == 204
    assert c.body == b"" and c.finished
    assert c.header(b"content-length") is None
    assert pool.idle == 1


async def test_head_through_uvicorn(pool: UpstreamPool) -> None:
    status, c = await call(pool, make_scope("HEAD", "/hello"))
    assert status == 200
    assert c.header(b"content-length") == b"5"
    assert c.body == b""
    status, c = await call(pool, make_scope("GET", "/hello"))
    assert status == 200 and c.body == b"hello"


# ---------------------------------------------------------------------------
# Failures.


async def test_refused_port_raises_not_sent() -> None:
    p = UpstreamPool(f"127.0.0.1:{free_port()}")
    first = {"type": "http.request", "body": b"data", "more_body": False}
    client = Client()
    with pytest.raises(NotSent) as info:
        await asyncio.wait_for(
            proxy(
                p,
                make_scope("POST", "/", headers=[(b"content-length", b"4")]),
                client.receive,
                client.send,
                timeout=5,
                first_chunk=first,
            ),
            TIMEOUT,
        )
    assert info.value.first_chunk is first
    assert client.sent == []


async def test_body_pulled_before_refusal_is_handed_back() -> None:
    p = UpstreamPool(f"127.0.0.1:{free_port()}")
    msg = {"type": "http.request", "body": b"data", "more_body": False}
    client = Client([msg])
    with pytest.raises(NotSent) as info:
        await proxy(
            p,
            make_scope("POST", "/", headers=[(b"content-length", b"4")]),
            client.receive,
            client.send,
            timeout=5,
        )
    assert info.value.first_chunk is msg


async def test_upstream_closes_after_reading_post_gives_503_not_retried() -> None:
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _, _ = await read_request(reader)
        requests.append(line)
        if line.startswith(b"POST"):
            writer.close()  # read it, then die without a response
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        while True:  # keep-alive: the next request on this connection
            line, _, _ = await read_request(reader)
            requests.append(line)
            writer.close()
            return

    post = make_scope("POST", "/", headers=[(b"content-length", b"5")])
    body = [{"type": "http.request", "body": b"12345", "more_body": False}]
    async with raw_server(handler) as ep:
        p = UpstreamPool(ep)
        # On a fresh connection.
        status, c = await call(p, post, list(body))
        assert status == 503
        assert c.header(b"retry-after") == b"1"
        assert c.header(b"content-type") == b"application/json"
        assert json.loads(c.body)["error"] == "replica failed"
        assert requests == [b"POST / HTTP/1.1"]
        # On a reused connection: still not resent.
        requests.clear()
        status, _ = await call(p, make_scope())
        assert status == 200 and p.idle == 1
        status, c = await call(p, post, list(body))
        assert status == 503
        assert requests == [b"GET /hello HTTP/1.1", b"POST / HTTP/1.1"]
        await p.close()


async def test_reused_connection_failing_get_is_retried_once() -> None:
    requests: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line, _, _ = await read_request(reader)
        requests.append(line)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        line, _, _ = await read_request(reader)  # second request on a reused connection
        requests.append(line)
        writer.close()  # dies without a response byte

    async with raw_server(handler) as ep:
        p = UpstreamPool(ep)
        assert (await call(p, make_scope()))[0] == 200
        status, c = await call(p, make_scope())
        assert status == 200 and c.body == b"ok"
        assert requests == [b"GET /hello HTTP/1.1"] * 3  # first, stale attempt, retry
        await p.close()


async def test_response_timeout_gives_504() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(TIMEOUT)

    async with raw_server(handler) as ep:
        p = UpstreamPool(ep)
        status, c = await call(p, make_scope(), timeout=0.3)
        assert status == 504
        assert c.header(b"retry-after") == b"1"
        out = json.loads(c.body)
        assert out["error"] == "upstream timeout" and "detail" in out
        assert p.idle == 0
        await p.close()


async def test_garbage_response_gives_503() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with raw_server(handler) as ep:
        p = UpstreamPool(ep)
        status, c = await call(p, make_scope())
        assert status == 503 and c.header(b"retry-after") == b"1"
        await p.close()


async def test_failure_mid_body_truncates() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    async with raw_server(handler) as ep:
        p = UpstreamPool(ep)
        client = Client()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(
                proxy(p, make_scope(), client.receive, client.send, timeout=5), TIMEOUT
            )
        assert client.status == 200
        assert not client.finished  # no final body message: the server closes the client
        assert client.body == b"0123456789"
        assert p.idle == 0
        await p.close()


async def test_chunked_close_response_cut_short_is_not_complete() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            b"5\r\nhello\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()  # no last chunk: the body is cut short, not complete

    async with raw_server(handler) as ep:
        p = UpstreamPool(ep)
        client = Client()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(
                proxy(p, make_scope(), client.receive, client.send, timeout=5), TIMEOUT
            )
        assert client.body == b"hello" and not client.finished
        await p.close()


async def test_connection_header_cannot_strip_framing_headers() -> None:
    got: list[tuple[dict[bytes, bytes], bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers, body = await read_request(reader)
        got.append((headers, body))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    scope = make_scope(
        "POST",
        "/",
        headers=[(b"connection", b"content-length, host"), (b"content-length", b"3")],
    )
    async with raw_server(handler) as ep:
        p = UpstreamPool(ep)
        status, _ = await call(p, scope, [{"type": "http.request", "body": b"abc"}])
        await p.close()
    assert status == 200
    headers, body = got[0]
    assert headers[b"content-length"] == b"3" and body == b"abc"
    assert headers[b"host"] == b"fn.torpor.localhost"


async def test_stall_mid_body_truncates_after_timeout() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n01234")
        await writer.drain()
        await asyncio.sleep(TIMEOUT)

    async with raw_server(handler) as ep:
        p = UpstreamPool(ep)
        client = Client()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(
                proxy(p, make_scope(), client.receive, client.send, timeout=0.3), TIMEOUT
            )
        assert client.status == 200 and not client.finished
        await p.close()


async def test_client_disconnect_mid_response_closes_upstream() -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"5\r\nhello\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
                if reader.at_eof():
                    break
                with contextlib.suppress(asyncio.TimeoutError):
                    if await asyncio.wait_for(reader.read(1), 0.001) == b"":
                        break
        finally:
            closed.set()

    async with raw_server(handler) as ep:
        p = UpstreamPool(ep)
        client = Client()
        task = asyncio.ensure_future(proxy(p, make_scope(), client.receive, client.send, timeout=5))
        await asyncio.wait_for(client.started.wait(), TIMEOUT)
        client.gone.set()
        status = await asyncio.wait_for(task, TIMEOUT)
        assert status == 200
        await asyncio.wait_for(closed.wait(), TIMEOUT)  # the upstream saw its connection end
        assert p.idle == 0
        await p.close()


async def test_client_disconnect_during_body_upload_returns_499() -> None:
    got_bytes = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        got_bytes.set()
        await reader.read()  # until the gateway closes

    async with raw_server(handler) as ep:
        p = UpstreamPool(ep)
        client = Client([{"type": "http.request", "body": b"x" * 10, "more_body": True}])
        scope = make_scope("POST", "/", headers=[(b"content-length", b"100")])
        task = asyncio.ensure_future(proxy(p, scope, client.receive, client.send, timeout=5))
        await asyncio.wait_for(got_bytes.wait(), TIMEOUT)
        client.gone.set()
        status = await asyncio.wait_for(task, TIMEOUT)
        assert status == 499 and client.sent == []
        assert p.idle == 0
        await p.close()


async def test_cancelled_while_waiting_for_the_head_leaves_nothing_behind() -> None:
    """A proxy cancelled (the gateway shutting down) while the replica computes: the
    task streaming the request body has ended and the upstream connection is closed
    by the time the proxy's task is done."""
    got_head = asyncio.Event()
    upstream_saw_eof = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        got_head.set()
        await reader.read()  # never answers; returns at the gateway's close
        upstream_saw_eof.set()

    pump_ended = asyncio.Event()

    async def receive() -> dict[str, Any]:  # the rest of the body never comes
        try:
            await asyncio.Event().wait()
        finally:
            pump_ended.set()
        raise AssertionError("unreachable")

    first = {"type": "http.request", "body": b"x" * 10, "more_body": True}
    async with raw_server(handler) as ep:
        p = UpstreamPool(ep)
        scope = make_scope("POST", "/", headers=[(b"content-length", b"100")])
        task = asyncio.ensure_future(
            proxy(p, scope, receive, Client().send, timeout=60, first_chunk=first)
        )
        await asyncio.wait_for(got_head.wait(), TIMEOUT)
        task.cancel()
        await asyncio.wait({task}, timeout=TIMEOUT)
        assert task.cancelled()
        assert pump_ended.is_set()  # ended before the proxy's task was done
        await asyncio.wait_for(upstream_saw_eof.wait(), TIMEOUT)
        assert p.idle == 0
        await p.close()


# ---------------------------------------------------------------------------
# End to end: a uvicorn gateway whose whole logic is proxy(), on uvloop when it is
# installed (as in production), so the protocol is exercised on both loops.

try:
    import uvloop  # noqa: F401

    GATEWAY_LOOP = "uvloop"
except ImportError:  # pragma: no cover
    GATEWAY_LOOP = "asyncio"


@pytest.fixture(scope="module")
def gateway(upstream: ThreadServer) -> Iterator[ThreadServer]:
    pools = Pools()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        await proxy(
            pools.get(upstream.endpoint),
            scope,
            receive,
            send,
            timeout=5,
            add_response_headers=[(b"x-via", b"torpor")],
        )

    with ThreadServer(app, loop=GATEWAY_LOOP) as server:
        yield server


async def test_e2e_get_post_head(gateway: ThreadServer) -> None:
    base = f"http://{gateway.endpoint}"
    async with httpx.AsyncClient(base_url=base, timeout=TIMEOUT) as http:
        r = await http.get("/hello")
        assert r.status_code == 200 and r.text == "hello" and r.headers["x-via"] == "torpor"
        data = os.urandom(2 * MiB)
        r = await http.post("/sha", content=data)
        assert r.json()["sha256"] == hashlib.sha256(data).hexdigest()
        r = await http.head("/hello")
        assert r.status_code == 200 and r.content == b"" and r.headers["content-length"] == "5"
        r = await http.get("/nocontent")
        assert r.status_code == 204 and r.content == b""
        r = await http.get("/big")
        assert len(r.content) == 2 * MiB
        r = await http.get("/stream")
        assert r.text == "part0;part1;part2;part3;part4;"


async def test_e2e_connection_reuse_and_close(gateway: ThreadServer) -> None:
    before = len(seen("/hello"))
    async with httpx.AsyncClient(base_url=f"http://{gateway.endpoint}", timeout=TIMEOUT) as http:
        for _ in range(5):
            assert (await http.get("/hello")).text == "hello"
        r = await http.get("/close")
        assert r.text == "bye"
        assert (await http.get("/hello")).text == "hello"
    ports = [r["port"] for r in seen("/hello")[before:]]
    assert len(ports) == 6
    assert len(set(ports[:5])) == 1  # one upstream connection for sequential requests
    closed = seen("/close")[-1]["port"]
    assert ports[5] != closed  # the connection the upstream closed was not reused


async def test_e2e_concurrent_requests(gateway: ThreadServer) -> None:
    async with httpx.AsyncClient(base_url=f"http://{gateway.endpoint}", timeout=TIMEOUT) as http:
        rs = await asyncio.gather(*(http.get("/hello") for _ in range(50)))
        posts = await asyncio.gather(
            *(http.post("/sha", content=b"x" * (1000 * i)) for i in range(1, 21))
        )
    assert all(r.status_code == 200 and r.text == "hello" for r in rs)
    for i, r in enumerate(posts, 1):
        assert r.json()["sha256"] == hashlib.sha256(b"x" * (1000 * i)).hexdigest()


async def test_e2e_chunked_request_body(gateway: ThreadServer) -> None:
    data = os.urandom(500_000)

    async def gen() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 70_000):
            yield data[i : i + 70_000]
            await asyncio.sleep(0.005)

    async with httpx.AsyncClient(base_url=f"http://{gateway.endpoint}", timeout=TIMEOUT) as http:
        r = await http.post("/sha", content=gen())
    assert r.status_code == 200
    assert r.json()["sha256"] == hashlib.sha256(data).hexdigest()


async def test_e2e_refused_upstream_is_a_server_error_not_a_hang() -> None:
    pools = Pools()
    dead = f"127.0.0.1:{free_port()}"

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await proxy(pools.get(dead), scope, receive, send, timeout=5)
        except NotSent:
            body = b'{"error": "no replica"}'
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": body})

    with ThreadServer(app) as gw:
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            r = await http.get(f"http://{gw.endpoint}/x")
    assert r.status_code == 503
