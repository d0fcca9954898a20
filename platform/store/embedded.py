"""EmbeddedStore: the in-process store of ``torpor up``.

- Functions are durable: one file per function, ``state_dir/functions/NAME.json``,
  written atomically (temp file in the same folder, fsync, ``os.replace``, fsync of
  the folder). They are loaded when the store is constructed.
- Replicas are runtime state and live in memory only: after a restart the
  controller re-adopts what still runs.
- Events are kept in memory (the last ``EVENTS_KEPT`` per function) and appended to
  ``state_dir/events.jsonl`` (no fsync: events are best effort). The file is reloaded
  on start and compacted when it grows well beyond what is kept.
- Secrets are durable and kept apart from functions: one file per secret,
  ``state_dir/secrets/NAME.json`` (the folder mode 0700, each file 0600, written
  atomically like a function file), holding the value (base64) and its metadata.
  No function file, event or bus message ever holds a value.
- The installation's id is ``state_dir/instance`` (created once); heartbeats of the
  components (``torpor status``) live in memory.
- Blobs (content-addressed function sources) are durable: one file per blob,
  ``state_dir/blobs/SHA`` (the folder 0700, each file 0600, written atomically; its
  mtime is the time of its last put). The archive key is ``state_dir/archive.key``
  (0600), made once. Blob files are read and written in a worker thread.
- The bus is in-process pub/sub. ``subscribe`` returns a ``Subscription`` fed by an
  unbounded queue; ``publish`` never blocks and never awaits subscribers.

Every record is stored as its JSON text, exactly like the Redis store: whatever is
returned is a fresh object (mutating it does not change the store), and a record
that is not JSON-safe fails here as it would in distributed mode. ``state_dir=None``
keeps everything in memory (unit tests).

Function writes run synchronously on the event loop (a few small files, written on
deploys and traffic changes, not on the request path); this keeps each write and the
in-memory copy in step even if the caller is cancelled.

One process per state dir: two stores on the same folder would overwrite each
other's writes without noticing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import re
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO

from torpor.model import Event, Function, Replica, SecretInfo
from torpor.sources import SHA256, check_sha, sha256_of
from torpor.store import check_name
from torpor.store.base import CHANGES, SECRETS, Mutator

log = logging.getLogger(__name__)

EVENTS_KEPT = 200  # per function
EVENTS_FILE = "events.jsonl"
FUNCTIONS_DIR = "functions"
SECRETS_DIR = "secrets"
INSTANCE_FILE = "instance"
BLOBS_DIR = "blobs"
ARCHIVE_KEY_FILE = "archive.key"
_COMPACT_SLACK = 1000  # compact events.jsonl once it holds this many lines beyond 2x kept

_INSTANCE = re.compile(r"[a-z0-9]{8,32}")  # an installation id (label value, image tag part)

_END = None  # queue sentinel: the subscription is over


class Subscription:
    """Messages of one channel published after ``subscribe()`` returned, in order.

    Use ``async for msg in sub`` (or ``async with store.subscribe(ch) as sub``).
    ``aclose()`` ends it; so does dropping the last reference (the queue is then
    unregistered) and closing the store (the iterator stops). ``ready()`` exists for
    parity with the Redis store: here a subscription is active as soon as it exists.
    """

    def __init__(self, queues: set[asyncio.Queue[str | None]]) -> None:
        self._queues = queues
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._closed = False
        queues.add(self._queue)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if self._closed:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._close()
            raise StopAsyncIteration
        data: dict[str, Any] = json.loads(item)
        return data

    async def ready(self) -> None:
        """Return once messages published from now on will be received (at once here)."""

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queues.discard(self._queue)
            self._queue.put_nowait(_END)  # wake a consumer waiting in __anext__

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._close()

    def __del__(self) -> None:
        queues = getattr(self, "_queues", None)
        if queues is not None:
            queues.discard(self._queue)


def _records(folder: Path) -> list[Path]:
    """The ``*.json`` record files of ``folder``, sorted; the ``.*.tmp`` files an
    interrupted write left are removed (the old record stands)."""
    out = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            if path.name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    path.unlink()
        elif path.suffix == ".json":
            out.append(path)
    return out


class EmbeddedStore:
    """In-process ``Store``; durable in ``state_dir`` (see the module docstring)."""

    def __init__(self, state_dir: Path | str | None = None) -> None:
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self._functions: dict[str, str] = {}  # name -> JSON text
        self._secrets: dict[str, tuple[SecretInfo, bytes]] = {}  # name -> (metadata, value)
        self._replicas: dict[str, dict[str, str]] = {}  # function -> replica -> JSON
        self._events: dict[str, deque[str]] = {}  # function -> JSON lines, oldest first
        self._channels: dict[str, set[asyncio.Queue[str | None]]] = {}
        self._lock = asyncio.Lock()
        self._blobs: dict[str, tuple[bytes, float]] = {}  # memory only: sha -> (data, time)
        self._archive_key: bytes | None = None
        self._events_file: TextIO | None = None
        self._event_lines = 0  # lines in events.jsonl
        self._closed = False
        self._instance: str | None = None
        self._seen: dict[str, dict[str, dict[str, Any]]] = {}  # kind -> member -> info
        if self.state_dir is not None:
            self._load(self.state_dir)

    # -- loading and files -----------------------------------------------------------

    def _fn_dir(self) -> Path:
        assert self.state_dir is not None
        return self.state_dir / FUNCTIONS_DIR

    def _load(self, state_dir: Path) -> None:
        fn_dir = state_dir / FUNCTIONS_DIR
        fn_dir.mkdir(parents=True, exist_ok=True)
        for path in _records(fn_dir):
            try:
                name = check_name(path.stem)
                fn = Function.from_dict(json.loads(path.read_text(encoding="utf-8")))
                if fn.name != name:
                    raise ValueError(f"file holds function {fn.name!r}")
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
                log.error("skipping unreadable function file %s: %s", path, e)
                continue
            self._functions[name] = json.dumps(fn.to_dict())

        self._load_secrets(state_dir / SECRETS_DIR)
        blob_dir = state_dir / BLOBS_DIR
        blob_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(blob_dir, 0o700)
        for path in blob_dir.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp"):  # an interrupted put
                with contextlib.suppress(OSError):
                    path.unlink()

        for path in state_dir.glob(".events.*.tmp"):  # an interrupted compaction
            with contextlib.suppress(OSError):
                path.unlink()
        events_path = state_dir / EVENTS_FILE
        lines = 0
        torn = False
        if events_path.exists():
            with events_path.open(encoding="utf-8", errors="replace") as f:
                for line in f:
                    lines += 1
                    torn = not line.endswith("\n")
                    try:
                        ev = Event.from_dict(json.loads(line))
                    except (ValueError, TypeError, AttributeError):
                        continue  # e.g. a line torn by a crash
                    self._remember_event(ev.function, json.dumps(ev.to_dict()))
        self._event_lines = lines
        # Rewrite the file when it holds more than is kept, or ends in a torn line
        # (the next append would be glued to it).
        if torn or lines > self._events_kept():
            self._compact_events()
        else:
            self._events_file = events_path.open("a", encoding="utf-8")

    def _load_secrets(self, sec_dir: Path) -> None:
        sec_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(sec_dir, 0o700)  # also tightens a folder made by hand or by an older run
        for path in _records(sec_dir):
            try:
                os.chmod(path, 0o600)
                name = check_name(path.stem, "secret")
                d = json.loads(path.read_text(encoding="utf-8"))
                info = SecretInfo(name=name, version=int(d["version"]), updated=float(d["updated"]))
                value = base64.b64decode(d["value"], validate=True)
            except (OSError, ValueError, TypeError, KeyError, binascii.Error) as e:
                # the error names the file only: a decoding error could quote the content
                log.error("skipping unreadable secret file %s (%s)", path, type(e).__name__)
                continue
            self._secrets[name] = (info, value)

    def _write_private_file(self, folder: Path, name: str, data: str | bytes) -> None:
        """Atomically replace ``folder/name`` with ``data`` (text as UTF-8), mode 0600 (mkstemp's)."""
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(folder)

    def _write_function_file(self, name: str, text: str) -> None:
        self._write_private_file(self._fn_dir(), f"{name}.json", text)

    def _delete_function_file(self, name: str) -> None:
        fn_dir = self._fn_dir()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(fn_dir / f"{name}.json")
        _fsync_dir(fn_dir)

    def _events_kept(self) -> int:
        return sum(len(q) for q in self._events.values())

    def _remember_event(self, function: str, text: str) -> None:
        q = self._events.get(function)
        if q is None:
            q = self._events[function] = deque(maxlen=EVENTS_KEPT)
        q.append(text)

    def _compact_events(self) -> None:
        """Rewrite events.jsonl with only the events kept in memory (atomically)."""
        assert self.state_dir is not None
        if self._events_file is not None:
            self._events_file.close()
            self._events_file = None
        path = self.state_dir / EVENTS_FILE
        fd, tmp = tempfile.mkstemp(prefix=".events.", suffix=".tmp", dir=self.state_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for q in self._events.values():
                    for text in q:
                        f.write(text + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.state_dir)
        self._event_lines = self._events_kept()
        self._events_file = path.open("a", encoding="utf-8")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the store is closed")

    # -- functions -----------------------------------------------------------------------

    async def get_function(self, name: str) -> Function | None:
        self._check_open()
        return _function(self._functions.get(name))

    async def list_functions(self) -> list[Function]:
        self._check_open()
        texts = [self._functions[n] for n in sorted(self._functions)]
        out: list[Function] = []
        for i in range(0, len(texts), 100):
            if i:
                await asyncio.sleep(0)  # decoding 1,000s of records must not stall the shared loop
            out += [Function.from_dict(json.loads(t)) for t in texts[i : i + 100]]
        return out

    async def update_function(self, name: str, mutate: Mutator) -> Function | None:
        self._check_open()
        check_name(name)
        async with self._lock:
            current = self._functions.get(name)
            new = mutate(_function(current))
            if new is None:
                return _function(current)
            if new.name != name:
                raise ValueError(f"mutator renamed function {name!r} to {new.name!r}")
            text = json.dumps(new.to_dict())
            if self.state_dir is not None:
                self._write_function_file(name, text)
            self._functions[name] = text
        self._publish(CHANGES, {"kind": "function", "function": name})
        return _function(text)

    async def delete_function(self, name: str) -> bool:
        self._check_open()
        async with self._lock:
            existed = name in self._functions
            if existed and self.state_dir is not None:
                self._delete_function_file(name)
            self._functions.pop(name, None)
            replicas = self._replicas.pop(name, None)
        if existed or replicas:
            self._publish(CHANGES, {"kind": "deleted", "function": name})
        return existed

    # -- replicas ------------------------------------------------------------------------

    async def put_replica(self, replica: Replica) -> None:
        self._check_open()
        text = json.dumps(replica.to_dict())
        self._replicas.setdefault(replica.function, {})[replica.name] = text
        self._publish(CHANGES, {"kind": "replica", "function": replica.function})

    async def delete_replica(self, function: str, name: str) -> None:
        self._check_open()
        by_name = self._replicas.get(function)
        if by_name is None or by_name.pop(name, None) is None:
            return
        if not by_name:
            del self._replicas[function]
        self._publish(CHANGES, {"kind": "replica", "function": function})

    async def list_replicas(self, function: str | None = None) -> list[Replica]:
        self._check_open()
        if function is not None:
            groups = [self._replicas.get(function, {})]
        else:
            groups = [self._replicas[f] for f in sorted(self._replicas)]
        return [Replica.from_dict(json.loads(g[n])) for g in groups for n in sorted(g)]

    # -- events --------------------------------------------------------------------------

    async def add_event(self, event: Event) -> None:
        self._check_open()
        text = json.dumps(event.to_dict())
        self._remember_event(event.function, text)
        if self._events_file is not None:
            self._events_file.write(text + "\n")
            self._events_file.flush()
            self._event_lines += 1
            if self._event_lines > 2 * self._events_kept() + _COMPACT_SLACK:
                self._compact_events()

    async def list_events(self, function: str, limit: int = 50) -> list[Event]:
        """The last ``limit`` events of ``function``, newest last."""
        self._check_open()
        q = self._events.get(function)
        if not q or limit <= 0:
            return []
        return [Event.from_dict(json.loads(t)) for t in list(q)[-limit:]]

    # -- secrets -------------------------------------------------------------------------

    async def put_secret(self, name: str, value: bytes) -> SecretInfo:
        self._check_open()
        check_name(name, "secret")
        value = bytes(value)
        async with self._lock:
            old = self._secrets.get(name)
            info = SecretInfo(
                name=name, version=old[0].version + 1 if old else 1, updated=time.time()
            )
            if self.state_dir is not None:
                text = json.dumps(
                    {
                        "name": name,
                        "version": info.version,
                        "updated": info.updated,
                        "value": base64.b64encode(value).decode("ascii"),
                    }
                )
                self._write_private_file(self.state_dir / SECRETS_DIR, f"{name}.json", text)
            self._secrets[name] = (info, value)
        self._publish(SECRETS, {"kind": "set", "name": name, "version": info.version})
        return SecretInfo(**info.to_dict())

    async def get_secret(self, name: str) -> bytes | None:
        self._check_open()
        item = self._secrets.get(name)
        return item[1] if item is not None else None

    async def delete_secret(self, name: str) -> bool:
        self._check_open()
        async with self._lock:
            existed = self._secrets.pop(name, None) is not None
            if existed and self.state_dir is not None:
                sec_dir = self.state_dir / SECRETS_DIR
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(sec_dir / f"{name}.json")
                _fsync_dir(sec_dir)
        if existed:
            self._publish(SECRETS, {"kind": "deleted", "name": name})
        return existed

    async def list_secrets(self) -> list[SecretInfo]:
        self._check_open()
        return [SecretInfo(**self._secrets[n][0].to_dict()) for n in sorted(self._secrets)]

    # -- installation identity and presence ---------------------------------------------

    async def instance_id(self, default: str | None = None) -> str:
        self._check_open()
        if self._instance is not None:
            return self._instance
        path = self.state_dir / INSTANCE_FILE if self.state_dir is not None else None
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                text = path.read_text(encoding="utf-8").strip()
                if _INSTANCE.fullmatch(text):
                    self._instance = text
                    return text
                log.error("ignoring %s: not an installation id", path)
        iid = default if default and _INSTANCE.fullmatch(default) else os.urandom(6).hex()
        if path is not None:
            self._write_private_file(path.parent, INSTANCE_FILE, iid + "\n")
        self._instance = iid
        return iid

    async def heartbeat(self, kind: str, member: str, info: dict[str, Any]) -> None:
        self._check_open()
        json.dumps(info)  # JSON-safe, as in Redis
        self._seen.setdefault(kind, {})[member] = {**info, "id": member, "seen": time.time()}

    async def members(self, kind: str, max_age: float) -> list[dict[str, Any]]:
        self._check_open()
        now, seen = time.time(), self._seen.get(kind, {})
        for m in [m for m, i in seen.items() if now - i["seen"] > max_age]:
            del seen[m]
        return [dict(seen[m]) for m in sorted(seen)]

    # -- blobs ---------------------------------------------------------------------------

    def _blob_dir(self) -> Path:
        assert self.state_dir is not None
        return self.state_dir / BLOBS_DIR

    async def put_blob(self, sha: str, data: bytes) -> None:
        self._check_open()
        check_sha(sha)
        data = bytes(data)
        if await asyncio.to_thread(sha256_of, data) != sha:
            raise ValueError(f"blob does not hash to {sha[:12]}...: refused")
        if self.state_dir is None:
            self._blobs[sha] = (data, time.time())
            return
        folder = self._blob_dir()

        def write() -> None:
            path = folder / sha
            if path.is_file():
                os.utime(path)  # refreshed: a garbage collection leaves it alone for a while
                return
            self._write_private_file(folder, sha, data)

        await asyncio.to_thread(write)

    async def get_blob(self, sha: str) -> bytes | None:
        self._check_open()
        if not isinstance(sha, str) or not SHA256.fullmatch(sha):
            return None
        if self.state_dir is None:
            item = self._blobs.get(sha)
            return item[0] if item else None
        path = self._blob_dir() / sha

        def read() -> bytes | None:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                return None

        return await asyncio.to_thread(read)

    async def delete_blob(self, sha: str) -> bool:
        self._check_open()
        if not isinstance(sha, str) or not SHA256.fullmatch(sha):
            return False
        if self.state_dir is None:
            return self._blobs.pop(sha, None) is not None
        try:
            os.unlink(self._blob_dir() / sha)
        except FileNotFoundError:
            return False
        _fsync_dir(self._blob_dir())
        return True

    async def list_blobs(self) -> dict[str, float]:
        self._check_open()
        if self.state_dir is None:
            return {sha: t for sha, (_, t) in sorted(self._blobs.items())}
        out: dict[str, float] = {}
        for path in sorted(self._blob_dir().iterdir()):
            if SHA256.fullmatch(path.name):
                with contextlib.suppress(FileNotFoundError):
                    out[path.name] = path.stat().st_mtime
        return out

    async def archive_key(self) -> bytes:
        self._check_open()
        if self._archive_key is not None:
            return self._archive_key
        if self.state_dir is None:
            self._archive_key = os.urandom(32)
            return self._archive_key
        path = self.state_dir / ARCHIVE_KEY_FILE
        if not path.exists():
            # written whole to a temp file, then linked into place: never a torn key, and
            # two processes racing agree on the one that was linked first
            fd, tmp = tempfile.mkstemp(prefix=".archive.key.", suffix=".tmp", dir=self.state_dir)
            try:
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    f.write(os.urandom(32).hex())
                    f.flush()
                    os.fsync(f.fileno())
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            _fsync_dir(self.state_dir)
        os.chmod(path, 0o600)
        text = path.read_text(encoding="ascii").strip()
        try:
            key = bytes.fromhex(text)
        except ValueError:
            key = b""
        if len(key) < 32:
            raise RuntimeError(
                f"{path} does not hold an archive key (64 hex digits): remove it to make a new one"
            )
        self._archive_key = key
        return key

    # -- bus -----------------------------------------------------------------------------

    async def publish(self, channel: str, payload: dict[str, Any]) -> None:
        self._check_open()
        self._publish(channel, payload)

    def _publish(self, channel: str, payload: dict[str, Any]) -> None:
        queues = self._channels.get(channel)
        if not queues:
            return
        text = json.dumps(payload)  # each subscriber decodes its own copy
        for q in list(queues):
            q.put_nowait(text)

    def subscribe(self, channel: str) -> Subscription:
        """Messages published on ``channel`` after this call, in order, until closed.

        The subscription is registered before this returns, so a ``publish`` right
        after ``subscribe()`` is received.
        """
        self._check_open()
        queues = self._channels.get(channel)
        if queues is None:
            queues = self._channels[channel] = set()
        return Subscription(queues)

    async def close(self) -> None:
        """End every subscription, close the events file. The store is unusable after."""
        if self._closed:
            return
        self._closed = True
        for queues in self._channels.values():
            for q in list(queues):
                q.put_nowait(_END)
            queues.clear()
        if self._events_file is not None:
            self._events_file.close()
            self._events_file = None


def _function(text: str | None) -> Function | None:
    return Function.from_dict(json.loads(text)) if text is not None else None


def _fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
