"""The autoscaler's I/O shell: feeds gateway reports and pokes into the pure per-revision
deciders (``decider.RevisionScaler``) and answers "how many replicas should R have now".

The clock is injected; the controller calls ``decide`` on each reconcile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from torpor.autoscaler.decider import Decision, RevisionScaler
from torpor.messages import parse_stats
from torpor.model import Scale

log = logging.getLogger("torpor.autoscaler")


class Autoscaler:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.scalers: dict[str, RevisionScaler] = {}
        self._scales: dict[str, Scale] = {}
        self.fresh: set[str] = set()  # revisions with a report or poke since their last decision

    def _scaler(self, revision: str, scale: Scale) -> RevisionScaler:
        s = self.scalers.get(revision)
        if s is None:
            s = self.scalers[revision] = RevisionScaler(scale)
            self._scales[revision] = scale
        elif self._scales[revision] != scale:
            s.update_scale(scale)
            self._scales[revision] = scale
        return s

    def observe(self, payload: object, scale_of: Callable[[str], Scale | None]) -> None:
        """One gateway stats report off the bus (``torpor.messages.StatsReport``).

        Parsed by ``parse_stats``: a malformed report is dropped, a malformed entry of it
        too. Each revision's entry stands alone: one the decider refuses (a scale stored
        before it was validated) is skipped, and the others are still recorded. The
        controller reports the refused scale when it decides on that revision.
        """
        report = parse_stats(payload)
        if report is None:
            return
        now = self.clock()
        source = report["gateway"]
        for rev, r in report["revisions"].items():
            try:
                scale = scale_of(rev)
                if scale is None:
                    continue
                self._scaler(rev, scale).record(now, r["concurrency"], r["requests"], source)
            except (ValueError, TypeError, OverflowError) as e:
                log.debug("autoscaler: skipping %s in a report: %s", rev, e)
                continue
            self.fresh.add(rev)

    def poke(self, revision: str, scale: Scale, queued: float = 0.0, source: str = "") -> None:
        """A gateway has ``queued`` requests waiting for a replica of ``revision``."""
        self._scaler(revision, scale).poke(self.clock(), queued, source)
        self.fresh.add(revision)

    def decide(self, revision: str, scale: Scale, ready: int) -> Decision:
        self.fresh.discard(revision)
        return self._scaler(revision, scale).decide(self.clock(), ready)

    def forget(self, revision: str) -> None:
        self.scalers.pop(revision, None)
        self._scales.pop(revision, None)
        self.fresh.discard(revision)
