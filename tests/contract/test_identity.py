"""Installation identity and presence, the same contract on every Store: the id is created
once and shared by every component; heartbeats list who is alive and forget the silent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from torpor.store.base import Store
from torpor.store.embedded import EmbeddedStore
from torpor.store.redis import RedisStore
from torpor.up import legacy_instance


@pytest.fixture(params=["embedded", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store
    if request.param == "embedded":
        s = EmbeddedStore(tmp_path / "state")
    else:
        s = RedisStore(request.getfixturevalue("redis_url"))
    try:
        yield s
    finally:
        await s.close()


async def test_the_installation_id_is_created_once_and_then_the_same_for_everyone(
    store: Store,
) -> None:
    first = await store.instance_id("aaaa1111bbbb")
    assert first == "aaaa1111bbbb"
    assert await store.instance_id("cccc2222dddd") == first  # a later default does not replace it
    assert await store.instance_id() == first


async def test_without_a_default_the_id_is_random(store: Store) -> None:
    iid = await store.instance_id()
    assert len(iid) >= 8 and iid.isalnum() and iid == iid.lower()


async def test_concurrent_first_calls_agree(store: Store) -> None:
    ids = await asyncio.gather(*(store.instance_id(f"{i:012d}") for i in range(8)))
    assert len(set(ids)) == 1


async def test_heartbeats_list_the_living_and_forget_the_silent(store: Store) -> None:
    await store.heartbeat("controller", "c1", {"role": "leader", "pid": 1})
    await store.heartbeat("controller", "c2", {"role": "standby", "pid": 2})
    await store.heartbeat("gateway", "g1", {"address": "127.0.0.1:8080"})
    now = time.time()
    members = await store.members("controller", 10.0)
    assert [(m["id"], m["role"], m["pid"]) for m in members] == [
        ("c1", "leader", 1),
        ("c2", "standby", 2),
    ]
    assert all(now - 5 <= m["seen"] <= now + 1 for m in members)
    assert [m["id"] for m in await store.members("gateway", 10.0)] == ["g1"]
    await store.heartbeat("controller", "c1", {"role": "standby", "pid": 1})  # the latest beat wins
    assert [m["role"] for m in await store.members("controller", 10.0)] == ["standby", "standby"]
    await asyncio.sleep(0.3)
    await store.heartbeat("controller", "c2", {"role": "leader", "pid": 2})
    assert [m["id"] for m in await store.members("controller", 0.2)] == ["c2"]  # c1 went silent
    assert [m["id"] for m in await store.members("controller", 10.0)] == ["c2"]  # and is forgotten


async def test_an_embedded_installation_keeps_the_id_its_state_dir_gave_it(tmp_path: Path) -> None:
    """Single-machine installations from before the id lived in the store: their containers
    carry the id derived from the state dir, and keep it (so they are adopted after the upgrade)."""
    state = tmp_path / "state"
    legacy = legacy_instance(state)
    s = EmbeddedStore(state)
    assert await s.instance_id(legacy) == legacy
    await s.close()
    again = EmbeddedStore(state)
    assert (
        await again.instance_id("ffff0000ffff") == legacy
    )  # durable: read back from the state dir
    await again.close()
    assert (state / "instance").read_text().strip() == legacy


async def test_a_redis_installation_with_functions_keeps_its_controllers_old_id(
    tmp_path: Path, redis_url: str
) -> None:
    """Distributed installations from before: their containers carry the id the controller's
    state dir gave; a new installation (no functions yet) gets a random id instead."""
    from torpor.model import Function
    from torpor.up import Platform, UpConfig

    def controller(state: Path) -> Platform:
        return Platform(
            UpConfig(redis=redis_url, state_dir=state, driver="process"), frozenset({"controller"})
        )

    fresh = controller(tmp_path / "fresh")
    iid = await fresh._identity()
    assert iid != legacy_instance(tmp_path / "fresh")
    await fresh.store.close()

    import redis as sync_redis

    sync_redis.Redis.from_url(redis_url).flushall()
    old = controller(tmp_path / "old")
    await old.store.update_function("hello", lambda _: Function(name="hello"))
    assert await old._identity() == legacy_instance(tmp_path / "old")
    await old.store.close()
