"""WebSocket upgrades through the real gateway (``Gateway`` on its own ``Server``) to a
replica on a real loopback socket: a raw asyncio server that answers ``/ws`` with 101
and then echoes bytes (the gateway only moves bytes, it parses no frames), and any
other upgrade with a plain 426. Both event loops, as the rest of the gateway's tests."""

# ruff: noqa: F811  (event_loop_policy: a fixture imported from test_gateway_limits)
from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_gateway_limits import REV, TIMEOUT, Env, Raw, event_loop_policy, until  # noqa: F401

from torpor.gateway.app import Gateway
from torpor.gateway.server import Server
from torpor.model import Function, Revision, Scale, Spec, TrafficTarget
from torpor.store.embedded import EmbeddedStore

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: fn.torpor.localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


class FakeReplica:
    """Records request heads; ``/ws`` + Upgrade -> 101 then an echo of raw bytes."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.open = 0
        self.server: asyncio.AbstractServer | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                if head.startswith(b"GET /ws ") and b"upgrade: websocket" in head.lower():
                    writer.write(
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\n\r\nwelcome;"
                    )
                    self.open += 1
                    try:
                        while data := await reader.read(65536):
                            writer.write(data)
                            await writer.drain()
                    finally:
                        self.open -= 1
                    return
                if b"upgrade:" in head.lower():
                    body = b'{"error": "upgrade required"}'
                    writer.write(
                        b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: %d\r\n\r\n%b"
                        % (len(body), body)
                    )
                else:
                    body = json.dumps({"head": head.decode("latin-1")}).encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
                    )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def ws_gateway(
    spec: Spec | None = None, ready: bool = True
) -> AsyncIterator[tuple[Env, FakeReplica]]:
    fake = FakeReplica()
    upstream = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    store = EmbeddedStore(None)
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
    gw = Gateway(store)
    await gw.start()
    server = Server(gw, "127.0.0.1", 0, graceful_timeout=2)
    task = asyncio.create_task(server.serve())
    await until(lambda: server.started, "the gateway listening")
    env = Env(store, gw, server, None, port, [])  # type: ignore[arg-type]
    if ready:
        await env.add_replica()
    try:
        yield env, fake
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, TIMEOUT)
        await gw.stop(drain=0.1)
        await store.close()
        upstream.close()


async def open_ws(env: Env) -> tuple[Raw, bytes]:
    raw = await Raw.connect(env.port)
    await raw.send(UPGRADE + b"\r\n")
    head = await asyncio.wait_for(raw.reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    return raw, head


async def echo(raw: Raw, data: bytes) -> bytes:
    await raw.send(data)
    return await asyncio.wait_for(raw.reader.readexactly(len(data)), TIMEOUT)


async def test_upgrade_is_piped_both_ways_and_holds_one_slot_until_close() -> None:
    async with ws_gateway() as (env, fake):
        raw, head = await open_ws(env)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"x-torpor-revision: fn-00001" in head and b"x-torpor-cold-start: false" in head
        assert await asyncio.wait_for(raw.reader.readexactly(8), TIMEOUT) == b"welcome;"
        # the replica saw the upgrade headers and the gateway's forwarding headers
        seen = fake.heads[-1].lower()
        assert b"upgrade: websocket" in seen and b"connection: upgrade" in seen
        assert (
            b"sec-websocket-key: dghlihnhbxbszsbub25jzq==" in seen and b"x-forwarded-for:" in seen
        )
        for size in (1, 70_000, 3 * 1024 * 1024):
            data = bytes(range(256)) * (size // 256) + b"!" * (size % 256)
            assert await echo(raw, data) == data
        assert env.rr.in_flight == 1 and env.gateway.in_flight == 1
        assert (
            env.rr.stats.requests == 1 and env.rr.stats.by_class[1] == 1
        )  # counted once, as a 101
        await raw.close()
        await until(
            lambda: env.rr.in_flight == 0 and env.gateway.in_flight == 0, "the slot released"
        )
        await until(lambda: fake.open == 0, "the replica side closed")
        assert env.rr.stats.requests == 1


async def test_upgrade_by_path_routing() -> None:
    async with ws_gateway() as (env, fake):
        raw = await Raw.connect(env.port)
        await raw.send(
            UPGRADE.replace(b"GET /ws ", b"GET /function/fn/ws ").replace(
                b"Host: fn.torpor.localhost", b"Host: 127.0.0.1"
            )
            + b"\r\n"
        )
        head = await asyncio.wait_for(raw.reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 101 ") and fake.heads[-1].startswith(b"GET /ws ")
        assert await asyncio.wait_for(raw.reader.readexactly(8), TIMEOUT) == b"welcome;"
        assert await echo(raw, b"ping") == b"ping"
        await raw.close()


async def test_upgrade_wakes_a_function_at_zero() -> None:
    async with ws_gateway(ready=False) as (env, fake):
        raw = await Raw.connect(env.port)
        await raw.send(UPGRADE + b"\r\n")
        await until(lambda: len(env.rr.activator) == 1, "the upgrade queued in the activator")
        await env.add_replica()
        head = await asyncio.wait_for(raw.reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 101 ") and b"x-torpor-cold-start: true" in head
        await asyncio.wait_for(raw.reader.readexactly(8), TIMEOUT)
        assert await echo(raw, b"awake") == b"awake"
        await raw.close()


async def test_an_open_socket_fills_the_concurrency_limit() -> None:
    async with ws_gateway(Spec(name="fn", scale=Scale(concurrency=1))) as (env, fake):
        raw, head = await open_ws(env)
        assert head.startswith(b"HTTP/1.1 101 ")
        other = await Raw.connect(env.port)
        await other.send(b"GET /plain HTTP/1.1\r\nHost: fn.torpor.localhost\r\n\r\n")
        await until(lambda: len(env.rr.activator) == 1, "the plain request waiting for the slot")
        await raw.close()
        status, _, _ = await other.response()  # served once the socket closed
        assert status == 200
        await other.close()


async def test_max_connection_closes_a_long_socket() -> None:
    async with ws_gateway(Spec(name="fn", max_connection=0.5)) as (env, fake):
        raw, _ = await open_ws(env)
        await asyncio.wait_for(raw.reader.readexactly(8), TIMEOUT)
        assert await echo(raw, b"still here") == b"still here"
        assert await raw.closed_by_server()
        await until(lambda: env.rr.in_flight == 0 and fake.open == 0, "both ends closed")


@pytest.mark.security
async def test_a_refused_upgrade_does_not_open_a_tunnel(attack: Any) -> None:
    """Smuggle a request behind an upgrade the replica refuses (WebSocket smuggling)"""
    async with ws_gateway() as (env, fake):
        raw = await Raw.connect(env.port)
        smuggled = b"GET /admin HTTP/1.1\r\nHost: other.torpor.localhost\r\n\r\n"
        await raw.send(UPGRADE.replace(b"GET /ws ", b"GET /nows ") + b"\r\n" + smuggled)
        status, headers, body = await raw.response()
        assert status == 426 and headers[b"connection"] == b"close" and b"upgrade required" in body
        assert await raw.closed_by_server()  # the bytes after the head were never read as a request
        assert [h.split(b" ")[1] for h in fake.heads] == [b"/nows"]
        await until(lambda: env.rr.in_flight == 0, "the slot released")
    attack.ended(f"{status} relayed, Connection: close; the smuggled request never parsed")


@pytest.mark.security
async def test_an_upgrade_with_a_body_is_refused(attack: Any) -> None:
    """Send a body with an upgrade request, to desynchronise the replica's framing"""
    async with ws_gateway() as (env, fake):
        raw = await Raw.connect(env.port)
        await raw.send(UPGRADE + b"Content-Length: 5\r\n\r\nhello")
        status, headers, _ = await raw.response()
        assert status == 400 and headers[b"connection"] == b"close"
        assert fake.heads == [] and env.rr.in_flight == 0
    attack.ended(f"{status} before any replica saw it")


async def test_other_upgrades_are_plain_requests() -> None:
    async with ws_gateway() as (env, fake):
        raw = await Raw.connect(env.port)
        await raw.send(
            b"GET /h2 HTTP/1.1\r\nHost: fn.torpor.localhost\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"
        )
        status, _, body = await raw.response()
        assert status == 200
        seen = json.loads(body)["head"].lower()
        assert "upgrade" not in seen  # hop-by-hop: stripped as before
        await raw.close()


async def test_gateway_stop_ends_open_sockets() -> None:
    async with ws_gateway() as (env, _fake):
        raw, _ = await open_ws(env)
        await asyncio.wait_for(raw.reader.readexactly(8), TIMEOUT)
    assert await raw.closed_by_server()  # after the server's graceful timeout
