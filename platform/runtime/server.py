"""Torpor function runtime: the HTTP server that runs inside every replica.

Standalone on purpose: standard library only, nothing of Torpor. It is copied into
every image (whose only software is Debian's python3) and run as ``python3 server.py``;
the process driver finds it as ``torpor.runtime.server.__file__``. Its import time is
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

__all__ = ["Headers", "Request", "Response", "main", "run", "load_config", "load_handler"]

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
        "body",
        "http_version",
        "client",
        "_path",
        "_query_list",
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
        self.body = body
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

Rendered = tuple[int, list[tuple[str, str]], bytes]


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


def _encode_body(body: Any) -> tuple[bytes, str | None]:
    if isinstance(body, bytes):
        return body, _OCTET
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
        if chunked:
            body = await self._read_chunked(server.max_body)
        elif length:
            body = await self._read_body(length)
        else:
            body = b""
        request = Request(method, raw_path, qs, headers, body, version[5:], self.client)
        if raw_path.startswith(RESERVED_PREFIX):
            status, out_headers, out = server.internal(request)
        else:
            status, out_headers, out = await server.dispatch(request)
        keep = keep and not server.draining
        self._write_response(status, out_headers, out, method == "HEAD", keep, http10)
        await self._drain()
        return keep


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
    ) -> None:
        self.port, self.host, self.handler, self.dir = port, host, handler, dir
        self.max_body, self.drain_timeout, self.idle_timeout = max_body, drain_timeout, idle_timeout
        self.threads = threads


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
        self.conns: set[_Conn] = set()
        self.draining = False
        self.listener: asyncio.AbstractServer | None = None
        self.done: asyncio.Future[None] = loop.create_future()
        self.executor: Any = None

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
        self.check_drained()

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


def run(cfg: Config, handler: Callable[..., Any], t0: float | None = None) -> int:
    """Serve ``handler`` until SIGTERM/SIGINT and a drain; -> exit code."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    server = _Server(cfg, handler, loop, time.perf_counter() if t0 is None else t0)
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


def main(t0: float | None = None) -> int:
    """Configure from the environment, import the handler, serve; -> exit code.

    ``t0`` (a ``time.perf_counter()``) is when the start began, for the "ready in" figure;
    by default, when this module started importing. ``python3 server.py`` compiles this
    file on every start; ``python3 -c "import server, sys; sys.exit(server.main())"``
    with server.py's directory on sys.path runs from cached bytecode instead.
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
    return run(cfg, handler, t0)


if __name__ == "__main__":
    sys.exit(main())
