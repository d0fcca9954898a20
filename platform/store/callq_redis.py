"""RedisCallQueue: the call queue of distributed mode, on Redis Streams.

Keys (``P`` is the store's prefix):

- ``P:call:ID``         string, JSON of ``Call.to_dict()`` less the request body; expires
                        ``RETENTION`` s after the call is final
- ``P:callbody:ID``     string, the request body (base64) while the call is not final
- ``P:callq:FN``        stream, one entry ``{id: ID}`` per call waiting or held; consumer
                        group ``workers``; an entry is XACKed and XDELeted when its call is final
- ``P:callfns``         set of functions that have a stream
- ``P:callrecent:FN``   sorted set ID -> created, the newest ``LISTED`` calls; the record of a
                        final call that falls out of it is deleted (as the embedded queue does)

Accepting is one MULTI/EXEC (record, XADD, index). ``claim`` is one Lua script that
counts the group's pending entries (every consumer's held calls) and reads at most
``limit - pending`` new ones with XREADGROUP: the concurrency bound holds across gateways.
Held entries are touched (XCLAIM ... JUSTID to the same consumer) by ``heartbeat``;
``reclaim`` takes over entries idle longer than ``idle`` seconds with XAUTOCLAIM, so a call
whose gateway died runs again elsewhere (at least once).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from torpor.model import LISTED, MAX_QUEUED, RETENTION, Call
from torpor.store.callq import QueueFull

log = logging.getLogger(__name__)

GROUP = "workers"
POLL = 0.2  # s between looks for new calls from other gateways
MAX_OPS = 48  # queue operations in flight at once: the store's connection pool (100) is shared

_TRIM = """
local old = redis.call('ZRANGE', KEYS[1], 0, -(tonumber(ARGV[1]) + 1))
for _, id in ipairs(old) do
  redis.call('ZREM', KEYS[1], id)
  local text = redis.call('GET', ARGV[2] .. id)
  if text then
    local state = cjson.decode(text).state
    if state == 'done' or state == 'failed' then redis.call('DEL', ARGV[2] .. id) end
  end
end
return #old
"""

_CLAIM = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1])
local want = math.min(tonumber(ARGV[4]), tonumber(ARGV[3]) - tonumber(p[1]))
if want <= 0 then return {} end
local r = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', want, 'STREAMS', KEYS[1], '>')
if not r then return {} end
return r[1][2]
"""


class RedisCallQueue:
    def __init__(self, r: aioredis.Redis, prefix: str = "torpor") -> None:
        self._r = r
        self.prefix = prefix
        self._groups: set[str] = set()
        self._entries: dict[
            str, tuple[str, str]
        ] = {}  # call id -> (function, stream entry id) held here
        self._claim_script = r.register_script(_CLAIM)
        self._trim_script = r.register_script(_TRIM)
        self._new = asyncio.Event()
        self._ops = asyncio.Semaphore(MAX_OPS)

    def _call_key(self, cid: str) -> str:
        return f"{self.prefix}:call:{cid}"

    def _body_key(self, cid: str) -> str:
        return f"{self.prefix}:callbody:{cid}"

    @staticmethod
    def _record(call: Call) -> str:
        d = call.to_dict()
        d["body"] = ""
        return json.dumps(d)

    def _stream(self, fn: str) -> str:
        return f"{self.prefix}:callq:{fn}"

    def _recent_key(self, fn: str) -> str:
        return f"{self.prefix}:callrecent:{fn}"

    @property
    def _fns(self) -> str:
        return f"{self.prefix}:callfns"

    async def _group(self, fn: str) -> None:
        if fn in self._groups:
            return
        try:
            await self._r.xgroup_create(self._stream(fn), GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        self._groups.add(fn)

    async def _put(self, call: Call) -> None:
        await self._group(call.function)
        stream = self._stream(call.function)
        length = await self._r.xlen(stream)
        if length >= MAX_QUEUED:
            raise QueueFull(f"{call.function} has {MAX_QUEUED} calls waiting")
        call.state = "queued"
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.set(self._call_key(call.id), self._record(call))
            pipe.set(self._body_key(call.id), base64.b64encode(call.body).decode("ascii"))
            pipe.xadd(stream, {"id": call.id})
            pipe.zadd(self._recent_key(call.function), {call.id: call.created})
            pipe.sadd(self._fns, call.function)
            await pipe.execute()
        # beyond the newest LISTED, a call is no longer listed and, once final, forgotten
        await self._trim_script(
            keys=[self._recent_key(call.function)], args=[LISTED, f"{self.prefix}:call:"]
        )
        self._new.set()

    async def _load(self, fn: str, entries: list[Any], consumer: str) -> list[Call]:
        """Calls of the stream ``entries`` [(entry id, {id: ..}), ...]; entries whose record
        is gone or final are acknowledged and dropped."""
        pairs = []
        for entry_id, fields in entries:
            if not fields:  # deleted meanwhile (XAUTOCLAIM reports those apart, XREADGROUP as nil)
                continue
            if isinstance(fields, list):
                fields = dict(zip(fields[::2], fields[1::2], strict=False))
            pairs.append((str(entry_id), str(fields.get("id", ""))))
        if not pairs:
            return []
        texts = await self._r.mget([self._call_key(cid) for _, cid in pairs])
        bodies = await self._r.mget([self._body_key(cid) for _, cid in pairs])
        out: list[Call] = []
        stale: list[str] = []
        for (entry_id, cid), text, body in zip(pairs, texts, bodies, strict=True):
            call = Call.from_dict(json.loads(text)) if text else None
            if call is None or call.final:
                stale.append(entry_id)
                continue
            call.body = base64.b64decode(body or "")
            self._entries[cid] = (fn, entry_id)
            out.append(call)
        if stale:
            async with self._r.pipeline(transaction=True) as pipe:
                pipe.xack(self._stream(fn), GROUP, *stale)
                pipe.xdel(self._stream(fn), *stale)
                await pipe.execute()
        return out

    async def _claim_calls(self, function: str, n: int, limit: int, consumer: str) -> list[Call]:
        if n <= 0:
            return []
        await self._group(function)
        try:
            entries = await self._claim_script(
                keys=[self._stream(function)], args=[GROUP, consumer, limit, n]
            )
        except ResponseError as e:
            if "NOGROUP" in str(e):
                self._groups.discard(function)
                return []
            raise
        return await self._load(function, entries or [], consumer)

    async def _save(self, call: Call) -> None:
        await self._r.set(self._call_key(call.id), self._record(call), xx=True)

    async def _finish(self, call: Call) -> None:
        final = Call.from_dict(call.to_dict())
        final.body = b""
        held = self._entries.pop(call.id, None)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.set(self._call_key(call.id), self._record(final), ex=int(RETENTION))
            pipe.delete(self._body_key(call.id))
            if held is not None:
                pipe.xack(self._stream(held[0]), GROUP, held[1])
                pipe.xdel(self._stream(held[0]), held[1])
            await pipe.execute()

    async def _get(self, call_id: str) -> Call | None:
        text, body = await self._r.mget([self._call_key(call_id), self._body_key(call_id)])
        if not text:
            return None
        call = Call.from_dict(json.loads(text))
        call.body = base64.b64decode(body or "")
        return call

    async def _recent(self, function: str, limit: int = 50) -> list[Call]:
        if limit <= 0:
            return []
        ids = await self._r.zrevrange(self._recent_key(function), 0, limit - 1)
        if not ids:
            return []
        texts = await self._r.mget([self._call_key(str(i)) for i in ids])
        return [Call.from_dict(json.loads(t)) for t in texts if t]

    async def _counts(self) -> dict[str, tuple[int, int]]:
        fns = sorted(str(f) for f in await self._r.smembers(self._fns))
        if not fns:
            return {}
        async with self._r.pipeline(transaction=False) as pipe:
            for fn in fns:
                pipe.xlen(self._stream(fn))
                pipe.xpending(self._stream(fn), GROUP)
            replies = await pipe.execute(raise_on_error=False)
        out = {}
        for i, fn in enumerate(fns):
            length, pending = replies[2 * i], replies[2 * i + 1]
            if isinstance(length, Exception) or isinstance(pending, Exception):
                continue
            held = int(pending["pending"]) if isinstance(pending, dict) else int(pending[0])
            if length or held:
                out[fn] = (max(int(length) - held, 0), held)
        return out

    async def _heartbeat(self, consumer: str, calls: list[Call]) -> None:
        by_fn: dict[str, list[Any]] = {}
        for c in calls:
            held = self._entries.get(c.id)
            if held is not None:
                by_fn.setdefault(held[0], []).append(held[1])
        for fn, ids in by_fn.items():
            with contextlib.suppress(ResponseError):
                await self._r.xclaim(self._stream(fn), GROUP, consumer, 0, ids, justid=True)

    async def _reclaim(self, consumer: str, idle: float) -> list[Call]:
        out: list[Call] = []
        for fn in sorted(str(f) for f in await self._r.smembers(self._fns)):
            try:
                reply = await self._r.xautoclaim(
                    self._stream(fn), GROUP, consumer, int(idle * 1000), "0-0", count=100
                )
            except ResponseError:
                continue
            entries = reply[1] if len(reply) > 1 else []
            got = await self._load(fn, entries, consumer)
            if got:
                log.warning("calls: took over %d call(s) of %s from a silent worker", len(got), fn)
            out += got
        return out

    # -- the protocol: every operation takes one of MAX_OPS places ---------------------------
    async def put(self, call: Call) -> None:
        async with self._ops:
            await self._put(call)

    async def claim(self, function: str, n: int, limit: int, consumer: str) -> list[Call]:
        async with self._ops:
            return await self._claim_calls(function, n, limit, consumer)

    async def save(self, call: Call) -> None:
        async with self._ops:
            await self._save(call)

    async def finish(self, call: Call) -> None:
        async with self._ops:
            await self._finish(call)

    async def get(self, call_id: str) -> Call | None:
        async with self._ops:
            return await self._get(call_id)

    async def recent(self, function: str, limit: int = 50) -> list[Call]:
        async with self._ops:
            return await self._recent(function, limit)

    async def counts(self) -> dict[str, tuple[int, int]]:
        async with self._ops:
            return await self._counts()

    async def heartbeat(self, consumer: str, calls: list[Call]) -> None:
        async with self._ops:
            await self._heartbeat(consumer, calls)

    async def reclaim(self, consumer: str, idle: float) -> list[Call]:
        async with self._ops:
            return await self._reclaim(consumer, idle)

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._new.wait(), min(timeout, POLL))
        self._new.clear()

    async def close(self) -> None:
        return None  # the connection pool is the store's
