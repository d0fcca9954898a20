"""The gateway: a pure ASGI app. Host or /function/NAME path -> route -> revision -> replica.

Hot path: one dict lookup for the host, an O(1) weighted pick, a least-in-flight scan of
the revision's replicas, then the pooled upstream proxy. No logging, no regex, no
control-plane round trip. The route table is kept current by ``sync()`` (store change
feed); ``report()`` sends concurrency stats to the autoscaler once a second.

Request bodies up to ``STREAM_ABOVE`` (1 MiB) are read whole before the request counts
anywhere. A ``Content-Length`` over the revision's ``max_body`` is answered 413 at once;
a chunked body is read up to ``max_body`` and answered 413 past it. Only a complete
small body is dispatched: a client that uploads slowly holds no replica slot, no
activator place, no in-flight count the autoscaler sees, and never wakes a function at
zero (the server's ``body_timeout`` ends its upload). A larger body is dispatched once
its first ``STREAM_ABOVE`` bytes are in, and the rest streams to the replica as it
comes, counted against ``max_body`` (past it: the upstream request is aborted and the
client gets 413 if nothing was answered yet). Streamed responses pass through as they
come; the spec's ``timeout`` bounds the wait for the head, ``stream_idle`` each silence
after it. A WebSocket upgrade (``GET`` with ``Upgrade: websocket``) takes the same
route, activator and balancer, then ``tunnel.py`` pipes it; it holds its replica slot
until it closes. Bodies being read or waiting for a replica take at most
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
from torpor.gateway.balancer import Backend
from torpor.gateway.calls import PREFIX as ASYNC_PREFIX
from torpor.gateway.calls import CallWorker
from torpor.gateway.forwarded import Forwarding, Network
from torpor.gateway.routes import FunctionRoute, RevisionRoute, RouteTable
from torpor.gateway.stats import Sampler, metrics_text
from torpor.gateway.tunnel import Accept, tunnel, wants_websocket
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
_CLIENT_GONE = 499  # proxy's status when the client left before anything was sent
STREAM_ABOVE = 1 * MiB  # request body bytes buffered before dispatch; the rest streams


class _Upload:
    """``receive`` for the rest of a streamed request body: counts it against
    ``max_body``; past it, says the client left (the upstream request is aborted) and
    sets ``over`` so that the client gets a 413."""

    __slots__ = ("_receive", "limit", "got", "over")

    def __init__(self, receive: Any, limit: int, got: int) -> None:
        self._receive, self.limit, self.got, self.over = receive, limit, got, False

    async def receive(self) -> dict[str, Any]:
        if self.over:
            return {"type": "http.disconnect"}
        msg: dict[str, Any] = await self._receive()
        if msg["type"] == "http.request":
            self.got += len(msg.get("body", b""))
            if self.got > self.limit:
                self.over = True
                return {"type": "http.disconnect"}
        return msg


async def send_json(
    send: Any,
    status: int,
    body: dict[str, Any],
    retry_after: int | None = None,
    close: bool = False,
) -> int:
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
    return _Refused(
        413,
        {
            "error": "request body too large",
            "field": "max_body",
            "detail": f"{what} is over {rr.function}'s max_body ({format_size(rr.max_body)})",
        },
    )


def _buffer_full() -> _Refused:
    return _Refused(
        503, {"error": "overloaded", "detail": "the gateway's request body buffer is full"}, 1
    )


class Gateway:
    def __init__(
        self,
        store: Store,
        *,
        domain: str = "torpor.localhost",
        queue: int = 1000,
        max_buffered: int = MAX_BUFFERED,
        trusted_proxies: Iterable[Network] = (),
    ) -> None:
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
        asyncio.ensure_future(
            self.store.publish(
                POKES,
                {"function": function, "revision": revision, "queued": queued, "gateway": self.id},
            )
        )

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
        await self.store.publish(
            STATS, {"gateway": self.id, "time": time.time(), "revisions": revisions}
        )

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
                await send_json(
                    send,
                    404,
                    {"error": "function not found", "detail": f"no function or tag {label[:63]!r}"},
                )
                return
        else:
            path: str = scope["path"]
            if path.startswith("/function/"):
                name, _, rest = path[10:].partition("/")
                found = self.table.hosts.get(name)
                if found is None:
                    await send_json(
                        send,
                        404,
                        {"error": "function not found", "detail": f"no function {name[:63]!r}"},
                    )
                    return
                scope = dict(scope)
                scope["path"] = "/" + rest
                # strip the prefix from the raw (still percent-encoded) path: re-encoding the
                # decoded one would send spaces or %2F as-is to the replica
                raw: bytes = scope.get("raw_path") or path.encode()
                prefix = b"/function/" + name.encode()
                scope["raw_path"] = (
                    (raw[len(prefix) :] or b"/")
                    if raw.startswith(prefix)
                    else quote("/" + rest).encode()
                )
            elif path.startswith(ASYNC_PREFIX):
                await self.calls.accept(scope, receive, send, length, chunked)
                return
            elif path in ("/healthz", "/readyz"):
                await send_json(send, 200, {"status": "ok"})
                return
            elif path == "/metrics":
                body = (metrics_text(self.table) + self.calls.metrics_text()).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
            else:
                await send_json(
                    send,
                    404,
                    {
                        "error": "function not found",
                        "detail": f"use Host: NAME{self.suffix} or /function/NAME/",
                    },
                )
                return
        fr, rr = found
        if rr is None:
            rr = fr.pick()
            if rr is None:
                await send_json(
                    send,
                    503,
                    {
                        "error": "no traffic",
                        "detail": f"function {fr.name} has no revision with traffic",
                    },
                    5,
                )
                return
        first: dict[str, Any] | None = None
        held = 0  # body bytes this request holds of max_buffered
        upload: _Upload | None = None
        accept = wants_websocket(scope) if "extensions" in scope else None
        if accept is not None and (length is not None or chunked):
            await send_json(
                send,
                400,
                {"error": "bad request", "detail": "a WebSocket upgrade has no body"},
                close=True,
            )
            return
        try:
            if length is not None or chunked:
                try:
                    first, held, upload = await self._read_body(rr, length, receive)
                except _Refused as r:
                    await send_json(send, r.status, r.body, r.retry_after, close=True)
                    return
                if first is None:
                    return  # the client left during its upload
                if upload is not None:
                    receive = upload.receive
            self.in_flight += 1
            start = perf_counter()
            status = 500
            try:
                status = await self._serve(
                    fr, rr, found[1] is not None, scope, receive, send, host, first, accept
                )
                if upload is not None and upload.over and status == _CLIENT_GONE:
                    over = _over_max_body(rr, "the body")
                    status = await send_json(send, over.status, over.body, close=True)
            finally:
                if status:
                    rr.stats.observe(status, perf_counter() - start)
                self.in_flight -= 1
        finally:
            if held:
                self.buffered -= held

    async def _read_body(
        self, rr: RevisionRoute, length: bytes | None, receive: Any
    ) -> tuple[dict[str, Any] | None, int, _Upload | None]:
        """The body as one ``http.request`` message (None: the client left), the bytes it
        holds of ``max_buffered``, and for a body over ``STREAM_ABOVE`` the _Upload that
        streams the rest (the message then has ``more_body``); raises _Refused."""
        limit = rr.max_body
        held = 0
        more = False
        if length is not None:
            try:
                n = int(length)  # (this gateway's server lets digits through only)
            except ValueError:
                n = -1
            if n < 0:
                raise _Refused(400, {"error": "bad request", "detail": "invalid Content-Length"})
            if n > limit:
                raise _over_max_body(rr, f"Content-Length {n}")
            n = min(n, STREAM_ABOVE)  # a larger body streams past its first STREAM_ABOVE bytes
            if n > self.max_buffered:
                raise _Refused(
                    413,
                    {
                        "error": "request body too large",
                        "detail": f"Content-Length {n} is over the gateway's body buffer "
                        f"({format_size(self.max_buffered)})",
                    },
                )
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
                    return None, 0, None
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
                if got >= STREAM_ABOVE:
                    more = True
                    break
        except BaseException:
            self.buffered -= held
            raise
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        upload = _Upload(receive, limit, got) if more else None
        return {"type": "http.request", "body": body, "more_body": more}, held, upload

    def _label(self, host: bytes) -> str:
        """The function/tag label of a Host header ('' when not under our domain); memoised,
        bounded (clients choose Host values)."""
        name = host.decode("latin-1").split(":", 1)[0].lower()
        label = name[: -len(self.suffix)] if name.endswith(self.suffix) else ""
        if len(self._labels) >= 4096:
            self._labels.clear()
        self._labels[host] = label
        return label

    async def _serve(
        self,
        fr: FunctionRoute,
        rr: RevisionRoute,
        tagged: bool,
        scope: Scope,
        receive: Any,
        send: Any,
        host: bytes,
        first_chunk: dict[str, Any] | None,
        accept: Accept | None = None,
    ) -> int:
        cold = False
        forwarding = self.forwarding.lines(scope, host)
        b = rr.balancer.pick()
        deadline = time.monotonic() + rr.timeout
        for _attempt in range(MAX_ATTEMPTS):
            if b is None:
                if rr.held_at_zero:
                    return await send_json(
                        send,
                        503,
                        {
                            "error": "scaled to zero",
                            "detail": f"{rr.function} is held at zero replicas by hand (torpor scale --replicas 0)",
                        },
                        30,
                    )
                cold = cold or not rr.balancer.backends
                self.table.hot.add(rr.name)
                # (a body still streaming must stay unread until a replica takes it: then a
                # client that leaves is noticed only when the queue hands the request over)
                streaming = first_chunk is not None and first_chunk.get("more_body", False)
                gone = None if streaming else asyncio.ensure_future(_until_disconnect(receive))
                try:
                    b = await rr.activator.wait(max(deadline - time.monotonic(), 0.001), gone)
                except ClientGone:
                    return _NOT_COUNTED  # left the queue: not sent, not counted
                except QueueFull:
                    return await send_json(
                        send,
                        503,
                        {"error": "overloaded", "detail": f"activator queue for {rr.name} is full"},
                        1,
                    )
                except TimeoutError:
                    return await send_json(
                        send,
                        504,
                        {
                            "error": "no replica ready in time",
                            "detail": f"{rr.name} had no ready replica within {rr.timeout:g}s",
                        },
                        1,
                    )
                except LookupError as e:
                    # the revision left the traffic table while we queued (rollback, promote):
                    # re-pick from the function's current table rather than fail
                    current = self.table.functions.get(fr.name)
                    nxt = current.pick() if current is not None and not tagged else None
                    if nxt is None or nxt is rr:
                        return await send_json(
                            send, 503, {"error": "revision gone", "detail": str(e)}, 1
                        )
                    fr, rr = current, nxt  # type: ignore[assignment]
                    b = rr.balancer.pick()
                    cold = False
                    continue
                finally:
                    if gone is not None:
                        gone.cancel()
            if cold:
                rr.stats.cold_starts += 1
            try:
                if accept is None:
                    status = await proxy(
                        b.pool,
                        scope,
                        receive,
                        send,
                        timeout=max(deadline - time.monotonic(), 0.001),
                        add_request_lines=forwarding,
                        add_response_headers=[
                            (H_REVISION, rr.name_b),
                            (H_COLD, TRUE if cold else FALSE),
                        ],
                        first_chunk=first_chunk,
                        idle_timeout=rr.stream_idle,
                    )
                else:
                    status = await self._tunnel(
                        rr, b, scope, send, accept, deadline, forwarding, cold
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
        return await send_json(
            send,
            503,
            {
                "error": "no replica answered",
                "detail": f"{rr.name}: replicas refused the connection",
            },
            1,
        )

    async def _tunnel(
        self,
        rr: RevisionRoute,
        b: Backend,
        scope: Scope,
        send: Any,
        accept: Accept,
        deadline: float,
        forwarding: bytes,
        cold: bool,
    ) -> int:
        """A WebSocket on replica ``b``: it holds ``b``'s slot (one in flight) until it
        closes; counted once in the stats, with the time to its 101."""
        t0 = perf_counter()
        status = await tunnel(
            b.pool,
            scope,
            send,
            accept,
            timeout=max(deadline - time.monotonic(), 0.001),
            max_connection=rr.max_connection,
            add_request_lines=forwarding,
            add_response_headers=[(H_REVISION, rr.name_b), (H_COLD, TRUE if cold else FALSE)],
            on_open=lambda s: rr.stats.observe(s, perf_counter() - t0),
        )
        return _NOT_COUNTED if status == 101 else status

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
