"""The gateway: a pure ASGI app. Host or /function/NAME path -> route -> revision -> replica.

Hot path: one dict lookup for the host, an O(1) weighted pick, a least-in-flight scan of
the revision's replicas, then the pooled upstream proxy. No logging, no regex, no
control-plane round trip. The route table is kept current by ``_sync()`` (store change
feed); ``_report()`` sends concurrency stats to the autoscaler once a second.

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
import logging
import os
import time
import uuid
from collections.abc import Iterable
from time import perf_counter
from typing import Any
from urllib.parse import quote

from torpor.gateway.activator import ClientGone, QueueFull
from torpor.gateway.asgi import Message, Receive, Scope, Send
from torpor.gateway.balancer import Backend
from torpor.gateway.calls import PREFIX as ASYNC_PREFIX
from torpor.gateway.calls import CallWorker
from torpor.gateway.errors import Refused as _Refused
from torpor.gateway.errors import send_json
from torpor.gateway.forwarded import Forwarding, Network
from torpor.gateway.routes import FunctionRoute, RevisionRoute, RouteTable
from torpor.gateway.stats import Sampler, metrics_text
from torpor.gateway.tasks import Tasks, cancelled
from torpor.gateway.tunnel import Accept, tunnel, wants_websocket
from torpor.gateway.upstream import NotSent, Pools, proxy
from torpor.messages import Poke, RevisionReport, StatsReport
from torpor.model import MiB
from torpor.spec import format_size
from torpor.store.base import CHANGES, POKES, STATS, Store
from torpor.store.callq import open_queue

log = logging.getLogger("torpor.gateway")

__all__ = ["MAX_BUFFERED", "STREAM_ABOVE", "Gateway", "send_json"]

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

    def __init__(self, receive: Receive, limit: int, got: int) -> None:
        self._receive, self.limit, self.got, self.over = receive, limit, got, False

    async def receive(self) -> Message:
        if self.over:
            return {"type": "http.disconnect"}
        msg = await self._receive()
        if msg["type"] == "http.request":
            self.got += len(msg.get("body", b""))
            if self.got > self.limit:
                self.over = True
                return {"type": "http.disconnect"}
        return msg


async def _until_disconnect(receive: Receive) -> None:
    """Return once the client has gone. Called with the body already read, ``receive()``
    blocks until then (a body-less request still gives one empty ``http.request``)."""
    for _ in range(2):
        if (await receive())["type"] == "http.disconnect":
            return
    await asyncio.get_running_loop().create_future()  # a server that never says: wait on


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


# What a Host or /function/NAME/ finds: the function, and the revision a tag names
# (None: pick one by the traffic split).
_Found = tuple[FunctionRoute, RevisionRoute | None]


async def _not_found(send: Send, detail: str) -> None:
    await send_json(send, 404, {"error": "function not found", "detail": detail})


def _held_at_zero(rr: RevisionRoute) -> dict[str, Any]:
    return {
        "error": "scaled to zero",
        "detail": f"{rr.function} is held at zero replicas by hand (torpor scale --replicas 0)",
    }


def _no_traffic(function: str) -> dict[str, Any]:
    return {"error": "no traffic", "detail": f"function {function} has no revision with traffic"}


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
        self._background = Tasks(log, "gateway")  # pokes, pool closes: ended by stop()
        self.in_flight = 0
        self._labels: dict[bytes, str] = {}  # Host header -> label (memo)
        self.max_buffered = max_buffered
        self.buffered = 0  # request body bytes held now (being read or waiting to be sent)
        self.forwarding = Forwarding(trusted_proxies)
        self.calls = CallWorker(self, open_queue(store))  # /async-function/: torpor.gateway.calls

    # -- control-plane side ---------------------------------------------------------------
    def _poke(self, function: str, revision: str, queued: int) -> None:
        poke = Poke(function=function, revision=revision, queued=queued, gateway=self.id)
        self._background.spawn(self.store.publish(POKES, dict(poke)), name="gateway-poke")

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
        await self._background.close()
        await self.pools.close()

    async def refresh(self, name: str) -> None:
        fn = await self.store.get_function(name)
        replicas = await self.store.list_replicas(name) if fn else []
        for endpoint in self.table.apply(name, fn, replicas):
            self._background.spawn(self.pools.discard(endpoint), name="gateway-pool-close")

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

    async def _publish_stats(self, revisions: dict[str, RevisionReport]) -> None:
        report = StatsReport(gateway=self.id, time=time.time(), revisions=revisions)
        await self.store.publish(STATS, dict(report))

    # -- data plane --------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
                await _not_found(send, f"no function or tag {label[:63]!r}")
                return
        elif scope["path"].startswith("/function/"):
            found, scope = self._by_path(scope)
            if found is None:
                name = scope["path"][10:].partition("/")[0]
                await _not_found(send, f"no function {name[:63]!r}")
                return
        else:
            await self._own(scope, receive, send, length, chunked)
            return
        fr, rr = found
        if rr is None:
            rr = fr.pick()
            if rr is None:
                await send_json(send, 503, _no_traffic(fr.name), 5)
                return
        first: Message | None = None
        held = 0  # body bytes this request holds of max_buffered
        upload: _Upload | None = None
        accept = wants_websocket(scope) if "extensions" in scope else None
        if accept is not None and (length is not None or chunked):
            body = {"error": "bad request", "detail": "a WebSocket upgrade has no body"}
            await send_json(send, 400, body, close=True)
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

    def _by_path(self, scope: Scope) -> tuple[_Found | None, Scope]:
        """``/function/NAME[/rest]``: the route of NAME (None: no such function) and the
        scope the replica sees, its path ``/rest``."""
        path: str = scope["path"]
        name, _, rest = path[10:].partition("/")
        found = self.table.hosts.get(name)
        if found is None:
            return None, scope
        scope = dict(scope)
        scope["path"] = "/" + rest
        # strip the prefix from the raw (still percent-encoded) path: re-encoding the
        # decoded one would send spaces or %2F as-is to the replica
        raw: bytes = scope.get("raw_path") or path.encode()
        prefix = b"/function/" + name.encode()
        scope["raw_path"] = (
            (raw[len(prefix) :] or b"/") if raw.startswith(prefix) else quote("/" + rest).encode()
        )
        return found, scope

    async def _own(
        self, scope: Scope, receive: Receive, send: Send, length: bytes | None, chunked: bool
    ) -> None:
        """A path of the gateway itself (a Host outside the function domain):
        ``/async-function/``, health, metrics; anything else is 404."""
        path: str = scope["path"]
        if path.startswith(ASYNC_PREFIX):
            await self.calls.accept(scope, receive, send, length, chunked)
        elif path in ("/healthz", "/readyz"):
            await send_json(send, 200, {"status": "ok"})
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
        else:
            await _not_found(send, f"use Host: NAME{self.suffix} or /function/NAME/")

    async def _read_body(
        self, rr: RevisionRoute, length: bytes | None, receive: Receive
    ) -> tuple[Message | None, int, _Upload | None]:
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
        receive: Receive,
        send: Send,
        host: bytes,
        first_chunk: Message | None,
        accept: Accept | None = None,
    ) -> int:
        """Send the request to a replica of ``rr`` (through the activator when none has
        room), trying another replica when one refuses it unsent (at most MAX_ATTEMPTS);
        returns the status to count (``_NOT_COUNTED``: none)."""
        cold = False
        forwarding = self.forwarding.lines(scope, host)
        b = rr.balancer.pick()
        deadline = time.monotonic() + rr.timeout
        for _attempt in range(MAX_ATTEMPTS):
            if b is None:
                if rr.held_at_zero:
                    return await send_json(send, 503, _held_at_zero(rr), 30)
                cold = cold or not rr.balancer.backends
                got = await self._queue(rr, receive, send, first_chunk, deadline)
                if isinstance(got, LookupError):
                    # the revision left the traffic table while we queued (rollback, promote):
                    # re-pick from the function's current table rather than fail
                    current = self.table.functions.get(fr.name)
                    nxt = current.pick() if current is not None and not tagged else None
                    if current is None or nxt is None or nxt is rr:
                        body = {"error": "revision gone", "detail": str(got)}
                        return await send_json(send, 503, body, 1)
                    fr, rr = current, nxt
                    b = rr.balancer.pick()
                    cold = False
                    continue
                if not isinstance(got, Backend):
                    return got  # answered, or _NOT_COUNTED
                b = got
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
        body = {
            "error": "no replica answered",
            "detail": f"{rr.name}: replicas refused the connection",
        }
        return await send_json(send, 503, body, 1)

    async def _queue(
        self,
        rr: RevisionRoute,
        receive: Receive,
        send: Send,
        first_chunk: Message | None,
        deadline: float,
    ) -> Backend | int | LookupError:
        """Wait in ``rr``'s activator for a replica with room: the backend it hands over;
        else the status answered (503 queue full, 504 none in time) or ``_NOT_COUNTED``
        (the client left the queue: not sent, not counted); or the ``LookupError`` when
        the revision left the traffic table meanwhile (nothing answered yet)."""
        self.table.hot.add(rr.name)
        # (a body still streaming must stay unread until a replica takes it: then a
        # client that leaves is noticed only when the queue hands the request over)
        streaming = first_chunk is not None and first_chunk.get("more_body", False)
        gone = None if streaming else asyncio.ensure_future(_until_disconnect(receive))
        try:
            return await rr.activator.wait(max(deadline - time.monotonic(), 0.001), gone)
        except ClientGone:
            return _NOT_COUNTED
        except QueueFull:
            body = {"error": "overloaded", "detail": f"activator queue for {rr.name} is full"}
            return await send_json(send, 503, body, 1)
        except TimeoutError:
            body = {
                "error": "no replica ready in time",
                "detail": f"{rr.name} had no ready replica within {rr.timeout:g}s",
            }
            return await send_json(send, 504, body, 1)
        except LookupError as e:
            return e
        finally:
            if gone is not None:
                await cancelled(gone)

    async def _tunnel(
        self,
        rr: RevisionRoute,
        b: Backend,
        scope: Scope,
        send: Send,
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

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
