"""Control plane at scale: one ``torpor up`` (process driver) with 1 function, then with
1,000 tiny functions, same run.

    python tests/benchmarks/bench_scale.py [--functions 1000] [--budget 240] [--duration 5]
                                           [--rounds 3] [--profile SECONDS]

Phase 1: functions/hello deployed and pinned to one replica (``--replicas 1``). Measured:
RSS of ``torpor up`` and of its zygote, its CPU use at rest, ``GET /v1/functions``
latency (median of 20) and ``GET /v1/functions/hello``, and the gateway's throughput on
hello (``wrk -t2 -c32``) interleaved with wrk straight at the replica as a control for
machine drift, plus the CPU time per request of ``torpor up``.

Phase 2: tiny functions (``idle: 1s``) are deployed through the API (``POST /v1/functions``
with a tar.gz, as ``torpor deploy`` does; each is built, verified by a first replica, routed,
then scales to zero) until ``--functions`` exist or ``--budget`` seconds of deploying have
passed; once every verification replica is gone, the same figures again. Ratios N/1 are
printed; if fewer than ``--functions`` fit in the budget, linear extrapolations to that
number are printed and marked as such.

Targets: ``torpor up`` RSS <= 150 MB; routing cost (gateway CPU per request, gateway rps
relative to direct) does not grow with the number of functions.
Also the gateway's own ``/healthz`` latency at rest (sequential, ~2 ms apart, 5 s): the API,
controller and gateway share one event loop, so the max shows how long the control
plane's periodic work blocks requests.
``--profile S``: py-spy on the idle ``torpor up`` at N functions (where its rest CPU goes),
then while it answers ``GET /v1/functions`` back to back.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from _common import (
    DOMAIN,
    Torpor,
    cmdline,
    cpu_seconds,
    descendants,
    function_copy,
    header,
    loadavg,
    median,
    pct,
    platform,
    py_spy_top,
    replica_pid,
    rss_kb,
    set_scale,
    wrk,
)

from torpor.cli.main import pack

TARGET_RSS_MB = 150.0
HANDLER = 'def handle(request):\n    return "tiny\\n"\n'


def tiny_folder(root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "torpor.yaml").write_text(
        f"name: {name}\nhandler: handler:handle\nscale: {{min: 0, max: 2, idle: 1s}}\n"
    )
    (d / "handler.py").write_text(HANDLER)
    return d


def list_functions(c: httpx.Client, t: Torpor) -> list[dict[str, Any]]:
    r = c.get(f"{t.api}/v1/functions", timeout=60)
    r.raise_for_status()
    return list(r.json()["functions"])


def deploy_many(t: Torpor, tmp: Path, n: int, budget: float, window: int = 16) -> dict[str, Any]:
    """POST tiny functions, at most ``window`` not yet ready at a time, until n or budget."""
    root = tmp / "tiny"
    posted: dict[str, float] = {}
    done: dict[str, float] = {}
    failed: list[str] = []
    t0 = time.monotonic()
    last_print = t0
    with httpx.Client(timeout=60, headers=t.api_headers) as c:
        i = 0
        while True:
            out_of_time = time.monotonic() - t0 > budget
            while not out_of_time and len(posted) - len(done) - len(failed) < window and i < n:
                name = f"tiny-{i:04d}"
                i += 1
                r = c.post(
                    f"{t.api}/v1/functions",
                    content=pack(tiny_folder(root, name)),
                    headers={"content-type": "application/gzip"},
                )
                r.raise_for_status()
                posted[name] = time.monotonic()
            if len(done) + len(failed) == len(posted) and (i >= n or out_of_time):
                break
            if out_of_time and time.monotonic() - t0 > budget + 120:
                break  # the stragglers are not coming
            time.sleep(0.5)
            for f in list_functions(c, t):
                name = f["name"]
                if name in posted and name not in done and name not in failed:
                    if f["status"] == "ready":
                        done[name] = time.monotonic()
                    elif f["status"] == "failed":
                        failed.append(name)
            if time.monotonic() - last_print > 15:
                last_print = time.monotonic()
                print(
                    f"   ... {len(done)} ready, {len(failed)} failed, {len(posted)} posted "
                    f"after {last_print - t0:.0f} s (torpor up RSS {rss_kb(t.proc.pid) / 1024:.0f} MB)",  # type: ignore[union-attr]
                    flush=True,
                )
    elapsed = time.monotonic() - t0
    lat = [done[k] - posted[k] for k in done]
    return {
        "ready": len(done),
        "failed": failed,
        "elapsed": elapsed,
        "deploy_p50": median(lat),
        "deploy_max": max(lat, default=float("nan")),
    }


def loop_lag(port: int, seconds: float) -> list[float]:
    """Sequential ``GET /healthz`` on the gateway (keep-alive) for ``seconds``, ~2 ms apart
    -> latencies (ms). What the control plane's work blocks shows up as the max."""
    out: list[float] = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s = time.perf_counter()
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            out.append((time.perf_counter() - s) * 1000)
            time.sleep(0.002)
    finally:
        conn.close()
    return out


def zygote_of(pid: int) -> int | None:
    for p in descendants(pid):
        if "zygote.py" in cmdline(p):
            return p
    return None


def measure(
    t: Torpor, label: str, hello_endpoint: str, rpid: int | None, args: argparse.Namespace
) -> dict[str, float]:
    assert t.proc is not None
    up = t.proc.pid
    zy = zygote_of(up)
    m: dict[str, float] = {}
    m["rss_up_mb"] = rss_kb(up) / 1024
    m["hwm_up_mb"] = rss_kb(up, "VmHWM") / 1024
    m["rss_zygote_mb"] = rss_kb(zy) / 1024 if zy else float("nan")
    m["replica_procs"] = float(len(descendants(zy))) if zy else float("nan")
    # CPU at rest
    c0, w0 = cpu_seconds(up), time.monotonic()
    time.sleep(5)
    c1, w1 = cpu_seconds(up), time.monotonic()
    m["idle_cpu_pct"] = ((c1 or 0) - (c0 or 0)) / (w1 - w0) * 100
    # event-loop stalls at rest: the gateway answers /healthz itself, on the loop it shares
    lag = loop_lag(t.port, 5.0)
    m["lag_p50"], m["lag_p99"], m["lag_max"] = pct(lag, 50), pct(lag, 99), max(lag)
    # API latency
    with httpx.Client(timeout=60, headers=t.api_headers) as c:
        for what, url in (
            ("list_ms", f"{t.api}/v1/functions"),
            ("get_ms", f"{t.api}/v1/functions/hello"),
        ):
            samples = []
            for _ in range(20):
                s = time.perf_counter()
                c.get(url).raise_for_status()
                samples.append((time.perf_counter() - s) * 1000)
            m[what] = statistics.median(samples)
        m["functions"] = float(len(list_functions(c, t)))
    # routing: gateway vs direct, interleaved
    gw, direct = [], []
    for _ in range(args.rounds):
        g = wrk(
            f"{t.gateway}/",
            connections=32,
            duration=args.duration,
            host=f"hello.{DOMAIN}",
            pids=[up],
            quiet=True,
        )
        d = wrk(f"http://{hello_endpoint}/", connections=32, duration=args.duration, quiet=True)
        gw.append(g)
        direct.append(d)
        print(
            f"   [{label}] gateway {g['rps']:7.0f} rps p99 {g['p99']:6.2f} ms cpu {g.get(f'cpu_us_{up}', 0):6.1f} us/req"
            f"  | direct {d['rps']:7.0f} rps   errors {g['non_2xx'] + g['socket_errors']:.0f}",
            flush=True,
        )
    m["gw_rps"] = median([g["rps"] for g in gw])
    m["gw_p50"] = median([g["p50"] for g in gw])
    m["gw_p99"] = median([g["p99"] for g in gw])
    m["gw_cpu_us"] = median([g.get(f"cpu_us_{up}", float("nan")) for g in gw])
    # the same, less what torpor up burns at rest anyway (control plane), per request
    m["gw_cpu_us_net"] = median(
        [
            g.get(f"cpu_us_{up}", float("nan"))
            - m["idle_cpu_pct"] / 100 * args.duration * 1e6 / max(g["requests"], 1)
            for g in gw
        ]
    )
    m["direct_rps"] = median([d["rps"] for d in direct])
    m["gw_over_direct"] = median([g["rps"] / d["rps"] for g, d in zip(gw, direct, strict=True)])
    m["errors"] = sum(g["non_2xx"] + g["socket_errors"] for g in gw)
    return m


ROWS = [
    ("functions", "functions", "{:.0f}"),
    ("rss_up_mb", "torpor up RSS (MB)", "{:.1f}"),
    ("hwm_up_mb", "torpor up peak RSS, VmHWM (MB)", "{:.1f}"),
    ("rss_zygote_mb", "zygote RSS (MB)", "{:.1f}"),
    ("replica_procs", "replica processes", "{:.0f}"),
    ("idle_cpu_pct", "torpor up CPU at rest (% of a core)", "{:.1f}"),
    ("lag_p50", "gateway /healthz at rest, p50 (ms)", "{:.2f}"),
    ("lag_p99", "gateway /healthz at rest, p99 (ms)", "{:.2f}"),
    ("lag_max", "gateway /healthz at rest, max (ms)", "{:.2f}"),
    ("list_ms", "GET /v1/functions (ms, median of 20)", "{:.1f}"),
    ("get_ms", "GET /v1/functions/hello (ms, median)", "{:.1f}"),
    ("gw_rps", "gateway rps on hello (median)", "{:.0f}"),
    ("gw_p50", "gateway p50 (ms)", "{:.2f}"),
    ("gw_p99", "gateway p99 (ms)", "{:.2f}"),
    ("gw_cpu_us", "torpor up CPU per request (us)", "{:.1f}"),
    ("gw_cpu_us_net", "  less its CPU at rest (us)", "{:.1f}"),
    ("direct_rps", "direct rps (control)", "{:.0f}"),
    ("gw_over_direct", "gateway rps / direct rps", "{:.3f}"),
    ("errors", "gateway errors", "{:.0f}"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--functions", type=int, default=1000)
    ap.add_argument("--budget", type=float, default=240.0, help="seconds of deploying at most")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--profile", type=float, default=0.0, help="seconds of py-spy on the idle torpor up at N"
    )
    args = ap.parse_args()
    header(
        f"control plane at scale: 1 vs {args.functions} functions (process driver), "
        f"deploy budget {args.budget:g}s"
    )
    tmp = Path(tempfile.mkdtemp(prefix="torpor-bench-scale-"))
    try:
        with platform(tmp, "process") as t:
            assert t.proc is not None
            t.deploy(function_copy(tmp, "hello"))
            set_scale(t, "hello", replicas=1)
            [rep] = t.wait_for(
                lambda: (lambda rs: rs if len(rs) == 1 and rs[0]["state"] == "ready" else None)(
                    t.function("hello")["replicas"]
                ),
                30,
                "one ready hello replica",
            )
            endpoint = rep["endpoint"]
            rpid = replica_pid(t.state_dir, rep["name"])
            wrk(
                f"{t.gateway}/", connections=32, duration=2, host=f"hello.{DOMAIN}", quiet=True
            )  # warm-up
            one = measure(t, "1 function", endpoint, rpid, args)

            print(
                f"   deploying up to {args.functions - 1} tiny functions (budget {args.budget:g}s) ...",
                flush=True,
            )
            dep = deploy_many(t, tmp, args.functions - 1, args.budget)
            print(
                f"   deployed {dep['ready']} ready ({len(dep['failed'])} failed) in {dep['elapsed']:.0f} s: "
                f"{dep['ready'] / dep['elapsed']:.1f} functions/s; POST -> ready p50 {dep['deploy_p50']:.1f} s, "
                f"max {dep['deploy_max']:.1f} s",
                flush=True,
            )
            zy = zygote_of(t.proc.pid)

            def settled() -> bool:
                with httpx.Client(timeout=60, headers=t.api_headers) as c:
                    fns = list_functions(c, t)
                others = sum(f["replicas"] for f in fns if f["name"] != "hello")
                return others == 0 and (zy is None or len(descendants(zy)) <= 1)

            t0 = time.monotonic()
            t.wait_for(settled, 300, "every verification replica gone", every=1.0)
            print(
                f"   all tiny functions at zero {time.monotonic() - t0:.0f} s after the last deploy",
                flush=True,
            )
            time.sleep(3)
            many = measure(t, f"{int(dep['ready']) + 1} functions", endpoint, rpid, args)
            if args.profile > 0:
                print(
                    f"\n   py-spy on the idle torpor up with {int(many['functions'])} functions, {args.profile:g}s:"
                )
                prof = py_spy_top(t.proc.pid, args.profile, lambda: time.sleep(args.profile))
                print("   " + prof.replace("\n", "\n   "))

                def lists() -> None:
                    with httpx.Client(timeout=60, headers=t.api_headers) as c:
                        end = time.monotonic() + args.profile
                        while time.monotonic() < end:
                            list_functions(c, t)

                print(
                    f"\n   py-spy on torpor up answering GET /v1/functions back to back, {args.profile:g}s:"
                )
                prof = py_spy_top(t.proc.pid, args.profile, lists)
                print("   " + prof.replace("\n", "\n   "))
            t.cli("delete", "hello", check=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = many["functions"]
    print()
    print(f"   {'':40s} {'1 fn':>10} {f'{n:.0f} fns':>10} {'ratio':>8}")
    for key, label, fmt in ROWS:
        a, b = one[key], many[key]
        ratio = f"{b / a:8.2f}" if a else f"{'':8s}"
        print(f"   {label:40s} {fmt.format(a):>10} {fmt.format(b):>10} {ratio}")
    rss = many["rss_up_mb"]
    print()
    print(
        f"   torpor up RSS at {n:.0f} functions: {rss:.1f} MB (target <= {TARGET_RSS_MB:g} MB: "
        f"{'met' if rss <= TARGET_RSS_MB else 'MISSED'})"
    )
    print(
        f"   routing: gateway rps/direct {one['gw_over_direct']:.3f} -> {many['gw_over_direct']:.3f} "
        f"({many['gw_over_direct'] / one['gw_over_direct']:.2f}x); CPU per request {one['gw_cpu_us']:.1f} -> "
        f"{many['gw_cpu_us']:.1f} us ({many['gw_cpu_us'] / one['gw_cpu_us']:.2f}x), less rest CPU "
        f"{one['gw_cpu_us_net']:.1f} -> {many['gw_cpu_us_net']:.1f} us"
    )
    want = args.functions
    if n < want and n > 1:
        k = (want - 1) / (n - 1)
        print(
            f"   EXTRAPOLATED (linear, from 1 and {n:.0f} measured functions to {want}; not measured):"
        )
        for key, label in (
            ("rss_up_mb", "torpor up RSS (MB)"),
            ("idle_cpu_pct", "CPU at rest (% of a core)"),
            ("list_ms", "GET /v1/functions (ms)"),
        ):
            est = one[key] + (many[key] - one[key]) * k
            print(f"     {label:34s} ~{est:.1f}")
    print(f"   load average at the end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
