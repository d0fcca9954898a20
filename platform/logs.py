"""Replica logs across processes: the API asks, the controller (which owns the driver) answers.

In ``torpor up`` the API reads logs through the driver in its own process. In
distributed mode the API process has no driver, so the two talk over the store's bus:

1. the API subscribes to a private channel ``logs:ID`` and publishes a request on
   ``LOGS`` (``{"id", "function", "follow", "tail"}``);
2. a controller answers on ``logs:ID``: ``{"start": true}``, then ``{"lines": [...]}``
   batches, then ``{"end": true}`` (or ``{"end": true, "error": ...}``);
3. while following, the API re-publishes ``{"id", "keepalive": true}`` every
   ``KEEPALIVE`` seconds and ``{"id", "cancel": true}`` when its client goes away; a
   controller ends a session that missed ``LEASE`` seconds of keep-alives, so a
   vanished API never leaves a log pump running.

No controller answering within ``timeout`` is :class:`LogsUnavailable` (the API's 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from torpor.store.base import Store

log = logging.getLogger("torpor.logs")

LOGS = "logs"  # the request channel; answers go to logs:ID
KEEPALIVE = 5.0  # seconds between an API's keep-alives while following
LEASE = 3 * KEEPALIVE  # a follow session without a keep-alive for this long ends
BATCH = 64  # lines per answer message at most
TAIL_STALL = 30.0  # seconds without a message before a (non-follow) tail gives up

LineSource = Callable[[str, bool, int], AsyncIterator[str]]
"""(function, follow, tail) -> the lines of its replicas (``Platform.logs``)."""
LogReader = Callable[[str, bool, int], Awaitable[AsyncIterator[str]]]
"""What the API calls: opens the stream (raising :class:`LogsUnavailable`), then iterates."""


class LogsUnavailable(Exception):
    """No process with access to the replicas answered."""


@dataclass(frozen=True)
class _Done:
    error: str = ""


def answer_channel(request_id: str) -> str:
    return f"{LOGS}:{request_id}"


async def local_reader(
    source: LineSource, function: str, follow: bool, tail: int
) -> AsyncIterator[str]:
    """The in-process :data:`LogReader`: the driver is right here."""
    return source(function, follow, tail)


async def remote_reader(
    store: Store, function: str, follow: bool, tail: int, timeout: float = 5.0
) -> AsyncIterator[str]:
    """The :data:`LogReader` of an API process without a driver: ask a controller."""
    rid = secrets.token_hex(8)
    sub = store.subscribe(answer_channel(rid))
    try:
        await store.publish(LOGS, {"id": rid, "function": function, "follow": follow, "tail": tail})
        first = await asyncio.wait_for(anext(aiter(sub)), timeout)
    except (TimeoutError, StopAsyncIteration):
        await _close(sub)
        raise LogsUnavailable(f"no controller answered within {timeout:g}s") from None
    except BaseException:
        await _close(sub)
        raise
    if first.get("end"):
        await _close(sub)
        raise LogsUnavailable(str(first.get("error") or "the controller ended the stream at once"))
    return _lines(store, sub, rid, follow)


async def _lines(
    store: Store, sub: AsyncIterator[dict[str, Any]], rid: str, follow: bool
) -> AsyncIterator[str]:
    keepalive = asyncio.create_task(_keep_alive(store, rid)) if follow else None
    try:
        while True:
            try:
                # a tail that stalls this long means its controller is gone; a follow may idle
                async with asyncio.timeout(
                    None if follow else TAIL_STALL
                ):  # not wait_for (lost cancels)
                    msg = await anext(sub)
            except StopAsyncIteration:
                return
            except TimeoutError:
                yield f"[torpor] log stream: no answer from the controller for {TAIL_STALL:g}s"
                return
            for line in msg.get("lines") or ():
                yield str(line)
            if msg.get("end"):
                if msg.get("error"):
                    yield f"[torpor] log stream ended: {msg['error']}"
                return
    finally:
        if keepalive is not None:
            keepalive.cancel()
            with contextlib.suppress(Exception):
                await store.publish(LOGS, {"id": rid, "cancel": True})
        await _close(sub)


async def _keep_alive(store: Store, rid: str) -> None:
    while True:
        await asyncio.sleep(KEEPALIVE)
        with contextlib.suppress(Exception):
            await store.publish(LOGS, {"id": rid, "keepalive": True})


async def _close(sub: AsyncIterator[dict[str, Any]]) -> None:
    aclose = getattr(sub, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


class LogServer:
    """The controller's side: serves log requests from the bus with ``source``."""

    def __init__(
        self, store: Store, source: LineSource, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.source = source
        self.clock = clock
        self.sessions: dict[
            str, tuple[asyncio.Task[None], list[float]]
        ] = {}  # id -> (pump, [last keep-alive])
        self.listening = asyncio.Event()  # set once requests published from now on are received

    async def run(self) -> None:
        sub = self.store.subscribe(LOGS)
        reaper = asyncio.create_task(self._reap())
        try:
            await sub.ready()
            self.listening.set()
            async for msg in sub:
                self.handle(msg)
        finally:
            reaper.cancel()
            for task, _ in list(self.sessions.values()):
                task.cancel()
            await _close(sub)

    def handle(self, msg: dict[str, Any]) -> None:
        rid = str(msg.get("id") or "")
        if not rid:
            return
        if msg.get("keepalive"):
            if rid in self.sessions:
                self.sessions[rid][1][0] = self.clock()
        elif msg.get("cancel"):
            session = self.sessions.pop(rid, None)
            if session:
                session[0].cancel()
        elif rid not in self.sessions and isinstance(msg.get("function"), str):
            follow = bool(msg.get("follow"))
            tail = int(msg.get("tail") or 200)
            task = asyncio.create_task(self._serve(rid, msg["function"], follow, tail))
            self.sessions[rid] = (task, [self.clock()])
            task.add_done_callback(lambda _t: self.sessions.pop(rid, None))

    async def _serve(self, rid: str, function: str, follow: bool, tail: int) -> None:
        channel = answer_channel(rid)
        queue: asyncio.Queue[str | _Done] = asyncio.Queue()
        pump = asyncio.create_task(self._pump(function, follow, tail, queue))
        done: _Done | None = None
        try:
            await self.store.publish(channel, {"start": True})
            while done is None:
                batch: list[str] = []
                item = await queue.get()
                while True:  # what has already arrived goes out in one message
                    if isinstance(item, _Done):
                        done = item
                        break
                    batch.append(item)
                    if len(batch) >= BATCH or queue.empty():
                        break
                    item = queue.get_nowait()
                if batch:
                    await self.store.publish(channel, {"lines": batch})
        finally:
            pump.cancel()
            end: dict[str, Any] = {"end": True}
            if done is not None and done.error:
                end["error"] = done.error
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.publish(channel, end))

    async def _pump(
        self, function: str, follow: bool, tail: int, queue: asyncio.Queue[str | _Done]
    ) -> None:
        error = ""
        try:
            async for line in self.source(function, follow, tail):
                queue.put_nowait(line)
        except Exception as e:
            log.exception("logs: reading %s failed", function)
            error = f"{type(e).__name__}: {e}"
        finally:
            queue.put_nowait(_Done(error))

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = self.clock()
            for rid, (task, seen) in list(self.sessions.items()):
                if now - seen[0] > LEASE:
                    log.info("logs: session %s missed its keep-alives; ending it", rid)
                    task.cancel()
