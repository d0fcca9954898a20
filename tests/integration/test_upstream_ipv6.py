"""The gateway's upstream reaches a replica at an IPv6 address (a Pod IP on an IPv6 or
dual-stack cluster): connect to ``::1`` on loopback through a bracketed endpoint."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from torpor.gateway.upstream import UpstreamPool, proxy

TIMEOUT = 10.0


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


async def test_a_bracketed_ipv6_endpoint_is_proxied() -> None:
    if not _has_ipv6_loopback():
        pytest.fail("this machine has no IPv6 loopback (::1); the test needs one", pytrace=False)
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        body = b"hello over ipv6"
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "::1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = UpstreamPool(f"[::1]:{port}")
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(TIMEOUT)
        return {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        sent.append(msg)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/x",
        "raw_path": b"/x",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"hello.torpor.localhost")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }
    try:
        status = await asyncio.wait_for(proxy(pool, scope, receive, send, timeout=5.0), TIMEOUT)
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
    assert status == 200
    assert b"".join(m.get("body", b"") for m in sent[1:]) == b"hello over ipv6"
    (head,) = seen
    assert head.startswith(b"GET /x HTTP/1.1\r\n")
    assert b"host: hello.torpor.localhost\r\n" in head.lower()  # the client's Host goes through
