"""The gateway: a pure ASGI app. Host or /function/NAME path -> route -> revision -> replica.

Hot path: one dict lookup for the host, an O(1) weighted pick, a least-in-flight scan of
the revision's replicas, then the pooled upstream proxy. No logging, no regex, no
control-plane round trip. The route table is kept current by ``sync()`` (store change
feed); ``report()`` sends concurrency stats to the autoscaler once a second.

Request bodies are read whole before the request counts anywhere. A ``Content-Length``
over the revision's ``max_body`` is answered 413 at once; a chunked body is read up to
``max_body`` and answered 413 past it. Only a complete body is dispatched: a client
that uploads slowly holds no replica slot, no activator place, no in-flight count the
autoscaler sees, and never wakes a function at zero (the server's ``body_timeout``
ends its upload). Bodies being read or waiting for a replica take at most
``max_buffered`` bytes in all (256 MiB); past that: 503 with ``Retry-After``. These
answers say ``Connection: close`` (the rest of the body is not read) and are not
counted in the revision's stats. (Knative's queue-proxy likewise counts a request from
its dispatch; nginx buffers request bodies by default, as Lambda does.)

A request whose client leaves while it waits in the activator leaves the queue at once
and is neither sent to a replica nor counted. Every proxied request carries
``Forwarded`` / ``X-Forwarded-*`` headers built by ``torpor.gateway.forwarded`` from
the socket's peer; the client's own are replaced unless the peer is a trusted proxy.

``/async-function/NAME[/path]`` (on a Host outside the function domain) is accepted by
``torpor.gateway.calls``: stored, answered 202, run later by the gateway's call worker
through this same app.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable
from time import perf_counter
from typing import Any
from urllib.parse import quote

from torpor.gateway.activator import ClientGone, QueueFull
from torpor.gateway.calls import PREFIX as ASYNC_PREFIX
from torpor.gateway.calls import CallWorker
from torpor.gateway.forwarded import Forwarding, Network
from torpor.gateway.routes import FunctionRoute, RevisionRoute, RouteTable
from torpor.gateway.stats import Sampler, metrics_text
from torpor.gateway.upstream import NotSent, Pools, proxy
from torpor.model import MiB
from torpor.spec import format_size
from torpor.store.base import CHANGES, POKES, STATS, Store
from torpor.store.callq import open_queue

log = logging.getLogger("torpor.gateway")

Scope = dict[str, Any]

H_REVISION = b"x-torpor-revision"
H_COLD = b"x-torpor-cold-start"
TRUE, FALSE = b"true", b"false"
MAX_ATTEMPTS = 3
MAX_BUFFERED = 256 * MiB  # request body bytes held by the gateway at once, all requests
_LOOK = frozenset({b"host", b"content-length", b"transfer-encoding"})
_NOT_COUNTED = 0  # _serve's status for a request that left the queue: no stats


async def send_json(send: Any, status: int, body: dict[str, Any], retry_after: int | None = None,
                    close: bool = False) -> int:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
    return status


async def _until_disconnect(receive: Any) -> None:
    """Return once the client has gone. Called with the body already read, ``receive()``
    blocks until then (a body-less request still gives one empty ``http.request``)."""
    for _ in range(2):
        if (await receive())["type"] == "http.disconnect":
            return
    await asyncio.get_running_loop().create_future()  # a server that never says: wait on


class _Refused(Exception):
    """A request body the gateway will not take: answer ``status`` with ``body`` instead."""

    def __init__(self, status: int, body: dict[str, Any], retry_after: int | None = None) -> None:
        self.status, self.body, self.retry_after = status, body, retry_after


def _over_max_body(rr: RevisionRoute, what: str) -> _Refused:
    return _Refused(413, {"error": "request body too large", "field": "max_body",
                          "detail": f"{what} is over {rr.function}'s max_body ({format_size(rr.max_body)})"})


def _buffer_full() -> _Refused:
    return _Refused(503, {"error": "overloaded", "detail": "the gateway's request body buffer is full"}, 1)


class Gateway:
    def __init__(self, store: Store, *, domain: str = "torpor.localhost", queue: int = 1000,
                 max_buffered: int = MAX_BUFFERED, trusted_proxies: Iterable[Network] = ()) -> None:
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
        self.max_buffered = max_buffered
        self.buffered = 0  # request body bytes held now (being read or waiting to be sent)
        self.forwarding = Forwarding(trusted_proxies)
        self.calls = CallWorker(self, open_queue(store))  # /async-function/: torpor.gateway.calls

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
        self.calls.start()

    async def stop(self, drain: float = 30.0) -> None:
        """Wait for in-flight requests (bounded), then stop background work."""
        await self.calls.stop_claiming()  # calls' tries in flight drain with the rest
        deadline = time.monotonic() + drain
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            log.warning("gateway: %d requests still in flight after %.0fs", self.in_flight, drain)
        await self.calls.stop()  # what is still queued or waiting waits for the next start
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
        length: bytes | None = None
        chunked = False
        for k, v in scope["headers"]:
            if k in _LOOK:
                if k == b"host":
                    if not host:
                        host = v
                elif k == b"content-length":
                    length = v
                else:
                    chunked = True
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
            elif path.startswith(ASYNC_PREFIX):
                await self.calls.accept(scope, receive, send, length, chunked)
                return
            elif path in ("/healthz", "/readyz"):
                await send_json(send, 200, {"status": "ok"})
                return
            elif path == "/metrics":
                body = (metrics_text(self.table) + self.calls.metrics_text()).encode()
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
        first: dict[str, Any] | None = None
        held = 0  # body bytes this request holds of max_buffered
        try:
            if length is not None or chunked:
                try:
                    first, held = await self._read_body(rr, length, receive)
                except _Refused as r:
                    await send_json(send, r.status, r.body, r.retry_after, close=True)
                    return
                if first is None:
                    return  # the client left during its upload
            self.in_flight += 1
            start = perf_counter()
            status = 500
            try:
                status = await self._serve(fr, rr, found[1] is not None, scope, receive, send, host, first)
            finally:
                if status:
                    rr.stats.observe(status, perf_counter() - start)
                self.in_flight -= 1
        finally:
            if held:
                self.buffered -= held

    async def _read_body(self, rr: RevisionRoute, length: bytes | None,
                         receive: Any) -> tuple[dict[str, Any] | None, int]:
        """The whole body as one ``http.request`` message (None: the client left) and the
        bytes it holds of ``max_buffered``; raises _Refused."""
        limit = rr.max_body
        held = 0
        if length is not None:
            try:
                n = int(length)  # (this gateway's server lets digits through only)
            except ValueError:
                n = -1
            if n < 0:
                raise _Refused(400, {"error": "bad request", "detail": "invalid Content-Length"})
            if n > limit:
                raise _over_max_body(rr, f"Content-Length {n}")
            if n > self.max_buffered:
                raise _Refused(413, {"error": "request body too large",
                                     "detail": f"Content-Length {n} is over the gateway's body buffer "
                                               f"({format_size(self.max_buffered)})"})
            if self.buffered + n > self.max_buffered:
                raise _buffer_full()
            held = n
            self.buffered += n
        try:
            parts: list[bytes] = []
            got = 0
            while True:
                msg = await receive()
                if msg["type"] != "http.request":
                    self.buffered -= held
                    return None, 0
                chunk = msg.get("body", b"")
                if chunk:
                    got += len(chunk)
                    if got > held:  # chunked: held grows with what arrives
                        if got > limit:
                            raise _over_max_body(rr, "the body")
                        self.buffered += got - held
                        held = got
                        if self.buffered > self.max_buffered:
                            raise _buffer_full()
                    parts.append(chunk)
                if not msg.get("more_body", False):
                    break
        except BaseException:
            self.buffered -= held
            raise
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        return {"type": "http.request", "body": body, "more_body": False}, held

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
                     send: Any, host: bytes, first_chunk: dict[str, Any] | None) -> int:
        cold = False
        forwarding = self.forwarding.lines(scope, host)
        b = rr.balancer.pick()
        deadline = time.monotonic() + rr.timeout
        for _attempt in range(MAX_ATTEMPTS):
            if b is None:
                if rr.held_at_zero:
                    return await send_json(send, 503, {"error": "scaled to zero",
                        "detail": f"{rr.function} is held at zero replicas by hand (torpor scale --replicas 0)"}, 30)
                cold = cold or not rr.balancer.backends
                self.table.hot.add(rr.name)
                gone = asyncio.ensure_future(_until_disconnect(receive))
                try:
                    b = await rr.activator.wait(max(deadline - time.monotonic(), 0.001), gone)
                except ClientGone:
                    return _NOT_COUNTED  # left the queue: not sent, not counted
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
                finally:
                    gone.cancel()
            if cold:
                rr.stats.cold_starts += 1
            try:
                status = await proxy(
                    b.pool, scope, receive, send,
                    timeout=max(deadline - time.monotonic(), 0.001),
                    add_request_lines=forwarding,
                    add_response_headers=[(H_REVISION, rr.name_b), (H_COLD, TRUE if cold else FALSE)],
                    first_chunk=first_chunk,
                )
            except NotSent as e:
                first_chunk = e.first_chunk
                # the replica is gone (crashed/draining): take it out of rotation, try another
                self.table.eject(rr, b)
                rr.activator.release(b)
                b = rr.balancer.pick()
                continue
            except BaseException:
                rr.activator.release(b)
                raise
            if b.pool.suspect:
                self.table.eject(rr, b)
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
