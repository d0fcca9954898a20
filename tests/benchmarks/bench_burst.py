"""Burst from zero: 0 -> 100 concurrent clients against functions/slow (100 ms per request,
target 5 in flight per replica, max 30), per driver.

    python tests/benchmarks/bench_burst.py [--clients 100] [--duration 20] [--drivers process,docker]
                                           [--events]

The function starts at zero (``torpor scale slow --replicas 0``, then ``--min 0 --max 30``).
At t=0 all clients start at once; each keeps one keep-alive connection and sends
``GET /`` back to back (like ``wrk -c100``, but with each request's start, end and
outcome recorded), until ``--duration`` s. Meanwhile ``GET /v1/functions/slow`` is sampled
every 250 ms. Prints:

- time to the first 2xx response (from t=0);
- errors: non-2xx responses and socket errors/timeouts (the bar is zero);
- time to a steady replica count: the ready count's last change before it stays
  unchanged for 3 s, and that count (ideal: clients / target = 20);
- a per-second timeline: ready replicas, 2xx/s, errors/s, p50 and max latency;
- process: the floors measured in the same run, with the same function and env (5 each,
  p50): a fork of a warmed zygote -> the first 200, and a bare spawn -> the first 200
  (``process_floors.py``), next to the burst's first 2xx.

The client is Python (asyncio, uvloop when importable) on the same 2 cores as the
platform; at 100 clients x ~10 requests/s it needs a fraction of a core.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from _common import (
    DOMAIN,
    Torpor,
    function_copy,
    header,
    hold_then_release,
    loadavg,
    pct,
    platform,
)
from process_floors import ZygoteFloor, bare_spawn

STEADY_FOR = 3.0
FLOOR_SAMPLES = 5


def process_floors(folder: Path, env: dict[str, str]) -> dict[str, float]:
    """p50 seconds of a fork from a warmed zygote -> 200 and of a bare spawn -> 200."""
    floor = ZygoteFloor()
    try:
        forks = sorted(floor.fork(folder, "/", env) for _ in range(FLOOR_SAMPLES))
    finally:
        floor.close()
    bares = sorted(bare_spawn(folder, "/", env) for _ in range(FLOOR_SAMPLES))
    return {"fork": forks[len(forks) // 2], "bare": bares[len(bares) // 2]}


DOCKER_READY_N, DOCKER_READY_WITHIN = 10, 1.5  # docker with its warm pool: 10 ready by 1.5 s
FLOOR_PATH = "/?ms=0"  # the floors time a start, not the function's 100 ms
Record = tuple[float, float, int | str]  # (start, end) since t0, status or error name


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length, chunked, close = 0, False, False
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        k = k.strip().lower()
        if k == b"content-length":
            length = int(v)
        elif k == b"transfer-encoding" and b"chunked" in v.lower():
            chunked = True
        elif k == b"connection" and b"close" in v.lower():
            close = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status, close


async def _client(
    port: int, host: str, t0: float, stop_at: float, timeout: float, out: list[Record]
) -> None:
    req = f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: torpor-bench\r\n\r\n".encode()
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    while time.perf_counter() < stop_at:
        start = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                if writer is None or reader is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(req)
                status, close = await _read_response(reader)
            out.append((start - t0, time.perf_counter() - t0, status))
            if close:
                writer.close()
                reader = writer = None
        except (
            OSError,
            EOFError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ValueError,
            IndexError,
        ) as e:
            out.append((start - t0, time.perf_counter() - t0, type(e).__name__))
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def _burst(port: int, host: str, clients: int, duration: float, t0: float) -> list[Record]:
    out: list[Record] = []
    stop_at = t0 + duration
    await asyncio.gather(*(_client(port, host, t0, stop_at, 30.0, out) for _ in range(clients)))
    return out


def run_burst(port: int, host: str, clients: int, duration: float, t0: float) -> list[Record]:
    try:
        import uvloop

        return uvloop.run(_burst(port, host, clients, duration, t0))
    except ImportError:
        return asyncio.run(_burst(port, host, clients, duration, t0))


def _sample(
    t: Torpor, name: str, t0: float, samples: list[tuple[float, int, int]], stop: threading.Event
) -> None:
    with httpx.Client(timeout=5, headers=t.api_headers) as c:
        while not stop.is_set():
            try:
                reps = c.get(f"{t.api}/v1/functions/{name}").json()["replicas"]
                samples.append(
                    (time.perf_counter() - t0, sum(r["state"] == "ready" for r in reps), len(reps))
                )
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            stop.wait(0.25)


def steady(samples: list[tuple[float, int, int]], until: float) -> tuple[float | None, int | None]:
    """(time of the last change before the replica count stays put for STEADY_FOR s, count).
    Steady means: ready count unchanged and every replica ready (none starting)."""
    last_change, last = 0.0, None
    for ts, ready, total in samples:
        if ts > until:
            break
        state = (ready, total)
        if state != last or ready != total:
            if state != last:
                last_change = ts
            last = state
            if ready != total:
                continue
        if ts - last_change >= STEADY_FOR and ready > 0:
            return last_change, ready
    return None, None


def bench(tmp: Path, driver: str, clients: int, duration: float) -> dict[str, Any]:
    name = "slow"
    folder = function_copy(
        tmp,
        "slow",
        name=name,
        env={"SLEEP_MS": "100", "FAIL_RATE": "0"},
        scale={"target": 5, "max": 30},
    )
    with platform(tmp, driver, label=f"burst-{driver}") as t:
        try:
            t.deploy(folder)
            hold_then_release(t, name, 30)
            samples: list[tuple[float, int, int]] = []
            stop = threading.Event()
            t0, wall0 = time.perf_counter(), time.time()
            watcher = threading.Thread(
                target=_sample, args=(t, name, t0, samples, stop), daemon=True
            )
            watcher.start()
            try:
                records = run_burst(t.port, f"{name}.{DOMAIN}", clients, duration, t0)
                # keep sampling a little: "steady" may need the last seconds of the burst
                time.sleep(0.5)
            finally:
                stop.set()
                watcher.join(10)
            r = t.api_call(
                "GET",
                f"/v1/functions/{name}/events",
                params={"since": wall0 - 1, "limit": 1000},
                timeout=10,
            )
            events = [(e["time"] - wall0, e["kind"], e["message"]) for e in r.json()["events"]]
            floors: dict[str, Any] = {}
            if driver == "process":
                floors = process_floors(folder, {"SLEEP_MS": "100", "FAIL_RATE": "0"})
            elif driver == "docker":
                floors = docker_floors(t.function(name)["revisions"][-1]["image"], tmp)
        finally:
            if driver == "docker":
                t.cli("delete", name, check=False)
    return {"records": records, "samples": samples, "events": events, "floors": floors}


def docker_floors(image: str | None, tmp: Path, n: int = 5) -> dict[str, list[float]]:
    """Docker's floors in the same run, after the burst: a bare ``docker run`` -> 200 and
    ``docker unpause`` -> 200 of the function's image (bench_cold's own functions)."""
    if not image:
        return {}
    from bench_cold import BarePaused, bare_docker_run

    out: dict[str, list[float]] = {"run": [], "unpause": []}
    floor = BarePaused("docker", tmp, image, path=FLOOR_PATH)
    try:
        for _ in range(n):
            out["run"].append(bare_docker_run(image, path=FLOOR_PATH))
            out["unpause"].append(floor.wake())
    finally:
        floor.close()
    return out


def report(driver: str, res: dict[str, Any], clients: int, duration: float) -> dict[str, Any]:
    records: list[Record] = res["records"]
    samples: list[tuple[float, int, int]] = res["samples"]
    ok = [r for r in records if isinstance(r[2], int) and 200 <= r[2] < 300]
    bad = Counter(str(r[2]) for r in records if not (isinstance(r[2], int) and 200 <= r[2] < 300))
    first_ok = min((r[1] for r in ok), default=float("nan"))
    st_time, st_count = steady(samples, duration)
    peak = max((s[1] for s in samples), default=0)
    during = [s for s in samples if s[0] <= duration]
    last_change = next(
        (during[i][0] for i in range(len(during) - 1, 0, -1) if during[i][1] != during[i - 1][1]),
        None,
    )
    print(
        f"\n   {driver}: {len(records)} requests, {len(ok)} 2xx, errors {sum(bad.values())} {dict(bad) or ''}"
    )
    print(
        f"   {driver}: first 2xx at {first_ok * 1000:.0f} ms; ready replicas: peak {peak}, "
        + (
            f"steady {st_count} from {st_time:.2f} s"
            if st_time is not None
            else "never steady for 3 s"
        )
        + (
            f"; last change during the burst at {last_change:.2f} s (-> {during[-1][1]})"
            if last_change
            else ""
        )
    )
    lat = [(r[1] - r[0]) * 1000 for r in ok]
    print(
        f"   {driver}: 2xx latency p50 {pct(lat, 50):.0f} ms  p99 {pct(lat, 99):.0f} ms  max {max(lat, default=0):.0f} ms"
        f"  (the function sleeps 100 ms)"
    )
    print(
        f"   {'s':>4} {'ready':>6} {'all':>4} {'2xx/s':>6} {'err/s':>6} {'p50 ms':>7} {'max ms':>7}"
    )
    for sec in range(int(duration + 0.999)):
        in_sec = [r for r in records if sec <= r[1] < sec + 1]
        ok_s = [(r[1] - r[0]) * 1000 for r in in_sec if isinstance(r[2], int) and 200 <= r[2] < 300]
        errs = len(in_sec) - len(ok_s)
        at = [s for s in samples if s[0] <= sec + 1]
        ready, total = (at[-1][1], at[-1][2]) if at else (0, 0)
        print(
            f"   {sec:>3}s {ready:6d} {total:4d} {len(ok_s):6d} {errs:6d} {pct(ok_s, 50):7.0f} "
            f"{max(ok_s, default=0):7.0f}"
        )
    decisions = [(ts, m) for ts, kind, m in res["events"] if kind == "scale" and "desired" in m]
    for ts, m in decisions[:8]:
        print(f"   {driver}: {ts:6.2f} s  {m.split(': ', 1)[-1][:110]}")
    ready_at = sorted(
        ts for ts, kind, m in res["events"] if kind == "replica" and " ready at " in m
    )
    if ready_at:
        marks = [(n, ready_at[n - 1]) for n in (1, 5, 10, 15, 20, 25, 30) if n <= len(ready_at)]
        print(
            f"   {driver}: replica 'ready' events (n-th at): "
            + ", ".join(f"#{n} {ts:.2f} s" for n, ts in marks)
        )
    floors = res.get("floors") or {}
    if "fork" in floors:
        print(
            f"   {driver}: floors in this run (same function): fork from a warmed zygote -> 200 "
            f"p50 {floors['fork'] * 1000:.0f} ms, bare spawn -> 200 p50 {floors['bare'] * 1000:.0f} ms; "
            f"first 2xx {first_ok * 1000:.0f} ms = fork floor +{(first_ok - floors['fork']) * 1000:.0f} ms"
        )
    if floors.get("run"):
        nth = ready_at[DOCKER_READY_N - 1] if len(ready_at) >= DOCKER_READY_N else None
        run_p50, unpause_p50 = pct(floors["run"], 50) * 1000, pct(floors["unpause"], 50) * 1000
        print(
            f"   {driver}: floors, same run: bare docker run -> 200 p50 {run_p50:.0f} ms, "
            f"docker unpause -> 200 p50 {unpause_p50:.0f} ms ({len(floors['run'])} each)"
        )
        print(
            f"   {driver}: {DOCKER_READY_N} ready at "
            + (f"{nth:.2f} s = {nth * 1000 / run_p50:.1f}x a bare docker run" if nth else "never")
            + f" (target <= {DOCKER_READY_WITHIN} s with 0 errors: "
            + (
                "met"
                if nth is not None and nth <= DOCKER_READY_WITHIN and not sum(bad.values())
                else "MISSED"
            )
            + ")"
        )
    return {
        "floors": floors,
        "first_ok": first_ok,
        "errors": sum(bad.values()),
        "steady_t": st_time,
        "steady_n": st_count,
        "peak": peak,
        "requests": len(records),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--drivers", default="process,docker")
    ap.add_argument("--events", action="store_true", help="print every platform event of the burst")
    args = ap.parse_args()
    header(
        f"burst: 0 -> {args.clients} clients for {args.duration:g}s, functions/slow (100 ms, target 5, max 30)"
    )
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-burst-"))
    summary: dict[str, dict[str, Any]] = {}
    try:
        for d in [d for d in args.drivers.split(",") if d]:
            res = bench(tmp, d, args.clients, args.duration)
            if args.events:
                for ts, kind, m in res["events"]:
                    print(f"   event {ts:7.2f} s {kind:8s} {m.splitlines()[0][:150]}")
            summary[d] = report(d, res, args.clients, args.duration)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(
        f"   {'driver':8s} {'first 2xx':>10} {'errors':>7} {'requests':>9} {'steady at':>10} {'replicas':>9} {'peak':>5}"
    )
    for d, s in summary.items():
        st = f"{s['steady_t']:.2f} s" if s["steady_t"] is not None else "never"
        print(
            f"   {d:8s} {s['first_ok'] * 1000:7.0f} ms {s['errors']:7d} {s['requests']:9d} {st:>10} "
            f"{s['steady_n'] or 0:9d} {s['peak']:5d}"
        )
    print(
        f"   (ideal steady count: {args.clients} clients / target 5 = {args.clients // 5}; errors: target 0)"
    )
    for d, s in summary.items():
        f = s.get("floors") or {}
        if "fork" in f:
            print(
                f"   {d}: first 2xx {s['first_ok'] * 1000:.0f} ms vs floors fork -> 200 "
                f"{f['fork'] * 1000:.0f} ms, bare spawn -> 200 {f['bare'] * 1000:.0f} ms (same run)"
            )
        elif f.get("run"):
            print(
                f"   {d}: first 2xx {s['first_ok'] * 1000:.0f} ms vs floors bare docker run -> 200 "
                f"{pct(f['run'], 50) * 1000:.0f} ms, docker unpause -> 200 "
                f"{pct(f['unpause'], 50) * 1000:.0f} ms (same run)"
            )
    print(f"   load average at the end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
