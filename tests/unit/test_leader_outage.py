"""Leadership when the store stops answering, and a standby's timing at a lease's end."""

from __future__ import annotations

import asyncio
import contextlib
import time

from torpor.controller.leader import Leadership
from torpor.lease import Held, LeaseInfo, MemoryLease

TTL = 0.6


class FlakyLease(MemoryLease):
    """A MemoryLease whose requests fail (no answer) while ``down`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.asked = 0

    async def acquire(self, holder: str, ttl: float) -> Held | None:
        self.asked += 1
        if self.down:
            raise ConnectionError("store unreachable")
        return await super().acquire(holder, ttl)

    async def current(self) -> LeaseInfo | None:
        if self.down:
            raise ConnectionError("store unreachable")
        return await super().current()


async def _until(pred: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met in time")


async def _run(lead: Leadership, log: list[str]) -> asyncio.Task[None]:
    async def elected(token: int) -> None:
        log.append(f"elected {token}")

    async def deposed() -> None:
        log.append("deposed")

    return asyncio.create_task(lead.run(elected, deposed))


async def test_a_short_outage_within_the_lease_does_not_depose_the_leader() -> None:
    lease, log = FlakyLease(), list[str]()
    a = Leadership(lease, "a", ttl=TTL, renew_every=0.1, poll=0.02)
    task = await _run(a, log)
    await _until(a.valid)
    lease.down = True
    asked = lease.asked
    await asyncio.sleep(
        TTL * 0.5
    )  # shorter than what is left of the lease (0.8 ttl after a renewal)
    assert lease.asked >= asked + 2  # it kept asking
    lease.down = False
    await asyncio.sleep(TTL)
    assert a.valid() and log == ["elected 1"]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_long_outage_deposes_the_leader_before_its_lease_could_be_taken() -> None:
    lease, log = FlakyLease(), list[str]()
    a = Leadership(lease, "a", ttl=TTL, renew_every=0.1, poll=0.02)
    task = await _run(a, log)
    await _until(a.valid)
    lease.down = True
    down_at = time.monotonic()
    await _until(lambda: log[-1:] == ["deposed"], timeout=TTL * 2)
    assert not a.valid()
    # local expiry comes first: the store would still refuse anyone else at this moment
    assert time.monotonic() - down_at < TTL
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_standby_takes_over_right_when_a_dead_leaders_lease_runs_out() -> None:
    lease = MemoryLease()
    assert await lease.acquire("dead", TTL) is not None  # a leader that will never renew
    info = await lease.current()
    assert info is not None
    ends_at = time.monotonic() + info.expires_in
    log: list[str] = []
    b = Leadership(
        lease, "b", ttl=TTL, renew_every=0.1, poll=10.0
    )  # a poll far longer than the ttl
    task = await _run(b, log)
    await _until(b.valid, timeout=TTL * 2)
    assert time.monotonic() >= ends_at  # not before the lease ran out
    assert log == ["elected 2"]
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
