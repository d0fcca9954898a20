"""Streams through the real gateway (``Gateway`` on its own ``Server``) to a replica that
is another real ``Server``: a streamed response's idle timeout (``stream_idle``) apart
from the time to its first byte (``timeout``), and request bodies over 1 MiB streamed
through within ``max_body`` while the gateway holds only their first MiB. Both loops."""

# ruff: noqa: F811  (event_loop_policy: a fixture imported from test_gateway_limits)
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_gateway_limits import (  # noqa: F401
    REV,
    TIMEOUT,
    Env,
    Raw,
    Receive,
    Scope,
    Send,
    event_loop_policy,
    running,
    until,
)

from torpor.gateway.app import STREAM_ABOVE, Gateway
from torpor.model import Function, Revision, Spec, TrafficTarget
from torpor.store.embedded import EmbeddedStore

MiB = 1024 * 1024


class StreamingReplica:
    """``/drip?gap=S&n=N``: N chunks, S seconds apart; ``/late?wait=S``: the head after S
    seconds; anything else: reads the body as it comes, answering its size. Records the
    largest body message it was given and the gateway's buffer at each message."""

    def __init__(self) -> None:
        self.gw: Gateway | None = None
        self.buffered: list[int] = []
        self.got = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        q = dict(p.split("=") for p in scope["query_string"].decode().split("&") if p)
        if scope["path"] == "/drip":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            for i in range(int(q["n"])):
                if i:
                    await asyncio.sleep(float(q["gap"]))
                await send({"type": "http.response.body", "body": b"%d\n" % i, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["path"] == "/late":
            await asyncio.sleep(float(q["wait"]))
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", b"2")],
                }
            )
            await send({"type": "http.response.body", "body": b"ok"})
            return
        self.got = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            self.got += len(msg.get("body", b""))
            assert self.gw is not None
            self.buffered.append(self.gw.buffered)
            if not msg.get("more_body"):
                break
        body = json.dumps({"bytes": self.got}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def stream_gateway(
    spec: Spec, ready: bool = True
) -> AsyncIterator[tuple[Env, StreamingReplica]]:
    app = StreamingReplica()
    store = EmbeddedStore(None)
    async with running(app) as upstream:
        fn = Function(
            name="fn",
            revisions=[Revision(name=REV, function="fn", number=1, spec=spec, status="ready")],
            traffic=[TrafficTarget(revision=REV, percent=100)],
            next_number=2,
        )
        await store.update_function("fn", lambda cur: fn)
        gw = Gateway(store)
        app.gw = gw
        await gw.start()
        env = Env(store, gw, None, None, upstream.port, [])  # type: ignore[arg-type]
        if ready:
            await env.add_replica()
        try:
            async with running(gw) as server:
                env.server = server
                yield env, app
        finally:
            await gw.stop(drain=TIMEOUT)
            await store.close()


async def read_chunked(raw: Raw) -> tuple[int, list[bytes], bool]:
    """-> status, the chunks, whether the body ended with its last chunk (else: cut)."""
    head = await asyncio.wait_for(raw.reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    status = int(head.split(b" ", 2)[1])
    chunks: list[bytes] = []
    try:
        while True:
            size = int((await asyncio.wait_for(raw.reader.readuntil(b"\r\n"), TIMEOUT))[:-2], 16)
            data = await asyncio.wait_for(raw.reader.readexactly(size + 2), TIMEOUT)
            if size == 0:
                return status, chunks, True
            chunks.append(data[:-2])
    except (asyncio.IncompleteReadError, ConnectionError):
        return status, chunks, False


async def test_stream_idle_bounds_the_gaps_and_timeout_only_the_first_byte() -> None:
    async with stream_gateway(Spec(name="fn", timeout=0.5, stream_idle=1.0)) as (env, _):
        raw = await Raw.connect(env.port)
        # 5 chunks 0.7 s apart: 2.8 s in all, past `timeout`, each gap under stream_idle
        await raw.send(b"GET /drip?n=5&gap=0.7 HTTP/1.1\r\nHost: fn.torpor.localhost\r\n\r\n")
        status, chunks, complete = await read_chunked(raw)
        assert (status, chunks, complete) == (200, [b"0\n", b"1\n", b"2\n", b"3\n", b"4\n"], True)
        # a gap over stream_idle: the stream is cut (no last chunk), the connection closed
        await raw.send(b"GET /drip?n=2&gap=3 HTTP/1.1\r\nHost: fn.torpor.localhost\r\n\r\n")
        status, chunks, complete = await read_chunked(raw)
        assert (status, chunks, complete) == (200, [b"0\n"], False)
        await raw.close()
        # the head itself is still bounded by `timeout`
        raw = await Raw.connect(env.port)
        await raw.send(b"GET /late?wait=2 HTTP/1.1\r\nHost: fn.torpor.localhost\r\n\r\n")
        status, _, body = await raw.response()
        assert status == 504 and json.loads(body)["error"] == "upstream timeout"
        await raw.close()
        await until(lambda: env.rr.in_flight == 0, "the slots released")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_large_upload_streams_holding_only_its_first_mib(chunked: bool) -> None:
    async with stream_gateway(Spec(name="fn", max_body=64 * MiB)) as (env, replica):
        size = 20 * MiB
        raw = await Raw.connect(env.port)
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
        await raw.send(
            b"POST /up HTTP/1.1\r\nHost: fn.torpor.localhost\r\n" + framing + b"\r\n\r\n"
        )
        block = b"u" * (256 * 1024)
        for _ in range(size // len(block)):
            await raw.send(b"%x\r\n%b\r\n" % (len(block), block) if chunked else block)
        if chunked:
            await raw.send(b"0\r\n\r\n")
        status, _, body = await raw.response()
        assert status == 200 and json.loads(body) == {"bytes": size}
        # the replica got it in many messages, while the gateway held at most about a MiB
        assert len(replica.buffered) > 10
        assert max(replica.buffered) <= STREAM_ABOVE + 256 * 1024
        await until(lambda: env.gateway.buffered == 0, "the buffer released")
        await raw.close()


async def test_a_large_upload_to_a_function_at_zero_waits_whole_for_its_replica() -> None:
    async with stream_gateway(Spec(name="fn", max_body=64 * MiB), ready=False) as (env, replica):
        size = 6 * MiB
        raw = await Raw.connect(env.port)
        await raw.send(
            b"POST /up HTTP/1.1\r\nHost: fn.torpor.localhost\r\nContent-Length: %d\r\n\r\n" % size
        )
        await raw.send(b"w" * (2 * MiB))  # past STREAM_ABOVE: dispatched, queued at the activator
        await until(lambda: len(env.rr.activator) == 1, "the upload queued for a replica")
        await env.add_replica()
        await raw.send(b"w" * (size - 2 * MiB))
        status, _, body = await raw.response()
        assert status == 200 and json.loads(body) == {"bytes": size}  # not a byte lost while queued
        await raw.close()


@pytest.mark.security
async def test_a_streamed_chunked_upload_is_cut_at_max_body(attack: Any) -> None:
    """Stream a chunked upload far past max_body once bodies are no longer buffered whole"""
    async with stream_gateway(Spec(name="fn", max_body=3 * MiB)) as (env, replica):
        raw = await Raw.connect(env.port)
        await raw.send(
            b"POST /up HTTP/1.1\r\nHost: fn.torpor.localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        block = b"v" * (256 * 1024)
        status = 0
        with contextlib.suppress(ConnectionError):
            for _ in range(40):  # 10 MiB offered
                await raw.send(b"%x\r\n%b\r\n" % (len(block), block))
        status, headers, body = await raw.response()
        assert status == 413 and json.loads(body)["field"] == "max_body"
        assert replica.got <= 3 * MiB  # never more than max_body reached the replica
        await until(
            lambda: env.rr.in_flight == 0 and env.gateway.buffered == 0, "slot and buffer released"
        )
        await raw.close()
    attack.ended(f"{status} max_body mid-stream; the replica saw <= 3 MiB")
