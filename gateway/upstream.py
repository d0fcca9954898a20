"""Pooled keep-alive HTTP/1.1 client for the gateway's hot path.

One ``UpstreamPool`` per replica endpoint (``host:port``) keeps idle keep-alive
connections; ``proxy`` forwards one ASGI http request over one of them and streams
the response back to the ASGI ``send``. Responses are parsed by
``httptools.HttpResponseParser`` inside an ``asyncio.Protocol`` (callbacks, no
StreamReader): on a warm connection a small request costs one ``write``, one wake-up
and two ``send`` calls.

Failure contract (what the caller sees):

- ``NotSent`` is raised when nothing reached the upstream (connect refused, connect
  timeout, a reset before the first byte was written, a closed pool). Nothing has been
  sent to the client; retry on another replica, passing ``exc.first_chunk`` as
  ``first_chunk`` (the body message this call already pulled from ``receive``).
- A reused idle connection that dies before any response byte is retried once on a
  fresh connection when that is safe: the request had no body or an idempotent method
  and its whole body is still in memory. A POST/PATCH whose bytes were written is
  never resent.
- No response head within ``timeout`` seconds after the request was fully sent: a 504
  JSON body ``{"error": "upstream timeout", ...}`` with ``Retry-After: 1``.
- The upstream fails after the request was sent and before the response head (closed,
  reset, unparsable response): a 503 JSON body ``{"error": "replica failed", ...}``
  with ``Retry-After: 1``.
- The upstream fails or stalls mid-body for ``idle_timeout`` seconds (the spec's
  ``stream_idle``; ``timeout`` when not given), after the head went to the client: the status can no longer change, so ``proxy`` raises
  ``ConnectionResetError`` without sending a final body message. The ASGI server then
  closes the client connection and the client sees a truncated response (never a
  silently complete one, never a hang).
- The client goes away (``http.disconnect`` from ``receive``, or ``send`` raising): the
  upstream connection is closed, never pooled (unless the upstream's response had
  already arrived whole, keep-alive: then the connection is clean and is pooled). If
  nothing was sent yet ``proxy`` returns 499 (nginx's "client closed request") without
  sending; an exception raised by ``send`` propagates.

The disconnect is noticed while a request body is being streamed and while a
response body is being streamed; a client that leaves while the upstream is still
computing the response head is noticed when the head arrives.

Hop-by-hop headers (Connection, Keep-Alive, Proxy-Connection, TE, Trailer,
Transfer-Encoding, Upgrade and every header named in Connection) are removed in both
directions. The client's forwarding headers (``Forwarded``, ``X-Forwarded-For``,
``-Host``, ``-Proto``) are never passed on: whoever calls ``proxy`` sets them in
``add_request_headers`` from what it saw (``torpor.gateway.forwarded``). ``Expect`` is removed from requests too: the ASGI server already answered
``100-continue`` to the client and the body is sent without waiting. Responses 1xx
are skipped; on 204/304 ``Content-Length`` is dropped (there is no body to match it).
Trailers of chunked responses are dropped.

The replica's own ``Server`` and ``Date`` headers pass through; the gateway's server
(``torpor.gateway.server``) adds neither, so they are not duplicated (under another
ASGI server, such as uvicorn, turn its own off: ``server_header=False,
date_header=False``).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable, Iterator
from typing import cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from torpor.gateway.asgi import Headers, Message, Receive, Scope, Send
from torpor.gateway.errors import send_json
from torpor.gateway.flow import WriteFlow
from torpor.gateway.forwarded import FORWARDING_HEADERS
from torpor.gateway.tasks import cancelled

__all__ = ["NotSent", "Pools", "UpstreamPool", "proxy"]


class NotSent(Exception):
    """No byte of the request reached the upstream (connect refused/reset before write);
    safe to retry on another replica.

    ``first_chunk`` is the first ``http.request`` message of the body if ``proxy`` had
    it (passed in or pulled from ``receive``); hand it to the next ``proxy`` call.
    """

    def __init__(self, message: str, first_chunk: Message | None = None) -> None:
        super().__init__(message)
        self.first_chunk = first_chunk


# ---------------------------------------------------------------------------
# Constants computed once.

_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request headers that need a look: hop-by-hop, framing, Host, Expect, forwarding.
_REQ_SPECIAL = _HOP | FORWARDING_HEADERS | {b"content-length", b"host", b"expect"}
# Response headers that need a look.
_RESP_SPECIAL = _HOP | {b"content-length"}
# Connection tokens that name nothing to strip beyond _HOP, or name headers that must
# never be stripped on a peer's say-so: removing Content-Length from a request whose
# body is forwarded would desynchronise the upstream connection (request smuggling).
_IGNORED_CONN_TOKENS = frozenset({b"close", b"keep-alive", b"", b"content-length", b"host"}) | _HOP

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
_METHODS = {m: m.encode() for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}
_NO_BODY_STATUS = frozenset({204, 304})

_HTTP11 = b" HTTP/1.1\r\n"
_CHUNKED = b"transfer-encoding: chunked\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_READ_HIGH = 256 * 1024  # pause reading the upstream above this many buffered bytes
_BIG_WRITE = 64 * 1024  # above this, head and body go out as two writes (no copy)
_CLIENT_GONE = 499
_TICK = 0.05  # timeout resolution: a timeout fires within _TICK s after it is due


# ---------------------------------------------------------------------------
# The connection: an asyncio protocol that parses responses with httptools.


class _Conn(WriteFlow, asyncio.Protocol):
    __slots__ = (
        "loop",
        "pool",
        "transport",
        "parser",
        "alive",
        "active",
        "waiter",
        "read_paused",
        "deadline",
        # per response
        "status",
        "headers",
        "conn_tokens",
        "framed",
        "head_done",
        "complete",
        "keep_alive",
        "chunks",
        "buffered",
        "got_bytes",
        "error",
        "timed_out",
        "info",
        "head_only",
        "parser_dirty",
        # per request
        "body_done",
        "client_gone",
        "pump",
    )

    def __init__(self, pool: UpstreamPool, loop: asyncio.AbstractEventLoop) -> None:
        # Keep the loop: in Python 3.11 every asyncio.get_running_loop() is a getpid().
        self.loop = loop
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.alive = False
        self.active = False
        self.waiter: asyncio.Future[None] | None = None
        WriteFlow.__init__(self)
        self.read_paused = False
        self.deadline = 0.0  # loop.time() at which the wait times out; 0 = none
        self.parser_dirty = False
        self.pump: asyncio.Task[None] | None = None  # handed from phase 2 to phase 3 of proxy
        self.reset()

    def reset(self) -> None:
        self.status = 0
        self.headers: Headers = []
        self.conn_tokens: list[bytes] | None = None
        self.framed = False
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.got_bytes = False
        self.error: str | None = None
        self.timed_out = False
        self.info = False
        self.head_only = False
        self.body_done = True
        self.client_gone = False

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.alive = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):  # pragma: no cover - not TCP
                pass

    def data_received(self, data: bytes) -> None:
        if not self.active:  # bytes on an idle connection: the upstream is confused
            self.alive = False
            self.abort()
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            self._fail("replica answered with a protocol upgrade")
        except HttpParserError as exc:
            self._fail(f"invalid HTTP response from replica ({exc})")
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        if not self.active:
            self.pool._forget(self)
        elif not self.complete:
            if (
                exc is None
                and self.head_done
                and not self.framed
                and self.error is None
                and not self.client_gone
            ):
                # A body delimited by the upstream closing cleanly (no length, not chunked);
                # a reset (exc set) is a failure, not the end of the body.
                self.complete = True
                self.keep_alive = False
            elif self.error is None:
                self.error = "replica closed the connection"
        self._wake()

    # -- httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:  # a second response to one request: never reuse
            self.keep_alive = False
            self.error = "replica sent more than one response"

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in _RESP_SPECIAL:
            if name == b"content-length":
                self.framed = True
            elif name == b"transfer-encoding":
                if value.rstrip().lower().endswith(b"chunked"):
                    self.framed = True
                return
            elif name == b"connection":
                if self.conn_tokens is None:
                    self.conn_tokens = []
                self.conn_tokens.append(value)
                return
            else:
                return
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:  # 1xx interim response: skip it, the real one follows
            self.info = True
            self.headers = []
            self.conn_tokens = None
            self.framed = False
            return
        self.status = status
        if self.conn_tokens is not None:
            named = _connection_names(self.conn_tokens)
            if named:
                self.headers = [h for h in self.headers if h[0] not in named]
        if status in _NO_BODY_STATUS:
            self.headers = [h for h in self.headers if h[0] != b"content-length"]
        self.head_done = True
        if self.head_only:  # HEAD: llhttp does not know, so the message ends here
            self.keep_alive = self.parser.should_keep_alive()
            self.complete = True
            self.parser_dirty = True

    def on_body(self, body: bytes) -> None:
        if self.head_only:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _READ_HIGH and not self.read_paused and self.body_done:
            # Only while the request body is not being sent: pausing then could
            # deadlock an upstream that writes before it reads.
            self.read_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self.info:
            self.info = False
            return
        if self.complete:
            return
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True

    # -- helpers used by proxy() --------------------------------------------

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = why
        self.keep_alive = False
        self.abort()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)
        self.release_drain()

    def _on_timeout(self) -> None:
        self.deadline = 0.0
        self.timed_out = True
        self._wake()

    def expire_in(self, timeout: float) -> None:
        """Time the current wait out after ``timeout`` s (checked by the pool's sweeper)."""
        self.deadline = self.loop.time() + timeout
        self.pool._watch(self)

    def arm(self, timeout: float) -> None:
        """Start the response timeout (the request has been fully sent)."""
        if not self.deadline and not self.head_done:
            self.expire_in(timeout)

    def disarm(self) -> None:
        if self.deadline:
            self.deadline = 0.0
            self.pool._waiting.discard(self)

    async def wait(self) -> None:
        fut = self.loop.create_future()
        self.waiter = fut
        await fut

    def resume_reading(self) -> None:
        self.read_paused = False
        self.buffered = 0
        if self.alive:
            assert self.transport is not None
            self.transport.resume_reading()

    def abort(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.abort()

    def close(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()

    def start(self, head_only: bool) -> None:
        self.active = True
        if self.parser_dirty:
            self.parser = HttpResponseParser(self)
            self.parser_dirty = False
        self.head_only = head_only

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and self.body_done
            and self.alive
            and self.error is None
            and not self.client_gone
        )


def _connection_names(tokens: list[bytes]) -> frozenset[bytes]:
    names = set()
    for value in tokens:
        for tok in value.split(b","):
            tok = tok.strip().lower()
            if tok not in _IGNORED_CONN_TOKENS:
                names.add(tok)
    return frozenset(names)


# ---------------------------------------------------------------------------
# Pools.


class UpstreamPool:
    """Idle keep-alive connections to one endpoint ``host:port`` (LIFO)."""

    def __init__(self, endpoint: str, *, max_idle: int = 64, connect_timeout: float = 2.0) -> None:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"endpoint must be host:port, got {endpoint!r}")
        # an IPv6 address comes bracketed ("[fd00::7]:8080", as in a URL and the Host
        # header); connect() takes it bare
        bracketed = host.startswith("[") and host.endswith("]")
        if not bracketed and ":" in host:
            raise ValueError(
                f"endpoint must be host:port with an IPv6 address in brackets, got {endpoint!r}"
            )
        self.endpoint = endpoint
        self.host = host[1:-1] if bracketed else host
        self.port = int(port)
        self.host_header = endpoint.encode()
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self._idle: list[_Conn] = []
        self._closed = False
        # Set when a new connection closed without a byte of answer: the replica looks
        # dead, and the gateway takes it out of rotation until the routes list it again.
        self.suspect = False
        # Timeouts: one sweeper per pool checks the deadlines of waiting connections
        # every _TICK s, instead of a call_later()/cancel() pair per request.
        self._waiting: set[_Conn] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def close(self) -> None:
        """Close idle connections; in-flight ones close when their response is done."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _take(self) -> _Conn | None:
        """The most recently used idle connection that is still open, if any."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.alive:
                return conn
        return None

    async def _connect(self) -> _Conn:
        if self._closed:
            raise NotSent(f"pool for {self.endpoint} is closed")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, conn = await loop.create_connection(
                    lambda: _Conn(self, loop), self.host, self.port
                )
        except TimeoutError:
            raise NotSent(f"connect to {self.endpoint} timed out") from None
        except OSError as exc:
            raise NotSent(f"connect to {self.endpoint} failed: {exc}") from None
        if conn.transport is None:  # in case a loop delivers connection_made late
            conn.transport = transport
            conn.alive = not transport.is_closing()
        return conn

    def _release(self, conn: _Conn) -> None:
        conn.disarm()
        conn.active = False
        if conn.reusable and not self._closed and len(self._idle) < self.max_idle:
            if conn.read_paused:
                conn.resume_reading()
            conn.reset()
            self._idle.append(conn)
        else:
            conn.alive = False
            conn.abort()

    def _watch(self, conn: _Conn) -> None:
        self._waiting.add(conn)
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(_TICK, self._sweep, conn.loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        waiting = self._waiting
        if not waiting:
            self._sweeper = None
            return
        now = loop.time()
        for conn in [c for c in waiting if c.deadline <= now]:
            waiting.discard(conn)
            conn._on_timeout()
        self._sweeper = loop.call_later(_TICK, self._sweep, loop)

    def _forget(self, conn: _Conn) -> None:
        try:
            self._idle.remove(conn)
        except ValueError:
            pass


class Pools:
    """Registry endpoint -> UpstreamPool, a pool created on first use."""

    def __init__(self, *, max_idle: int = 64, connect_timeout: float = 2.0) -> None:
        self._pools: dict[str, UpstreamPool] = {}
        self._max_idle = max_idle
        self._connect_timeout = connect_timeout

    def get(self, endpoint: str) -> UpstreamPool:
        pool = self._pools.get(endpoint)
        if pool is None:
            pool = self._pools[endpoint] = UpstreamPool(
                endpoint, max_idle=self._max_idle, connect_timeout=self._connect_timeout
            )
        return pool

    def __contains__(self, endpoint: object) -> bool:
        return endpoint in self._pools

    def __len__(self) -> int:
        return len(self._pools)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._pools))

    async def discard(self, endpoint: str) -> None:
        pool = self._pools.pop(endpoint, None)
        if pool is not None:
            await pool.close()

    async def close(self) -> None:
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            await pool.close()


# ---------------------------------------------------------------------------
# proxy()


def _request_head(
    scope: Scope, pool: UpstreamPool, extra: Iterable[tuple[bytes, bytes]], lines: bytes = b""
) -> tuple[list[bytes], bool, bool]:
    """Encode method, target and end-to-end headers (without framing headers).

    Returns (parts, has_length, has_te): has_length when the client sent a
    Content-Length (and it is kept in parts), has_te when it sent Transfer-Encoding.
    """
    method = scope["method"]
    raw_path = scope.get("raw_path")
    if raw_path is None:
        from urllib.parse import quote

        raw_path = quote(scope["path"]).encode("ascii")
    qs = scope.get("query_string")
    target = raw_path + b"?" + qs if qs else raw_path
    parts = [_METHODS.get(method) or method.encode("ascii"), b" ", target, _HTTP11]
    has_length = has_te = has_host = False
    conn_tokens: list[bytes] | None = None
    for name, value in scope["headers"]:
        name = name.lower()  # ASGI servers lowercase names; framing must not rely on it
        if name in _REQ_SPECIAL:
            if name == b"host":
                has_host = True
            elif name == b"content-length":
                has_length = True
            elif name == b"transfer-encoding":
                has_te = True
                continue
            elif name == b"connection":
                if conn_tokens is None:
                    conn_tokens = []
                conn_tokens.append(value)
                continue
            else:
                continue
        parts.append(name + b": " + value + b"\r\n")
    if conn_tokens is not None:
        named = _connection_names(conn_tokens)
        if named:
            parts = parts[:4] + [p for p in parts[4:] if p.split(b":", 1)[0] not in named]
    if has_te and has_length:  # both: Transfer-Encoding wins (RFC 9112 6.3); drop the length
        parts = parts[:4] + [p for p in parts[4:] if not p.startswith(b"content-length:")]
        has_length = False
    if not has_host:
        parts.append(b"host: " + pool.host_header + b"\r\n")
    for name, value in extra:
        parts.append(name + b": " + value + b"\r\n")
    if lines:
        parts.append(lines)
    return parts, has_length, has_te


async def _send_error(
    send: Send, status: int, error: str, detail: str, add: Iterable[tuple[bytes, bytes]]
) -> int:
    """The gateway's answer for a replica that failed (503) or timed out (504)."""
    return await send_json(send, status, {"error": error, "detail": detail}, 1, headers=add)


async def _pump_body(conn: _Conn, receive: Receive, chunked: bool, timeout: float) -> None:
    """Stream the rest of the request body, then watch for the client leaving."""
    try:
        await _pump_body_inner(conn, receive, chunked, timeout)
    except Exception:  # receive() failed: the rest of the body will never come
        conn.client_gone = True
        conn.abort()


async def _pump_body_inner(conn: _Conn, receive: Receive, chunked: bool, timeout: float) -> None:
    transport = conn.transport
    assert transport is not None
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            conn.client_gone = True
            conn.abort()
            return
        if not conn.alive or conn.complete:
            return
        body = msg.get("body", b"")
        more = msg.get("more_body", False)
        if chunked:
            if body:
                transport.write(b"%x\r\n" % len(body) + body + b"\r\n")
            if not more:
                transport.write(_LAST_CHUNK)
        elif body:
            transport.write(body)
        if not more:
            break
        if conn.write_paused:
            await conn.drain()
            if not conn.alive or conn.complete:
                return
    conn.body_done = True
    conn.arm(timeout)
    await _watch_disconnect(conn, receive)


async def _watch_disconnect(conn: _Conn, receive: Receive) -> None:
    """Abort the upstream connection when the client leaves.

    Once the body is read, receive() blocks until the client disconnects. The one
    http.request message a body-less request still has to give is skipped; a server
    that keeps answering at once would make this spin, so then watching just stops.
    """
    try:
        for _ in range(2):
            if (await receive())["type"] == "http.disconnect":
                break
        else:
            return
    except Exception:  # a receive() that fails is a client we cannot serve either
        pass
    conn.client_gone = True
    conn.abort()


async def proxy(
    pool: UpstreamPool,
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    timeout: float,
    add_request_headers: Iterable[tuple[bytes, bytes]] = (),
    add_request_lines: bytes = b"",
    add_response_headers: Iterable[tuple[bytes, bytes]] = (),
    first_chunk: Message | None = None,
    idle_timeout: float | None = None,
) -> int:
    """Forward one ASGI http request to ``pool``'s endpoint and stream the response.

    ``timeout`` bounds the wait for the response head; ``idle_timeout`` (default:
    ``timeout``) each silence between body chunks after it.

    ``add_request_lines`` is more request headers, already encoded (``name: value``
    lines, each ending in CRLF, as ``Forwarding.lines`` makes them).

    Returns the status sent to the client (499 if the client left before anything was
    sent). Raises ``NotSent`` (nothing sent anywhere: retry elsewhere) and, after the
    response head was sent, ``ConnectionResetError`` when the upstream fails mid-body.

    Three phases: encode the request (``_request_head``, ``_frame``), send it and wait
    for the response head with the retries of the failure contract
    (``_send_until_head``), stream the response (``_stream_response``).
    """
    parts, has_length, has_te = _request_head(scope, pool, add_request_headers, add_request_lines)
    # The first body message decides the framing.
    if first_chunk is None and (has_length or has_te):
        first_chunk = await receive()
    if first_chunk is not None and first_chunk["type"] != "http.request":
        return _CLIENT_GONE
    framed = _frame(parts, has_length, has_te, first_chunk)
    conn = await _send_until_head(
        pool, scope["method"], framed, first_chunk, receive, send, timeout, add_response_headers
    )
    if isinstance(conn, int):
        return conn  # answered (503/504) or 499: no response head came
    return await _stream_response(
        pool,
        conn,
        receive,
        send,
        timeout if idle_timeout is None else idle_timeout,
        add_response_headers,
    )


# (head, body, more, chunked, has_body): the encoded request as _frame leaves it
_Framed = tuple[bytes, bytes, bool, bool, bool]


def _frame(parts: list[bytes], has_length: bool, has_te: bool, first: Message | None) -> _Framed:
    """Phase 1: add the framing to the encoded head ``parts`` and the first body message.

    Returns ``(head, body, more, chunked, has_body)``: ``head`` ends with the blank line
    and carries a body of up to ``_BIG_WRITE`` bytes (one write); ``body`` is what goes
    out in a second write; ``more`` when the rest of the body is still to come from
    ``receive`` (``chunked``: framed as chunks, the client gave no length);
    ``has_body`` when the request has a body at all.
    """
    body = b""
    more = False
    if first is not None:
        body = first.get("body", b"")
        more = first.get("more_body", False)
    has_body = bool(body) or more
    chunked = False
    if not has_length:
        if more:
            parts.append(_CHUNKED)
            chunked = True
            if body:
                body = b"%x\r\n" % len(body) + body + b"\r\n"
        elif body or has_te:
            parts.append(b"content-length: " + str(len(body)).encode() + b"\r\n")
    parts.append(b"\r\n")
    head = b"".join(parts)
    if len(body) <= _BIG_WRITE:
        head, body = head + body, b""
    return head, body, more, chunked, has_body


async def _send_until_head(
    pool: UpstreamPool,
    method: str,
    framed: _Framed,
    first_chunk: Message | None,
    receive: Receive,
    send: Send,
    timeout: float,
    add_response_headers: Iterable[tuple[bytes, bytes]],
) -> _Conn | int:
    """Phase 2: write the request on a pooled (or new) connection and wait for the
    response head, retrying once on a fresh connection when the failure contract allows.

    Returns the connection with its head parsed (``conn.pump``: the task still
    streaming the request body, if any), or the status already answered to the client
    (503, 504) or 499 when the client left. Raises ``NotSent``.
    """
    head, body, more, chunked, has_body = framed
    retried = False
    while True:
        conn = None if retried else pool._take()  # a retry always gets a fresh connection
        reused = conn is not None
        if conn is None:
            try:
                conn = await pool._connect()
            except NotSent as exc:
                exc.first_chunk = first_chunk
                raise
        conn.start(method == "HEAD")
        transport = conn.transport
        assert transport is not None
        transport.write(head)
        if body:
            transport.write(body)
        if transport.is_closing():
            # The write failed at once: not a byte reached the upstream.
            pool._release(conn)
            if retried or not reused:
                raise NotSent(f"connection to {pool.endpoint} reset", first_chunk)
            retried = True
            continue
        pump: asyncio.Task[None] | None = None
        try:
            if more:
                conn.body_done = False
                pump = conn.loop.create_task(_pump_body(conn, receive, chunked, timeout))
            else:
                conn.arm(timeout)
            while not conn.head_done and conn.alive and not conn.timed_out and conn.error is None:
                conn.waiter = fut = conn.loop.create_future()  # (conn.wait(), inlined)
                await fut
        except BaseException:  # cancelled while waiting: nothing of it may linger
            pool._release(conn)
            if pump is not None:
                await cancelled(pump)
            raise
        if conn.head_done:
            conn.pump = pump
            return conn
        # No response head.
        if pump is not None:
            await cancelled(pump)
        client_gone = conn.client_gone
        timed_out = conn.timed_out
        got_bytes = conn.got_bytes
        error = conn.error or "replica closed the connection"
        pool._release(conn)  # not reusable: it is closed
        if client_gone:
            return _CLIENT_GONE
        if timed_out:
            return await _send_error(
                send,
                504,
                "upstream timeout",
                f"the replica did not start a response within {timeout:g} s",
                add_response_headers,
            )
        repeatable = not got_bytes and not more and (not has_body or method in _IDEMPOTENT)
        if reused and not retried and repeatable:
            retried = True
            continue
        if not got_bytes and not reused:
            # A fresh connection closed without a byte of answer: the replica is dead
            # (or a proxy in front of it, such as Docker's, has nothing behind it).
            pool.suspect = True
            if repeatable:
                raise NotSent(
                    f"{pool.endpoint} closed a new connection without answering", first_chunk
                )
        return await _send_error(send, 503, "replica failed", error, add_response_headers)


async def _stream_response(
    pool: UpstreamPool,
    conn: _Conn,
    receive: Receive,
    send: Send,
    idle: float,
    add_response_headers: Iterable[tuple[bytes, bytes]],
) -> int:
    """Phase 3: send the head and stream the body to the client, each silence of the
    upstream bounded by ``idle`` s; the connection goes back to the pool (or is closed)
    and every task this request started has ended when this returns. Returns the
    status; raises ``ConnectionResetError`` when the upstream fails mid-body."""
    watcher, conn.pump = conn.pump, None
    conn.disarm()
    status = conn.status
    headers = conn.headers
    if add_response_headers:
        headers.extend(add_response_headers)
    ok = False
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        while True:
            chunks = conn.chunks
            if conn.complete:
                # Everything is here: free the connection before the last send.
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                conn.chunks = []
                if watcher is not None:
                    watcher.cancel()
                pool._release(conn)
                ok = True
                await send({"type": "http.response.body", "body": data, "more_body": False})
                return status
            if chunks:
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                conn.chunks = []
                if conn.read_paused:
                    conn.resume_reading()
                else:
                    conn.buffered = 0
                await send({"type": "http.response.body", "body": data, "more_body": True})
                if watcher is None:
                    watcher = conn.loop.create_task(_watch_disconnect(conn, receive))
                continue
            if conn.client_gone:
                return status
            if not conn.alive or conn.error is not None:
                raise ConnectionResetError(
                    f"replica failed mid-response: {conn.error or 'connection closed'}"
                )
            conn.timed_out = False
            conn.expire_in(idle)
            try:
                await conn.wait()
            finally:
                conn.disarm()
            if conn.timed_out and not conn.chunks and not conn.complete:
                raise ConnectionResetError(f"replica sent nothing for {idle:g} s mid-response")
    finally:
        if not ok:
            pool._release(conn)
        if watcher is not None:
            await cancelled(watcher)
