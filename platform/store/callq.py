"""The call queue: where asynchronous calls wait, durably, and where their records live.

One protocol, two implementations that pass one contract suite
(tests/contract/test_callq.py): ``EmbeddedCallQueue`` (this module; a journal in the
state dir of ``torpor up``) and ``RedisCallQueue`` (``torpor.store.callq_redis``; Redis
Streams with a consumer group, for distributed mode). ``open_queue(store)`` gives the
one that goes with a store (one per store object).

Delivery is at least once: a call claimed by a worker that dies before ``finish`` runs
again (embedded: after the restart; Redis: once another worker ``reclaim``s it). The
call id travels with every attempt (``X-Call-Id``) so that handlers can deduplicate.

Embedded journal: ``state_dir/calls.jsonl``, one JSON record per line, the last line of
an id wins, ``{"id": ..., "gone": true}`` forgets one. Accepting a call returns only
once its line is on disk (``fsync``); concurrent writers share one ``fsync`` (group
commit). On start the journal is replayed, calls that were ``running`` go back to
``queued``, and the file is rewritten with the live records only; it is compacted again
whenever it holds twice the live records plus ``COMPACT_SLACK`` lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Protocol

from torpor.model import LISTED, MAX_QUEUED, RETENTION, Call

log = logging.getLogger(__name__)

JOURNAL = "calls.jsonl"
COMPACT_SLACK = 2000
MAX_QUEUED_BYTES = 512 * 1024 * 1024  # request bodies waiting in an embedded queue, all functions


class QueueFull(Exception):
    """The function (or the whole queue) holds as many waiting calls as it may."""


class CallQueue(Protocol):
    async def put(self, call: Call) -> None:
        """Store a new call durably (state ``queued``); raise QueueFull past the caps."""
        ...

    async def claim(self, function: str, n: int, limit: int, consumer: str) -> list[Call]:
        """Up to ``n`` queued calls of ``function``, oldest first, now held by
        ``consumer``; never so many that more than ``limit`` of the function's calls are
        held at once, by every consumer together."""
        ...

    async def save(self, call: Call) -> None:
        """Write a held call's record (attempts, state) durably."""
        ...

    async def finish(self, call: Call) -> None:
        """The call is final: write its record (without the request body), let it go
        from the queue; the record is kept ``RETENTION`` seconds."""
        ...

    async def get(self, call_id: str) -> Call | None: ...

    async def recent(self, function: str, limit: int = 50) -> list[Call]:
        """The function's newest calls first (at most ``LISTED`` are kept listable)."""
        ...

    async def counts(self) -> dict[str, tuple[int, int]]:
        """function -> (queued, held) for every function with either."""
        ...

    async def heartbeat(self, consumer: str, calls: list[Call]) -> None:
        """``consumer`` still works on ``calls`` (they are not reclaimed from it)."""
        ...

    async def reclaim(self, consumer: str, idle: float) -> list[Call]:
        """Calls held by consumers silent for ``idle`` seconds, now held by ``consumer``."""
        ...

    async def wait(self, timeout: float) -> None:
        """Return when a call may have been queued, or after ``timeout`` seconds."""
        ...

    async def close(self) -> None: ...


class EmbeddedCallQueue:
    """``CallQueue`` in process, durable in ``state_dir/calls.jsonl`` (None: memory only)."""

    def __init__(self, state_dir: Path | str | None = None) -> None:
        self.path = Path(state_dir) / JOURNAL if state_dir is not None else None
        self._calls: dict[str, Call] = {}
        self._queued: dict[str, deque[str]] = {}
        self._held: dict[str, set[str]] = {}
        self._recent: dict[str, deque[str]] = {}
        self._bytes = 0  # request body bytes of calls not final
        self._lines = 0
        self._pending: list[tuple[str, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._new = asyncio.Event()
        self._file: Any = None
        self._closed = False
        if self.path is not None:
            self._load()

    # -- journal -------------------------------------------------------------------------
    def _load(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            with self.path.open("r", encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    try:
                        d = json.loads(line)
                        if d.get("gone"):
                            records.pop(str(d["id"]), None)
                        else:  # a state line (no "body") keeps the body of the line before
                            records[str(d["id"])] = {**records.get(str(d["id"]), {}), **d}
                    except (ValueError, KeyError, TypeError, AttributeError):
                        log.warning(
                            "calls journal: skipping unreadable line %d (an interrupted write?)", n
                        )
        now = time.time()
        for d in sorted(records.values(), key=lambda d: float(d.get("created", 0))):
            try:
                call = Call.from_dict(d)
            except (ValueError, KeyError, TypeError):
                log.warning("calls journal: skipping an unreadable record")
                continue
            if call.final and (call.finished or 0) + RETENTION < now:
                continue
            if call.state == "running":
                call.state = "queued"  # its worker went away with the process: run it again
            self._index(call)
        self._rewrite()
        self._file = self._open_journal()

    def _open_journal(self) -> Any:
        """The journal for appending, readable by its owner only (it holds request headers)."""
        assert self.path is not None
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")

    def _rewrite(self) -> None:
        """Replace the journal by the live records (atomically)."""
        assert self.path is not None
        tmp = self.path.with_name(f".{JOURNAL}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        with os.fdopen(
            os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8"
        ) as f:
            for call in self._calls.values():
                f.write(json.dumps(call.to_dict()) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._lines = len(self._calls)

    async def _write(self, call: Call | None, gone: str | None = None, body: bool = True) -> None:
        """Append one record line (``body=False``: without the request body, which an
        earlier line of the call holds); return once it is on disk."""
        if self._closed:
            raise RuntimeError("the call queue is closed")
        if self.path is None:
            return
        if gone:
            record: dict[str, Any] = {"id": gone, "gone": True}
        else:
            assert call is not None
            record = call.to_dict()
            if not body:
                del record["body"]
        line = json.dumps(record)
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((line + "\n", fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await asyncio.shield(fut)

    async def _flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self._append, "".join(line for line, _ in batch))
                self._lines += len(batch)
                if self._lines > 2 * len(self._calls) + COMPACT_SLACK:
                    self._file.close()
                    await asyncio.to_thread(self._rewrite)
                    self._file = self._open_journal()
            except Exception as e:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)

    def _append(self, text: str) -> None:
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())

    # -- index ---------------------------------------------------------------------------
    def _index(self, call: Call) -> None:
        self._calls[call.id] = call
        recent = self._recent.setdefault(call.function, deque())
        recent.append(call.id)
        while len(recent) > LISTED:
            old = recent.popleft()
            c = self._calls.get(old)
            if c is not None and c.final:
                del self._calls[old]
        if not call.final:
            self._bytes += len(call.body)
            if call.state == "queued":
                self._queued.setdefault(call.function, deque()).append(call.id)
            else:
                self._held.setdefault(call.function, set()).add(call.id)

    # -- the protocol ----------------------------------------------------------------------
    async def put(self, call: Call) -> None:
        if len(self._queued.get(call.function, ())) >= MAX_QUEUED:
            raise QueueFull(f"{call.function} has {MAX_QUEUED} calls waiting")
        if self._bytes + len(call.body) > MAX_QUEUED_BYTES:
            raise QueueFull("the call queue's request bodies fill its buffer")
        call.state = "queued"
        await self._write(call)
        self._index(call)
        self._new.set()

    async def claim(self, function: str, n: int, limit: int, consumer: str) -> list[Call]:
        q = self._queued.get(function)
        held = self._held.setdefault(function, set())
        out: list[Call] = []
        while q and len(out) < n and len(held) < limit:
            call = self._calls.get(q.popleft())
            if call is None or call.final:
                continue
            held.add(call.id)
            out.append(call)
        return [Call.from_dict(c.to_dict()) for c in out]

    async def save(self, call: Call) -> None:
        current = self._calls.get(call.id)
        if current is None or current.final:
            return
        await self._write(call, body=False)
        kept = Call.from_dict(call.to_dict())
        kept.body = current.body
        self._calls[call.id] = kept

    async def finish(self, call: Call) -> None:
        current = self._calls.get(call.id)
        if current is None:
            return
        final = Call.from_dict(call.to_dict())
        final.body = b""
        await self._write(final)
        if not current.final:
            self._bytes -= len(current.body)
        self._calls[call.id] = final
        self._held.get(call.function, set()).discard(call.id)
        q = self._queued.get(call.function)
        if q and call.id in q:
            q.remove(call.id)

    async def get(self, call_id: str) -> Call | None:
        call = self._calls.get(call_id)
        return Call.from_dict(call.to_dict()) if call is not None else None

    async def recent(self, function: str, limit: int = 50) -> list[Call]:
        ids = list(self._recent.get(function, ()))[::-1][: max(0, limit)]
        return [Call.from_dict(self._calls[i].to_dict()) for i in ids if i in self._calls]

    async def counts(self) -> dict[str, tuple[int, int]]:
        out = {}
        for fn in set(self._queued) | set(self._held):
            q, h = len(self._queued.get(fn, ())), len(self._held.get(fn, ()))
            if q or h:
                out[fn] = (q, h)
        return out

    async def heartbeat(self, consumer: str, calls: list[Call]) -> None:
        return None  # one process: a held call's worker is alive while the queue is

    async def reclaim(self, consumer: str, idle: float) -> list[Call]:
        return []  # what a dead process held went back to `queued` when the journal was replayed

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._new.wait(), timeout)
        self._new.clear()

    async def prune(self, now: float | None = None) -> int:
        """Forget finished calls older than ``RETENTION``; return how many."""
        now = time.time() if now is None else now
        old = [
            c.id for c in self._calls.values() if c.final and (c.finished or 0) + RETENTION < now
        ]
        for cid in old:
            call = self._calls.pop(cid)
            with contextlib.suppress(ValueError):
                self._recent.get(call.function, deque()).remove(cid)
        for cid in old:
            await self._write(None, gone=cid)
        return len(old)

    async def close(self) -> None:
        if self._closed:
            return
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None


_QUEUES: weakref.WeakKeyDictionary[Any, CallQueue] = weakref.WeakKeyDictionary()


def open_queue(store: Any) -> CallQueue:
    """The call queue that goes with ``store`` (the same object for the same store)."""
    q = _QUEUES.get(store)
    if q is None:
        from torpor.store.redis import RedisStore

        if isinstance(store, RedisStore):
            from torpor.store.callq_redis import RedisCallQueue

            q = RedisCallQueue(store._redis, store.prefix)
        else:
            q = EmbeddedCallQueue(getattr(store, "state_dir", None))
        _QUEUES[store] = q
    return q


async def close_queue(store: Any) -> None:
    q = _QUEUES.pop(store, None)
    if q is not None:
        await q.close()
