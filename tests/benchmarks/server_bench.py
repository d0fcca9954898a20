"""Gateway ASGI server benchmark: torpor.gateway.server vs uvicorn vs nginx, same run.

    python tests/benchmarks/server_bench.py [--duration 5] [--connections 32] [--rounds 3]
                                            [--gateway] [--direct]

Starts the uvicorn "hello" upstream of proxy_bench.py and, all proxying to it:

- nginx     one worker, keepalive 64 to the upstream (proxy_bench.py's config)
- uvicorn   uvicorn(http="httptools", uvloop) serving ``proxy(pools.get(upstream), ...)``
- torpor    torpor.gateway.server.Server (uvloop) serving the same app

``--gateway`` adds "gw-uvicorn" and "gw-torpor": the real ``torpor.gateway.app.Gateway``
(in-memory store, one function with one ready replica = the upstream; requests go to
``/function/hello/``) on each server. ``--direct`` adds the upstream itself.

Then ``wrk -t2 -cN -dDs --latency`` against each target, interleaved for ``--rounds``
rounds. Prints requests/s, p50, p99 and the CPU time per request of the serving process
(the nginx worker; the Python server) of every run, the medians and the ratios to
nginx. CPU us/request varies less than requests/s when the machine is shared.

Needs ``wrk`` and ``nginx`` on PATH; uses uvloop when importable. Every process it
starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from proxy_bench import (  # noqa: E402
    NGINX_CONF,
    free_port,
    hello_app,
    loop_name,
    make_proxy_app,
    nginx_worker,
    print_header,
    started,
    tools_present,
    wrk,
)

FUNCTION = "hello"
GATEWAY_PATH = f"/function/{FUNCTION}/"


# ---------------------------------------------------------------------------
# Servers (child processes running this same file).


async def make_gateway(upstream: str) -> Any:
    """A started Gateway whose function ``hello`` has one ready replica at ``upstream``."""
    from torpor.gateway.app import Gateway
    from torpor.model import Function, Replica, Revision, Spec, TrafficTarget
    from torpor.store.embedded import EmbeddedStore

    store = EmbeddedStore(None)
    rev = f"{FUNCTION}-00001"
    fn = Function(
        name=FUNCTION,
        revisions=[
            Revision(
                name=rev, function=FUNCTION, number=1, spec=Spec(name=FUNCTION), status="ready"
            )
        ],
        traffic=[TrafficTarget(revision=rev, percent=100)],
        next_number=2,
    )
    await store.update_function(FUNCTION, lambda cur: fn)
    await store.put_replica(
        Replica(name=f"{rev}-r1", function=FUNCTION, revision=rev, state="ready", endpoint=upstream)
    )
    gateway = Gateway(store)
    await gateway.start()
    return gateway


async def _serve_async(kind: str, port: int, upstream: str) -> None:
    app = await make_gateway(upstream) if kind.startswith("gw-") else make_proxy_app(upstream)
    if kind.endswith("torpor"):
        from torpor.gateway.server import Server

        server: Any = Server(app, "127.0.0.1", port)
    else:
        import uvicorn

        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            http="httptools",
            loop="none",
            lifespan="off",
            log_level="warning",
            access_log=False,
            proxy_headers=False,
            server_header=False,
            date_header=False,
        )
        server = uvicorn.Server(config)
        server.capture_signals = _no_signals  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()

    def stop() -> None:
        server.should_exit = True

    loop.add_signal_handler(signal.SIGTERM, stop)
    loop.add_signal_handler(signal.SIGINT, stop)
    await server.serve()


def _no_signals() -> Any:
    import contextlib

    return contextlib.nullcontext()


def serve(kind: str, port: int, upstream: str) -> None:
    if kind == "upstream":
        import uvicorn

        uvicorn.run(
            hello_app,
            host="127.0.0.1",
            port=port,
            http="httptools",
            loop=loop_name(),
            lifespan="off",
            log_level="warning",
            access_log=False,
            proxy_headers=False,
            server_header=False,
            date_header=False,
        )
        return
    if loop_name() == "uvloop":
        import uvloop

        uvloop.run(_serve_async(kind, port, upstream))
    else:
        asyncio.run(_serve_async(kind, port, upstream))


# ---------------------------------------------------------------------------
# Orchestration.


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported")
    ap.add_argument("--gateway", action="store_true", help="add the real Gateway app rows")
    ap.add_argument("--direct", action="store_true", help="add the upstream itself")
    ap.add_argument("--only", help="comma-separated subset of the Python targets to run")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--upstream", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.serve:
        serve(args.serve, args.port, args.upstream or "")
        return 0

    if not tools_present():
        return 2

    me = [sys.executable, os.path.abspath(__file__)]
    up_port = free_port()
    upstream = f"127.0.0.1:{up_port}"
    tmp = tempfile.mkdtemp(prefix="torpor-server-bench-")
    print_header(args)
    kinds = ["uvicorn", "torpor"] + (["gw-uvicorn", "gw-torpor"] if args.gateway else [])
    if args.only:
        wanted = set(args.only.split(","))
        kinds = [k for k in kinds if k in wanted]
    runs: dict[str, list[dict[str, float]]] = {}
    try:
        with ExitStack() as stack:
            up = stack.enter_context(
                started([*me, "--serve", "upstream", "--port", str(up_port)], up_port)
            )
            targets: dict[str, tuple[int, int, str]] = {}
            if args.direct:
                targets["direct"] = (up_port, up.pid, "/")
            nginx_port = free_port()
            conf = os.path.join(tmp, "nginx.conf")
            with open(conf, "w") as f:
                f.write(NGINX_CONF.format(tmp=tmp, upstream=up_port, port=nginx_port))
            ng = stack.enter_context(
                started(["nginx", "-c", conf, "-p", tmp], nginx_port, stderr=subprocess.DEVNULL)
            )
            targets["nginx"] = (nginx_port, nginx_worker(ng.pid), "/")
            for kind in kinds:
                port = free_port()
                cmd = [*me, "--serve", kind, "--port", str(port), "--upstream", upstream]
                proc = stack.enter_context(started(cmd, port))
                targets[kind] = (port, proc.pid, GATEWAY_PATH if kind.startswith("gw-") else "/")
            for port, _, path in targets.values():  # warm up connections, pools and caches
                wrk(port, 1, args.connections, path=path)
            for _ in range(args.rounds):
                for name, (port, pid, path) in targets.items():
                    r = wrk(port, args.duration, args.connections, pid, path=path)
                    runs.setdefault(name, []).append(r)
                    cpu = f"  cpu {r['cpu_us']:6.1f} us/req" if "cpu_us" in r else ""
                    print(
                        f"  {name:10s} {r['rps']:9.0f} rps  p50 {r['p50']:7.3f} ms"
                        f"  p99 {r['p99']:7.3f} ms{cpu}",
                        flush=True,
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    med = {
        name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()
    }
    print()
    print(f"median of {args.rounds}  {'rps':>9s}{'p50 ms':>9s}{'p99 ms':>9s}{'cpu us/req':>12s}")
    for name, r in med.items():
        cpu = f"{r['cpu_us']:12.1f}" if "cpu_us" in r else ""
        print(f"{name:12s}{r['rps']:10.0f}{r['p50']:9.3f}{r['p99']:9.3f}{cpu}")
    print("  (cpu: the upstream for direct, the nginx worker, else the Python server process)")
    print()
    n = med["nginx"]
    print("ratios of the medians (and, in brackets, the median of the per-round ratios,")
    print("which is steadier when the machine's load drifts between rounds):")
    for kind in [k for k in med if k not in ("nginx", "direct")]:
        p = med[kind]

        def ratio(key: str, kind: str = kind, p: dict[str, float] = p) -> str:
            if key not in p or key not in n:
                return "    -"
            per_round = statistics.median(
                a[key] / b[key] for a, b in zip(runs[kind], runs["nginx"], strict=True)
            )
            return f"{p[key] / n[key]:.2f}x [{per_round:.2f}x]"

        print(
            f"  {kind + '/nginx':17s} rps {ratio('rps')} (target >= 0.80x)"
            f"  p99 {ratio('p99')} (target <= 1.50x)  p50 {ratio('p50')}"
            f"  cpu/req {ratio('cpu_us')}"
        )
    for a, b in (("torpor", "uvicorn"), ("gw-torpor", "gw-uvicorn")):
        if a in med and b in med and "cpu_us" in med[a] and "cpu_us" in med[b]:
            print(
                f"  {a}/{b}: rps {med[a]['rps'] / med[b]['rps']:.2f}x, "
                f"p99 {med[a]['p99'] / med[b]['p99']:.2f}x, "
                f"cpu/request {med[a]['cpu_us'] / med[b]['cpu_us']:.2f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
