"""`torpor calls` and `torpor invoke --async`: asynchronous calls from the command line.

torpor invoke NAME --async [-d DATA] [--path P] [-X METHOD] [--callback URL]
                                 queue a call at the gateway; prints its id
torpor calls NAME [--limit N] [--json]
                                 the function's recent calls, newest first
torpor calls NAME --id ID [--json]
                                 one call: state, attempts, status and its result
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import httpx


def invoke_async(gateway: str, args: argparse.Namespace, data: bytes | None, path: str) -> int:
    """POST (or -X) to ``/async-function/NAME/path`` and print the call id."""
    method = args.X or "POST"
    headers = {"X-Callback-Url": args.callback} if args.callback else {}
    try:
        with httpx.Client(timeout=args.timeout) as c:
            r = c.request(
                method, f"{gateway}/async-function/{args.name}{path}", content=data, headers=headers
            )
    except httpx.HTTPError as e:
        print(f"torpor: invoke: {e}", file=sys.stderr)
        return 1
    if r.status_code != 202:
        try:
            msg = r.json().get("detail") or r.json().get("error")
        except ValueError:
            msg = r.text[:200]
        print(f"torpor: invoke: {msg} (HTTP {r.status_code})", file=sys.stderr)
        return 1
    print(r.headers.get("x-call-id", ""))
    return 0


def _ago(t: float | None) -> str:
    if not t:
        return "-"
    s = max(0, int(time.time() - t))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def cmd_calls(api: Any, args: argparse.Namespace) -> int:
    if args.id:
        call = api.call("GET", f"/v1/calls/{args.id}")
        if args.json:
            print(json.dumps(call, indent=2))
            return 0
        for key in ("id", "function", "state", "attempts", "status", "error", "callback"):
            print(f"{key + ':':<10}{call.get(key) if call.get(key) is not None else '-'}")
        print(f"{'created:':<10}{_ago(call.get('created'))} ago")
        if call.get("finished"):
            print(f"{'finished:':<10}{_ago(call['finished'])} ago")
        if "body" in call:
            print()
            print(call["body"])
        return 0
    calls = api.call("GET", f"/v1/functions/{args.name}/calls", params={"limit": args.limit})[
        "calls"
    ]
    if args.json:
        print(json.dumps(calls, indent=2))
        return 0
    print(f"{'ID':<34} {'STATE':<8} {'ATTEMPTS':>8} {'STATUS':>6} {'CREATED':>8} {'TOOK':>7}")
    for c in calls:
        took = f"{c['finished'] - c['created']:.1f}s" if c.get("finished") else "-"
        print(
            f"{c['id']:<34} {c['state']:<8} {c['attempts']:>8} {c['status'] or '-':>6} "
            f"{_ago(c['created']):>8} {took:>7}"
        )
    return 0


def add_parsers(sub: Any) -> dict[str, Any]:
    p = sub.add_parser("calls", help="a function's recent asynchronous calls, or one call (--id)")
    p.add_argument("name")
    p.add_argument("--id", help="show one call")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--json", action="store_true")
    return {"calls": cmd_calls}
