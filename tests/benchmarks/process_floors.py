"""The floors of a process driver cold start, measured beside the platform's figures in
the same run (a library for bench_cold.py and bench_burst.py, not a benchmark):

- ``bare_spawn``: ``python -s platform/runtime/server.py`` -> the first 200 (polled every
  0.5 ms), what a replica costs without a zygote;
- ``ZygoteFloor.fork``: a zygote of this tree (``platform/runtime/zygote.py``, started
  with the driver's minimal environment and warmed once) asked for a fork, -> the first
  200 (polled the same way): what the platform's cold start can at best approach, with
  no gateway, bus, controller or store on the way.

Both time from just before the start (the spawn, the fork request) to the end of the
first 200 response, with ``GET path``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, free_port, poll_200

SERVER = ROOT / "platform" / "runtime" / "server.py"
ZYGOTE = ROOT / "platform" / "runtime" / "zygote.py"


def _env(folder: Path, port: int, extra: dict[str, str] | None) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        **(extra or {}),
        "PORT": str(port),
        "TORPOR_HOST": "127.0.0.1",
        "TORPOR_DIR": str(folder),
        "TORPOR_HANDLER": "handler:handle",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }


def bare_spawn(folder: Path, path: str, env: dict[str, str] | None = None) -> float:
    """Seconds from spawning ``python -s server.py`` to its first 200 on ``path``."""
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-s", str(SERVER)],
        cwd=folder,
        env=_env(folder, port, env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        return poll_200(port, path, t0, lambda: proc.poll() is None)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class ZygoteFloor:
    """A zygote of this tree, outside any platform; ``fork()`` times one replica from it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="torpor-floor-"))
        self.sock = str(self.dir / "z.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-s", str(ZYGOTE), self.sock],
            cwd=self.dir,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "LANG": "C.UTF-8",
                "HOME": str(self.dir),
                "PYTHONDONTWRITEBYTECODE": "1",
                "PYTHONUNBUFFERED": "1",
            },
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the floor's zygote did not start")
            time.sleep(0.01)
        self.n = 0

    def fork(
        self, folder: Path, path: str, env: dict[str, str] | None = None, settle: float = 0.3
    ) -> float:
        """Seconds from the fork request to the replica's first 200 on ``path``. Waits
        ``settle`` s first, as a platform's zygote is idle between cold starts."""
        time.sleep(settle)
        self.n += 1
        port = free_port()
        req = {
            "replica": f"floor-{self.n}",
            "cwd": str(folder),
            "env": _env(folder, port, {"HOME": str(self.dir), **(env or {})}),
            "log": str(self.dir / f"floor-{self.n}.log"),
            "exit": str(self.dir / f"floor-{self.n}.exit"),
            "limits": {},
        }
        t0 = time.perf_counter()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(self.sock)
            s.sendall(json.dumps(req).encode() + b"\n")
            pid = int(json.loads(s.makefile("rb").readline())["pid"])
        try:
            return poll_200(port, path, t0, lambda: True)
        finally:
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
