"""The function runtime (platform/runtime/server.py), run for real: a subprocess on a
free loopback port, spoken to over real sockets (http.client and raw bytes)."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from torpor.runtime import server as runtime

ROOT = Path(__file__).resolve().parents[2]
FUNCTIONS = ROOT / "functions"
SERVER = Path(runtime.__file__).resolve()
START_TIMEOUT = 15.0  # s until the start line must be printed
IO_TIMEOUT = 15.0  # s for any single socket operation
EXIT_TIMEOUT = 15.0  # s for the process to exit after a signal
# The interpreter that runs the runtime; point it at another (3.12, 3.13...) to check the
# runtime under the Python of another base image.
RUNTIME_PYTHON = os.environ.get("TORPOR_TEST_RUNTIME_PYTHON") or sys.executable

KITCHEN = """
import asyncio
import threading
import time

from torpor_runtime import Response

released = threading.Event()


class Thing:
    pass


def handle(request):
    path = request.path
    if path == "/boom":
        raise ValueError("kaput")
    if path == "/thread":
        return threading.current_thread().name
    if path == "/none":
        return None
    if path == "/dict":
        return {"ok": True, "items": [1, 2]}
    if path == "/bytes":
        return b"\\x00\\x01"
    if path == "/response":
        return Response("made", status=201, headers={"X-Thing": "1", "Content-Length": "999"})
    if path == "/bad":
        return Thing()
    if path == "/badjson":
        return {"x": Thing()}
    if path == "/exit":
        raise SystemExit(7)
    if path == "/block":
        return "released" if released.wait(10) else "timed out"
    if path == "/release":
        released.set()
        return "ok"
    if path == "/async":
        async def later():
            await asyncio.sleep(0)
            return {"via": "coroutine"}
        return later()
    return "kitchen"
"""


class Replica:
    def __init__(
        self, proc: subprocess.Popen[str], port: int, start_line: str, stderr: list[str]
    ) -> None:
        self.proc = proc
        self.port = port
        self.start_line = start_line
        self._stderr = stderr

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    def stderr_shows(self, text: str, timeout: float = IO_TIMEOUT) -> bool:
        """Whether ``text`` appears on stderr within ``timeout`` (a thread reads it)."""
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=IO_TIMEOUT)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        conn = self.connection()
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        finally:
            conn.close()

    def socket(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT)

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)


def _pump(stream: object, sink: Callable[[str], None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        sink(line)


Start = Callable[..., Replica]


@pytest.fixture
def start() -> Iterator[Start]:
    """start(function_dir, env=..., python_args=...) -> a ready Replica; all are killed
    at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def _start(
        function_dir: Path,
        env: dict[str, str] | None = None,
        python_args: tuple[str, ...] = (),
        python: str = RUNTIME_PYTHON,
    ) -> Replica:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("TORPOR_")}
        full_env.update({"PORT": "0", "TORPOR_HOST": "127.0.0.1", "TORPOR_DIR": str(function_dir)})
        full_env.update(env or {})
        proc = subprocess.Popen(
            [python, *python_args, str(SERVER)],
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        lines: queue.Queue[str] = queue.Queue()
        stderr: list[str] = []
        threading.Thread(target=_pump, args=(proc.stdout, lines.put), daemon=True).start()
        threading.Thread(target=_pump, args=(proc.stderr, stderr.append), daemon=True).start()
        try:
            line = lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            pytest.fail(f"no start line within {START_TIMEOUT}s; stderr: {''.join(stderr)}")
        m = re.fullmatch(r"torpor-runtime: serving (\S+) on :(\d+) \(ready in [\d.]+ ms\)\n", line)
        assert m, f"unexpected start line {line!r}; stderr: {''.join(stderr)}"
        return Replica(proc, int(m.group(2)), line, stderr)

    yield _start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=EXIT_TIMEOUT)


def run_to_exit(function_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TORPOR_")}
    full_env.update({"PORT": "0", "TORPOR_HOST": "127.0.0.1", "TORPOR_DIR": str(function_dir)})
    full_env.update(env)
    return subprocess.run(
        [RUNTIME_PYTHON, str(SERVER)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def kitchen(tmp_path: Path) -> Path:
    folder = tmp_path / "kitchen"
    folder.mkdir()
    (folder / "handler.py").write_text(KITCHEN)
    return folder


def read_response(
    sock: socket.socket, buf: bytearray | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Read one response (Content-Length framed) from a raw socket."""
    data = buf if buf is not None else bytearray()
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full head: {bytes(data)!r}")
        data += chunk
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = bytearray(rest)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        body += chunk
    data[:] = body[length:]
    return status, headers, bytes(body[:length])


def read_to_eof(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)


# --------------------------------------------------------------------------- basics


def test_health_never_reaches_the_handler(start: Start) -> None:
    rep = start(FUNCTIONS / "echo")
    status, headers, body = rep.request("GET", "/_torpor/health")
    assert (status, body) == (200, b"ok")
    assert headers["Content-Length"] == "2"
    status, headers, body = rep.request("HEAD", "/_torpor/health")
    assert (status, body, headers["Content-Length"]) == (200, b"", "2")
    status, headers, _ = rep.request("POST", "/_torpor/health", body=b"x")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    status, headers, body = rep.request("GET", "/_torpor/other")
    assert status == 404 and json.loads(body)["error"] == "not found"


def test_start_line_names_handler_and_port(start: Start) -> None:
    rep = start(FUNCTIONS / "hello")
    assert rep.start_line.startswith(f"torpor-runtime: serving handler:handle on :{rep.port} ")


def test_explicit_port(start: Start) -> None:
    # PORT=0 is a convenience; the normal case is a port chosen by the driver.
    for _attempt in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            rep = start(FUNCTIONS / "hello", env={"PORT": str(port)})
        except BaseException:  # lost the port to another process: try another
            continue
        assert rep.port == port
        assert rep.request("GET", "/")[0] == 200
        return
    pytest.fail("could not start on an explicit free port")


def test_hello_uses_greeting_query_and_json_body(start: Start) -> None:
    rep = start(FUNCTIONS / "hello", env={"GREETING": "hey"})
    status, headers, body = rep.request("GET", "/?name=ann")
    assert (status, body) == (200, b"hey, ann!\n")
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert rep.request("POST", "/", body=b'{"name": "bo"}')[2] == b"hey, bo!\n"
    assert rep.request("GET", "/")[2] == b"hey, world!\n"
    assert rep.request("POST", "/", body=b"not json")[2] == b"hey, world!\n"


def test_head_has_length_but_no_body(start: Start) -> None:
    rep = start(FUNCTIONS / "hello", env={"GREETING": "hello"})
    with rep.socket() as sock:
        sock.sendall(
            b"HEAD /?name=x HTTP/1.1\r\nHost: t\r\n\r\nGET /?name=y HTTP/1.1\r\nHost: t\r\n\r\n"
        )
        # read the HEAD response by hand: it announces a length but carries no body
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(65536)
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"\r\nContent-Length: 10\r\n" in head + b"\r\n"
        buf[:] = rest
        status, headers, body = read_response(sock, buf)  # the pipelined GET follows directly
        assert (status, body) == (200, b"hello, y!\n")


# --------------------------------------------------------------------------- bodies


def test_echo_two_mib_body_intact(start: Start) -> None:
    rep = start(FUNCTIONS / "echo")
    payload = os.urandom(2 * 1024 * 1024)
    status, headers, body = rep.request("POST", "/upload?x=1", body=payload)
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    got = json.loads(body)
    assert got["length"] == len(payload)
    assert got["sha256"] == hashlib.sha256(payload).hexdigest()
    assert (got["method"], got["path"], got["query"]) == ("POST", "/upload", {"x": "1"})


def test_chunked_request_body(start: Start) -> None:
    rep = start(FUNCTIONS / "echo")
    parts = [os.urandom(n) for n in (1, 1000, 70000, 3)]
    conn = rep.connection()
    try:
        conn.request(
            "PUT",
            "/c",
            body=iter(parts),
            encode_chunked=True,
            headers={"Transfer-Encoding": "chunked"},
        )
        resp = conn.getresponse()
        got = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 200
    assert got["sha256"] == hashlib.sha256(b"".join(parts)).hexdigest()
    # by hand: chunk extensions, upper-case hex and trailer fields are accepted
    with rep.socket() as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: yes\r\n\r\n"
        )
        status, _, body = read_response(sock)
    assert status == 200
    assert json.loads(body)["body"] == "hello0123456789"


def test_expect_100_continue(start: Start) -> None:
    rep = start(FUNCTIONS / "echo", env={"TORPOR_MAX_BODY": "1000"})
    with rep.socket() as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            interim += sock.recv(1)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"ping")
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["body"] == "ping"
    # too large: refused at once, no 100 Continue, connection closed
    with rep.socket() as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n"
        )
        data = read_to_eof(sock)
    assert data.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in data


def test_body_over_the_limit_is_413(start: Start) -> None:
    rep = start(FUNCTIONS / "echo", env={"TORPOR_MAX_BODY": "1Ki"})
    status, headers, body = rep.request("POST", "/", body=b"x" * 1025)
    assert status == 413 and headers["Connection"] == "close"
    assert json.loads(body)["error"] == "content too large"
    with rep.socket() as sock:  # chunked bodies are counted as they arrive
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"400\r\n" + b"y" * 1024 + b"\r\n1\r\nz\r\n0\r\n\r\n"
        )
        assert read_to_eof(sock).startswith(b"HTTP/1.1 413 ")
    assert rep.request("POST", "/", body=b"x" * 1024)[0] == 200


# --------------------------------------------------------------------------- connections


def test_keep_alive_serves_two_requests_on_one_connection(start: Start) -> None:
    rep = start(FUNCTIONS / "hello", env={"GREETING": "hi"})
    conn = rep.connection()
    try:
        conn.request("GET", "/?name=a")
        first = conn.getresponse()
        assert first.read() == b"hi, a!\n"
        assert first.getheader("Connection") is None
        sock = conn.sock
        assert sock is not None
        conn.request("POST", "/", body=b'{"name": "b"}')
        second = conn.getresponse()
        assert second.read() == b"hi, b!\n"
        assert conn.sock is sock  # http.client reconnects silently: same socket = kept alive
    finally:
        conn.close()


def test_http10_closes_unless_keep_alive_asked(start: Start) -> None:
    rep = start(FUNCTIONS / "hello")
    with rep.socket() as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = read_to_eof(sock)
    assert data.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in data
    with rep.socket() as sock:
        sock.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert headers["connection"] == "keep-alive"
        sock.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert read_response(sock)[0] == 200


def test_silent_connections_are_closed_after_idle_timeout(start: Start) -> None:
    rep = start(FUNCTIONS / "hello", env={"TORPOR_IDLE_TIMEOUT": "0.3"})
    with rep.socket() as idle, rep.socket() as partial:
        partial.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")  # a head that never ends
        assert read_to_eof(idle) == b""
        assert read_to_eof(partial) == b""
    assert rep.request("GET", "/")[0] == 200


@pytest.mark.parametrize(
    "raw, status",
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /\r\n\r\n", 400),
        (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400),
        (b"GET nopath HTTP/1.1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n", 400),
        (b"GET / HTTP/1.1\r\nExpect: magic\r\n\r\n", 417),
    ],
)
def test_malformed_requests_get_an_error_and_close(start: Start, raw: bytes, status: int) -> None:
    rep = start(FUNCTIONS / "echo")
    with rep.socket() as sock:
        sock.sendall(raw)
        data = read_to_eof(sock)  # the runtime closes after the error
    assert data.startswith(f"HTTP/1.1 {status} ".encode()), data
    assert b"\r\nConnection: close\r\n" in data
    assert rep.request("GET", "/")[0] == 200  # and it keeps serving


def test_oversized_header_section_is_431(start: Start) -> None:
    rep = start(FUNCTIONS / "echo")
    with rep.socket() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n")
        assert read_to_eof(sock).startswith(b"HTTP/1.1 431 ")


def test_query_and_path_decoding(start: Start) -> None:
    rep = start(FUNCTIONS / "echo")
    _, _, body = rep.request("GET", "/a%20b/%C3%A9?a=1&a=2&b=x+y&c=%C3%A9&d&e=")
    got = json.loads(body)
    assert got["path"] == "/a b/é"
    assert got["query"] == {"a": "2", "b": "x y", "c": "é", "d": "", "e": ""}
    # absolute-form targets are accepted too
    with rep.socket() as sock:
        sock.sendall(b"GET http://example.test/p?q=1 HTTP/1.1\r\nHost: example.test\r\n\r\n")
        got = json.loads(read_response(sock)[2])
    assert (got["path"], got["query"]) == ("/p", {"q": "1"})


@pytest.mark.parametrize("qs", ["a=1&b=2", "x=%41%zz%4", "%E2%82%AC=+%2B", "a&&b=&=c", "k=%ff%fe"])
def test_query_parser_matches_urllib(qs: str) -> None:
    assert runtime.parse_query(qs) == urllib.parse.parse_qsl(qs, keep_blank_values=True)


# --------------------------------------------------------------------------- handler contract


def test_handler_exception_is_500_and_replica_keeps_serving(start: Start, kitchen: Path) -> None:
    rep = start(kitchen)
    conn = rep.connection()
    try:
        conn.request("GET", "/boom")
        resp = conn.getresponse()
        assert resp.status == 500
        assert resp.getheader("Content-Type") == "application/json"
        assert json.loads(resp.read()) == {"error": "handler raised", "detail": "ValueError: kaput"}
        conn.request("GET", "/")  # same connection
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"kitchen")
    finally:
        conn.close()
    assert rep.stderr_shows("ValueError: kaput") and "Traceback" in rep.stderr
    status, _, body = rep.request("GET", "/exit")  # even SystemExit does not stop the replica
    assert status == 500 and json.loads(body)["detail"] == "SystemExit: 7"
    assert rep.request("GET", "/")[0] == 200


def test_return_values(start: Start, kitchen: Path) -> None:
    rep = start(kitchen)
    status, headers, body = rep.request("GET", "/dict")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"ok": True, "items": [1, 2]}
    status, headers, body = rep.request("GET", "/bytes")
    assert (status, headers["Content-Type"], body) == (200, "application/octet-stream", b"\x00\x01")
    status, headers, body = rep.request("GET", "/none")
    assert (status, body) == (204, b"")
    status, headers, body = rep.request("GET", "/response")
    assert (status, body, headers["X-Thing"]) == (201, b"made", "1")
    assert headers["Content-Length"] == "4"  # the handler's own Content-Length is ignored
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    for path in ("/bad", "/badjson"):
        status, _, body = rep.request("GET", path)
        assert status == 500 and json.loads(body)["error"] == "bad handler result"
    status, _, body = rep.request("GET", "/async")  # a sync handler returning a coroutine
    assert json.loads(body) == {"via": "coroutine"}


def test_sync_handlers_run_in_threads_async_on_the_loop(start: Start, kitchen: Path) -> None:
    rep = start(kitchen)
    assert rep.request("GET", "/thread")[2].startswith(b"torpor-handler")
    # a blocked sync handler does not block the others: /release gets through meanwhile
    result: list[bytes] = []
    blocked = threading.Thread(target=lambda: result.append(rep.request("GET", "/block")[2]))
    blocked.start()
    assert rep.request("GET", "/release")[2] == b"ok"
    blocked.join(timeout=IO_TIMEOUT)
    assert result == [b"released"]
    # async handlers run on the event loop's thread
    slow = start(FUNCTIONS / "slow", env={"SLEEP_MS": "0"})
    status, headers, body = slow.request("GET", "/?status=202")
    got = json.loads(body)
    assert status == 202 and got["pid"] == slow.proc.pid and got["hostname"] == socket.gethostname()
    assert slow.request("GET", "/?fail=100")[0] == 500
    assert slow.request("GET", "/?ms=abc")[0] == 400


def test_slow_fail_rate_env(start: Start) -> None:
    rep = start(FUNCTIONS / "slow", env={"SLEEP_MS": "0", "FAIL_RATE": "1"})
    status, _, body = rep.request("GET", "/")
    assert status == 500 and json.loads(body)["failed"] is True


def test_vendored_deps_are_importable(start: Start, tmp_path: Path) -> None:
    folder = tmp_path / "fn"
    (folder / ".deps").mkdir(parents=True)
    (folder / ".deps" / "vendored_thing.py").write_text("VALUE = 'from .deps'\n")
    (folder / "main.py").write_text(
        "import os\nimport vendored_thing\n\n"
        "def handle(request):\n    return vendored_thing.VALUE + ' in ' + os.path.basename(os.getcwd())\n"
    )
    rep = start(folder, env={"TORPOR_HANDLER": "main:handle"})
    assert rep.request("GET", "/")[2] == b"from .deps in fn"


def test_stdlib_only_under_system_python(start: Start) -> None:
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    # -I -S: no site-packages at all, so any third-party import would fail here.
    rep = start(FUNCTIONS / "hello", python=python, python_args=("-I", "-S"))
    assert rep.request("GET", "/?name=deb")[2] == b"hello, deb!\n"


# --------------------------------------------------------------------------- lifecycle


def test_sigterm_lets_inflight_request_finish_then_exits_0(start: Start) -> None:
    rep = start(FUNCTIONS / "slow", env={"SLEEP_MS": "0", "TORPOR_DRAIN_TIMEOUT": "20"})
    idle = rep.socket()
    busy = rep.socket()
    try:
        for sock in (idle, busy):  # both connections accepted and kept alive
            sock.sendall(b"GET /_torpor/health HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(sock)[0] == 200
        busy.sendall(b"GET /?ms=1500 HTTP/1.1\r\nHost: t\r\n\r\n")
        threading.Event().wait(0.3)  # let the request reach the handler (not a speed assert)
        rep.proc.send_signal(signal.SIGTERM)
        assert read_to_eof(idle) == b""  # the idle keep-alive connection is closed
        status, headers, body = read_response(busy)
        assert status == 200 and json.loads(body)["slept_ms"] == 1500
        assert headers["connection"] == "close"
        assert busy.recv(1) == b""
    finally:
        idle.close()
        busy.close()
    assert rep.wait() == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", rep.port), timeout=IO_TIMEOUT).close()


def test_sigint_with_idle_connections_exits_0(start: Start) -> None:
    rep = start(FUNCTIONS / "hello")
    with rep.socket() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        read_response(sock)
        rep.proc.send_signal(signal.SIGINT)
        assert read_to_eof(sock) == b""
    assert rep.wait() == 0


def test_drain_timeout_cuts_off_and_exits_5(start: Start) -> None:
    rep = start(FUNCTIONS / "slow", env={"TORPOR_DRAIN_TIMEOUT": "0.5"})
    with rep.socket() as sock:
        sock.sendall(b"GET /?ms=60000 HTTP/1.1\r\nHost: t\r\n\r\n")
        threading.Event().wait(0.3)
        rep.proc.send_signal(signal.SIGTERM)
        assert rep.wait() == runtime.EXIT_DRAIN_TIMEOUT
    assert rep.stderr_shows("drain timeout")


def test_import_error_exits_3(tmp_path: Path) -> None:
    (tmp_path / "handler.py").write_text("raise RuntimeError('broken at import')\n")
    result = run_to_exit(tmp_path, {})
    assert result.returncode == 3
    assert "RuntimeError: broken at import" in result.stderr and "Traceback" in result.stderr
    assert result.stdout == ""  # never said it was serving


def test_missing_handler_attribute_exits_3(tmp_path: Path) -> None:
    (tmp_path / "handler.py").write_text("def other(request):\n    return 'x'\n")
    result = run_to_exit(tmp_path, {})
    assert result.returncode == 3 and "has no attribute 'handle'" in result.stderr


@pytest.mark.parametrize(
    "env",
    [
        {"PORT": ""},
        {"PORT": "http"},
        {"TORPOR_HANDLER": "nocolon"},
        {"TORPOR_DRAIN_TIMEOUT": "soon"},
        {"TORPOR_MAX_BODY": "lots"},
    ],
)
def test_bad_configuration_exits_2(env: dict[str, str]) -> None:
    result = run_to_exit(FUNCTIONS / "hello", env)
    assert result.returncode == 2 and result.stderr.startswith("torpor-runtime: ")


def test_port_in_use_exits_4(start: Start) -> None:
    rep = start(FUNCTIONS / "hello")
    result = run_to_exit(FUNCTIONS / "hello", {"PORT": str(rep.port)})
    assert result.returncode == 4 and "cannot listen" in result.stderr


def test_runtime_file_stands_alone() -> None:
    """Nothing of Torpor (or beyond the standard library) is imported by server.py."""
    source = SERVER.read_text()
    imported = set(re.findall(r"^\s*(?:import|from)\s+([\w.]+)", source, re.M))
    allowed = {
        "__future__",
        "asyncio",
        "inspect",
        "os",
        "re",
        "signal",
        "sys",
        "time",
        "traceback",
        "collections.abc",
        "typing",
        "json",
        "site",
        "importlib.util",  # loads openfaas.py beside it (TORPOR_HANDLER_STYLE=openfaas)
        "concurrent.futures",
        "threading",  # (already loaded by asyncio)
        "base64",  # the WebSocket handshake, imported on first use
        "hashlib",
    }
    assert imported <= allowed, imported - allowed
