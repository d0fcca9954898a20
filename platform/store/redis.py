"""RedisStore: the shared store of distributed mode (``redis.asyncio``).

Keys (``P`` is the prefix, ``torpor`` by default):

- ``P:fn:NAME``         string, JSON of ``Function.to_dict()``
- ``P:fns``             set of function names
- ``P:replicas:FN``     hash, replica name -> JSON of ``Replica.to_dict()``
- ``P:rfns``            set of function names that have (or had) replica records,
                        so ``list_replicas()`` finds replicas of any function
- ``P:events:FN``       list of JSON events, oldest first, capped at ``EVENTS_KEPT``
- ``P:secret:NAME``     hash: ``value`` (base64), ``version``, ``updated``; kept apart
                        from the function documents, never in a bus message
- ``P:secretnames``     set of secret names
- ``P:instance``        the installation's id (``SET NX``: created once)
- ``P:seen:KIND``       hash, member id -> JSON heartbeat (controllers, gateways)

Fencing: ``store.fenced(LEASE_KEY, TOKEN)`` is a view of the store (same connections,
same subscriptions) whose controller writes (functions, replicas, events) land only
while the lease key still holds ``TOKEN``: replica and event writes are Lua scripts that
compare the token first, a function update WATCHes the lease key beside the function's
and compares it before MULTI. A deposed controller that wakes up late gets
``FencedError`` and nothing is written.
- ``P:blob:SHA``        string, the bytes of a content-addressed blob (function source)
- ``P:blobs``           hash, sha -> Unix time of its last put (garbage collection)
- ``P:archivekey``      string, 64 hex digits: the installation's archive-token key,
                        set once (``SET NX``)

``update_function`` is an optimistic WATCH/MULTI/EXEC transaction retried up to
``MAX_ATTEMPTS`` times, then ``ConflictError``. The change message is PUBLISHed in
the same transaction as the write.

The bus is Redis pub/sub on channel ``P:CHANNEL`` with JSON payloads: at most once.
Messages published while a subscriber's connection is down are lost, so a subscription
whose connection breaks (Redis restarted, say) ends: its iterator raises
``ConnectionError`` and the consumer subscribes again and resyncs from the store (the
controller and the gateway both do). Commands retry a dropped connection a few times
with a short backoff, so the first call after a Redis restart succeeds.

``subscribe()`` is synchronous (the ``Store`` protocol) but SUBSCRIBE needs a round
trip, so each ``Subscription`` starts a small task that subscribes and then pumps
messages into a queue. Ordering guarantees:

- every operation of *this* store (read, write or publish) first waits until each
  SUBSCRIBE started on it is confirmed by the server. So
  ``sub = store.subscribe(ch); await store.publish(ch, m)`` always delivers ``m``, and
  ``sub = store.subscribe(CHANGES); fns = await store.list_functions()`` misses no
  change made by any process after the list was read;
- to wait for the subscription without another operation, ``await sub.ready()`` (or
  use ``async with store.subscribe(ch) as sub``, which waits on entering).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import random
import time
import weakref
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from torpor.model import Event, Function, Replica, SecretInfo
from torpor.sources import SHA256, check_sha, sha256_of
from torpor.store import check_name
from torpor.store.base import CHANGES, SECRETS, ConflictError, FencedError, Mutator

log = logging.getLogger(__name__)

EVENTS_KEPT = 200  # per function
MAX_ATTEMPTS = 20  # optimistic update attempts before ConflictError
SUBSCRIBE_TIMEOUT = 10.0  # seconds to get a SUBSCRIBE confirmed
CONNECT_TIMEOUT = 2.0  # seconds to open a connection
RETRIES = (
    4  # a command retries a dropped connection this often (backoff 0.05 s doubling, at most 0.5 s)
)


# The fence: KEYS[1] is the lease key ("TOKEN:HOLDER"), ARGV[1] the writer's token.
_FENCE = """
local cur = redis.call('GET', KEYS[1])
if not cur then return -1 end
local sep = string.find(cur, ':', 1, true)
if not sep or string.sub(cur, 1, sep - 1) ~= ARGV[1] then return -1 end
"""
# KEYS: lease, replicas hash, rfns set; ARGV: token, replica name, JSON, function, channel, change
_PUT_REPLICA = (
    _FENCE
    + """
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"""
)
# KEYS: lease, replicas hash; ARGV: token, replica name, channel, change
_DELETE_REPLICA = (
    _FENCE
    + """
if redis.call('HDEL', KEYS[2], ARGV[2]) == 1 then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return 1
"""
)
# KEYS: lease, events list; ARGV: token, JSON, how many to keep
_ADD_EVENT = (
    _FENCE
    + """
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[3]), -1)
return 1
"""
)


def _token_of(value: str | bytes | None) -> int | None:
    """The fencing token in a lease key's value ``TOKEN:HOLDER``."""
    if not value:
        return None
    tok, _, _ = _str(value).partition(":")
    return int(tok) if tok.isdigit() else None


class _End:
    """Queue item: the subscription is over (``error`` set if it failed)."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error


class _SubState:
    """What the pump task and the Subscription share (the task never holds the
    Subscription itself, so dropping the Subscription lets it be collected)."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.queue: asyncio.Queue[dict[str, Any] | _End] = asyncio.Queue()
        self.ready = asyncio.Event()  # set once SUBSCRIBE is confirmed, or failed
        self.error: BaseException | None = None


async def _pump(ps: Any, state: _SubState) -> None:
    """Subscribe ``ps`` to ``state.channel`` and move its messages into the queue."""
    end = _End()
    try:
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await ps.subscribe(state.channel)
                while True:
                    msg = await ps.get_message(timeout=None)
                    if msg is not None and msg["type"] == "subscribe":
                        break
        except TimeoutError as e:
            raise TimeoutError(f"SUBSCRIBE {state.channel} not confirmed") from e
        state.ready.set()
        while True:
            msg = await ps.get_message(timeout=None)
            if msg is None:
                continue
            if msg["type"] == "subscribe":  # redis-py reconnected and re-subscribed by itself
                raise ConnectionError(
                    f"pub/sub connection to {state.channel} was re-established; messages "
                    "published meanwhile may be lost: subscribe again and resync"
                )
            if msg["type"] != "message":
                continue
            try:
                payload = json.loads(msg["data"])
            except ValueError:
                log.warning("dropping non-JSON message on %s", state.channel)
                continue
            state.queue.put_nowait(payload)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        state.error = e
        end = _End(e)
    finally:
        state.ready.set()  # settled: publishers stop waiting, ready() sees the error
        state.queue.put_nowait(end)
        with contextlib.suppress(Exception):
            await ps.aclose()


class Subscription:
    """Messages of one channel, in order; see the module docstring for when they start.

    ``async for msg in sub`` yields payload dicts; it stops after ``aclose()`` or the
    store's ``close()``, and raises if the connection is lost for good. Dropping the
    last reference also ends the subscription (its connection goes back to the pool).
    """

    def __init__(self, store: RedisStore, channel: str) -> None:
        self._state = _SubState(channel)
        self._closed = False
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._task = loop.create_task(_pump(store._redis.pubsub(), self._state))
        store._track(self, self._state, self._task)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._closed:
            raise StopAsyncIteration
        item = await self._state.queue.get()
        if isinstance(item, _End):
            self._closed = True
            if item.error is not None:
                raise item.error
            raise StopAsyncIteration
        return item

    async def ready(self) -> None:
        """Return once the server confirmed the SUBSCRIBE (raise if it failed)."""
        await self._state.ready.wait()
        if self._state.error is not None:
            raise self._state.error

    async def aclose(self) -> None:
        self._closed = True
        if not self._task.done():
            self._task.cancel()
            self._state.ready.set()  # in case the task is cancelled before it ever ran
            await asyncio.gather(self._task, return_exceptions=True)
        self._state.queue.put_nowait(_End())  # wake a consumer waiting in __anext__

    async def __aenter__(self) -> Subscription:
        await self.ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        task = getattr(self, "_task", None)
        if task is not None and not task.done() and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                task.cancel()
                self._state.ready.set()


class RedisStore:
    """``Store`` on Redis; see the module docstring for keys and bus semantics."""

    def __init__(self, url: str, prefix: str = "torpor") -> None:
        self.url = url
        self.prefix = prefix
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_keepalive=True,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )
        self._raw: aioredis.Redis | None = None  # bytes in and out: blobs (made on first use)
        self._subs: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._tasks: set[asyncio.Task[None]] = set()
        self._unready: set[_SubState] = set()
        self._closed = False
        self._owner: RedisStore = self  # a fenced view points at the store it came from
        self._fence: tuple[str, int] | None = None  # (lease key, token) on a fenced view
        self._put_replica = self._redis.register_script(_PUT_REPLICA)
        self._delete_replica = self._redis.register_script(_DELETE_REPLICA)
        self._add_event = self._redis.register_script(_ADD_EVENT)

    def fenced(self, lease_key: str, token: int) -> RedisStore:
        """A view of this store whose writes need ``lease_key`` to still hold ``token``
        (see the module docstring). Reads, the bus and subscriptions are the store's own;
        closing the view does nothing."""
        view = RedisStore.__new__(RedisStore)
        view.__dict__.update(self._owner.__dict__)
        view._owner = self._owner
        view._fence = (lease_key, int(token))
        return view

    def _refused(self, what: str) -> FencedError:
        assert self._fence is not None
        return FencedError(
            f"{what} refused: fencing token {self._fence[1]} is no longer the lease's"
        )

    # -- keys ----------------------------------------------------------------------------

    def _fn_key(self, name: str) -> str:
        return f"{self.prefix}:fn:{name}"

    def _replicas_key(self, function: str) -> str:
        return f"{self.prefix}:replicas:{function}"

    def _events_key(self, function: str) -> str:
        return f"{self.prefix}:events:{function}"

    def _secret_key(self, name: str) -> str:
        return f"{self.prefix}:secret:{name}"

    @property
    def _secrets_key(self) -> str:
        return f"{self.prefix}:secretnames"

    def _channel(self, channel: str) -> str:
        return f"{self.prefix}:{channel}"

    def _blob_key(self, sha: str) -> str:
        return f"{self.prefix}:blob:{sha}"

    @property
    def _blobs_key(self) -> str:
        return f"{self.prefix}:blobs"

    def _raw_client(self) -> aioredis.Redis:
        if self._raw is None:
            self._raw = aioredis.Redis.from_url(self.url, decode_responses=False)
        return self._raw

    @property
    def _fns_key(self) -> str:
        return f"{self.prefix}:fns"

    @property
    def _rfns_key(self) -> str:
        return f"{self.prefix}:rfns"

    def _check_open(self) -> None:
        if self._owner._closed:
            raise RuntimeError("the store is closed")

    async def _enter(self) -> None:
        """Every operation starts here: refuse a closed store, and let any SUBSCRIBE
        started on this store be confirmed first. So ``sub = subscribe(ch)`` followed
        by any read or write on this store is ordered after the subscription: the
        usual "subscribe, then list" resync has no gap, even against other processes.
        """
        self._check_open()
        if self._owner._unready:
            await self._owner._wait_subscriptions()

    # -- functions -----------------------------------------------------------------------

    async def get_function(self, name: str) -> Function | None:
        await self._enter()
        return _function(await self._redis.get(self._fn_key(name)))

    async def list_functions(self) -> list[Function]:
        await self._enter()
        names = sorted(map(_str, await self._redis.smembers(self._fns_key)))
        if not names:
            return []
        texts = await self._redis.mget([self._fn_key(n) for n in names])
        return [Function.from_dict(json.loads(t)) for t in texts if t is not None]

    async def update_function(self, name: str, mutate: Mutator) -> Function | None:
        await self._enter()
        check_name(name)
        key = self._fn_key(name)
        change = json.dumps({"kind": "function", "function": name})
        async with self._redis.pipeline(transaction=True) as pipe:
            for attempt in range(MAX_ATTEMPTS):
                try:
                    if self._fence is not None:
                        await pipe.watch(key, self._fence[0])
                        if _token_of(await pipe.get(self._fence[0])) != self._fence[1]:
                            await pipe.unwatch()
                            raise self._refused(f"update of function {name!r}")
                    else:
                        await pipe.watch(key)
                    current = await pipe.get(key)
                    new = mutate(_function(current))
                    if new is None:
                        await pipe.unwatch()
                        return _function(current)
                    if new.name != name:
                        raise ValueError(f"mutator renamed function {name!r} to {new.name!r}")
                    text = json.dumps(new.to_dict())
                    pipe.multi()
                    pipe.set(key, text)
                    pipe.sadd(self._fns_key, name)
                    pipe.publish(self._channel(CHANGES), change)
                    await pipe.execute()
                    return _function(text)
                except WatchError:
                    # Someone else wrote it first: back off a little, then retry.
                    await asyncio.sleep(random.uniform(0, 0.001 * (attempt + 1)))
        raise ConflictError(f"update of function {name!r} lost {MAX_ATTEMPTS} races")

    async def delete_function(self, name: str) -> bool:
        await self._enter()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._fn_key(name))
            pipe.srem(self._fns_key, name)
            pipe.delete(self._replicas_key(name))
            pipe.srem(self._rfns_key, name)
            fn_deleted, _, replicas_deleted, _ = await pipe.execute()
        if fn_deleted or replicas_deleted:
            await self.publish(CHANGES, {"kind": "deleted", "function": name})
        return bool(fn_deleted)

    # -- replicas ------------------------------------------------------------------------

    async def put_replica(self, replica: Replica) -> None:
        await self._enter()
        if self._fence is not None:
            done = await self._put_replica(
                keys=[self._fence[0], self._replicas_key(replica.function), self._rfns_key],
                args=[
                    self._fence[1],
                    replica.name,
                    json.dumps(replica.to_dict()),
                    replica.function,
                    self._channel(CHANGES),
                    json.dumps({"kind": "replica", "function": replica.function}),
                ],
            )
            if int(done) != 1:
                raise self._refused(f"write of replica {replica.name!r}")
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self._replicas_key(replica.function), replica.name, json.dumps(replica.to_dict())
            )
            pipe.sadd(self._rfns_key, replica.function)
            pipe.publish(
                self._channel(CHANGES),
                json.dumps({"kind": "replica", "function": replica.function}),
            )
            await pipe.execute()

    async def delete_replica(self, function: str, name: str) -> None:
        await self._enter()
        if self._fence is not None:
            done = await self._delete_replica(
                keys=[self._fence[0], self._replicas_key(function)],
                args=[
                    self._fence[1],
                    name,
                    self._channel(CHANGES),
                    json.dumps({"kind": "replica", "function": function}),
                ],
            )
            if int(done) != 1:
                raise self._refused(f"deletion of replica {name!r}")
            return
        if await self._redis.hdel(self._replicas_key(function), name):
            await self.publish(CHANGES, {"kind": "replica", "function": function})

    async def list_replicas(self, function: str | None = None) -> list[Replica]:
        await self._enter()
        if function is not None:
            functions = [function]
        else:
            functions = sorted(map(_str, await self._redis.smembers(self._rfns_key)))
        if not functions:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for f in functions:
                pipe.hgetall(self._replicas_key(f))
            groups: list[dict[str, str]] = await pipe.execute()
        return [Replica.from_dict(json.loads(g[n])) for g in groups for n in sorted(g)]

    # -- events --------------------------------------------------------------------------

    async def add_event(self, event: Event) -> None:
        await self._enter()
        key = self._events_key(event.function)
        if self._fence is not None:
            done = await self._add_event(
                keys=[self._fence[0], key],
                args=[self._fence[1], json.dumps(event.to_dict()), EVENTS_KEPT],
            )
            if int(done) != 1:
                raise self._refused(f"event of {event.function!r}")
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, json.dumps(event.to_dict()))
            pipe.ltrim(key, -EVENTS_KEPT, -1)
            await pipe.execute()

    async def list_events(self, function: str, limit: int = 50) -> list[Event]:
        """The last ``limit`` events of ``function``, newest last."""
        await self._enter()
        if limit <= 0:  # LRANGE -0 -1 would mean "everything"
            return []
        texts = await self._redis.lrange(self._events_key(function), -limit, -1)
        return [Event.from_dict(json.loads(t)) for t in texts]

    # -- secrets -------------------------------------------------------------------------

    async def put_secret(self, name: str, value: bytes) -> SecretInfo:
        await self._enter()
        check_name(name, "secret")
        key = self._secret_key(name)
        updated = time.time()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, "version", 1)
            pipe.hset(
                key,
                mapping={
                    "value": base64.b64encode(bytes(value)).decode("ascii"),
                    "updated": repr(updated),
                },
            )
            pipe.sadd(self._secrets_key, name)
            version, *_ = await pipe.execute()
        await self.publish(SECRETS, {"kind": "set", "name": name, "version": int(version)})
        return SecretInfo(name=name, version=int(version), updated=updated)

    async def get_secret(self, name: str) -> bytes | None:
        await self._enter()
        text = await self._redis.hget(self._secret_key(name), "value")
        return base64.b64decode(text) if text is not None else None

    async def delete_secret(self, name: str) -> bool:
        await self._enter()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._secret_key(name))
            pipe.srem(self._secrets_key, name)
            deleted, _ = await pipe.execute()
        if deleted:
            await self.publish(SECRETS, {"kind": "deleted", "name": name})
        return bool(deleted)

    async def list_secrets(self) -> list[SecretInfo]:
        await self._enter()
        names = sorted(map(_str, await self._redis.smembers(self._secrets_key)))
        if not names:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for n in names:
                pipe.hmget(self._secret_key(n), ["version", "updated"])  # never the value
            rows: list[list[str | None]] = await pipe.execute()
        return [
            SecretInfo(name=n, version=int(v), updated=float(u))
            for n, (v, u) in zip(names, rows, strict=True)
            if v is not None and u is not None
        ]

    # -- installation identity and presence ---------------------------------------------

    async def instance_id(self, default: str | None = None) -> str:
        await self._enter()
        key = f"{self.prefix}:instance"
        iid = await self._redis.get(key)
        if iid:
            return _str(iid)
        await self._redis.set(key, default or os.urandom(6).hex(), nx=True)
        return _str(await self._redis.get(key) or "")

    async def heartbeat(self, kind: str, member: str, info: dict[str, Any]) -> None:
        await self._enter()
        await self._redis.hset(
            f"{self.prefix}:seen:{kind}",
            member,
            json.dumps({**info, "id": member, "seen": time.time()}),
        )

    async def members(self, kind: str, max_age: float) -> list[dict[str, Any]]:
        await self._enter()
        key = f"{self.prefix}:seen:{kind}"
        rows = {_str(k): _str(v) for k, v in (await self._redis.hgetall(key)).items()}
        now, out, old = time.time(), [], []
        for member in sorted(rows):
            try:
                info = json.loads(rows[member])
                fresh = now - float(info["seen"]) <= max_age
            except (ValueError, TypeError, KeyError):
                fresh = False
            if fresh:
                out.append(info)
            else:
                old.append(member)
        if old:
            await self._redis.hdel(key, *old)
        return out

    # -- blobs ---------------------------------------------------------------------------

    async def put_blob(self, sha: str, data: bytes) -> None:
        await self._enter()
        check_sha(sha)
        data = bytes(data)
        if await asyncio.to_thread(sha256_of, data) != sha:
            raise ValueError(f"blob does not hash to {sha[:12]}...: refused")
        async with self._raw_client().pipeline(transaction=True) as pipe:
            pipe.set(self._blob_key(sha), data, nx=True)  # same hash, same bytes: never rewritten
            pipe.hset(self._blobs_key, sha, repr(time.time()))
            await pipe.execute()

    async def get_blob(self, sha: str) -> bytes | None:
        await self._enter()
        if not isinstance(sha, str) or not SHA256.fullmatch(sha):
            return None
        data = await self._raw_client().get(self._blob_key(sha))
        if data is None:
            return None
        return data if isinstance(data, bytes) else str(data).encode("latin-1")

    async def delete_blob(self, sha: str) -> bool:
        await self._enter()
        if not isinstance(sha, str) or not SHA256.fullmatch(sha):
            return False
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._blob_key(sha))
            pipe.hdel(self._blobs_key, sha)
            deleted, _ = await pipe.execute()
        return bool(deleted)

    async def list_blobs(self) -> dict[str, float]:
        await self._enter()
        rows = await self._redis.hgetall(self._blobs_key)
        out: dict[str, float] = {}
        for sha, t in sorted(rows.items()):
            if SHA256.fullmatch(_str(sha)):
                try:
                    out[_str(sha)] = float(t)
                except ValueError:
                    out[_str(sha)] = 0.0
        return out

    async def archive_key(self) -> bytes:
        await self._enter()
        key = f"{self.prefix}:archivekey"
        await self._redis.set(key, os.urandom(32).hex(), nx=True)
        text = _str(await self._redis.get(key) or "")
        try:
            value = bytes.fromhex(text)
        except ValueError:
            value = b""
        if len(value) < 32:
            raise RuntimeError(f"Redis key {key} does not hold an archive key (64 hex digits)")
        return value

    # -- bus -----------------------------------------------------------------------------

    async def publish(self, channel: str, payload: dict[str, Any]) -> None:
        await self._enter()
        text = json.dumps(payload)
        await self._redis.publish(self._channel(channel), text)

    def subscribe(self, channel: str) -> Subscription:
        """Messages published on ``channel`` after this call, in order, until closed.

        Publishes made through this store are ordered after the SUBSCRIBE; for
        publishers elsewhere, ``await sub.ready()`` first (see the module docstring).
        Must be called with an event loop running.
        """
        self._check_open()
        return Subscription(self._owner, self._channel(channel))

    def _track(self, sub: Subscription, state: _SubState, task: asyncio.Task[None]) -> None:
        self._subs.add(sub)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._unready = {s for s in self._unready if not s.ready.is_set()}
        self._unready.add(state)

    async def _wait_subscriptions(self) -> None:
        """Wait until every SUBSCRIBE started on this store is confirmed (or failed)."""
        if not self._unready:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT + 1):
                for state in list(self._unready):
                    await state.ready.wait()
        self._unready = {s for s in self._unready if not s.ready.is_set()}

    async def close(self) -> None:
        """End every subscription and close the connection pool (a fenced view: nothing)."""
        if self._owner is not self or self._closed:
            return
        self._closed = True
        for sub in list(self._subs):
            await sub.aclose()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._redis.aclose()
        if self._raw is not None:
            await self._raw.aclose()


def _function(text: str | bytes | None) -> Function | None:
    return Function.from_dict(json.loads(text)) if text is not None else None


def _str(value: str | bytes) -> str:
    """Redis replies are str (decode_responses=True); this tells the type checker."""
    return value if isinstance(value, str) else value.decode()
