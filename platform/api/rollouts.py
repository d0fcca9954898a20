"""Rollout endpoints of the control API.

- ``GET  /v1/functions/{name}/rollout``            the rollout (or null) and the traffic table
- ``POST /v1/functions/{name}/rollout``            start one: ``{"to": REV, "steps": [..],
  "interval": "30s", "max_error_ratio": .05, "max_p95_ratio": 2, "min_requests": 20}``
  (all but ``to`` optional: the candidate's ``rollout:`` section fills the rest)
- ``POST /v1/functions/{name}/rollout/{action}``   pause | resume | promote | abort
- ``POST /v1/functions/{name}/rollback``           traffic back to the previous stable revision

The API only writes desired state; the controller judges and moves running rollouts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from torpor.api.common import ApiError, get_fn, json_body, store_of
from torpor.api.jsonsafe import SafeJSONResponse as JSONResponse  # a stored NaN renders, as null
from torpor.controller import traffic
from torpor.model import Event, Function, Rollout, RolloutPolicy, format_traffic
from torpor.spec import (
    MAX_INTERVAL,
    MAX_MIN_REQUESTS,
    MAX_P95_RATIO,
    SpecError,
    describe,
    parse_duration,
)
from torpor.store.base import Store

ACTIONS = ("pause", "resume", "promote", "abort")
POLICY_KEYS = ("steps", "interval", "max_error_ratio", "max_p95_ratio", "min_requests")


def _fmt(fn: Function) -> str:
    return format_traffic(fn.traffic)


def _view(fn: Function) -> dict[str, Any]:
    return {
        "rollout": asdict(fn.rollout) if fn.rollout else None,
        "traffic": [asdict(t) for t in fn.traffic],
    }


def parse_policy(
    base: RolloutPolicy, body: dict[str, Any], error: Callable[..., Exception] = ApiError
) -> RolloutPolicy:
    """``base`` with the body's policy fields applied, validated with the bounds of
    torpor.yaml (torpor.spec): interval (0, 24h], max_error_ratio 0..1, max_p95_ratio
    1..1000, min_requests 0..10^6. A bad field raises ``error`` (400, ``invalid rollout``)."""
    out = replace(base, steps=list(base.steps))
    if body.get("steps") is not None:
        problem = traffic.validate_steps(body["steps"])
        if problem:
            raise error(400, "invalid rollout", f"steps: {problem}", field="steps")
        out.steps = list(body["steps"])
    if body.get("interval") is not None:
        try:
            out.interval = parse_duration(body["interval"], "interval")
        except SpecError as e:
            raise error(400, "invalid rollout", str(e), field="interval") from e
        if not 0 < out.interval <= MAX_INTERVAL:
            raise error(
                400,
                "invalid rollout",
                "interval: expected a duration > 0 and <= 24h",
                field="interval",
            )

    def number(key: str, low: float, high: float, words: str) -> float | None:
        v = body.get(key)
        if v is None:
            return None
        # compared as given (NaN fails it), before float(): a huge int must not overflow
        if not isinstance(v, int | float) or isinstance(v, bool) or not low <= v <= high:
            raise error(
                400, "invalid rollout", f"{key}: expected {words}, got {describe(v)}", field=key
            )
        return float(v)

    if (v := number("max_error_ratio", 0.0, 1.0, "a number from 0 to 1")) is not None:
        out.max_error_ratio = v
    if (
        v := number("max_p95_ratio", 1.0, MAX_P95_RATIO, f"a number from 1 to {MAX_P95_RATIO:g}")
    ) is not None:
        out.max_p95_ratio = v
    mr = body.get("min_requests")
    if mr is not None:
        if not isinstance(mr, int) or isinstance(mr, bool) or not 0 <= mr <= MAX_MIN_REQUESTS:
            raise error(
                400,
                "invalid rollout",
                f"min_requests: expected an integer from 0 to {MAX_MIN_REQUESTS}, got {describe(mr)}",
                field="min_requests",
            )
        out.min_requests = mr
    return out


async def update(store: Store, name: str, act: Any) -> Function:
    """Run ``act(fn)`` (raises RolloutError or returns None) in a store mutator."""
    problem: list[str] = []

    def mutate(cur: Function | None) -> Function | None:
        problem.clear()
        if cur is None:
            problem.append("gone")
            return None
        try:
            act(cur)
        except traffic.RolloutError as e:
            problem.append(str(e))
            return None
        return cur

    fn = await store.update_function(name, mutate)
    if problem == ["gone"] or fn is None:
        raise ApiError(404, "function not found", f"no function named {name!r}")
    if problem:
        raise ApiError(409, "rollout refused", problem[0])
    return fn


async def get_rollout(request: Request) -> Response:
    fn = await get_fn(store_of(request), request.path_params["name"])
    return JSONResponse(_view(fn))


async def start(request: Request) -> Response:
    store = store_of(request)
    name = request.path_params["name"]
    fn = await get_fn(store, name)
    body = await json_body(request, optional=True)
    unknown = set(body) - {"to", *POLICY_KEYS}
    if unknown:
        key = sorted(unknown)[0][:40]
        raise ApiError(
            400,
            "invalid rollout",
            f"{key}: unknown field; expected to, {', '.join(POLICY_KEYS)}",
            field=key,
        )
    to = body.get("to")
    rev = fn.revision(to) if isinstance(to, str) else None
    if rev is None:
        raise ApiError(
            400,
            "invalid rollout",
            f"to: {str(to)[:80]!r} is not a revision of {name}",
            field="to",
        )
    if rev.status != "ready":
        raise ApiError(
            400, "invalid rollout", f"to: {rev.name} is {rev.status}, not ready", field="to"
        )
    policy = parse_policy(rev.spec.rollout, body)
    now = time.time()

    def act(cur: Function) -> None:
        ro = cur.rollout
        if ro is not None and ro.state in traffic.ACTIVE:
            raise traffic.RolloutError(
                f"a rollout to {ro.to} is {ro.state}; promote or abort it first (torpor rollout {name} --abort)"
            )
        shares = {t.revision: t.percent for t in cur.traffic if t.percent}
        if shares.get(rev.name) == 100:
            raise traffic.RolloutError(f"{rev.name} already serves all traffic")
        traffic.start_rollout(cur, rev.name, policy, now)

    fn2 = await update(store, name, act)
    ro = fn2.rollout
    assert ro is not None
    await store.add_event(
        Event(
            function=name,
            kind="rollout",
            message=(
                f"rollout {ro.stable} -> {ro.to} started: steps {','.join(map(str, ro.steps))}, every "
                f"{ro.policy.interval:g}s, max 5xx {ro.policy.max_error_ratio:.1%}, max p95 x{ro.policy.max_p95_ratio:g}, "
                f"min {ro.policy.min_requests} requests; traffic: {_fmt(fn2)}"
            ),
            data={"to": ro.to, "stable": ro.stable},
        )
    )
    return JSONResponse(_view(fn2), status_code=201)


async def action(request: Request) -> Response:
    store = store_of(request)
    name = request.path_params["name"]
    what = request.path_params["action"]
    if what not in ACTIONS:
        raise ApiError(
            404,
            "not found",
            f"no rollout action {what[:20]!r}; expected one of {', '.join(ACTIONS)}",
        )
    await get_fn(store, name)
    await json_body(request, optional=True)
    now = time.time()

    def act(cur: Function) -> None:
        ro = cur.rollout
        if ro is None or ro.state not in traffic.ACTIVE:
            state = f"the last one was {ro.state}" if ro else "there was none"
            raise traffic.RolloutError(f"{name} has no running or paused rollout ({state})")
        if what == "pause":
            if ro.state == "paused":
                raise traffic.RolloutError("the rollout is already paused")
            ro.state, ro.reason = "paused", "paused by hand"
        elif what == "resume":
            if ro.state == "running":
                raise traffic.RolloutError("the rollout is already running")
            ro.state, ro.reason, ro.step_started = (
                "running",
                "resumed by hand",
                now,
            )  # the step is measured afresh
        elif what == "promote":
            traffic.promote(cur, ro, "promoted by hand")
        else:
            traffic.roll_back(cur, ro, "aborted by hand", state="aborted")

    fn2 = await update(store, name, act)
    ro2: Rollout | None = fn2.rollout
    assert ro2 is not None
    await store.add_event(
        Event(
            function=name,
            kind="rollout",
            message=(
                f"rollout {ro2.stable} -> {ro2.to}: {what} by hand; state {ro2.state}; traffic: {_fmt(fn2)}"
            ),
        )
    )
    return JSONResponse(_view(fn2))


async def rollback(request: Request) -> Response:
    store = store_of(request)
    name = request.path_params["name"]
    await get_fn(store, name)
    await json_body(request, optional=True)
    target: list[str] = []

    def act(cur: Function) -> None:
        target.clear()
        to = traffic.rollback_target(cur)
        if to is None:
            raise traffic.RolloutError(f"{name} has no earlier ready revision to roll back to")
        target.append(to)
        ro = cur.rollout
        if ro is not None and ro.state in traffic.ACTIVE:
            traffic.roll_back(cur, ro, "rolled back by hand")
        else:
            cur.traffic = traffic.sole_traffic(cur.traffic, to)

    fn2 = await update(store, name, act)
    await store.add_event(
        Event(
            function=name,
            kind="rollout",
            message=(f"rolled back to {target[0]} by hand; traffic: {_fmt(fn2)}"),
            data={"to": target[0]},
        )
    )
    return JSONResponse({"revision": target[0], **_view(fn2)})


ROLLOUT_ROUTES = [
    Route("/v1/functions/{name}/rollout", get_rollout, methods=["GET"]),
    Route("/v1/functions/{name}/rollout", start, methods=["POST"]),
    Route("/v1/functions/{name}/rollout/{action}", action, methods=["POST"]),
    Route("/v1/functions/{name}/rollback", rollback, methods=["POST"]),
]
