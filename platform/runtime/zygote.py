"""A fork server for the process driver: imports the runtime (and asyncio) once, then
forks a replica per request, so a cold start skips the interpreter start and the
imports (a few ms to ready instead of ~50-80 ms).

Standard library only, like server.py beside it. Run as ``python3 zygote.py SOCKET``.
Protocol: one JSON line per connection on the Unix socket
``{"replica", "cwd", "env", "log", "exit", "limits", "report"}`` -> ``{"pid": N}`` (or
``{"error": ...}``); ``limits`` is ``{"RLIMIT_X": [soft, hard]}``, set in the child
right after the fork, before the runtime imports the handler.

Readiness report (``"report": true``): after the pid line the connection stays open,
held by the child alone (the zygote closes its copy). The child writes
``{"ready": PORT, "t": MONOTONIC}`` once it listens with its handler loaded, the moment it
can answer, and closes it. The connection closing without that line means the child
exited (or closed it) first: no word, the driver probes instead. The report is the
function's own word, as an answer to a probe is: its code runs in the child and could
fake either.

The spare: the zygote keeps one child forked ahead, waiting on a socket pair, so that a
request finds its process already there (the fork, ~1-2 ms of copying page tables, is
off the request's path). The zygote sends the spare's pid, then hands the spare the
request and the report connection (``SCM_RIGHTS``), and forks the next spare once no
request has come for ``REFILL_AFTER`` seconds (a burst is forked directly, as without a
spare). Until its request the spare holds nothing of any function: the zygote's own
environment block, no cwd of a function, no limits; it exits when the zygote goes away.

Warm-up, before the zygote listens: it serves a few requests through the runtime itself
(a built-in handler on loopback, its threads joined after), so the code on a replica's
way to its first answer has run once in memory every child shares; and a survey child
run the same way tells which pages that writes, so that each spare breaks copy-on-write
on those ahead (``MADV_POPULATE_WRITE``), not on the request's path.

The driver starts the zygote with a minimal environment: a forked child's
``/proc/self/environ`` is the zygote's start-up block whatever ``os.environ`` says, so
that block must hold nothing a replica may not read. The child's ``os.environ`` is then
exactly the requested ``env``.

The zygote reaps its children and writes each exit code to the ``exit`` path, so the
driver can report why a replica died. Children run in their own session: they outlive
the zygote (and ``torpor up``), and are adopted by the next run like any replica.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fetch import load_runtime  # noqa: E402

# the runtime (and asyncio with it), under its one import name, torpor_runtime
server: Any = load_runtime(os.path.join(os.path.dirname(os.path.abspath(__file__)), "server.py"))

REFILL_AFTER = 0.05  # s without a request before the next spare is forked
MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in writable (COW broken) without writing
MAX_REQUEST = 16 * 1024 * 1024  # bytes of one request (env, paths); the driver sends far less

_children: dict[int, str] = {}  # pid -> exit-code file ("" for the spare: nothing to write)
_spare: tuple[int, socket.socket] | None = None  # (pid, the zygote's end of its socket pair)
_hot: list[tuple[int, int]] = []  # (address, length): memory a replica's start writes to


def _warm() -> None:
    """Import now what the runtime would import on its first request."""
    import asyncio
    import concurrent.futures.thread  # noqa: F401
    import inspect  # noqa: F401

    loop = asyncio.new_event_loop()  # selectors, the default policy
    loop.close()
    asyncio.set_event_loop(None)
    global _hot
    try:
        _warm_requests()
        _hot = _written_by(_warm_requests)  # what a child's way to its first answer writes
    except Exception as e:  # noqa: BLE001 - a colder zygote still forks replicas
        print(f"torpor-zygote: warm-up failed: {e!r}", file=sys.stderr, flush=True)
    asyncio.set_event_loop(None)


def _written_by(run: Callable[[], None]) -> list[tuple[int, int]]:
    """The memory ``run()`` writes to in a fresh child: a survey child is forked, runs it,
    and reports the pages it then holds exclusively (``/proc/self/pagemap`` bit 56: copied
    on write, or new), as ``(address, length)`` ranges. Empty if anything fails."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            run()
            with os.fdopen(w, "wb") as f:
                f.write(json.dumps(_own_pages()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read(MAX_REQUEST)
    os.waitpid(pid, 0)
    try:
        return [(int(a), int(n)) for a, n in json.loads(data)] if data else []
    except (ValueError, TypeError):
        return []


def _own_pages() -> list[tuple[int, int]]:
    """Ranges of this process's private writable mappings whose pages are present and
    mapped by this process alone."""
    page = resource.getpagesize()
    out: list[tuple[int, int]] = []
    with open("/proc/self/maps") as maps, open("/proc/self/pagemap", "rb") as pagemap:
        for line in maps:
            fields = line.split()
            if len(fields) < 2 or not fields[1].startswith("rw") or fields[1][3:4] != "p":
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            pagemap.seek(lo // page * 8)
            entries = memoryview(pagemap.read((hi - lo) // page * 8)).cast("Q")
            start = -1
            for i, e in enumerate(entries):
                if e >> 63 and (e >> 56) & 1:  # present, exclusively mapped
                    if start < 0:
                        start = i
                elif start >= 0:
                    out.append((lo + start * page, (i - start) * page))
                    start = -1
            if start >= 0:
                out.append((lo + start * page, (len(entries) - start) * page))
    return out


def _prefault(ranges: list[tuple[int, int]]) -> None:
    """Break copy-on-write ahead (the spare, before its request) on the memory a start
    writes to (:func:`_written_by`): each page a child writes first costs it a fault and
    a copy, hundreds of them on the way to its first answer, about half the start's time.
    Only those pages (what a replica makes its own in its first requests anyway), not the
    whole zygote. Nothing where madvise lacks MADV_POPULATE_WRITE (before Linux 5.14) or
    ctypes is missing."""
    if not ranges:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
    except (ImportError, OSError, AttributeError):
        return
    for addr, length in ranges:
        if madvise(addr, length, MADV_POPULATE_WRITE) != 0 and ctypes.get_errno() == 22:
            return  # EINVAL: this kernel has no MADV_POPULATE_WRITE


WARM_REQUESTS = (
    b"GET /?name=warm HTTP/1.1\r\nHost: torpor-warm\r\nConnection: close\r\n\r\n",
    b"POST /json HTTP/1.1\r\nHost: torpor-warm\r\nContent-Type: application/json\r\n"
    b'Content-Length: 16\r\nConnection: close\r\n\r\n{"name": "warm"}',
)


def _warm_handler(request: Any) -> object:
    if request.body:
        return {"hello": request.json().get("name")}
    return f"hello, {request.query.get('name')}!\n"


def _warm_requests() -> None:
    """Serve a few requests through the runtime itself, here, before any fork: the code a
    replica runs on its way to its first answer (the listener, accept, parsing, the handler
    thread, rendering) has then run once in the zygote, its bytecode specialised and its
    lazy imports done in memory every child shares, instead of again in each child.
    Loopback, an ephemeral port, a built-in handler; no listener, loop or thread is left
    (the handler threads are joined: the zygote forks single-threaded)."""
    import asyncio
    import contextlib
    import io
    import threading

    cfg = server.load_config(
        {
            "PORT": "0",
            "TORPOR_HOST": "127.0.0.1",
            "TORPOR_DIR": os.getcwd(),
            "TORPOR_THREADS": "2",
            "TORPOR_DRAIN_TIMEOUT": "2",  # bounds the warm-up if something hangs
        }
    )

    async def client(port: int) -> None:
        try:
            for raw in WARM_REQUESTS:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(raw)
                await asyncio.wait_for(reader.read(), 5)
                writer.close()
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # the runtime's own drain, then it returns

    tasks = []

    def listening(port: int) -> None:
        tasks.append(asyncio.get_running_loop().create_task(client(port)))

    with contextlib.redirect_stdout(io.StringIO()):
        server.run(cfg, _warm_handler, None, None, listening)
    for t in threading.enumerate():
        if t is not threading.main_thread():
            t.join(5)
    if threading.active_count() > 1:
        raise RuntimeError("handler threads still running")


def _reap(signum: int = 0, frame: object = None) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        path = _children.pop(pid, None)
        if path:
            tmp = f"{path}.tmp"
            try:
                with open(tmp, "w") as f:
                    f.write(str(os.waitstatus_to_exitcode(status)))
                os.replace(tmp, path)
            except OSError:
                pass


def _limit(limits: object) -> None:
    if not isinstance(limits, dict):
        return
    for name, value in limits.items():
        which = getattr(resource, str(name), None) if str(name).startswith("RLIMIT_") else None
        if which is None:
            continue
        try:
            soft, hard = value
            resource.setrlimit(which, (int(soft), int(hard)))
        except (OSError, ValueError, TypeError) as e:
            print(f"torpor-zygote: {name}={value!r} not set: {e}", file=sys.stderr, flush=True)


def _detach() -> None:
    """What every child does first, before it knows its function: default SIGCHLD, its own
    session (the driver signals the process group), stdin from /dev/null."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)


def _reporter(conn: socket.socket | None) -> Callable[[int], None] | None:
    """``on_listening`` for the runtime: one ready line on the report connection, then
    close it (the handler's code keeps no way to write on it)."""
    if conn is None:
        return None

    def report(port: int) -> None:
        try:
            conn.sendall(json.dumps({"ready": port, "t": time.monotonic()}).encode() + b"\n")
        except OSError:
            pass
        finally:
            conn.close()

    return report


def _child(req: dict[str, object], t0: float, conn: socket.socket | None) -> None:
    """Become the replica ``req`` asks for (after :func:`_detach`); never returns."""
    code = 1
    try:
        log = os.open(str(req["log"]), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        _limit(req.get("limits"))
        env = req["env"]
        assert isinstance(env, dict)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in env.items()})
        os.chdir(str(req["cwd"]))
        report = _reporter(conn if req.get("report") is True else None)
        if report is None and conn is not None:
            conn.close()
        code = server.main(t0, report)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _spare_main(sock: socket.socket) -> None:
    """The spare's life: wait for its request, the JSON line ``{"t0", "req"}``, then become
    that replica. From the zygote the line comes after a NUL byte carrying the report
    connection's fd; from a driver that leased the spare, alone, and the report goes back
    on this same socket. EOF first: the zygote (or the lease) is gone, exit."""
    code = 0
    try:
        _detach()
        _prefault(_hot)
        msg, fds, _flags, _addr = socket.recv_fds(sock, 65536, 1)
        if not msg:
            os._exit(0)
        conn = socket.socket(fileno=fds[0]) if fds else sock
        buf = msg[1:] if fds and msg[:1] == b"\0" else msg
        while b"\n" not in buf and len(buf) <= MAX_REQUEST:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
        if conn is not sock:
            sock.close()
        payload = json.loads(buf.partition(b"\n")[0])
        _child(payload["req"], float(payload["t0"]), conn)
    except SystemExit:  # SIGTERM while waiting
        code = 0
    except BaseException as e:  # noqa: BLE001 - a spare must never return into the zygote's loop
        print(f"torpor-zygote: spare failed: {e!r}", file=sys.stderr, flush=True)
        code = 1
    os._exit(code)


def _fork_spare(listener: socket.socket, conn: socket.socket | None = None) -> None:
    """Fork the spare; it keeps none of the zygote's sockets (``conn``: a request's
    connection open meanwhile) but its own end of the pair."""
    global _spare
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        pid = os.fork()
        if pid == 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            listener.close()
            ours.close()
            if conn is not None:
                conn.close()
            _spare_main(theirs)
        _children[pid] = ""
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    theirs.close()
    _spare = (pid, ours)


def _refill(listener: socket.socket, conn: socket.socket | None = None) -> None:
    """Fork the next spare; a failed fork (no memory, a process limit) only means the next
    requests fork directly."""
    try:
        _fork_spare(listener, conn)
    except OSError as e:
        print(f"torpor-zygote: no spare: {e}", file=sys.stderr, flush=True)


def _drop_spare() -> None:
    global _spare
    if _spare is not None:
        _spare[1].close()  # the spare reads EOF and exits
        _spare = None


def _take_spare(exit_path: str) -> tuple[int, socket.socket] | None:
    """The spare for a request, if it is alive (a dead one is reaped here) -> (pid, its
    socket), its exit code now going to ``exit_path``; None: fork instead. Called with
    SIGCHLD blocked, so an exit right after is still written to ``exit_path``."""
    global _spare
    spare, _spare = _spare, None
    if spare is None:
        return None
    pid, sock = spare
    try:
        done = os.waitpid(pid, os.WNOHANG)[0]
    except ChildProcessError:  # reaped already
        done = pid
    if done == pid:
        _children.pop(pid, None)
        sock.close()
        return None
    _children[pid] = exit_path
    return pid, sock


def _hand_over(sock: socket.socket, req: dict[str, object], t0: float, conn: socket.socket) -> None:
    """Give the spare its request and the report connection (its pid was sent already, so
    the driver goes on while the spare starts). A spare that died meanwhile gets nothing:
    the connection closes without a report, and the exit code file says it died."""
    try:
        socket.send_fds(sock, [b"\0"], [conn.fileno()])
        sock.sendall(json.dumps({"t0": t0, "req": req}).encode() + b"\n")
    except OSError as e:
        print(f"torpor-zygote: the spare is gone: {e}", file=sys.stderr, flush=True)
    finally:
        sock.close()


def _lease(conn: socket.socket, exit_path: str, listener: socket.socket) -> None:
    """Give the driver a spare of its own: ``{"pid": N}`` with the spare's socket attached
    (``SCM_RIGHTS``); the driver then sends the request to the spare itself, and reads the
    report from it, with no zygote on the cold start's path. Its exit code goes to
    ``exit_path``. No spare at hand: one is forked now."""
    if _spare is None:
        _refill(listener, conn)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        taken = _take_spare(exit_path)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    try:
        if taken is None:
            conn.sendall(json.dumps({"error": "no spare"}).encode() + b"\n")
            return
        socket.send_fds(conn, [json.dumps({"pid": taken[0]}).encode() + b"\n"], [taken[1].fileno()])
    except OSError:
        pass
    finally:
        if taken is not None:
            taken[1].close()  # the driver's copy is the spare's line now (or it is gone: EOF)


def _fork_child(
    req: dict[str, object], t0: float, conn: socket.socket, listener: socket.socket
) -> int:
    """Fork ``req``'s replica directly (no spare at hand). Called with SIGCHLD blocked."""
    pid = os.fork()
    if pid == 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        listener.close()
        _drop_spare()
        try:
            _detach()
        except BaseException:  # noqa: BLE001
            os._exit(1)
        _child(req, t0, conn)
    _children[pid] = str(req["exit"])
    return pid


def serve(path: str, spare: bool = True) -> None:
    _warm()
    gc.collect()
    gc.freeze()  # what is imported stays shared with the children: no collection touches it
    signal.signal(signal.SIGCHLD, _reap)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(64)
    if spare:
        _refill(listener)
    print(f"torpor-zygote: ready on {path}", flush=True)
    parent = os.getppid()
    while True:
        listener.settimeout(REFILL_AFTER if spare and _spare is None else 1.0)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if os.getppid() != parent:  # the driver died (kill -9): don't linger
                _drop_spare()
                return
            if spare and _spare is None:
                _refill(listener)
            continue
        conn.settimeout(None)
        with conn:
            try:
                line = conn.makefile("rb").readline(MAX_REQUEST)
                req = json.loads(line)
                fields = ("exit",) if req.get("lease") is True else ("cwd", "env", "log", "exit")
                if not isinstance(req, dict) or not all(k in req for k in fields):
                    raise ValueError("not a request")
            except (OSError, ValueError, AttributeError) as e:
                conn.sendall(json.dumps({"error": f"bad request: {e}"}).encode() + b"\n")
                continue
            if req.get("lease") is True:
                _lease(conn, str(req["exit"]), listener)
                continue
            t0 = time.perf_counter()
            sys.stdout.flush()
            sys.stderr.flush()
            # no reaping between fork and bookkeeping: a child that dies at once keeps its code
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
            try:
                taken = _take_spare(str(req["exit"]))
                pid = taken[0] if taken else _fork_child(req, t0, conn, listener)
            except OSError as e:  # fork failed: the driver spawns plainly (or reports it)
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"error": f"fork: {e}"}).encode() + b"\n")
                continue
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            try:  # the pid first: the driver's bookkeeping overlaps the replica's start
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            except OSError:
                pass
            if taken is not None:
                _hand_over(taken[1], req, t0, conn)


if __name__ == "__main__":
    serve(sys.argv[1])
