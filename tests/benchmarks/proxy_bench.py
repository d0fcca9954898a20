"""Warm-path proxy benchmark: torpor.gateway.upstream.proxy vs nginx, same upstream, same run.

    python tests/benchmarks/proxy_bench.py [--duration 5] [--connections 32] [--rounds 3]
                                           [--coalesce]

Starts a uvicorn "hello" upstream, nginx (one worker, keepalive 64 to the upstream) and
a uvicorn app whose whole logic is ``proxy(pools.get(upstream), ...)``, then runs
``wrk -t2 --latency`` against the upstream directly, nginx and the proxy, interleaved
for ``--rounds`` rounds. Prints requests/s, p50 and p99 of every run, the medians, the
proxy/nginx ratios, and the CPU time per request of the proxying process (the nginx
worker, the gateway) which varies less than requests/s on a busy machine.

``--coalesce`` adds a row "proxy-cw": the same proxy app served by uvicorn with a
protocol that merges the response head and body writes into one ``send()`` (uvicorn
writes them separately). It is a measurement of what that would buy the gateway, not
something ``torpor.gateway.upstream`` does.

Needs ``wrk`` and ``nginx`` on PATH; uses uvloop when importable. Every process it
starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
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
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

HELLO = b"Hello, World!"


# ---------------------------------------------------------------------------
# Servers (run in child processes through this same file).


async def hello_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"13")],
        }
    )
    await send({"type": "http.response.body", "body": HELLO})


def make_proxy_app(endpoint: str) -> Any:
    from torpor.gateway.upstream import Pools, proxy

    pools = Pools()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await proxy(pools.get(endpoint), scope, receive, send, timeout=30.0)

    return app


def coalescing_protocol() -> type:
    """uvicorn's httptools protocol, with writes made in one loop step sent as one."""
    import asyncio

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class Coalescing:
        def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
            self._t = transport
            self._loop = loop
            self._buf: list[bytes] = []
            self._scheduled = False

        def write(self, data: bytes) -> None:
            self._buf.append(data)
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self._flush)

        def _flush(self) -> None:
            self._scheduled = False
            buf, self._buf = self._buf, []
            if buf and not self._t.is_closing():
                self._t.write(buf[0] if len(buf) == 1 else b"".join(buf))

        def close(self) -> None:
            self._flush()
            self._t.close()

        def __getattr__(self, name: str) -> Any:
            return getattr(self._t, name)

    class Protocol(HttpToolsProtocol):  # type: ignore[misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(Coalescing(transport, self.loop))  # type: ignore[arg-type]

    return Protocol


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def serve(kind: str, port: int, upstream: str | None) -> None:
    import uvicorn

    app = hello_app if kind == "upstream" else make_proxy_app(upstream or "")
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        http=coalescing_protocol() if kind == "proxy-cw" else "httptools",
        loop=loop_name(),
        lifespan="off",
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
    )


# ---------------------------------------------------------------------------
# Orchestration.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


@contextmanager
def started(cmd: list[str], port: int, **kw: Any) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, **kw)
    try:
        wait_port(port, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream up {{
        server 127.0.0.1:{upstream};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (Linux /proc), None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def nginx_worker(master: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{master}/task/{master}/children") as f:
                kids = f.read().split()
            if kids:
                return int(kids[0])
        except OSError:
            return master
        time.sleep(0.05)
    return master


def parse_wrk(out: str) -> dict[str, float]:
    def ms(text: str) -> float:
        m = re.match(r"([\d.]+)(us|ms|s)", text)
        if not m:
            raise ValueError(text)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    def find(pattern: str) -> str:
        m = re.search(pattern, out, re.M)
        if not m:
            raise ValueError(f"wrk output without {pattern!r}:\n{out}")
        return m.group(1)

    result = {
        "rps": float(find(r"Requests/sec:\s+([\d.]+)")),
        "requests": float(find(r"(\d+) requests in")),
        "p50": ms(find(r"^\s+50%\s+(\S+)")),
        "p99": ms(find(r"^\s+99%\s+(\S+)")),
    }
    for pattern in (r"Non-2xx or 3xx responses: \d+", r"Socket errors: .*"):
        m = re.search(pattern, out)
        if m:
            print(f"    wrk: {m.group(0)}")
    return result


def tools_present() -> bool:
    """wrk and nginx are on PATH (else say which is missing)."""
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"{tool} not found on PATH", file=sys.stderr)
            return False
    return True


def print_header(args: argparse.Namespace) -> None:
    print(
        f"loop={loop_name()}  wrk -t2 -c{args.connections} -d{args.duration:g}s  "
        f"{args.rounds} interleaved round(s)  cpus={os.cpu_count()}"
    )


def wrk(
    port: int, duration: float, connections: int, pid: int | None = None, path: str = "/"
) -> dict[str, float]:
    cpu0 = cpu_seconds(pid) if pid else None
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            f"-c{connections}",
            f"-d{duration:g}s",
            "--latency",
            f"http://127.0.0.1:{port}{path}",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=duration + 30,
    ).stdout
    result = parse_wrk(out)
    cpu1 = cpu_seconds(pid) if pid else None
    if cpu0 is not None and cpu1 is not None and result["requests"]:
        result["cpu_us"] = (cpu1 - cpu0) * 1e6 / result["requests"]
    return result


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported")
    ap.add_argument("--coalesce", action="store_true", help="add the proxy-cw row (see above)")
    ap.add_argument("--serve", choices=["upstream", "proxy", "proxy-cw"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--upstream", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.serve:
        serve(args.serve, args.port, args.upstream)
        return 0

    if not tools_present():
        return 2

    me = [sys.executable, os.path.abspath(__file__)]
    up_port = free_port()
    upstream = f"127.0.0.1:{up_port}"
    tmp = tempfile.mkdtemp(prefix="torpor-bench-")
    print_header(args)
    runs: dict[str, list[dict[str, float]]] = {}
    try:
        with ExitStack() as stack:
            up = stack.enter_context(
                started([*me, "--serve", "upstream", "--port", str(up_port)], up_port)
            )
            targets: dict[str, tuple[int, int]] = {"direct": (up_port, up.pid)}
            nginx_port = free_port()
            conf = os.path.join(tmp, "nginx.conf")
            with open(conf, "w") as f:
                f.write(NGINX_CONF.format(tmp=tmp, upstream=up_port, port=nginx_port))
            ng = stack.enter_context(
                started(["nginx", "-c", conf, "-p", tmp], nginx_port, stderr=subprocess.DEVNULL)
            )
            targets["nginx"] = (nginx_port, nginx_worker(ng.pid))
            kinds = ["proxy", "proxy-cw"] if args.coalesce else ["proxy"]
            for kind in kinds:
                port = free_port()
                cmd = [*me, "--serve", kind, "--port", str(port), "--upstream", upstream]
                proc = stack.enter_context(started(cmd, port))
                targets[kind] = (port, proc.pid)
            for port, _ in targets.values():  # warm up connections, pools and caches
                wrk(port, 1, args.connections)
            for _ in range(args.rounds):
                for name, (port, pid) in targets.items():
                    r = wrk(port, args.duration, args.connections, pid)
                    runs.setdefault(name, []).append(r)
                    cpu = f"  cpu {r['cpu_us']:6.1f} us/req" if "cpu_us" in r else ""
                    print(
                        f"  {name:8s} {r['rps']:9.0f} rps  p50 {r['p50']:7.3f} ms"
                        f"  p99 {r['p99']:7.3f} ms{cpu}"
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
    print("  (cpu: the upstream for direct, the nginx worker, the gateway process for proxy)")
    print()
    n = med["nginx"]
    for kind in [k for k in med if k.startswith("proxy")]:
        p = med[kind]
        print(f"{kind}/nginx  rps {p['rps'] / n['rps']:.2f}x (target >= 0.80x)", end="")
        print(f"  p50 {p['p50'] / n['p50']:.2f}x  p99 {p['p99'] / n['p99']:.2f}x (target <= 1.50x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
