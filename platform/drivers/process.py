"""The ``process`` driver: each replica is a local process running the function runtime.

Replicas run in their own session so they outlive a ``kill -9`` of ``torpor up``; each
writes a record (``state_dir/replicas/NAME.json``, the process driver's "labels") so a
new driver instance finds, adopts or stops them. Output goes to ``NAME.log`` beside it.

What a replica gets and what it does not (the process driver runs trusted code: it is no
sandbox). A replica's environment is exactly its own: the spec's ``env`` plus ``PORT``,
``TORPOR_*``, ``PATH``, ``LANG``, ``HOME``; nothing of the platform's environment reaches
it. The zygote is exec'd with a minimal environment (``PATH``, ``LANG``, an empty
``HOME``, ``PYTHON*`` flags), so ``/proc/self/environ`` of a forked replica (which shows
the zygote's start-up block, not ``os.environ``) and ``/proc/<zygote>/environ`` hold
nothing of it either. Each replica has a private, empty ``HOME`` and ``TMPDIR``
(``state_dir/homes/NAME``, removed when it stops), and resource limits from
:func:`replica_rlimits`. Not isolated: the user id, the file system and the network are
the platform's own.

Starting and readiness (``runtime/zygote.py``, ``zygoteclient.py``): a replica forks from
the zygote, whose spare takes the request at once; after each start the driver leases
the next spare for itself and sends the next request to it directly. The replica writes
one line back once it listens with its handler loaded, and :meth:`ProcessDriver.wait_ready`
gives that word to the controller (no probe); plain spawns and adopted replicas are
probed as before.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from torpor.drivers import pip, zygoteclient
from torpor.drivers.base import BuildError, Progress, Running, contract_env, runtime_env
from torpor.model import MiB, Revision
from torpor.runtime.fetch import launch_code

RUNTIME = Path(__file__).resolve().parent.parent / "runtime" / "server.py"
LEASE_AFTER = 0.2  # s after a start before the next spare is leased (not during the start)
ZYGOTE = RUNTIME.with_name("zygote.py")

# -- resource limits of a process replica ---------------------------------------------------
NOFILE = 4096  # open files (soft = hard)
BASE_DATA = 64 * MiB  # interpreter + runtime + stdlib imports: about 22 MiB measured, x3
DEFAULT_THREADS = 64  # the runtime's handler threads (TORPOR_THREADS)


def _thread_stack() -> int:
    """The stack glibc reserves for each new thread: RLIMIT_STACK's soft value (8 MiB on
    most systems), 32 MiB when unlimited (glibc's default on x86-64)."""
    soft = resource.getrlimit(resource.RLIMIT_STACK)[0]
    return 32 * MiB if soft == resource.RLIM_INFINITY or soft <= 0 else int(soft)


def replica_rlimits(memory: int, threads: int = DEFAULT_THREADS) -> dict[str, tuple[int, int]]:
    """The rlimits a process replica runs under: ``{"RLIMIT_X": (soft, hard)}``.

    - ``RLIMIT_DATA`` (private writable memory: heap, anonymous mmaps, thread stacks) =
      ``memory`` + ``threads`` x the thread stack + ``BASE_DATA``: an allocation beyond it
      raises ``MemoryError`` in the handler (the request gets a 500, the replica keeps
      serving). Thread stacks count in full although they are mostly untouched (64
      threads x 8 MiB = 512 MiB of the 832 MiB a 256Mi function gets), so the limit bounds
      a replica's memory rather than enforcing ``memory`` exactly. ``RLIMIT_AS`` is not
      used: 64 threads with their malloc arenas reserve about 1.5 GiB of address space
      for 18 MiB resident.
    - ``RLIMIT_NOFILE`` = 4096, ``RLIMIT_CORE`` = 0 (no core dumps of a replica's memory).
    - No ``RLIMIT_NPROC``: it counts every process of the user (the platform's too) and
      does not apply to root; no ``RLIMIT_FSIZE``: it would stop a long-lived replica's
      own log, and not bound the disk used.
    """
    limits: dict[str, tuple[int, int]] = {"RLIMIT_CORE": (0, 0)}
    hard_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = NOFILE if hard_nofile == resource.RLIM_INFINITY else min(NOFILE, int(hard_nofile))
    limits["RLIMIT_NOFILE"] = (nofile, nofile)
    if memory > 0:
        data = int(memory) + max(1, threads) * _thread_stack() + BASE_DATA
        limits["RLIMIT_DATA"] = (data, data)
    return limits


def _threads(env: dict[str, str]) -> int:
    raw = env.get("TORPOR_THREADS", "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else DEFAULT_THREADS


def _apply_rlimits(pid: int, limits: dict[str, tuple[int, int]]) -> None:
    for name, value in limits.items():
        try:
            resource.prlimit(pid, getattr(resource, name), value)
        except (OSError, ValueError):  # gone already, or a limit this system refuses
            pass


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

    def __init__(
        self,
        state_dir: Path,
        host: str = "127.0.0.1",
        python: str = sys.executable,
        zygote: bool = True,
    ) -> None:
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
        self.homes = Path(state_dir) / "homes"  # a private, empty HOME per replica
        self._reports: dict[str, zygoteclient.Report] = {}  # forked replicas' readiness reports
        self._lease: zygoteclient.Lease | None = None  # a spare of our own, for the next start
        self._leasing: asyncio.Task[None] | None = None
        self._closed = False
        self._sweep_spare_exits()

    # -- build ---------------------------------------------------------------------------
    async def prepare(self, revision: Revision, progress: Progress | None = None) -> Revision:
        if revision.spec.image:
            raise BuildError(
                f"image {revision.spec.image!r}: the process driver runs source functions only; "
                "use `torpor up --driver docker` for image functions"
            )
        if not revision.source or not Path(revision.source).is_dir():
            raise BuildError(f"source folder {revision.source!r} is missing")
        requirements = await asyncio.to_thread(pip.read_requirements, revision.source)
        if requirements:
            # The function's own code runs on the host by design, but installing its
            # dependencies still builds nothing: index names, wheels only (pip.py). Quiet:
            # pip's output shows only if it fails.
            if progress:
                progress("installing requirements.txt (wheels only)")
            await asyncio.to_thread(
                pip.install,
                requirements,
                Path(revision.source) / ".deps",
                python=self.python,
                cache_dir=self.dir.parent / "pip-cache",
            )
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
    async def start(
        self, revision: Revision, replica: str, secret_env: Mapping[str, str] | None = None
    ) -> Running:
        if not revision.source:
            raise BuildError("revision has no source folder")
        port = _free_port(self.host)
        spec = revision.spec
        home = self._home(replica)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": home,
            "TMPDIR": home,
            **spec.env,
            **(secret_env or {}),
            "PORT": str(port),
            "TORPOR_HOST": self.host,
            "TORPOR_HANDLER": spec.handler or "handler:handle",
            "TORPOR_DIR": revision.source,
            "TORPOR_FUNCTION": revision.function,
            "TORPOR_REVISION": revision.name,
            "TORPOR_REPLICA": replica,
            "TORPOR_MAX_BODY": str(
                spec.max_body
            ),  # the runtime takes what the gateway lets through
            **runtime_env(revision),
            **contract_env(revision),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        }
        limits = replica_rlimits(spec.resources.memory, _threads(env))
        log_path = self.dir / f"{replica}.log"
        (self.dir / f"{replica}.exit").unlink(missing_ok=True)
        pid = None
        exit_path = self.dir / f"{replica}.exit"
        if self.use_zygote:
            forked = await self._spawn_forked(replica, revision.source, env, log_path, limits, port)
            if forked is not None:
                pid, exit_path = forked
        if pid is None:
            pid = self._spawn(revision.source, env, log_path, limits)
        record = {
            "replica": replica,
            "function": revision.function,
            "revision": revision.name,
            "pid": pid,
            "start_time": _proc_start_time(pid),
            "endpoint": f"{self.host}:{port}",
            "started": time.time(),
            "exit": exit_path.name,  # where the zygote writes its exit code
        }
        tmp = self.dir / f".{replica}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.dir / f"{replica}.json")
        report = self._reports.get(replica)
        if report is not None:
            report.pid, report.start_time = pid, record["start_time"]  # type: ignore[assignment]
        return self._running(record)

    async def wait_ready(self, running: Running, timeout: float) -> bool | None:
        """The replica's own word (see :class:`~torpor.drivers.base.ReportsReadiness`): a
        replica forked from the zygote reports the moment it listens with its handler
        loaded, so the controller learns it without a probe's round trips. True once it
        has reported and still runs; False while it has not (waits up to ``timeout`` s), or
        once it has died; None when there is nothing to wait for (a plain spawn, a replica
        adopted from an earlier run, or a connection that closed without the report): the
        controller then probes the endpoint, as before."""
        rep = self._reports.get(running.replica)
        if rep is None:
            return None
        if not await rep.wait(timeout):
            return False
        if rep.result is None:
            return None
        return rep.start_time is not None and _proc_start_time(rep.pid) == rep.start_time

    def _home(self, replica: str) -> str:
        """A fresh, empty, private directory for the replica's HOME and TMPDIR."""
        home = self.homes / replica
        shutil.rmtree(home, ignore_errors=True)
        self.homes.mkdir(mode=0o700, parents=True, exist_ok=True)
        home.mkdir(mode=0o700)
        return str(home)

    def _zygote_env(self) -> dict[str, str]:
        """The zygote's whole environment: nothing of the platform's (its token, store
        URL, cloud keys...), since every forked replica's ``/proc/self/environ`` is this."""
        home = self.homes / ".zygote"
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOME": str(home),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        }

    def _spawn(
        self, cwd: str, env: dict[str, str], log_path: Path, limits: dict[str, tuple[int, int]]
    ) -> int:
        """A plain start of the runtime (``server.py`` as ``torpor_runtime``) with exactly ``env``; rlimits are set with
        prlimit(2) as soon as it is exec'd, before the runtime imports the handler
        (not preexec_fn: it can deadlock in a process with threads)."""
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                [self.python, "-s", "-c", launch_code(str(RUNTIME))],
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
        _apply_rlimits(proc.pid, limits)
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
                    env=self._zygote_env(),
                    cwd=str(self.homes / ".zygote"),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            finally:
                log.close()
            for _ in range(500):  # ~5 s
                if self._zygote_sock.exists():
                    self._lease_later(LEASE_AFTER)
                    return True
                if self._zygote.poll() is not None:
                    break
                await asyncio.sleep(0.01)
            self.use_zygote = False  # fall back to plain spawns for good
            return False

    async def _spawn_forked(
        self,
        replica: str,
        cwd: str,
        env: dict[str, str],
        log_path: Path,
        limits: dict[str, tuple[int, int]],
        port: int,
    ) -> tuple[int, Path] | None:
        """Fork the replica from the zygote -> (pid, its exit code file); None if the
        zygote is unavailable. The replica's readiness report is read from the same line
        (``self._reports``). The spare leased ahead takes the request directly if there is
        one (no zygote on the way); else the zygote forks (or hands over its own spare)."""
        if not await self._ensure_zygote():
            return None
        req = {
            "replica": replica,
            "cwd": cwd,
            "env": env,
            "log": str(log_path),
            "exit": str(self.dir / f"{replica}.exit"),
            "limits": limits,
            "report": True,
        }
        rep, exit_path = None, self.dir / f"{replica}.exit"
        lease, self._lease = self._lease, None
        zygote = self._zygote.pid if self._zygote is not None else 0
        if lease is not None:
            if (
                lease.zygote == zygote
                and lease.start_time is not None
                and _proc_start_time(lease.pid) == lease.start_time
            ):
                rep = await zygoteclient.start_on(lease, req, port)
                exit_path = Path(lease.exit)
            else:  # the spare died while leased, or its zygote did (no one to reap it)
                lease.sock.close()
                Path(lease.exit).unlink(missing_ok=True)
        if rep is None:
            exit_path = self.dir / f"{replica}.exit"
            rep = await zygoteclient.fork(str(self._zygote_sock), req, port)
        self._lease_later(LEASE_AFTER)
        if rep is None:
            return None
        self._drop_report(replica)
        self._reports[replica] = rep
        return rep.pid, exit_path

    def _lease_later(self, delay: float) -> None:
        """Lease the next spare in ``delay`` s (not during the start that used the last)."""
        if self._closed or self._lease is not None or (self._leasing and not self._leasing.done()):
            return

        async def lease() -> None:
            await asyncio.sleep(delay)
            if self._closed or not await self._ensure_zygote():
                return
            exit_path = self.dir / f".spare-{secrets.token_hex(6)}.exit"
            got = await zygoteclient.lease(str(self._zygote_sock), str(exit_path))
            if got is None:
                return
            got.start_time = _proc_start_time(got.pid)
            got.zygote = self._zygote.pid if self._zygote is not None else 0
            if self._closed or self._lease is not None:
                got.sock.close()
                return
            self._lease = got

        self._leasing = asyncio.create_task(lease(), name="zygote-lease")

    def _drop_report(self, replica: str) -> None:
        rep = self._reports.pop(replica, None)
        if rep is not None:
            rep.close()

    def _running(self, data: dict[str, object]) -> Running:
        alive = self._alive(data)
        code = None
        child = self._children.get(int(data["pid"]))  # type: ignore[call-overload]
        if child is not None and not alive:
            code = child.poll()
        elif not alive:
            try:
                code = int(self._exit_file(data).read_text())
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

    def _sweep_spare_exits(self) -> None:
        """Remove exit files of spares leased by an earlier run and never used."""
        used = set()
        for rec in self.dir.glob("*.json"):
            try:
                used.add(str(json.loads(rec.read_text()).get("exit") or ""))
            except (OSError, ValueError, AttributeError):
                continue
        for path in self.dir.glob(".spare-*.exit"):
            if path.name not in used:
                path.unlink(missing_ok=True)

    def _exit_file(self, data: Mapping[str, object]) -> Path:
        """Where the zygote writes the replica's exit code (a leased spare's own name)."""
        name = str(data.get("exit") or "")
        if not name or "/" in name or name.startswith(".."):
            name = f"{data['replica']}.exit"
        return self.dir / name

    def _forget(self, replica: str) -> None:
        self._drop_report(replica)
        try:
            (self._exit_file(json.loads((self.dir / f"{replica}.json").read_text()))).unlink(
                missing_ok=True
            )
        except (OSError, ValueError, KeyError):
            pass
        (self.dir / f"{replica}.json").unlink(missing_ok=True)
        (self.dir / f"{replica}.exit").unlink(missing_ok=True)
        shutil.rmtree(self.homes / replica, ignore_errors=True)

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

    async def logs(
        self, running: Running, follow: bool = False, tail: int = 200
    ) -> AsyncIterator[str]:
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
        self._closed = True
        if self._leasing is not None:
            self._leasing.cancel()
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.sock.close()  # the spare ends
        for replica in list(self._reports):
            self._drop_report(replica)
        for child in self._children.values():
            child.poll()
        if self._zygote is not None and self._zygote.poll() is None:
            self._zygote.terminate()
            try:
                await asyncio.to_thread(self._zygote.wait, 5)
            except subprocess.TimeoutExpired:
                self._zygote.kill()
        self._zygote_sock.unlink(missing_ok=True)
        if lease is not None:
            Path(lease.exit).unlink(missing_ok=True)
