"""Traffic tables as pure functions on the model: how a newly ready revision is routed,
what each rollout step routes, and how a rollout starts, promotes and rolls back.

Nothing here does I/O; every function is safe inside a store mutator (which may be
called more than once). Time comes in as ``now`` (wall clock, seconds).

Rules shared by every table built here:

- The weighted targets come first, in the order given, each keeping the tag it had.
- Every other tag keeps pointing where it pointed, at 0 %: ``TAG-NAME.<domain>`` still
  reaches its revision after the revision leaves the split.
- Revisions that had a percent but are not in the new split and have no tag leave the
  table (they scale to zero through the normal path, then retention collects them).
"""

from __future__ import annotations

import time
from dataclasses import replace

from torpor.model import Function, Revision, Rollout, RolloutPolicy, TrafficTarget

ACTIVE = ("running", "paused")


class RolloutError(ValueError):
    """A rollout that cannot start or act (one line for the user)."""


def split(
    current: list[TrafficTarget], weights: list[tuple[str, int]], tags: dict[str, str] | None = None
) -> list[TrafficTarget]:
    """A new table: ``weights`` (revision, percent) in order, each with the tag it had in
    ``current`` (or the one ``tags`` gives it, which wins over the same tag elsewhere);
    every other tag of ``current`` kept at 0 %. Zero weights are left out (their tags stay)."""
    explicit = dict(tags or {})
    claimed = set(explicit.values())
    used: set[str] = set()
    out: list[TrafficTarget] = []
    for rev, pct in weights:
        if pct <= 0:
            continue
        tag = explicit.pop(rev, None)
        if tag is None:
            tag = next(
                (
                    t.tag
                    for t in current
                    if t.revision == rev and t.tag and t.tag not in claimed and t.tag not in used
                ),
                None,
            )
        if tag is not None:
            used.add(tag)
        out.append(TrafficTarget(rev, pct, tag))
    for rev, tag in explicit.items():  # an explicit tag for a revision without weight
        if tag not in used:
            used.add(tag)
            out.append(TrafficTarget(rev, 0, tag))
    for t in current:
        if t.tag and t.tag not in used and t.tag not in claimed:
            used.add(t.tag)
            out.append(TrafficTarget(t.revision, 0, t.tag))
    return out


def step_weights(canary: str, stable: str, pct: int) -> list[tuple[str, int]]:
    """The split of one rollout step: the canary gets ``pct`` %, the stable revision the rest."""
    pct = max(0, min(100, pct))
    return [(canary, pct), (stable, 100 - pct)]


def step_traffic(
    current: list[TrafficTarget],
    canary: str,
    stable: str,
    pct: int,
    tags: dict[str, str] | None = None,
) -> list[TrafficTarget]:
    return split(current, step_weights(canary, stable, pct), tags)


def sole_traffic(
    current: list[TrafficTarget], rev: str, tags: dict[str, str] | None = None
) -> list[TrafficTarget]:
    """All traffic to ``rev``; every tag kept (others at 0 %)."""
    return split(current, [(rev, 100)], tags)


def main_revision(fn: Function, exclude: str | None = None) -> str | None:
    """The ready revision with the largest share of traffic (the newest on a tie)."""
    best: tuple[int, int, str] | None = None
    shares: dict[str, int] = {}
    for t in fn.traffic:
        shares[t.revision] = shares.get(t.revision, 0) + t.percent
    for name, pct in shares.items():
        rev = fn.revision(name)
        if pct <= 0 or name == exclude or rev is None or rev.status != "ready":
            continue
        key = (pct, rev.number, name)
        if best is None or key > best:
            best = key
    return best[2] if best else None


def validate_steps(steps: object) -> str | None:
    """None if ``steps`` is usable (percents 1..100, strictly increasing, ending with 100),
    else what is wrong, in words."""
    words = "a list of percents from 1 to 100, strictly increasing, ending with 100"
    if not isinstance(steps, list) or not steps:
        return f"expected {words}"
    prev = 0
    for s in steps:
        if not isinstance(s, int) or isinstance(s, bool) or not 1 <= s <= 100 or s <= prev:
            return f"expected {words}, got {str(steps)[:60]}"
        prev = s
    if prev != 100:
        return f"expected {words}; the last step must be 100"
    return None


def canary_steps(pct: int, policy_steps: list[int]) -> list[int]:
    """``deploy --canary PCT``: start at PCT, then the policy's steps above it, ending at 100."""
    steps = [pct] + [s for s in policy_steps if s > pct]
    if steps[-1] != 100:
        steps.append(100)
    return steps


def start_rollout(
    fn: Function,
    to: str,
    policy: RolloutPolicy,
    now: float,
    *,
    steps: list[int] | None = None,
    tags: dict[str, str] | None = None,
) -> Rollout:
    """Start moving traffic to ``to`` (pure; mutates ``fn``). The stable revision is the one
    a running rollout replaces, else the ready revision with the most traffic. A rollout
    that is running or paused is superseded (aborted). A first step of 100 promotes at once."""
    rev = fn.revision(to)
    if rev is None:
        raise RolloutError(f"{fn.name} has no revision {to[:80]!r}")
    if rev.status != "ready":
        raise RolloutError(f"{to} is {rev.status}, not ready")
    steps = list(steps if steps is not None else policy.steps)
    problem = validate_steps(steps)
    if problem:
        raise RolloutError(f"steps: {problem}")
    stable: str | None = None
    old = fn.rollout
    if old is not None and old.state in ACTIVE and old.stable != to:
        st = fn.revision(old.stable)
        if st is not None and st.status == "ready":
            stable = old.stable
    if stable is None:
        stable = main_revision(fn, exclude=to)
    if stable is None:
        raise RolloutError(
            f"no other ready revision serves traffic; {to} has nothing to replace "
            f"(route it by hand: torpor traffic {fn.name} {to}=100)"
        )
    if old is not None and old.state in ACTIVE:
        old.state, old.reason = "aborted", f"superseded by a rollout to {to}"
    ro = Rollout(
        to=to,
        stable=stable,
        steps=steps,
        step=0,
        state="running",
        step_started=now,
        policy=replace(policy, steps=list(steps)),
    )
    fn.rollout = ro
    if steps[0] >= 100:
        promote(fn, ro, "first step is 100%", tags)
    else:
        fn.traffic = step_traffic(fn.traffic, to, stable, steps[0], tags)
    return ro


def advance(fn: Function, ro: Rollout, now: float, reason: str) -> None:
    """Next step (pure); a step of 100 % promotes."""
    nxt = ro.step + 1
    if nxt >= len(ro.steps) or ro.steps[nxt] >= 100:
        ro.step = min(nxt, len(ro.steps) - 1)
        promote(fn, ro, reason)
        return
    ro.step, ro.step_started, ro.reason = nxt, now, reason
    fn.traffic = step_traffic(fn.traffic, ro.to, ro.stable, ro.steps[nxt])


def promote(fn: Function, ro: Rollout, reason: str, tags: dict[str, str] | None = None) -> None:
    fn.traffic = sole_traffic(fn.traffic, ro.to, tags)
    ro.state, ro.reason = "promoted", reason


def roll_back(fn: Function, ro: Rollout, reason: str, state: str = "rolled_back") -> None:
    """All traffic back to the stable revision; ``state`` rolled_back (or aborted)."""
    fn.traffic = sole_traffic(fn.traffic, ro.stable)
    ro.state = "aborted" if state == "aborted" else "rolled_back"
    ro.reason = reason


def rollback_target(fn: Function) -> str | None:
    """The revision ``torpor rollback`` returns to: the stable revision of a running or
    paused rollout; the stable revision of the last promoted rollout while its candidate
    still serves; else the newest ready revision older than the one serving most traffic."""
    ro = fn.rollout

    def ready(name: str) -> bool:
        r = fn.revision(name)
        return r is not None and r.status == "ready"

    if ro is not None and ro.state in ACTIVE and ready(ro.stable):
        return ro.stable
    current = main_revision(fn)
    if ro is not None and ro.state == "promoted" and current == ro.to and ready(ro.stable):
        return ro.stable
    cur = fn.revision(current) if current else None
    older = [
        r for r in fn.revisions if r.status == "ready" and (cur is None or r.number < cur.number)
    ]
    return older[-1].name if older else None


def apply_on_ready(fn: Function, rev: Revision, now: float | None = None) -> None:
    """Route a newly ready revision as its deploy asked (pure; used in a store mutator).

    ``rev.on_ready`` (:class:`~torpor.model.OnReady`): ``promote`` (or no traffic yet):
    100 % to it, tags kept at 0 %; a running rollout is superseded. ``canary`` PCT: a
    rollout starts at PCT % (then the revision's policy steps above PCT). ``none``: no
    percent; only its tag, if any, reaches it.
    """
    intent = rev.on_ready.kind
    tags = {rev.name: rev.tag} if rev.tag else None
    pct = rev.on_ready.percent
    if intent == "canary" and pct is not None and fn.traffic:
        policy = rev.spec.rollout
        try:
            start_rollout(
                fn,
                rev.name,
                policy,
                time.time() if now is None else now,
                steps=canary_steps(pct, policy.steps),
                tags=tags,
            )
            return
        except RolloutError:
            intent = "promote"  # nothing to replace: it simply gets the traffic
    if intent == "none" and fn.traffic:
        if rev.tag:
            fn.traffic = split(
                fn.traffic, [(t.revision, t.percent) for t in fn.traffic if t.percent > 0], tags
            )
        return
    ro = fn.rollout
    if ro is not None and ro.state in ACTIVE:
        ro.state, ro.reason = "aborted", f"superseded by the deploy of {rev.name}"
    fn.traffic = sole_traffic(fn.traffic, rev.name, tags)
