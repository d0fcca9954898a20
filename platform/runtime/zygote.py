"""A fork server for the process driver: imports the runtime (and asyncio) once, then
forks a replica per request, so a cold start skips the interpreter start and the
imports (~3-12 ms to ready instead of ~50-80 ms).

Standard library only, like server.py beside it. Run as ``python3 zygote.py SOCKET``.
Protocol: one JSON line per connection on the Unix socket
``{"replica", "cwd", "env", "log", "exit", "limits"}`` -> ``{"pid": N}`` (or
``{"error": ...}``); ``limits`` is ``{"RLIMIT_X": [soft, hard]}``, set in the child
right after the fork, before the runtime imports the handler.

The driver starts the zygote with a minimal environment: a forked child's
``/proc/self/environ`` is the zygote's start-up block whatever ``os.environ`` says, so
that block must hold nothing a replica may not read. The child's ``os.environ`` is then
exactly the requested ``env``.

The zygote reaps its children and writes each exit code to the ``exit`` path, so the
driver can report why a replica died. Children run in their own session: they outlive
the zygote (and ``torpor up``), and are adopted by the next run like any replica.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import server  # noqa: E402  (the runtime, and asyncio with it)

_children: dict[int, str] = {}  # pid -> exit-code file


def _warm() -> None:
    """Import now what the runtime would import on its first request."""
    import asyncio
    import concurrent.futures.thread  # noqa: F401
    import inspect  # noqa: F401

    loop = asyncio.new_event_loop()  # selectors, the default policy
    loop.close()
    asyncio.set_event_loop(None)


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


def _child(req: dict[str, object], t0: float) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    log = os.open(str(req["log"]), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    _limit(req.get("limits"))
    env = req["env"]
    assert isinstance(env, dict)
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in env.items()})
    os.chdir(str(req["cwd"]))
    code = 1
    try:
        code = server.main(t0)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(path: str) -> None:
    _warm()
    signal.signal(signal.SIGCHLD, _reap)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(64)
    print(f"torpor-zygote: ready on {path}", flush=True)
    parent = os.getppid()
    listener.settimeout(1.0)
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if os.getppid() != parent:  # the driver died (kill -9): don't linger
                return
            continue
        conn.settimeout(None)
        with conn:
            try:
                line = conn.makefile("rb").readline()
                req = json.loads(line)
            except (OSError, ValueError) as e:
                conn.sendall(json.dumps({"error": f"bad request: {e}"}).encode() + b"\n")
                continue
            t0 = time.perf_counter()
            sys.stdout.flush()
            sys.stderr.flush()
            # no reaping between fork and bookkeeping: a child that dies at once keeps its code
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
            pid = os.fork()
            if pid == 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                listener.close()
                conn.close()
                _child(req, t0)
            _children[pid] = str(req["exit"])
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            try:
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            except OSError:
                pass


if __name__ == "__main__":
    serve(sys.argv[1])
