"""``torpor invoke NAME --ws``: an interactive WebSocket through the gateway.

Standard library only (sockets and a thread), with the runtime's RFC 6455 framing.
Each line read from stdin is sent as a text message; each message received is written
to stdout on its own line (a binary one as ``<N bytes: HEX...>``). At the end of stdin
the client waits until the socket has been quiet for ``QUIET`` seconds (replies still
on their way), then closes with 1000. Pings are answered.
"""

from __future__ import annotations

import base64
import os
import socket
import sys
import threading
import time
from typing import BinaryIO, TextIO
from urllib.parse import urlsplit

from torpor.runtime.server import ws_accept, ws_frame, ws_mask

QUIET = 1.0
MAX_MESSAGE = 64 * 1024 * 1024
_TEXT, _BINARY, _CLOSE, _PING, _PONG = 1, 2, 8, 9, 10


class WsError(Exception):
    pass


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.lock = threading.Lock()
        self.last = time.monotonic()  # when a message last came
        self.closed: tuple[int, str] | None = None

    def _need(self, n: int) -> None:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise WsError("connection closed without a close frame")
            self.buf += data

    def send(self, opcode: int, payload: bytes) -> None:
        with self.lock:
            self.sock.sendall(ws_frame(opcode, payload, mask=os.urandom(4)))

    def frame(self) -> tuple[bool, int, bytes]:
        self._need(2)
        b0, b1 = self.buf[0], self.buf[1]
        n, pos = b1 & 0x7F, 2
        if n == 126:
            self._need(4)
            n, pos = int.from_bytes(self.buf[2:4], "big"), 4
        elif n == 127:
            self._need(10)
            n, pos = int.from_bytes(self.buf[2:10], "big"), 10
        if n > MAX_MESSAGE:
            raise WsError(f"frame of {n} bytes is over {MAX_MESSAGE}")
        masked = bool(b1 & 0x80)
        end = pos + (4 if masked else 0) + n
        self._need(end)
        payload = bytes(self.buf[end - n : end])
        if masked:
            payload = ws_mask(payload, bytes(self.buf[pos : pos + 4]))
        del self.buf[:end]
        return bool(b0 & 0x80), b0 & 0x0F, payload


def handshake(sock: socket.socket, host: str, path: str) -> bytes:
    """Send the upgrade request; -> bytes read after the 101 head. Raises WsError."""
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode("latin-1")
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise WsError("connection closed during the handshake")
        buf += data
        if len(buf) > 65536:
            raise WsError("response head too large")
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(" ", 2)
    if len(status) < 2 or status[1] != "101":
        body = rest.decode("utf-8", "replace").strip()
        raise WsError(f"HTTP {status[1] if len(status) > 1 else '?'}: {body[:300]}")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if headers.get("sec-websocket-accept") != ws_accept(key):
        raise WsError("bad Sec-WebSocket-Accept in the 101 response")
    return rest


def _reader(conn: _Conn, out: TextIO) -> None:
    parts: list[bytes] = []
    kind = 0
    try:
        while True:
            fin, opcode, payload = conn.frame()
            if opcode == _PING:
                conn.send(_PONG, payload)
                continue
            if opcode == _PONG:
                continue
            if opcode == _CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                conn.closed = (code, payload[2:].decode("utf-8", "replace"))
                try:
                    conn.send(_CLOSE, payload[:2])
                except OSError:
                    pass
                return
            if opcode in (_TEXT, _BINARY):
                kind = opcode
            parts.append(payload)
            if fin:
                data = b"".join(parts)
                parts = []
                conn.last = time.monotonic()
                if kind == _TEXT:
                    out.write(data.decode("utf-8", "replace") + "\n")
                else:
                    out.write(
                        f"<{len(data)} bytes: {data[:32].hex()}{'...' if len(data) > 32 else ''}>\n"
                    )
                out.flush()
    except (WsError, OSError) as exc:
        if conn.closed is None:
            conn.closed = (1006, str(exc))


def run(
    url: str, host: str, path: str, timeout: float, stdin: BinaryIO, out: TextIO, err: TextIO
) -> int:
    """Open the socket, pump stdin to it and it to ``out``; -> exit code."""
    u = urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise WsError(f"--gateway {url!r}: expected http://HOST[:PORT]")
    sock = socket.create_connection((u.hostname, u.port or 80), timeout=timeout)
    try:
        rest = handshake(sock, host, path)
        sock.settimeout(None)
        conn = _Conn(sock)
        conn.buf += rest
        reader = threading.Thread(target=_reader, args=(conn, out), daemon=True)
        reader.start()
        for line in stdin:
            if conn.closed is not None:
                break
            conn.send(_TEXT, line.rstrip(b"\r\n"))
        deadline = time.monotonic() + timeout
        while (
            conn.closed is None
            and time.monotonic() < deadline
            and time.monotonic() - conn.last < QUIET
        ):
            time.sleep(0.05)
        if conn.closed is None:
            conn.send(_CLOSE, (1000).to_bytes(2, "big"))
            reader.join(min(timeout, 5.0))
        code, reason = conn.closed or (1006, "no close frame")
        err.write(f"closed: {code}{' ' + reason if reason else ''}\n")
        return 0 if code in (1000, 1001, 1005) else 1
    finally:
        sock.close()


def main(url: str, host: str, path: str, timeout: float) -> int:
    try:
        return run(url, host, path, timeout, sys.stdin.buffer, sys.stdout, sys.stderr)
    except (WsError, OSError) as exc:
        print(f"invoke --ws: {exc}", file=sys.stderr)
        return 1
