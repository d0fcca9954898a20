"""The gateway: a pure ASGI app. Host or /function/NAME path -> route -> revision -> replica.

Hot path: one dict lookup for the host, an O(1) weighted pick, a least-in-flight scan of
the revision's replicas, then the pooled upstream proxy. No logging, no regex, no
control-plane round trip. The route table is kept current by ``sync()`` (store change
feed); ``report()`` sends concurrency stats to the autoscaler once a second.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from time import perf_counter
from typing import Any
from urllib.parse import quote

from torpor.gateway.activator import QueueFull
from torpor.gateway.routes import FunctionRoute, RevisionRoute, RouteTable
from torpor.gateway.stats import Sampler, metrics_text
from torpor.gateway.upstream import NotSent, Pools, proxy
from torpor.store.base import CHANGES, POKES, STATS, Store

log = logging.getLogger("torpor.gateway")

Scope = dict[str, Any]

H_REVISION = b"x-torpor-revision"
H_COLD = b"x-torpor-cold-start"
TRUE, FALSE = b"true", b"false"
MAX_ATTEMPTS = 3


async def send_json(send: Any, status: int, body: dict[str, Any], retry_after: int | None = None) -> int:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
    return status


class Gateway:
    def __init__(self, store: Store, *, domain: str = "torpor.localhost", queue: int = 1000) -> None:
        self.store = store
        self.domain = domain
        self.suffix = "." + domain
        self.id = f"gw-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.pools = Pools()
        self.table = RouteTable(self.pools, self._poke, queue)
        self.sampler = Sampler(self.table)
        self.synced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.in_flight = 0
        self._labels: dict[bytes, str] = {}  # Host header -> label (memo)

    # -- control-plane side ---------------------------------------------------------------
    def _poke(self, function: str, revision: str, queued: int) -> None:
        asyncio.ensure_future(self.store.publish(
            POKES, {"function": function, "revision": revision, "queued": queued, "gateway": self.id}))

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._sync(), name="gateway-sync"),
            asyncio.create_task(self._report(), name="gateway-report"),
        ]
        await asyncio.wait_for(self.synced.wait(), 30)

    async def stop(self, drain: float = 30.0) -> None:
        """Wait for in-flight requests (bounded), then stop background work."""
        deadline = time.monotonic() + drain
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            log.warning("gateway: %d requests still in flight after %.0fs", self.in_flight, drain)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pools.close()

    async def refresh(self, name: str) -> None:
        fn = await self.store.get_function(name)
        replicas = await self.store.list_replicas(name) if fn else []
        for endpoint in self.table.apply(name, fn, replicas):
            asyncio.ensure_future(self.pools.discard(endpoint))

    async def _sync(self) -> None:
        while True:
            try:
                changes = self.store.subscribe(CHANGES)
                it = changes.__aiter__()
                for fn in await self.store.list_functions():
                    await self.refresh(fn.name)
                self.synced.set()
                async for msg in it:
                    await self.refresh(msg["function"])
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("gateway: route sync failed; resyncing in 1s")
                await asyncio.sleep(1)

    async def _report(self) -> None:
        while True:
            try:
                await self.sampler.run(self._publish_stats)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("gateway: stats reporting failed; retrying")
                await asyncio.sleep(1)

    async def _publish_stats(self, revisions: dict[str, dict[str, Any]]) -> None:
        await self.store.publish(STATS, {"gateway": self.id, "time": time.time(), "revisions": revisions})

    # -- data plane --------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(receive, send)
            return
        host = b""
        for k, v in scope["headers"]:
            if k == b"host":
                host = v
                break
        label = self._labels.get(host)
        if label is None:
            label = self._label(host)
        if label:
            found = self.table.hosts.get(label)
            if found is None:
                await send_json(send, 404, {"error": "function not found", "detail": f"no function or tag {label[:63]!r}"})
                return
        else:
            path: str = scope["path"]
            if path.startswith("/function/"):
                name, _, rest = path[10:].partition("/")
                found = self.table.hosts.get(name)
                if found is None:
                    await send_json(send, 404, {"error": "function not found", "detail": f"no function {name[:63]!r}"})
                    return
                scope = dict(scope)
                scope["path"] = "/" + rest
                # strip the prefix from the raw (still percent-encoded) path: re-encoding the
                # decoded one would send spaces or %2F as-is to the replica
                raw: bytes = scope.get("raw_path") or path.encode()
                prefix = b"/function/" + name.encode()
                scope["raw_path"] = (raw[len(prefix):] or b"/") if raw.startswith(prefix) \
                    else quote("/" + rest).encode()
            elif path in ("/healthz", "/readyz"):
                await send_json(send, 200, {"status": "ok"})
                return
            elif path == "/metrics":
                body = metrics_text(self.table).encode()
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                    (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            else:
                await send_json(send, 404, {"error": "function not found",
                                            "detail": f"use Host: NAME{self.suffix} or /function/NAME/"})
                return
        fr, rr = found
        if rr is None:
            rr = fr.pick()
            if rr is None:
                await send_json(send, 503, {"error": "no traffic", "detail": f"function {fr.name} has no revision with traffic"}, 5)
                return
        self.in_flight += 1
        start = perf_counter()
        status = 500
        try:
            status = await self._serve(fr, rr, found[1] is not None, scope, receive, send)
        finally:
            rr.stats.observe(status, perf_counter() - start)
            self.in_flight -= 1

    def _label(self, host: bytes) -> str:
        """The function/tag label of a Host header ('' when not under our domain); memoised,
        bounded (clients choose Host values)."""
        name = host.decode("latin-1").split(":", 1)[0].lower()
        label = name[: -len(self.suffix)] if name.endswith(self.suffix) else ""
        if len(self._labels) >= 4096:
            self._labels.clear()
        self._labels[host] = label
        return label

    async def _serve(self, fr: FunctionRoute, rr: RevisionRoute, tagged: bool, scope: Scope, receive: Any,
                     send: Any) -> int:
        cold = False
        first_chunk: dict[str, Any] | None = None
        b = rr.balancer.pick()
        deadline = time.monotonic() + rr.timeout
        for _attempt in range(MAX_ATTEMPTS):
            if b is None:
                if rr.held_at_zero:
                    return await send_json(send, 503, {"error": "scaled to zero",
                        "detail": f"{rr.function} is held at zero replicas by hand (torpor scale --replicas 0)"}, 30)
                cold = cold or not rr.balancer.backends
                self.table.hot.add(rr.name)
                try:
                    b = await rr.activator.wait(max(deadline - time.monotonic(), 0.001))
                except QueueFull:
                    return await send_json(send, 503, {"error": "overloaded",
                        "detail": f"activator queue for {rr.name} is full"}, 1)
                except TimeoutError:
                    return await send_json(send, 504, {"error": "no replica ready in time",
                        "detail": f"{rr.name} had no ready replica within {rr.timeout:g}s"}, 1)
                except LookupError as e:
                    # the revision left the traffic table while we queued (rollback, promote):
                    # re-pick from the function's current table rather than fail
                    current = self.table.functions.get(fr.name)
                    nxt = current.pick() if current is not None and not tagged else None
                    if nxt is None or nxt is rr:
                        return await send_json(send, 503, {"error": "revision gone", "detail": str(e)}, 1)
                    fr, rr = current, nxt  # type: ignore[assignment]
                    b = rr.balancer.pick()
                    cold = False
                    continue
            if cold:
                rr.stats.cold_starts += 1
            try:
                status = await proxy(
                    b.pool, scope, receive, send,
                    timeout=max(deadline - time.monotonic(), 0.001),
                    add_response_headers=[(H_REVISION, rr.name_b), (H_COLD, TRUE if cold else FALSE)],
                    first_chunk=first_chunk,
                )
            except NotSent as e:
                first_chunk = e.first_chunk
                # the replica is gone (crashed/draining): take it out of rotation, try another
                if b in rr.balancer.backends:
                    rr.balancer.backends.remove(b)
                    b.active = False
                rr.activator.release(b)
                b = rr.balancer.pick()
                continue
            except BaseException:
                rr.activator.release(b)
                raise
            rr.activator.release(b)
            return status
        return await send_json(send, 503, {"error": "no replica answered",
                                           "detail": f"{rr.name}: replicas refused the connection"}, 1)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
