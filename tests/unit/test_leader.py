"""Leadership over a lease: one leader, a standby that takes over, deposition before takeover."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from torpor.controller.leader import Leadership
from torpor.lease import Held, MemoryLease

TTL, RENEW, POLL = 0.6, 0.1, 0.02


class Log:
    def __init__(self) -> None:
        self.items: list[tuple[str, str, float]] = []

    def cbs(self, who: str) -> tuple[object, object]:
        async def elected(token: int) -> None:
            self.items.append((who, f"elected {token}", time.monotonic()))

        async def deposed() -> None:
            self.items.append((who, "deposed", time.monotonic()))

        return elected, deposed

    def kinds(self) -> list[tuple[str, str]]:
        return [(w, k) for w, k, _ in self.items]


async def _until(pred: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")


def _leader(lease: MemoryLease, name: str) -> Leadership:
    return Leadership(lease, name, ttl=TTL, renew_every=RENEW, poll=POLL)


async def test_one_leader_and_the_standby_takes_over_when_it_goes() -> None:
    lease, log = MemoryLease(), Log()
    a, b = _leader(lease, "a"), _leader(lease, "b")
    ta = asyncio.create_task(a.run(*log.cbs("a")))  # type: ignore[arg-type]
    await _until(lambda: a.valid())
    tb = asyncio.create_task(b.run(*log.cbs("b")))  # type: ignore[arg-type]
    await asyncio.sleep(TTL * 2)  # several renewals: b never gets in
    assert log.kinds() == [("a", "elected 1")] and not b.valid()
    ta.cancel()  # graceful stop releases the lease: b takes over at once
    with contextlib.suppress(asyncio.CancelledError):
        await ta
    await _until(lambda: b.valid(), timeout=TTL)
    assert log.kinds() == [("a", "elected 1"), ("b", "elected 2")]
    tb.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await tb


class Hanging(MemoryLease):
    """A lease whose store stops answering the holder named ``stuck`` (a partition)."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck: str | None = None

    async def acquire(self, holder: str, ttl: float) -> Held | None:
        if holder == self.stuck:
            await asyncio.sleep(3600)
        return await super().acquire(holder, ttl)


async def test_a_cut_off_leader_is_deposed_before_the_standby_can_take_over() -> None:
    lease, log = Hanging(), Log()
    a, b = _leader(lease, "a"), _leader(lease, "b")
    ta = asyncio.create_task(a.run(*log.cbs("a")))  # type: ignore[arg-type]
    await _until(lambda: a.valid())
    tb = asyncio.create_task(b.run(*log.cbs("b")))  # type: ignore[arg-type]
    lease.stuck = "a"
    await _until(lambda: b.valid(), timeout=TTL * 3)
    times = {k: t for w, k, t in log.items}
    deposed_a = [t for w, k, t in log.items if (w, k) == ("a", "deposed")]
    assert deposed_a, log.items
    assert deposed_a[0] < times["elected 2"]  # a stopped acting before b started
    for t in (ta, tb):
        t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await t


async def test_valid_is_false_once_the_local_validity_ends_even_without_a_renewal() -> None:
    now = [0.0]
    lease = MemoryLease(clock=lambda: now[0])
    ld = Leadership(lease, "a", ttl=5.0, renew_every=1.0, clock=lambda: now[0])
    ld.held = await lease.acquire("a", 5.0)
    assert ld.valid()
    now[0] = 3.99
    assert ld.valid()
    now[0] = 4.0  # 5 s ttl minus the 20% margin: a frozen leader wakes up here and must not act
    assert not ld.valid()


def test_renewal_must_be_well_under_the_ttl() -> None:
    with pytest.raises(ValueError, match="renew_every"):
        Leadership(MemoryLease(), "a", ttl=1.0, renew_every=0.9)
