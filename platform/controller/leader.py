"""Leadership: keep the controller lease while acting, give way at once when it is lost.

``Leadership.run(elected, deposed)`` is a standby loop: it asks for the lease every
``poll`` seconds; once it holds it, ``elected(token)`` runs (the controller syncs, adopts
what runs, resumes rollouts) and the lease is renewed every ``renew_every`` seconds. If a
renewal is refused, fails, or does not answer before the lease's *local* validity ends
(see ``torpor.lease``: local expiry always comes before the store lets a standby in),
``deposed()`` runs before anything else can happen, and the loop goes back to standby.
A standby asks again every ``poll`` seconds, or right when the lease it saw runs out if
that is sooner: a dead leader's lease is taken over within its TTL.

``valid()`` is what the controller asks before each action (a driver call, a store
write): a holder that was frozen (SIGSTOP, a long GC pause, a partition) and wakes up
after its lease ran out sees ``False`` and does not act, even before its renewal task
has had a chance to run. Writes to a Redis store are fenced as well (the store refuses
a write whose token is not the lease's current one), so a late write cannot land either.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

from torpor.lease import Held, Lease

log = logging.getLogger("torpor.controller.leader")

TTL = 5.0  # s: a standby takes over at most this long after the leader's last renewal
RENEW_EVERY = 1.0  # s
POLL = 0.25  # s between a standby's attempts


def holder_id() -> str:
    """A name for this controller process: host, pid and a random suffix."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{os.urandom(3).hex()}".replace(":", "-")


class Leadership:
    def __init__(
        self,
        lease: Lease,
        holder: str | None = None,
        *,
        ttl: float = TTL,
        renew_every: float = RENEW_EVERY,
        poll: float = POLL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not renew_every < ttl * 0.8:
            raise ValueError(f"renew_every ({renew_every}) must be well under the ttl ({ttl})")
        self.lease = lease
        self.holder = holder or holder_id()
        self.ttl, self.renew_every, self.poll = ttl, renew_every, poll
        self.clock = clock
        self.held: Held | None = None
        self.terms = 0  # how many times this process was elected
        self.since: float | None = None  # wall-clock time of the current election (status)
        self.attempted = asyncio.Event()  # set once the first request for the lease was answered
        self.failed = False  # the last request got no answer (as opposed to a refusal)

    def valid(self) -> bool:
        held = self.held
        return held is not None and held.valid(self.clock())

    @property
    def token(self) -> int | None:
        return self.held.token if self.held else None

    async def _try(self) -> Held | None:
        """One acquire/renew, bounded by what is left of our local validity."""
        self.failed = False
        limit = self.ttl if self.held is None else max(0.0, self.held.valid_until - self.clock())
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancel that arrives
            # as the call completes, and the loop would then never stop
            async with asyncio.timeout(max(limit, 0.05)):
                return await self.lease.acquire(self.holder, self.ttl)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the store is down or slow: not leader until it answers
            log.warning(
                "lease %s: %s: %s", "renewal" if self.held else "request", type(e).__name__, e
            )
            self.failed = True
            return None

    async def run(
        self, elected: Callable[[int], Awaitable[None]], deposed: Callable[[], Awaitable[None]]
    ) -> None:
        """Standby until elected, act while leading, give way when deposed; forever."""
        try:
            while True:
                got = await self._try()
                self.attempted.set()
                if got is None:
                    await asyncio.sleep(await self._standby_wait())
                    continue
                self.held = got
                self.terms += 1
                self.since = time.time()
                log.warning("controller %s leads (lease token %d)", self.holder, got.token)
                await elected(got.token)
                await self._keep()
                self.held, self.since = None, None
                log.warning("controller %s lost the lease; standing by", self.holder)
                await deposed()
        finally:
            held, self.held, self.since = self.held, None, None
            if held is not None:
                try:
                    await asyncio.wait_for(self.lease.release(self.holder, held.token), 2.0)
                except Exception:  # best effort: the lease expires by itself
                    pass

    async def _standby_wait(self) -> float:
        """How long a standby waits before asking again: ``poll``, or less if the lease
        runs out sooner (so a dead leader is replaced right when its lease ends)."""
        try:
            async with asyncio.timeout(self.poll):
                cur = await self.lease.current()
        except asyncio.CancelledError:
            raise
        except Exception:
            return self.poll
        if cur is None:
            return 0.0
        return min(self.poll, max(0.002, cur.expires_in + 0.002))

    async def _keep(self) -> None:
        """Renew until a renewal fails or the token changes; returns when leadership ends."""
        assert self.held is not None
        token = self.held.token
        while True:
            wait = min(self.renew_every, max(0.0, self.held.valid_until - self.clock()))
            await asyncio.sleep(wait)
            if not self.valid():
                return
            got = await self._try()
            while got is None and self.failed and self.valid():
                # no answer (the store restarts, say): keep asking while the lease is ours
                await asyncio.sleep(min(0.1, max(0.0, self.held.valid_until - self.clock())))
                if not self.valid():
                    return
                got = await self._try()
            if got is None or got.token != token:
                return
            self.held = got
