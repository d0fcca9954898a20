"""slow: sleeps (async), then says which replica answered and how many requests it was
serving at once when this one arrived (``in_flight``, this one included).

Env: SLEEP_MS (default 100) and FAIL_RATE (0..1, that fraction of requests get a 500).
Query: ?ms=N sleeps N ms instead, ?status=N answers with status N, ?fail=PCT answers 500
to PCT percent of requests. A bad parameter is a 400.
"""

import asyncio
import os
import random
import socket

from torpor_runtime import Response

SLEEP_MS = float(os.environ.get("SLEEP_MS") or 100)
FAIL_RATE = float(os.environ.get("FAIL_RATE") or 0)
MAX_MS = 600_000.0
PID = os.getpid()
HOSTNAME = socket.gethostname()
in_flight = 0  # requests inside handle() right now, in this replica


def _number(query, name, default, low, high):
    raw = query.get(name)
    if raw is None:
        return default
    value = float(raw)  # ValueError -> 400 below
    if not low <= value <= high:
        raise ValueError(f"{name} must be within {low}..{high}")
    return value


async def handle(request):
    global in_flight
    in_flight += 1
    try:
        return await _handle(request, in_flight)
    finally:
        in_flight -= 1


async def _handle(request, concurrent):
    query = request.query
    try:
        ms = _number(query, "ms", SLEEP_MS, 0, MAX_MS)
        status = int(_number(query, "status", 200, 200, 599))
        fail_pct = _number(query, "fail", 0, 0, 100)
    except ValueError as exc:
        return Response({"error": "bad parameter", "detail": str(exc)}, status=400)
    if ms > 0:
        await asyncio.sleep(ms / 1000)
    failed = random.random() * 100 < fail_pct or random.random() < FAIL_RATE
    if failed:
        status = 500
    body = {
        "pid": PID,
        "hostname": HOSTNAME,
        "revision": os.environ.get("TORPOR_REVISION"),
        "replica": os.environ.get("TORPOR_REPLICA"),
        "slept_ms": ms,
        "status": status,
        "failed": failed,
        "in_flight": concurrent,  # this request included
    }
    return Response(body, status=status)
