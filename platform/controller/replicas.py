"""One replica's lifecycle: start (with the first replica's head start), await ready
(the driver's word or a probe of the health path), failed (crash-loop backoff: 0.5, 1, 2,
4 ... s up to ``Settings.backoff_max``), drain, pause and unpause.

A replica scaled to zero with ``Settings.pause_for`` > 0 on a driver that can freeze
(``drivers.base.Pausable``) is *paused*: out of rotation, frozen, kept ``pause_for`` s
for a fast wake, then expired (stopped).
"""

from __future__ import annotations

import asyncio
import secrets

from torpor.controller.builds import Builds
from torpor.controller.state import HEAD_START, PROBE_PATH, RevisionState, Tracked, log
from torpor.drivers.base import Running
from torpor.model import Function, Replica, Revision
from torpor.secret import MissingSecret, SecretValueError, redact, resolve


async def probe_once(endpoint: str, timeout: float = 1.0) -> bool:
    """Whether ``host:port`` answers an HTTP request for the health path (any status
    line will do). Looked up in this module at each probe, so a test may replace it
    (``monkeypatch.setattr(replicas, "probe_once", ...)``)."""
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


class Replicas(Builds):
    """The replica lifecycle (a part of ``Controller``)."""

    _listing: asyncio.Future[list[Running]] | None
    _listed_at: float

    def _spawn_start(self, fn: Function, rev: Revision) -> None:
        """One more replica of ``rev``: the most recently paused one if any, else a new one
        (tracked at once as ``starting``; the driver's start runs in its own task)."""
        paused = [p for p in self.paused.values() if p[0].replica.revision == rev.name]
        if paused:
            tr = max(paused, key=lambda p: p[1])[0]
            del self.paused[tr.replica.name]
            self.tracked[tr.replica.name] = tr
            tr.task = self._spawn(self._unpause(tr), name=f"ctl-unpause-{tr.replica.name}")
            return
        name = f"{rev.name}-{secrets.token_hex(3)}"
        rep = Replica(name=name, function=fn.name, revision=rev.name, state="starting")
        tr = Tracked(replica=rep)
        self.tracked[name] = tr
        tr.task = self._spawn(self._start(tr, rev), name=f"ctl-start-{name}")

    async def _start(self, tr: Tracked, rev: Revision) -> None:
        """Secrets, the local copy of the source, ``driver.start``, then await ready; any
        failure on the way is ``_replica_failed`` (with its backoff)."""
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
            starting = self._spawn(self.driver.start(local, tr.replica.name, secret_env=secret_env))
            tr.starting = starting
            running: Running = await asyncio.shield(starting)
            tr.running = running
            tr.started_at = self.clock()
            self._later(HEAD_START, self.wake)  # replicas held back behind it
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
        if not adopted:
            self.wake()  # replicas held back behind a head start go now, not HEAD_START later
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
        before ``since`` (or at that very instant: a coarse clock) is not reused: a replica
        started after it began may be missing from it, which must not read as "vanished"."""
        now = self.clock()
        if (
            self._listing is None
            or (since > 0 and self._listed_at <= since)
            or (self._listing.done() and now - self._listed_at >= 0.2)
        ):
            self._listed_at = now
            self._listing = self._spawn(self.driver.list())
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

    async def _replica_failed(self, tr: Tracked, reason: str) -> None:
        """The replica failed (start, readiness, crash): stop it, record it ``failed``
        (forgotten a few seconds later), hold the revision's next start back by
        ``backoff_base * 2 ** (failures - 1)`` s up to ``backoff_max``, and say so in an
        event with the log's tail (secrets redacted). A revision still building fails."""
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
        self._later(max(delay, 5.0), lambda: self._spawn(self._forget_failed(rep)))
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

    async def _pause(self, tr: Tracked) -> None:
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
        self.paused[rep.name] = (tr, self.clock())
        await self._event(
            rep.function,
            "replica",
            f"{rep.name} paused (scaled to zero; kept up to "
            f"{self.settings.pause_for:g}s for a fast wake)",
        )

    async def _unpause(self, tr: Tracked) -> None:
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

    async def _expire_paused(self, name: str, reason: str) -> None:
        item = self.paused.pop(name, None)
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
