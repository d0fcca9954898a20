"""Which retired revisions to garbage-collect (pure).

A revision is retired when nothing routes to it: no traffic percent and no tag. It is
never the latest revision, never still building, and never part of a running or paused
rollout (neither its candidate nor its stable revision). The newest ``keep`` retired
revisions stay (with their images: ``torpor rollback`` and ``torpor traffic`` can use
them); older ones are collected. The controller deletes each one once its last replica
has stopped, and removes its image and source copy.
"""

from __future__ import annotations

from torpor.model import Function


def collectable(fn: Function, keep: int) -> list[str]:
    """Revisions of ``fn`` that can be deleted now, oldest first."""
    latest = fn.latest()
    protected = set(fn.routed())
    if latest is not None:
        protected.add(latest.name)
    ro = fn.rollout
    if ro is not None and ro.state in ("running", "paused"):
        protected |= {ro.to, ro.stable}
    retired = [r for r in fn.revisions if r.name not in protected and r.status != "building"]
    retired.sort(key=lambda r: r.number, reverse=True)
    return [r.name for r in reversed(retired[max(keep, 0) :])]
