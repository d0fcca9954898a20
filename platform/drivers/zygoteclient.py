"""The process driver's side of the zygote protocol (``runtime/zygote.py``): ask for a
fork, read the child's pid, then wait for the child's readiness report on the same
connection; or, ahead of any cold start, lease a spare and later send it the request
directly (no zygote on the cold start's path), reading its report from it.

Built on the event loop's raw socket calls rather than streams: a cold start waits on
this twice (the pid, then the report), and each stream layer adds a turn of the loop
between the bytes arriving and the waiter running. The report is read by a reader
callback that wakes the waiters itself.

What the report is worth: the child writes ``{"ready": PORT, "t": ...}`` once it listens
with its handler loaded. Only a line naming the replica's own port counts as ready;
anything else (another port, garbage, a line past ``LINE_LIMIT``, the connection closing
first) resolves the report as "no word" (None), and the controller probes instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

LINE_LIMIT = 64 * 1024  # bytes a reply line may take


def ready_line(line: bytes, port: int) -> bool:
    """Whether ``line`` is the report ``{"ready": port, ...}`` for ``port``."""
    try:
        msg = json.loads(line)
    except ValueError:
        return False
    return isinstance(msg, dict) and type(msg.get("ready")) is int and msg["ready"] == port


class Report:
    """One forked replica's readiness report: ``result`` is True (it reported for its
    port), None (no word: the connection ended otherwise), once ``done``."""

    def __init__(self, port: int, sock: socket.socket) -> None:
        self.port = port
        self.pid = 0
        self.start_time: str | None = None  # the process's start time (pid reuse check)
        self.done = False
        self.result: bool | None = None
        self._sock: socket.socket | None = sock
        self._buf = b""
        self._waiters: list[asyncio.Future[None]] = []
        self._loop = asyncio.get_running_loop()
        self._reading = False

    def feed(self, data: bytes) -> None:
        """Bytes read after the pid line."""
        self._buf += data
        line, sep, _rest = self._buf.partition(b"\n")
        if sep:
            self.finish(True if ready_line(line, self.port) else None)
        elif len(self._buf) > LINE_LIMIT:
            self.finish(None)

    def listen(self) -> None:
        """Read the rest from the loop (a reader callback) until the report or EOF."""
        if self.done or self._sock is None:
            return
        self._loop.add_reader(self._sock.fileno(), self._readable)
        self._reading = True

    def _readable(self) -> None:
        assert self._sock is not None
        try:
            chunk = self._sock.recv(LINE_LIMIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self.finish(None)
        else:
            self.feed(chunk)

    def finish(self, result: bool | None) -> None:
        """Resolve the report (once), wake the waiters, close the connection."""
        if self.done:
            return
        self.done, self.result = True, result
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self.close()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._reading:
            try:
                self._loop.remove_reader(sock.fileno())
            except (ValueError, RuntimeError):  # the loop is closed already
                pass
        sock.close()
        if not self.done:
            self.finish(None)

    async def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the report -> whether it is done."""
        if self.done:
            return True
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(fut)
        timer = self._loop.call_later(max(0.0, timeout), _resolve, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._waiters.remove(fut)
        return self.done


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def fork(
    path: str, request: dict[str, Any], port: int, timeout: float = 5.0
) -> Report | None:
    """Send ``request`` to the zygote on ``path`` -> the child's :class:`Report` (its
    ``pid`` set, reading the rest), or None if the zygote did not answer with a pid
    within ``timeout`` s (the caller spawns plainly instead)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    report: Report | None = None
    try:
        sock.connect(path)  # a Unix socket connects at once, or refuses (EAGAIN: backlog full)
        await loop.sock_sendall(sock, json.dumps(request).encode() + b"\n")
        report = Report(port, sock)
        buf = b""
        pid = None
        early: bool | None = None  # a report that came before the pid line (from a spare)
        async with asyncio.timeout(timeout):
            while pid is None:
                line, sep, rest = buf.partition(b"\n")
                if not sep:
                    if len(buf) > LINE_LIMIT:
                        raise ValueError("reply line too long")
                    chunk = await loop.sock_recv(sock, LINE_LIMIT)
                    if not chunk:
                        raise ConnectionError("the zygote closed the connection")
                    buf += chunk
                    continue
                buf = rest
                try:
                    reply = json.loads(line)
                except ValueError:
                    reply = None
                if isinstance(reply, dict) and ("pid" in reply or "error" in reply):
                    pid = int(reply["pid"])  # KeyError: the zygote refused
                else:  # the child's line (a spare can report before the zygote's pid line)
                    early = ready_line(line, port)
    except (OSError, ValueError, KeyError, TypeError, TimeoutError):
        if report is not None:
            report.close()
        else:
            sock.close()
        return None
    report.pid = pid
    if early is not None:
        report.finish(True if early else None)
    elif buf:
        report.feed(buf)
    report.listen()
    return report


@dataclass
class Lease:
    """A spare replica process the zygote handed this driver: ``sock`` is its line (the
    request goes out on it, the report comes back on it); its exit code is written to
    ``exit``. Closing ``sock`` unused ends the spare."""

    pid: int
    sock: socket.socket
    exit: str
    start_time: str | None = None  # the process's start time (pid reuse check), set by the caller
    zygote: int = 0  # pid of the zygote it came from (its exit code is that zygote's to write)


def _lease_blocking(path: str, exit_path: str, timeout: float) -> Lease | None:
    fds: list[int] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps({"lease": True, "exit": exit_path}).encode() + b"\n")
            msg, fds, _flags, _addr = socket.recv_fds(s, LINE_LIMIT, 1)
            reply = json.loads(msg.partition(b"\n")[0])
            pid = int(reply["pid"])
            if len(fds) != 1:
                raise ValueError("no spare attached")
            sock = socket.socket(fileno=fds.pop())
            sock.setblocking(False)
            return Lease(pid, sock, exit_path)
    except (OSError, ValueError, KeyError, TypeError):
        for fd in fds:
            os.close(fd)
        return None


async def lease(path: str, exit_path: str, timeout: float = 5.0) -> Lease | None:
    """Ask the zygote on ``path`` for a spare of this driver's own (in a thread: it is
    asked ahead of any cold start, off its path) -> the :class:`Lease`, or None."""
    return await asyncio.to_thread(_lease_blocking, path, exit_path, timeout)


async def start_on(lease: Lease, request: dict[str, Any], port: int) -> Report | None:
    """Send ``request`` to the leased spare itself -> its :class:`Report` (the pid known
    already, reading the report from the same socket), or None if the spare is gone
    (the caller forks through the zygote instead)."""
    loop = asyncio.get_running_loop()
    payload = {"t0": time.perf_counter(), "req": request}
    try:
        await loop.sock_sendall(lease.sock, json.dumps(payload).encode() + b"\n")
    except OSError:
        lease.sock.close()
        return None
    report = Report(port, lease.sock)
    report.pid = lease.pid
    report.listen()
    return report
