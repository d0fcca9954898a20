"""In-memory route table: host label -> function -> weighted revision -> balancer.

Fed by the store's change feed; a warm request never waits on the control plane.
A weighted pick is O(1): each function holds a 100-slot table of revisions built by
smooth weighted round robin, walked by a counter, so the split is exact over every 100
requests and interleaved within them.

Host labels: a function ``NAME`` is at ``NAME``, its tag ``TAG`` at ``TAG-NAME``. If two
claim one label (tag ``canary`` of ``hello`` and a function ``canary-hello``: the API
refuses that, but a store may hold it from before), the label resolves the same way
whatever order the changes arrived in: the function of that name wins; between tags of
two functions, the function whose name sorts first. The loser takes the label back as
soon as the winner lets go of it.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field

from torpor.gateway.activator import Activator
from torpor.gateway.balancer import Backend, Balancer
from torpor.gateway.upstream import Pools
from torpor.model import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_CONNECTION,
    DEFAULT_STREAM_IDLE,
    LATENCY_BUCKETS,
    Function,
    Replica,
)

# How long a replica that dropped a new connection unanswered stays out of rotation while
# the controller still lists it ready (Envoy's outlier ejection, one fixed step).
EJECT_S = 5.0


@dataclass(eq=False)
class RevisionStats:
    """Counters the gateway keeps per revision (exported on /metrics and to the autoscaler)."""

    requests: int = 0
    by_class: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0, 0])  # index = status // 100
    cold_starts: int = 0
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0

    def observe(self, status: int, seconds: float) -> None:
        self.requests += 1
        self.by_class[min(status // 100, 5)] += 1
        self.latency_sum += seconds
        self.latency_counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1


class RevisionRoute:
    """Data-plane state of one revision; survives route rebuilds."""

    __slots__ = (
        "name",
        "function",
        "name_b",
        "timeout",
        "max_body",
        "balancer",
        "activator",
        "stats",
        "held_at_zero",
        "ready",
        "ejected",
        "stream_idle",
        "max_connection",
    )

    def __init__(
        self, function: str, name: str, poke: Callable[[str, str, int], None], queue: int
    ) -> None:
        self.function = function
        self.name = name
        self.name_b = name.encode()
        self.timeout = 30.0
        self.max_body = DEFAULT_MAX_BODY  # the revision's spec.max_body (bytes)
        self.balancer = Balancer()
        self.activator = Activator(
            self.balancer, lambda queued: poke(function, name, queued), queue
        )
        self.stats = RevisionStats()
        self.held_at_zero = False  # `torpor scale --replicas 0`: refuse instead of cold start
        self.ready: list[Replica] = []  # the controller's last list of ready replicas
        self.ejected: dict[str, str] = {}  # replica name -> endpoint, out of rotation for now
        self.stream_idle = DEFAULT_STREAM_IDLE  # silence allowed between response chunks
        self.max_connection = DEFAULT_MAX_CONNECTION  # longest a WebSocket may stay open

    @property
    def in_flight(self) -> int:
        return sum(b.in_flight for b in self.balancer.backends)


class FunctionRoute:
    __slots__ = ("name", "slots", "counter", "tags")

    def __init__(self, name: str) -> None:
        self.name = name
        self.slots: list[RevisionRoute] = []
        self.counter = 0
        self.tags: dict[str, RevisionRoute] = {}

    def pick(self) -> RevisionRoute | None:
        slots = self.slots
        if not slots:
            return None
        self.counter += 1
        return slots[self.counter % len(slots)]


def weighted_slots(weights: list[tuple[str, int]]) -> list[str]:
    """100 slots (or sum of weights) distributed by smooth weighted round robin."""
    weights = [(n, w) for n, w in weights if w > 0]
    total = sum(w for _, w in weights)
    current = {n: 0 for n, _ in weights}
    out: list[str] = []
    for _ in range(total):
        for n, w in weights:
            current[n] += w
        best = max(weights, key=lambda nw: current[nw[0]])[0]
        current[best] -= total
        out.append(best)
    return out


class RouteTable:
    def __init__(
        self, pools: Pools, poke: Callable[[str, str, int], None], queue: int = 1000
    ) -> None:
        self.pools = pools
        self.poke = poke
        self.queue = queue
        self.functions: dict[str, FunctionRoute] = {}
        self.hosts: dict[str, tuple[FunctionRoute, RevisionRoute | None]] = {}
        self.tag_claims: dict[str, set[str]] = {}  # tag host label -> functions with a tag there
        self.revisions: dict[str, RevisionRoute] = {}
        self.hot: set[str] = set()  # revisions that queued a request since the sampler last looked

    def lookup_host(self, label: str) -> tuple[FunctionRoute, RevisionRoute | None] | None:
        return self.hosts.get(label)

    def _revision(self, function: str, name: str) -> RevisionRoute:
        rr = self.revisions.get(name)
        if rr is None:
            rr = self.revisions[name] = RevisionRoute(function, name, self.poke, self.queue)
        return rr

    def apply(self, name: str, fn: Function | None, replicas: list[Replica]) -> list[str]:
        """Rebuild one function's routes; returns endpoints no longer used (pools to drop)."""
        old = self.functions.pop(name, None)
        affected = {name}  # labels whose owner may change
        if old is not None:
            for tag in old.tags:
                label = f"{tag}-{name}"
                affected.add(label)
                claims = self.tag_claims.get(label)
                if claims is not None:
                    claims.discard(name)
                    if not claims:
                        del self.tag_claims[label]
        dropped: list[str] = []
        if fn is None:
            for rev in [r for r in self.revisions.values() if r.function == name]:
                dropped += self._set_backends(rev, [])
                rev.activator.fail_all(LookupError(f"function {name} deleted"))
                del self.revisions[rev.name]
            for label in affected:
                self._resolve(label)
            return dropped
        fr = FunctionRoute(name)
        if old is not None:
            fr.counter = old.counter
        keep: set[str] = set()
        weights = []
        for t in fn.traffic:
            rev = fn.revision(t.revision)
            if rev is None:
                continue
            rr = self._revision(name, rev.name)
            keep.add(rev.name)
            weights.append((rev.name, t.percent))
            if t.tag:
                fr.tags[t.tag] = rr
        by_name = {r.name: self.revisions[r.name] for r in fn.revisions if r.name in self.revisions}
        fr.slots = [by_name[n] for n in weighted_slots(weights)]
        for rev in fn.revisions:
            found = by_name.get(rev.name)
            if found is None or rev.name not in keep:
                continue
            rr = found
            scale = fn.effective_scale(rev)
            rr.timeout = rev.spec.timeout
            rr.max_body = rev.spec.max_body
            rr.stream_idle = rev.spec.stream_idle
            rr.max_connection = rev.spec.max_connection
            rr.balancer.limit = scale.concurrency
            rr.held_at_zero = scale.max == 0
            ready = [
                r for r in replicas if r.revision == rev.name and r.state == "ready" and r.endpoint
            ]
            dropped += self._set_backends(rr, ready)
        # revisions that left the function's routes keep serving in-flight requests only
        for rev_name in [
            n for n, r in self.revisions.items() if r.function == name and n not in keep
        ]:
            rr = self.revisions.pop(rev_name)
            dropped += self._set_backends(rr, [])
            rr.activator.fail_all(LookupError(f"revision {rev_name} no longer routed"))
        self.functions[name] = fr
        for tag in fr.tags:
            label = f"{tag}-{name}"
            self.tag_claims.setdefault(label, set()).add(name)
            affected.add(label)
        for label in affected:
            self._resolve(label)
        return dropped

    def _resolve(self, label: str) -> None:
        """Who answers at ``label``: the function of that name, else the tag of the claiming
        function whose name sorts first, else nobody (see the module docstring)."""
        fr = self.functions.get(label)
        if fr is not None:
            self.hosts[label] = (fr, None)
            return
        for owner in sorted(self.tag_claims.get(label, ())):
            ofr = self.functions.get(owner)
            rr = ofr.tags.get(label[: -len(owner) - 1]) if ofr is not None else None
            if ofr is not None and rr is not None:
                self.hosts[label] = (ofr, rr)
                return
        self.hosts.pop(label, None)

    def eject(self, rr: RevisionRoute, b: Backend) -> None:
        """Take a replica that refused or dropped a new connection out of rotation, for
        ``EJECT_S`` or until the controller stops listing it, whichever comes first."""
        if b in rr.balancer.backends:
            rr.balancer.backends.remove(b)
        b.active = False
        b.pool.suspect = False
        if rr.ejected.get(b.name) != b.endpoint:
            rr.ejected[b.name] = b.endpoint
            asyncio.get_running_loop().call_later(EJECT_S, self._readmit, rr, b.name)

    def _readmit(self, rr: RevisionRoute, name: str) -> None:
        if rr.ejected.pop(name, None) is not None and self.revisions.get(rr.name) is rr:
            self._set_backends(rr, rr.ready)

    def _set_backends(self, rr: RevisionRoute, ready: list[Replica]) -> list[str]:
        current = {b.name: b for b in rr.balancer.backends}
        wanted = {r.name: r for r in ready}
        rr.ready = ready
        for n in [n for n, ep in rr.ejected.items() if n not in wanted or wanted[n].endpoint != ep]:
            del rr.ejected[n]  # gone, or back at a new address: nothing to hold against it
        backends: list[Backend] = []
        for r in ready:
            if r.name in rr.ejected:
                continue
            b = current.get(r.name)
            if b is None or b.endpoint != r.endpoint:
                b = Backend(r.name, r.endpoint, self.pools.get(r.endpoint))
            backends.append(b)
        dropped = []
        for n, b in current.items():
            if n not in wanted:
                b.active = False
                dropped.append(b.endpoint)
        rr.balancer.backends = backends
        if backends and len(rr.activator):
            rr.activator.dispatch()
        return dropped
