"""Canary rollouts: move traffic step by step, judge the canary on gateway metrics,
promote or roll back by themselves. (Stub: filled in by the rollout work.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torpor.model import Function
from torpor.store.base import Store


class Rollouts:
    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self.store = store
        self.clock = clock

    def observe(self, report: dict[str, Any]) -> None:
        """One gateway stats report (torpor.gateway.stats.Sampler.collect)."""

    async def reconcile(self, fn: Function) -> None:
        """Advance, promote or roll back ``fn.rollout`` (running or paused)."""
