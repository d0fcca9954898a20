"""Asynchronous calls: how fast the gateway accepts them, and how long a backlog takes to drain.

    python tests/benchmarks/bench_async.py [--calls 2000] [--clients 32] [--ms 50]
                                           [--concurrency 50] [--driver process] [--redis URL]

A real ``torpor up`` (embedded store: every accepted call is fsynced to the state dir
before its 202; with ``--redis``: the Redis Streams queue, as in distributed mode) runs functions/slow (``--ms`` per call, target 5 in flight per replica,
max 10) with ``async: {concurrency: N}``. The function is held at zero
(``torpor scale --replicas 0``) while ``--clients`` keep-alive connections POST
``--calls`` calls to ``/async-function/slow`` back to back: that is the accept rate,
measured with nothing running. Then the function is released (``--min 0 --max 10``)
and the benchmark polls ``torpor_async_queued`` / ``torpor_async_running`` on the
gateway's ``/metrics`` until both are 0: that is the drain time, from zero replicas.
Prints accepted calls/s, p50/p99 accept latency, drain time, the drain rate and the
ideal rate (min(concurrency, 10 replicas x target 5) / per-call time), the peak
replica count, and how many calls ended done / failed (checked one by one).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _common import function_copy, header, loadavg, pct, platform, set_scale


async def _client(port: int, n: int, lat: list[float], ids: list[str], errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    req = (
        b"POST /async-function/slow/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b'Content-Length: 13\r\n\r\n{"job": 1234}'
    )
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split()[1])
            length = 0
            cid = ""
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
                elif k.strip().lower() == b"x-call-id":
                    cid = v.strip().decode()
            await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            if status == 202 and cid:
                ids.append(cid)
            else:
                errors.append(str(status))
    finally:
        writer.close()


async def fire(
    port: int, calls: int, clients: int
) -> tuple[float, list[float], list[str], list[str]]:
    lat: list[float] = []
    ids: list[str] = []
    errors: list[str] = []
    per = [calls // clients + (1 if i < calls % clients else 0) for i in range(clients)]
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(port, n, lat, ids, errors) for n in per if n))
    return time.perf_counter() - t0, lat, ids, errors


def gauges(gateway: str) -> tuple[float, float]:
    q = r = 0.0
    for line in httpx.get(f"{gateway}/metrics", timeout=10).text.splitlines():
        if line.startswith('torpor_async_queued{function="slow"}'):
            q = float(line.rsplit(" ", 1)[1])
        elif line.startswith('torpor_async_running{function="slow"}'):
            r = float(line.rsplit(" ", 1)[1])
    return q, r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--ms", type=int, default=50, help="time per call in the function")
    ap.add_argument("--concurrency", type=int, default=50, help="async.concurrency of the function")
    ap.add_argument("--driver", default="process")
    ap.add_argument(
        "--redis", help="use this Redis (its data is overwritten) instead of the embedded store"
    )
    args = ap.parse_args()
    header(
        f"async: {args.calls} calls from {args.clients} clients, functions/slow ({args.ms} ms, target 5, max 10, "
        f"async.concurrency {args.concurrency}), driver {args.driver}, store {'redis' if args.redis else 'embedded'}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-async-"))
    try:
        with platform(tmp, args.driver, extra=["--redis", args.redis] if args.redis else None) as t:
            t.deploy(
                function_copy(
                    tmp,
                    "slow",
                    env={"SLEEP_MS": str(args.ms), "FAIL_RATE": "0"},
                    scale={"min": 0, "max": 10, "target": 5, "idle": "10s"},
                    **{"async": {"concurrency": args.concurrency}},
                )
            )
            set_scale(t, "slow", replicas=0)
            t.wait_for(lambda: not t.function("slow")["replicas"], 60, "slow at zero")
            took, lat, ids, errors = asyncio.run(fire(t.port, args.calls, args.clients))
            print(
                f"   accepted {len(ids)} calls in {took:.2f} s: {len(ids) / took:.0f} calls/s "
                f"(p50 {pct(lat, 50) * 1000:.1f} ms, p99 {pct(lat, 99) * 1000:.1f} ms per accept); "
                f"refused {len(errors)} {sorted(set(errors))}"
            )
            q, r = gauges(t.gateway)
            print(f"   backlog before release: queued {q:.0f}, running {r:.0f}")
            t0 = time.monotonic()
            set_scale(t, "slow", min=0, max=10)
            peak = 0
            while time.monotonic() - t0 < 900:
                q, r = gauges(t.gateway)
                peak = max(peak, len(t.ready_replicas("slow")))
                if q == 0 and r == 0:
                    break
                time.sleep(0.25)
            drain = time.monotonic() - t0
            ideal = min(args.concurrency, 10 * 5) / (args.ms / 1000)
            print(
                f"   backlog drained in {drain:.2f} s from zero replicas: {len(ids) / drain:.0f} calls/s "
                f"(ideal at min(concurrency, 10 x 5) in flight: {ideal:.0f} calls/s); peak ready replicas {peak}"
            )
            states: dict[str, int] = {}
            for cid in ids:
                st = t.api_call("GET", f"/v1/calls/{cid}").json()["state"]
                states[st] = states.get(st, 0) + 1
            print(f"   calls by final state: {states}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"   load average at the end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
