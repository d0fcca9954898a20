"""Helpers shared by the ``bench_*.py`` scripts (a library, not a benchmark or a test).

Reuses ``tests/platform_proc.py`` (a real ``torpor up`` subprocess), ``proxy_bench.py``
(nginx config, wrk output parsing, process CPU time) and adds what the platform
benchmarks need on top: wrk with a Host header, nginx in front of a replica, time to
first byte of one request, RSS, docker clean-up and a py-spy summary.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent
ROOT = TESTS.parent
for _p in (str(TESTS), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from helpers import free_port  # noqa: E402
from platform_proc import DOMAIN, Torpor, function_copy  # noqa: E402
from proxy_bench import NGINX_CONF, cpu_seconds, nginx_worker, parse_wrk, started  # noqa: E402

__all__ = [
    "DOMAIN",
    "ROOT",
    "Torpor",
    "function_copy",
    "free_port",
    "cpu_seconds",
    "header",
    "wrk",
    "nginx_proxy",
    "ttfb",
    "poll_200",
    "rss_kb",
    "descendants",
    "pct",
    "stats_ms",
    "platform",
    "set_scale",
    "hold_then_release",
    "docker_cleanup",
    "py_spy_top",
    "replica_pid",
    "loadavg",
    "cmdline",
    "median",
    "stop_pid",
]


def header(title: str) -> None:
    print(f"== {title}")
    print(
        f"   commit {commit()}, {os.cpu_count()} cpus, load average {loadavg()} "
        "(other work on this machine adds noise)",
        flush=True,
    )


def commit() -> str:
    """The checked-out commit, with "+changes" if gateway/ or platform/ differ from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "gateway", "platform"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+changes" if dirty else "") if head else "unknown"


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------------------
# Statistics.


def pct(values: list[float], q: float) -> float:
    """q-th percentile (0..100), linear interpolation; nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats_ms(seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {"p50": pct(ms, 50), "p90": pct(ms, 90), "min": min(ms), "max": max(ms), "n": len(ms)}


# ---------------------------------------------------------------------------
# Load: wrk and nginx.


def wrk(
    url: str,
    *,
    connections: int,
    duration: float,
    host: str | None = None,
    threads: int = 2,
    timeout: float = 10.0,
    pids: list[int] | None = None,
    quiet: bool = False,
) -> dict[str, float]:
    """``wrk -tT -cC -dD --latency`` -> rps, requests, p50/p99 (ms), non_2xx, socket_errors,
    and cpu_us: CPU microseconds per request of each of ``pids`` (key ``cpu_us_<pid>``)."""
    cmd = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration:g}s",
        "--latency",
        "--timeout",
        f"{timeout:g}s",
    ]
    if host:
        cmd += ["-H", f"Host: {host}"]
    cpu0 = {p: cpu_seconds(p) for p in pids or []}
    out = subprocess.run(
        [*cmd, url], check=True, capture_output=True, text=True, timeout=duration + timeout + 30
    ).stdout
    cpu1 = {p: cpu_seconds(p) for p in pids or []}
    if quiet:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            r = parse_wrk(out)
    else:
        r = parse_wrk(out)
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    r["non_2xx"] = float(m.group(1)) if m else 0.0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    r["socket_errors"] = float(sum(int(x) for x in m.groups())) if m else 0.0
    for p in pids or []:
        a, b = cpu0[p], cpu1[p]
        if a is not None and b is not None and r["requests"]:
            r[f"cpu_us_{p}"] = (b - a) * 1e6 / r["requests"]
    return r


@contextlib.contextmanager
def nginx_proxy(endpoint: str) -> Iterator[tuple[int, int]]:
    """nginx (1 worker, ``keepalive 64`` upstream, HTTP/1.1, ``Connection ""``) in front of
    ``endpoint`` (127.0.0.1:PORT) -> (listen port, worker pid). Stopped on exit."""
    host, _, port = endpoint.rpartition(":")
    if host not in ("127.0.0.1", "localhost"):
        raise ValueError(f"nginx_proxy: loopback endpoints only, got {endpoint}")
    tmp = tempfile.mkdtemp(prefix="torpor-bench-nginx-")
    try:
        listen = free_port()
        conf = os.path.join(tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(tmp=tmp, upstream=int(port), port=listen))
        with started(["nginx", "-c", conf, "-p", tmp], listen, stderr=subprocess.DEVNULL) as ng:
            yield listen, nginx_worker(ng.pid)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# One request, timed.


def ttfb(
    port: int,
    path: str = "/",
    host: str = "localhost",
    timeout: float = 60.0,
) -> tuple[float, float, int, dict[str, str], bytes]:
    """One ``GET`` on a new connection to 127.0.0.1:port -> (seconds to the first response
    byte, seconds to the whole response, status, headers (lowercase), body). The clock
    starts before ``connect``."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        first = s.recv(65536)
        t_first = time.perf_counter() - t0
        if not first:
            raise ConnectionError("connection closed without a response")
        chunks = [first]
        while True:
            c = s.recv(65536)
            if not c:
                break
            chunks.append(c)
    t_all = time.perf_counter() - t0
    data = b"".join(chunks)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return t_first, t_all, status, headers, body


def poll_200(
    port: int,
    path: str,
    t0: float,
    alive: Callable[[], bool],
    limit: float = 30.0,
    every: float = 0.0005,
) -> float:
    """Poll ``GET path`` on 127.0.0.1:port until a 200 -> seconds since ``t0``
    (perf_counter). Refused/reset connections (also docker-proxy's accept-then-reset) retry."""
    deadline = t0 + limit
    while time.perf_counter() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=limit)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                return time.perf_counter() - t0
        except (OSError, http.client.HTTPException):
            if not alive():
                raise RuntimeError("the server exited before answering") from None
        finally:
            conn.close()
        time.sleep(every)
    raise RuntimeError(f"no 200 on :{port}{path} within {limit}s")


# ---------------------------------------------------------------------------
# Processes.


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (or VmHWM, the peak) of a process in KiB; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(k) for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def replica_pid(state_dir: Path, replica: str) -> int | None:
    """The pid of a process-driver replica (from its record)."""
    try:
        return int(json.loads((state_dir / "replicas" / f"{replica}.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


# ---------------------------------------------------------------------------
# The platform.


@contextlib.contextmanager
def platform(
    tmp: Path, driver: str = "process", extra: list[str] | None = None, label: str = "state"
) -> Iterator[Torpor]:
    """A running ``torpor up`` (harness), stopped on exit; with docker, any container or
    image of this installation still there afterwards is removed."""
    state = tmp / label
    t = Torpor(state, driver=driver, extra=extra)
    try:
        t.start()
        yield t
    finally:
        if t.proc is not None:
            t.stop()
            if driver == "docker":
                docker_cleanup(state)


def docker_cleanup(state_dir: Path) -> None:
    from torpor.drivers.docker import instance_id

    label = f"label=torpor.instance={instance_id(state_dir)}"
    ids = subprocess.run(
        ["docker", "ps", "-aq", "--filter", label], capture_output=True, text=True, timeout=60
    ).stdout.split()
    if ids:
        print(f"   clean-up: removing {len(ids)} leftover container(s)")
        subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, timeout=120)
    imgs = subprocess.run(
        ["docker", "images", "-q", "--filter", label], capture_output=True, text=True, timeout=60
    ).stdout.split()
    if imgs:
        subprocess.run(["docker", "rmi", "-f", *set(imgs)], capture_output=True, timeout=120)


def set_scale(t: Torpor, name: str, **body: int) -> None:
    r = t.api_call("PATCH", f"/v1/functions/{name}/scale", json=body, timeout=30)
    r.raise_for_status()


def hold_then_release(
    t: Torpor,
    name: str,
    max_: int,
    last_request: float = 0.0,
    quiet: float = 3.0,
    settle: float = 1.0,
    timeout: float = 90.0,
) -> int:
    """Force the function to zero (``torpor scale --replicas 0``), wait until its replicas
    are gone, release it (``--min 0 --max MAX``), wait ``settle`` s, check it stayed at zero.
    -> how many times a replica came back with no traffic after the release (each time it
    waits for that replica to go away again, and checks once more).

    ``last_request`` (monotonic) is when traffic last ended; the hold waits until 2.2 s
    after it (so that a gateway report after the one that covers the request, saying
    "0 in flight", went out while the replica was still there), and the release until
    ``quiet`` s after it. Why a replica can come back (a platform
    quirk this benchmark found): the gateway reports a revision only while it has
    replicas, queue or traffic, so when its replica goes away within one report period of
    a sampled in-flight request, that report (concurrency > 0) stays the gateway's last
    word, and the autoscaler counts requests "in flight" (no idle) for up to a stable
    window: released, it starts a replica for no traffic."""
    time.sleep(max(0.0, last_request + 2.2 - time.monotonic()))
    set_scale(t, name, replicas=0)
    t.wait_for(lambda: not t.function(name)["replicas"], timeout, f"{name} at zero", every=0.05)
    time.sleep(max(0.0, last_request + quiet - time.monotonic()))
    set_scale(t, name, min=0, max=max_)
    flaps = 0
    while True:
        time.sleep(settle)
        left = t.function(name)["replicas"]
        if not left:
            return flaps
        flaps += 1
        if flaps > 3:
            raise RuntimeError(f"{name}: replicas keep coming back without traffic: {left}")
        t.wait_for(
            lambda: not t.function(name)["replicas"], timeout, f"{name} back at zero", every=0.05
        )


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.02)


# ---------------------------------------------------------------------------
# Profiling.


def py_spy_top(
    pid: int,
    seconds: float,
    load: Callable[[], Any],
    top: int = 18,
    rate: int = 200,
    native: bool = False,
) -> str:
    """Run ``load()`` while ``py-spy record`` samples ``pid``; -> a text summary: busy
    fraction, then the functions with the most self and most inclusive samples."""
    if shutil.which("py-spy") is None:
        return "(py-spy not installed: pip install py-spy)"
    out = Path(tempfile.mkdtemp(prefix="torpor-pyspy-")) / "stacks.txt"
    spy = subprocess.Popen(
        [
            "py-spy",
            "record",
            "-p",
            str(pid),
            "-d",
            f"{int(seconds)}",
            "-r",
            str(rate),
            "--nolineno",
            "-f",
            "raw",
            "-o",
            str(out),
            *(["--native"] if native else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(0.5)
        load()
    finally:
        try:
            _, err = spy.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
    if not out.exists():
        return f"(py-spy produced nothing: {err.decode(errors='replace')[-500:]})"
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = [_short(f) for f in stack.split(";")]
        frames = [f for f in frames if f]
        if not frames:
            continue
        total += count
        self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    shutil.rmtree(out.parent, ignore_errors=True)
    expected = seconds * rate
    lines = [
        f"py-spy: {total} busy samples of ~{expected:.0f} ({total / expected:.0%} of one core busy "
        f"in Python; idle waits not counted)",
        f"  {'self %':>7}  function",
    ]
    for f, c in self_c.most_common(top):
        lines.append(f"  {c / total:7.1%}  {f}")
    lines.append(f"  {'incl %':>7}  function")
    for f, c in incl.most_common(top + 12):
        lines.append(f"  {c / total:7.1%}  {f}")
    return "\n".join(lines)


def _short(frame: str) -> str:
    # "func (path/to/file.py)" -> "func (file.py)"; drop process/thread pseudo-frames
    frame = frame.strip()
    if frame.startswith(("process ", "thread ")):
        return ""
    m = re.match(r"(.*) \((.*)\)$", frame)
    if not m:
        return frame
    path = m.group(2)
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{m.group(1)} ({short})"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")
