"""`torpor rollout` and `torpor rollback`.

    torpor rollout NAME --to REV [--steps 10,25,50,100] [--interval 30s] [--max-error-ratio 0.05]
                                 [--max-p95-ratio 2] [--min-requests 20] [--no-watch]
    torpor rollout NAME [--watch]                   status (and follow it)
    torpor rollout NAME --pause|--resume|--promote|--abort
    torpor rollback NAME                             traffic back to the previous stable revision

``--to`` watches until the rollout ends: each step change is printed; exit 0 once
promoted, 4 with the reason once rolled back by the judgement, 1 once aborted. Status
(no action) takes ``-o json|yaml``. Ctrl-C stops watching only:
the rollout runs in the controller.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from torpor.cli.output import EXIT_ROLLED_BACK, add_output, emit
from torpor.model import format_traffic

ACTIVE = ("running", "paused")


def _fail(msg: str, code: int = 1) -> NoReturn:
    print(f"torpor: {msg}", file=sys.stderr)
    sys.exit(code)


def finite_float(text: str) -> float:
    """An argparse type: a finite number (``nan``, ``inf`` and ``1e999`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:20]!r}: expected a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text[:20]!r}: expected a finite number")
    return value


def _steps(text: str) -> list[int]:
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected percents like 10,25,50,100") from None
    if not steps:
        raise argparse.ArgumentTypeError("expected percents like 10,25,50,100")
    return steps


def _traffic(traffic: list[dict[str, Any]]) -> str:
    return format_traffic(traffic)


def _step_line(ro: dict[str, Any]) -> str:
    steps = ro["steps"]
    i = min(ro["step"], len(steps) - 1)
    return f"step {ro['step'] + 1}/{len(steps)}: {ro['to']} at {steps[i]}%, {ro['stable']} at {100 - steps[i]}%"


def _status(ro: dict[str, Any] | None, traffic: list[dict[str, Any]]) -> str:
    if ro is None:
        return f"no rollout; traffic: {_traffic(traffic)}"
    pol = ro.get("policy") or {}
    lines = [
        f"rollout {ro['stable']} -> {ro['to']}: {ro['state']}"
        + (f" ({ro['reason']})" if ro["reason"] else ""),
        f"  steps {','.join(map(str, ro['steps']))}, every {pol.get('interval', 0):g}s, max 5xx "
        f"{pol.get('max_error_ratio', 0):.1%}, max p95 x{pol.get('max_p95_ratio', 0):g}, "
        f"min {pol.get('min_requests', 0)} requests",
    ]
    if ro["state"] in ACTIVE:
        lines.append(f"  {_step_line(ro)}, for {max(0, int(time.time() - ro['step_started']))}s")
    lines.append(f"  traffic: {_traffic(traffic)}")
    return "\n".join(lines)


def watch(
    api: Any, name: str, to: str | None = None, timeout: float | None = None, every: float = 0.5
) -> int:
    """Follow the rollout of ``name`` (to ``to``, if given) until it ends; print each step
    change. 0 once promoted, 1 once rolled back or aborted."""
    deadline = time.monotonic() + timeout if timeout else None
    shown: tuple[Any, ...] | None = None
    try:
        while True:
            out = api.call("GET", f"/v1/functions/{name}/rollout")
            ro, tr = out["rollout"], out["traffic"]
            if ro is None or (to is not None and ro["to"] != to):
                if shown is not None and ro is not None:
                    _fail(
                        f"rollout: superseded by a rollout to {ro['to']}; traffic: {_traffic(tr)}"
                    )
                print(f"no rollout to {to or 'watch'}; traffic: {_traffic(tr)}", file=sys.stderr)
                return 0
            key = (ro["to"], ro["step"], ro["state"])
            if key != shown:
                if shown is None:
                    print(
                        f"rollout {ro['stable']} -> {ro['to']}: steps {','.join(map(str, ro['steps']))}",
                        file=sys.stderr,
                    )
                if ro["state"] == "running":
                    print(
                        f"  {_step_line(ro)}" + (f"  ({ro['reason']})" if ro["reason"] else ""),
                        file=sys.stderr,
                    )
                elif ro["state"] == "paused":
                    print(f"  paused at {_step_line(ro)}", file=sys.stderr)
                shown = key
            if ro["state"] == "promoted":
                print(
                    f"promoted {ro['to']}: {ro['reason']}; traffic: {_traffic(tr)}", file=sys.stderr
                )
                return 0
            if ro["state"] == "rolled_back":
                print(f"rolled back to {ro['stable']}; traffic: {_traffic(tr)}", file=sys.stderr)
                _fail(f"rollout: rolled back: {ro['reason']}", EXIT_ROLLED_BACK)
            if ro["state"] == "aborted":
                _fail(f"rollout: aborted: {ro['reason']}; traffic: {_traffic(tr)}")
            if deadline is not None and time.monotonic() > deadline:
                _fail(
                    f"rollout: still {ro['state']} after {timeout:g}s (it goes on; torpor rollout {name} --watch)"
                )
            time.sleep(every)
    except KeyboardInterrupt:
        print(
            f"\nstopped watching; the rollout goes on (torpor rollout {name} --watch)",
            file=sys.stderr,
        )
        return 130


def cmd_rollout(api: Any, args: argparse.Namespace) -> int:
    name = args.name
    action = next((a for a in ("pause", "resume", "promote", "abort") if getattr(args, a)), None)
    policy_given = any(
        getattr(args, k) is not None
        for k in ("steps", "interval", "max_error_ratio", "max_p95_ratio", "min_requests")
    )
    if action is not None:
        if policy_given:
            _fail(f"rollout: --{action} takes no policy options")
        out = api.call("POST", f"/v1/functions/{name}/rollout/{action}")
        print(_status(out["rollout"], out["traffic"]))
        return watch(api, name, timeout=args.timeout) if args.watch else 0
    if args.to is None:
        if policy_given:
            _fail("rollout: policy options need --to REV")
        if args.watch:
            out = api.call("GET", f"/v1/functions/{name}/rollout")
            if out["rollout"] is None or out["rollout"]["state"] not in ACTIVE:
                print(_status(out["rollout"], out["traffic"]))
                return 0
            return watch(api, name, timeout=args.timeout)
        out = api.call("GET", f"/v1/functions/{name}/rollout")
        if not emit(args, out):
            print(_status(out["rollout"], out["traffic"]))
        return 0
    body: dict[str, Any] = {"to": args.to}
    for k in ("steps", "interval", "max_error_ratio", "max_p95_ratio", "min_requests"):
        v = getattr(args, k)
        if v is not None:
            body[k] = v
    out = api.call("POST", f"/v1/functions/{name}/rollout", json=body)
    ro = out["rollout"]
    print(
        f"rollout {ro['stable']} -> {ro['to']} started; traffic: {_traffic(out['traffic'])}",
        file=sys.stderr,
    )
    if args.no_watch:
        return 0
    return watch(api, name, to=args.to, timeout=args.timeout)


def cmd_rollback(api: Any, args: argparse.Namespace) -> int:
    out = api.call("POST", f"/v1/functions/{args.name}/rollback")
    print(f"rolled back to {out['revision']}; traffic: {_traffic(out['traffic'])}")
    return 0


def add_parsers(sub: Any) -> dict[str, Callable[[Any, argparse.Namespace], int]]:
    """Add subcommands to ``sub``; return {command name: handler(api, args)}."""
    ro = sub.add_parser(
        "rollout", help="start, watch, pause, resume, promote or abort a gradual rollout"
    )
    ro.add_argument("name")
    acts = ro.add_mutually_exclusive_group()
    acts.add_argument(
        "--to", metavar="REV", help="start a rollout to this revision (then watch it)"
    )
    acts.add_argument("--pause", action="store_true", help="hold traffic at the current step")
    acts.add_argument(
        "--resume",
        action="store_true",
        help="continue a paused rollout (the step is measured afresh)",
    )
    acts.add_argument("--promote", action="store_true", help="give the candidate 100%% now")
    acts.add_argument(
        "--abort", action="store_true", help="stop; all traffic back to the stable revision"
    )
    ro.add_argument(
        "--steps", type=_steps, metavar="P,P,...", help="percents per step, ending with 100"
    )
    ro.add_argument("--interval", metavar="DURATION", help="minimum time per step (30s, 2m)")
    ro.add_argument(
        "--max-error-ratio",
        type=finite_float,
        metavar="F",
        help="canary 5xx/requests that rolls back",
    )
    ro.add_argument(
        "--max-p95-ratio",
        type=finite_float,
        metavar="F",
        help="canary p95 / stable p95 that rolls back",
    )
    ro.add_argument(
        "--min-requests", type=int, metavar="N", help="canary requests per step before judging"
    )
    ro.add_argument("--watch", action="store_true", help="follow the rollout until it ends")
    ro.add_argument("--no-watch", action="store_true", help="with --to: start it and return")
    ro.add_argument(
        "--timeout", type=finite_float, metavar="S", help="stop watching after S seconds (exit 1)"
    )
    add_output(ro)
    rb = sub.add_parser("rollback", help="all traffic back to the previous stable revision")
    rb.add_argument("name")
    return {"rollout": cmd_rollout, "rollback": cmd_rollback}
