"""Asynchronous calls in the gateway: accepting ``/async-function/NAME[/path]`` and the
call worker that runs queued calls through the gateway's own data path.

Accepting: the function must exist (else 404) and the body must fit its ``max_body``
(else 413), both answered before anything is stored. The request (method, path, query,
headers less hop-by-hop ones, body, the client's address) is written durably to the call
queue (``torpor.store.callq``), then ``202`` with ``X-Call-Id`` and a JSON body. A full
queue answers 503 with ``Retry-After``; a bad ``X-Callback-Url`` 400.

Running: every gateway runs a ``CallWorker``. It claims queued calls of each function, at
most ``async.concurrency`` held at once over all gateways (the queue enforces it), and
sends each one to the gateway's ASGI app as if a client had called
``Host: NAME.<domain>``: route, weighted revision, activator (wakes the function from
zero), balancer, upstream. ``X-Call-Id`` and ``X-Torpor-Attempt`` are added. A call
waiting for its next attempt keeps its place in the concurrency bound. Calls of a
function held at zero by hand are not claimed until it may run again.

Demand: calls in flight count as the revision's in-flight requests in the gateway's
stats; calls still waiting in the queue (at most ``concurrency`` minus those running)
are reported once a second as a poke carrying that count, so a backlog scales the
function up within its bounds and keeps it from scaling to zero. Every gateway sees the
same backlog, so all poke as one source (``async-queue``; the autoscaler keeps the latest
value per source): two gateways do not double the demand.

Retries: try ``n`` (1-based) that fails is followed by a wait of
``min(BACKOFF_BASE * 2 ** (n - 1), BACKOFF_CAP)`` seconds: 0.5 s, 1 s, 2 s, 4 s, 8 s, then
10 s. A 5xx from a replica, its timeout (504) or a connection lost mid-answer costs an
attempt; the call fails once ``async.max_attempts`` attempts were made. Any other answer
(2xx, 3xx, 4xx) is final. A gateway refusal that never reached a replica (no replica ready
within the timeout, a full activator queue, a revision gone) costs no attempt: the call
is tried again after the backoff until it is ``MAX_AGE`` (24 h) old.

Reclaiming: held calls are touched every ``HEARTBEAT`` s; a call whose worker has been
silent for ``RECLAIM_IDLE`` s (its gateway died) is taken over by another gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from torpor.gateway.asgi import Message, Receive, Scope, Send
from torpor.gateway.callback import Allow, CallbackRefused, check_url, deliver
from torpor.gateway.errors import Refused, send_json
from torpor.gateway.tasks import cancelled
from torpor.messages import Poke
from torpor.model import MAX_AGE, MAX_HEADERS, RESULT_CAP, AsyncPolicy, Call, Function, new_id
from torpor.store.base import POKES
from torpor.store.callq import CallQueue, QueueFull

if TYPE_CHECKING:
    from torpor.gateway.app import Gateway
    from torpor.gateway.routes import RevisionRoute

log = logging.getLogger("torpor.gateway.calls")

PREFIX = "/async-function/"
HEARTBEAT = 5.0
RECLAIM_IDLE = 30.0  # s; TORPOR_ASYNC_RECLAIM_IDLE (1..3600) changes it
POLICY_TTL = 2.0
DEMAND_EVERY = 1.0
DEMAND_SOURCE = "async-queue"  # one source for every gateway: they all see the same backlog
LOOP_PAUSE = 0.01  # s: the worker looks at the queue at most 100 times a second
_DROP = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"expect",
        b"x-callback-url",
        b"x-call-id",
        b"x-torpor-attempt",
    }
)
H_REVISION = b"x-torpor-revision"
BACKOFF_BASE = 0.5  # s before the 2nd try; doubles per try
BACKOFF_CAP = 10.0  # s, the longest wait between tries


def backoff(attempt: int) -> float:
    """Seconds to wait after failed try ``attempt`` (1-based)."""
    if attempt < 1:
        return BACKOFF_BASE
    return min(BACKOFF_BASE * 2 ** min(attempt - 1, 30), BACKOFF_CAP)


def retryable(status: int) -> bool:
    """An answer from a replica that is worth another attempt: any 5xx."""
    return status >= 500


class CallWorker:
    def __init__(self, gateway: Gateway, queue: CallQueue, allow: Allow | None = None) -> None:
        self.gw = gateway
        self.queue = queue
        self.allow = allow if allow is not None else Allow.from_env()
        self.consumer = gateway.id
        self.reclaim_idle = _reclaim_idle()
        self.heartbeat_every = min(HEARTBEAT, self.reclaim_idle / 3)
        self.held: dict[
            str, dict[str, Call]
        ] = {}  # function -> call id -> call, held by this worker
        self.backlog: dict[str, tuple[int, int]] = {}  # last counts: function -> (queued, held)
        self.attempts_total: dict[str, int] = {}
        self.failed_total: dict[str, int] = {}
        self._policies: dict[str, tuple[float, AsyncPolicy | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- accepting -------------------------------------------------------------------------
    async def accept(
        self, scope: Scope, receive: Receive, send: Send, length: bytes | None, chunked: bool
    ) -> None:
        """Answer one request on ``/async-function/NAME[/path]``: 202 once the call is
        stored; 404, 503 or 400 (a refused callback) before anything is read; a refused
        body as ``_read_body`` answers it."""
        path: str = scope["path"]
        name, _, _ = path[len(PREFIX) :].partition("/")
        fr = self.gw.table.functions.get(name)
        if fr is None:
            missing = {"error": "function not found", "detail": f"no function {name[:63]!r}"}
            await send_json(send, 404, missing, close=bool(length and length != b"0") or chunked)
            return
        rr = fr.pick()
        if rr is None:
            idle = {
                "error": "no traffic",
                "detail": f"function {fr.name} has no revision with traffic",
            }
            await send_json(send, 503, idle, 5, close=True)
            return
        callback, stored = _kept_headers(scope["headers"])
        if callback is not None:
            try:
                check_url(callback, self.allow)
            except CallbackRefused as e:
                refused = {"error": "callback refused", "field": "X-Callback-Url", "detail": str(e)}
                await send_json(send, 400, refused, close=True)
                return
        body, held = b"", 0
        if length is not None or chunked:
            got = await self._read_whole(rr, name, length, receive, send)
            if got is None:
                return  # answered, or the client left during its upload: nothing accepted
            body, held = got
        try:
            call = _call_of(scope, name, stored, body, callback)
            try:
                await self.queue.put(call)
            except QueueFull as e:
                await send_json(send, 503, {"error": "queue full", "detail": str(e)}, 5)
                return
        finally:
            if held:
                self.gw.buffered -= held
        self._wake.set()
        accepted = {
            "id": call.id,
            "function": name,
            "state": "queued",
            "status_url": f"/v1/calls/{call.id}",
        }
        await send_json(send, 202, accepted, headers=[(b"x-call-id", call.id.encode())])

    async def _read_whole(
        self, rr: RevisionRoute, name: str, length: bytes | None, receive: Receive, send: Send
    ) -> tuple[bytes, int] | None:
        """The whole request body and the bytes it holds of the gateway's body buffer
        (the caller gives them back); None when it was refused (answered here) or the
        client left. A body over the streaming threshold is read whole: a call keeps it."""
        try:
            first, held, upload = await self.gw._read_body(rr, length, receive)
        except Refused as r:
            await send_json(send, r.status, r.body, r.retry_after, close=True)
            return None
        if first is None:
            return None
        body = first["body"]
        if upload is None:
            return body, held
        try:
            parts, more = [body], bool(first.get("more_body"))
            while more:
                msg = await upload.receive()
                if msg["type"] != "http.request":
                    if upload.over:
                        over = {
                            "error": "request body too large",
                            "field": "max_body",
                            "detail": f"the body is over {name}'s max_body",
                        }
                        await send_json(send, 413, over, close=True)
                    self.gw.buffered -= held
                    return None
                parts.append(msg.get("body", b""))
                more = bool(msg.get("more_body"))
        except BaseException:
            self.gw.buffered -= held
            raise
        return b"".join(parts), held

    # -- the worker loop -------------------------------------------------------------------
    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="gateway-calls")

    async def stop_claiming(self) -> None:
        """Claim nothing more and start no new try; tries in flight go on (they are the
        gateway's in-flight requests, which it drains)."""
        self._stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)

    async def stop(self) -> None:
        """Stop everything; what is still held (waiting for its next try, or cut off) runs
        again: after a restart of this store, or on another gateway once reclaimed."""
        self._stopping = True
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        last_beat = last_demand = 0.0
        last_reclaim = last_prune = time.monotonic()
        while True:
            try:
                now = time.monotonic()
                if now - last_beat >= self.heartbeat_every:
                    last_beat = now
                    await self.queue.heartbeat(
                        self.consumer, [c for d in self.held.values() for c in d.values()]
                    )
                if now - last_reclaim >= self.heartbeat_every:
                    last_reclaim = now
                    for call in await self.queue.reclaim(self.consumer, self.reclaim_idle):
                        self._spawn(call)
                self.backlog = await self.queue.counts()
                for fn, (queued, _held) in self.backlog.items():
                    if queued:
                        await self._claim(fn)
                if now - last_demand >= DEMAND_EVERY:
                    last_demand = now
                    await self._report_demand()
                prune = getattr(
                    self.queue, "prune", None
                )  # the embedded queue forgets old records itself
                if prune is not None and now - last_prune >= 60:
                    last_prune = now
                    await prune()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("calls: worker loop failed; retrying in 1s")
                await asyncio.sleep(1)
            waiter = asyncio.ensure_future(self.queue.wait(0.5))
            woken = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter, woken}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                await cancelled(waiter)
                await cancelled(woken)
            self._wake.clear()
            await asyncio.sleep(LOOP_PAUSE)  # a burst of accepts or ends: one look per pause

    async def policy(self, name: str) -> AsyncPolicy | None:
        """The function's ``async:`` policy (of its revision with the most traffic); None if
        the function is gone."""
        now = time.monotonic()
        got = self._policies.get(name)
        if got is not None and now - got[0] < POLICY_TTL:
            return got[1]
        fn = await self.gw.store.get_function(name)
        pol = _policy(fn) if fn is not None else None
        self._policies[name] = (now, pol)
        return pol

    def _held_at_zero(self, name: str) -> bool:
        fr = self.gw.table.functions.get(name)
        return fr is not None and bool(fr.slots) and all(rr.held_at_zero for rr in fr.slots)

    async def _claim(self, name: str) -> None:
        pol = await self.policy(name)
        if pol is None:
            limit = 1  # the function is gone: claim its calls one by one to fail them
        elif self._held_at_zero(name) or name not in self.gw.table.functions:
            return  # held at zero by hand, or not routed yet: the calls wait
        else:
            limit = pol.concurrency
        mine = self.held.get(name, {})
        free = limit - len(mine)
        if free <= 0:
            return
        for call in await self.queue.claim(name, free, limit, self.consumer):
            self._spawn(call)

    def _spawn(self, call: Call) -> None:
        self.held.setdefault(call.function, {})[call.id] = call
        task = asyncio.create_task(self._run_call(call), name=f"call-{call.id[:8]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _report_demand(self) -> None:
        for name, (queued, held) in self.backlog.items():
            if not queued:
                continue
            pol = await self.policy(name)
            fr = self.gw.table.functions.get(name)
            if pol is None or fr is None or not fr.slots or self._held_at_zero(name):
                continue
            waiting = min(queued, max(pol.concurrency - held, 0))
            if waiting <= 0:
                continue
            rr = max(
                fr.slots, key=lambda r: sum(1 for s in fr.slots if s is r)
            )  # the main revision
            poke = Poke(function=name, revision=rr.name, queued=waiting, gateway=DEMAND_SOURCE)
            await self.gw.store.publish(POKES, dict(poke))

    # -- one call ----------------------------------------------------------------------------
    async def _run_call(self, call: Call) -> None:
        try:
            await self._attempts(call)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("calls: %s failed in the worker", call.id)
            call.state, call.error, call.finished = (
                "failed",
                f"worker error: {type(e).__name__}",
                time.time(),
            )
            with contextlib.suppress(Exception):
                await self.queue.finish(call)
        finally:
            self.held.get(call.function, {}).pop(call.id, None)
            self._wake.set()

    async def _attempts(self, call: Call) -> None:
        while True:
            pol = await self.policy(call.function)
            if pol is None:
                await self._final(call, "failed", error="function deleted")
                return
            if time.time() - call.created > MAX_AGE:
                await self._final(
                    call, "failed", error=f"not delivered to a replica within {MAX_AGE:g}s"
                )
                return
            if self._stopping:
                return  # left held: it runs again after the restart (or where it is reclaimed)
            if self._held_at_zero(call.function) or call.function not in self.gw.table.functions:
                await asyncio.sleep(1.0)  # held at zero by hand (or not routed yet): no try
                continue
            call.tries += 1
            call.state = "running"
            await self.queue.save(call)
            self.attempts_total[call.function] = self.attempts_total.get(call.function, 0) + 1
            status, headers, body, truncated, delivered, error = await self._dispatch(
                call, call.attempts + 1
            )
            if delivered:
                call.attempts += 1
            call.status = status
            call.result_headers, call.result_body, call.truncated, call.error = (
                headers,
                body,
                truncated,
                error,
            )
            if delivered and status is not None and not retryable(status):
                await self._final(call, "done")
                return
            if delivered and call.attempts >= pol.max_attempts:
                await self._final(call, "failed")
                return
            call.state = "queued"
            await self.queue.save(call)
            await asyncio.sleep(backoff(call.tries))

    async def _final(self, call: Call, state: str, error: str | None = None) -> None:
        call.state = state  # type: ignore[assignment]
        if error is not None:
            call.error = error
        call.finished = time.time()
        if state == "failed":
            self.failed_total[call.function] = self.failed_total.get(call.function, 0) + 1
        if call.callback:
            call.callback_state = "pending"
        await self.queue.finish(call)
        self.held.get(call.function, {}).pop(
            call.id, None
        )  # its slot is free while the callback goes
        self._wake.set()
        if call.callback:
            call.callback_state = await deliver(call, self.allow)
            await self.queue.finish(call)  # the record again, with how the callback went

    async def _dispatch(
        self, call: Call, attempt: int
    ) -> tuple[int | None, list[tuple[str, str]], bytes, bool, bool, str]:
        """(status, headers, body up to RESULT_CAP, truncated, reached a replica, error)."""
        host = f"{call.function}.{self.gw.domain}".encode()
        headers = [(b"host", host), (b"content-length", str(len(call.body)).encode())]
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in call.headers]
        headers += [(b"x-call-id", call.id.encode()), (b"x-torpor-attempt", str(attempt).encode())]
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": call.method,
            "scheme": "http",
            "path": unquote(call.path),
            "raw_path": call.path.encode("latin-1"),
            "query_string": call.query.encode("latin-1"),
            "root_path": "",
            "headers": headers,
            "client": (call.client or "127.0.0.1", 0),
            "server": ("127.0.0.1", 0),
        }
        done = asyncio.Event()
        sent_body = False

        async def receive() -> Message:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": call.body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        status: int | None = None
        out_headers: list[tuple[str, str]] = []
        parts: list[bytes] = []
        size = 0
        truncated = False
        delivered = False

        async def send(msg: Message) -> None:
            nonlocal status, size, truncated, delivered
            if msg["type"] == "http.response.start":
                status = int(msg["status"])
                for k, v in msg.get("headers", []):
                    if k.lower() == H_REVISION:
                        delivered = True
                    out_headers.append((k.decode("latin-1"), v.decode("latin-1")))
            elif msg["type"] == "http.response.body":
                chunk = msg.get("body", b"")
                if chunk:
                    room = RESULT_CAP - size
                    if len(chunk) > room:
                        truncated = True
                    if room > 0:
                        parts.append(chunk[:room])
                        size += min(len(chunk), room)

        try:
            await self.gw(scope, receive, send)
        except (ConnectionError, OSError) as e:
            return status, out_headers, b"".join(parts), truncated, True, f"connection lost: {e}"
        finally:
            done.set()
        if status is None:
            return None, [], b"", False, False, "no answer"
        error = ""
        if status >= 500:
            error = f"HTTP {status}" + (
                "" if delivered else " from the gateway (no replica reached)"
            )
        return status, out_headers, b"".join(parts), truncated, delivered, error

    # -- metrics ------------------------------------------------------------------------------
    def metrics_text(self) -> str:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self))
        return generate_latest(registry).decode()


def _kept_headers(
    headers: Iterable[tuple[bytes, bytes]],
) -> tuple[str | None, list[tuple[str, str]]]:
    """The ``X-Callback-Url`` (None: none) and the headers a call keeps: at most
    ``MAX_HEADERS``, hop-by-hop, framing and the gateway's own left out."""
    callback = None
    stored: list[tuple[str, str]] = []
    for k, v in headers:
        if k == b"x-callback-url":
            callback = v.decode("latin-1")
        elif k not in _DROP and len(stored) < MAX_HEADERS:
            stored.append((k.decode("latin-1"), v.decode("latin-1")))
    return callback, stored


def _call_of(
    scope: Scope, name: str, headers: list[tuple[str, str]], body: bytes, callback: str | None
) -> Call:
    """The call to store for an accepted request to ``/async-function/NAME[/rest]``."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    prefix = (PREFIX + name).encode()
    rest = raw[len(prefix) :] if raw.startswith(prefix) else b"/"
    client = scope.get("client")
    return Call(
        id=new_id(),
        function=name,
        method=scope["method"],
        path=(rest or b"/").decode("latin-1"),
        query=scope.get("query_string", b"").decode("latin-1"),
        headers=headers,
        body=body,
        callback=callback,
        client=client[0] if client else "",
    )


def _reclaim_idle() -> float:
    raw = os.environ.get("TORPOR_ASYNC_RECLAIM_IDLE", "")
    try:
        value = float(raw) if raw else RECLAIM_IDLE
    except ValueError:
        value = RECLAIM_IDLE
    if not 1.0 <= value <= 3600.0:  # NaN fails it too
        log.warning(
            "TORPOR_ASYNC_RECLAIM_IDLE=%r: expected seconds from 1 to 3600; using %gs",
            raw[:20],
            RECLAIM_IDLE,
        )
        value = RECLAIM_IDLE
    return value


def _policy(fn: Function) -> AsyncPolicy:
    best = None
    for t in fn.traffic:
        rev = fn.revision(t.revision)
        if rev is not None and (best is None or t.percent > best[0]):
            best = (t.percent, rev)
    rev = best[1] if best else fn.latest()
    return rev.spec.async_calls if rev is not None else AsyncPolicy()


class _Collector(Collector):
    def __init__(self, worker: CallWorker) -> None:
        self.w = worker

    def collect(self) -> Iterator[Any]:
        queued = GaugeMetricFamily(
            "torpor_async_queued", "Asynchronous calls waiting to run", labels=["function"]
        )
        running = GaugeMetricFamily(
            "torpor_async_running",
            "Asynchronous calls held by workers (running or waiting for their next attempt)",
            labels=["function"],
        )
        attempts = CounterMetricFamily(
            "torpor_async_attempts",
            "Attempts this gateway made at asynchronous calls",
            labels=["function"],
        )
        failed = CounterMetricFamily(
            "torpor_async_failed",
            "Asynchronous calls this gateway ended as failed",
            labels=["function"],
        )
        held = GaugeMetricFamily(
            "torpor_async_held", "Asynchronous calls this gateway holds now", labels=["function"]
        )
        for fn in sorted(set(self.w.backlog) | set(self.w.attempts_total)):
            q, h = self.w.backlog.get(fn, (0, 0))
            queued.add_metric([fn], q)
            running.add_metric([fn], h)
            held.add_metric([fn], len(self.w.held.get(fn, ())))
        for fn, n in sorted(self.w.attempts_total.items()):
            attempts.add_metric([fn], n)
        for fn, n in sorted(self.w.failed_total.items()):
            failed.add_metric([fn], n)
        yield from (queued, running, attempts, failed, held)
