"""The controller: makes actual replicas match desired ones through a Driver.

Level-triggered: every pass reads desired state (store) and actual state (driver +
what it tracks), and acts on the difference. Woken at once by store changes and by
gateway pokes ("a request is waiting at zero"), otherwise every ``tick`` seconds.
Long work (builds, starts, drains) runs in tasks so a pass never blocks; the controller
keeps every task it starts and ``stop`` cancels and awaits what is left.

With a ``Leadership`` (``torpor up``, ``torpor controller``) it acts only while it holds
the controller lease: until then it is a standby that reads and watches (functions,
pokes, stats: its autoscaler is warm when it takes over) but never starts, stops or
writes. Elected, it syncs first (reads the store, lists the driver, adopts what runs by
its labels, resumes rollouts from the store), then reconciles. Deposed, it cancels its
in-flight work at once and leaves the replicas running for the next leader to adopt.
Every driver action and store write of a leader goes through ``fence.py``: a deposed
leader that wakes up late cannot act. A sweep adopts (or stops) replicas no one tracks,
such as one whose start a deposed leader had in flight.

This module is the loop (leadership, the bus, desired/converge); the replica lifecycle is
in ``replicas.py``, adoption in ``adopt.py``, builds and sources in ``builds.py``, the
state they share in ``state.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from torpor.controller.adopt import Adoption
from torpor.controller.fence import fence_store
from torpor.controller.retention import collectable
from torpor.controller.state import (
    ERROR_EVENT_EVERY,
    HEAD_START,
    HEARTBEAT_EVERY,
    FunctionTable,
    RevisionState,
    log,
)
from torpor.messages import parse_poke
from torpor.model import Function, Revision, Scale
from torpor.store.base import CHANGES, POKES, SECRETS, STATS, FencedError


class Controller(Adoption):
    """One controller: ``start`` it, ``stop`` it; ``reconcile`` is one pass (see the
    module's docstring). Built from ``store``, ``driver`` and optionally an autoscaler,
    ``Settings``, a ``clock`` (monotonic seconds), a ``Leadership`` and its lease key."""

    _acting: asyncio.Task[None] | None
    functions: FunctionTable  # a property of ControllerState

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
        """Cancel this term's acting task and all its work (builds, starts and the driver
        calls under them, drains, listings, the archive sweep: all in ``_work``)."""
        tasks: list[asyncio.Future[Any]] = list(self._work)
        if self._acting is not None:
            tasks.append(self._acting)
            self._acting = None
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)

    def _forget_term(self) -> None:
        """What one term knew of actual state; the next term adopts it again from the driver."""
        self.tracked.clear()
        self.paused.clear()
        self.building.clear()
        self.revs.clear()
        self._orphans.clear()
        self._listing = None  # its task, if any, stays in _work until it ends

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

    async def stop(self, stop_replicas: bool = True) -> None:
        """Stop reconciling; drain and stop every replica unless told to leave them
        (then the lease is handed back at once, so a standby takes over without waiting).
        Returns with no task of this controller left pending and no timer left due."""
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
            paused = [self._expire_paused(name, "platform stopping") for name in list(self.paused)]
            await asyncio.gather(
                *(self._drain(tr, "platform stopping") for tr in list(self.tracked.values())),
                *paused,
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
        await self._cancel_leftovers()

    async def _cancel_leftovers(self, timeout: float = 5.0) -> None:
        """Cancel the timers and the work still in flight, and wait for that work to end
        (cancelled work may spawn more as it unwinds: asked again until none is left)."""
        for handle in list(self._timers):
            handle.cancel()
        self._timers.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        current = asyncio.current_task()
        while pending := [w for w in self._work if not w.done() and w is not current]:
            for w in pending:
                w.cancel()
            left = deadline - loop.time()
            if left <= 0:
                log.warning("controller: %d task(s) did not end when cancelled", len(pending))
                return
            await asyncio.wait(pending, timeout=left)
            for handle in list(self._timers):
                handle.cancel()
            self._timers.clear()

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
        fn = self.functions.owner(revision)
        rev = fn.revision(revision) if fn else None
        return fn.effective_scale(rev) if fn and rev else None

    async def _sync_functions(self) -> None:
        self.functions = FunctionTable((f.name, f) for f in await self.store.list_functions())

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
        for name, (tr, since) in list(self.paused.items()):
            if now - since > self.settings.pause_for or tr.replica.revision not in live_revisions:
                self._spawn(self._expire_paused(name, "paused too long"))
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
                self.building[rev.name] = self._spawn(
                    self._build(fn.name, rev), name=f"ctl-build-{rev.name}"
                )
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
            pause = desired == 0 and self.settings.pause_for > 0 and hasattr(self.driver, "pause")
            for tr in extra[: len(live) - desired]:
                if pause and tr.replica.state == "ready":
                    tr.replica.state = "draining"
                    self._spawn(self._pause(tr))
                else:
                    self._spawn_drain(tr, f"scale down to {desired}")
