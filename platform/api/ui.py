"""The dashboard at ``/ui``: a static page served by the API, signed in by a one-time code.

Signing in (``torpor ui``): the CLI, holding the API token, asks ``POST /v1/ui/code``
for a one-time code (``CODE_TTL`` seconds, one use) and opens
``/ui/login?code=CODE``. That answers with a session cookie (``HttpOnly;
SameSite=Strict; Path=/v1``, ``SESSION_TTL``) and a redirect to ``/ui``; the URL never
holds the long-lived token, and a used or stale code signs nobody in.

``UiGate`` is ASGI middleware between the browser guard and the bearer-token check:

- ``/ui``, ``/ui/static/NAME`` (the page, no state in it) and ``/ui/login`` are answered
  here, after the guard's Host check, with a strict Content-Security-Policy;
- a request with the session cookie and no ``Authorization`` header is let on with the
  API token, so every action of the page goes through the same routes, the same guard
  (Host, Origin, Content-Type) and the same checks as the CLI's. The page's own
  Origin passes the guard as same-origin (see torpor.api.guard); a cookie never
  mints a code.

``GET /v1/ui/stream`` is the page's live feed (server-sent events): once a second, the
functions (URL, revisions, traffic, replicas by state, rollout; the first
``MAX_FUNCTIONS_SHOWN`` by name), the last second's
in-flight, requests per second and p95 per function (from the gateways' reports on the
store's bus, so every gateway counts) and the recent events. At most ``MAX_STREAMS`` at
once, each closed after ``STREAM_FOR`` seconds (the browser reconnects).

Sessions live in the API process's memory: a restart signs the page out.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from torpor.api.buildlog import public_event
from torpor.api.common import ApiError
from torpor.api.jsonsafe import finite
from torpor.controller.rollout import quantile
from torpor.store.base import STATS, Store

CODE_TTL = 60.0  # s a sign-in code is good for
SESSION_TTL = 12 * 3600.0  # s a dashboard session lasts
MAX_CODES = 32  # outstanding codes; the oldest goes first
MAX_SESSIONS = 64  # live sessions; the oldest goes first
MAX_STREAMS = 16  # live feeds at once
STREAM_FOR = 3600.0  # s one feed stays open
TICK = 1.0  # s between two frames of the feed
EVENTS_SHOWN = 15
MAX_FUNCTIONS_SHOWN = 100  # functions in one frame (by name); the rest are counted
COOKIE = "torpor_ui"
STATIC_DIR = Path(__file__).resolve().parent / "static"  # package data of torpor.api
STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "index.html": "text/html; charset=utf-8",
}
_CODE_RE = re.compile(r"^[A-Za-z0-9_-]{20,100}$")
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class UiSessions:
    """One-time sign-in codes and the sessions they open (in memory, bounded)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self.clock = clock
        self.codes: dict[str, float] = {}  # sha256(code) -> expiry
        self.sessions: dict[str, float] = {}  # sha256(session) -> expiry

    @staticmethod
    def _prune(table: dict[str, float], now: float, cap: int) -> None:
        for k in [k for k, exp in table.items() if exp <= now]:
            del table[k]
        while len(table) >= cap:
            del table[min(table, key=lambda k: table[k])]

    def issue_code(self) -> str:
        now = self.clock()
        self._prune(self.codes, now, MAX_CODES)
        code = secrets.token_urlsafe(32)
        self.codes[_digest(code)] = now + CODE_TTL
        return code

    def redeem(self, code: str) -> str | None:
        """A new session for a good code (which is used up), else None."""
        if not _CODE_RE.match(code or ""):
            return None
        now = self.clock()
        exp = self.codes.pop(_digest(code), None)
        if exp is None or exp <= now:
            return None
        self._prune(self.sessions, now, MAX_SESSIONS)
        session = secrets.token_urlsafe(32)
        self.sessions[_digest(session)] = now + SESSION_TTL
        return session

    def valid(self, session: str) -> bool:
        if not session or len(session) > 100:
            return False
        key = _digest(session)
        exp = self.sessions.get(key)
        if exp is None:
            return False
        if exp <= self.clock():
            del self.sessions[key]
            return False
        return True


def _cookie(headers: list[tuple[bytes, bytes]]) -> str:
    for k, v in headers:
        if k == b"cookie":
            for part in v.decode("latin-1").split(";"):
                name, _, value = part.strip().partition("=")
                if name == COOKIE:
                    return value
    return ""


def static_file(name: str) -> bytes | None:
    if name not in STATIC:
        return None
    try:
        return (STATIC_DIR / name).read_bytes()
    except OSError:
        return None


async def _send(
    send: Any, status: int, body: bytes, ctype: str, extra: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", ctype.encode()),
                (b"content-length", str(len(body)).encode()),
                *SECURITY_HEADERS,
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _page(title: str, text: str) -> bytes:
    return (
        f"<!doctype html><meta charset=utf-8><title>{title}</title>"
        f"<body style='font-family:sans-serif'><h1>{title}</h1><p>{text}</p>"
    ).encode()


class UiGate:
    """ASGI middleware: the dashboard's own paths, and its cookie turned into the token."""

    def __init__(self, app: Any, token: str, sessions: UiSessions) -> None:
        self.app = app
        self.auth = f"Bearer {token}".encode()
        self.sessions = sessions

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == "/ui" or path.startswith("/ui/"):
            await self._ui(scope, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if not any(k == b"authorization" for k, _ in headers) and path.startswith("/v1/"):
            session = _cookie(headers)
            if session and self.sessions.valid(session):
                scope = {
                    **scope,
                    "headers": [*headers, (b"authorization", self.auth)],
                    "torpor.ui_session": True,
                }
        await self.app(scope, receive, send)

    async def _ui(self, scope: dict[str, Any], send: Any) -> None:
        path: str = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            await _send(
                send,
                405,
                b'{"error": "method not allowed", "detail": "the dashboard is read with GET"}',
                "application/json",
                [(b"allow", b"GET, HEAD")],
            )
            return
        if path in ("/ui", "/ui/"):
            await _send(send, 200, static_file("index.html") or b"", STATIC["index.html"])
            return
        if path.startswith("/ui/static/"):
            name = path[len("/ui/static/") :]
            body = static_file(name) if name != "index.html" else None
            if body is None:
                await _send(send, 404, _page("Not found", "no such file"), STATIC["index.html"])
                return
            await _send(send, 200, body, STATIC[name])
            return
        if path == "/ui/login":
            query = scope.get("query_string", b"").decode("latin-1")
            code = next(
                (v for k, _, v in (p.partition("=") for p in query.split("&")) if k == "code"), ""
            )
            session = self.sessions.redeem(code)
            if session is None:
                await _send(
                    send,
                    401,
                    _page(
                        "Sign-in link expired",
                        "This link was used already or is older "
                        f"than {CODE_TTL:.0f} seconds. Run <code>torpor ui</code> again.",
                    ),
                    STATIC["index.html"],
                )
                return
            cookie = f"{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/v1; Max-Age={int(SESSION_TTL)}"
            await _send(
                send,
                303,
                b"",
                "text/plain",
                [(b"location", b"/ui"), (b"set-cookie", cookie.encode())],
            )
            return
        await _send(send, 404, _page("Not found", "no such page"), STATIC["index.html"])


class _Stats:
    """The gateways' reports of the last tick, summed per function."""

    def __init__(self) -> None:
        self.reports: dict[str, dict[str, Any]] = {}  # gateway -> its last report's revisions
        self.requests: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.latency: dict[str, list[int]] = {}

    def add(self, msg: Any) -> None:
        try:
            self._add(msg)
        except (TypeError, ValueError, AttributeError):  # a malformed report is skipped, not fatal
            return

    def _add(self, msg: Any) -> None:
        if not isinstance(msg, dict) or not isinstance(msg.get("revisions"), dict):
            return
        self.reports[str(msg.get("gateway", ""))[:100]] = msg["revisions"]
        for rep in msg["revisions"].values():
            if not isinstance(rep, dict):
                continue
            fn = str(rep.get("function", ""))
            self.requests[fn] = self.requests.get(fn, 0) + int(rep.get("requests", 0) or 0)
            self.errors[fn] = self.errors.get(fn, 0) + int(rep.get("errors", 0) or 0)
            lat = rep.get("latency") or []
            acc = self.latency.setdefault(fn, [0] * len(lat))
            for i, n in enumerate(lat[: len(acc)]):
                acc[i] += int(n or 0)

    def frame(self, seconds: float) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for revs in self.reports.values():
            for rep in revs.values():
                if isinstance(rep, dict):
                    fn = str(rep.get("function", ""))
                    row = out.setdefault(fn, {"in_flight": 0.0, "queued": 0})
                    row["in_flight"] += float(rep.get("concurrency", 0) or 0)
                    row["queued"] += int(rep.get("queued", 0) or 0)
        for fn in set(out) | set(self.requests):
            row = out.setdefault(fn, {"in_flight": 0.0, "queued": 0})
            row["in_flight"] = round(row["in_flight"], 2)
            row["rps"] = round(self.requests.get(fn, 0) / max(seconds, 0.001), 2)
            row["errors"] = self.errors.get(fn, 0)
            p95 = quantile(0.95, self.latency.get(fn, []))
            row["p95_ms"] = round(p95 * 1000, 1) if p95 is not None else None
        self.reports.clear()
        self.requests.clear()
        self.errors.clear()
        self.latency.clear()
        return out


async def dashboard_state(
    store: Store, cfg: Any, stats: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    from torpor.api.app import function_url

    every = sorted(await store.list_functions(), key=lambda f: f.name)
    fns = every[:MAX_FUNCTIONS_SHOWN]  # a frame a second per feed: its cost is bounded
    replicas = await store.list_replicas()
    events: list[dict[str, Any]] = []
    out = []
    for fn in fns:
        mine = [r for r in replicas if r.function == fn.name]
        by_state: dict[str, int] = {}
        for r in mine:
            by_state[r.state] = by_state.get(r.state, 0) + 1
        out.append(
            {
                "name": fn.name,
                "url": function_url(cfg, fn.name),
                "revisions": [
                    {
                        "name": r.name,
                        "status": r.status,
                        "traffic": sum(t.percent for t in fn.traffic if t.revision == r.name),
                        "replicas": sum(
                            1 for x in mine if x.revision == r.name and x.state == "ready"
                        ),
                    }
                    for r in fn.revisions[-5:]
                ],
                "traffic": [asdict(t) for t in fn.traffic],
                "replicas": by_state,
                "rollout": asdict(fn.rollout) if fn.rollout else None,
                "stats": stats.get(
                    fn.name, {"in_flight": 0, "rps": 0, "p95_ms": None, "errors": 0, "queued": 0}
                ),
            }
        )
        for e in await store.list_events(fn.name, EVENTS_SHOWN):
            d = public_event(e)
            d.pop("data", None)
            d["message"] = (
                str(d.get("message", "")).splitlines()[0][:300] if d.get("message") else ""
            )
            events.append(d)
    events.sort(key=lambda e: e["time"])
    return {
        "time": time.time(),
        "functions": out,
        "events": events[-EVENTS_SHOWN:],
        "functions_not_shown": len(every) - len(fns),
    }


def ui_routes(store: Store, cfg: Any, sessions: UiSessions) -> list[Route]:
    live = {"streams": 0}

    async def code(request: Request) -> Response:
        if request.scope.get("torpor.ui_session"):
            raise ApiError(
                403, "forbidden", "a dashboard session cannot mint sign-in codes; use the API token"
            )
        c = sessions.issue_code()
        return Response(
            json.dumps({"code": c, "path": f"/ui/login?code={c}", "expires_in": CODE_TTL}),
            media_type="application/json",
            headers={"cache-control": "no-store"},
        )

    async def stream(request: Request) -> Response:
        return StreamingResponse(
            _feed(),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def _feed() -> AsyncIterator[bytes]:
        if live["streams"] >= MAX_STREAMS:  # counted here: a feed never started holds no place
            yield f"event: full\ndata: at most {MAX_STREAMS} dashboard feeds at once\n\n".encode()
            return
        live["streams"] += 1
        try:
            stats = _Stats()
            sub: Any = store.subscribe(STATS)
            async with sub:
                yield b"retry: 2000\n\n"
                end = time.monotonic() + STREAM_FOR
                last = time.monotonic()
                while time.monotonic() < end:
                    state = await dashboard_state(store, cfg, stats.frame(time.monotonic() - last))
                    last = time.monotonic()
                    yield (
                        b"event: state\ndata: "
                        + json.dumps(finite(state), default=str).encode()
                        + b"\n\n"
                    )
                    tick_end = last + TICK
                    while (left := tick_end - time.monotonic()) > 0:
                        try:
                            async with asyncio.timeout(left):  # not wait_for (lost cancels)
                                msg = await sub.__anext__()
                            stats.add(msg)
                        except TimeoutError:
                            break
                        except StopAsyncIteration:
                            return
        finally:
            live["streams"] -= 1

    return [
        Route("/v1/ui/code", code, methods=["POST"]),
        Route("/v1/ui/stream", stream, methods=["GET"]),
    ]
