"""Builds and sources: a revision's archive fetched by hash into this controller's own
cache, ``driver.prepare`` on it (one ``build`` event as it starts, one as it ends), and
garbage collection of retired revisions, deleted functions and archives no revision names.

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
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from torpor.controller.blobs import referenced, sweep
from torpor.controller.buildlog import BUILD_LOG, BuildLog
from torpor.controller.state import ControllerState, log
from torpor.drivers.base import BuildError
from torpor.model import Function, Revision
from torpor.sources import SourceCache, SourceError


class Builds(ControllerState):
    """Sources, builds and garbage collection (a part of ``Controller``)."""

    _cache: SourceCache | None
    _sweeping: asyncio.Task[None] | None

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
        self._sweeping = self._spawn(self._sweep(), name="ctl-archive-gc")

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
                for t in [*self.tracked.values(), *(p[0] for p in self.paused.values())]
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
                for t in [*self.tracked.values(), *(p[0] for p in self.paused.values())]
            }
            for rev_name in [r for r in self._sha_of if r not in live and r not in in_use_revs]:
                del self._sha_of[rev_name]
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "controller: garbage collection of source archives failed; retrying later"
            )

    async def _build(self, fn_name: str, rev: Revision) -> None:
        """Build one revision: one ``build`` event as it starts and one as it ends (see
        torpor.controller.buildlog); its log lines go over the bus as they come."""
        blog = BuildLog(rev.name)
        loop = asyncio.get_running_loop()

        def publish(kept: str) -> None:
            if not self._stopping:  # a build thread may outlive a stopped controller
                line = {"function": fn_name, "revision": rev.name, "line": kept}
                self._spawn(self._publish_quietly(BUILD_LOG, line))

        def progress(line: str) -> None:  # from the loop or a driver's build thread
            kept = blog.add(line)
            if not loop.is_closed():
                loop.call_soon_threadsafe(publish, kept)

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
