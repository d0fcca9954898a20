"""Warm path: the gateway vs nginx in front of the same warm replica, same run.

    python tests/benchmarks/bench_warm.py [--duration 10] [--connections 32] [--rounds 3]
                                          [--profile SECONDS [--native]]

Starts ``torpor up --driver process`` (tests/platform_proc.py), deploys functions/hello,
pins one replica (``torpor scale hello --replicas 1``) and reads its endpoint from
``GET /v1/functions/hello``. Runs nginx (1 worker, ``upstream { keepalive 64 }``, HTTP/1.1,
``Connection ""``) in front of that replica, then ``wrk -t2 -cC -dD --latency`` against
the replica directly, nginx, and the gateway (``Host: hello.torpor.localhost``),
interleaved for ``--rounds`` rounds. Prints rps, p50, p99 and the CPU time per request
of the process in the middle (nginx worker, ``torpor up``), the medians, and the
gateway/nginx ratios against the targets (rps >= 0.8x, p99 <= 1.5x).

wrk, the replica, nginx and the gateway all share this machine's cores: every figure is
a figure of the whole box. ``--profile S`` adds one more gateway run under
``py-spy record`` and prints where the gateway's CPU goes (``--native``: with C frames).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from _common import (
    DOMAIN,
    function_copy,
    header,
    loadavg,
    median,
    nginx_proxy,
    platform,
    py_spy_top,
    replica_pid,
    set_scale,
    wrk,
)

TARGET_RPS = 0.8
TARGET_P99 = 1.5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--profile", type=float, default=0.0, help="seconds of py-spy on the gateway (0: off)"
    )
    ap.add_argument(
        "--native", action="store_true", help="py-spy --native (C frames: uvloop, syscalls)"
    )
    args = ap.parse_args()
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"{tool} not found on PATH", file=sys.stderr)
            return 2

    header(
        f"warm path: wrk -t2 -c{args.connections} -d{args.duration:g}s --latency, "
        f"{args.rounds} interleaved rounds, medians"
    )
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-warm-"))
    runs: dict[str, list[dict[str, float]]] = {}
    cpu_pid: dict[str, int] = {}
    try:
        with platform(tmp, "process") as t:
            t.deploy(function_copy(tmp, "hello"))
            set_scale(t, "hello", replicas=1)

            def one_ready() -> list[dict[str, object]] | None:
                reps = t.function("hello")["replicas"]
                ready = [r for r in reps if r["state"] == "ready"]
                return ready if len(reps) == 1 and len(ready) == 1 else None

            [rep] = t.wait_for(one_ready, 30, "exactly one ready replica")
            endpoint = str(rep["endpoint"])
            rpid = replica_pid(t.state_dir, str(rep["name"]))
            assert t.proc is not None
            gw_pid = t.proc.pid
            print(
                f"   replica {rep['name']} at {endpoint} (pid {rpid}); gateway = torpor up pid {gw_pid}"
            )
            with nginx_proxy(endpoint) as (nginx_port, nginx_pid):
                targets = {
                    "direct": (f"http://{endpoint}/", None, rpid),
                    "nginx": (f"http://127.0.0.1:{nginx_port}/", None, nginx_pid),
                    "gateway": (f"{t.gateway}/", f"hello.{DOMAIN}", gw_pid),
                }
                for url, host, _ in targets.values():  # warm connections, pools, caches
                    wrk(url, connections=args.connections, duration=2, host=host, quiet=True)
                for rnd in range(args.rounds):
                    for name, (url, host, pid) in targets.items():
                        pids = [p for p in (pid, rpid) if p]
                        r = wrk(
                            url,
                            connections=args.connections,
                            duration=args.duration,
                            host=host,
                            pids=pids,
                        )
                        if pid:
                            cpu_pid[name] = pid
                        runs.setdefault(name, []).append(r)
                        errs = f"  errors {r['non_2xx'] + r['socket_errors']:.0f}"
                        cpu = (
                            f"  cpu {r.get(f'cpu_us_{pid}', float('nan')):6.1f} us/req"
                            if pid
                            else ""
                        )
                        rcpu = (
                            f"  (replica {r.get(f'cpu_us_{rpid}', float('nan')):5.1f})"
                            if rpid
                            else ""
                        )
                        print(
                            f"   round {rnd + 1} {name:8s} {r['rps']:8.0f} rps  p50 {r['p50']:7.3f} ms  "
                            f"p99 {r['p99']:7.3f} ms{cpu}{rcpu}{errs}",
                            flush=True,
                        )
                if args.profile > 0:
                    url, host, _ = targets["gateway"]
                    print(
                        f"\n   profiling the gateway (pid {gw_pid}) for {args.profile:g}s under the same wrk load"
                    )
                    prof = py_spy_top(
                        gw_pid,
                        args.profile,
                        native=args.native,
                        load=lambda: wrk(
                            url,
                            connections=args.connections,
                            duration=args.profile,
                            host=host,
                            quiet=True,
                        ),
                    )
                    print("   " + prof.replace("\n", "\n   "))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {n: {k: median([r[k] for r in rs if k in r]) for k in rs[0]} for n, rs in runs.items()}
    print()
    print(
        f"   median of {args.rounds}   {'rps':>8} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>11} {'errors':>7}"
    )
    for name, r in med.items():
        pid = cpu_pid.get(name)
        cpu_v = r.get(f"cpu_us_{pid}", float("nan")) if pid else float("nan")
        print(
            f"   {name:14s} {r['rps']:8.0f} {r['p50']:8.3f} {r['p99']:8.3f} {cpu_v:11.1f} "
            f"{sum(x['non_2xx'] + x['socket_errors'] for x in runs[name]):7.0f}"
        )
    print(
        "   (cpu: the replica for direct, the nginx worker, the whole torpor up process for gateway)"
    )
    g, n, d = med["gateway"], med["nginx"], med["direct"]
    rps_ratio, p99_ratio = g["rps"] / n["rps"], g["p99"] / n["p99"]
    print()
    print(
        f"   gateway/nginx  rps {rps_ratio:.2f}x (target >= {TARGET_RPS}x: "
        f"{'met' if rps_ratio >= TARGET_RPS else 'MISSED'})   "
        f"p99 {p99_ratio:.2f}x (target <= {TARGET_P99}x: {'met' if p99_ratio <= TARGET_P99 else 'MISSED'})   "
        f"p50 {g['p50'] / n['p50']:.2f}x"
    )
    print(
        f"   nginx/direct   rps {n['rps'] / d['rps']:.2f}x   gateway/direct rps {g['rps'] / d['rps']:.2f}x"
    )
    print(f"   load average at the end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
