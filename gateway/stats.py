"""Gateway statistics: in-flight sampling for the autoscaler and Prometheus series.

The per-request cost is a few integer increments (RevisionStats.observe); sampling runs
at 10 Hz in the background and the report goes out once a second through one narrow
interface: ``publish({revision: RevisionReport})`` (the payload's shape is
``torpor.messages``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from torpor.gateway.routes import RevisionStats, RouteTable
from torpor.messages import RevisionReport
from torpor.model import LATENCY_BUCKETS

SAMPLE_EVERY = 0.1
REPORT_EVERY = 1.0


class Sampler:
    def __init__(self, table: RouteTable) -> None:
        self.table = table
        # revision -> (its stats, requests, errors, latency counts) at the last report
        self._last: dict[str, tuple[RevisionStats, int, int, list[int]]] = {}
        self._reported: set[str] = set()  # revisions active in the last report

    async def run(self, publish: Callable[[dict[str, RevisionReport]], Awaitable[None]]) -> None:
        per_report = round(REPORT_EVERY / SAMPLE_EVERY)
        loop = asyncio.get_running_loop()
        while True:
            sums: dict[str, float] = {}
            next_at = loop.time()
            # sample only revisions that can have requests (replicas or a queue), chosen once
            # per report: the sampler's cost must not grow with the number of idle functions
            active = [
                (n, r)
                for n, r in self.table.revisions.items()
                if r.balancer.backends or len(r.activator)
            ]
            for _ in range(per_report):
                if self.table.hot:  # revisions whose requests started queueing since
                    names = {n for n, _ in active}
                    active += [
                        (n, self.table.revisions[n])
                        for n in self.table.hot
                        if n not in names and n in self.table.revisions
                    ]
                    self.table.hot.clear()
                for name, rr in active:
                    c = rr.in_flight + len(rr.activator)
                    if c or name in sums:
                        sums[name] = sums.get(name, 0.0) + c
                next_at += SAMPLE_EVERY
                await asyncio.sleep(max(0.0, next_at - loop.time()))
            await publish(self.collect(sums, per_report))

    def collect(self, sums: dict[str, float], samples: int) -> dict[str, RevisionReport]:
        """One report: every revision with replicas, queue or traffic since the last one."""
        out: dict[str, RevisionReport] = {}
        reported = self._reported
        self._reported = set()
        for name, rr in self.table.revisions.items():
            st = rr.stats
            prev = self._last.get(name)
            if prev is not None and prev[0] is st:
                _, prev_req, prev_err, prev_lat = prev
            else:  # new, or routed again (new counters) since the last report: from zero
                prev_req, prev_err, prev_lat = 0, 0, [0] * len(st.latency_counts)
            requests = st.requests - prev_req
            active = requests or name in sums or rr.balancer.backends or len(rr.activator)
            # one trailing report after a revision goes quiet, so that the autoscaler's last
            # word from this gateway is "0 in flight", not a stale sample
            if not active and name not in reported:
                continue
            if active:
                self._reported.add(name)
            self._last[name] = (st, st.requests, st.by_class[5], list(st.latency_counts))
            out[name] = RevisionReport(
                function=rr.function,
                concurrency=sums.get(name, 0.0) / samples,
                requests=requests,
                errors=st.by_class[5] - prev_err,
                latency=[a - b for a, b in zip(st.latency_counts, prev_lat, strict=True)],
                ready=len(rr.balancer.backends),
                queued=len(rr.activator),
            )
        for gone in set(self._last) - set(self.table.revisions):
            del self._last[gone]
        return out


class _Collector(Collector):
    def __init__(self, table: RouteTable) -> None:
        self.table = table

    def collect(self) -> Iterator[Any]:
        labels = ["function", "revision"]
        requests = CounterMetricFamily(
            "torpor_requests", "Requests answered, by status class", labels=[*labels, "code"]
        )
        cold = CounterMetricFamily(
            "torpor_cold_starts", "Requests that waited for a replica to start", labels=labels
        )
        in_flight = GaugeMetricFamily(
            "torpor_in_flight_requests", "Requests being proxied now", labels=labels
        )
        queued = GaugeMetricFamily(
            "torpor_queued_requests", "Requests waiting in the activator", labels=labels
        )
        ready = GaugeMetricFamily(
            "torpor_ready_replicas", "Replicas the gateway routes to", labels=labels
        )
        latency = HistogramMetricFamily(
            "torpor_request_duration_seconds", "Request latency through the gateway", labels=labels
        )
        for rr in self.table.revisions.values():
            lv = [rr.function, rr.name]
            st = rr.stats
            for cls, n in enumerate(st.by_class):
                if n:
                    requests.add_metric([*lv, f"{cls}xx"], n)
            cold.add_metric(lv, st.cold_starts)
            in_flight.add_metric(lv, rr.in_flight)
            queued.add_metric(lv, len(rr.activator))
            ready.add_metric(lv, len(rr.balancer.backends))
            buckets, acc = [], 0
            for bound, n in zip(LATENCY_BUCKETS, st.latency_counts, strict=False):
                acc += n
                buckets.append((repr(bound), acc))
            buckets.append(("+Inf", acc + st.latency_counts[-1]))
            latency.add_metric(lv, buckets, st.latency_sum)
        yield from (requests, cold, in_flight, queued, ready, latency)


def metrics_text(table: RouteTable) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(table))
    return generate_latest(registry).decode()
