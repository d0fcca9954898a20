"""One contract suite over every Lease backend: in memory, and Redis (a real redis-server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from torpor.lease import MARGIN, Lease, MemoryLease, RedisLease, lease_for
from torpor.store.embedded import EmbeddedStore
from torpor.store.redis import RedisStore

TTL = 0.5


@pytest.fixture(params=["memory", "redis"])
async def lease(request: pytest.FixtureRequest) -> AsyncIterator[Lease]:
    if request.param == "memory":
        yield MemoryLease()
        return
    url = request.getfixturevalue("redis_url")
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        yield RedisLease(client, prefix="t")
    finally:
        await client.aclose()


async def _until(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_one_holder_at_a_time(lease: Lease) -> None:
    a = await lease.acquire("ctl-a", TTL)
    assert a is not None and a.token >= 1
    assert await lease.acquire("ctl-b", TTL) is None
    cur = await lease.current()
    assert cur is not None and cur.holder == "ctl-a" and cur.token == a.token
    assert 0 < cur.expires_in <= TTL


async def test_renewal_keeps_the_token_and_extends(lease: Lease) -> None:
    a = await lease.acquire("ctl-a", TTL)
    assert a is not None
    for _ in range(4):  # renewed past several TTLs: nobody else gets in
        await asyncio.sleep(TTL / 3)
        again = await lease.acquire("ctl-a", TTL)
        assert again is not None and again.token == a.token
        assert await lease.acquire("ctl-b", TTL) is None


async def test_expiry_hands_over_with_a_higher_token(lease: Lease) -> None:
    a = await lease.acquire("ctl-a", TTL)
    assert a is not None
    took: list[int] = []

    async def b_takes() -> bool:
        held = await lease.acquire("ctl-b", TTL)
        if held:
            took.append(held.token)
        return held is not None

    await _until(b_takes)
    assert took[0] > a.token  # fencing: the new holder's token is higher
    # the deposed holder cannot renew its way back while b holds it
    assert await lease.acquire("ctl-a", TTL) is None
    assert await lease.token() == took[0]


async def test_local_validity_ends_before_the_store_expiry(lease: Lease) -> None:
    before = time.monotonic()
    a = await lease.acquire("ctl-a", TTL)
    assert a is not None
    assert a.valid(time.monotonic())
    assert a.valid_until <= before + TTL * (1 - MARGIN) + 0.05
    assert not a.valid(before + TTL)


async def test_release_only_by_the_current_holder_and_token(lease: Lease) -> None:
    a = await lease.acquire("ctl-a", TTL)
    assert a is not None
    assert not await lease.release("ctl-b", a.token)
    assert not await lease.release("ctl-a", a.token + 1)
    assert await lease.release("ctl-a", a.token)
    assert await lease.current() is None
    b = await lease.acquire("ctl-b", TTL)
    assert b is not None and b.token > a.token


async def test_bad_arguments_are_refused(lease: Lease) -> None:
    with pytest.raises(ValueError, match="holder"):
        await lease.acquire("a:b", TTL)
    with pytest.raises(ValueError, match="ttl"):
        await lease.acquire("a", float("nan"))


async def test_memory_lease_with_an_injected_clock() -> None:
    now = [100.0]
    lease = MemoryLease(clock=lambda: now[0])
    a = await lease.acquire("a", 5.0)
    assert a is not None and a.valid_until == pytest.approx(100.0 + 5.0 * (1 - MARGIN))
    now[0] = 104.9
    assert await lease.acquire("b", 5.0) is None
    now[0] = 105.0
    b = await lease.acquire("b", 5.0)
    assert b is not None and b.token == a.token + 1


async def test_lease_for_picks_the_store_backend(redis_url: str, tmp_path: object) -> None:
    rs = RedisStore(redis_url)
    try:
        assert isinstance(lease_for(rs), RedisLease)
    finally:
        await rs.close()
    assert isinstance(lease_for(EmbeddedStore(None)), MemoryLease)
