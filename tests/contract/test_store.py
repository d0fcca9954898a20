"""One contract for every Store: EmbeddedStore (durable in a tmp dir) and RedisStore
(on a real redis-server). Store-specific behaviour is at the end of the file."""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from torpor.model import (
    Event,
    Function,
    Replica,
    Resources,
    Revision,
    Rollout,
    RolloutPolicy,
    Scale,
    ScaleOverride,
    Spec,
    TrafficTarget,
)
from torpor.store import embedded as embedded_mod
from torpor.store import open_store
from torpor.store.base import CHANGES, POKES, SECRETS, ConflictError, Store
from torpor.store.embedded import EmbeddedStore
from torpor.store.redis import MAX_ATTEMPTS, RedisStore

WAIT = 5.0  # seconds: bound on every wait for a message


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


async def recv(sub: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    return await asyncio.wait_for(anext(sub), WAIT)


def create(name: str, **kw: Any) -> Callable[[Function | None], Function | None]:
    def mutate(cur: Function | None) -> Function | None:
        return Function(name=name, **kw) if cur is None else None

    return mutate


def full_function() -> Function:
    spec = Spec(
        name="hello",
        handler="handler:handle",
        env={"GREETING": "hi", "EMPTY": ""},
        port=9090,
        timeout=12.5,
        scale=Scale(min=1, max=5, target=3.5, concurrency=4, idle=10.0, window=20.0),
        resources=Resources(cpu=1.25, memory=512 * 1024 * 1024),
        rollout=RolloutPolicy(
            steps=[5, 50, 100], interval=3.0, max_error_ratio=0.1, max_p95_ratio=1.5, min_requests=7
        ),
    )
    r1 = Revision(
        name="hello-00001",
        function="hello",
        number=1,
        spec=spec,
        source="/state/src/hello-00001",
        status="ready",
        created=1000.5,
        on_ready="canary:10",
        tag="canary",
    )
    r2 = Revision(
        name="hello-00002",
        function="hello",
        number=2,
        spec=Spec(name="hello", handler=None, image="myorg/app:1.2"),
        image="myorg/app:1.2",
        status="failed",
        reason="boom",
        created=1001.25,
    )
    return Function(
        name="hello",
        revisions=[r1, r2],
        traffic=[TrafficTarget("hello-00001", 90), TrafficTarget("hello-00002", 10, "canary")],
        scale=ScaleOverride(min=2, max=None, target=4.0, concurrency=None),
        rollout=Rollout(
            to="hello-00002",
            stable="hello-00001",
            steps=[10, 100],
            step=1,
            state="paused",
            step_started=1002.0,
            reason="waiting",
            policy=RolloutPolicy(steps=[10, 100]),
        ),
        next_number=3,
        created=999.0,
    )


# -- functions ---------------------------------------------------------------------------


async def test_update_creates_modifies_and_none_leaves_unchanged(store: Store) -> None:
    assert await store.get_function("hello") is None

    created = await store.update_function("hello", create("hello"))
    assert created is not None and created.name == "hello" and created.next_number == 1

    def bump(cur: Function | None) -> Function | None:
        assert cur is not None
        cur.next_number += 1
        return cur

    bumped = await store.update_function("hello", bump)
    assert bumped is not None and bumped.next_number == 2

    unchanged = await store.update_function("hello", lambda cur: None)
    assert unchanged == bumped
    assert await store.get_function("hello") == bumped

    # None for a missing function: nothing is created.
    assert await store.update_function("nothing", lambda cur: None) is None
    assert await store.get_function("nothing") is None
    assert [f.name for f in await store.list_functions()] == ["hello"]


async def test_get_and_list(store: Store) -> None:
    assert await store.list_functions() == []
    for name in ["web", "api", "hello"]:
        await store.update_function(name, create(name))
    assert [f.name for f in await store.list_functions()] == ["api", "hello", "web"]
    got = await store.get_function("api")
    assert got is not None and got.name == "api"
    assert await store.get_function("missing") is None


async def test_full_function_round_trip(store: Store) -> None:
    fn = full_function()
    returned = await store.update_function("hello", lambda cur: full_function())
    assert returned == fn
    assert await store.get_function("hello") == fn
    assert await store.list_functions() == [fn]


async def test_mutator_must_keep_the_name_and_names_must_be_safe(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.update_function("hello", lambda cur: Function(name="other"))
    for bad in ["../etc", "", ".hidden", "a/b", "x\x00"]:
        with pytest.raises(ValueError):
            await store.update_function(bad, create(bad))
    assert await store.list_functions() == []


async def test_mutator_exception_propagates_and_writes_nothing(store: Store) -> None:
    await store.update_function("hello", create("hello"))

    def broken(cur: Function | None) -> Function | None:
        raise RuntimeError("mutator failed")

    before = await store.get_function("hello")
    with pytest.raises(RuntimeError, match="mutator failed"):
        await store.update_function("hello", broken)
    assert await store.get_function("hello") == before


async def test_delete_removes_function_and_replicas_and_publishes(store: Store) -> None:
    await store.update_function("hello", create("hello"))
    await store.update_function("other", create("other"))
    await store.put_replica(Replica("hello-00001-a", "hello", "hello-00001"))
    await store.put_replica(Replica("other-00001-a", "other", "other-00001"))
    sub = store.subscribe(CHANGES)

    assert await store.delete_function("hello") is True
    assert await recv(sub) == {"kind": "deleted", "function": "hello"}
    assert await store.get_function("hello") is None
    assert [f.name for f in await store.list_functions()] == ["other"]
    assert await store.list_replicas("hello") == []
    assert [r.name for r in await store.list_replicas()] == ["other-00001-a"]

    assert await store.delete_function("hello") is False
    # A function may be created again under the same name.
    again = await store.update_function("hello", create("hello"))
    assert again is not None and again.revisions == []


async def test_concurrent_updates_lose_nothing(store: Store) -> None:
    await store.update_function("hello", create("hello"))

    def increment(cur: Function | None) -> Function | None:
        assert cur is not None
        cur.next_number += 1
        return cur

    results = await asyncio.gather(*(store.update_function("hello", increment) for _ in range(20)))
    final = await store.get_function("hello")
    assert final is not None and final.next_number == 1 + 20
    # Every caller saw its own increment land: the returned values are all distinct.
    assert sorted(r.next_number for r in results if r) == list(range(2, 22))


# -- replicas ----------------------------------------------------------------------------


async def test_replicas_put_list_delete(store: Store) -> None:
    a = Replica(
        "hello-00001-a",
        "hello",
        "hello-00001",
        state="ready",
        endpoint="127.0.0.1:40001",
        driver_id="123",
        started=5.0,
    )
    b = Replica("hello-00001-b", "hello", "hello-00001", started=6.0)
    c = Replica("web-00002-a", "web", "web-00002", state="draining", started=7.0)
    for r in (b, c, a):
        await store.put_replica(r)

    assert await store.list_replicas("hello") == [a, b]
    assert await store.list_replicas("web") == [c]
    assert await store.list_replicas("nothing") == []
    assert await store.list_replicas() == [a, b, c]

    # put again = update in place
    b.state = "ready"
    b.endpoint = "127.0.0.1:40002"
    await store.put_replica(b)
    assert await store.list_replicas("hello") == [a, b]

    await store.delete_replica("hello", "hello-00001-a")
    await store.delete_replica("hello", "no-such-replica")  # no error
    await store.delete_replica("nothing", "x")
    assert await store.list_replicas("hello") == [b]
    await store.delete_replica("hello", "hello-00001-b")
    assert await store.list_replicas() == [c]


async def test_replicas_of_unknown_functions_are_listed(store: Store) -> None:
    """The controller may record replicas it adopts before (or after) their function."""
    orphan = Replica("gone-00001-a", "gone", "gone-00001")
    await store.put_replica(orphan)
    assert await store.list_replicas() == [orphan]
    assert await store.delete_function("gone") is False  # no function record...
    assert await store.list_replicas() == []  # ...but its replicas' records go


# -- events ------------------------------------------------------------------------------


async def test_events_order_and_limit(store: Store) -> None:
    for i in range(5):
        await store.add_event(Event("hello", "deploy", f"m{i}", time=100.0 + i, data={"i": i}))
    await store.add_event(Event("web", "scale", "other"))

    events = await store.list_events("hello")
    assert [e.message for e in events] == ["m0", "m1", "m2", "m3", "m4"]  # newest last
    assert events[2] == Event("hello", "deploy", "m2", time=102.0, data={"i": 2})
    assert [e.message for e in await store.list_events("hello", limit=2)] == ["m3", "m4"]
    assert await store.list_events("hello", limit=0) == []
    assert await store.list_events("nothing") == []
    assert [e.message for e in await store.list_events("web")] == ["other"]


async def test_events_are_capped(store: Store) -> None:
    for i in range(230):
        await store.add_event(Event("hello", "scale", str(i)))
    events = await store.list_events("hello", limit=1000)
    assert len(events) == 200
    assert events[0].message == "30" and events[-1].message == "229"


# -- bus ---------------------------------------------------------------------------------


async def test_bus_delivers_in_order(store: Store) -> None:
    sub = store.subscribe(POKES)
    for i in range(10):
        await store.publish(POKES, {"function": "hello", "n": i})
    assert [(await recv(sub))["n"] for _ in range(10)] == list(range(10))


async def test_bus_fans_out_to_every_subscriber(store: Store) -> None:
    one = store.subscribe("stats")
    two = store.subscribe("stats")
    await store.publish("stats", {"x": 1})
    await store.publish("stats", {"x": 2})
    assert [await recv(one), await recv(one)] == [{"x": 1}, {"x": 2}]
    assert [await recv(two), await recv(two)] == [{"x": 1}, {"x": 2}]


async def test_bus_does_not_replay_earlier_messages_nor_other_channels(store: Store) -> None:
    await store.publish("stats", {"x": "before"})
    sub = store.subscribe("stats")
    await store.publish("other", {"x": "elsewhere"})
    await store.publish("stats", {"x": "after"})
    assert await recv(sub) == {"x": "after"}


@pytest.fixture
async def elsewhere(store: Store, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A publisher on ``store``'s bus that shares nothing else with it: for Redis another
    RedisStore (its own connections; its publishes do not wait for ``store``'s
    subscriptions), for the in-process embedded bus the store itself."""
    if isinstance(store, RedisStore):
        other = RedisStore(request.getfixturevalue("redis_url"), prefix=store.prefix)
        try:
            yield other
        finally:
            await other.close()
    else:
        yield store


async def test_bus_ready_means_a_publisher_elsewhere_is_seen(
    store: Store, elsewhere: Store
) -> None:
    # each round a fresh subscription, then at once a publish from the other side: without
    # ready() the SUBSCRIBE of a Redis subscription would still be on its way
    for i in range(20):
        sub = store.subscribe("stats")
        await asyncio.wait_for(sub.ready(), WAIT)
        await elsewhere.publish("stats", {"round": i})
        assert await recv(sub) == {"round": i}
        await asyncio.wait_for(sub.ready(), WAIT)  # once ready, it stays ready
        await sub.aclose()


async def test_bus_subscription_ends_on_aclose_and_on_store_close(store: Store) -> None:
    closed_by_hand = store.subscribe("stats")
    until_store_closes = store.subscribe("stats")
    await closed_by_hand.aclose()  # type: ignore[attr-defined]
    with pytest.raises(StopAsyncIteration):
        await recv(closed_by_hand)

    async def drain() -> list[dict[str, Any]]:
        return [m async for m in until_store_closes]

    consumer = asyncio.create_task(drain())
    await store.publish("stats", {"x": 1})
    await store.close()
    assert await asyncio.wait_for(consumer, WAIT) in ([{"x": 1}], [])


async def test_bus_subscription_as_context_manager(store: Store) -> None:
    async with store.subscribe("stats") as sub:  # type: ignore[attr-defined]
        await store.publish("stats", {"x": 1})
        assert await recv(sub) == {"x": 1}


async def test_bus_aclose_wakes_a_waiting_consumer(store: Store) -> None:
    sub = store.subscribe("stats")
    waiting = asyncio.create_task(anext(sub))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    await sub.aclose()  # type: ignore[attr-defined]
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, WAIT)


async def test_bus_payloads_are_private_copies(store: Store) -> None:
    one = store.subscribe("stats")
    two = store.subscribe("stats")
    payload = {"rev": {"n": 1}}
    await store.publish("stats", payload)
    payload["rev"]["n"] = 99
    got = await recv(one)
    got["rev"]["n"] = 42
    assert await recv(two) == {"rev": {"n": 1}}


async def test_changes_are_published(store: Store) -> None:
    sub = store.subscribe(CHANGES)
    await store.update_function("hello", create("hello"))
    assert await recv(sub) == {"kind": "function", "function": "hello"}

    await store.update_function("hello", lambda cur: None)  # nothing written: no change
    await store.put_replica(Replica("hello-00001-a", "hello", "hello-00001"))
    assert await recv(sub) == {"kind": "replica", "function": "hello"}

    await store.delete_replica("hello", "hello-00001-a")
    assert await recv(sub) == {"kind": "replica", "function": "hello"}

    await store.add_event(Event("hello", "deploy", "not a change"))
    await store.delete_function("hello")
    assert await recv(sub) == {"kind": "deleted", "function": "hello"}


async def test_a_dropped_subscription_is_removed(store: Store) -> None:
    async def consume_one() -> dict[str, Any]:
        async for msg in store.subscribe("stats"):
            return msg  # the consumer stops here and drops its iterator
        raise AssertionError("unreachable")

    consumer = asyncio.create_task(consume_one())
    await asyncio.sleep(0)  # let the consumer subscribe
    await store.publish("stats", {"x": 1})
    assert await asyncio.wait_for(consumer, WAIT) == {"x": 1}
    del consumer
    gc.collect()

    async def subscribers() -> int:
        if isinstance(store, EmbeddedStore):
            return len(store._channels.get("stats", ()))
        assert isinstance(store, RedisStore)
        counts = await store._redis.pubsub_numsub(f"{store.prefix}:stats")
        return int(counts[0][1])

    async with asyncio.timeout(WAIT):
        while await subscribers():
            await asyncio.sleep(0.01)


# -- secrets -----------------------------------------------------------------------------

VALUE = b"s3cr3t-\xff\x00-value"  # the store keeps bytes exactly, even ones the API refuses


async def test_secrets_put_get_list_delete(store: Store) -> None:
    assert await store.list_secrets() == []
    assert await store.get_secret("db-password") is None
    first = await store.put_secret("db-password", VALUE)
    assert (first.name, first.version) == ("db-password", 1) and first.updated > 0
    assert await store.get_secret("db-password") == VALUE
    second = await store.put_secret("db-password", b"other")
    assert second.version == 2 and second.updated >= first.updated
    assert await store.get_secret("db-password") == b"other"
    await store.put_secret("api-key", b"k")
    listed = await store.list_secrets()
    assert [(s.name, s.version) for s in listed] == [("api-key", 1), ("db-password", 2)]
    assert not any(hasattr(s, "value") for s in listed)
    assert await store.delete_secret("db-password") is True
    assert await store.delete_secret("db-password") is False
    assert await store.get_secret("db-password") is None
    assert [s.name for s in await store.list_secrets()] == ["api-key"]
    again = await store.put_secret("db-password", b"new")  # a recreated secret starts over
    assert again.version == 1


async def test_secret_names_are_checked(store: Store) -> None:
    for bad in ("../x", "", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="secret name"):
            await store.put_secret(bad, b"v")
    assert await store.list_secrets() == []


async def test_secrets_are_apart_from_functions_and_messages_hold_no_value(store: Store) -> None:
    async with store.subscribe(SECRETS) as sub, store.subscribe(CHANGES) as changes:
        await store.put_secret("db-password", VALUE)
        await store.put_secret("db-password", VALUE)
        await store.delete_secret("db-password")
        await store.delete_secret("db-password")  # nothing to delete: no message
        await store.put_secret("api-key", b"k")
        got = [await recv(sub) for _ in range(4)]
        await store.update_function("hello", create("hello"))
        first_change = await recv(changes)
    assert got == [
        {"kind": "set", "name": "db-password", "version": 1},
        {"kind": "set", "name": "db-password", "version": 2},
        {"kind": "deleted", "name": "db-password"},
        {"kind": "set", "name": "api-key", "version": 1},
    ]
    assert first_change == {
        "kind": "function",
        "function": "hello",
    }  # secrets are not function changes
    assert await store.list_functions() == [
        Function(name="hello", created=(await store.list_functions())[0].created)
    ]


# -- copies ------------------------------------------------------------------------------


async def test_returned_objects_are_copies(store: Store) -> None:
    returned = await store.update_function("hello", lambda cur: full_function())
    assert returned is not None
    returned.traffic.clear()
    returned.revisions[0].spec.env["X"] = "1"

    got = await store.get_function("hello")
    assert got == full_function()
    assert got is not None
    got.revisions[0].spec.scale.max = 1000
    (await store.list_functions())[0].traffic.clear()

    def sneaky(cur: Function | None) -> Function | None:
        assert cur is not None
        cur.traffic.clear()  # mutates its copy, then writes nothing
        cur.revisions[0].spec.env.clear()
        return None

    await store.update_function("hello", sneaky)
    assert await store.get_function("hello") == full_function()

    replica = Replica("hello-00001-a", "hello", "hello-00001")
    await store.put_replica(replica)
    replica.state = "failed"  # the caller's object is not the stored one
    listed = await store.list_replicas("hello")
    assert listed[0].state == "starting"
    listed[0].state = "draining"
    assert (await store.list_replicas())[0].state == "starting"

    await store.add_event(Event("hello", "deploy", "m", data={"a": [1]}))
    (await store.list_events("hello"))[0].data["a"].append(2)
    assert (await store.list_events("hello"))[0].data == {"a": [1]}


# -- blobs (content-addressed sources) ---------------------------------------------------


def _blob(text: bytes) -> tuple[str, bytes]:
    return hashlib.sha256(text).hexdigest(), text


async def test_blobs_put_get_list_delete(store: Store) -> None:
    sha, data = _blob(b"\x00\x1f\x8b binary \xff bytes" * 100)
    other, data2 = _blob(b"another archive")
    assert await store.get_blob(sha) is None
    assert await store.list_blobs() == {}
    before = time.time()
    await store.put_blob(sha, data)
    await store.put_blob(other, data2)
    assert await store.get_blob(sha) == data  # exactly the bytes, not text
    blobs = await store.list_blobs()
    assert sorted(blobs) == sorted([sha, other])
    assert before - 2 <= blobs[sha] <= time.time() + 2
    await store.put_blob(sha, data)  # idempotent
    assert await store.get_blob(sha) == data
    assert await store.delete_blob(sha) is True
    assert await store.delete_blob(sha) is False
    assert await store.get_blob(sha) is None
    assert list(await store.list_blobs()) == [other]


async def test_a_second_put_refreshes_the_blob_time(store: Store) -> None:
    sha, data = _blob(b"refresh me")
    await store.put_blob(sha, data)
    first = (await store.list_blobs())[sha]
    await asyncio.sleep(0.05)
    await store.put_blob(sha, data)
    assert (await store.list_blobs())[sha] > first


@pytest.mark.security
async def test_a_blob_that_does_not_match_its_hash_is_refused(store: Store, attack: Any) -> None:
    """Plant other bytes under an archive's hash in the store"""
    sha, data = _blob(b"the real archive")
    with pytest.raises(ValueError, match="does not hash"):
        await store.put_blob(sha, b"something else")
    assert await store.get_blob(sha) is None and await store.list_blobs() == {}
    for bad in ("", "../../etc/passwd", sha.upper(), sha[:-1], sha + "0", "*", f"{sha[:-1]}/"):
        with pytest.raises(ValueError, match="sha256"):
            await store.put_blob(bad, data)
        assert await store.get_blob(bad) is None
        assert await store.delete_blob(bad) is False
    attack.ended("ValueError: the blob does not hash to the name, malformed names refused")


async def test_the_archive_key_is_made_once(store: Store) -> None:
    key = await store.archive_key()
    assert isinstance(key, bytes) and len(key) >= 32
    assert await store.archive_key() == key


async def test_blobs_are_kept_apart_from_functions(store: Store) -> None:
    sha, data = _blob(b"apart")
    await store.put_blob(sha, data)
    assert await store.list_functions() == []
    assert await store.get_function(sha) is None


# -- open_store ----------------------------------------------------------------------------


async def test_open_store_picks_the_implementation(tmp_path: Path, redis_url: str) -> None:
    r = open_store(redis_url=redis_url)
    e = open_store(state_dir=tmp_path)
    m = open_store()
    try:
        assert isinstance(r, RedisStore) and isinstance(e, EmbeddedStore)
        assert isinstance(m, EmbeddedStore) and m.state_dir is None
        assert isinstance(open_store(redis_url=redis_url, state_dir=tmp_path), RedisStore)
    finally:
        for s in (r, e, m):
            await s.close()


# -- EmbeddedStore only ----------------------------------------------------------------------


@pytest.mark.security
async def test_embedded_secret_files_are_private(tmp_path: Path, attack: Any) -> None:
    """Read another user's secret from the state dir (world-readable files)"""
    old_umask = os.umask(0o022)  # the usual umask: a plain open() would make 0644
    try:
        store = EmbeddedStore(tmp_path)
        await store.put_secret("db-password", b"hunter2-hunter2")
        await store.put_secret("db-password", b"hunter2-hunter3")  # a replace keeps the mode
        await store.close()
    finally:
        os.umask(old_umask)
    folder = tmp_path / "secrets"
    files = list(folder.iterdir())
    assert [f.name for f in files] == ["db-password.json"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    for path in tmp_path.rglob("*"):  # the value is in that one file only
        if path.is_file() and path != files[0]:
            assert b"hunter2" not in path.read_bytes(), path
    # a folder loosened by hand is tightened again on start
    os.chmod(folder, 0o755)
    os.chmod(files[0], 0o644)
    again = EmbeddedStore(tmp_path)
    try:
        assert await again.get_secret("db-password") == b"hunter2-hunter3"
        assert [(s.name, s.version) for s in await again.list_secrets()] == [("db-password", 2)]
    finally:
        await again.close()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    attack.ended("refused by the file system: secrets/ is 0700, secrets/db-password.json 0600")


@pytest.mark.security
async def test_embedded_blobs_and_archive_key_are_private_and_durable(
    tmp_path: Path, attack: Any
) -> None:
    """Read a function's source archive or the archive-token key from the state dir"""
    old_umask = os.umask(0o022)
    sha, data = _blob(b"source archive bytes")
    try:
        store = EmbeddedStore(tmp_path)
        await store.put_blob(sha, data)
        key = await store.archive_key()
        await store.close()
    finally:
        os.umask(old_umask)
    folder = tmp_path / "blobs"
    assert [p.name for p in folder.iterdir()] == [sha]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / sha).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "archive.key").stat().st_mode) == 0o600
    (folder / f".{sha[:12]}.x.tmp").write_bytes(b"torn")  # an interrupted put
    again = EmbeddedStore(tmp_path)
    try:
        assert await again.get_blob(sha) == data and await again.archive_key() == key
        assert list(await again.list_blobs()) == [sha]
    finally:
        await again.close()
    assert [p.name for p in folder.iterdir()] == [sha]
    attack.ended("refused by the file system: blobs/ is 0700, each blob and archive.key 0600")


async def test_embedded_skips_a_corrupt_secret_file_without_quoting_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "secrets"
    folder.mkdir()
    (folder / "bad.json").write_text('{"value": "hunter2-not-base64!", "version": 1, "updated": 1}')
    (folder / ".ok.json.123.tmp").write_text("torn")
    store = EmbeddedStore(tmp_path)
    try:
        assert await store.list_secrets() == []
    finally:
        await store.close()
    assert "bad.json" in caplog.text and "hunter2" not in caplog.text
    assert not (folder / ".ok.json.123.tmp").exists()


async def test_embedded_survives_a_restart(tmp_path: Path) -> None:
    first = EmbeddedStore(tmp_path)
    await first.update_function("hello", lambda cur: full_function())
    await first.update_function("web", create("web"))
    await first.update_function("gone", create("gone"))
    await first.delete_function("gone")
    await first.put_replica(Replica("hello-00001-a", "hello", "hello-00001"))
    for i in range(3):
        await first.add_event(Event("hello", "deploy", f"m{i}"))
    await first.close()

    second = EmbeddedStore(tmp_path)
    try:
        assert await second.get_function("hello") == full_function()
        assert [f.name for f in await second.list_functions()] == ["hello", "web"]
        assert [e.message for e in await second.list_events("hello")] == ["m0", "m1", "m2"]
        assert await second.list_replicas() == []  # runtime state: re-adopted, not stored
        assert sorted(p.name for p in (tmp_path / "functions").iterdir()) == [
            "hello.json",
            "web.json",
        ]
    finally:
        await second.close()


async def test_embedded_interrupted_write_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = EmbeddedStore(tmp_path)
    await store.update_function("hello", create("hello"))
    path = tmp_path / "functions" / "hello.json"
    before = path.read_bytes()

    def crash(*args: Any) -> None:
        raise OSError("disk gone")

    def bump(cur: Function | None) -> Function | None:
        assert cur is not None
        cur.next_number = 99
        return cur

    for step in ("fsync", "replace"):  # die after writing the temp file, before the rename
        with monkeypatch.context() as m:
            m.setattr(embedded_mod.os, step, crash)
            with pytest.raises(OSError, match="disk gone"):
                await store.update_function("hello", bump)
        assert path.read_bytes() == before
        assert [p.name for p in path.parent.iterdir()] == ["hello.json"]  # no temp left
        got = await store.get_function("hello")
        assert got is not None and got.next_number == 1  # memory agrees with the disk
    await store.close()

    # A process killed mid-write leaves a temp file behind: it is ignored and removed.
    (path.parent / ".hello.x1y2.tmp").write_text('{"name": "hello", "next_nu')
    (path.parent / "notes.txt").write_text("not a function")
    reopened = EmbeddedStore(tmp_path)
    try:
        got = await reopened.get_function("hello")
        assert got is not None and got.next_number == 1
        assert sorted(p.name for p in path.parent.iterdir()) == ["hello.json", "notes.txt"]
    finally:
        await reopened.close()


async def test_embedded_skips_a_corrupt_function_file(tmp_path: Path) -> None:
    (tmp_path / "functions").mkdir()
    (tmp_path / "functions" / "bad.json").write_text("{not json")
    (tmp_path / "functions" / "liar.json").write_text(json.dumps(Function("other").to_dict()))
    store = EmbeddedStore(tmp_path)
    try:
        assert await store.list_functions() == []
    finally:
        await store.close()


async def test_embedded_events_file_survives_a_torn_line_and_stays_bounded(
    tmp_path: Path,
) -> None:
    store = EmbeddedStore(tmp_path)
    await store.add_event(Event("hello", "deploy", "kept"))
    await store.close()
    with (tmp_path / "events.jsonl").open("a") as f:
        f.write('{"function": "hello", "kind": "dep')  # crash in the middle of a line

    store = EmbeddedStore(tmp_path)
    await store.add_event(Event("hello", "deploy", "after"))
    await store.close()
    store = EmbeddedStore(tmp_path)
    assert [e.message for e in await store.list_events("hello")] == ["kept", "after"]

    for i in range(3000):
        await store.add_event(Event("hello", "scale", str(i)))
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) <= 2 * 200 + embedded_mod._COMPACT_SLACK + 1
    await store.close()

    store = EmbeddedStore(tmp_path)
    try:
        events = await store.list_events("hello", limit=1000)
        assert [e.message for e in events] == [str(i) for i in range(2800, 3000)]
        assert len((tmp_path / "events.jsonl").read_text().splitlines()) == 200
    finally:
        await store.close()


async def test_embedded_memory_only(tmp_path: Path) -> None:
    store = EmbeddedStore(None)
    await store.update_function("hello", create("hello"))
    await store.add_event(Event("hello", "deploy", "m"))
    assert [f.name for f in await store.list_functions()] == ["hello"]
    assert [e.message for e in await store.list_events("hello")] == ["m"]
    await store.close()
    with pytest.raises(RuntimeError):
        await store.get_function("hello")


async def test_embedded_publish_never_waits_for_a_slow_subscriber() -> None:
    store = EmbeddedStore(None)
    store.subscribe("stats")  # dropped at once: unregistered, never read
    sub = store.subscribe("stats")  # held, not read while publishing

    async def publish_all() -> None:
        for i in range(10_000):
            await store.publish("stats", {"i": i})

    await asyncio.wait_for(publish_all(), 30)  # a bound on a hang, not a speed
    # the subscriber that read nothing while it ran lost nothing and kept the order
    got = []
    async for msg in sub:
        got.append(msg["i"])
        if len(got) == 10_000:
            break
    assert got == list(range(10_000))
    assert len(store._channels["stats"]) == 1  # the dropped subscription left no queue behind
    await store.close()


# -- RedisStore only -------------------------------------------------------------------------


@pytest.mark.security
async def test_redis_function_documents_hold_no_secret_value(redis_url: str, attack: Any) -> None:
    """Read a secret's value out of the function documents and the change feed in Redis"""
    store = RedisStore(redis_url, prefix="tp")
    spec = Spec(name="hello", secrets={"DB_PASSWORD": "db-password"})
    sub = store.subscribe(CHANGES)
    try:
        await store.put_secret("db-password", b"hunter2-in-redis")
        await store.update_function(
            "hello",
            lambda cur: Function(
                name="hello",
                revisions=[Revision(name="hello-00001", function="hello", number=1, spec=spec)],
            ),
        )
        await store.add_event(Event("hello", "deploy", "m"))
        change = await recv(sub)
    finally:
        await sub.aclose()
        await store.close()
    assert "hunter2" not in json.dumps(change)
    r = redis.Redis.from_url(redis_url)
    try:
        holding = []
        for key in r.scan_iter("tp:*"):
            kind = r.type(key)
            content: Any = (
                r.get(key)
                if kind == b"string"
                else r.hgetall(key)
                if kind == b"hash"
                else r.smembers(key)
                if kind == b"set"
                else r.lrange(key, 0, -1)
            )
            dump = repr(content)
            if "hunter2" in dump or base64.b64encode(b"hunter2-in-redis").decode() in dump:
                holding.append(key.decode())
        doc = json.loads(r.get("tp:fn:hello") or b"")
        assert doc["revisions"][0]["spec"]["secrets"] == {"DB_PASSWORD": "db-password"}
        assert r.smembers("tp:secretnames") == {b"db-password"}
    finally:
        r.close()
    assert holding == ["tp:secret:db-password"]  # the value is under its own key only
    attack.ended(
        "the value is only under tp:secret:db-password; the function document holds the name"
    )


async def test_redis_key_layout(redis_url: str) -> None:
    store = RedisStore(redis_url, prefix="tp")
    try:
        await store.update_function("hello", create("hello"))
        await store.put_replica(Replica("hello-00001-a", "hello", "hello-00001"))
        await store.add_event(Event("hello", "deploy", "m"))
    finally:
        await store.close()
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert json.loads(r.get("tp:fn:hello") or "")["name"] == "hello"  # type: ignore[arg-type]
        assert r.smembers("tp:fns") == {"hello"}
        assert json.loads(r.hget("tp:replicas:hello", "hello-00001-a") or "")["revision"] == (  # type: ignore[arg-type]
            "hello-00001"
        )
        assert r.llen("tp:events:hello") == 1
    finally:
        r.close()


async def test_redis_blob_keys_and_a_shared_archive_key(redis_url: str) -> None:
    api, controller = RedisStore(redis_url, prefix="tp"), RedisStore(redis_url, prefix="tp")
    sha, data = _blob(bytes(range(256)))
    try:
        await api.put_blob(sha, data)
        assert await controller.get_blob(sha) == data
        assert await api.archive_key() == await controller.archive_key()
    finally:
        await api.close()
        await controller.close()
    r = redis.Redis.from_url(redis_url)
    try:
        assert r.get(f"tp:blob:{sha}") == data
        assert set(r.hkeys("tp:blobs")) == {sha.encode()}
        key = r.get("tp:archivekey")
        assert isinstance(key, bytes) and len(bytes.fromhex(key.decode())) == 32
    finally:
        r.close()


async def test_redis_two_stores_share_state_and_bus(redis_url: str) -> None:
    """Two processes in distributed mode = two store instances on one Redis."""
    api, gateway = RedisStore(redis_url), RedisStore(redis_url)
    try:
        async with gateway.subscribe(CHANGES) as sub:  # confirmed on entering
            await api.update_function("hello", create("hello"))
            assert await recv(sub) == {"kind": "function", "function": "hello"}
        assert await gateway.get_function("hello") is not None

        # The gateway's resync: subscribe, then list. Any change made after the list
        # was read arrives on the subscription, whoever made it.
        changes = gateway.subscribe(CHANGES)
        assert [f.name for f in await gateway.list_functions()] == ["hello"]
        await api.update_function("web", create("web"))
        assert await recv(changes) == {"kind": "function", "function": "web"}

        def increment(cur: Function | None) -> Function | None:
            assert cur is not None
            cur.next_number += 1
            return cur

        await asyncio.gather(
            *(s.update_function("hello", increment) for s in (api, gateway) for _ in range(10))
        )
        final = await api.get_function("hello")
        assert final is not None and final.next_number == 21
    finally:
        await api.close()
        await gateway.close()


async def test_redis_update_gives_up_with_conflict_error(redis_url: str) -> None:
    store = RedisStore(redis_url)
    await store.update_function("hello", create("hello"))
    other_writer = redis.Redis.from_url(redis_url)
    calls = 0

    def always_raced(cur: Function | None) -> Function | None:
        nonlocal calls
        calls += 1
        # Another process writes the key between our WATCH and our EXEC, every time.
        other_writer.set("torpor:fn:hello", json.dumps(Function("hello").to_dict()))
        assert cur is not None
        cur.next_number += 1
        return cur

    try:
        with pytest.raises(ConflictError):
            await store.update_function("hello", always_raced)
        assert calls == MAX_ATTEMPTS
    finally:
        other_writer.close()
        await store.close()


async def test_redis_subscribe_failure_is_raised(free_redis_url: str) -> None:
    store = RedisStore(free_redis_url)
    sub = store.subscribe("stats")
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await asyncio.wait_for(sub.ready(), WAIT * 3)
        with pytest.raises(redis.exceptions.ConnectionError):
            await recv(sub)
    finally:
        await store.close()


@pytest.fixture
def free_redis_url() -> str:
    """A URL where no Redis listens (connections are refused at once)."""
    from helpers import free_port

    return f"redis://127.0.0.1:{free_port()}/0"
