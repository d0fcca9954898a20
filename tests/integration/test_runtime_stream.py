# ruff: noqa: F811  (the `start` fixture is imported from test_runtime)
"""The runtime's streams on a real process: streamed responses (generators, async
generators, Response(body=iterator)), SSE, request.stream() for large uploads, and
WebSockets (RFC 6455) checked with an independent client (the ``websockets`` package)
and with hand-made frames."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import websockets
from test_runtime import IO_TIMEOUT, Replica, Start, start  # noqa: F401  (start: a fixture)

from torpor.runtime.server import ws_frame, ws_mask

MiB = 1024 * 1024

HANDLER = """
import asyncio, hashlib, time
from torpor_runtime import Response, sse

def handle(request):
    p = request.path
    if p == "/ticks":
        def gen():
            for i in range(4):
                yield f"tick {i}\\n"
                time.sleep(0.3)
        return gen()
    if p == "/bytes-body":
        return Response(iter([b"a", b"", b"b", bytearray(b"c")]), status=201, headers={"X-Kind": "iter"})
    if p == "/boom":
        def gen():
            yield "first\\n"
            raise RuntimeError("broke mid-stream")
        return gen()
    if p == "/boom-first":
        def gen():
            raise ValueError("nothing to say")
            yield "never"
        return gen()
    if p == "/badpiece":
        return iter(["ok\\n", 42])
    if p == "/events":
        return sse(["hello", {"event": "n", "id": 7, "data": {"x": [1, 2]}}, {"data": "two\\nlines"},
                    {"comment": "keep-alive", "retry": 1500}])
    if p == "/upload":
        digest, size, biggest = hashlib.sha256(), 0, 0
        for piece in request.stream():
            digest.update(piece)
            size += len(piece)
            biggest = max(biggest, len(piece))
        return {"bytes": size, "sha256": digest.hexdigest(), "biggest": biggest}
    if p == "/echo-stream":
        return request.stream()   # the request body, streamed back as it comes
    if p == "/ignore":
        return "ignored"
    return {"length": len(request.body), "sha256": hashlib.sha256(request.body).hexdigest()}

async def ahandle(request):
    if request.path == "/body":
        return {"length": len(request.body)}
    if request.path == "/read":
        body = await request.read()
        return {"length": len(body)}
    if request.path == "/astream":
        n = 0
        async for piece in request.stream():
            n += len(piece)
        return {"length": n}
    async def gen():
        for i in range(3):
            yield f"a{i}\\n"
            await asyncio.sleep(0.3)
    return gen()

async def aecho(ws):
    async for message in ws:
        if message == "close-4000":
            await ws.close(4000, "asked")
            return
        if message == "whoami":
            await ws.send(ws.request.path + "?" + ws.request.query_string)
            continue
        await ws.send(message)

def secho(ws):
    for message in ws:
        ws.send(message)

def wsboom(ws):
    ws.receive()
    raise RuntimeError("socket handler failed")
"""


@pytest.fixture
def fn(tmp_path: Path) -> Path:
    folder = tmp_path / "streams"
    folder.mkdir()
    (folder / "handler.py").write_text(HANDLER)
    return folder


def chunked_lines(rep: Replica, path: str) -> list[tuple[float, bytes]]:
    """(seconds since the request, line) for each line of a streamed body as it arrives."""
    conn = rep.connection()
    t0 = time.monotonic()
    conn.request("GET", path)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.headers["Transfer-Encoding"] == "chunked"
    out = []
    while True:
        line = resp.readline()
        if not line:
            break
        out.append((time.monotonic() - t0, line))
    conn.close()
    return out


def test_a_generator_is_sent_piece_by_piece(start: Start, fn: Path) -> None:
    rep = start(fn)
    lines = chunked_lines(rep, "/ticks")
    assert [line for _, line in lines] == [b"tick 0\n", b"tick 1\n", b"tick 2\n", b"tick 3\n"]
    # spread out in time (the handler sleeps 0.3 s between pieces), not all at the end
    assert lines[-1][0] - lines[0][0] >= 0.6


def test_an_async_generator_is_sent_piece_by_piece(start: Start, fn: Path) -> None:
    rep = start(fn, {"TORPOR_HANDLER": "handler:ahandle"})
    lines = chunked_lines(rep, "/agen")
    assert [line for _, line in lines] == [b"a0\n", b"a1\n", b"a2\n"]
    assert lines[-1][0] - lines[0][0] >= 0.4


def test_response_with_an_iterator_body_keeps_status_and_headers(start: Start, fn: Path) -> None:
    rep = start(fn)
    status, headers, body = rep.request("GET", "/bytes-body")
    assert (status, headers["X-Kind"], body) == (201, "iter", b"abc")
    assert headers["Content-Type"] == "application/octet-stream"
    # the connection stays usable after a complete stream
    conn = rep.connection()
    for _ in range(2):
        conn.request("GET", "/bytes-body")
        assert conn.getresponse().read() == b"abc"
    conn.close()


def test_head_of_a_stream_sends_no_body(start: Start, fn: Path) -> None:
    rep = start(fn)
    status, _, body = rep.request("HEAD", "/ticks")
    assert status == 200 and body == b""


def test_an_exception_mid_stream_terminates_the_chunked_body_and_is_logged(
    start: Start, fn: Path
) -> None:
    rep = start(fn)
    with rep.socket() as s:
        s.sendall(b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while True:
            got = s.recv(65536)
            if not got:
                break  # the runtime closes the connection after a broken stream
            data += got
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head  # (the head went out before the failure)
    assert body == b"6\r\nfirst\n\r\n0\r\n\r\n"  # the last chunk: a well-formed end
    assert rep.stderr_shows("response stream raised mid-stream on GET /boom")
    assert rep.stderr_shows("RuntimeError: broke mid-stream")
    assert rep.request("GET", "/bytes-body")[0] == 201  # still serving


def test_a_stream_that_fails_before_its_first_piece_is_a_500(start: Start, fn: Path) -> None:
    rep = start(fn)
    status, _, body = rep.request("GET", "/boom-first")
    assert status == 500 and b"ValueError: nothing to say" in body
    status, _, body = rep.request("GET", "/badpiece")  # a piece that is neither bytes nor str
    assert status == 200 and body == b"ok\n"
    assert rep.stderr_shows("stream yielded int")


def test_sse_helper_formats_events(start: Start, fn: Path) -> None:
    rep = start(fn)
    status, headers, body = rep.request("GET", "/events")
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache"
    assert body == (
        b"data: hello\n\n"
        b'event: n\nid: 7\ndata: {"x": [1, 2]}\n\n'
        b"data: two\ndata: lines\n\n"
        b": keep-alive\nretry: 1500\n\n"
    )


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _upload(
    rep: Replica, path: str, size: int, chunked: bool = False
) -> tuple[int, bytes, str, list[int]]:
    """Send ``size`` random-ish bytes; -> status, body, their sha256, RSS samples (KiB)."""
    block = os.urandom(MiB)
    digest = hashlib.sha256()
    rss = [_rss_kib(rep.proc.pid)]
    conn = rep.connection()
    conn.putrequest("POST", path)
    if chunked:
        conn.putheader("Transfer-Encoding", "chunked")
    else:
        conn.putheader("Content-Length", str(size))
    conn.endheaders()
    sent = 0
    while sent < size:
        piece = block[: min(MiB, size - sent)]
        digest.update(piece)
        conn.send(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
        sent += len(piece)
        if sent % (8 * MiB) == 0:
            rss.append(_rss_kib(rep.proc.pid))
    if chunked:
        conn.send(b"0\r\n\r\n")
    resp = conn.getresponse()
    body = resp.read()
    rss.append(_rss_kib(rep.proc.pid))
    conn.close()
    return resp.status, body, digest.hexdigest(), rss


@pytest.mark.slow
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_100_mib_upload_streams_with_flat_rss(start: Start, fn: Path, chunked: bool) -> None:
    rep = start(fn, {"TORPOR_MAX_BODY": "200Mi"})
    rep.request("GET", "/bytes-body")  # warm the thread pool before the baseline sample
    status, body, sha, rss = _upload(rep, "/upload", 100 * MiB, chunked)
    import json

    got = json.loads(body)
    assert status == 200 and got["bytes"] == 100 * MiB and got["sha256"] == sha
    assert got["biggest"] <= 256 * 1024
    # flat: the replica never holds more than a few pieces (the read buffer is 256 KiB)
    assert max(rss) - rss[0] < 24 * 1024, rss


def test_a_small_body_is_still_whole_and_streams_in_one_piece(start: Start, fn: Path) -> None:
    rep = start(fn)
    status, _, body = rep.request("POST", "/upload", body=b"x" * 1000)
    assert status == 200 and b'"bytes": 1000' in body


def test_a_sync_handler_reads_a_streamed_body_whole_through_body(start: Start, fn: Path) -> None:
    rep = start(fn, {"TORPOR_BODY_BUFFER": "64Ki"})
    payload = os.urandom(3 * MiB)
    status, _, body = rep.request("POST", "/whole", body=payload)
    assert status == 200 and hashlib.sha256(payload).hexdigest().encode() in body


def test_an_async_handler_gets_a_clear_error_for_body_and_can_read_it(
    start: Start, fn: Path
) -> None:
    rep = start(fn, {"TORPOR_HANDLER": "handler:ahandle", "TORPOR_BODY_BUFFER": "64Ki"})
    payload = b"y" * (MiB + 5)
    status, _, body = rep.request("POST", "/body", body=payload)
    assert status == 500 and b"await request.read()" in body
    for path in ("/read", "/astream"):
        status, _, body = rep.request("POST", path, body=payload)
        assert (status, body) == (200, b'{"length": 1048581}')
    status, _, body = rep.request("POST", "/body", body=b"small")
    assert (status, body) == (200, b'{"length": 5}')


def test_a_chunked_stream_over_max_body_is_413(start: Start, fn: Path) -> None:
    rep = start(fn, {"TORPOR_MAX_BODY": "2Mi", "TORPOR_BODY_BUFFER": "64Ki"})
    status, body, _, _ = _upload(rep, "/upload", 3 * MiB, chunked=True)
    assert status == 413 and b"larger than 2097152" in body


def test_a_handler_that_ignores_a_streamed_body_answers_and_closes(start: Start, fn: Path) -> None:
    rep = start(fn, {"TORPOR_BODY_BUFFER": "64Ki"})
    conn = rep.connection()
    conn.request("POST", "/ignore", body=b"z" * (2 * MiB))
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b"ignored"
    assert resp.headers.get("Connection") == "close"  # the unread rest is not parsed as a request
    conn.close()


def test_request_stream_echoed_back_as_a_response_stream(start: Start, fn: Path) -> None:
    rep = start(fn, {"TORPOR_BODY_BUFFER": "64Ki"})
    payload = os.urandom(2 * MiB)
    status, _, body = rep.request("POST", "/echo-stream", body=payload)
    assert status == 200 and body == payload


# --------------------------------------------------------------------------- WebSockets


def ws_url(rep: Replica, path: str = "/chat") -> str:
    return f"ws://127.0.0.1:{rep.port}{path}"


@pytest.mark.parametrize("handler", ["handler:aecho", "handler:secho"], ids=["async", "sync"])
def test_websocket_echo_with_an_independent_client(start: Start, fn: Path, handler: str) -> None:
    rep = start(fn, {"TORPOR_WEBSOCKET": handler})

    async def talk() -> None:
        async with websockets.connect(ws_url(rep), max_size=None) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
            big = os.urandom(200_000)  # 64-bit length, fragmented by nobody, masked by the client
            await ws.send(big)
            assert await ws.recv() == big
            await ws.send(["frag", "mented ", "text"])  # a fragmented message
            assert await ws.recv() == "fragmented text"
            latency = await ws.ping()
            await asyncio.wait_for(latency, IO_TIMEOUT)
        assert ws.close_code == 1000

    asyncio.run(talk())
    # plain HTTP keeps working beside it
    assert rep.request("GET", "/bytes-body")[0] == 201


def test_open_sync_sockets_do_not_take_the_http_handlers_threads(start: Start, fn: Path) -> None:
    rep = start(fn, {"TORPOR_WEBSOCKET": "handler:secho", "TORPOR_THREADS": "2"})

    async def talk() -> int:
        async with contextlib.AsyncExitStack() as stack:
            socks = [
                await stack.enter_async_context(websockets.connect(ws_url(rep))) for _ in range(5)
            ]
            for i, ws in enumerate(socks):
                await ws.send(f"s{i}")
                assert await ws.recv() == f"s{i}"
            # five sync socket handlers are running; the pool has two threads
            status, _, _ = await asyncio.to_thread(rep.request, "GET", "/bytes-body")
            return status

    assert asyncio.run(talk()) == 201


def test_websocket_handler_sees_the_request_and_closes_with_its_code(
    start: Start, fn: Path
) -> None:
    rep = start(fn, {"TORPOR_WEBSOCKET": "handler:aecho"})

    async def talk() -> tuple[int | None, str | None]:
        async with websockets.connect(ws_url(rep, "/room/1?user=ann")) as ws:
            await ws.send("whoami")
            assert await ws.recv() == "/room/1?user=ann"
            await ws.send("close-4000")
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
        return ws.close_code, ws.close_reason

    assert asyncio.run(talk()) == (4000, "asked")


def test_a_raising_websocket_handler_closes_1011_and_is_logged(start: Start, fn: Path) -> None:
    rep = start(fn, {"TORPOR_WEBSOCKET": "handler:wsboom"})

    async def talk() -> int | None:
        async with websockets.connect(ws_url(rep)) as ws:
            await ws.send("x")
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
        return ws.close_code

    assert asyncio.run(talk()) == 1011
    assert rep.stderr_shows("RuntimeError: socket handler failed")


def _raw_ws(rep: Replica) -> socket.socket:
    s = rep.socket()
    s.sendall(
        b"GET /raw HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # RFC 6455's own example
    return s


def _read_frame(s: socket.socket) -> tuple[int, bytes]:
    def need(n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = s.recv(n - len(out))
            if not got:
                raise ConnectionError("closed")
            out += got
        return out

    b0, b1 = need(2)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(need(2), "big")
    elif n == 127:
        n = int.from_bytes(need(8), "big")
    assert not b1 & 0x80, "a server's frames are never masked"
    return b0 & 0x0F, need(n)


def test_websocket_ping_is_answered_and_unmasked_frames_are_refused(start: Start, fn: Path) -> None:
    rep = start(fn, {"TORPOR_WEBSOCKET": "handler:aecho"})
    with _raw_ws(rep) as s:
        s.sendall(ws_frame(9, b"are you there", mask=b"abcd"))
        assert _read_frame(s) == (10, b"are you there")  # pong with the same payload
        s.sendall(ws_frame(1, b"masked ok", mask=b"\x01\x02\x03\x04"))
        assert _read_frame(s) == (1, b"masked ok")
        s.sendall(ws_frame(1, b"not masked"))  # a client MUST mask: protocol error
        opcode, payload = _read_frame(s)
        assert opcode == 8 and int.from_bytes(payload[:2], "big") == 1002


def test_websocket_bad_utf8_and_oversized_messages_are_closed(start: Start, fn: Path) -> None:
    rep = start(fn, {"TORPOR_WEBSOCKET": "handler:aecho", "TORPOR_MAX_BODY": "1Ki"})
    with _raw_ws(rep) as s:
        s.sendall(ws_frame(1, b"\xff\xfe", mask=b"abcd"))
        opcode, payload = _read_frame(s)
        assert opcode == 8 and int.from_bytes(payload[:2], "big") == 1007
    with _raw_ws(rep) as s:
        s.sendall(ws_frame(2, b"x" * 2000, mask=b"abcd"))
        opcode, payload = _read_frame(s)
        assert opcode == 8 and int.from_bytes(payload[:2], "big") == 1009


def test_websocket_handshake_refusals(start: Start, fn: Path) -> None:
    rep = start(fn, {"TORPOR_WEBSOCKET": "handler:aecho"})
    base = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    }
    status, headers, _ = rep.request("GET", "/", headers={**base, "Sec-WebSocket-Version": "8"})
    assert status == 426 and headers["Sec-WebSocket-Version"] == "13"
    status, _, _ = rep.request(
        "GET", "/", headers={**base, "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "x"}
    )
    assert status == 400


def test_without_a_websocket_handler_an_upgrade_is_a_plain_request(start: Start, fn: Path) -> None:
    rep = start(fn)
    status, _, body = rep.request(
        "GET", "/bytes-body", headers={"Upgrade": "websocket", "Connection": "Upgrade"}
    )
    assert (status, body) == (201, b"abc")


def test_sigterm_closes_open_websockets_with_1001(start: Start, fn: Path) -> None:
    rep = start(fn, {"TORPOR_WEBSOCKET": "handler:aecho", "TORPOR_DRAIN_TIMEOUT": "2"})
    with _raw_ws(rep) as s:
        s.sendall(ws_frame(1, b"before", mask=b"abcd"))
        assert _read_frame(s) == (1, b"before")
        t0 = time.monotonic()
        rep.proc.send_signal(signal.SIGTERM)
        s.settimeout(IO_TIMEOUT)
        opcode, payload = _read_frame(s)
        # the socket kept its grace period (80% of the drain timeout), then 1001 "going away"
        assert opcode == 8 and int.from_bytes(payload[:2], "big") == 1001
        assert time.monotonic() - t0 >= 1.0
        s.sendall(ws_frame(8, payload[:2], mask=b"abcd"))
    assert rep.wait() == 0


def test_frame_helpers_round_trip() -> None:
    key = b"\x10\x20\x30\x40"
    assert ws_mask(ws_mask(b"hello world", key), key) == b"hello world"
    assert ws_frame(1, b"x" * 70000)[:2] == bytes((0x81, 127))
    assert ws_frame(2, b"x" * 300)[:4] == bytes((0x82, 126)) + (300).to_bytes(2, "big")


def test_http_client_reads_streamed_body_to_the_end(start: Start, fn: Path) -> None:
    """http.client (an independent HTTP client) decodes the chunked framing."""
    rep = start(fn)
    conn = http.client.HTTPConnection("127.0.0.1", rep.port, timeout=IO_TIMEOUT)
    conn.request("GET", "/ticks")
    assert conn.getresponse().read() == b"tick 0\ntick 1\ntick 2\ntick 3\n"
    conn.close()
