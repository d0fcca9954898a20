"""Where a process driver cold start spends its time: one line per hop, request at zero ->
first byte, over a few samples.

    python tests/benchmarks/profile_cold.py [--runs 10]

It runs ``torpor up --driver process`` (this script as the command, ``--serve``) with
tracing wrappers around the functions on the path, each appending ``(hop, monotonic
time)`` to a trace file (``CLOCK_MONOTONIC`` is one clock for every process of the
machine, so the replica's own figures line up with the platform's). The hops:

    request    client: before connect (the gateway's socket)
    poke       gateway activator: first poke ("need a replica of R now") sent on the bus
    on_poke    controller: the poke received
    reconcile  controller: the first reconcile pass after it began
    spawn      controller: replica record made, start task created
    drv_start  driver.start called
    fork_req   driver: the request sent (to the spare leased ahead, or to the zygote)
    fork_pid   driver: sent to the leased spare (its pid known), or the zygote's pid read
    listen     replica: listening, about to serve (its own report when it gives one; else
               the ``ready in`` figure of its log added to the fork request, approximate)
    report_read driver: the report read (absent when the controller probes)
    ready      controller: readiness known (report or probe), the replica put as ready
    dispatch   gateway: the new backend is in the table, the queue drained onto it
    first_byte client: the first byte of the response

Each hop is its first occurrence after the request; a line shows the p50 of the time
since the hop before, and of the time since the request. Sampling is as in
bench_cold.py (hold at zero, release, one request).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import DOMAIN, Torpor, function_copy, header, hold_then_release, loadavg, ttfb

HOPS = [
    "request",
    "poke",
    "on_poke",
    "reconcile",
    "spawn",
    "drv_start",
    "fork_req",
    "fork_pid",
    "listen",
    "report_read",
    "ready",
    "dispatch",
    "first_byte",
]
TRACE_ENV = "TORPOR_PROFILE_TRACE"


# ---------------------------------------------------------------------------
# The traced platform (``--serve``): wrappers installed before ``torpor up`` runs.


def _install_tracing(trace_path: str) -> None:
    from torpor.controller import reconcile as rc
    from torpor.drivers import process as pd
    from torpor.drivers import zygoteclient as zc
    from torpor.gateway import activator as act
    from torpor.store import embedded

    out = open(trace_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process

    def mark(hop: str, t: float | None = None, **extra: Any) -> None:
        out.write(json.dumps({"hop": hop, "t": time.monotonic() if t is None else t, **extra}))
        out.write("\n")

    poke_now = act.Activator.poke_now

    def traced_poke_now(self: Any, now: float) -> None:
        before = self._last_poke
        poke_now(self, now)
        if self._last_poke != before:
            mark("poke")

    act.Activator.poke_now = traced_poke_now  # type: ignore[method-assign]

    dispatch = act.Activator.dispatch

    def traced_dispatch(self: Any) -> None:
        waiting = len(self.waiters)
        dispatch(self)
        if waiting and len(self.waiters) < waiting:
            mark("dispatch")

    act.Activator.dispatch = traced_dispatch  # type: ignore[method-assign]

    on_poke = rc.Controller._on_poke

    def traced_on_poke(self: Any, msg: dict[str, Any]) -> None:
        mark("on_poke")
        on_poke(self, msg)

    rc.Controller._on_poke = traced_on_poke  # type: ignore[method-assign]

    reconcile = rc.Controller.reconcile

    async def traced_reconcile(self: Any) -> None:
        mark("reconcile")
        await reconcile(self)

    rc.Controller.reconcile = traced_reconcile  # type: ignore[method-assign]

    spawn_start = rc.Controller._spawn_start

    def traced_spawn_start(self: Any, fn: Any, rev: Any) -> None:
        mark("spawn")
        spawn_start(self, fn, rev)

    rc.Controller._spawn_start = traced_spawn_start  # type: ignore[method-assign]

    start = pd.ProcessDriver.start

    async def traced_start(self: Any, *args: Any, **kwargs: Any) -> Any:
        mark("drv_start")
        return await start(self, *args, **kwargs)

    pd.ProcessDriver.start = traced_start  # type: ignore[method-assign]

    # the fork request and its reply, and the replica's report (its own clock)
    fork = zc.fork

    async def traced_fork(*args: Any, **kwargs: Any) -> Any:
        mark("fork_req")
        try:
            return await fork(*args, **kwargs)
        finally:
            mark("fork_pid")

    zc.fork = traced_fork  # type: ignore[assignment]

    start_on = zc.start_on  # a spare leased ahead: the request goes to it directly

    async def traced_start_on(*args: Any, **kwargs: Any) -> Any:
        mark("fork_req")
        try:
            return await start_on(*args, **kwargs)
        finally:
            mark("fork_pid")

    zc.start_on = traced_start_on  # type: ignore[assignment]

    ready_line = zc.ready_line

    def traced_ready_line(line: bytes, port: int) -> bool:
        ok = ready_line(line, port)
        if ok:
            mark("listen", float(json.loads(line)["t"]))
            mark("report_read")
        return ok

    zc.ready_line = traced_ready_line  # type: ignore[assignment]

    put_replica = embedded.EmbeddedStore.put_replica

    async def traced_put_replica(self: Any, replica: Any) -> None:
        await put_replica(self, replica)
        if replica.state == "ready":
            mark("ready")

    embedded.EmbeddedStore.put_replica = traced_put_replica  # type: ignore[method-assign]


def serve(argv: list[str]) -> None:
    _install_tracing(os.environ[TRACE_ENV])
    from torpor.cli.main import main as cli_main

    cli_main(argv)


# ---------------------------------------------------------------------------
# The client side.


class TracedTorpor(Torpor):
    """``torpor up`` as this script's ``--serve`` (the same arguments)."""

    def __init__(self, state: Path, trace: Path) -> None:
        super().__init__(state, driver="process", env={TRACE_ENV: str(trace)})

    def start(self, wait: float = 30.0) -> Torpor:
        import httpx

        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve",
            "up",
            "--driver",
            "process",
            "--state-dir",
            str(self.state_dir),
            "--port",
            str(self.port),
            "--api-port",
            str(self.api_port),
            "--log-level",
            "warning",
        ]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"traced torpor up exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.api}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"traced torpor up not ready in {wait}s")


READY_IN = re.compile(rb"serving .* \(ready in ([0-9.]+) ms\)")


def sample_hops(trace: Path, since: float, replica_logs: Path) -> dict[str, float]:
    """The first time of each hop after ``since`` (the request)."""
    hops: dict[str, float] = {}
    for raw in trace.read_text().splitlines():
        try:
            ev = json.loads(raw)
        except ValueError:
            continue
        if ev["t"] >= since and ev["hop"] not in hops:
            hops[ev["hop"]] = float(ev["t"])
    if "listen" not in hops and "fork_req" in hops:
        # no report from the replica: its log's "ready in X ms" counts from the fork
        newest = max(replica_logs.glob("*.log"), key=lambda p: p.stat().st_mtime, default=None)
        m = READY_IN.findall(newest.read_bytes()) if newest else []
        if m:
            hops["listen"] = hops["fork_req"] + float(m[-1]) / 1000
    return hops


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    header(f"cold start hop profile, process driver, {args.runs} samples")
    tmp = Path(tempfile.mkdtemp(prefix="torpor-profile-cold-"))
    samples: list[dict[str, float]] = []
    try:
        trace = tmp / "trace.jsonl"
        t = TracedTorpor(tmp / "state", trace)
        try:
            t.start()
            name = "hello"
            t.deploy(function_copy(tmp, "hello", name=name, scale={"idle": "1s"}))
            last = time.monotonic()
            for i in range(args.runs):
                hold_then_release(t, name, 5, last_request=last)
                since = time.monotonic()
                first, _all, status, headers, _body = ttfb(
                    t.port, "/?name=profile", host=f"{name}.{DOMAIN}"
                )
                last = time.monotonic()
                if status != 200 or headers.get("x-torpor-cold-start") != "true":
                    raise RuntimeError(f"sample {i}: not a cold 200: {status} {headers}")
                hops = sample_hops(trace, since, t.state_dir / "replicas")
                hops["request"], hops["first_byte"] = since, since + first
                samples.append(hops)
                at = "  ".join(
                    f"{h} {(hops[h] - since) * 1000:.2f}" for h in HOPS[5:-1] if h in hops
                )
                print(
                    f"   {i + 1:2d}/{args.runs}: first byte {first * 1000:6.2f} ms  ({at})",
                    flush=True,
                )
        finally:
            if t.proc is not None:
                t.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"   {'hop':12s} {'+ms (p50)':>10} {'at ms (p50)':>12} {'n':>4}")
    prev = "request"
    for hop in HOPS[1:]:
        have = [s for s in samples if hop in s and prev in s]
        if not have:
            print(f"   {hop:12s} {'-':>10} {'-':>12} {0:4d}")
            continue
        step = sorted((s[hop] - s[prev]) * 1000 for s in have)
        at_ms = sorted((s[hop] - s["request"]) * 1000 for s in have)
        mid = at_ms[len(at_ms) // 2]
        print(f"   {hop:12s} {step[len(step) // 2]:10.2f} {mid:12.2f} {len(have):4d}")
        prev = hop
    print(f"   load average at the end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
