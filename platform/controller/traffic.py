"""Traffic tables: how a newly ready revision is routed (pure functions on the model)."""

from __future__ import annotations

from torpor.model import Function, Revision, TrafficTarget


def apply_on_ready(fn: Function, rev: Revision) -> None:
    """Route a newly ready revision as its deploy asked (pure; used in a store mutator)."""
    intent = rev.on_ready
    if intent == "promote" or not fn.traffic:
        tagged = [TrafficTarget(t.revision, 0, t.tag) for t in fn.traffic if t.tag and t.revision != rev.name]
        fn.traffic = [TrafficTarget(rev.name, 100, rev.tag), *tagged]
    elif intent.startswith("canary:"):
        pct = int(intent.split(":", 1)[1])
        stable = [t for t in fn.traffic if t.percent > 0]
        rest = 100 - pct
        new: list[TrafficTarget] = [TrafficTarget(rev.name, pct, rev.tag)]
        total = sum(t.percent for t in stable) or 1
        assigned = 0
        for i, t in enumerate(stable):
            share = rest - assigned if i == len(stable) - 1 else round(t.percent * rest / total)
            assigned += share
            new.append(TrafficTarget(t.revision, share, t.tag))
        new += [TrafficTarget(t.revision, 0, t.tag) for t in fn.traffic if t.percent == 0 and t.tag]
        fn.traffic = new
    elif rev.tag:
        fn.traffic = [t for t in fn.traffic if t.tag != rev.tag] + [TrafficTarget(rev.name, 0, rev.tag)]
