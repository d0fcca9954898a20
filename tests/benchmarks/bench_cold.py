"""Cold and paused starts: request at zero -> first byte, against the bare start of the
same function on the same driver, same run.

    python tests/benchmarks/bench_cold.py [--runs 20] [--drivers process,docker] [--no-paused]

Cold (per driver): ``torpor up --driver D``, functions/hello deployed with ``idle: 1s``.
Each sample forces zero with ``torpor scale hello --replicas 0`` (waits until the
replica is gone, for docker also from ``docker ps``), releases it with ``--min 0 --max 5``
(the hold 2.2 s and the release 3 s after the last request: see ``hold_then_release``
in _common.py for why), checks that nothing came back, then times one ``GET`` through the gateway from
``connect`` to the first response byte (``X-Torpor-Cold-Start: true`` checked). Interleaved
with it, the bare start of the same function:

- process: ``python -s platform/runtime/server.py`` (the interpreter ``torpor up`` uses)
  with PORT/TORPOR_DIR/TORPOR_HANDLER, polled (0.5 ms) until the first 200; and the
  floor, a fork of a warmed zygote of this tree outside the platform -> the first 200
  (``process_floors.py``);
- docker: ``docker run -d -e PORT=8080 -p 127.0.0.1:PORT:8080 IMAGE`` of the revision's
  built image (from ``GET /v1/functions/hello``), the run call included, polled until the
  first 200 (the host port is chosen up front, so no ``docker port`` call is timed); and,
  for reference, the same through the Docker SDK (create + start, as the driver does).

"ready" is when the controller's event "... ready at ..." was written (from the request's
start): the rest of the cold time is the gateway noticing the replica and proxying.

Paused (per driver): ``torpor up --pause-idle 300``, ``idle: 1s``: wait for the "paused"
event, then time the wake request (first byte); the replica must be the paused one
("unpaused" event), not a new start. Baseline, interleaved: the same function started
bare and kept, frozen and thawed by hand (SIGSTOP/SIGCONT of its process group, or
``docker pause``/``unpause`` through the SDK), thaw -> first 200.

Docker also times, interleaved, the floor of waking a container: the same image started
bare and kept, ``docker unpause`` (SDK) -> first 200; each Docker figure is printed next
to both floors. With the warm pool (``TORPOR_DOCKER_POOL``, default 10) a Docker cold
start specialises a waiting container instead of running one. The process driver's floor
is a fork of a warmed zygote -> 200, timed the same way.

Targets: cold p50 <= 1.5x the bare start on the same driver (docker with the pool:
<= 0.25x the bare ``docker run``; process: <= 0.10x the bare spawn, issue 18); paused
p50 <= 30 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (
    DOMAIN,
    ROOT,
    Torpor,
    free_port,
    function_copy,
    header,
    hold_then_release,
    loadavg,
    platform,
    poll_200,
    stats_ms,
    ttfb,
)
from process_floors import ZygoteFloor

SERVER = ROOT / "platform" / "runtime" / "server.py"
TARGET_COLD = 1.5
TARGET_PROCESS_COLD = 0.10  # process cold p50 / bare spawn p50 (issue 18)
TARGET_DOCKER_POOL = 0.25  # docker, pool on: cold p50 / bare docker run p50
TARGET_PAUSED_MS = 30.0
PATH = "/?name=bench"


def events_since(t: Torpor, name: str, since: float) -> list[dict[str, Any]]:
    r = t.api_call(
        "GET", f"/v1/functions/{name}/events", params={"since": since, "limit": 200}, timeout=10
    )
    r.raise_for_status()
    return list(r.json()["events"])


def event_time(
    t: Torpor, name: str, since: float, needle: str, timeout: float = 10.0
) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [e["time"] for e in events_since(t, name, since) if needle in e["message"]]
        if hits:
            return float(min(hits))
        time.sleep(0.05)
    return None


def gateway_request(t: Torpor, name: str) -> tuple[float, float, dict[str, str]]:
    """-> (wall time at start, seconds to first byte, response headers)."""
    wall = time.time()
    first, _all, status, headers, body = ttfb(t.port, PATH, host=f"{name}.{DOMAIN}")
    if status != 200:
        raise RuntimeError(f"{name}: status {status}: {body[:200]!r}")
    return wall, first, headers


# ---------------------------------------------------------------------------
# Bare starts.


def bare_process(folder: Path) -> float:
    port = free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "GREETING": "hello",
        "PORT": str(port),
        "TORPOR_HOST": "127.0.0.1",
        "TORPOR_DIR": str(folder),
        "TORPOR_HANDLER": "handler:handle",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-s", str(SERVER)],
        cwd=folder,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        return poll_200(port, PATH, t0, lambda: proc.poll() is None)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def bare_docker_run(image: str, path: str = PATH) -> float:
    port = free_port()
    t0 = time.perf_counter()
    out = subprocess.run(
        [
            "docker",
            "run",
            "-d",
            "-e",
            "PORT=8080",
            "-e",
            "GREETING=hello",
            "-p",
            f"127.0.0.1:{port}:8080",
            image,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    cid = out.stdout.strip()
    try:
        if out.returncode != 0:
            raise RuntimeError(f"docker run failed: {out.stderr.strip()}")
        return poll_200(port, path, t0, lambda: True)
    finally:
        if cid:
            subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=60)


def bare_docker_sdk(client: Any, image: str) -> float:
    port = free_port()
    t0 = time.perf_counter()
    c = client.containers.create(
        image,
        environment={"PORT": "8080", "GREETING": "hello"},
        ports={"8080/tcp": ("127.0.0.1", port)},
    )
    try:
        c.start()
        return poll_200(port, PATH, t0, lambda: True)
    finally:
        c.remove(force=True)


def docker_gone(name: str) -> bool:
    """No container of ``name`` runs: none labelled with it, and no pooled replica (a pool
    member keeps its ``torpor.pool`` labels and is named ``torpor-REPLICA``)."""
    out = subprocess.run(
        [
            "docker",
            "ps",
            "-q",
            "--filter",
            f"label=torpor.function={name}",
            "--filter",
            "label=torpor.managed=true",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    pooled = subprocess.run(
        ["docker", "ps", "--filter", "label=torpor.pool", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.split()
    mine = re.compile(rf"torpor-{re.escape(name)}-\d{{5}}-[0-9a-f]{{6}}")
    return not out.strip() and not any(mine.fullmatch(n) for n in pooled)


# ---------------------------------------------------------------------------
# Runs.


def run_cold(tmp: Path, driver: str, runs: int) -> dict[str, list[float]]:
    name = "hello"
    folder = function_copy(tmp, "hello", name=name, scale={"idle": "1s"})
    out: dict[str, list[float]] = {
        "cold": [],
        "ready": [],
        "bare": [],
        "sdk": [],
        "unpause": [],
        "flaps": [],
    }
    with platform(tmp, driver, label=f"cold-{driver}") as t:
        t.deploy(folder)
        image = t.function(name)["revisions"][-1]["image"]
        client = None
        floor: Any = None  # the floor of the same run: docker unpause -> 200, or a zygote fork
        if driver == "docker":
            import docker

            client = docker.from_env()
            bare_docker_run(image)  # warm the engine's caches, like the platform's deploy did
            floor = BarePaused(driver, folder, image)
        else:
            bare_process(folder)
            floor = ZygoteFloor()
        last = time.monotonic()
        try:
            for i in range(runs):
                flaps = hold_then_release(t, name, 5, last_request=last)
                if flaps:
                    out["flaps"].append(float(flaps))
                    print(
                        f"   {driver} {i + 1:2d}/{runs}: a replica came back after the release with no "
                        f"traffic ({flaps}x); waited for zero again"
                    )
                if driver == "docker":
                    t.wait_for(lambda: docker_gone(name), 30, "containers gone")
                wall, first, headers = gateway_request(t, name)
                last = time.monotonic()
                if headers.get("x-torpor-cold-start") != "true":
                    raise RuntimeError(f"sample {i}: not a cold start: {headers}")
                out["cold"].append(first)
                ready = event_time(t, name, wall, " ready at ")
                if ready is not None:
                    out["ready"].append(ready - wall)
                if driver == "process":
                    out["bare"].append(bare_process(folder))
                    out.setdefault("fork", []).append(floor.fork(folder, PATH))
                else:
                    out["bare"].append(bare_docker_run(image))
                    out["sdk"].append(bare_docker_sdk(client, image))
                    assert floor is not None
                    out["unpause"].append(floor.wake())
                print(
                    f"   {driver} {i + 1:2d}/{runs}: cold {first * 1000:7.1f} ms  "
                    f"bare {out['bare'][-1] * 1000:7.1f} ms"
                    + (f"  sdk {out['sdk'][-1] * 1000:7.1f} ms" if out["sdk"] else "")
                    + (f"  fork floor {out['fork'][-1] * 1000:6.1f} ms" if out.get("fork") else "")
                    + (f"  unpause {out['unpause'][-1] * 1000:6.1f} ms" if out["unpause"] else ""),
                    flush=True,
                )
        finally:
            if floor is not None:
                floor.close()
            if client is not None:
                client.close()
            if driver == "docker":
                t.cli("delete", name, check=False)
    return out


class BarePaused:
    """The same function started bare and kept; ``wake()`` freezes it (SIGSTOP of its
    process group / ``docker pause``), then times thaw (SIGCONT / ``docker unpause`` through
    the SDK) -> first 200."""

    def __init__(self, driver: str, folder: Path, image: str | None, path: str = PATH) -> None:
        self.driver = driver
        self.path = path
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.container: Any = None
        self.client: Any = None
        if driver == "process":
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "LANG": "C.UTF-8",
                "GREETING": "hello",
                "PORT": str(self.port),
                "TORPOR_HOST": "127.0.0.1",
                "TORPOR_DIR": str(folder),
                "TORPOR_HANDLER": "handler:handle",
            }
            self.proc = subprocess.Popen(
                [sys.executable, "-s", str(SERVER)],
                cwd=folder,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        else:
            import docker

            self.client = docker.from_env()
            self.container = self.client.containers.create(
                image,
                environment={"PORT": "8080", "GREETING": "hello"},
                ports={"8080/tcp": ("127.0.0.1", self.port)},
                # the image's torpor.* labels would make it a replica to the platform's
                # orphan sweep (which stops it), and a container of the function to docker_gone
                labels={"torpor.managed": "bench"},
            )
            self.container.start()
        poll_200(self.port, self.path, time.perf_counter(), lambda: True)

    def wake(self) -> float:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGSTOP)
            time.sleep(0.2)
            t0 = time.perf_counter()
            os.killpg(self.proc.pid, signal.SIGCONT)
        else:
            self.container.pause()
            time.sleep(0.2)
            t0 = time.perf_counter()
            self.container.unpause()
        return poll_200(self.port, self.path, t0, lambda: True)

    def close(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.container is not None:
            with contextlib.suppress(Exception):
                self.container.remove(force=True)
            self.client.close()


def run_paused(tmp: Path, driver: str, runs: int) -> dict[str, list[float]]:
    name = "hello"
    folder = function_copy(tmp, "hello", name=name, scale={"idle": "1s"})
    out: dict[str, list[float]] = {"wake": [], "unpaused": [], "not_woken": [], "bare": []}
    with platform(tmp, driver, extra=["--pause-idle", "300"], label=f"paused-{driver}") as t:
        t.deploy(folder)
        bare = BarePaused(driver, folder, t.function(name)["revisions"][-1]["image"])
        try:
            wall, _, _ = gateway_request(t, name)  # traffic, then idle -> paused
            for i in range(runs):
                if event_time(t, name, wall, " paused (scaled to zero", timeout=60) is None:
                    raise RuntimeError(f"{name}: no pause event within 60 s")
                t.wait_for(lambda: not t.function(name)["replicas"], 30, "no replica in rotation")
                time.sleep(0.2)
                wall, first, headers = gateway_request(t, name)
                unpaused = event_time(t, name, wall, " unpaused, ready at ")
                if unpaused is not None:
                    out["wake"].append(first)
                    out["unpaused"].append(unpaused - wall)
                else:
                    out["not_woken"].append(first)
                out["bare"].append(bare.wake())
                print(
                    f"   {driver} paused {i + 1:2d}/{runs}: wake {first * 1000:7.1f} ms  "
                    f"bare thaw {out['bare'][-1] * 1000:6.1f} ms"
                    + ("" if unpaused is not None else "  (NOT an unpause: a new start)"),
                    flush=True,
                )
        finally:
            bare.close()
            if driver == "docker":
                t.cli("delete", name, check=False)
    return out


def line(label: str, samples: list[float]) -> str:
    if not samples:
        return f"   {label:44s} (no samples)"
    s = stats_ms(samples)
    return f"   {label:44s} {s['p50']:8.1f} {s['p90']:8.1f} {s['min']:8.1f} {s['max']:8.1f} {s['n']:4.0f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--drivers", default="process,docker")
    ap.add_argument("--no-paused", action="store_true")
    args = ap.parse_args()
    drivers = [d for d in args.drivers.split(",") if d]
    header(
        f"cold start: request at zero -> first byte, {args.runs} samples each, interleaved with the bare start"
    )
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-cold-"))
    cold: dict[str, dict[str, list[float]]] = {}
    paused: dict[str, dict[str, list[float]]] = {}
    try:
        for d in drivers:
            cold[d] = run_cold(tmp, d, args.runs)
        if not args.no_paused:
            for d in drivers:
                paused[d] = run_paused(tmp, d, args.runs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"   {'':44s} {'p50 ms':>8} {'p90 ms':>8} {'min':>8} {'max':>8} {'n':>4}")
    for d, s in cold.items():
        print(line(f"{d}: torpor cold (first byte)", s["cold"]))
        print(line(f"{d}:   of which until 'ready' event", s["ready"]))
        bare = "python -s server.py" if d == "process" else "docker run -d (CLI)"
        print(line(f"{d}: bare {bare}", s["bare"]))
        if s["sdk"]:
            print(line(f"{d}: bare SDK create+start", s["sdk"]))
        if s.get("fork"):
            print(line(f"{d}: floor: fork from zygote -> 200", s["fork"]))
        if s["unpause"]:
            print(line(f"{d}: floor: docker unpause -> 200", s["unpause"]))
    for d, s in cold.items():
        if s["flaps"]:
            print(
                f"   {d}: {len(s['flaps'])} of {len(s['cold'])} releases brought a replica back without traffic "
                "(see hold_then_release in _common.py)"
            )
    for d, s in paused.items():
        print(line(f"{d}: paused wake (first byte)", s["wake"]))
        print(line(f"{d}:   of which until 'unpaused' event", s["unpaused"]))
        thaw = "SIGSTOP/SIGCONT" if d == "process" else "SDK pause/unpause"
        print(line(f"{d}: bare thaw ({thaw}) -> 200", s["bare"]))
        if s["not_woken"]:
            print(line(f"{d}: NOT woken (new start instead)", s["not_woken"]))
    print()
    for d, s in cold.items():
        c, b = stats_ms(s["cold"])["p50"], stats_ms(s["bare"])["p50"]
        extra = ""
        if s["sdk"]:
            extra = f"   (cold/SDK create+start {c / stats_ms(s['sdk'])['p50']:.2f}x)"
        print(
            f"   {d}: cold p50 / bare p50 = {c / b:.2f}x (target <= {TARGET_COLD}x: "
            f"{'met' if c / b <= TARGET_COLD else 'MISSED'}){extra}"
        )
        if s.get("fork"):
            f = stats_ms(s["fork"])["p50"]
            print(
                f"   {d}: cold p50 {c:.1f} ms = {c / b:.3f}x bare spawn (issue 18 target <= "
                f"{TARGET_PROCESS_COLD:.2f}x: {'met' if c / b <= TARGET_PROCESS_COLD else 'MISSED'}); "
                f"fork floor p50 {f:.1f} ms ({c / f:.2f}x the floor, +{c - f:.1f} ms)"
            )
        if s["unpause"]:  # docker with its warm pool (TORPOR_DOCKER_POOL, default 10)
            u = stats_ms(s["unpause"])["p50"]
            print(
                f"   {d}: cold p50 {c:.1f} ms = {c / b:.2f}x bare docker run {b:.1f} ms "
                f"(pool target <= {TARGET_DOCKER_POOL}x: "
                f"{'met' if c / b <= TARGET_DOCKER_POOL else 'MISSED'}), "
                f"{c / u:.1f}x the docker unpause floor {u:.1f} ms"
            )
    for d, s in paused.items():
        if s["wake"]:
            p = stats_ms(s["wake"])["p50"]
            ratio = f", {p / stats_ms(cold[d]['bare'])['p50']:.2f}x bare start" if d in cold else ""
            ratio += f", {p / stats_ms(s['bare'])['p50']:.2f}x bare thaw"
            print(
                f"   {d}: paused wake p50 = {p:.1f} ms (target <= {TARGET_PAUSED_MS:g} ms: "
                f"{'met' if p <= TARGET_PAUSED_MS else 'MISSED'}){ratio}"
            )
    print(f"   load average at the end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
