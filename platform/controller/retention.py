"""Which retired revisions to garbage-collect. (Stub: filled in by the rollout work.)"""

from __future__ import annotations

from torpor.model import Function


def collectable(fn: Function, keep: int) -> list[str]:
    """Revisions of ``fn`` that can be deleted now: out of traffic and beyond the newest ``keep``."""
    return []
