"""The controller: makes actual replicas match desired ones through a Driver.

Level-triggered: every pass reads desired state (store) and actual state (driver +
what it tracks), and acts on the difference. Woken at once by store changes and by
gateway pokes ("a request is waiting at zero"), otherwise every ``tick`` seconds.
Long work (builds, starts, drains) runs in tasks so a pass never blocks.

With a ``Leadership`` (``torpor up``, ``torpor controller``) it acts only while it holds
the controller lease: until then it is a standby that reads and watches (functions,
pokes, stats: its autoscaler is warm when it takes over) but never starts, stops or
writes. Elected, it syncs first (reads the store, lists the driver, adopts what runs by
its labels, resumes rollouts from the store), then reconciles. Deposed, it cancels its
in-flight work at once and leaves the replicas running for the next leader to adopt.
Every driver action and store write of a leader goes through ``fence.py``: a deposed
leader that wakes up late cannot act. A sweep adopts (or stops) replicas no one tracks,
such as one whose start a deposed leader had in flight.

Sources: a revision names its function folder by the sha256 of its archive in the store
(``Revision.source_sha256``). Before a driver prepares or starts such a revision the
controller fetches the archive by hash into its own cache (``Settings.source_cache``,
``torpor.sources.SourceCache``: hash checked, unpacked with the hardened extractor,
renamed into place) and hands the driver a copy of the revision whose ``source`` is that
local folder. Nothing is read from another component's disk. Archives no revision names
any more are removed from the store and from the cache (``controller/blobs.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from torpor.archive import ArchiveLimits
from torpor.autoscaler.service import Autoscaler
from torpor.controller.blobs import GRACE, referenced, sweep
from torpor.controller.buildlog import BUILD_LOG, BuildLog
from torpor.controller.fence import FencedDriver, FencedStore, fence_store
from torpor.controller.leader import Leadership
from torpor.controller.retention import collectable
from torpor.controller.rollout import Rollouts
from torpor.controller.traffic import apply_on_ready
from torpor.drivers.base import BuildError, Driver, Running
from torpor.messages import parse_poke
from torpor.model import Event, Function, Replica, Revision, Scale
from torpor.secret import MissingSecret, SecretValueError, redact, resolve
from torpor.sources import SourceCache, SourceError
from torpor.store.base import CHANGES, POKES, SECRETS, STATS, FencedError, Store

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


async def probe_once(endpoint: str, timeout: float = 1.0) -> bool:
    host, _, port = endpoint.rpartition(":")
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), timeout)
    except (OSError, TimeoutError, ValueError):  # ValueError: no endpoint (yet)
        return False
    try:
        w.write(
            b"GET " + PROBE_PATH + b" HTTP/1.1\r\nHost: torpor-probe\r\nConnection: close\r\n\r\n"
        )
        line = await asyncio.wait_for(r.readline(), timeout)
        return line.startswith(b"HTTP/1.")
    except (OSError, TimeoutError):
        return False
    finally:
        w.close()


class Controller:
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
        self.parked: dict[
            str, tuple[Tracked, float]
        ] = {}  # paused replicas -> (tracked, paused at)
        self.revs: dict[str, RevisionState] = {}
        self.functions: dict[str, Function] = {}  # last synced desired state
        self.building: dict[str, asyncio.Task[None]] = {}
        self.synced = asyncio.Event()  # synced as the leader: acting
        self.watching = asyncio.Event()  # functions read and the bus watched (leader or standby)
        self.store_ok_at = 0.0  # when a store call last succeeded (readiness)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._work: set[asyncio.Future[Any]] = (
            set()
        )  # in-flight work of this term, cancelled when deposed
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

    # -- lifecycle ---------------------------------------------------------------------
    def leading(self) -> bool:
        """May this controller act now? (Always, without a leadership.)"""
        return self.leadership is None or self.leadership.valid()

    def ready(self) -> bool:
        """Synced as the leader, or watching as a standby with the store answering."""
        if self.leadership is None:
            return self.synced.is_set()
        if not self.watching.is_set() or self.clock() - self.store_ok_at > 3 * HEARTBEAT_EVERY + 1:
            return False
        return self.synced.is_set() or not self.leading()

    def alive(self) -> bool:
        """The loop runs: started, not stopping, and none of its tasks has died."""
        if self._stopping or not self.watching.is_set():
            return False
        tasks = [*self._tasks, *([self._leader_task] if self._leader_task else [])]
        return not any(t.done() for t in tasks)

    @property
    def role(self) -> str:
        if self.leading():
            return "leader" if self.synced.is_set() else "syncing"
        return "standby"

    async def start(self) -> None:
        subs = {ch: self.base_store.subscribe(ch) for ch in (CHANGES, POKES, STATS, SECRETS)}
        use_key = getattr(self.driver, "use_archive_key", None)
        if use_key is not None:  # drivers whose replicas fetch archives themselves (kubernetes)
            use_key(await self.store.archive_key())
        await asyncio.to_thread(self.cache.clean_temps)
        await self._sync_functions()
        self.store_ok_at = self.clock()
        self._tasks = [
            asyncio.create_task(
                self._listen(CHANGES, subs[CHANGES], self._on_change), name="ctl-changes"
            ),
            asyncio.create_task(self._listen(POKES, subs[POKES], self._on_poke), name="ctl-pokes"),
            asyncio.create_task(self._listen(STATS, subs[STATS], self._on_stats), name="ctl-stats"),
            asyncio.create_task(
                self._listen(SECRETS, subs[SECRETS], self._on_secret), name="ctl-secrets"
            ),
        ]
        self.watching.set()
        if self.leadership is None:
            await self._adopt()
            self.synced.set()
            self._tasks.append(asyncio.create_task(self._loop(), name="ctl-loop"))
            return
        self._tasks.append(asyncio.create_task(self._heartbeats(), name="ctl-heartbeat"))
        leadership = self.leadership
        self._leader_task = asyncio.create_task(
            leadership.run(self._elected, self._deposed), name="ctl-lease"
        )
        # return once it is known whether this controller leads (and, if so, once it synced)
        await leadership.attempted.wait()
        while leadership.valid() and not self.synced.is_set() and not self._leader_task.done():
            await asyncio.sleep(0.01)

    async def _elected(self, token: int) -> None:
        """Won the lease: act in a task of its own (the lease's renewals must not wait)."""
        assert self._fenced_store is not None and self.leadership is not None
        self._fenced_store.inner = fence_store(self.base_store, self.lease_key, token, self.leading)
        self._acting = asyncio.create_task(self._act(token), name="ctl-acting")
        self._beat_now.set()

    async def _act(self, token: int) -> None:
        """Sync (store, driver, adoption), then reconcile until cancelled."""
        while True:
            try:
                self._forget_term()
                await self._sync_functions()
                await self._adopt()
                break
            except asyncio.CancelledError:
                raise
            except FencedError:
                return  # deposed meanwhile: the leadership loop says so at once
            except Exception:
                log.exception(
                    "controller: syncing as the leader (token %d) failed; retrying", token
                )
                await asyncio.sleep(1.0)
        self.synced.set()
        self._beat_now.set()
        log.warning(
            "controller: leading (lease token %d); adopted %d replica(s)", token, len(self.tracked)
        )
        self.wake()
        await self._loop()

    async def _deposed(self) -> None:
        """Lost the lease: stop acting at once; the replicas keep running."""
        self.synced.clear()
        self._beat_now.set()
        await self._cancel_term()
        log.warning(
            "controller: deposed; %d replica(s) left running for the next leader", len(self.tracked)
        )
        self._forget_term()

    async def _cancel_term(self) -> None:
        tasks: list[asyncio.Future[Any]] = []
        if self._acting is not None:
            tasks.append(self._acting)
            self._acting = None
        tasks += list(self._work)
        if self._sweeping is not None and not self._sweeping.done():
            tasks.append(self._sweeping)
        tasks += list(self.building.values())
        tasks += [tr.task for tr in self.tracked.values() if tr.task is not None]
        tasks += [
            tr.starting
            for tr in self.tracked.values()
            if tr.starting is not None and not tr.starting.done()
        ]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    def _forget_term(self) -> None:
        """What one term knew of actual state; the next term adopts it again from the driver."""
        self.tracked.clear()
        self.parked.clear()
        self.building.clear()
        self.revs.clear()
        self._orphans.clear()
        self._listing = None
        self._work.clear()

    async def _heartbeats(self) -> None:
        """Tell the store (torpor status) that this controller lives, and in which role."""
        assert self.leadership is not None
        while True:
            try:
                held = self.leadership.held
                await self.base_store.heartbeat(
                    "controller",
                    self.leadership.holder,
                    {
                        **self.info,
                        "role": self.role,
                        "token": held.token if held else None,
                        "since": self.leadership.since,
                        "terms": self.leadership.terms,
                        "replicas": len(self.tracked) if self.leading() else None,
                    },
                )
                self.store_ok_at = self.clock()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("controller: heartbeat failed: %s: %s", type(e).__name__, e)
            self._beat_now.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HEARTBEAT_EVERY):  # not wait_for: it can lose a cancel
                    await self._beat_now.wait()

    def _spawn(self, coro: Any) -> asyncio.Future[Any]:
        """A piece of this term's work: cancelled if the lease is lost."""
        fut = asyncio.ensure_future(coro)
        self._work.add(fut)
        fut.add_done_callback(self._work.discard)
        return fut

    async def stop(self, stop_replicas: bool = True) -> None:
        """Stop reconciling; drain and stop every replica unless told to leave them
        (then the lease is handed back at once, so a standby takes over without waiting)."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._acting is not None:
            self._acting.cancel()
            await asyncio.gather(self._acting, return_exceptions=True)
        for t in list(self.building.values()):
            t.cancel()
        if self._sweeping is not None:
            self._sweeping.cancel()
        if stop_replicas and self.leading():
            parked = [self._expire_parked(name, "platform stopping") for name in list(self.parked)]
            await asyncio.gather(
                *(self._drain(tr, "platform stopping") for tr in list(self.tracked.values())),
                *parked,
                return_exceptions=True,
            )
        else:
            for tr in self.tracked.values():
                if tr.task:
                    tr.task.cancel()
            for work in list(self._work):
                work.cancel()
        if self._leader_task is not None:
            self._leader_task.cancel()  # its finally releases the lease
            await asyncio.gather(self._leader_task, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    async def _listen(
        self, channel: str, sub: Any, handle: Callable[[dict[str, Any]], Any]
    ) -> None:
        """Feed ``handle`` from a bus channel; resubscribe (and resync) if the bus fails."""
        while True:
            try:
                async for msg in sub:
                    try:
                        r = handle(msg)
                        if asyncio.iscoroutine(r):
                            await r
                    except Exception:
                        log.exception("controller: handling %r failed", msg)
                if self._stopping:
                    return
            except asyncio.CancelledError:
                raise
            except (
                ConnectionError,
                RedisConnectionError,
            ) as e:  # the store went or came back: resubscribe, resync
                log.warning("controller: %s subscription ended (%s); resubscribing", channel, e)
            except Exception:
                log.exception("controller: %s subscription failed; resubscribing", channel)
            await asyncio.sleep(1.0)
            sub = self.store.subscribe(channel)
            if channel == CHANGES:
                await self._sync_functions()
                self.wake()

    async def _on_change(self, msg: dict[str, Any]) -> None:
        if msg.get("kind") == "replica":
            return  # our own writes
        name = msg["function"]
        fn = await self.store.get_function(name)
        if fn is None:
            old = self.functions.pop(name, None)
            if old is not None and self.synced.is_set():
                self._spawn(self._forget_later(old))
        else:
            self.functions[name] = fn
        self.wake()

    def _on_poke(self, msg: dict[str, Any]) -> None:
        poke = parse_poke(msg)  # a malformed one is dropped, with a log line
        if poke is None:
            return
        fn = self.functions.get(poke["function"])
        rev = fn.revision(poke["revision"]) if fn else None
        if fn is None or rev is None:
            return
        try:
            self.autoscaler.poke(rev.name, fn.effective_scale(rev), poke["queued"], poke["gateway"])
        except (
            Exception
        ) as e:  # e.g. a scale stored before it was validated: this function's problem alone
            self._function_failed(fn.name, e, "waking")
            return
        self.wake()

    def _on_stats(self, msg: dict[str, Any]) -> None:
        try:
            self.autoscaler.observe(msg, self._scale_of)
        finally:
            self.rollouts.observe(msg)

    def _on_secret(self, msg: dict[str, Any]) -> None:
        """A secret was set: revisions held back because it was missing start again now
        (running replicas keep the env they started with)."""
        if msg.get("kind") != "set":
            return
        for fn in self.functions.values():
            for rev in fn.revisions:
                st = self.revs.get(rev.name)
                if st is not None and st.failures and msg.get("name") in rev.spec.secrets.values():
                    st.failures, st.next_start = 0, 0.0
        self.wake()

    def _scale_of(self, revision: str) -> Scale | None:
        fn_name = revision.rsplit("-", 1)[0]
        fn = self.functions.get(fn_name)
        rev = fn.revision(revision) if fn else None
        return fn.effective_scale(rev) if fn and rev else None

    async def _sync_functions(self) -> None:
        self.functions = {f.name: f for f in await self.store.list_functions()}

    async def _loop(self) -> None:
        delay = self.settings.tick
        while True:
            try:
                async with asyncio.timeout(delay):  # not wait_for: on 3.11 it can lose a cancel
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.reconcile()
                delay = self.settings.tick
            except Exception:
                log.exception("controller: reconcile failed; retrying with backoff")
                delay = min(delay * 2, 10.0)

    # -- adoption ------------------------------------------------------------------------
    async def _adopt(self) -> None:
        """Adopt replicas of routed revisions that an earlier run (or leader) left; stop the rest."""
        replicas_in_store = {r.name: r for r in await self.store.list_replicas()}
        for running in await self.driver.list():
            replicas_in_store.pop(running.replica, None)
            await self._adopt_one(running)
        for stale in replicas_in_store.values():  # records without a process behind them
            await self.store.delete_replica(stale.function, stale.name)

    async def _adopt_one(self, running: Running) -> None:
        unpause = getattr(self.driver, "unpause", None)
        if unpause is not None and running.alive:
            try:
                await unpause(running)  # a replica left paused by an earlier run
            except FencedError:
                raise
            except Exception as e:
                log.warning("could not unpause %s: %s", running.replica, e)
        fn = self.functions.get(running.function)
        rev = fn.revision(running.revision) if fn else None
        keep = running.alive and fn is not None and rev is not None and rev.status == "ready"
        if not keep:
            await self.driver.stop(running, grace=1.0)
            await self.store.delete_replica(running.function, running.replica)
            return
        rep = Replica(
            name=running.replica,
            function=running.function,
            revision=running.revision,
            state="starting",
            driver_id=running.driver_id,
        )
        tr = Tracked(replica=rep, running=running)
        self.tracked[rep.name] = tr
        tr.task = asyncio.create_task(self._await_ready(tr, adopted=True))
        await self._event(running.function, "replica", f"adopted {rep.name} ({running.endpoint})")

    async def _sweep_orphans(self, listed_at: float, listing: list[Running]) -> None:
        """Adopt or stop replicas no one tracks, once seen on two sweeps (a start a deposed
        leader had in flight when this one listed the driver, say)."""
        busy: set[str] = getattr(self.driver, "busy", set())
        seen: set[str] = set()
        for r in listing:
            if r.replica in self.tracked or r.replica in self.parked or r.replica in busy:
                continue
            seen.add(r.replica)
            first = self._orphans.setdefault(r.replica, listed_at)
            if listed_at - first < SWEEP_EVERY * 0.9:
                continue
            del self._orphans[r.replica]
            log.warning(
                "controller: %s runs but nobody tracks it: adopting or stopping it", r.replica
            )
            await self._adopt_one(r)
        for name in [n for n in self._orphans if n not in seen]:
            del self._orphans[name]

    # -- reconcile -----------------------------------------------------------------------
    async def reconcile(self) -> None:
        if self._stopping or not self.synced.is_set() or not self.leading():
            return
        now = self.clock()
        await self._check_alive()
        live_revisions: set[str] = set()
        for i, fn in enumerate(list(self.functions.values())):
            if i % 100 == 99:
                await asyncio.sleep(0)  # a pass over many functions must not stall the shared loop
            live_revisions.update(rev.name for rev in fn.revisions)  # even if its step fails below
            await self._reconcile_isolated(fn, now)
        for name in [n for n in self._failing if n not in self.functions]:
            del self._failing[name]
        for name, (tr, since) in list(self.parked.items()):
            if now - since > self.settings.pause_for or tr.replica.revision not in live_revisions:
                self._spawn(self._expire_parked(name, "paused too long"))
        # replicas of revisions or functions that no longer exist
        for tr in list(self.tracked.values()):
            if tr.replica.revision not in live_revisions and tr.replica.state != "draining":
                self._spawn_drain(tr, "revision deleted")
        for rev_name in [r for r in self.revs if r not in live_revisions]:
            del self.revs[rev_name]
            self.autoscaler.forget(rev_name)
        self._maybe_sweep(now)

    async def _reconcile_isolated(self, fn: Function, now: float) -> None:
        """One function's step of the pass. Its failure is its own: logged, reported as an
        ``error`` event (see ``_function_failed``), retried on the next pass, and the pass
        goes on with the other functions."""
        try:
            await self._reconcile_function(fn, now)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._function_failed(fn.name, e, "reconciling")
            return
        failing = self._failing.get(fn.name)
        if failing is not None and failing[2] == "reconciling":
            del self._failing[fn.name]
            log.warning("controller: %s reconciles again", fn.name)
            self._spawn(
                self._event_quietly(
                    fn.name, "controller", f"controller: reconciling {fn.name} works again"
                )
            )

    async def _reconcile_function(self, fn: Function, now: float) -> None:
        if fn.rollout is not None and fn.rollout.state in ("running", "paused"):
            await self.rollouts.reconcile(fn)
        if len(fn.revisions) > self.settings.keep_revisions:
            for rev_name in collectable(fn, self.settings.keep_revisions):
                await self._collect_revision(fn, rev_name)
        for rev in fn.revisions:
            if (
                rev.status == "building"
                and rev.name not in self.building
                and rev.image is None
                and not self._replicas_of(rev.name)
            ):
                self.building[rev.name] = asyncio.create_task(self._build(fn.name, rev))
            desired = self._desired(fn, rev, now)
            self._converge(fn, rev, desired, now)

    def _function_failed(self, name: str, exc: Exception, doing: str) -> None:
        """Report a failure of one function: an ``error`` event naming the exception, at
        most once per ERROR_EVENT_EVERY seconds and only when the message is new (a
        failure that repeats every pass is reported once, not once a tick)."""
        message = f"controller: {doing} {name} failed: {type(exc).__name__}: {exc}"[:500]
        now = self.clock()
        last = self._failing.get(name)
        if last is not None and (last[0] == message or now - last[1] < ERROR_EVENT_EVERY):
            return
        self._failing[name] = (message, now, doing)
        log.error("%s (other functions are not affected; retrying)", message, exc_info=exc)
        self._spawn(
            self._event_quietly(
                name,
                "error",
                message + "; retrying on every pass",
                {"error": type(exc).__name__, "doing": doing},
            )
        )

    async def _event_quietly(
        self, function: str, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        try:
            await self._event(function, kind, message, data)
        except Exception:
            log.exception("controller: recording an event for %s failed", function)

    def _replicas_of(self, revision: str) -> list[Tracked]:
        return [t for t in self.tracked.values() if t.replica.revision == revision]

    def _desired(self, fn: Function, rev: Revision, now: float) -> int:
        st = self.revs.setdefault(rev.name, RevisionState())
        if rev.status == "building":
            # verification: a built revision proves it starts before it gets traffic
            return 1 if rev.image is not None else 0
        if rev.status != "ready" or rev.name not in fn.routed():
            return 0
        scale = fn.effective_scale(rev)
        if (
            st.desired == 0
            and scale.min == 0
            and rev.name not in self.autoscaler.fresh
            and not self._replicas_of(rev.name)
        ):
            return (
                0  # at rest: nothing new to decide on (keeps a pass cheap with many idle functions)
            )
        ready = sum(1 for t in self._replicas_of(rev.name) if t.replica.state == "ready")
        decision = self.autoscaler.decide(rev.name, scale, ready)
        if decision.desired is None:
            desired = (
                st.desired
                if st.desired
                else len(
                    [
                        t
                        for t in self._replicas_of(rev.name)
                        if t.replica.state in ("starting", "ready")
                    ]
                )
            )
        else:
            desired = decision.desired
        desired = min(max(desired, scale.min), scale.max, self.settings.max_replicas)  # max wins
        if desired != st.desired:
            msg = f"{rev.name}: desired {st.desired} -> {desired} ({decision.reason})"
            self._spawn(
                self._event(
                    fn.name,
                    "scale",
                    msg,
                    {
                        "revision": rev.name,
                        "from": st.desired,
                        "to": desired,
                        "panic": decision.panic,
                        "stable": decision.stable,
                        "panic_concurrency": decision.panicked,
                        "reason": decision.reason,
                    },
                )
            )
            st.desired = desired
        return desired

    def _converge(self, fn: Function, rev: Revision, desired: int, now: float) -> None:
        st = self.revs.setdefault(rev.name, RevisionState())
        mine = self._replicas_of(rev.name)
        live = [t for t in mine if t.replica.state in ("starting", "ready")]
        if len(live) < desired:
            if now < st.next_start:
                return
            if not any(t.replica.state == "ready" for t in live):
                # from zero the first replica gets a head start: the rest follow once it is
                # ready or HEAD_START s after the driver started it, so they do not compete
                # with it (a Docker engine starts containers a few at a time, slower each,
                # and the first queued request waits for the first replica)
                if any(t.running is None or now - t.started_at < HEAD_START for t in live):
                    return
                if not live:
                    self._spawn_start(fn, rev)
                    return
            for _ in range(desired - len(live)):
                self._spawn_start(fn, rev)
        elif len(live) > desired:
            # stop the ones still starting first, then the newest ready ones
            extra = [t for t in live if t.replica.state == "starting"] + sorted(
                [t for t in live if t.replica.state == "ready"], key=lambda t: -t.replica.started
            )
            park = desired == 0 and self.settings.pause_for > 0 and hasattr(self.driver, "pause")
            for tr in extra[: len(live) - desired]:
                if park and tr.replica.state == "ready":
                    tr.replica.state = "draining"
                    self._spawn(self._park(tr))
                else:
                    self._spawn_drain(tr, f"scale down to {desired}")

    # -- sources -------------------------------------------------------------------------
    @property
    def cache(self) -> SourceCache:
        if self._cache is None:
            root = self.settings.source_cache or Path(tempfile.mkdtemp(prefix="torpor-sources-"))
            self._cache = SourceCache(root, self.settings.source_limits)
        return self._cache

    async def _local(self, rev: Revision) -> tuple[Revision, bool]:
        """The revision as a driver gets it, and whether its source was fetched just now.

        A source revision with an archive hash gets ``source`` = this controller's own
        unpacked copy (fetched from the store by hash if missing). Image revisions and
        revisions made before archives (a folder path, no hash) are handed over as they are."""
        sha = rev.source_sha256
        if rev.spec.image or not sha:
            return rev, False
        cache = self.cache
        self._sha_of[rev.name] = sha
        lock = self._source_locks.setdefault(sha, asyncio.Lock())
        async with lock:
            fresh = False
            if not cache.has(sha):
                blob = await self.store.get_blob(sha)
                if blob is None:
                    raise BuildError(
                        f"the source archive {sha[:12]} of {rev.name} is not in the store "
                        "(deploy the function again)"
                    )
                try:
                    await asyncio.to_thread(cache.install, sha, blob)
                except SourceError as e:
                    raise BuildError(str(e)) from e
                fresh = True
        return replace(rev, source=str(cache.path(sha))), fresh

    def _prepare_lock(self, local: Revision) -> contextlib.AbstractAsyncContextManager[Any]:
        """Held around ``driver.prepare`` of a revision on a cached folder: two revisions
        of one archive share the folder (and what a driver installs into it)."""
        sha = local.source_sha256
        if sha and local.source and local.source == str(self.cache.path(sha)):
            return self._source_locks.setdefault(sha, asyncio.Lock())
        return contextlib.nullcontext()

    def _sweep_soon(self) -> None:
        self._next_sweep = 0.0
        self.wake()

    def _maybe_sweep(self, now: float) -> None:
        if now < self._next_sweep or (self._sweeping is not None and not self._sweeping.done()):
            return
        self._next_sweep = now + self.settings.blob_sweep_every
        self._sweeping = asyncio.create_task(self._sweep(), name="ctl-archive-gc")

    async def _sweep(self) -> None:
        """Remove archives no revision names, from the store and from this cache."""
        try:
            swept = await sweep(self.store, self.settings.blob_grace)
            if swept.due is not None:  # an unnamed archive still in its grace: back when it ends
                at = self.clock() + max(0.5, swept.due - time.time())
                self._next_sweep = min(self._next_sweep, at)
            if self._cache is None:
                return
            keep = referenced(self.functions.values())
            in_use = {
                self._sha_of.get(t.replica.revision)
                for t in [*self.tracked.values(), *(p[0] for p in self.parked.values())]
            }
            for sha in self._cache.shas():
                if (
                    sha not in keep
                    and sha not in in_use
                    and not self._source_locks.get(sha, asyncio.Lock()).locked()
                ):
                    await asyncio.to_thread(self._cache.remove, sha)
                    self._source_locks.pop(sha, None)
            live = {rev.name for fn in self.functions.values() for rev in fn.revisions}
            in_use_revs = {
                t.replica.revision
                for t in [*self.tracked.values(), *(p[0] for p in self.parked.values())]
            }
            for rev_name in [r for r in self._sha_of if r not in live and r not in in_use_revs]:
                del self._sha_of[rev_name]
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "controller: garbage collection of source archives failed; retrying later"
            )

    # -- builds --------------------------------------------------------------------------
    async def _build(self, fn_name: str, rev: Revision) -> None:
        """Build one revision: one ``build`` event as it starts and one as it ends (see
        torpor.controller.buildlog); its log lines go over the bus as they come."""
        blog = BuildLog(rev.name)
        loop = asyncio.get_running_loop()

        def progress(line: str) -> None:  # from the loop or a driver's build thread
            kept = blog.add(line)
            loop.call_soon_threadsafe(
                lambda: self._spawn(
                    self._publish_quietly(
                        BUILD_LOG, {"function": fn_name, "revision": rev.name, "line": kept}
                    )
                )
            )

        try:
            await self._event(
                fn_name, "build", f"{rev.name}: build started", {"revision": rev.name}
            )
            local, _ = await self._local(rev)
            async with self._prepare_lock(local):
                built = await self.driver.prepare(local, progress)
            image = built.image or ""
            info_of = getattr(self.driver, "build_info", None)
            info: dict[str, Any] = (
                await asyncio.to_thread(info_of, built, blog.lines) if info_of else {}
            )
            await self._set_revision(
                fn_name, rev.name, image=image, reason="starting its first replica"
            )
            await self._event(
                fn_name, "build", blog.finished_message(info), blog.data(**info, image=image)
            )
        except asyncio.CancelledError:
            raise
        except (
            Exception
        ) as e:  # BuildError, or a driver bug / engine down: same outcome for the user
            if not isinstance(e, BuildError):
                log.exception("build of %s failed", rev.name)
            reason = (
                f"build failed: {e}"
                if isinstance(e, BuildError)
                else f"build failed: {type(e).__name__}: {e}"
            )
            await self._set_revision(fn_name, rev.name, status="failed", reason=reason)
            await self._event(fn_name, "build", blog.failed_message(reason), blog.data(failed=True))
        finally:
            await self._publish_quietly(
                BUILD_LOG, {"function": fn_name, "revision": rev.name, "done": True}
            )
            self.building.pop(rev.name, None)
            self.wake()

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
                f"{rev_name} is ready; traffic: "
                + ", ".join(
                    f"{t.revision}={t.percent}%" + (f" ({t.tag})" if t.tag else "")
                    for t in fn.traffic
                ),
            )

    # -- replicas --------------------------------------------------------------------------
    def _spawn_start(self, fn: Function, rev: Revision) -> None:
        parked = [p for p in self.parked.values() if p[0].replica.revision == rev.name]
        if parked:
            tr = max(parked, key=lambda p: p[1])[0]
            del self.parked[tr.replica.name]
            self.tracked[tr.replica.name] = tr
            tr.task = asyncio.create_task(self._unpark(tr))
            return
        name = f"{rev.name}-{secrets.token_hex(3)}"
        rep = Replica(name=name, function=fn.name, revision=rev.name, state="starting")
        tr = Tracked(replica=rep)
        self.tracked[name] = tr
        tr.task = asyncio.create_task(self._start(tr, rev))

    async def _start(self, tr: Tracked, rev: Revision) -> None:
        try:
            # read at each start: a changed secret reaches the replicas started after it
            secret_env = await resolve(self.store, rev.spec) if rev.spec.secrets else None
        except (MissingSecret, SecretValueError) as e:
            await self._replica_failed(tr, f"start failed: {e}")
            return
        try:
            local, fresh = await self._local(rev)
            if fresh and rev.status == "ready" and not rev.image:
                # prepared into its folder (no image: the process driver's .deps), and this
                # controller's copy is new (another host's build, or a cleared cache): again here
                async with self._prepare_lock(local):
                    await self.driver.prepare(local)
        except Exception as e:
            await self._replica_failed(tr, f"start failed: {e}")
            return
        try:
            starting: asyncio.Future[Running] = asyncio.ensure_future(
                self.driver.start(local, tr.replica.name, secret_env=secret_env)
            )
            tr.starting = starting
            running: Running = await asyncio.shield(starting)
            tr.running = running
            tr.started_at = self.clock()
            asyncio.get_running_loop().call_later(
                HEAD_START, self.wake
            )  # replicas held back behind it
        except Exception as e:
            await self._replica_failed(tr, f"start failed: {e}")
            return
        tr.replica.driver_id = running.driver_id
        await self.store.put_replica(tr.replica)
        await self._await_ready(tr)

    async def _await_ready(self, tr: Tracked, adopted: bool = False) -> None:
        assert tr.running is not None
        deadline = self.clock() + self.settings.startup_timeout
        started, checked = self.clock(), self.clock()
        while True:
            endpoint = tr.running.endpoint  # may be empty until the driver knows it (a Pod's IP)
            if await self._probe(tr.running, deadline):
                endpoint = tr.running.endpoint
                break
            now = self.clock()
            # poll fast while a cold start is likely to finish (a refused connect costs ~50 us)
            delay = 0.004 if now - started < 3.0 else 0.05
            if now > deadline:
                await self._replica_failed(
                    tr, f"not ready within {self.settings.startup_timeout:g}s"
                )
                return
            if now - checked > 0.25:
                checked = now
                if not await self._alive(tr.running, since=started):
                    await self._replica_failed(tr, "exited before becoming ready")
                    return
            await asyncio.sleep(delay)
        tr.replica.state = "ready"
        tr.replica.endpoint = endpoint
        tr.ready_since = self.clock()
        await self.store.put_replica(tr.replica)
        fn = self.functions.get(tr.replica.function)
        rev = fn.revision(tr.replica.revision) if fn else None
        if rev is not None and rev.status == "building":
            await self._revision_ready(fn.name, rev.name)  # type: ignore[union-attr]
        if not adopted:
            await self._event(
                tr.replica.function, "replica", f"{tr.replica.name} ready at {endpoint}"
            )

    async def _probe(self, running: Running, deadline: float) -> bool:
        """Whether the replica is ready: the driver's word when it reports readiness (a Pod's
        Ready condition: the controller then never connects to replicas), else a request to
        the replica's health path."""
        wait_ready = getattr(self.driver, "wait_ready", None)
        if wait_ready is not None:
            try:
                ready = await wait_ready(running, max(0.0, min(1.0, deadline - self.clock())))
            except (
                Exception
            ) as e:  # the cluster did not answer: not ready yet (the deadline decides)
                log.warning("readiness of %s unknown: %s", running.replica, e)
                await asyncio.sleep(0.2)
                return False
            if ready is not None:
                return bool(ready) and bool(running.endpoint)
        return bool(running.endpoint) and await probe_once(running.endpoint)

    async def _list(self, since: float = 0.0) -> tuple[float, list[Running]]:
        """driver.list(), shared by concurrent callers and reused for 0.2 s: many replicas
        starting at once must not queue one listing each in front of their own starts.
        Returns when the listing was asked for with what it found. A listing asked for
        before ``since`` is not reused: a replica started after it began may be missing
        from it, which must not read as "vanished"."""
        now = self.clock()
        if (
            self._listing is None
            or self._listed_at < since
            or (self._listing.done() and now - self._listed_at >= 0.2)
        ):
            self._listed_at = now
            self._listing = asyncio.ensure_future(self.driver.list())
        at = self._listed_at
        return at, await asyncio.shield(self._listing)

    async def _alive(self, running: Running, since: float = 0.0) -> bool:
        for r in (await self._list(since))[1]:
            if r.replica == running.replica:
                running.exit_code = r.exit_code
                if r.endpoint and not running.endpoint:
                    running.endpoint = r.endpoint
                return r.alive
        return False

    async def _check_alive(self) -> None:
        """Find replicas that died under us (crash, OOM, kill), and ones no one tracks."""
        now = self.clock()
        sweep = self.leadership is not None and now - self._swept_at >= SWEEP_EVERY
        if not self.tracked and not sweep:
            return
        listed_at, listing = await self._list()
        if sweep:
            self._swept_at = now
            await self._sweep_orphans(listed_at, listing)
        seen = {r.replica: r for r in listing}
        for tr in list(self.tracked.values()):
            if tr.running is None or tr.replica.state != "ready" or tr.started_at > listed_at:
                continue  # not ready, or started after the listing began: judged next time
            r = seen.get(tr.replica.name)
            if r is None or not r.alive:
                code = r.exit_code if r else None
                await self._replica_failed(
                    tr, f"exited (code {code})" if code is not None else "vanished"
                )
            elif self.clock() - tr.ready_since > 10:
                self.revs.setdefault(tr.replica.revision, RevisionState()).failures = 0

    async def _replica_failed(self, tr: Tracked, reason: str) -> None:
        rep = tr.replica
        st = self.revs.setdefault(rep.revision, RevisionState())
        st.failures += 1
        delay = min(self.settings.backoff_base * 2 ** (st.failures - 1), self.settings.backoff_max)
        st.next_start = self.clock() + delay
        st.reason = reason
        tail = ""
        if tr.running is not None:
            tail = await self._log_tail(tr.running)
            try:
                await self.driver.stop(tr.running, grace=1.0)
            except Exception:
                log.exception("cleanup of %s failed", rep.name)
        rep.state, rep.endpoint = "failed", ""
        self.tracked.pop(rep.name, None)
        await self.store.put_replica(rep)
        asyncio.get_running_loop().call_later(
            max(delay, 5.0), lambda: self._spawn(self._forget_failed(rep))
        )
        values = await self._secret_values(rep.function, rep.revision)
        if values:  # the replica's output or a driver's error may quote one
            reason, tail = redact(reason, values), redact(tail, values)
        # the log's last line (usually the exception) leads; the tail follows for context
        last = f": {tail.strip().splitlines()[-1].strip()[:200]}" if tail.strip() else ""
        full = f"\n{tail}" if tail else ""
        await self._event(
            rep.function, "replica", f"{rep.name} {reason}; next start in {delay:g}s{last}{full}"
        )
        fn = self.functions.get(rep.function)
        rev = fn.revision(rep.revision) if fn else None
        if rev is not None and rev.status == "building":
            await self._fail_revision(rep.function, rep.revision, f"replica {reason}{last}{full}")
        self.wake()

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

    async def _forget_failed(self, rep: Replica) -> None:
        if rep.name not in self.tracked:
            await self.store.delete_replica(rep.function, rep.name)

    async def _log_tail(self, running: Running, lines: int = 8) -> str:
        out: list[str] = []
        try:
            async for line in self.driver.logs(running, follow=False, tail=lines):
                out.append(line)
        except Exception:
            return ""
        return "\n".join(out[-lines:])

    async def _park(self, tr: Tracked) -> None:
        """Scale to zero by freezing: out of rotation, then paused (memory kept, no CPU)."""
        rep = tr.replica
        await self.store.put_replica(rep)  # draining: gateways stop routing to it
        await asyncio.sleep(0.2)
        try:
            assert tr.running is not None
            await self.driver.pause(tr.running)  # type: ignore[attr-defined]
        except Exception as e:
            log.warning("pausing %s failed (%s); stopping it instead", rep.name, e)
            await self._drain(tr, "scale down to 0")
            return
        self.tracked.pop(rep.name, None)
        await self.store.delete_replica(rep.function, rep.name)
        self.parked[rep.name] = (tr, self.clock())
        await self._event(
            rep.function,
            "replica",
            f"{rep.name} paused (scaled to zero; kept up to "
            f"{self.settings.pause_for:g}s for a fast wake)",
        )

    async def _unpark(self, tr: Tracked) -> None:
        rep = tr.replica
        rep.state, rep.endpoint = "starting", ""
        try:
            assert tr.running is not None
            await self.driver.unpause(tr.running)  # type: ignore[attr-defined]
        except Exception as e:
            await self._replica_failed(tr, f"unpause failed: {e}")
            return
        await self.store.put_replica(rep)
        await self._await_ready(tr, adopted=True)
        await self._event(rep.function, "replica", f"{rep.name} unpaused, ready at {rep.endpoint}")

    async def _expire_parked(self, name: str, reason: str) -> None:
        item = self.parked.pop(name, None)
        if item is None:
            return
        tr = item[0]
        assert tr.running is not None
        try:
            await self.driver.unpause(tr.running)  # type: ignore[attr-defined]
            await self.driver.stop(tr.running, grace=self.settings.drain_grace)
        finally:
            await self._event(
                tr.replica.function, "replica", f"{tr.replica.name} stopped: {reason}"
            )

    def _spawn_drain(self, tr: Tracked, reason: str) -> None:
        tr.replica.state = "draining"
        self._spawn(self._drain(tr, reason))

    async def _drain(self, tr: Tracked, reason: str) -> None:
        """Take the replica out of rotation, let in-flight requests finish, stop it."""
        rep = tr.replica
        rep.state, endpoint = "draining", rep.endpoint
        if tr.task and not tr.task.done():
            tr.task.cancel()
        if tr.running is None and tr.starting is not None:
            # a start still in the driver: wait for it, or its container/process would be orphaned
            try:
                tr.running = await asyncio.wait_for(asyncio.shield(tr.starting), 120)
            except Exception:
                tr.running = None
        await self.store.put_replica(rep)
        if endpoint:
            await asyncio.sleep(0.2)  # gateways drop it from rotation before the listener closes
            grace = self.settings.drain_grace
            fn = self.functions.get(rep.function)
            rev = fn.revision(rep.revision) if fn else None
            if rev is not None:
                grace = max(grace, rev.spec.timeout)
        else:
            grace = (
                1.0  # never served a request: nothing to drain (and it may not handle SIGTERM yet)
            )
        try:
            if tr.running is not None:
                await self.driver.stop(tr.running, grace=grace)
        finally:
            self.tracked.pop(rep.name, None)
            await self.store.delete_replica(rep.function, rep.name)
        await self._event(rep.function, "replica", f"{rep.name} stopped: {reason}")

    async def _event(
        self, function: str, kind: str, message: str, data: dict[str, Any] | None = None
    ) -> None:
        await self.store.add_event(
            Event(function=function, kind=kind, message=message, data=data or {})
        )

    # -- deletion ------------------------------------------------------------------------
    async def _collect_revision(self, fn: Function, rev_name: str) -> None:
        """Garbage-collect a retired revision: no traffic, no replicas left."""
        if any(t.replica.revision == rev_name for t in self.tracked.values()):
            return
        rev = fn.revision(rev_name)

        def mutate(cur: Function | None) -> Function | None:
            if cur is None or cur.revision(rev_name) is None or rev_name in cur.routed():
                return None
            cur.revisions = [r for r in cur.revisions if r.name != rev_name]
            return cur

        new = await self.store.update_function(fn.name, mutate)
        if new is not None and new.revision(rev_name) is None and rev is not None:
            self.functions[fn.name] = new
            await self.driver.remove(rev)
            if (
                rev.source
                and self.settings.source_root
                and Path(rev.source).is_relative_to(self.settings.source_root)
            ):
                shutil.rmtree(rev.source, ignore_errors=True)  # a folder from before archives
            if rev.source_sha256:
                self._sweep_soon()
            await self._event(
                fn.name,
                "gc",
                f"{rev_name} garbage-collected (retention keeps {self.settings.keep_revisions})",
            )

    async def _forget_later(self, fn: Function) -> None:
        self.wake()
        for _ in range(600):
            if not any(t.replica.function == fn.name for t in self.tracked.values()):
                break
            await asyncio.sleep(0.1)
        await self.forget_function(fn)
        await self._event(fn.name, "delete", f"function {fn.name} deleted")

    async def forget_function(self, fn: Function) -> None:
        for rev in fn.revisions:
            try:
                await self.driver.remove(rev)
            except Exception:
                log.exception("removing %s failed", rev.name)
        root = self.settings.source_root
        if root is not None:
            shutil.rmtree(root / fn.name, ignore_errors=True)  # folders from before archives
        if referenced([fn]):
            self._sweep_soon()
