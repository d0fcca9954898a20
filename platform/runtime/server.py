"""Torpor function runtime: the HTTP server that runs inside every replica.

Standalone on purpose: standard library only, nothing of Torpor. It is copied into
every image (whose only software is Debian's python3). In a replica it has one import
name, ``torpor_runtime`` (the name handlers import it by): every start loads this file
under that name (``fetch.launch_code`` / ``fetch.load_runtime``: the image CMD, the
process driver's plain spawn and its zygote, the fetcher). On the host it is
``torpor.runtime.server``, aliased ``torpor_runtime`` once it prepares a function. Its import time is
paid on every cold start, so it imports asyncio and what asyncio already loads; json,
the thread pool and the like are imported on first use.

Environment
  PORT                  port to listen on (required; 0 = any free port, printed at start)
  TORPOR_HOST           bind address (default 127.0.0.1; container images set 0.0.0.0)
  TORPOR_HANDLER        ``module:function`` (default ``handler:handle``)
  TORPOR_DIR            the function's folder (default: cwd). Put first on sys.path and made
                        the working directory; ``TORPOR_DIR/.deps`` (vendored requirements) is
                        put second on sys.path when it exists
  TORPOR_MAX_BODY       largest request body, bytes or 32Mi-style (default 32Mi), else 413
  TORPOR_DRAIN_TIMEOUT  seconds in-flight requests get after SIGTERM (default 30)
  TORPOR_IDLE_TIMEOUT   seconds a connection may stay silent before it is closed (default 120)
  TORPOR_THREADS        worker threads for sync handlers (default 64)
  TORPOR_BODY_BUFFER    request bodies up to this are read before the handler runs (default 8Mi);
                        a larger (or chunked and longer) one is read as the handler asks
  TORPOR_WEBSOCKET      ``module:function`` serving WebSocket upgrades (none by default: an
                        upgrade request then goes to the HTTP handler like any other)
  TORPOR_HANDLER_STYLE  ``torpor`` (default: ``handle(request)``) or ``openfaas``
                        (``handle(event, context)`` as OpenFaaS python3-http runs it; the
                        adapter is ``openfaas.py`` beside this file)

Exit codes
  0 drained cleanly after SIGTERM/SIGINT   1 unexpected error   2 bad configuration
  3 the handler failed to import           4 cannot listen      5 drain timed out (cut off)

HTTP
  The handler module is imported before the socket listens: answering HTTP means ready.
  ``GET /_torpor/health`` answers 200 ``ok`` (503 ``draining`` once SIGTERM arrived) and
  never reaches the handler; nothing under ``/_torpor/`` does.

Handler contract
  ``def handle(request)`` runs in a thread pool, ``async def handle(request)`` on the loop.
  ``request`` has method, path, raw_path, query_string, query (dict, last value wins),
  query_list, headers (case-insensitive), body (bytes), client, json() and text().
  Return bytes, str, dict/list (JSON), None (204) or any object with ``status``,
  ``headers`` and ``body`` such as ``Response`` (``from torpor_runtime import Response``).
  An exception becomes a 500 ``{"error": "handler raised", "detail": "Type: message"}``
  with the traceback on stderr; the replica keeps serving.

Streams
  A handler may return an iterator/generator or an async iterable of bytes/str, or a
  ``Response`` whose body is one: it is sent chunked (close-delimited to HTTP/1.0), each
  piece written as it is produced; the head waits for the first piece (its type sets the
  default Content-Type). An exception before the first piece is a 500; after it, the
  chunked body gets its last chunk, the connection closes, and the error is logged.
  ``sse(events)`` wraps events into ``text/event-stream``. ``request.stream()`` gives the
  body in pieces (``for`` in a sync handler, ``async for`` in an async one);
  ``await request.read()`` gives it whole. A body the handler left unread closes the
  connection after the response (``Connection: close``).

WebSockets (RFC 6455)
  With ``TORPOR_WEBSOCKET``, a ``GET`` with ``Upgrade: websocket`` is answered 101 and
  the handler gets a ``WebSocket`` (async) or ``SyncWebSocket`` (sync; in its own thread):
  ``receive()`` -> str | bytes (raises ``WebSocketClosed``), ``send(str | bytes)``,
  ``close(code, reason)``, iteration until close, ``request``. Pings are answered,
  fragments joined, client frames must be masked (else 1002), text must be UTF-8 (else
  1007), messages are at most ``TORPOR_MAX_BODY`` (else 1009); a raising handler closes
  with 1011. On SIGTERM open sockets keep 80% of the drain timeout, then get 1001.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

# Everything below is already loaded by `import asyncio` (measured with -X importtime).
import asyncio  # noqa: E402
import inspect  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Iterator, Mapping  # noqa: E402
from typing import Any  # noqa: E402

__all__ = [
    "Headers",
    "Request",
    "RequestBodyError",
    "Response",
    "SyncWebSocket",
    "WebSocket",
    "WebSocketClosed",
    "load_config",
    "load_handler",
    "main",
    "run",
    "sse",
]

PATH = os.path.abspath(__file__)
HEALTH_PATH = "/_torpor/health"
RESERVED_PREFIX = "/_torpor/"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_IMPORT = 3
EXIT_LISTEN = 4
EXIT_DRAIN_TIMEOUT = 5

MAX_HEAD = 64 * 1024  # request line + header section
MAX_LINE = 8 * 1024  # one chunk-size or trailer line
DEFAULT_MAX_BODY = 32 * 1024 * 1024
DEFAULT_BODY_BUFFER = 8 * 1024 * 1024  # larger (or chunked past it) bodies are streamed
_READ_HIGH = 256 * 1024  # pause reading when this much is buffered and nobody asked for it
_LINGER = 2.0  # seconds to swallow an unread body before closing after an error

_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
_OCTET = "application/octet-stream"
_DROPPED = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"})
_REASONS = {
    100: "Continue",
    200: "OK",
    201: "Created",
    202: "Accepted",
    203: "Non-Authoritative Information",
    204: "No Content",
    206: "Partial Content",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    307: "Temporary Redirect",
    308: "Permanent Redirect",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    408: "Request Timeout",
    409: "Conflict",
    410: "Gone",
    411: "Length Required",
    412: "Precondition Failed",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    417: "Expectation Failed",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # CTLs but HTAB
_BAD_TARGET = re.compile(r"[\x00-\x20\x7f]")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,15}")
_HEX = frozenset(b"0123456789abcdefABCDEF")


# --------------------------------------------------------------------------- API types


class Headers(Mapping[str, str]):
    """Read-only, case-insensitive headers. Iterates lowercase names; a repeated header
    reads as its values joined with ", " (cookies with "; "); ``getlist`` gives each."""

    __slots__ = ("_items", "_map")

    def __init__(self, items: list[tuple[str, str]] | None = None) -> None:
        self._items = items if items is not None else []
        m: dict[str, str] = {}
        for name, value in self._items:
            key = name.lower()
            if key in m:
                m[key] = m[key] + ("; " if key == "cookie" else ", ") + value
            else:
                m[key] = value
        self._map = m

    def __getitem__(self, key: str) -> str:
        return self._map[key.lower()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._map

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        return self._map.get(key.lower(), default)

    def getlist(self, key: str) -> list[str]:
        key = key.lower()
        return [v for n, v in self._items if n.lower() == key]

    def raw(self) -> list[tuple[str, str]]:
        """(name, value) pairs as received, in order, original case."""
        return list(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


def _unquote(s: str, plus: bool = False) -> str:
    """Percent-decode like urllib.parse.unquote(errors="replace") without importing it
    (urllib.parse costs ~8 ms of cold start). ``s`` holds the wire bytes as latin-1."""
    if plus and "+" in s:
        s = s.replace("+", " ")
    if "%" not in s:
        return s if s.isascii() else s.encode("latin-1").decode("utf-8", "replace")
    parts = s.encode("latin-1").split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) >= 2 and part[0] in _HEX and part[1] in _HEX:
            out.append(bytes((int(part[:2], 16),)))
            out.append(part[2:])
        else:
            out.append(b"%")
            out.append(part)
    return b"".join(out).decode("utf-8", "replace")


def parse_query(qs: str) -> list[tuple[str, str]]:
    """``a=1&b=&c`` -> [("a", "1"), ("b", ""), ("c", "")], '+' is a space, %XX decoded."""
    pairs = []
    for field in qs.split("&"):
        if not field:
            continue
        name, _, value = field.partition("=")
        pairs.append((_unquote(name, True), _unquote(value, True)))
    return pairs


class Request:
    """One HTTP request as the handler sees it."""

    __slots__ = (
        "method",
        "raw_path",
        "query_string",
        "headers",
        "_body",
        "http_version",
        "client",
        "_path",
        "_query_list",
        "_reader",
    )

    def __init__(
        self,
        method: str,
        raw_path: str,
        query_string: str = "",
        headers: Headers | None = None,
        body: bytes = b"",
        http_version: str = "1.1",
        client: tuple[str, int] | None = None,
    ) -> None:
        self.method = method
        self.raw_path = raw_path  # as sent, still percent-encoded
        self.query_string = query_string
        self.headers = headers if headers is not None else Headers()
        self._body = body
        self._reader: _BodyReader | None = None  # set when the body is streamed (see stream())
        self.http_version = http_version
        self.client = client
        self._path: str | None = None
        self._query_list: list[tuple[str, str]] | None = None

    @property
    def path(self) -> str:
        """The percent-decoded path (``raw_path`` keeps the original)."""
        if self._path is None:
            self._path = _unquote(self.raw_path)
        return self._path

    @property
    def query_list(self) -> list[tuple[str, str]]:
        """Every (name, value) of the query string, in order."""
        if self._query_list is None:
            self._query_list = parse_query(self.query_string)
        return self._query_list

    @property
    def query(self) -> dict[str, str]:
        """Query parameters; the last value of a repeated name wins."""
        return dict(self.query_list)

    @property
    def body(self) -> bytes:
        """The whole body. A body too large to be read before the handler ran (over
        ``TORPOR_BODY_BUFFER``) is read now, when a sync handler asks; an async handler
        uses ``await request.read()`` or ``request.stream()`` for it."""
        reader = self._reader
        if reader is not None:
            self._body = reader.read_all_blocking()
            self._reader = None
        return self._body

    @body.setter
    def body(self, value: bytes) -> None:
        self._body, self._reader = value, None

    async def read(self) -> bytes:
        """The whole body (an async handler's way to get a streamed body whole)."""
        reader = self._reader
        if reader is not None:
            self._body = await reader.read_all()
            self._reader = None
        return self._body

    def stream(self) -> _BodyStream:
        """The body in pieces as they arrive, for ``for`` (sync handlers) or ``async for``
        (async handlers); within ``TORPOR_MAX_BODY``. Once streamed, ``body`` is gone."""
        reader = self._reader
        if reader is None:
            reader = _BodyReader.complete(self._body)
        self._reader = None
        self._body = b""
        return _BodyStream(reader)

    def json(self) -> Any:
        """The body parsed as JSON (raises ValueError when it is not JSON)."""
        import json

        return json.loads(self.body)

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.raw_path}>"


class Response:
    """What a handler may return for control over status and headers. ``body`` may be
    bytes, str, a dict/list (sent as JSON) or None; its content type is set unless
    ``headers`` name one."""

    __slots__ = ("body", "status", "headers")

    def __init__(
        self,
        body: Any = b"",
        status: int = 200,
        headers: Mapping[str, str] | list[tuple[str, str]] | None = None,
    ) -> None:
        self.body = body
        self.status = status
        self.headers = headers

    def __repr__(self) -> str:
        return f"<Response {self.status}>"


# --------------------------------------------------------------------------- rendering

Rendered = tuple[int, list[tuple[str, str]], Any]  # body: bytes, or a stream (_is_stream)


class _BadResult(Exception):
    pass


class _HttpError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _PeerGone(Exception):
    pass


def _dumps(obj: Any) -> bytes:
    import json

    return json.dumps(obj).encode("utf-8")


def _error(status: int, error: str, detail: str) -> Rendered:
    return status, [("Content-Type", _JSON)], _dumps({"error": error, "detail": detail})


def _encode_body(body: Any) -> tuple[Any, str | None]:
    if isinstance(body, bytes):
        return body, _OCTET
    if _is_stream(body):
        return body, None  # its type is told by its first piece (_send_stream)
    if isinstance(body, str):
        return body.encode("utf-8"), _TEXT
    if body is None:
        return b"", None
    if isinstance(body, (dict, list)):
        return _dumps(body), _JSON
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body), _OCTET
    raise _BadResult(f"body of type {type(body).__name__}; expected bytes, str, dict, list or None")


def _render(result: Any) -> Rendered:
    """Turn a handler's return value into (status, headers, body). Raises _BadResult."""
    try:
        if result is None:
            return 204, [], b""
        if isinstance(result, (bytes, str, dict, list, bytearray, memoryview)):
            body, ctype = _encode_body(result)
            return 200, [("Content-Type", ctype or _OCTET)], body
        if _is_stream(result):
            return 200, [], result
        try:
            status, raw_headers, raw_body = result.status, result.headers, result.body
        except AttributeError:
            raise _BadResult(
                f"handler returned {type(result).__name__}; expected bytes, str, dict, list, "
                "None or a response object with status, headers and body"
            ) from None
        if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
            raise _BadResult(f"status {status!r} is not an int from 200 to 599")
        body, ctype = _encode_body(raw_body)
        headers: list[tuple[str, str]] = []
        has_type = False
        if raw_headers:
            items = raw_headers.items() if hasattr(raw_headers, "items") else raw_headers
            for name, value in items:
                name, value = str(name), str(value)
                if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
                    raise _BadResult(f"invalid response header {name!r}")
                value.encode("latin-1")  # UnicodeEncodeError -> _BadResult below
                low = name.lower()
                if low in _DROPPED:
                    continue  # framing is the runtime's business
                has_type = has_type or low == "content-type"
                headers.append((name, value))
        if status == 204 or status == 304:
            if _is_stream(body):
                _close_quietly(body)
            return status, headers, b""
        if ctype is not None and not has_type:
            headers.append(("Content-Type", ctype))
        return status, headers, body
    except _BadResult:
        raise
    except Exception as exc:  # unserializable JSON, bad header pairs, a raising property...
        raise _BadResult(f"{type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------- HTTP/1.1


def _parse_head(head: bytes) -> tuple[str, str, str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise _HttpError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise _HttpError(400, "malformed method")
    if version != "HTTP/1.1" and version != "HTTP/1.0":
        if re.fullmatch(r"HTTP/\d(\.\d)?", version):
            raise _HttpError(505, f"{version} is not supported")
        raise _HttpError(400, "malformed HTTP version")
    if not target or _BAD_TARGET.search(target):
        raise _HttpError(400, "malformed request target")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            raise _HttpError(400, "malformed header line")
        value = value.strip(" \t")
        if _BAD_VALUE.search(value):
            raise _HttpError(400, f"invalid character in header {name}")
        headers.append((name, value))
    return method, target, version, headers


def _split_target(target: str, method: str) -> tuple[str, str]:
    """Request target -> (raw path, query string)."""
    if target[0] != "/":
        if target == "*" and method == "OPTIONS":
            return "*", ""
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            raise _HttpError(400, "malformed request target")
        cut = len(rest)
        for ch in "/?":
            i = rest.find(ch)
            if 0 <= i < cut:
                cut = i
        target = "/" + rest[cut:].lstrip("/") if cut < len(rest) else "/"
    path, _, qs = target.partition("?")
    return path, qs.partition("#")[0]


def _framing(headers: Headers, http10: bool) -> tuple[int, bool]:
    """-> (content length, chunked). Refuses the ambiguous framings smuggling relies on."""
    te = headers.get("transfer-encoding")
    cl = headers.get("content-length")
    if te is not None:
        if cl is not None:
            raise _HttpError(400, "both Content-Length and Transfer-Encoding")
        if http10:
            raise _HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip().lower() for c in te.split(",")]
        if codings[-1] != "chunked" or "chunked" in codings[:-1]:
            raise _HttpError(400, "malformed Transfer-Encoding")
        if len(codings) > 1:
            raise _HttpError(501, f"unsupported transfer coding {codings[0]}")
        return 0, True
    if cl is None:
        return 0, False
    values = {v.strip() for v in cl.split(",")}
    if len(values) != 1:
        raise _HttpError(400, "conflicting Content-Length")
    value = values.pop()
    if not value or not value.isascii() or not value.isdigit():
        raise _HttpError(400, "malformed Content-Length")
    if len(value) > 15:
        raise _HttpError(413, "request body too large")
    return int(value), False


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class _Conn(asyncio.Protocol):
    """One client connection: callbacks fill a buffer, one task reads requests from it."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self.buf = bytearray()
        self.want = _READ_HIGH  # buffer this much before pausing the socket
        self.idle = True  # waiting for the next request
        self.eof = False
        self.lost = False
        self.discard = False  # lingering close: drop what arrives
        self.read_paused = False
        self.write_paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.drain_waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None

    # -- protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = (peer[0], peer[1])
        self.server.conns.add(self)
        self.task = self.loop.create_task(self.run())

    def data_received(self, data: bytes) -> None:
        if self.discard:
            return
        self.buf += data
        if len(self.buf) >= self.want and not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True  # keep the write side open: the response may still be on its way

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = self.lost = True
        self._wake()
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- reading
    async def _fill(self, timeout: float) -> bool:
        """Wait for more bytes; False once the peer has finished sending."""
        if self.eof:
            return False
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()
        fut = self.loop.create_future()
        self.waiter = fut
        timer = self.loop.call_later(timeout, _expire, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self.waiter = None
        return True

    async def _need(self, n: int) -> None:
        """Wait until the buffer holds at least n bytes."""
        if len(self.buf) >= n:
            return
        self.want = max(n, _READ_HIGH)
        try:
            while len(self.buf) < n:
                if not await self._fill(self.server.idle_timeout):
                    raise _PeerGone()
        finally:
            self.want = _READ_HIGH

    async def _read_head(self) -> bytes | None:
        buf = self.buf
        pos = 0
        while True:
            if buf[:2] == b"\r\n":  # tolerate stray CRLFs between requests (RFC 9112 2.2)
                while buf[:2] == b"\r\n":
                    del buf[:2]
                pos = 0
            i = buf.find(b"\r\n\r\n", pos)
            if i >= 0:
                if i > MAX_HEAD:
                    raise _HttpError(431, "header section too large")
                head = bytes(buf[:i])
                del buf[: i + 4]
                return head
            if len(buf) > MAX_HEAD:
                raise _HttpError(431, "header section too large")
            pos = max(0, len(buf) - 3)
            if not await self._fill(self.server.idle_timeout):
                return None  # closed between requests (or mid-head: nothing to answer)

    async def _read_line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                if i > MAX_LINE:
                    break
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            if len(self.buf) > MAX_LINE:
                break
            if not await self._fill(self.server.idle_timeout):
                raise _PeerGone()
        raise _HttpError(400, "chunk line too long")

    async def _read_body(self, length: int) -> bytes:
        await self._need(length)
        body = bytes(self.buf[:length])
        del self.buf[:length]
        return body

    async def _read_chunked(self, limit: int) -> bytes:
        body = bytearray()
        while True:
            line = await self._read_line()
            size_s = line.split(b";", 1)[0].strip(b" \t")
            if not _CHUNK_SIZE.fullmatch(size_s):
                raise _HttpError(400, "malformed chunk size")
            size = int(size_s, 16)
            if size == 0:
                break
            if len(body) + size > limit:
                raise _HttpError(413, "request body too large")
            await self._need(size + 2)
            if self.buf[size : size + 2] != b"\r\n":
                raise _HttpError(400, "malformed chunk")
            body += self.buf[:size]
            del self.buf[: size + 2]
        trailers = 0
        while True:  # trailer fields are read and ignored
            line = await self._read_line()
            if not line:
                return bytes(body)
            trailers += len(line)
            if trailers > MAX_HEAD:
                raise _HttpError(431, "trailer section too large")

    # -- writing
    def _write_response(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        head_only: bool,
        keep: bool,
        http10: bool,
    ) -> None:
        parts = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
        for name, value in headers:
            parts.append(f"{name}: {value}\r\n")
        if status != 204 and status != 304:
            parts.append(f"Content-Length: {len(body)}\r\n")
        if not keep:
            parts.append("Connection: close\r\n")
        elif http10:
            parts.append("Connection: keep-alive\r\n")
        parts.append("\r\n")
        head = "".join(parts).encode("latin-1")
        if self.lost or self.transport is None:
            raise _PeerGone()
        if head_only or not body or status == 204 or status == 304:
            self.transport.write(head)
        elif len(body) <= 65536:
            self.transport.write(head + body)
        else:
            self.transport.write(head)
            self.transport.write(body)

    async def _drain(self) -> None:
        while self.write_paused and not self.lost:
            fut = self.loop.create_future()
            self.drain_waiter = fut
            try:
                await fut
            finally:
                self.drain_waiter = None
        if self.lost:
            raise _PeerGone()

    async def _linger(self) -> None:
        """Close without an RST eating our error response: stop writing, then swallow
        (briefly) whatever the client still sends."""
        t = self.transport
        if t is None or t.is_closing():
            return
        self.discard = True
        self.buf.clear()
        if self.read_paused:
            self.read_paused = False
            t.resume_reading()
        try:
            if t.can_write_eof():
                t.write_eof()
        except OSError:
            return
        deadline = self.loop.time() + _LINGER
        while not self.eof:
            left = deadline - self.loop.time()
            if left <= 0:
                return
            try:
                await self._fill(left)
            except TimeoutError:
                return

    # -- the request loop
    async def run(self) -> None:
        server = self.server
        try:
            while True:
                self.idle = True
                if server.draining and not self.buf:
                    break
                head = await self._read_head()
                if head is None:
                    break
                self.idle = False
                if not await self._serve(head):
                    break
        except _HttpError as exc:
            self.idle = False
            status, headers, body = _error(
                exc.status, _REASONS.get(exc.status, "error").lower(), exc.detail
            )
            try:
                self._write_response(status, headers, body, False, False, False)
                await self._linger()
            except (_PeerGone, ConnectionError, OSError):
                pass
        except (_PeerGone, TimeoutError, ConnectionError):
            pass
        except Exception:  # a bug of the runtime itself: say so, drop this connection only
            print("torpor-runtime: internal error on a connection:", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
        finally:
            if self.transport is not None:
                self.transport.close()
            server.conns.discard(self)
            server.check_drained()

    async def _serve(self, head: bytes) -> bool:
        """Read one request's body, answer it; -> keep the connection open?"""
        server = self.server
        method, target, version, raw_headers = _parse_head(head)
        http10 = version == "HTTP/1.0"
        headers = Headers(raw_headers)
        conn = headers.get("connection")
        tokens = {t.strip().lower() for t in conn.split(",")} if conn else set()
        keep = ("keep-alive" in tokens) if http10 else ("close" not in tokens)
        length, chunked = _framing(headers, http10)
        raw_path, qs = _split_target(target, method)
        if length > server.max_body:
            raise _HttpError(413, f"request body larger than {server.max_body} bytes")
        expect = headers.get("expect")
        if expect is not None:
            if expect.lower() != "100-continue":
                raise _HttpError(417, "only 100-continue is supported")
            if (length or chunked) and not http10 and self.transport is not None:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        reader: _BodyReader | None = None
        if chunked:
            body, reader = await _begin_chunked(self, server)
        elif length > server.body_buffer:
            body, reader = b"", _BodyReader(self, length, server.max_body)  # streamed
        elif length:
            body = await self._read_body(length)
        else:
            body = b""
        request = Request(method, raw_path, qs, headers, body, version[5:], self.client)
        request._reader = reader
        if server.ws_handler is not None and _wants_websocket(method, headers):
            return await _serve_websocket(self, request, http10)
        if raw_path.startswith(RESERVED_PREFIX):
            status, out_headers, out = server.internal(request)
        else:
            status, out_headers, out = await server.dispatch(request)
        keep = keep and not server.draining
        if reader is not None:
            if reader.error is not None:
                status, out_headers, out = _body_failed(reader, out)
            if not reader.done and isinstance(out, bytes):
                keep = False  # the rest of the body is not wanted: say so, then close
        if not isinstance(out, bytes):
            keep = await _send_stream(
                self, request, status, out_headers, out, method == "HEAD", keep, http10
            )
        else:
            self._write_response(status, out_headers, out, method == "HEAD", keep, http10)
            await self._drain()
        if reader is not None and not reader.done:
            await self._linger()  # the rest of the body was not wanted: close, without a reset
            return False
        return keep


# --------------------------------------------------------------------------- streamed bodies

_PIECE = 256 * 1024  # largest piece request.stream() gives at once
_STREAM_TYPES = (bytes, str, bytearray, memoryview, dict, list, tuple)


def _is_stream(body: Any) -> bool:
    """An iterator/generator or an async iterable: a body sent as it is produced."""
    if isinstance(body, _STREAM_TYPES):
        return False
    return hasattr(body, "__anext__") or hasattr(body, "__aiter__") or hasattr(body, "__next__")


def _close_quietly(stream: Any) -> None:
    close = getattr(stream, "close", None)
    if close is not None and not hasattr(stream, "__anext__"):
        try:
            close()
        except Exception:
            pass


class RequestBodyError(Exception):
    """Reading a streamed request body failed (too large, malformed, client gone)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class _BodyReader:
    """Reads one request body from its connection piece by piece, as the handler asks:
    ``length`` bytes, or chunked (``length`` None), never more than ``limit``."""

    def __init__(
        self, conn: _Conn | None, length: int | None, limit: int, prefix: bytes = b""
    ) -> None:
        self.conn = conn
        self.left = length if length is not None else -1  # -1: chunked
        self.limit = limit
        self.prefix: list[bytes] = [prefix] if prefix else []  # read ahead, given first
        self.got = len(prefix)
        self.chunk_left = 0
        self.done = conn is None or length == 0
        self.error: _HttpError | _PeerGone | None = None
        self.thread = threading_ident()

    @classmethod
    def complete(cls, body: bytes) -> _BodyReader:
        return cls(None, None, len(body), body)

    async def next(self) -> bytes:
        """The next piece of the body; b"" at its end. Raises RequestBodyError."""
        if self.prefix:
            return self.prefix.pop(0)
        if self.done:
            return b""
        if self.error is not None:
            raise _body_error(self.error)
        try:
            return await self._next()
        except (_HttpError, _PeerGone, TimeoutError, ConnectionError) as exc:
            self.error = exc if isinstance(exc, (_HttpError, _PeerGone)) else _PeerGone()
            raise _body_error(self.error) from None

    async def _next(self) -> bytes:
        conn = self.conn
        assert conn is not None
        if self.left >= 0:
            if not conn.buf and not await conn._fill(conn.server.idle_timeout):
                raise _PeerGone()
            n = min(len(conn.buf), self.left, _PIECE)
            piece = bytes(conn.buf[:n])
            del conn.buf[:n]
            self.left -= n
            self.done = self.left == 0
            return piece
        if self.chunk_left == 0:
            line = await conn._read_line()
            size_s = line.split(b";", 1)[0].strip(b" \t")
            if not _CHUNK_SIZE.fullmatch(size_s):
                raise _HttpError(400, "malformed chunk size")
            size = int(size_s, 16)
            if size == 0:
                trailers = 0
                while True:  # trailer fields are read and ignored
                    line = await conn._read_line()
                    if not line:
                        self.done = True
                        return b""
                    trailers += len(line)
                    if trailers > MAX_HEAD:
                        raise _HttpError(431, "trailer section too large")
            if self.got + size > self.limit:
                raise _HttpError(413, f"request body larger than {self.limit} bytes")
            self.got += size
            self.chunk_left = size
        if not conn.buf and not await conn._fill(conn.server.idle_timeout):
            raise _PeerGone()
        n = min(len(conn.buf), self.chunk_left, _PIECE)
        piece = bytes(conn.buf[:n])
        del conn.buf[:n]
        self.chunk_left -= n
        if self.chunk_left == 0:
            await conn._need(2)
            if conn.buf[:2] != b"\r\n":
                raise _HttpError(400, "malformed chunk")
            del conn.buf[:2]
        return piece

    async def read_all(self) -> bytes:
        parts: list[bytes] = []
        while True:
            piece = await self.next()
            if not piece:
                return b"".join(parts)
            parts.append(piece)

    def read_all_blocking(self) -> bytes:
        """read_all() from a handler's worker thread."""
        conn = self.conn
        if conn is None:
            piece, self.prefix = b"".join(self.prefix), []
            return piece
        if threading_ident() == self.thread:
            raise RuntimeError(
                "the request body is streamed (larger than TORPOR_BODY_BUFFER or chunked): "
                "use `await request.read()` or `async for piece in request.stream()`"
            )
        return asyncio.run_coroutine_threadsafe(self.read_all(), conn.loop).result()


def threading_ident() -> int:
    import threading

    return threading.get_ident()


def _body_error(err: _HttpError | _PeerGone) -> RequestBodyError:
    if isinstance(err, _HttpError):
        return RequestBodyError(err.status, err.detail)
    return RequestBodyError(400, "the client went away during the request body")


class _BodyStream:
    """What ``request.stream()`` returns: iterate it (``for`` in a sync handler, ``async
    for`` in an async one) for the body's pieces."""

    def __init__(self, reader: _BodyReader) -> None:
        self.reader = reader

    def __aiter__(self) -> _BodyStream:
        return self

    async def __anext__(self) -> bytes:
        piece = await self.reader.next()
        if not piece:
            raise StopAsyncIteration
        return piece

    def __iter__(self) -> _BodyStream:
        return self

    def __next__(self) -> bytes:
        reader = self.reader
        if reader.prefix:
            piece = reader.prefix.pop(0)
        elif reader.conn is None:
            piece = b""
        elif threading_ident() == reader.thread:
            raise RuntimeError("on the event loop, use `async for piece in request.stream()`")
        else:
            piece = asyncio.run_coroutine_threadsafe(reader.next(), reader.conn.loop).result()
        if not piece:
            raise StopIteration
        return piece


async def _begin_chunked(conn: _Conn, server: _Server) -> tuple[bytes, _BodyReader | None]:
    """Read a chunked body up to ``body_buffer``: whole (reader None) or its beginning
    and a reader for the rest."""
    reader = _BodyReader(conn, None, server.max_body)
    parts: list[bytes] = []
    got = 0
    while got <= server.body_buffer:
        try:
            piece = await reader._next()
        except TimeoutError:
            raise _PeerGone() from None
        if not piece:
            if reader.done:
                return b"".join(parts), None
            continue
        parts.append(piece)
        got += len(piece)
    reader.prefix = parts
    return b"", reader


def _body_failed(reader: _BodyReader, out: Any) -> Rendered:
    """The handler ran into a bad or broken request body: answer that, not its result."""
    err = reader.error
    if _is_stream(out):
        _close_quietly(out)
    if isinstance(err, _HttpError):
        return _error(err.status, _REASONS.get(err.status, "error").lower(), err.detail)
    raise _PeerGone()


class _Source:
    """Pulls a response stream: async iterables on the loop, sync iterators in the pool
    (their ``next()`` may block)."""

    def __init__(self, stream: Any, server: _Server) -> None:
        self.server = server
        self.is_async = hasattr(stream, "__anext__") or hasattr(stream, "__aiter__")
        if self.is_async:
            self.it = stream if hasattr(stream, "__anext__") else stream.__aiter__()
        else:
            self.it = stream

    async def next(self) -> Any:
        """The next piece, or _END."""
        if self.is_async:
            try:
                return await self.it.__anext__()
            except StopAsyncIteration:
                return _END
        return await self.server.loop.run_in_executor(self.server._pool(), next, self.it, _END)

    async def close(self) -> None:
        try:
            if self.is_async:
                aclose = getattr(self.it, "aclose", None)
                if aclose is not None:
                    await aclose()
            elif getattr(self.it, "close", None) is not None:
                await self.server.loop.run_in_executor(self.server._pool(), self.it.close)
        except Exception:
            pass


_END: Any = object()


def _piece_bytes(piece: Any) -> bytes:
    if isinstance(piece, bytes):
        return piece
    if isinstance(piece, str):
        return piece.encode("utf-8")
    if isinstance(piece, (bytearray, memoryview)):
        return bytes(piece)
    raise TypeError(f"stream yielded {type(piece).__name__}; expected bytes or str")


def _log_stream_error(request: Request, exc: BaseException, started: bool) -> None:
    when = "mid-stream" if started else "before the first piece"
    print(
        f"torpor-runtime: response stream raised {when} on {request.method} {request.raw_path}:",
        file=sys.stderr,
    )
    traceback.print_exception(exc)
    sys.stderr.flush()


async def _send_stream(
    conn: _Conn,
    request: Request,
    status: int,
    headers: list[tuple[str, str]],
    stream: Any,
    head_only: bool,
    keep: bool,
    http10: bool,
) -> bool:
    """Send a streamed body chunked (close-delimited to HTTP/1.0), each piece as it is
    produced. The head waits for the first piece: a stream that fails before it gets a
    500; one that fails later ends with a last chunk (after which the connection closes),
    and the error is logged. -> keep the connection?"""
    source = _Source(stream, conn.server)
    if head_only:
        await source.close()
        conn._write_response(status, headers, b"", True, keep, http10)
        return keep
    try:
        first = await source.next()
        data = b"" if first is _END else _piece_bytes(first)
    except Exception as exc:
        _log_stream_error(request, exc, False)
        await source.close()
        msg = str(exc)
        err = _error(
            500, "handler raised", f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
        )
        conn._write_response(*err, False, keep, http10)
        await conn._drain()
        return keep
    if not any(n.lower() == "content-type" for n, _ in headers):
        headers = [*headers, ("Content-Type", _TEXT if isinstance(first, str) else _OCTET)]
    keep = keep and not http10
    parts = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
    parts += [f"{n}: {v}\r\n" for n, v in headers]
    if not http10:
        parts.append("Transfer-Encoding: chunked\r\n")
    if not keep:
        parts.append("Connection: close\r\n")
    parts.append("\r\n")
    t = conn.transport
    if conn.lost or t is None:
        await source.close()
        raise _PeerGone()
    t.write("".join(parts).encode("latin-1"))
    try:
        while first is not _END:
            if data:
                t.write(data if http10 else b"%x\r\n%b\r\n" % (len(data), data))
                if conn.write_paused:
                    await conn._drain()
            if conn.lost:
                raise _PeerGone()
            try:
                first = await source.next()
                data = b"" if first is _END else _piece_bytes(first)
            except Exception as exc:
                _log_stream_error(request, exc, True)
                keep = False
                break
    except BaseException:
        await source.close()
        raise
    if not http10 and not conn.lost:
        t.write(b"0\r\n\r\n")
    await conn._drain()
    return keep


def sse(events: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """A ``text/event-stream`` response from an iterable or async iterable of events.

    An event is a str (its ``data``), or a dict with any of ``data`` (a str, or anything
    else sent as JSON), ``event``, ``id``, ``retry`` (ms) and ``comment``."""
    out = {
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    }
    out.update(headers or {})
    if hasattr(events, "__aiter__"):

        async def agen() -> Any:
            async for ev in events:
                yield _sse_event(ev)

        return Response(agen(), status, out)
    return Response((_sse_event(ev) for ev in events), status, out)


def _sse_event(ev: Any) -> str:
    if not isinstance(ev, Mapping):
        ev = {"data": ev}
    lines = []
    if ev.get("comment") is not None:
        lines += [": " + c for c in str(ev["comment"]).splitlines() or [""]]
    for key in ("event", "id"):
        if ev.get(key) is not None:
            value = str(ev[key])
            if "\n" in value or "\r" in value:
                raise ValueError(f"SSE {key} must be one line")
            lines.append(f"{key}: {value}")
    if ev.get("retry") is not None:
        lines.append(f"retry: {int(ev['retry'])}")
    if "data" in ev:
        data = ev["data"]
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        elif not isinstance(data, str):
            data = _dumps(data).decode()
        lines += ["data: " + d for d in data.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(lines) + "\n\n"


# --------------------------------------------------------------------------- WebSockets (RFC 6455)

_WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_WS_QUEUE = 16  # received messages held for the handler before reading pauses
_WS_WAIT = 86_400.0  # a socket may stay silent this long (the gateway bounds its life)
_WS_CLOSE_WAIT = 2.0  # seconds to wait for the client's close frame after ours
_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0, 1, 2, 8, 9, 10


class WebSocketClosed(Exception):
    """The socket is closed; ``code`` and ``reason`` are from the close handshake."""

    def __init__(self, code: int = 1006, reason: str = "") -> None:
        super().__init__(f"websocket closed ({code}{': ' + reason if reason else ''})")
        self.code, self.reason = code, reason


def _wants_websocket(method: str, headers: Headers) -> bool:
    up = headers.get("upgrade")
    if up is None or method != "GET":
        return False
    conn = headers.get("connection") or ""
    return any(t.strip().lower() == "websocket" for t in up.split(",")) and any(
        t.strip().lower() == "upgrade" for t in conn.split(",")
    )


def ws_accept(key: str) -> str:
    """The Sec-WebSocket-Accept value for a Sec-WebSocket-Key."""
    import base64
    import hashlib

    return base64.b64encode(hashlib.sha1((key + _WS_GUID).encode("ascii")).digest()).decode()


def ws_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None) -> bytes:
    """One frame; ``mask`` (4 bytes) for a client's frames, None for a server's."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    mbit = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 65536:
        head = bytes((b0, mbit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, mbit | 127)) + n.to_bytes(8, "big")
    if mask is not None:
        return head + mask + ws_mask(payload, mask)
    return head + payload


def ws_mask(data: bytes, key: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``key`` (masking and unmasking are the same)."""
    n = len(data)
    if not n:
        return b""
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


class _WsProtocolError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class WebSocket:
    """One server-side WebSocket, as an ``async def`` websocket handler gets it.
    ``request`` is the upgrade request. Sync handlers get a :class:`SyncWebSocket`."""

    def __init__(self, conn: _Conn, request: Request, max_message: int) -> None:
        self.conn = conn
        self.request = request
        self.max_message = max_message
        self.inbox: asyncio.Queue[Any] = asyncio.Queue(_WS_QUEUE)
        self.sent_close = False
        self.got_close = asyncio.Event()
        self.close_code = 1006
        self.close_reason = ""

    @property
    def closed(self) -> bool:
        return self.sent_close or self.got_close.is_set()

    async def receive(self) -> str | bytes:
        """The next message (str for text, bytes for binary); raises WebSocketClosed."""
        if self.got_close.is_set() and self.inbox.empty():
            raise WebSocketClosed(self.close_code, self.close_reason)
        msg = await self.inbox.get()
        if msg is None:
            self.inbox.put_nowait(None)  # later receive() calls see the close too
            raise WebSocketClosed(self.close_code, self.close_reason)
        return msg  # type: ignore[no-any-return]

    async def send(self, data: str | bytes) -> None:
        if self.closed:
            raise WebSocketClosed(self.close_code, self.close_reason)
        if isinstance(data, str):
            await self._write(ws_frame(_OP_TEXT, data.encode("utf-8")))
        elif isinstance(data, (bytes, bytearray, memoryview)):
            await self._write(ws_frame(_OP_BINARY, bytes(data)))
        else:
            raise TypeError(f"send() takes str or bytes, not {type(data).__name__}")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start (or answer) the close handshake; idempotent."""
        if self.sent_close:
            return
        self.sent_close = True
        if not self.got_close.is_set():
            self.close_code, self.close_reason = code, reason
        payload = code.to_bytes(2, "big") + reason.encode("utf-8")[:123]
        try:
            await self._write(ws_frame(_OP_CLOSE, payload))
        except _PeerGone:
            pass

    def __aiter__(self) -> WebSocket:
        return self

    async def __anext__(self) -> str | bytes:
        try:
            return await self.receive()
        except WebSocketClosed:
            raise StopAsyncIteration from None

    async def _write(self, frame: bytes) -> None:
        conn = self.conn
        if conn.lost or conn.transport is None:
            raise _PeerGone()
        conn.transport.write(frame)
        if conn.write_paused:
            await conn._drain()

    # -- the reading side: one task per socket
    async def _need(self, n: int) -> None:
        conn = self.conn
        while len(conn.buf) < n:
            if not await conn._fill(_WS_WAIT):
                raise _PeerGone()

    async def _frame(self) -> tuple[bool, int, bytes]:
        buf = self.conn.buf
        await self._need(2)
        b0, b1 = buf[0], buf[1]
        if b0 & 0x70:
            raise _WsProtocolError(1002, "reserved bits set")
        if not b1 & 0x80:
            raise _WsProtocolError(1002, "client frames must be masked")
        fin, opcode, n, pos = bool(b0 & 0x80), b0 & 0x0F, b1 & 0x7F, 2
        if n == 126:
            await self._need(4)
            n, pos = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            await self._need(10)
            n, pos = int.from_bytes(buf[2:10], "big"), 10
        if opcode >= 8 and (n > 125 or not fin):
            raise _WsProtocolError(1002, "bad control frame")
        if n > self.max_message:
            raise _WsProtocolError(1009, f"frame larger than {self.max_message} bytes")
        await self._need(pos + 4 + n)
        key = bytes(buf[pos : pos + 4])
        payload = ws_mask(bytes(buf[pos + 4 : pos + 4 + n]), key)
        del buf[: pos + 4 + n]
        return fin, opcode, payload

    async def _read_loop(self) -> None:
        """Frames -> messages in the inbox, pings answered, the close handshake."""
        parts: list[bytes] = []
        kind = 0
        size = 0
        try:
            while True:
                fin, opcode, payload = await self._frame()
                if opcode == _OP_PING:
                    if not self.sent_close:
                        await self._write(ws_frame(_OP_PONG, payload))
                    continue
                if opcode == _OP_PONG:
                    continue
                if opcode == _OP_CLOSE:
                    code, reason = 1005, ""
                    if len(payload) == 1:
                        raise _WsProtocolError(1002, "bad close frame")
                    if len(payload) >= 2:
                        code = int.from_bytes(payload[:2], "big")
                        if not (
                            1000 <= code <= 1014
                            and code not in (1004, 1005, 1006)
                            or 3000 <= code < 5000
                        ):
                            raise _WsProtocolError(1002, "bad close code")
                        try:
                            reason = payload[2:].decode("utf-8")
                        except UnicodeDecodeError:
                            raise _WsProtocolError(1007, "close reason is not UTF-8") from None
                    if not self.sent_close:
                        self.close_code, self.close_reason = code, reason
                    self.got_close.set()
                    await self.close(1000 if code == 1005 else code)
                    return
                if opcode in (_OP_TEXT, _OP_BINARY):
                    if parts or kind:
                        raise _WsProtocolError(1002, "new message inside a fragmented one")
                    kind = opcode
                elif opcode == _OP_CONT:
                    if not kind:
                        raise _WsProtocolError(1002, "continuation without a message")
                else:
                    raise _WsProtocolError(1002, f"unknown opcode {opcode}")
                size += len(payload)
                if size > self.max_message:
                    raise _WsProtocolError(1009, f"message larger than {self.max_message} bytes")
                parts.append(payload)
                if fin:
                    data = b"".join(parts)
                    parts, size = [], 0
                    if kind == _OP_TEXT:
                        try:
                            msg: str | bytes = data.decode("utf-8")
                        except UnicodeDecodeError:
                            raise _WsProtocolError(1007, "text message is not UTF-8") from None
                    else:
                        msg = data
                    kind = 0
                    await self.inbox.put(msg)
        except _WsProtocolError as exc:
            await self.close(exc.code, exc.reason)
        except (_PeerGone, TimeoutError, ConnectionError):
            pass
        finally:
            self.got_close.set()
            while self.inbox.full():  # make room for the end mark (the handler has left)
                self.inbox.get_nowait()
            self.inbox.put_nowait(None)


class SyncWebSocket:
    """A :class:`WebSocket` for a sync handler (which runs in a worker thread)."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.request = ws.request

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.ws.conn.loop).result()

    @property
    def closed(self) -> bool:
        return self.ws.closed

    def receive(self) -> str | bytes:
        return self._call(self.ws.receive())  # type: ignore[no-any-return]

    def send(self, data: str | bytes) -> None:
        self._call(self.ws.send(data))

    def close(self, code: int = 1000, reason: str = "") -> None:
        self._call(self.ws.close(code, reason))

    def __iter__(self) -> Iterator[str | bytes]:
        while True:
            try:
                yield self.receive()
            except WebSocketClosed:
                return


def _settle(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if not fut.done():
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)


async def _in_own_thread(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], arg: Any) -> None:
    """Run a sync socket handler in a thread of its own: a socket may stay open for
    hours, and must not hold one of the pool's threads that HTTP requests need."""
    import threading

    fut: asyncio.Future[None] = loop.create_future()

    def run() -> None:
        try:
            fn(arg)
        except BaseException as exc:  # handed to the loop, which logs it
            loop.call_soon_threadsafe(_settle, fut, exc)
        else:
            loop.call_soon_threadsafe(_settle, fut, None)

    threading.Thread(target=run, name="torpor-websocket", daemon=True).start()
    await fut


async def _serve_websocket(conn: _Conn, request: Request, http10: bool) -> bool:
    """Answer an upgrade request: the handshake, then the handler on the socket. -> False
    (the connection is done afterwards)."""
    server = conn.server
    h = request.headers
    key = h.get("sec-websocket-key") or ""
    refusal = None
    if http10:
        refusal = _error(400, "bad request", "WebSocket needs HTTP/1.1")
    elif h.get("sec-websocket-version") != "13":
        status, headers, body = _error(426, "upgrade required", "Sec-WebSocket-Version 13 only")
        refusal = status, [*headers, ("Sec-WebSocket-Version", "13")], body
    elif len(key) != 24 or not key.endswith("=="):
        refusal = _error(400, "bad request", "malformed Sec-WebSocket-Key")
    elif request._reader is not None or request._body:
        refusal = _error(400, "bad request", "an upgrade request has no body")
    elif server.draining:
        refusal = _error(503, "draining", "this replica is shutting down")
    if refusal is not None:
        conn._write_response(*refusal, False, False, http10)
        await conn._drain()
        return False
    t = conn.transport
    if t is None or conn.lost:
        raise _PeerGone()
    t.write(
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {ws_accept(key)}\r\n\r\n"
        ).encode("latin-1")
    )
    ws = WebSocket(conn, request, server.max_body)
    server.websockets.add(ws)
    reading = conn.loop.create_task(ws._read_loop())
    handler = server.ws_handler
    assert handler is not None
    try:
        if server.ws_async:
            await handler(ws)  # type: ignore[misc]
        else:
            await _in_own_thread(conn.loop, handler, SyncWebSocket(ws))
    except (Exception, SystemExit) as exc:
        if not isinstance(exc, WebSocketClosed):
            print(
                f"torpor-runtime: websocket handler raised on {request.raw_path}:", file=sys.stderr
            )
            traceback.print_exception(exc)
            sys.stderr.flush()
            await ws.close(1011, "handler raised")
    finally:
        server.websockets.discard(ws)
        await ws.close(1000)
        try:
            await asyncio.wait_for(ws.got_close.wait(), _WS_CLOSE_WAIT)
        except TimeoutError:
            pass
        reading.cancel()
    return False


# --------------------------------------------------------------------------- server


class Config:
    __slots__ = (
        "port",
        "host",
        "handler",
        "dir",
        "max_body",
        "drain_timeout",
        "idle_timeout",
        "threads",
        "body_buffer",
        "websocket",
    )

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        handler: str = "handler:handle",
        dir: str = ".",
        max_body: int = DEFAULT_MAX_BODY,
        drain_timeout: float = 30.0,
        idle_timeout: float = 120.0,
        threads: int = 64,
        body_buffer: int = DEFAULT_BODY_BUFFER,
        websocket: str | None = None,
    ) -> None:
        self.port, self.host, self.handler, self.dir = port, host, handler, dir
        self.max_body, self.drain_timeout, self.idle_timeout = max_body, drain_timeout, idle_timeout
        self.threads = threads
        self.body_buffer = body_buffer  # bodies up to this are read before the handler runs
        self.websocket = websocket  # module:function of the WebSocket handler, if any


def _seconds(name: str, raw: str) -> float:
    s = raw.strip().lower()
    scale = 1.0
    if s.endswith("ms"):
        s, scale = s[:-2], 0.001
    elif s.endswith("s"):
        s = s[:-1]
    try:
        value = float(s) * scale
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected seconds such as 30 or 1.5s") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name}={raw!r}: expected a positive duration")
    return value


def _size(name: str, raw: str) -> int:
    s = raw.strip()
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "K": 1000, "M": 1000**2, "G": 1000**3}
    scale = 1
    for suffix, mult in units.items():
        if s.endswith(suffix):
            s, scale = s[: -len(suffix)], mult
            break
    if not s.isascii() or not s.isdigit():
        raise ValueError(f"{name}={raw!r}: expected bytes such as 1048576 or 32Mi")
    return int(s) * scale


def load_config(env: Mapping[str, str]) -> Config:
    """Read the runtime's settings from environment variables. Raises ValueError."""
    raw_port = env.get("PORT")
    if raw_port is None or not raw_port.strip():
        raise ValueError("PORT is required")
    try:
        port = int(raw_port)
    except ValueError:
        raise ValueError(f"PORT={raw_port!r}: expected a port number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"PORT={raw_port!r}: expected 0..65535")
    handler = env.get("TORPOR_HANDLER") or "handler:handle"
    module, sep, attr = handler.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"TORPOR_HANDLER={handler!r}: expected module:function")
    websocket = env.get("TORPOR_WEBSOCKET") or None
    if websocket is not None:
        module, sep, attr = websocket.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"TORPOR_WEBSOCKET={websocket!r}: expected module:function")
    threads = env.get("TORPOR_THREADS") or "64"
    if not threads.isdigit() or int(threads) < 1:
        raise ValueError(f"TORPOR_THREADS={threads!r}: expected a positive integer")
    return Config(
        port=port,
        host=env.get("TORPOR_HOST") or "127.0.0.1",
        handler=handler,
        dir=os.path.abspath(env.get("TORPOR_DIR") or "."),
        max_body=_size("TORPOR_MAX_BODY", env.get("TORPOR_MAX_BODY") or str(DEFAULT_MAX_BODY)),
        drain_timeout=_seconds("TORPOR_DRAIN_TIMEOUT", env.get("TORPOR_DRAIN_TIMEOUT") or "30"),
        idle_timeout=_seconds("TORPOR_IDLE_TIMEOUT", env.get("TORPOR_IDLE_TIMEOUT") or "120"),
        threads=int(threads),
        body_buffer=_size(
            "TORPOR_BODY_BUFFER", env.get("TORPOR_BODY_BUFFER") or str(DEFAULT_BODY_BUFFER)
        ),
        websocket=websocket,
    )


def _prepare(cfg: Config) -> None:
    """Make the function folder importable and current; let handlers import us."""
    deps = os.path.join(cfg.dir, ".deps")
    if os.path.isdir(deps):
        sys.path.insert(0, deps)
        if any(n.endswith(".pth") for n in os.listdir(deps)):
            import site

            site.addsitedir(deps)  # already on the path: only runs its .pth files
    sys.path.insert(0, cfg.dir)
    os.chdir(cfg.dir)
    sys.modules.setdefault("torpor_runtime", sys.modules[__name__])


def load_handler(spec: str) -> Callable[..., Any]:
    """Import ``module:function`` (attribute may be dotted). Raises on any failure."""
    module_name, _, attr = spec.partition(":")
    __import__(module_name)
    obj: Any = sys.modules[module_name]
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise TypeError(f"{spec} is a {type(obj).__name__}, not a function")
    return obj  # type: ignore[no-any-return]


def styled(handler: Callable[..., Any], style: str) -> Callable[..., Any]:
    """``handler`` called the way ``TORPOR_HANDLER_STYLE`` says. Raises ValueError."""
    if style in ("", "torpor"):
        return handler
    if style != "openfaas":
        raise ValueError(f"TORPOR_HANDLER_STYLE={style[:40]!r}: expected torpor or openfaas")
    import importlib.util

    where = os.path.join(os.path.dirname(PATH), "openfaas.py")
    spec = importlib.util.spec_from_file_location("torpor_runtime_openfaas", where)
    if spec is None or spec.loader is None:
        raise ValueError(f"TORPOR_HANDLER_STYLE=openfaas: the adapter {where} is missing")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.adapt(handler)  # type: ignore[no-any-return]


def _is_async(fn: Any) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    if inspect.isroutine(fn) or isinstance(fn, type):
        return False
    return inspect.iscoroutinefunction(fn.__call__)  # an object with `async def __call__`


class _Server:
    def __init__(
        self, cfg: Config, handler: Callable[..., Any], loop: asyncio.AbstractEventLoop, t0: float
    ) -> None:
        self.cfg = cfg
        self.handler = handler
        self.loop = loop
        self.t0 = t0
        self.is_async = _is_async(handler)
        self.max_body = cfg.max_body
        self.idle_timeout = cfg.idle_timeout
        self.body_buffer = cfg.body_buffer
        self.ws_handler: Callable[..., Any] | None = None
        self.ws_async = False
        self.websockets: set[WebSocket] = set()
        self.conns: set[_Conn] = set()
        self.draining = False
        self.listener: asyncio.AbstractServer | None = None
        self.done: asyncio.Future[None] = loop.create_future()
        self.executor: Any = None
        self.on_listening: Callable[[int], None] | None = None

    def _pool(self) -> Any:
        if self.executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self.executor = ThreadPoolExecutor(
                self.cfg.threads, thread_name_prefix="torpor-handler"
            )
        return self.executor

    async def dispatch(self, request: Request) -> Rendered:
        try:
            if self.is_async:
                result = await self.handler(request)
            else:
                result = await self.loop.run_in_executor(self._pool(), self.handler, request)
                if inspect.isawaitable(result):
                    result = await result
        except (Exception, SystemExit) as exc:
            print(
                f"torpor-runtime: handler raised on {request.method} {request.raw_path}:",
                file=sys.stderr,
            )
            traceback.print_exception(exc)
            sys.stderr.flush()
            msg = str(exc)
            return _error(
                500, "handler raised", f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
            )
        try:
            return _render(result)
        except _BadResult as exc:
            print(
                f"torpor-runtime: bad handler result on {request.method} {request.raw_path}: {exc}",
                file=sys.stderr,
                flush=True,
            )
            return _error(500, "bad handler result", str(exc))

    def internal(self, request: Request) -> Rendered:
        """Paths under /_torpor/: never the handler's."""
        if request.raw_path == HEALTH_PATH:
            if request.method not in ("GET", "HEAD"):
                status, headers, body = _error(405, "method not allowed", "use GET")
                return status, [*headers, ("Allow", "GET, HEAD")], body
            if self.draining:
                return 503, [("Content-Type", _TEXT)], b"draining"
            return 200, [("Content-Type", _TEXT)], b"ok"
        return _error(404, "not found", f"{request.raw_path} is reserved by the runtime")

    async def serve(self) -> int:
        cfg = self.cfg
        try:
            self.listener = await self.loop.create_server(
                lambda: _Conn(self), cfg.host, cfg.port, backlog=1024, reuse_address=True
            )
        except OSError as exc:
            print(
                f"torpor-runtime: cannot listen on {cfg.host}:{cfg.port}: {exc}",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_LISTEN
        port = self.listener.sockets[0].getsockname()[1]
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.on_signal, sig)
        ms = (time.perf_counter() - self.t0) * 1000
        print(
            f"torpor-runtime: serving {cfg.handler} on :{port} (ready in {ms:.1f} ms)", flush=True
        )
        if self.on_listening is not None:  # listening with the handler loaded: it can answer
            self.on_listening(port)
        if not self.is_async:  # start a handler thread now, not on the first request's way
            self.loop.run_in_executor(self._pool(), int)
        await self.done
        return EXIT_OK

    def on_signal(self, sig: int) -> None:
        if self.draining:
            if sig == signal.SIGINT:
                self.hard_stop("second SIGINT")
            return
        self.draining = True
        if self.listener is not None:
            self.listener.close()  # stop accepting
        for conn in list(self.conns):
            if conn.idle and not conn.buf and conn.transport is not None:
                conn.transport.close()  # idle keep-alive connection
        self.loop.call_later(self.cfg.drain_timeout, self.hard_stop, "drain timeout")
        if self.websockets:  # open sockets get most of the grace period, then 1001
            self.loop.call_later(self.cfg.drain_timeout * 0.8, self.close_websockets)
        self.check_drained()

    def close_websockets(self) -> None:
        for ws in list(self.websockets):
            self.loop.create_task(ws.close(1001, "going away"))

    def check_drained(self) -> None:
        if self.draining and not self.conns and not self.done.done():
            self.done.set_result(None)

    def hard_stop(self, why: str) -> None:
        print(
            f"torpor-runtime: {why}; cutting off {len(self.conns)} connection(s)",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(EXIT_DRAIN_TIMEOUT)


def run(
    cfg: Config,
    handler: Callable[..., Any],
    t0: float | None = None,
    ws_handler: Callable[..., Any] | None = None,
    on_listening: Callable[[int], None] | None = None,
) -> int:
    """Serve ``handler`` (and ``ws_handler`` for WebSocket upgrades) until SIGTERM/SIGINT
    and a drain; -> exit code. ``on_listening(port)`` is called once the listener is open
    (the handler loaded, the loop about to serve), before the first connection is served."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = _Server(cfg, handler, loop, time.perf_counter() if t0 is None else t0)
    server.on_listening = on_listening
    if ws_handler is not None:
        server.ws_handler, server.ws_async = ws_handler, _is_async(ws_handler)
    try:
        code = loop.run_until_complete(server.serve())
        if code == EXIT_OK:
            print("torpor-runtime: drained, exiting", flush=True)
        return code
    finally:
        if server.executor is not None:
            server.executor.shutdown(wait=False, cancel_futures=True)
        leftovers = asyncio.all_tasks(loop)  # background tasks handlers started
        for task in leftovers:
            task.cancel()
        if leftovers:  # give them a moment to unwind, not forever
            loop.run_until_complete(asyncio.wait(leftovers, timeout=1.0))
        loop.close()


def main(t0: float | None = None, on_listening: Callable[[int], None] | None = None) -> int:
    """Configure from the environment, import the handler, serve; -> exit code.

    ``t0`` (a ``time.perf_counter()``) is when the start began, for the "ready in" figure;
    by default, when this module started importing. ``on_listening``: see :func:`run` (the
    zygote's readiness report). Started by ``fetch.launch_code`` (from cached bytecode,
    as ``torpor_runtime``); ``python3 server.py`` works too but compiles on every start.
    """
    if t0 is None:
        t0 = _T0
    try:
        cfg = load_config(os.environ)
    except ValueError as exc:
        print(f"torpor-runtime: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    try:
        _prepare(cfg)
    except OSError as exc:
        print(f"torpor-runtime: TORPOR_DIR={cfg.dir!r}: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True)  # handler prints reach the logs promptly
    try:
        handler = styled(load_handler(cfg.handler), os.environ.get("TORPOR_HANDLER_STYLE", ""))
    except (Exception, SystemExit) as exc:
        traceback.print_exc()
        print(
            f"torpor-runtime: {type(exc).__name__}: {exc} (loading handler {cfg.handler} from {cfg.dir})",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_IMPORT
    ws_handler = None
    if cfg.websocket is not None:
        try:
            ws_handler = load_handler(cfg.websocket)
        except (Exception, SystemExit) as exc:
            traceback.print_exc()
            print(
                f"torpor-runtime: {type(exc).__name__}: {exc} (loading websocket handler "
                f"{cfg.websocket} from {cfg.dir})",
                file=sys.stderr,
                flush=True,
            )
            return EXIT_IMPORT
    return run(cfg, handler, t0, ws_handler, on_listening)


if __name__ == "__main__":
    sys.exit(main())
