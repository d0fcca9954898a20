"""Replica choice for one revision: least in-flight among ready replicas, honouring the
per-replica hard concurrency limit (``scale.concurrency``; 0 = none)."""

from __future__ import annotations

from torpor.gateway.upstream import UpstreamPool


class Backend:
    """One ready replica as the gateway sees it."""

    __slots__ = ("name", "endpoint", "pool", "in_flight", "active")

    def __init__(self, name: str, endpoint: str, pool: UpstreamPool) -> None:
        self.name = name
        self.endpoint = endpoint
        self.pool = pool
        self.in_flight = 0
        self.active = True  # False once the replica drains or disappears


class Balancer:
    __slots__ = ("backends", "limit")

    def __init__(self, limit: int = 0) -> None:
        self.backends: list[Backend] = []
        self.limit = limit

    def pick(self) -> Backend | None:
        """The ready backend with the fewest requests in flight and room for one more."""
        best: Backend | None = None
        for b in self.backends:
            if best is None or b.in_flight < best.in_flight:
                best = b
        if best is None or (self.limit and best.in_flight >= self.limit):
            return None
        best.in_flight += 1
        return best

    def has_room(self, b: Backend) -> bool:
        return b.active and (not self.limit or b.in_flight < self.limit)
