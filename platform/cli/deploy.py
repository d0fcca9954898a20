"""``torpor deploy`` after the upload: follow the new revision to ready, one line per
phase (upload, build, start, ready), or show why it failed.

    uploaded hello (1.2 KiB): revision hello-00003
    hello-00003: built in 4.1s, image 151.2 MB, not cached
    hello-00003: ready in 5.0s; traffic: hello-00003=100%
    http://hello.torpor.localhost:8080/          <- stdout (alone with --quiet)

``-v`` adds the whole build log as it comes. A failed build shows its last log lines
without ``-v``. Exit 1 when the revision fails or is not ready in ``--wait`` seconds.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from torpor.archive import human_size
from torpor.cli.output import EXIT_FAILED, EXIT_OK
from torpor.cli.progress import Phases
from torpor.model import format_traffic

POLL = 0.2  # s between looks at the revision


def _traffic(fn: dict[str, Any]) -> str:
    return format_traffic(fn["traffic"])


class LogStream:
    """The build log of ``rev`` printed as it comes, from a thread (``-v``)."""

    def __init__(self, api: Any, name: str, rev: str, phases: Phases) -> None:
        self.api, self.name, self.rev, self.phases = api, name, rev, phases
        self.count = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="build-log", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with self.api.client.stream(
                "GET",
                f"/v1/functions/{self.name}/build-log",
                params={"revision": self.rev, "follow": "1"},
                timeout=None,
            ) as r:
                if r.status_code >= 400:
                    return
                for line in r.iter_lines():
                    if self.stop.is_set():
                        return
                    if line and not line.startswith("following the build of"):
                        self.count += 1
                        self.phases.raw(line)
        except httpx.HTTPError:
            return

    def catch_up(self, total: int) -> None:
        """After the build: lines logged before the stream was connected, from the record."""
        self.thread.join(timeout=2.0)
        self.stop.set()
        missed = total - self.count
        if missed <= 0:
            return
        try:
            text = self.api.call(
                "GET", f"/v1/functions/{self.name}/build-log", params={"revision": self.rev}
            )
        except Exception:
            return
        lines = [x for x in str(text).splitlines() if not x.startswith("... (")][:total]
        self.phases.raw(f"(the first {missed} lines, logged before -v connected:)")
        for line in lines[:missed]:
            self.phases.raw(line)


def follow(
    api: Any,
    name: str,
    rev: str,
    upload_size: int,
    *,
    wait: float,
    verbose: bool = False,
    quiet: bool = False,
    phases: Phases | None = None,
) -> tuple[int, dict[str, Any] | None]:
    """Follow ``rev`` until ready or failed: (exit code, the function's view when ready)."""
    phases = phases or Phases(quiet=quiet)
    phases.done(f"uploaded {name} ({human_size(upload_size)}): revision {rev}")
    streamer = LogStream(api, name, rev, phases) if verbose and not quiet else None
    phase = "build"
    seen_events: set[tuple[float, str]] = set()
    deadline = time.monotonic() + wait
    try:
        phases.wait(f"{rev}: building")
        while time.monotonic() < deadline:
            for e in api.call("GET", f"/v1/functions/{name}/events", params={"limit": 50})[
                "events"
            ]:
                data = e.get("data") or {}
                key = (e["time"], e["message"])
                if data.get("revision") != rev or e["kind"] != "build" or key in seen_events:
                    continue
                seen_events.add(key)
                if "log_lines" in data:  # the closing event of the build: finished or failed
                    if streamer is not None:
                        streamer.catch_up(int(data["log_lines"]))
                    lines = e["message"].splitlines()
                    phases.done(lines[0])
                    for extra in lines[1:]:
                        phases.done(f"  {extra}")
            r = api.call("GET", f"/v1/functions/{name}/revisions/{rev}")
            if r["status"] == "failed":
                phases.close()
                reason = (r.get("reason") or "unknown reason").splitlines()
                if (
                    phases.quiet
                    or not any("build failed" in m for _, m in seen_events)
                    or not reason[0].startswith("build failed")
                ):
                    phases.fail(f"{rev} failed: {reason[0]}")
                    for extra in reason[1:9]:
                        phases.done(f"  {extra}")
                return EXIT_FAILED, None
            if r["status"] == "ready":
                if phase == "build":  # ready before a poll saw it start
                    phases.done(f"{rev}: started its first replica")
                phases.close()
                fn = api.call("GET", f"/v1/functions/{name}")
                phases.done(f"{rev}: ready in {phases.elapsed():.1f}s; traffic: {_traffic(fn)}")
                return EXIT_OK, fn
            if (
                phase == "build"
                and r.get("image") is not None
                and r.get("image") != ""
                or phase == "build"
                and "starting" in (r.get("reason") or "")
            ):
                phase = "start"
                phases.done(f"{rev}: starting its first replica")
                phases.wait(f"{rev}: waiting for its first replica to answer")
            time.sleep(POLL)
        phases.close()
        phases.fail(f"{rev}: not ready after {wait:g}s (see `torpor describe {name}`)")
        return EXIT_FAILED, None
    finally:
        if streamer is not None:
            streamer.stop.set()
        phases.close()
