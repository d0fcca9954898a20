"""``GET /v1/functions/{name}/build-log``: a revision's build log, as text.

- ``?revision=REV`` (default: the newest revision with a recorded build);
- ``?follow=1``: while that revision is building, its lines as they come (from the
  store's bus, so also when the controller runs in another process), then the end.
  Without follow, or once the build is over, the log kept in the build's closing event
  (the last ``MAX_LINES`` lines; see torpor.controller.buildlog).

Build events keep their log out of event listings (``public_event``): it is read here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from torpor.api.common import ApiError, get_fn, query_flag
from torpor.controller.buildlog import BUILD_LOG
from torpor.model import Event
from torpor.store.base import Store

FOLLOW_FOR = 1800.0  # s: the longest a followed build log stays open
EVENTS_SEARCHED = 1000  # newest events of the function searched for a build's closing event
TEXT = "text/plain; charset=utf-8"


def public_event(e: Event) -> dict[str, Any]:
    """An event as listings show it: a build's log left out (``log_lines`` counts it)."""
    d = e.to_dict()
    data = d.get("data")
    if isinstance(data, dict) and "log" in data:
        d["data"] = {k: v for k, v in data.items() if k != "log"}
        d["data"]["log_lines"] = len(data["log"]) if isinstance(data["log"], list) else 0
    return d


def _closing(events: list[Event], revision: str | None) -> Event | None:
    for e in reversed(events):  # newest last
        if (
            e.kind == "build"
            and isinstance(e.data.get("log"), list)
            and (revision is None or e.data.get("revision") == revision)
        ):
            return e
    return None


def _text(e: Event) -> str:
    dropped = int(e.data.get("log_dropped") or 0)
    head = [f"... ({dropped} earlier lines dropped)"] if dropped else []
    return "\n".join([*head, *map(str, e.data["log"]), e.message.splitlines()[0]]) + "\n"


def build_log_routes(store: Store) -> list[Route]:
    async def build_log(request: Request) -> Response:
        fn = await get_fn(store, request.path_params["name"])
        name = fn.name
        wanted = request.query_params.get("revision") or None
        if wanted is not None and fn.revision(wanted) is None:
            raise ApiError(404, "revision not found", f"{fn.name} has no revision {wanted[:80]!r}")
        follow = query_flag(request, "follow")
        rev = fn.revision(wanted) if wanted else None
        if follow and rev is None and fn.revisions:
            rev = fn.revisions[-1]
        if follow and rev is not None and rev.status == "building" and not rev.image:
            return StreamingResponse(_follow(store, name, rev.name), media_type=TEXT)
        found = _closing(
            await store.list_events(name, EVENTS_SEARCHED), rev.name if rev else wanted
        )
        if found is None:
            which = f"revision {wanted}" if wanted else name
            raise ApiError(
                404,
                "no build log",
                f"no build of {which} is on record (image functions are not "
                "built; old build logs go with their events)",
            )
        return Response(_text(found), media_type=TEXT)

    return [Route("/v1/functions/{name}/build-log", build_log, methods=["GET"])]


async def _follow(store: Store, name: str, revision: str) -> AsyncIterator[bytes]:
    deadline = time.monotonic() + FOLLOW_FOR
    sub: Any = store.subscribe(BUILD_LOG)
    async with sub:
        yield f"following the build of {revision}\n".encode()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                yield b"... stopped following after 30 minutes\n"
                return
            try:
                async with asyncio.timeout(min(left, 5.0)):  # not wait_for (lost cancels)
                    msg = await sub.__anext__()
            except TimeoutError:
                fn = await store.get_function(name)
                rev = fn.revision(revision) if fn else None
                if rev is None or rev.status != "building" or rev.image:
                    return  # over (its end was published before we listened)
                continue
            except StopAsyncIteration:
                return
            if (
                not isinstance(msg, dict)
                or msg.get("revision") != revision
                or msg.get("function") != name
            ):
                continue
            if msg.get("done"):
                return
            yield (str(msg.get("line", ""))[:1000] + "\n").encode()
