"""A lean HTTP/1.1 ASGI server for the gateway (http scope only, no TLS; an upgrade is
handed over whole to the app, see below).

    server = Server(app, "127.0.0.1", 8000)   # port=0: the OS picks; see server.port
    task = asyncio.create_task(server.serve())
    ...                       # server.started becomes True once it listens
    server.should_exit = True
    await task                # in-flight requests finish, connections close

``started`` and ``should_exit`` mean what they mean on ``uvicorn.Server``; signals are
the caller's business; a failed bind raises from ``serve()``. Requests are parsed by
``httptools.HttpRequestParser`` inside one ``asyncio.Protocol`` per connection; each
request runs as one task. Per request there is no logging, no regex, no timer: the
head is built with one ``join`` from pre-encoded status lines.

What it does, and what it leaves out on purpose (the gateway does not need it):

- The response head is buffered and written together with the first body message:
  a small response is one ``write`` (one syscall). If the first body message does not
  come in the same event-loop step (a streamed response), the head goes out alone at
  the end of that step, so a client never waits on a body for the head.
- Framing: the app's ``Content-Length`` is used (and enforced: a body longer or shorter
  than it closes the connection); without one the body is sent chunked, or close-
  delimited to an HTTP/1.0 client. HEAD, 1xx, 204 and 304 responses get no body bytes
  whatever the app sends (and need no framing, so they keep the connection).
- Keep-alive per HTTP/1.1: ``Connection: close`` from the client or the app, HTTP/1.0,
  a request the parser cannot continue after (upgrade), or shutdown end the connection
  after the response.
- Pipelining: requests are answered in order; while one is in progress, reading stops
  once the next request has begun. Requests already parsed while one is in progress
  (a client can send many in one packet) are held up to ``max_pipeline`` (16); the one
  after that is not read: the held ones are answered, the last says
  ``Connection: close``, and the connection closes.
- Request body: ``receive()`` gives ``http.request`` messages as bytes arrive; more than
  64 KiB not yet received by the app pauses reading. ``Expect: 100-continue`` is
  answered on the first ``receive()`` (if the response has not started). Once the body
  is given, ``receive()`` blocks until the client leaves or the response is complete and
  then returns ``http.disconnect``.
- Client gone (reset, or EOF, which is treated as the client leaving): ``receive()``
  returns ``http.disconnect``; ``send()`` returns without doing anything (as uvicorn's).
- Write flow control: ``send()`` waits while the transport's buffer is above its
  high-water mark.
- Deadlines (checked by one sweeper per server, which runs every second, or every
  quarter of the shortest deadline when that is less; nothing per request):
  ``head_timeout`` (10 s) for a request head to arrive whole, counted from its first
  byte (a new connection that sends nothing closes after it too): then 408 and a
  lingering close (FIN, input dropped for at most 2 s, so the 408 is not reset away);
  ``body_timeout`` (30 s) of silence while a request body is still coming and this
  server is reading: then 408 if no byte of the response went out (the app's
  ``receive()`` returns ``http.disconnect``), else close; ``write_timeout`` (30 s)
  with the write buffer above its high-water mark (a client that does not read its
  response): the connection is aborted, which the app sees as the client leaving
  (``send()`` returns, ``receive()`` says ``http.disconnect``), so that whatever it
  holds for the response is let go. Idle keep-alive connections close after
  ``keep_alive`` seconds (75 s).
- Limits: a request head over ``max_head`` bytes (64 KiB: request target plus header
  names and values) gets 431, counted for each request on its own, pipelined or not.
  Past ``max_connections`` (10,000) open connections, a new one is answered 503 with
  ``Retry-After: 1`` once its request head is in, then closed; past that plus 1,024 it
  is closed at once.
- Errors: an unparsable request gets 400, an oversized head 431 (both then close); an
  app exception before any byte of the response was written gives a 500 JSON body,
  after that the connection is closed (the client sees a truncated response); an app
  that returns without a response gives 500. App exceptions are logged
  (``torpor.gateway.server``); nothing is logged per request.
- Closing while the client may still be sending (an answer that did not read the
  whole request body, such as a 413, or a refused head): the server shuts down its
  sending side and reads and drops what comes until EOF, for at most 2 s, before it
  closes, so that the client reads the answer instead of a reset.
- Shutdown (``should_exit = True``): the listener closes at once (new connections are
  refused), idle connections close, a connection with a request in progress closes
  after its response (which says ``Connection: close``). ``serve()`` returns once every
  request has finished and every connection is closed, or after ``graceful_timeout``
  (30 s; ``None``: no limit), when what is left is cancelled and aborted.
- Upgrades: a request with ``Connection: upgrade`` and an ``Upgrade`` header gets
  ``scope["extensions"]["torpor.upgrade"]["accept"]`` (``_Cycle.upgrade``): an app that
  accepts hands the connection to a ``Pipe`` (bytes, end and write flow go to it; no
  deadline of this server applies) and writes the response head itself. Reading stops
  after the upgrade request's head; an app that answers it normally instead ends the
  connection after its response, and what came after the head is never parsed.
- No ``Date``/``Server`` headers, no access log, no proxy headers, no lifespan, no
  ``state`` in the scope. ``scheme`` is always ``http``.
"""

from __future__ import annotations

import asyncio
import collections
import http
import logging
import socket
from typing import Any, Protocol, cast
from urllib.parse import unquote

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
    parse_url,
)

from torpor.gateway.asgi import ASGIApp, Message, Scope
from torpor.gateway.errors import raw_response, send_json
from torpor.gateway.flow import WriteFlow

__all__ = ["Server"]

log = logging.getLogger("torpor.gateway.server")


class Pipe(Protocol):
    """Who takes over an upgraded connection (see ``_Cycle.upgrade``)."""

    def data_received(self, data: bytes) -> None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


# ---------------------------------------------------------------------------
# Constants computed once.


def _status_line(status: int) -> bytes:
    try:
        phrase = http.HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)


_STATUS = {s: _status_line(s) for s in range(100, 600)}
_METHODS = {
    m.encode(): m
    for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")
}
_SPECIAL = frozenset({b"content-length", b"transfer-encoding", b"connection"})
_CRLF = b"\r\n"
_CHUNKED = b"transfer-encoding: chunked\r\n"
_CLOSE = b"connection: close\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_CRLF_LAST = _CRLF + _LAST_CHUNK
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_READ_HIGH = 64 * 1024  # request body bytes buffered before reading pauses
_BIG_WRITE = 64 * 1024  # above this a body is not copied to join it to its head
_LINGER = 2.0  # seconds to read and drop a request body the answer did not need
_REJECT_MARGIN = 1024  # connections past max_connections that still get their 503


_400 = raw_response(400, "bad request")
_408 = raw_response(408, "request timeout")
_431 = raw_response(431, "request header fields too large")
_503 = raw_response(503, "too many connections", b"retry-after: 1\r\n")


# ---------------------------------------------------------------------------
# One request/response.


class _Cycle:
    """The state of one request: its body as it arrives, its response as it is sent."""

    __slots__ = (
        "conn",
        "scope",
        "headers",
        "method",
        "keep_alive",
        "http10",
        # request body
        "chunks",
        "buffered",
        "more_body",
        "given_all",
        "waiter",
        "expect_checked",
        # response
        "started",
        "complete",
        "disconnected",
        "head",
        "chunked",
        "no_body",
        "remaining",
        "task",
        "leftover",
    )

    def __init__(
        self,
        conn: _Conn,
        scope: Scope,
        headers: list[tuple[bytes, bytes]],
        method: str,
        keep_alive: bool,
        http10: bool,
    ) -> None:
        self.conn = conn
        self.scope = scope
        self.headers = headers
        self.method = method
        self.keep_alive = keep_alive
        self.http10 = http10
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.more_body = True
        self.given_all = False
        self.waiter: asyncio.Future[None] | None = None
        self.expect_checked = False
        self.started = False
        self.complete = False
        self.disconnected = False
        self.head: bytes | None = None
        self.chunked = False
        self.no_body = False
        self.remaining = -1  # body bytes the Content-Length still expects; -1 = no length
        self.task: asyncio.Task[None] | None = None
        self.leftover = b""  # an upgrade request: the bytes that followed its head

    def upgrade(self, pipe: Pipe) -> asyncio.Transport:
        """Hand the connection to ``pipe`` (an upgrade the app accepted): from here its
        bytes go to ``pipe.data_received`` (first those read after the request head),
        its end to ``pipe.connection_lost``, write flow to ``pipe.pause_writing`` /
        ``resume_writing``; no deadline of this server applies. The response counts as
        complete; the app writes to and closes the returned transport itself."""
        conn = self.conn
        if self.started or self.complete or self.disconnected or conn.transport.is_closing():
            raise RuntimeError("the connection can no longer be upgraded")
        self.started = self.complete = True
        self.keep_alive = False
        conn.pipe = pipe
        conn.queue.clear()
        conn.stopped = True
        leftover, self.leftover = self.leftover, b""
        if leftover:
            pipe.data_received(leftover)
        if conn.write_paused:
            pipe.pause_writing()
        conn.read_paused = False
        conn.transport.resume_reading()
        return conn.transport

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    # -- running the app ----------------------------------------------------

    async def run(self) -> None:
        conn = self.conn
        server = conn.server
        server.in_flight += 1
        try:
            await server.app(self.scope, self.receive, self.send)
        except Exception as exc:
            if not self.disconnected:
                log.error("exception in ASGI application", exc_info=exc)
                if not self.started or self.head is not None:  # no byte of it sent yet
                    await self._send_500()
                elif not self.complete:
                    conn.close()
        except BaseException:  # cancelled (forced shutdown)
            if not self.complete:
                conn.close()
            raise
        else:
            if not self.complete and not self.disconnected:
                if not self.started:
                    log.error("ASGI application returned without a response")
                    await self._send_500()
                else:
                    conn.close()
        finally:
            server.in_flight -= 1
            self.task = None

    async def _send_500(self) -> None:
        self.head = None
        self.started = False
        self.complete = False
        self.keep_alive = False
        await send_json(self.send, 500, {"error": "internal server error"}, close=True)

    # -- ASGI receive -------------------------------------------------------

    async def receive(self) -> Message:
        if not self.expect_checked:
            self.expect_checked = True
            if self.more_body and not self.chunks and not self.started and not self.http10:
                for name, value in self.headers:
                    if name == b"expect" and value.lower() == b"100-continue":
                        self.conn.write(_CONTINUE)
                        break
        while True:
            if self.disconnected or self.complete:
                return {"type": "http.disconnect"}
            chunks = self.chunks
            if chunks or not (self.more_body or self.given_all):
                if chunks:
                    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    self.chunks = []
                    self.buffered = 0
                else:
                    body = b""
                more = self.more_body
                if not more:
                    self.given_all = True
                elif self.conn.read_paused:
                    self.conn.maybe_resume(self)
                return {"type": "http.request", "body": body, "more_body": more}
            conn = self.conn
            if conn.read_paused:
                conn.maybe_resume(self)
            self.waiter = fut = conn.loop.create_future()
            await fut

    # -- ASGI send ----------------------------------------------------------

    async def send(self, message: Message) -> None:
        conn = self.conn
        if conn.write_paused and not self.disconnected:
            await conn.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected 'http.response.start', got {kind!r}")
            self._start(message)
            # The head waits for the first body message; if that does not come in this
            # event-loop step, the head goes out alone at the end of the step.
            server = conn.server
            if not server.heads:
                conn.loop.call_soon(server.flush_heads)
            server.heads.append(self)
            return
        if self.complete:
            raise RuntimeError(f"{kind!r} sent after the response was complete")
        if kind != "http.response.body":
            raise RuntimeError(f"expected 'http.response.body', got {kind!r}")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.remaining >= 0:  # a Content-Length to keep to
            self.remaining -= len(body)
            if self.remaining < 0:
                raise RuntimeError("response body longer than its Content-Length")
        head = self.head
        transport = conn.transport
        if head is not None:
            self.head = None
        if self.no_body:
            if head is not None:
                transport.write(head)
        elif self.chunked:
            n = len(body)
            if n > _BIG_WRITE:  # no copy of the body: one writev (uvloop)
                pieces = [b"%x\r\n" % n, body, _CRLF if more else _CRLF_LAST]
                transport.writelines([head, *pieces] if head is not None else pieces)
            else:
                data = b"%x\r\n%b\r\n" % (n, body) if n else b""
                if not more:
                    data += _LAST_CHUNK
                if head is not None:
                    data = head + data
                if data:
                    transport.write(data)
        else:
            if head is not None:
                if len(body) > _BIG_WRITE:
                    transport.writelines([head, body])
                else:
                    transport.write(head + body)
            elif body:
                transport.write(body)
        if not more:
            if self.remaining > 0:
                raise RuntimeError("response body shorter than its Content-Length")
            self.complete = True
            self.wake()
            conn.response_done(self)

    def _start(self, message: Message) -> None:
        status: int = message["status"]
        line = _STATUS.get(status)
        if line is None:
            if not 100 <= status <= 999:
                raise RuntimeError(f"invalid status {status!r}")
            line = b"HTTP/1.1 %d \r\n" % status
        out = [line]
        keep_alive = self.keep_alive and not self.conn.closing
        close_sent = False
        length = -1
        chunked = False
        for name, value in message.get("headers", ()):
            lname = name.lower()
            if lname in _SPECIAL:
                if lname == b"content-length":
                    length = int(value)
                    if length < 0:
                        raise RuntimeError("negative Content-Length")
                elif lname == b"transfer-encoding":
                    if not value.lower().endswith(b"chunked"):
                        continue  # the server frames the body itself
                    chunked = True
                elif b"close" in value.lower():
                    keep_alive = False
                    close_sent = True
                else:
                    continue  # Connection is the server's business unless it says close
            out += (name, b": ", value, _CRLF)
        lines = 1 + (len(out) - 1) // 4  # status line + header lines
        no_body = self.method == "HEAD" or status < 200 or status == 204 or status == 304
        if no_body:
            pass
        elif chunked:
            if length >= 0:  # both: Transfer-Encoding wins; drop the length
                out = _without(out, b"content-length")
                lines -= 1
                length = -1
        elif length < 0:
            if self.http10:
                keep_alive = False  # close-delimited
            else:
                chunked = True
                out.append(_CHUNKED)
                lines += 1
        if not keep_alive and not close_sent:
            out.append(_CLOSE)
            lines += 1
        out.append(_CRLF)
        lines += 1
        head = b"".join(out)
        # Each line ends with one CRLF: any other CR or LF byte came in a header name
        # or value (response splitting).
        if head.count(b"\n") != lines or head.count(b"\r") != lines:
            raise RuntimeError("invalid character in a response header")
        self.head = head
        self.started = True
        self.keep_alive = keep_alive
        self.chunked = chunked
        self.no_body = no_body
        self.remaining = -1 if no_body else length


def _without(out: list[bytes], name: bytes) -> list[bytes]:
    """``out`` (status line, then 4 items per header) without the headers called ``name``."""
    kept = out[:1]
    for i in range(1, len(out), 4):
        if out[i].lower() != name:
            kept += out[i : i + 4]
    return kept


# ---------------------------------------------------------------------------
# One connection.


class _HeadTooLarge(Exception):
    pass


class _TooManyPipelined(Exception):
    pass


class _Rejected(Exception):  # over max_connections
    pass


class _Conn(WriteFlow, asyncio.Protocol):
    __slots__ = (
        "server",
        "loop",
        "transport",
        "parser",
        "client",
        "local",
        "url",
        "headers",
        "conn_header",
        "max_head",
        "head_pending",
        "head_bytes",
        "head_size",
        "head_since",
        "in_body",
        "body_since",
        "paused_at",
        "parsing",
        "active",
        "queue",
        "read_paused",
        "closing",
        "pending_error",
        "idle_since",
        "idle_limit",
        "linger_until",
        "rejected",
        "stopped",
        "pipe",
    )

    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.loop = loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = HttpRequestParser(self)
        try:
            # A request after one with "Connection: close" is ignored, not an error:
            # the response to the first is still owed.
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        except AttributeError:  # pragma: no cover - httptools < 0.6.3
            pass
        self.client: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.conn_header = False  # the request being parsed has a Connection header
        self.max_head = server.max_head
        self.head_pending = True  # between requests or inside a request head
        self.head_bytes = 0  # bytes read since the head began (a lower bound of its size)
        self.head_size = 0  # the head's size so far, counted field by field by the parser
        self.head_since = 0.0  # server.now when the head being parsed began; 0 = none
        self.in_body = False  # a request body is still coming
        self.body_since = 0.0  # server.now of the last request body bytes (or resume)
        self.paused_at = 0.0  # server.now when writing last paused
        self.parsing: _Cycle | None = None  # the request the parser is feeding
        self.active: _Cycle | None = None  # the request whose response is being made
        self.queue: collections.deque[_Cycle] = collections.deque()  # pipelined
        self.read_paused = False
        WriteFlow.__init__(self)
        self.closing = False  # close after the current response
        self.pending_error: bytes | None = None  # to write after the current response
        self.idle_since = server.now
        self.idle_limit = min(server.keep_alive, server.head_timeout)  # a new connection
        self.linger_until = 0.0  # half-closed, dropping input until then; 0 = not
        self.rejected = False  # over max_connections: its request gets 503
        self.stopped = False  # nothing more is read or started on this connection
        self.pipe: Pipe | None = None  # an upgraded connection's new owner (_Cycle.upgrade)

    # -- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        server = self.server
        conns = server.conns
        n = len(conns)
        conns.add(self)
        if n >= server.max_connections:
            if n >= server.max_connections + _REJECT_MARGIN:
                self.stopped = True
                self.transport.abort()
                return
            self.rejected = True
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = (str(peer[0]), int(peer[1]))
        local = transport.get_extra_info("sockname")
        if isinstance(local, tuple) and len(local) >= 2:
            self.local = (str(local[0]), int(local[1]))
        # (asyncio and uvloop both set TCP_NODELAY on accepted TCP sockets.)
        if server.stopping:  # accepted just before the listener closed
            self.close()

    def data_received(self, data: bytes) -> None:
        if self.stopped:
            if self.pipe is not None:
                self.pipe.data_received(data)
            return
        if self.head_pending:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            # The upgrade request has been dispatched; what follows its head is not
            # HTTP/1.1 this server can parse: kept for the app, should it upgrade
            # (_Cycle.upgrade), else dropped with the connection after the response.
            self.stop_reading()
            if self.parsing is not None:
                self.parsing.keep_alive = False
                if exc.args and isinstance(exc.args[0], int):
                    self.parsing.leftover = data[exc.args[0] :]
            return
        except HttpParserCallbackError as exc:
            why = exc.__context__
            if isinstance(why, _HeadTooLarge):
                self.fail(_431)
            elif isinstance(why, _TooManyPipelined):
                self.stop_reading(keep_queue=True)  # answer those held, then close
            elif isinstance(why, _Rejected):
                self.fail(_503)
            else:  # a bug here, not a bad request
                log.error("request parser callback failed", exc_info=why or exc)
                self.fail(_400)
            return
        except HttpParserError:
            self.fail(_400)
            return
        if self.head_pending and self.head_bytes > self.max_head:
            self.fail(_431)

    def eof_received(self) -> bool | None:
        self._gone()
        return None  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.conns.discard(self)
        if self.pipe is not None:
            pipe, self.pipe = self.pipe, None
            pipe.connection_lost(exc)
        self._gone()
        self.release_drain()
        # break the reference cycles (parser -> self, cycle -> self) for refcounting
        self.parser = None  # type: ignore[assignment]
        self.parsing = self.active = None

    def pause_writing(self) -> None:
        WriteFlow.pause_writing(self)
        self.paused_at = self.server.now
        if self.pipe is not None:
            self.pipe.pause_writing()

    def resume_writing(self) -> None:
        WriteFlow.resume_writing(self)
        if self.pipe is not None:
            self.pipe.resume_writing()

    # -- httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.conn_header = False
        self.head_size = 0
        self.head_since = self.server.now

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        if self.head_size > self.max_head:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        # Counted here, per request: bytes per read cannot tell where a pipelined
        # request's head begins.
        size = self.head_size = self.head_size + len(name) + len(value) + 4
        if size > self.max_head:
            raise _HeadTooLarge
        name = name.lower()
        if name == b"connection":
            self.conn_header = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head_pending = False
        self.head_bytes = 0
        self.head_since = 0.0
        self.in_body = True  # until on_message_complete (at once for a request without one)
        self.body_since = self.server.now
        if self.rejected:
            raise _Rejected
        if self.active is not None and len(self.queue) >= self.server.max_pipeline:
            # Parsed ahead of its turn beyond the bound: not taken. The last held request
            # is the connection's last.
            (self.queue[-1] if self.queue else self.active).keep_alive = False
            raise _TooManyPipelined
        url = self.url
        headers = self.headers
        parser = self.parser
        if self.conn_header and parser.should_upgrade():
            upgrade = True
        else:
            upgrade = False
        if url[0] == 47 and 35 not in url:  # origin form ("/..."), no "#"
            if 63 in url:  # "?"
                raw_path, _, query = url.partition(b"?")
            else:
                raw_path, query = url, b""
        else:  # absolute form, "*", or a fragment
            parsed = parse_url(url)
            raw_path = parsed.path or b"/"
            query = parsed.query or b""
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        m = parser.get_method()
        method = _METHODS.get(m) or m.decode("ascii")
        keep_alive = parser.should_keep_alive()
        # get_http_version() is slow (a str.format); keep-alive without a Connection
        # header is HTTP/1.1 (HTTP/1.0 needs "Connection: keep-alive" for it).
        version = "1.1" if keep_alive and not self.conn_header else parser.get_http_version()
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": version,
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": headers,
            "client": self.client,
            "server": self.local,
        }
        http10 = version == "1.0"
        cycle = _Cycle(self, scope, headers, method, keep_alive and not http10, http10)
        if upgrade:
            scope["extensions"] = {"torpor.upgrade": {"accept": cycle.upgrade}}
        self.parsing = cycle
        if self.active is None:
            self.active = cycle
            cycle.task = self.loop.create_task(cycle.run())
        else:
            self.queue.append(cycle)
            if not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()

    def on_body(self, body: bytes) -> None:
        self.body_since = self.server.now
        cycle = self.parsing
        if cycle is None or cycle.complete or cycle.disconnected:
            return  # a response was sent without reading the body: drop it
        cycle.chunks.append(body)
        cycle.buffered += len(body)
        if cycle.buffered > _READ_HIGH and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        self.head_pending = True
        self.head_bytes = 0
        self.in_body = False
        cycle = self.parsing
        if cycle is not None:
            cycle.more_body = False
            cycle.wake()

    # -- used by _Cycle -------------------------------------------------------

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing() and not self.linger_until:
            self.transport.write(data)

    def maybe_resume(self, cycle: _Cycle) -> None:
        """Resume reading for ``cycle``'s body, unless a pipelined request is waiting."""
        if (
            self.active is cycle
            and self.parsing is cycle
            and not self.queue
            and not self.stopped
            and cycle.buffered <= _READ_HIGH
        ):
            self.read_paused = False
            self.body_since = self.server.now  # the body deadline runs while reading
            self.transport.resume_reading()

    def response_done(self, cycle: _Cycle) -> None:
        if not cycle.keep_alive or self.closing:
            self.close()
            return
        if self.pending_error is not None:
            self.transport.write(self.pending_error)
            self.close()
            return
        self.active = None
        now = self.server.now
        self.idle_since = now
        self.idle_limit = self.server.keep_alive
        if self.head_since:  # the next head began while this request ran: its time starts now
            self.head_since = now
        queue = self.queue
        if queue:
            nxt = self.active = queue.popleft()
            nxt.task = self.loop.create_task(nxt.run())
            if queue:
                return  # the next request after it has begun: keep reading paused
        if self.read_paused and not self.stopped:
            self.read_paused = False
            self.body_since = now
            self.transport.resume_reading()

    # -- deadlines (the server's sweeper) ---------------------------------------

    def tick(self, now: float) -> None:
        """Enforce the deadlines that apply to this connection now."""
        server = self.server
        if self.pipe is not None:
            return  # upgraded: the pipe keeps its own time
        if self.linger_until:
            if now >= self.linger_until:
                self.transport.abort()
        elif self.write_paused:
            if now - self.paused_at >= server.write_timeout:
                self.transport.abort()  # the client does not read: let the response go
        elif self.in_body:
            if not self.read_paused and now - self.body_since >= server.body_timeout:
                self._body_timed_out()
        elif self.active is None:
            if self.head_since:
                if now - self.head_since >= server.head_timeout:
                    # The client may still be dribbling its head: close() lingers (FIN
                    # after the 408, input dropped, at most _LINGER s), else the bytes
                    # left unread would turn the close into a reset that can destroy
                    # the 408 before the client reads it.
                    self.stop_reading()
                    self.write(_408)
                    self.close()
            elif now - self.idle_since >= self.idle_limit:
                self.close()

    def _body_timed_out(self) -> None:
        self.stop_reading()
        self.in_body = False  # no linger: the client is not sending
        cycle = self.parsing
        if cycle is not None and cycle is self.active and not cycle.complete:
            answer = not cycle.started or cycle.head is not None  # no byte of it sent yet
            cycle.head = None
            cycle.disconnected = True  # the app's receive() says http.disconnect from here
            cycle.wake()
            if answer:
                self.write(_408)
        self.close()

    # -- closing --------------------------------------------------------------

    def fail(self, response: bytes) -> None:
        """A request this server cannot read: answer ``response`` and close."""
        self.stop_reading()
        if self.active is None:
            self.write(response)
            self.close()
        else:  # after the response in progress (a pipelined request was bad)
            self.pending_error = response

    def stop_reading(self, keep_queue: bool = False) -> None:
        self.stopped = True
        if not keep_queue:
            self.queue.clear()
        if not self.read_paused:
            self.read_paused = True
            if not self.transport.is_closing():
                self.transport.pause_reading()

    def close(self) -> None:
        self.stopped = True
        self.queue.clear()
        transport = self.transport
        if transport.is_closing() or self.linger_until:
            return
        active = self.active
        if (
            (self.in_body or self.head_since)
            and (active is None or active.complete)
            and not self.server.stopping
            and transport.can_write_eof()
        ):
            # The client may still be sending (a body this answer did not read, a head
            # it refused): closing now would reset the connection, and the client might
            # lose the answer. Send FIN after it; read and drop what comes until EOF, for
            # at most _LINGER s.
            self.linger_until = self.server.loop_time() + _LINGER
            transport.write_eof()
            if self.read_paused:
                self.read_paused = False
                transport.resume_reading()
            return
        transport.close()

    def shutdown(self) -> None:
        """Server stopping: close now if idle, else after the current response."""
        self.closing = True
        if self.pipe is not None:
            return  # upgraded: it ends when its app does (or at the graceful timeout)
        if self.active is None:
            self.close()
        else:
            self.stop_reading()

    def _gone(self) -> None:
        self.stopped = True
        self.queue.clear()
        cycle = self.active
        if cycle is not None and not cycle.complete:
            cycle.disconnected = True
            cycle.wake()
            task = cycle.task
            if task is not None and not task.done():
                self.server.orphans.add(task)
                task.add_done_callback(self.server.orphans.discard)


# ---------------------------------------------------------------------------
# The server.


class Server:
    """Serve ``app`` on ``host:port`` until ``should_exit`` is set (see the module doc)."""

    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        *,
        backlog: int = 2048,
        keep_alive: float = 75.0,
        max_head: int = 65536,
        head_timeout: float = 10.0,
        body_timeout: float = 30.0,
        write_timeout: float = 30.0,
        max_pipeline: int = 16,
        max_connections: int = 10_000,
        graceful_timeout: float | None = 30.0,
    ) -> None:
        for name, value in (
            ("keep_alive", keep_alive),
            ("head_timeout", head_timeout),
            ("body_timeout", body_timeout),
            ("write_timeout", write_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        if max_pipeline < 0 or max_connections < 1 or max_head < 1:
            raise ValueError("max_pipeline must be >= 0, max_connections and max_head >= 1")
        self.app = app
        self.host = host
        self._port = port
        self.backlog = backlog
        self.keep_alive = keep_alive
        self.max_head = max_head
        self.head_timeout = head_timeout
        self.body_timeout = body_timeout
        self.write_timeout = write_timeout
        self.max_pipeline = max_pipeline
        self.max_connections = max_connections
        self.graceful_timeout = graceful_timeout
        self.started = False
        self.sockets: list[socket.socket] = []
        self.conns: set[_Conn] = set()
        self.orphans: set[asyncio.Task[None]] = set()  # requests whose client left
        self.in_flight = 0
        self.heads: list[_Cycle] = []  # responses whose head waits for a body message
        self.now = 0.0  # loop.time(), updated by the sweeper (its resolution)
        self.stopping = False
        self._should_exit = False
        self._exit: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        exit_, loop = self._exit, self._loop
        if value and exit_ is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(exit_.set)

    @property
    def port(self) -> int:
        """The bound port (the one the OS chose for ``port=0`` once started)."""
        if self.sockets:
            return int(self.sockets[0].getsockname()[1])
        return self._port

    def loop_time(self) -> float:
        loop = self._loop
        return loop.time() if loop is not None else self.now

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.stopping = False
        self._exit = asyncio.Event()
        if self._should_exit:
            self._exit.set()
        self.now = loop.time()
        server = await loop.create_server(
            lambda: _Conn(self, loop),
            self.host,
            self._port,
            backlog=self.backlog,
            reuse_address=True,
        )
        self.sockets = list(server.sockets)
        self.started = True
        shortest = min(self.keep_alive, self.head_timeout, self.body_timeout, self.write_timeout)
        interval = max(min(1.0, shortest / 4), 0.01)
        self._sweeper = loop.call_later(interval, self._sweep, loop, interval)
        try:
            await self._exit.wait()
            self.stopping = True
            server.close()  # new connections are refused from here on
            for conn in list(self.conns):
                conn.shutdown()
            if self.graceful_timeout is None:
                await self._drained()
            else:
                try:
                    await asyncio.wait_for(self._drained(), self.graceful_timeout)
                except TimeoutError:
                    log.warning(
                        "server: %d requests still in flight after %gs; cancelling them",
                        self.in_flight,
                        self.graceful_timeout,
                    )
        finally:
            server.close()
            self._exit = None
            if self._sweeper is not None:
                self._sweeper.cancel()
                self._sweeper = None
            tasks = list(self.orphans)
            for conn in list(self.conns):
                cycle = conn.active
                if cycle is not None and cycle.task is not None:
                    tasks.append(cycle.task)
                conn.transport.abort()
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    def flush_heads(self) -> None:
        """Write the response heads still waiting for a first body message."""
        heads, self.heads = self.heads, []
        for cycle in heads:
            head = cycle.head
            if head is not None and not cycle.disconnected:
                cycle.head = None
                cycle.conn.write(head)

    async def _drained(self) -> None:
        while self.in_flight or self.conns:
            await asyncio.sleep(0.02)

    def _sweep(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        """Enforce every connection's deadlines; tick the coarse clock."""
        now = self.now = loop.time()
        for conn in list(self.conns):
            conn.tick(now)
        self._sweeper = loop.call_later(interval, self._sweep, loop, interval)
