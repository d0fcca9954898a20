"""Adoption: a controller that starts (or is elected) takes over the replicas that run
by their labels (``driver.list()``): those of ready revisions are adopted (unpaused if an
earlier run left them paused, then awaited ready again), the rest are stopped, and replica
records without a process behind them are deleted. While leading, a sweep every
``SWEEP_EVERY`` s adopts or stops replicas no one tracks, once seen on two sweeps (a start
a deposed leader had in flight when this one listed the driver, say); the same listing
finds tracked replicas that died (crash, OOM, kill).
"""

from __future__ import annotations

from torpor.controller.replicas import Replicas
from torpor.controller.state import SWEEP_EVERY, RevisionState, Tracked, log
from torpor.drivers.base import Running
from torpor.model import Replica
from torpor.store.base import FencedError


class Adoption(Replicas):
    """Adoption, the orphan sweep and the liveness check (a part of ``Controller``)."""

    _swept_at: float

    async def _adopt(self) -> None:
        """Adopt replicas of routed revisions that an earlier run (or leader) left; stop the rest."""
        replicas_in_store = {r.name: r for r in await self.store.list_replicas()}
        recall = getattr(self.driver, "recall", None)
        if recall is not None:  # the Docker pool: which revision a pooled container serves
            await recall(
                [
                    (r.driver_id, r.function, r.revision, r.name)
                    for r in replicas_in_store.values()
                    if r.driver_id
                ]
            )
        for running in await self.driver.list():
            replicas_in_store.pop(running.replica, None)
            await self._adopt_one(running)
        for stale in replicas_in_store.values():  # records without a process behind them
            await self.store.delete_replica(stale.function, stale.name)

    async def _adopt_one(self, running: Running) -> None:
        unpause = getattr(self.driver, "unpause", None)
        if unpause is not None and running.alive:
            try:
                await unpause(running)  # a replica left paused by an earlier run
            except FencedError:
                raise
            except Exception as e:
                log.warning("could not unpause %s: %s", running.replica, e)
        fn = self.functions.get(running.function)
        rev = fn.revision(running.revision) if fn else None
        keep = running.alive and fn is not None and rev is not None and rev.status == "ready"
        if not keep:
            await self.driver.stop(running, grace=1.0)
            await self.store.delete_replica(running.function, running.replica)
            return
        rep = Replica(
            name=running.replica,
            function=running.function,
            revision=running.revision,
            state="starting",
            driver_id=running.driver_id,
        )
        tr = Tracked(replica=rep, running=running)
        self.tracked[rep.name] = tr
        tr.task = self._spawn(self._await_ready(tr, adopted=True), name=f"ctl-adopt-{rep.name}")
        await self._event(running.function, "replica", f"adopted {rep.name} ({running.endpoint})")

    async def _sweep_orphans(self, listed_at: float, listing: list[Running]) -> None:
        """Adopt or stop replicas no one tracks, once seen on two sweeps (a start a deposed
        leader had in flight when this one listed the driver, say)."""
        busy: set[str] = getattr(self.driver, "busy", set())
        seen: set[str] = set()
        for r in listing:
            if r.replica in self.tracked or r.replica in self.paused or r.replica in busy:
                continue
            seen.add(r.replica)
            first = self._orphans.setdefault(r.replica, listed_at)
            if listed_at - first < SWEEP_EVERY * 0.9:
                continue
            del self._orphans[r.replica]
            log.warning(
                "controller: %s runs but nobody tracks it: adopting or stopping it", r.replica
            )
            await self._adopt_one(r)
        for name in [n for n in self._orphans if n not in seen]:
            del self._orphans[name]

    async def _check_alive(self) -> None:
        """Find replicas that died under us (crash, OOM, kill), and ones no one tracks."""
        now = self.clock()
        sweep = self.leadership is not None and now - self._swept_at >= SWEEP_EVERY
        if not self.tracked and not sweep:
            return
        listed_at, listing = await self._list()
        if sweep:
            self._swept_at = now
            await self._sweep_orphans(listed_at, listing)
        seen = {r.replica: r for r in listing}
        for tr in list(self.tracked.values()):
            if tr.running is None or tr.replica.state != "ready" or tr.started_at >= listed_at:
                continue  # not ready, or started after (or as) the listing began: judged next time
            r = seen.get(tr.replica.name)
            if r is None or not r.alive:
                code = r.exit_code if r else None
                await self._replica_failed(
                    tr, f"exited (code {code})" if code is not None else "vanished"
                )
            elif self.clock() - tr.ready_since > 10:
                self.revs.setdefault(tr.replica.revision, RevisionState()).failures = 0
