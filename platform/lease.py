"""Leader election: one acting controller per installation, a standby that takes over.

A ``Lease`` is held by one *holder* (a controller's random id) for ``ttl`` seconds and
renewed well before it runs out. Each time the lease changes hands its *token* (a
fencing token, strictly increasing over the installation's life) goes up, so anything
written by a holder can carry its token, and a deposed holder that wakes up late
presents a token that is no longer current.

    lease = lease_for(store)                      # Redis store -> RedisLease; else MemoryLease
    held = await lease.acquire(me, ttl=5.0)       # a Held (token, valid_until) or None
    ...
    held = await lease.acquire(me, ttl=5.0)       # renew: same token while we keep it
    if held is None or not held.valid(clock()):   # lost it: stop acting at once
        ...

Contract (tests/contract/test_lease.py runs it against both backends):

- ``acquire(holder, ttl)`` takes a free or expired lease (new token) or renews one the
  same holder already has (same token); it returns None while another holder has it.
- ``valid_until`` is measured on the *caller's* monotonic clock from before the request
  was sent, minus a safety margin, so a holder stops believing in its lease before the
  store lets anyone else take it: local expiry always comes first.
- ``release(holder, token)`` hands the lease back at once (graceful shutdown) if, and
  only if, that holder still has that token.
- ``current()`` tells who leads (for ``torpor status``/``describe``), or None.

In Redis the lease is one key ``PREFIX:lease:NAME`` = ``TOKEN:HOLDER`` with a PX expiry
(``SET NX PX`` semantics, done in one Lua script with the renewal so that check and set
are atomic), and the token comes from ``INCR PREFIX:lease:NAME:epoch``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Held", "Lease", "LeaseInfo", "MemoryLease", "RedisLease", "lease_for", "MARGIN"]

# Fraction of the ttl a holder gives up early (clock drift, request latency, GC pauses).
MARGIN = 0.2


@dataclass(frozen=True)
class Held:
    """A lease we hold: its fencing ``token`` and until when (our monotonic clock)."""

    token: int
    valid_until: float

    def valid(self, now: float) -> bool:
        return now < self.valid_until


@dataclass(frozen=True)
class LeaseInfo:
    holder: str
    token: int
    expires_in: float  # seconds, as the store sees it


class Lease(Protocol):
    async def acquire(self, holder: str, ttl: float) -> Held | None: ...
    async def release(self, holder: str, token: int) -> bool: ...
    async def current(self) -> LeaseInfo | None: ...
    async def token(self) -> int:
        """The current (or last) fencing token; 0 if the lease was never taken."""
        ...


def _valid_until(sent_at: float, ttl: float) -> float:
    return sent_at + ttl * (1.0 - MARGIN)


class MemoryLease:
    """A lease in one process (``torpor up`` on the embedded store): same contract, with
    an injectable clock for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._holder: str | None = None
        self._token = 0
        self._expires = 0.0
        self._lock = asyncio.Lock()

    async def acquire(self, holder: str, ttl: float) -> Held | None:
        _check(holder, ttl)
        async with self._lock:
            now = self._clock()
            if self._holder == holder and now < self._expires:
                self._expires = now + ttl
                return Held(self._token, _valid_until(now, ttl))
            if self._holder is not None and now < self._expires:
                return None
            self._token += 1
            self._holder, self._expires = holder, now + ttl
            return Held(self._token, _valid_until(now, ttl))

    async def release(self, holder: str, token: int) -> bool:
        async with self._lock:
            if self._holder == holder and self._token == token and self._clock() < self._expires:
                self._holder, self._expires = None, 0.0
                return True
            return False

    async def current(self) -> LeaseInfo | None:
        now = self._clock()
        if self._holder is None or now >= self._expires:
            return None
        return LeaseInfo(self._holder, self._token, self._expires - now)

    async def token(self) -> int:
        return self._token


_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local sep = string.find(cur, ':', 1, true)
  local tok = tonumber(string.sub(cur, 1, sep - 1))
  if string.sub(cur, sep + 1) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tok
  end
  return -1
end
local tok = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], tok .. ':' .. ARGV[1], 'PX', ARGV[2])
return tok
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


class RedisLease:
    """A lease in Redis, shared by every controller of an installation."""

    def __init__(
        self,
        redis: Any,
        prefix: str = "torpor",
        name: str = "controller",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = redis  # a redis.asyncio.Redis with decode_responses=True
        self.key = f"{prefix}:lease:{name}"
        self.epoch_key = f"{self.key}:epoch"
        self._clock = clock
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)

    async def acquire(self, holder: str, ttl: float) -> Held | None:
        _check(holder, ttl)
        sent = self._clock()
        tok = int(
            await self._acquire(keys=[self.key, self.epoch_key], args=[holder, int(ttl * 1000)])
        )
        if tok < 0:
            return None
        return Held(tok, _valid_until(sent, ttl))

    async def release(self, holder: str, token: int) -> bool:
        return bool(await self._release(keys=[self.key], args=[f"{token}:{holder}"]))

    async def current(self) -> LeaseInfo | None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(self.key)
            pipe.pttl(self.key)
            value, pttl = await pipe.execute()
        if not value or pttl is None or int(pttl) < 0:
            return None
        tok, _, holder = str(value).partition(":")
        return LeaseInfo(holder, int(tok), int(pttl) / 1000.0)

    async def token(self) -> int:
        return int(await self._redis.get(self.epoch_key) or 0)


def _check(holder: str, ttl: float) -> None:
    if not holder or ":" in holder:
        raise ValueError(f"lease holder must be a non-empty name without ':', got {holder!r}")
    if not 0.1 <= ttl <= 300:
        raise ValueError(f"lease ttl must be 0.1..300 s, got {ttl!r}")


def lease_for(store: Any, name: str = "controller") -> Lease:
    """The lease that goes with ``store``: Redis for a ``RedisStore``, else in memory."""
    redis = getattr(store, "_redis", None)
    if redis is not None:
        return RedisLease(redis, getattr(store, "prefix", "torpor"), name)
    return MemoryLease()
