"""`torpor top`: a live table of functions, replicas, in-flight and queued requests.

Replicas and desired state come from the API; in-flight and queue figures from the
gateway's /metrics (what the autoscaler sees).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


def gateway_gauges(gateway: str) -> dict[str, dict[str, float]]:
    """revision -> {in_flight, queued, ready, requests} from the gateway's /metrics."""
    out: dict[str, dict[str, float]] = {}
    try:
        text = httpx.get(f"{gateway}/metrics", timeout=2).text
    except httpx.HTTPError:
        return out
    names = {
        "torpor_in_flight_requests": "in_flight",
        "torpor_queued_requests": "queued",
        "torpor_ready_replicas": "ready",
        "torpor_requests_total": "requests",
    }
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = names.get(s.name)
            if key and "revision" in s.labels:
                row = out.setdefault(s.labels["revision"], {})
                row[key] = row.get(key, 0.0) + s.value
    return out


def snapshot(api: Any, gateway: str) -> list[dict[str, Any]]:
    """One row per revision with traffic or replicas (what ``-o json|yaml`` prints)."""
    fns = api.call("GET", "/v1/functions")["functions"]
    gauges = gateway_gauges(gateway)
    rows: list[dict[str, Any]] = []
    for f in fns:
        fn = api.call("GET", f"/v1/functions/{f['name']}", params={"events": 0})
        shown = {t["revision"] for t in fn["traffic"]} | {r["revision"] for r in fn["replicas"]}
        for rev in fn["revisions"]:
            if rev["name"] not in shown:
                continue
            reps = [r for r in fn["replicas"] if r["revision"] == rev["name"]]
            g = gauges.get(rev["name"], {})
            rows.append(
                {
                    "function": fn["name"],
                    "revision": rev["name"],
                    "traffic": rev["traffic"],
                    "ready": sum(r["state"] == "ready" for r in reps),
                    "starting": sum(r["state"] == "starting" for r in reps),
                    "in_flight": int(g.get("in_flight", 0)),
                    "queued": int(g.get("queued", 0)),
                    "requests": int(g.get("requests", 0)),
                }
            )
    return rows


def render(api: Any, gateway: str) -> str:
    lines = [
        f"{'FUNCTION':<20} {'REVISION':<20} {'TRAFFIC':>7} {'READY':>5} {'STARTING':>8} "
        f"{'IN-FLIGHT':>9} {'QUEUED':>6} {'REQUESTS':>9}"
    ]
    for r in snapshot(api, gateway):
        lines.append(
            f"{r['function']:<20} {r['revision']:<20} {r['traffic']:>6}% {r['ready']:>5} {r['starting']:>8} "
            f"{r['in_flight']:>9} {r['queued']:>6} {r['requests']:>9}"
        )
    return "\n".join(lines)


def run_top(api: Any, gateway: str, interval: float, once: bool, output: str = "table") -> int:
    if output != "table":  # machine-readable: one snapshot, as with --once
        from torpor.cli.output import emit

        emit(argparse.Namespace(output=output), snapshot(api, gateway))
        return 0
    if once:
        print(render(api, gateway))
        return 0
    try:
        while True:
            table = render(api, gateway)
            sys.stdout.write(
                "\x1b[H\x1b[2J" + time.strftime("%H:%M:%S") + "  torpor top\n\n" + table + "\n"
            )
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
