"""The activator: a bounded per-revision queue for requests that find no replica with room.

A waiting request is handed a backend directly when one frees up or becomes ready, in
arrival order. A waiter that finds no ready replica pokes the control plane ("I need a
replica of revision R now", through the ``poke`` callback) with the queue's length: the
first one at once, a later one at once when the queue has doubled since the last poke,
so that a burst arriving at zero is sized in milliseconds, not at the next stats report
(Knative's activator likewise reports at once on a cold start). While none is ready,
every waiter looks again once a second and pokes if the last poke is more than half a
second old, so that a lost poke does not strand the queue. A queue behind replicas that
are ready but full pokes nothing: the periodic reports speak for it, as the queue
length counts toward the observed concurrency they carry.

A waiter whose client leaves (``gone`` completes) leaves the queue at once: it is not
handed a backend later, and it no longer counts in the queue length that pokes and
reports carry.
"""

from __future__ import annotations

import asyncio
from asyncio import FIRST_COMPLETED
from collections import deque
from collections.abc import Callable
from typing import Any

from torpor.gateway.balancer import Backend, Balancer


class QueueFull(Exception):
    pass


class ClientGone(Exception):
    """The client of a queued request went away; the request left the queue."""


class Activator:
    __slots__ = ("balancer", "waiters", "limit", "_poke", "_last_poke", "_poked_len")

    def __init__(self, balancer: Balancer, poke: Callable[[int], None], limit: int = 1000) -> None:
        self.balancer = balancer
        self.waiters: deque[asyncio.Future[Backend]] = deque()
        self.limit = limit
        self._poke = poke  # called with the number of waiting requests
        self._last_poke = 0.0
        self._poked_len = 0  # queue length the last poke carried

    def __len__(self) -> int:
        return len(self.waiters)

    async def wait(self, timeout: float, gone: asyncio.Future[Any] | None = None) -> Backend:
        """Queue until a backend has room; raises QueueFull, asyncio.TimeoutError, or
        ClientGone as soon as ``gone`` (the client left) completes."""
        if len(self.waiters) >= self.limit:
            raise QueueFull
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Backend] = loop.create_future()
        self.waiters.append(fut)
        deadline = loop.time() + timeout
        waits: set[asyncio.Future[Any]] = {fut} if gone is None else {fut, gone}
        try:
            while True:
                if not self.balancer.backends:
                    self.poke_now(loop.time())
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                # wake every second to poke again: a lost poke must not strand the queue
                await asyncio.wait(waits, timeout=min(remaining, 1.0), return_when=FIRST_COMPLETED)
                if gone is not None and gone.done():
                    raise ClientGone
                if fut.done():
                    return fut.result()
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # handed a backend just as we gave up: give it back
                self.release(fut.result())
            else:
                try:
                    self.waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def poke_now(self, now: float) -> None:
        """Ask the control plane for replicas: every half second, or sooner once the
        queue has doubled since the last poke (1, 2, 4, ... waiting requests)."""
        n = len(self.waiters)
        if now - self._last_poke > 0.5 or n >= 2 * self._poked_len:
            self._last_poke = now
            self._poked_len = n
            self._poke(n)

    def release(self, b: Backend) -> None:
        """A request on ``b`` finished: hand ``b`` to the next waiter if it has room."""
        b.in_flight -= 1
        if self.waiters and self.balancer.has_room(b):
            self._hand(b)

    def _hand(self, b: Backend) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                b.in_flight += 1
                fut.set_result(b)
                return

    def dispatch(self) -> None:
        """Backends changed (a replica became ready): drain the queue onto them."""
        while self.waiters:
            b = self.balancer.pick()
            if b is None:
                return
            b.in_flight -= 1  # _hand counts it again
            self._hand(b)

    def fail_all(self, exc: BaseException) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(exc)
