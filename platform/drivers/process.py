"""The ``process`` driver: each replica is a local process running the function runtime.

Replicas run in their own session so they outlive a ``kill -9`` of ``torpor up``; each
writes a record (``state_dir/replicas/NAME.json``, the process driver's "labels") so a
new driver instance finds, adopts or stops them. Output goes to ``NAME.log`` beside it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from torpor.drivers.base import BuildError, Progress, Running
from torpor.model import Revision

RUNTIME = Path(__file__).resolve().parent.parent / "runtime" / "server.py"
ZYGOTE = RUNTIME.with_name("zygote.py")


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _proc_start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (field 22 of /proc/PID/stat), None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return fields[19]


class ProcessDriver:
    name = "process"

    def __init__(self, state_dir: Path, host: str = "127.0.0.1", python: str = sys.executable,
                 zygote: bool = True) -> None:
        self.dir = Path(state_dir) / "replicas"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.python = python
        self.use_zygote = zygote
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._zygote: subprocess.Popen[bytes] | None = None
        self._zygote_lock = asyncio.Lock()
        # short path: AF_UNIX paths are limited to ~107 bytes
        self._zygote_sock = Path("/tmp") / f"torpor-zygote-{os.getpid()}-{id(self):x}.sock"

    # -- build ---------------------------------------------------------------------------
    async def prepare(self, revision: Revision, progress: Progress | None = None) -> Revision:
        if revision.spec.image:
            raise BuildError(
                f"image {revision.spec.image!r}: the process driver runs source functions only; "
                "use `torpor up --driver docker` for image functions"
            )
        if not revision.source or not Path(revision.source).is_dir():
            raise BuildError(f"source folder {revision.source!r} is missing")
        req = Path(revision.source) / "requirements.txt"
        if req.is_file() and req.read_text().strip():
            deps = Path(revision.source) / ".deps"
            cmd = [self.python, "-m", "pip", "install", "--quiet", "--target", str(deps), "-r", str(req)]
            if progress:
                progress("installing requirements.txt")
            proc = await asyncio.create_subprocess_exec(
                *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            out, _ = await proc.communicate()
            if proc.returncode != 0:
                tail = "\n".join(out.decode(errors="replace").strip().splitlines()[-5:])
                raise BuildError(f"pip install -r requirements.txt failed: {tail}")
        return revision

    async def remove(self, revision: Revision) -> None:
        for rec in self.dir.glob("*.json"):
            try:
                data = json.loads(rec.read_text())
            except (OSError, ValueError):
                continue
            if data.get("revision") == revision.name and not self._alive(data):
                self._forget(data["replica"])
        for log in self.dir.glob(f"{revision.name}-*.log"):
            log.unlink(missing_ok=True)

    # -- replicas ------------------------------------------------------------------------
    async def start(self, revision: Revision, replica: str) -> Running:
        if not revision.source:
            raise BuildError("revision has no source folder")
        port = _free_port(self.host)
        spec = revision.spec
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            **spec.env,
            "PORT": str(port),
            "TORPOR_HOST": self.host,
            "TORPOR_HANDLER": spec.handler or "handler:handle",
            "TORPOR_DIR": revision.source,
            "TORPOR_FUNCTION": revision.function,
            "TORPOR_REVISION": revision.name,
            "TORPOR_REPLICA": replica,
            "TORPOR_MAX_BODY": str(spec.max_body),  # the runtime takes what the gateway lets through
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        log_path = self.dir / f"{replica}.log"
        (self.dir / f"{replica}.exit").unlink(missing_ok=True)
        pid = await self._spawn_forked(replica, revision.source, env, log_path) if self.use_zygote else None
        if pid is None:
            pid = self._spawn(revision.source, env, log_path)
        record = {
            "replica": replica,
            "function": revision.function,
            "revision": revision.name,
            "pid": pid,
            "start_time": _proc_start_time(pid),
            "endpoint": f"{self.host}:{port}",
            "started": time.time(),
        }
        tmp = self.dir / f".{replica}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.dir / f"{replica}.json")
        return self._running(record)

    def _spawn(self, cwd: str, env: dict[str, str], log_path: Path) -> int:
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                [self.python, "-s", str(RUNTIME)],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            log.close()
        self._children[proc.pid] = proc
        return proc.pid

    async def _ensure_zygote(self) -> bool:
        async with self._zygote_lock:
            if self._zygote is not None and self._zygote.poll() is None:
                return True
            self._zygote_sock.unlink(missing_ok=True)
            log = open(self.dir.parent / "zygote.log", "ab")  # noqa: SIM115
            try:
                self._zygote = subprocess.Popen(
                    [self.python, "-s", str(ZYGOTE), str(self._zygote_sock)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True,
                )
            finally:
                log.close()
            for _ in range(500):  # ~5 s
                if self._zygote_sock.exists():
                    return True
                if self._zygote.poll() is not None:
                    break
                await asyncio.sleep(0.01)
            self.use_zygote = False  # fall back to plain spawns for good
            return False

    async def _spawn_forked(self, replica: str, cwd: str, env: dict[str, str], log_path: Path) -> int | None:
        """Fork the replica from the zygote; None if the zygote is unavailable."""
        if not await self._ensure_zygote():
            return None
        req = {"replica": replica, "cwd": cwd, "env": env, "log": str(log_path),
               "exit": str(self.dir / f"{replica}.exit")}
        try:
            reader, writer = await asyncio.open_unix_connection(str(self._zygote_sock))
            writer.write(json.dumps(req).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            reply = json.loads(line)
            return int(reply["pid"])
        except (OSError, ValueError, KeyError, TimeoutError):
            return None

    def _running(self, data: dict[str, object]) -> Running:
        alive = self._alive(data)
        code = None
        child = self._children.get(int(data["pid"]))  # type: ignore[call-overload]
        if child is not None and not alive:
            code = child.poll()
        elif not alive:
            try:
                code = int((self.dir / f"{data['replica']}.exit").read_text())
            except (OSError, ValueError):
                code = None
        labels = {
            "torpor.function": str(data["function"]),
            "torpor.revision": str(data["revision"]),
            "torpor.replica": str(data["replica"]),
        }
        return Running(
            replica=str(data["replica"]),
            function=str(data["function"]),
            revision=str(data["revision"]),
            driver_id=str(data["pid"]),
            endpoint=str(data["endpoint"]),
            alive=alive,
            exit_code=code,
            labels=labels,
        )

    def _alive(self, data: dict[str, object]) -> bool:
        pid = int(data["pid"])  # type: ignore[call-overload]
        child = self._children.get(pid)
        if child is not None and child.poll() is not None:
            return False
        start = _proc_start_time(pid)
        return start is not None and start == data.get("start_time")

    def _forget(self, replica: str) -> None:
        (self.dir / f"{replica}.json").unlink(missing_ok=True)
        (self.dir / f"{replica}.exit").unlink(missing_ok=True)

    async def list(self) -> list[Running]:
        out = []
        for rec in sorted(self.dir.glob("*.json")):
            try:
                data = json.loads(rec.read_text())
            except (OSError, ValueError):
                continue
            out.append(self._running(data))
        return out

    async def stop(self, running: Running, grace: float = 10.0) -> None:
        pid = int(running.driver_id)
        path = self.dir / f"{running.replica}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {"pid": pid, "start_time": None}
        if self._alive(data):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + grace
            while self._alive(data) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if self._alive(data):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        child = self._children.pop(pid, None)
        if child is not None:
            try:
                await asyncio.to_thread(child.wait, 5)
            except subprocess.TimeoutExpired:
                pass
        self._forget(running.replica)

    async def pause(self, running: Running) -> None:
        """SIGSTOP the replica's process group: no CPU, memory kept."""
        try:
            os.killpg(int(running.driver_id), signal.SIGSTOP)
        except (ProcessLookupError, PermissionError):
            pass

    async def unpause(self, running: Running) -> None:
        try:
            os.killpg(int(running.driver_id), signal.SIGCONT)
        except (ProcessLookupError, PermissionError):
            pass

    async def logs(self, running: Running, follow: bool = False, tail: int = 200) -> AsyncIterator[str]:
        path = self.dir / f"{running.replica}.log"
        if not path.exists():
            return
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()[-tail:] if tail else []
            for line in lines:
                yield line
            if not follow:
                return
            buf = b""
            while True:
                chunk = f.read()
                if chunk:
                    buf += chunk
                    *done, buf = buf.split(b"\n")
                    for line_b in done:
                        yield line_b.decode(errors="replace")
                    continue
                if not (self.dir / f"{running.replica}.json").exists():
                    return
                await asyncio.sleep(0.2)

    async def close(self) -> None:
        for child in self._children.values():
            child.poll()
        if self._zygote is not None and self._zygote.poll() is None:
            self._zygote.terminate()
            try:
                await asyncio.to_thread(self._zygote.wait, 5)
            except subprocess.TimeoutExpired:
                self._zygote.kill()
        self._zygote_sock.unlink(missing_ok=True)
