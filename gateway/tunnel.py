"""WebSocket pass-through: the upgrade request to a replica, then bytes both ways.

``tunnel()`` opens a fresh connection to the replica (upgraded connections are never
pooled), sends the upgrade request head, and reads the response head within
``timeout``:

- ``101``: the client's connection is taken over (``accept``, the gateway server's
  ``_Cycle.upgrade``), the 101 head goes to the client with the gateway's response
  headers, and from then on bytes are piped both ways as they come. Flow control:
  when one side's write buffer is full, reading from the other side pauses until it
  drains, so a slow reader never makes the gateway buffer more than a transport's
  high-water mark. The pipe ends when either side closes (the other is closed too) or
  after ``max_connection`` seconds (both are closed).
- anything else (the replica serves no WebSocket there: 400, 404, 426...): that
  response is relayed as a plain HTTP response (its body up to ``MAX_REFUSAL`` bytes)
  and the upstream connection is closed.

Failure contract, as ``upstream.proxy``'s: ``NotSent`` when the connection could not be
made (retry elsewhere); 504 when no response head came within ``timeout``; 503 when
the replica closed or answered garbage before a head. Nothing here parses WebSocket
frames: the gateway only moves bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from torpor.gateway.asgi import Scope, Send
from torpor.gateway.upstream import NotSent, UpstreamPool, _request_head, _send_error

__all__ = ["tunnel", "wants_websocket"]

Accept = Callable[[Any], asyncio.Transport]

MAX_HEAD = 64 * 1024  # a response head larger than this is a failed replica
MAX_REFUSAL = 1024 * 1024  # body of a non-101 answer relayed to the client
_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"trailer",
        b"te",
        b"proxy-connection",
    }
)


def wants_websocket(scope: Scope) -> Accept | None:
    """The server's ``accept`` for a ``GET`` with ``Upgrade: websocket`` (and Connection:
    upgrade, which the server checked), else None: other upgrades are plain requests."""
    ext = scope.get("extensions")
    if not ext or scope["method"] != "GET":
        return None
    up = ext.get("torpor.upgrade")
    if up is None:
        return None
    for name, value in scope["headers"]:
        if name == b"upgrade" and b"websocket" in value.lower():
            return cast(Accept, up["accept"])
    return None


class _Side(asyncio.Protocol):
    """One end of the pipe: what it reads goes to ``peer``'s transport."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None  # where this side's bytes go
        self.pending: list[bytes] = []  # read before the peer exists
        self.more: asyncio.Future[None] | None = None  # set when pending grows

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            self.pending.append(data)
            more = self.more
            if more is not None and not more.done():
                more.set_result(None)
        elif not peer.is_closing():
            peer.write(data)

    def eof_received(self) -> bool | None:
        self._end()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def _end(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    # our transport's write buffer filled / drained: stop / resume reading the peer
    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.is_closing():
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and not peer.is_closing():
            peer.resume_reading()


class _Upstream(_Side):
    """The replica's end; until the response head is in, it collects it."""

    def __init__(self, done: asyncio.Future[None], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(done)
        self.head_buf = bytearray()
        self.head: asyncio.Future[None] = loop.create_future()
        self.reading_head = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self.reading_head:
            super().data_received(data)
            return
        self.head_buf += data
        if b"\r\n\r\n" in self.head_buf[-len(data) - 3 :] or len(self.head_buf) > MAX_HEAD:
            self.reading_head = False
            if not self.head.done():
                self.head.set_result(None)

    def _end(self) -> None:
        super()._end()
        if not self.head.done():
            self.head.set_result(None)


class _Client(_Side):
    """The client's end, attached to the gateway server's connection (a ``Pipe``)."""


def _response_headers(head: bytes) -> tuple[int, list[tuple[bytes, bytes]]]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError("not an HTTP/1.x status line")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError("malformed header line")
        headers.append((name.strip().lower(), value.strip()))
    return int(parts[1]), headers


class _Refusal:
    """httptools callbacks for relaying a non-101 answer."""

    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size <= MAX_REFUSAL:
            self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


async def _relay_refusal(
    up: _Upstream, send: Send, add: Iterable[tuple[bytes, bytes]], timeout: float
) -> int:
    """The replica did not switch protocols: pass its answer on as plain HTTP."""
    raw = bytes(up.head_buf)
    status, headers = _response_headers(raw.split(b"\r\n\r\n", 1)[0])
    cb = _Refusal()
    parser = HttpResponseParser(cb)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    data = raw
    while True:
        try:
            parser.feed_data(data)
        except (HttpParserError, HttpParserUpgrade):
            break
        if cb.complete or cb.size > MAX_REFUSAL:
            break
        if not up.pending:
            if up.done.done() or loop.time() >= deadline:
                break
            up.more = loop.create_future()
            await asyncio.wait(
                {up.more, up.done},
                timeout=max(deadline - loop.time(), 0.001),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not up.pending:
                continue
        data, up.pending = b"".join(up.pending), []
    body = b"".join(cb.body) if cb.size <= MAX_REFUSAL else b""
    out = [(n, v) for n, v in headers if n not in _HOP]
    out.append((b"content-length", str(len(body)).encode()))
    out.append((b"connection", b"close"))
    out.extend(add)
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return status


async def tunnel(
    pool: UpstreamPool,
    scope: Scope,
    send: Send,
    accept: Accept,
    *,
    timeout: float,
    max_connection: float,
    add_request_lines: bytes = b"",
    add_response_headers: Iterable[tuple[bytes, bytes]] = (),
    on_open: Callable[[int], None] | None = None,
) -> int:
    """Pass one WebSocket upgrade to ``pool``'s replica and pipe the connection until it
    ends; -> the status the client got (101 once switched). ``on_open`` is called with
    101 as the protocol switches (before the pipe runs). Raises NotSent."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    try:
        async with asyncio.timeout(pool.connect_timeout):
            transport, up = await loop.create_connection(
                lambda: _Upstream(done, loop), pool.host, pool.port
            )
    except TimeoutError:
        raise NotSent(f"connect to {pool.endpoint} timed out") from None
    except OSError as exc:
        raise NotSent(f"connect to {pool.endpoint} failed: {exc}") from None
    add = list(add_response_headers)
    try:
        parts, _, _ = _request_head(scope, pool, (), add_request_lines)
        parts.append(b"connection: upgrade\r\nupgrade: websocket\r\n\r\n")
        transport.write(b"".join(parts))
        try:
            async with asyncio.timeout(timeout):
                await up.head
        except TimeoutError:
            return await _send_error(
                send,
                504,
                "upstream timeout",
                f"the replica did not answer the upgrade within {timeout:g} s",
                add,
            )
        raw = bytes(up.head_buf)
        head, sep, rest = raw.partition(b"\r\n\r\n")
        try:
            if not sep:
                raise ValueError(
                    "no complete response head" if up.done.done() else "response head too large"
                )
            status, _ = _response_headers(head)
        except ValueError as exc:
            return await _send_error(send, 503, "replica failed", f"upgrade: {exc}", add)
        if status != 101:
            return await _relay_refusal(up, send, add, timeout)
        client = _Client(done)
        try:
            client_transport = accept(client)
        except RuntimeError:
            return 499  # the client left meanwhile
        extra = b"".join(n + b": " + v + b"\r\n" for n, v in add)
        client_transport.write(head + b"\r\n" + extra + b"\r\n")
        if rest:
            client_transport.write(rest)
        # wire the two ends together, then hand over what each read meanwhile
        client.transport, client.peer = client_transport, transport
        up.peer = client_transport
        for chunk in up.pending:
            client_transport.write(chunk)
        up.pending = []
        for chunk in client.pending:
            transport.write(chunk)
        client.pending = []
        if on_open is not None:
            on_open(101)
        if not done.done():
            try:
                await asyncio.wait_for(asyncio.shield(done), max_connection)
            except TimeoutError:
                pass  # open longer than max_connection: both ends close below
        client_transport.close()
        return 101
    finally:
        transport.close()
