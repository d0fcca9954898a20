"""What a controller knows, and the writes every part of it shares.

``ControllerState`` holds the state of one controller (desired state as last synced,
the replicas it tracks, per-revision backoff, its in-flight work) and the small pieces
the parts of the controller share: events, revision status writes, spawning work it keeps
a reference to. The parts are mixins over it, one concept each (Knative splits its
reconcilers the same way):

- ``builds.py``: sources fetched by hash, builds, garbage collection of revisions/archives
- ``replicas.py``: one replica's lifecycle (start, ready, failed with backoff, drain, pause)
- ``adopt.py``: adopting what runs after a restart or a new leader, sweeping orphans
- ``loop.py``: ``Controller``: leadership, the bus, the loop, desired/converge

Every task or timer any part starts goes through ``_spawn`` / ``_later``: the controller
keeps a reference to it, a lost lease cancels it, and ``Controller.stop`` cancels and
awaits what is left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from torpor.archive import ArchiveLimits
from torpor.autoscaler.service import Autoscaler
from torpor.controller.blobs import GRACE
from torpor.controller.fence import FencedDriver, FencedStore
from torpor.controller.leader import Leadership
from torpor.controller.rollout import Rollouts
from torpor.controller.traffic import apply_on_ready
from torpor.drivers.base import Driver, Running
from torpor.model import Event, Function, Replica, format_traffic
from torpor.sources import SourceCache
from torpor.store.base import Store

T = TypeVar("T")

log = logging.getLogger("torpor.controller")

PROBE_PATH = b"/_torpor/health"
HEAD_START = 0.5  # s a revision's first replica from zero starts alone (unless ready sooner)
ERROR_EVENT_EVERY = (
    30.0  # s: at most one `error` event per failing function this often (and only a new message)
)
SWEEP_EVERY = 2.0  # s between looks for replicas no one tracks (an orphan must be seen twice)
HEARTBEAT_EVERY = 1.0  # s between a controller's heartbeats into the store (torpor status)


@dataclass(eq=False)
class Tracked:
    replica: Replica
    running: Running | None = None
    task: asyncio.Task[None] | None = None
    starting: asyncio.Future[Running] | None = None  # driver.start in progress
    ready_since: float = 0.0
    started_at: float = 0.0  # when driver.start returned (0 for adopted replicas)


@dataclass
class RevisionState:
    desired: int = 0
    failures: int = 0  # consecutive replica failures (crash-loop backoff)
    next_start: float = 0.0  # monotonic time before which no new replica starts
    reason: str = ""


@dataclass
class Settings:
    tick: float = 1.0
    startup_timeout: float = 60.0
    drain_grace: float = 30.0
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_replicas: int = 100  # platform cap (torpor up --max-replicas)
    pause_for: float = (
        0.0  # keep a replica scaled to zero paused this long before removing it (0 = off)
    )
    keep_revisions: int = 5  # retired revisions kept (with their images) before garbage collection
    source_root: Path | None = (
        None  # where revisions made before content-addressed sources keep their folder
    )
    source_cache: Path | None = None  # this controller's unpacked archives (None: a temp folder)
    source_limits: ArchiveLimits = field(default_factory=ArchiveLimits)  # caps when unpacking one
    blob_grace: float = GRACE  # s an archive no revision names is kept after its last put
    blob_sweep_every: float = 60.0  # s between garbage collections of archives


class FunctionTable(dict[str, Function]):
    """The functions as last synced (name -> Function), indexed by revision name: which
    function owns a revision is looked up, never guessed from the revision's name."""

    def __init__(self, items: Mapping[str, Function] | Iterable[tuple[str, Function]] = ()) -> None:
        super().__init__()
        self._owner: dict[str, str] = {}  # revision name -> function name
        for name, fn in dict(items).items():
            self[name] = fn

    def __setitem__(self, name: str, fn: Function) -> None:
        self._unindex(name)
        super().__setitem__(name, fn)
        for rev in fn.revisions:
            self._owner[rev.name] = name

    def __delitem__(self, name: str) -> None:
        self._unindex(name)
        super().__delitem__(name)

    def pop(self, name: str, *default: Any) -> Any:
        self._unindex(name)
        return super().pop(name, *default)

    def _unindex(self, name: str) -> None:
        old = self.get(name)
        for rev in old.revisions if old is not None else ():
            if self._owner.get(rev.name) == name:
                del self._owner[rev.name]

    def owner(self, revision: str) -> Function | None:
        """The function that has a revision of this name (None if none has)."""
        fn = self.get(self._owner.get(revision, ""))
        return fn if fn is not None and fn.revision(revision) is not None else None


class ControllerState:
    """The state and shared pieces of one controller (see the module's docstring)."""

    # assigned by the parts too (declared here, so that every part sees one type)
    _acting: asyncio.Task[None] | None
    _cache: SourceCache | None
    _functions: FunctionTable
    _listing: asyncio.Future[list[Running]] | None
    _listed_at: float
    _sweeping: asyncio.Task[None] | None
    _swept_at: float

    def __init__(
        self,
        store: Store,
        driver: Driver,
        autoscaler: Autoscaler | None = None,
        settings: Settings | None = None,
        clock: Callable[[], float] = time.monotonic,
        leadership: Leadership | None = None,
        lease_key: str | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.base_store = store
        self.leadership = leadership
        self.lease_key = lease_key  # the lease's key in a Redis store: writes are fenced there too
        self.info = dict(info or {})  # shown by torpor status (host, pid, driver, ...)
        # the leader's view: with a leadership every action needs the lease (fence.py)
        self._fenced_store = FencedStore(store, self.leading) if leadership is not None else None
        self.store: Store = self._fenced_store if self._fenced_store is not None else store  # type: ignore[assignment]
        self.driver: Driver = (
            FencedDriver(driver, self.leading) if leadership is not None else driver
        )  # type: ignore[assignment]
        self.autoscaler = autoscaler or Autoscaler(clock)
        self.settings = settings or Settings()
        self.clock = clock
        self.tracked: dict[str, Tracked] = {}  # replica name -> tracked
        self.paused: dict[str, tuple[Tracked, float]] = {}  # replica -> (tracked, paused at)
        self.revs: dict[str, RevisionState] = {}
        self._functions = FunctionTable()  # last synced desired state (see ``functions``)
        self.building: dict[str, asyncio.Task[None]] = {}
        self.synced = asyncio.Event()  # synced as the leader: acting
        self.watching = asyncio.Event()  # functions read and the bus watched (leader or standby)
        self.store_ok_at = 0.0  # when a store call last succeeded (readiness)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # in-flight work (tasks and driver calls): cancelled when deposed or stopped
        self._work: set[asyncio.Future[Any]] = set()
        self._timers: set[asyncio.TimerHandle] = set()  # callbacks due later (see ``_later``)
        self._acting: asyncio.Task[None] | None = None
        self._leader_task: asyncio.Task[None] | None = None
        self._orphans: dict[str, float] = {}  # replica no one tracks -> when first seen
        self._swept_at = 0.0
        self._beat_now = asyncio.Event()  # a role change: heartbeat at once
        self._stopping = False
        self.rollouts = Rollouts(store, clock)
        self._listing: asyncio.Future[list[Running]] | None = None
        self._listed_at = 0.0  # when self._listing was asked for
        self._failing: dict[
            str, tuple[str, float, str]
        ] = {}  # function -> (last error reported, when, doing)
        self._cache: SourceCache | None = None
        self._source_locks: dict[
            str, asyncio.Lock
        ] = {}  # sha -> lock: one fetch (and prepare) at a time
        self._sha_of: dict[
            str, str
        ] = {}  # revision -> archive hash, for revisions given a local copy
        self._next_sweep = 0.0
        self._sweeping: asyncio.Task[None] | None = None

    def leading(self) -> bool:
        """May this controller act now? (Always, without a leadership.)"""
        return self.leadership is None or self.leadership.valid()

    def wake(self) -> None:
        self._wake.set()

    @property
    def functions(self) -> FunctionTable:
        """The functions as last synced; assigning a plain dict indexes it."""
        return self._functions

    @functions.setter
    def functions(self, value: Mapping[str, Function]) -> None:
        self._functions = FunctionTable(value)

    def _spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """A piece of this term's work, kept until it ends: cancelled if the lease is lost,
        cancelled and awaited by ``stop``."""
        task = asyncio.create_task(coro, name=name)
        self._work.add(task)
        task.add_done_callback(self._work.discard)
        return task

    def _later(self, delay: float, callback: Callable[[], object]) -> None:
        """Call ``callback`` in ``delay`` s on the loop (unless stopped first)."""

        def run() -> None:
            self._timers.discard(handle)
            if not self._stopping:
                callback()

        handle = asyncio.get_running_loop().call_later(delay, run)
        self._timers.add(handle)

    async def _event_quietly(
        self, function: str, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        try:
            await self._event(function, kind, message, data)
        except Exception:
            log.exception("controller: recording an event for %s failed", function)

    def _replicas_of(self, revision: str) -> list[Tracked]:
        return [t for t in self.tracked.values() if t.replica.revision == revision]

    async def _publish_quietly(self, channel: str, payload: dict[str, Any]) -> None:
        try:
            await self.store.publish(channel, payload)
        except Exception:
            log.debug("controller: publishing on %s failed", channel, exc_info=True)

    async def _set_revision(self, fn_name: str, rev_name: str, **changes: Any) -> Function | None:
        def mutate(fn: Function | None) -> Function | None:
            rev = fn.revision(rev_name) if fn else None
            if fn is None or rev is None:
                return None
            if all(getattr(rev, k) == v for k, v in changes.items()):
                return None
            for k, v in changes.items():
                setattr(rev, k, v)
            return fn

        fn = await self.store.update_function(fn_name, mutate)
        if fn is not None:
            self.functions[fn_name] = fn
        return fn

    async def _fail_revision(self, fn_name: str, rev_name: str, reason: str) -> None:
        await self._set_revision(fn_name, rev_name, status="failed", reason=reason)
        await self._event(fn_name, "error", f"{rev_name} failed: {reason}")

    async def _revision_ready(self, fn_name: str, rev_name: str) -> None:
        """First replica answered: the revision is ready; give it the traffic it asked for."""

        def mutate(fn: Function | None) -> Function | None:
            rev = fn.revision(rev_name) if fn else None
            if fn is None or rev is None or rev.status != "building":
                return None
            rev.status, rev.reason = "ready", ""
            apply_on_ready(fn, rev)
            return fn

        fn = await self.store.update_function(fn_name, mutate)
        if fn is not None:
            self.functions[fn_name] = fn
            await self._event(
                fn_name,
                "deploy",
                f"{rev_name} is ready; traffic: {format_traffic(fn.traffic)}",
            )

    async def _secret_values(self, function: str, revision: str) -> list[str]:
        """The values of a revision's secrets that exist now (to redact them)."""
        fn = self.functions.get(function)
        rev = fn.revision(revision) if fn else None
        out: list[str] = []
        for name in rev.spec.secrets.values() if rev else ():
            try:
                value = await self.store.get_secret(name)
            except Exception:
                continue
            if value is not None:
                out.append(value.decode("utf-8", errors="replace"))
        return out

    async def _event(
        self, function: str, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        await self.store.add_event(
            Event(function=function, kind=kind, message=message, data=data or {})
        )
