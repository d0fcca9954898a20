"""The control API (JSON under /v1). Reads and writes desired state in the store; it
never calls a driver. Errors are ``{"error": ..., "detail": ...}`` with a 4xx/5xx status.

Every request first passes :class:`~torpor.api.guard.BrowserGuard` (Host, Origin and
Content-Type checks, with the body types declared in ``REQUEST_BODIES`` below), then
:class:`~torpor.api.auth.BearerAuth` (a bearer token on everything but /healthz and
/readyz). There is no way to build the app without a token.

Handlers are module-level functions listed in ``ROUTES`` (with those of
``torpor.api.rollouts`` and ``torpor.api.secrets``); they find the store and the
:class:`ApiConfig` in ``request.app.state`` (``store_of``, ``config_of``). ``create_app``
only builds that state, the middleware and the route list.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from torpor.api import hosts
from torpor.api.archives import archive_routes
from torpor.api.auth import BearerAuth
from torpor.api.buildlog import build_log_routes, public_event
from torpor.api.calls import call_routes
from torpor.api.common import (
    ApiError,
    error_response,
    get_fn,
    json_body,
    query_flag,
    query_int,
    query_time,
    store_of,
)
from torpor.api.guard import BodyRules, BrowserGuard, HostPolicy
from torpor.api.jsonsafe import SafeJSONResponse as JSONResponse  # a stored NaN renders, as null
from torpor.api.jsonsafe import non_finite
from torpor.api.openapi import JSON_TYPES, OPENAPI, SECRET_TYPES, TARBALL_TYPES
from torpor.api.rollouts import ROLLOUT_ROUTES
from torpor.api.secrets import SECRET_ROUTES
from torpor.api.status import status
from torpor.api.ui import UiGate, UiSessions, ui_routes
from torpor.archive import ArchiveError, ArchiveLimits, extract, human_size
from torpor.drivers.pip import RequirementsError, read_requirements
from torpor.lease import Lease
from torpor.logs import LogReader, LogsUnavailable
from torpor.model import (
    Event,
    Function,
    OnReady,
    Revision,
    ScaleOverride,
    Spec,
    TrafficTarget,
    format_traffic,
)
from torpor.sources import pack
from torpor.spec import (
    MAX_CONCURRENCY,
    MAX_SCALE,
    MAX_TARGET,
    SpecError,
    describe,
    load_spec,
    validate_tag,
)
from torpor.store.base import Store

SPOOL_BATCH = 1024 * 1024  # bytes of request body gathered before a write to the spool file
MAX_EVENTS_LIMIT = 1000  # ?limit= of /events and ?events= of a function
MAX_LOG_TAIL = 100_000  # ?tail= of /logs

# The request body types each state-changing route accepts (the guard answers 415 to any
# other, and to a body without a Content-Type; a request with no body needs none). ``()``:
# no body. Never text/plain, forms or multipart: a web page can send those without a
# CORS preflight. /v1/openapi.json documents the same types (tests check they agree).
REQUEST_BODIES: dict[tuple[str, str], tuple[str, ...]] = {
    ("POST", "/v1/functions"): TARBALL_TYPES,
    ("DELETE", "/v1/functions/{name}"): (),
    ("PUT", "/v1/functions/{name}/traffic"): JSON_TYPES,
    ("PATCH", "/v1/functions/{name}/scale"): JSON_TYPES,
    ("POST", "/v1/functions/{name}/rollout"): JSON_TYPES,
    ("POST", "/v1/functions/{name}/rollout/{action}"): JSON_TYPES,  # body optional
    ("POST", "/v1/functions/{name}/rollback"): JSON_TYPES,  # body optional
    ("PUT", "/v1/secrets/{name}"): SECRET_TYPES,  # the raw value
    ("DELETE", "/v1/secrets/{name}"): (),
    ("POST", "/v1/ui/code"): JSON_TYPES,  # body optional
}


@dataclass
class ApiConfig:
    state_dir: Path
    token: str  # bearer token every route but /healthz and /readyz requires
    gateway_url: str = "http://127.0.0.1:8080"
    domain: str = "torpor.localhost"
    max_replicas: int = 100
    bind_host: str = "127.0.0.1"  # decides the Host names answered to (torpor.api.guard.HostPolicy)
    allowed_hosts: tuple[str, ...] = ()  # more Host names (--api-allowed-hosts)
    allowed_origins: tuple[str, ...] = ()  # Origins a browser may call from (--api-allowed-origins)
    ready: Callable[[], bool] = lambda: True
    logs: LogReader | None = None
    lease: Lease | None = None  # the controller lease (GET /v1/status names its holder)
    store_kind: str = "embedded"
    limits: ArchiveLimits = field(default_factory=ArchiveLimits)  # caps on a deploy's upload


def config_of(request: Request) -> ApiConfig:
    """The configuration the app was built with."""
    cfg: ApiConfig = request.app.state.cfg
    return cfg


def function_url(cfg: ApiConfig, name: str) -> str:
    scheme, _, hostport = cfg.gateway_url.partition("://")
    port = hostport.rsplit(":", 1)[1] if ":" in hostport else ""
    return f"{scheme}://{name}.{cfg.domain}" + (f":{port}" if port else "") + "/"


def revision_view(fn: Function, rev: Revision) -> dict[str, Any]:
    traffic = [t for t in fn.traffic if t.revision == rev.name]
    return {
        "name": rev.name,
        "number": rev.number,
        "status": rev.status,
        "reason": rev.reason,
        "created": rev.created,
        "image": rev.image,
        "source_sha256": rev.source_sha256,
        "traffic": sum(t.percent for t in traffic),
        "tags": [t.tag for t in traffic if t.tag],
        "spec": rev.spec.to_dict(),
    }


def function_view(
    cfg: ApiConfig, fn: Function, replicas: list[Any], events: list[Event] | None = None
) -> dict[str, Any]:
    latest = fn.latest()
    scale = fn.effective_scale(latest) if latest else None
    out: dict[str, Any] = {
        "name": fn.name,
        "url": function_url(cfg, fn.name),
        "path_url": f"{cfg.gateway_url}/function/{fn.name}/",
        "created": fn.created,
        "revisions": [revision_view(fn, r) for r in fn.revisions],
        "traffic": [asdict(t) for t in fn.traffic],
        "replicas": [
            {
                "name": r.name,
                "revision": r.revision,
                "state": r.state,
                "endpoint": r.endpoint,
                "started": r.started,
            }
            for r in replicas
        ],
        "scale": asdict(scale) if scale else None,
        "scale_override": asdict(fn.scale),
        "rollout": asdict(fn.rollout) if fn.rollout else None,
    }
    if events is not None:
        out["events"] = [public_event(e) for e in events]
    problems = non_finite({k: out[k] for k in ("scale", "scale_override", "revisions", "rollout")})
    if problems:  # stored before numbers were checked: shown as null, named here
        out["problems"] = [
            f"{p} is not a finite number (stored before numbers were checked; shown as null)"
            for p in problems
        ]
    return out


async def _spool(request: Request, out: IO[bytes], cap: int) -> int:
    """Copy the request body to ``out``; 413 as soon as it passes ``cap`` bytes (the rest
    is never read). Holds at most ``SPOOL_BATCH`` bytes of it in memory."""
    size = 0
    pending = bytearray()
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise ApiError(
                413,
                "upload too large",
                f"the upload is over the {human_size(cap)} cap on compressed size",
            )
        pending += chunk
        if len(pending) >= SPOOL_BATCH:
            await asyncio.to_thread(out.write, pending)
            pending = bytearray()
    if pending:
        await asyncio.to_thread(out.write, pending)
    await asyncio.to_thread(out.flush)
    return size


def _unpack(body: IO[bytes], dest: Path, limits: ArchiveLimits, max_replicas: int) -> Spec:
    """Extract the spooled upload into ``dest`` and check it: the spec, and for source
    functions requirements.txt. Blocking: runs in a worker thread."""
    body.seek(0)
    try:
        extract(body, dest, limits)
    except ArchiveError as e:
        raise ApiError(
            e.status, "upload too large" if e.status == 413 else "bad upload", e.reason
        ) from None
    try:
        spec = load_spec(dest, source="torpor.yaml", max_replicas=max_replicas)
    except SpecError as e:
        raise ApiError(400, "invalid spec", str(e), field=e.path) from e
    if not spec.image:
        try:
            read_requirements(dest)
        except RequirementsError as e:
            raise ApiError(400, "invalid requirements", str(e), field=e.field) from None
    return spec


async def check_secrets(store: Store, spec: Spec) -> None:
    """400 naming each secret the spec maps that does not exist (``field``: the first)."""
    if not spec.secrets:
        return
    known = {s.name for s in await store.list_secrets()}
    missing = [
        (env, spec.secrets[env]) for env in sorted(spec.secrets) if spec.secrets[env] not in known
    ]
    if missing:
        detail = "; ".join(f"secrets.{env}: no secret named {name!r}" for env, name in missing)
        hint = (
            f"`torpor secret set {missing[0][1]}`"
            if len(missing) == 1
            else "`torpor secret set NAME`"
        )
        raise ApiError(
            400,
            "unknown secret",
            f"{detail}; set it first with {hint}",
            field=f"secrets.{missing[0][0]}",
        )


# -- health ------------------------------------------------------------------------
async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    cfg = config_of(request)
    if cfg.ready():
        return JSONResponse({"status": "ready"})
    return error_response(503, "not ready", "the controller has not synced yet")


async def get_status(request: Request) -> Response:
    store = store_of(request)
    cfg = config_of(request)
    return JSONResponse(await status(store, cfg.lease, cfg.store_kind))


async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    return JSONResponse(OPENAPI)


# -- functions -----------------------------------------------------------------------
async def list_functions(request: Request) -> Response:
    store = store_of(request)
    cfg = config_of(request)
    fns = await store.list_functions()
    replicas = await store.list_replicas()
    out = []
    for fn in sorted(fns, key=lambda f: f.name):
        mine = [r for r in replicas if r.function == fn.name]
        latest = fn.latest()
        out.append(
            {
                "name": fn.name,
                "url": function_url(cfg, fn.name),
                "latest": latest.name if latest else None,
                "status": latest.status if latest else None,
                "traffic": [asdict(t) for t in fn.traffic],
                "replicas": sum(1 for r in mine if r.state == "ready"),
            }
        )
    return JSONResponse({"functions": out})


async def get_function(request: Request) -> Response:
    store = store_of(request)
    cfg = config_of(request)
    name = request.path_params["name"]
    fn = await get_fn(store, name)
    replicas = await store.list_replicas(name)
    events = await store.list_events(name, limit=query_int(request, "events", 20, MAX_EVENTS_LIMIT))
    return JSONResponse(function_view(cfg, fn, replicas, events))


async def delete_function(request: Request) -> Response:
    store = store_of(request)
    name = request.path_params["name"]
    await get_fn(store, name)
    await store.delete_function(name)
    return JSONResponse({"deleted": name})


async def deploy(request: Request) -> Response:
    store = store_of(request)
    cfg = config_of(request)
    q = request.query_params
    canary = q.get("canary")
    tag = q.get("tag") or None
    no_traffic = query_flag(request, "no_traffic")
    if tag is not None:
        try:
            validate_tag(tag, "tag")
        except SpecError as e:
            raise ApiError(400, "invalid tag", str(e), field="tag") from e
    on_ready = OnReady()
    if canary is not None:
        if (
            not (canary.isascii() and canary.isdigit())
            or len(canary) > 2
            or not 1 <= int(canary) <= 99
        ):
            raise ApiError(
                400,
                "invalid canary",
                f"canary: expected a percent 1..99, got {canary[:10]!r}",
                field="canary",
            )
        on_ready = OnReady.canary(int(canary))
    if no_traffic:
        if canary is not None:
            raise ApiError(
                400, "conflicting options", "--canary and --no-traffic exclude each other"
            )
        on_ready = OnReady("none")
    limits = cfg.limits
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_upload:
        raise ApiError(
            413,
            "upload too large",
            f"the upload is {human_size(int(declared))}, over the "
            f"{human_size(limits.max_upload)} cap on compressed size",
        )
    uploads = cfg.state_dir / "uploads"  # spooled uploads and their check, removed once packed
    uploads.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The body goes to an unnamed file (O_TMPFILE) and is unpacked from there in a
    # worker thread into a private directory. Once it passed every check, the folder is
    # packed into a normalised archive that goes into the store under its sha256: the
    # revision names that hash, never a path, so no other component needs this disk.
    sha: str | None = None
    with tempfile.TemporaryFile(prefix=".upload-", dir=uploads) as body:
        await _spool(request, body, limits.max_upload)
        tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=uploads))
        try:
            spec = await asyncio.to_thread(_unpack, body, tmp, limits, cfg.max_replicas)
            await check_secrets(store, spec)
            name = spec.name
            clash = hosts.deploy_clash(await store.list_functions(), name, tag, cfg.domain)
            if clash is not None:
                raise ApiError(400, "host clash", clash.message, field=clash.field)
            if not spec.image:  # an image function runs its image: no source to ship
                packed = await asyncio.to_thread(pack, tmp)
                await store.put_blob(packed.sha256, packed.data)
                sha = packed.sha256
        finally:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
    fn = await store.update_function(
        name, lambda cur: _add_revision(cur, name, spec, sha, on_ready, tag)
    )
    assert fn is not None
    rev = fn.revisions[-1]
    await store.add_event(
        Event(
            function=name,
            kind="deploy",
            message=f"{rev.name} created ({on_ready}{', tag ' + tag if tag else ''})",
        )
    )
    return JSONResponse(
        {
            "function": name,
            "revision": rev.name,
            "status": rev.status,
            "url": function_url(cfg, name),
            "path_url": f"{cfg.gateway_url}/function/{name}/",
        },
        status_code=201,
    )


async def list_revisions(request: Request) -> Response:
    store = store_of(request)
    fn = await get_fn(store, request.path_params["name"])
    return JSONResponse({"revisions": [revision_view(fn, r) for r in fn.revisions]})


async def get_revision(request: Request) -> Response:
    store = store_of(request)
    fn = await get_fn(store, request.path_params["name"])
    rev = fn.revision(request.path_params["revision"])
    if rev is None:
        raise ApiError(
            404,
            "revision not found",
            f"{fn.name} has no revision {request.path_params['revision'][:80]!r}",
        )
    return JSONResponse(revision_view(fn, rev))


async def list_events(request: Request) -> Response:
    store = store_of(request)
    name = request.path_params["name"]
    await get_fn(store, name)
    limit = query_int(request, "limit", 50, MAX_EVENTS_LIMIT)
    since = query_time(request, "since")
    events = [e for e in await store.list_events(name, limit) if e.time > since]
    return JSONResponse({"events": [public_event(e) for e in events]})


async def logs(request: Request) -> Response:
    store = store_of(request)
    cfg = config_of(request)
    name = request.path_params["name"]
    await get_fn(store, name)
    if cfg.logs is None:
        raise ApiError(501, "logs unavailable", "this API process has no access to replica logs")
    follow = query_flag(request, "follow")
    tail = query_int(request, "tail", 200, MAX_LOG_TAIL)
    try:
        source = await cfg.logs(name, follow, tail)
    except LogsUnavailable as e:
        raise ApiError(503, "logs unavailable", str(e)) from None

    async def lines() -> AsyncIterator[bytes]:
        async for line in source:
            yield (line + "\n").encode()

    return StreamingResponse(lines(), media_type="text/plain; charset=utf-8")


async def set_traffic(request: Request) -> Response:
    store = store_of(request)
    cfg = config_of(request)
    name = request.path_params["name"]
    fn = await get_fn(store, name)
    body = await json_body(request)
    targets = parse_traffic(fn, body.get("traffic"))
    clash = hosts.traffic_clash(await store.list_functions(), fn, targets, cfg.domain)
    if clash is not None:
        raise ApiError(400, "host clash", clash.message, field=clash.field)

    def mutate(cur: Function | None) -> Function | None:
        if cur is None:
            return None
        cur.traffic = targets
        if cur.rollout and cur.rollout.state in ("running", "paused"):
            cur.rollout.state, cur.rollout.reason = "aborted", "traffic set by hand"
        return cur

    fn2 = await store.update_function(name, mutate)
    if fn2 is None:
        raise ApiError(404, "function not found", f"no function named {name!r}")
    await store.add_event(
        Event(
            function=name,
            kind="traffic",
            message="traffic set by hand: " + format_traffic(targets),
        )
    )
    return JSONResponse({"traffic": [asdict(t) for t in fn2.traffic]})


async def set_scale(request: Request) -> Response:
    store = store_of(request)
    cfg = config_of(request)
    name = request.path_params["name"]
    fn = await get_fn(store, name)
    body = await json_body(request)
    new = parse_scale_patch(fn, body, cfg.max_replicas)
    old = fn.scale

    def mutate(cur: Function | None) -> Function | None:
        if cur is None:
            return None
        cur.scale = new
        return cur

    fn2 = await store.update_function(name, mutate)
    if fn2 is None:
        raise ApiError(404, "function not found", f"no function named {name!r}")
    who = request.client.host if request.client else "unknown"
    await store.add_event(
        Event(
            function=name,
            kind="scale",
            message=(f"scale set by hand from {who}: {_fmt_override(old)} -> {_fmt_override(new)}"),
            data={"who": who, "old": asdict(old), "new": asdict(new), "time": time.time()},
        )
    )
    latest = fn2.latest()
    return JSONResponse(
        {
            "name": name,
            "scale_override": asdict(fn2.scale),
            "scale": asdict(fn2.effective_scale(latest)) if latest else None,
        }
    )


ROUTES = [
    Route("/healthz", healthz),
    Route("/readyz", readyz),
    Route("/metrics", metrics),
    Route("/v1/openapi.json", openapi),
    Route("/v1/status", get_status, methods=["GET"]),
    Route("/v1/functions", list_functions, methods=["GET"]),
    Route("/v1/functions", deploy, methods=["POST"]),
    Route("/v1/functions/{name}", get_function, methods=["GET"]),
    Route("/v1/functions/{name}", delete_function, methods=["DELETE"]),
    Route("/v1/functions/{name}/revisions", list_revisions, methods=["GET"]),
    Route("/v1/functions/{name}/revisions/{revision}", get_revision, methods=["GET"]),
    Route("/v1/functions/{name}/events", list_events, methods=["GET"]),
    Route("/v1/functions/{name}/logs", logs, methods=["GET"]),
    Route("/v1/functions/{name}/traffic", set_traffic, methods=["PUT"]),
    Route("/v1/functions/{name}/scale", set_scale, methods=["PATCH"]),
    *ROLLOUT_ROUTES,
    *SECRET_ROUTES,
]


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.error, exc.detail, **exc.extra)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(
        exc.status_code,
        "not found" if exc.status_code == 404 else "http error",
        str(exc.detail),
    )


async def server_error(request: Request, exc: Exception) -> Response:
    return error_response(500, "internal error", type(exc).__name__)


class RequestCounter:
    """ASGI middleware: counts HTTP responses by method and status in ``counter``."""

    def __init__(self, app: Any, counter: Counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_counting(msg: Any) -> None:
            if msg["type"] == "http.response.start":
                self.counter.labels(scope["method"], str(msg["status"])).inc()
            await send(msg)

        await self.app(scope, receive, send_counting)


def create_app(store: Store, cfg: ApiConfig) -> Any:
    """The API as one ASGI app: guard -> dashboard session gate -> bearer auth -> request
    counter -> the routes. Handlers find ``store`` and ``cfg`` in ``app.state``."""
    if not cfg.token:
        raise ValueError("the control API needs a bearer token")
    ui_sessions = UiSessions()
    registry = CollectorRegistry()
    api_requests = Counter(
        "torpor_api_requests", "API requests", ["method", "status"], registry=registry
    )
    routes = [
        *ROUTES,
        *archive_routes(store),
        *call_routes(store),
        *build_log_routes(store),
        *ui_routes(store, cfg, ui_sessions),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            ApiError: api_error,
            HTTPException: http_error,
            Exception: server_error,
        },
    )
    app.state.store, app.state.cfg, app.state.registry = store, cfg, registry
    bodies = BodyRules(REQUEST_BODIES)
    bodies.check_covers(routes)
    return BrowserGuard(
        UiGate(BearerAuth(RequestCounter(app, api_requests), cfg.token), cfg.token, ui_sessions),
        hosts=HostPolicy(cfg.bind_host, cfg.allowed_hosts),
        bodies=bodies,
        allowed_origins=cfg.allowed_origins,
    )


def _add_revision(
    cur: Function | None,
    name: str,
    spec: Spec,
    sha: str | None,
    on_ready: OnReady,
    tag: str | None,
) -> Function:
    fn = cur or Function(name=name)
    number = fn.next_number
    fn.next_number += 1
    fn.revisions.append(
        Revision(
            name=f"{name}-{number:05d}",
            function=name,
            number=number,
            spec=spec,
            source_sha256=sha,
            on_ready=on_ready,
            tag=tag,
        )
    )
    return fn


def parse_traffic(fn: Function, raw: Any) -> list[TrafficTarget]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(
            400,
            "invalid traffic",
            "traffic: expected a non-empty list of {revision, percent, tag}",
            field="traffic",
        )
    out: list[TrafficTarget] = []
    tags: set[str] = set()
    for i, t in enumerate(raw):
        path = f"traffic[{i}]"
        if not isinstance(t, dict) or set(t) - {"revision", "percent", "tag"}:
            raise ApiError(
                400,
                "invalid traffic",
                f"{path}: expected an object with revision, percent, tag",
                field=path,
            )
        rev_name = t.get("revision")
        rev = fn.revision(rev_name) if isinstance(rev_name, str) else None
        if rev is None:
            raise ApiError(
                400,
                "invalid traffic",
                f"{path}.revision: {str(rev_name)[:80]!r} is not a revision of {fn.name}",
                field=f"{path}.revision",
            )
        if rev.status != "ready":
            raise ApiError(
                400,
                "invalid traffic",
                f"{path}.revision: {rev.name} is {rev.status}, not ready",
                field=f"{path}.revision",
            )
        pct = t.get("percent", 0)
        if not isinstance(pct, int) or isinstance(pct, bool) or not 0 <= pct <= 100:
            raise ApiError(
                400,
                "invalid traffic",
                f"{path}.percent: expected an integer 0..100",
                field=f"{path}.percent",
            )
        tag = t.get("tag")
        if tag is not None:
            try:
                validate_tag(tag, f"{path}.tag")
            except SpecError as e:
                raise ApiError(400, "invalid traffic", str(e), field=e.path) from e
            if tag in tags:
                raise ApiError(
                    400,
                    "invalid traffic",
                    f"{path}.tag: tag {tag!r} used twice",
                    field=f"{path}.tag",
                )
            tags.add(tag)
        out.append(TrafficTarget(rev.name, pct, tag))
    total = sum(t.percent for t in out)
    if total != 100:
        raise ApiError(
            400,
            "invalid traffic",
            f"traffic: percents must sum to 100, got {total}",
            field="traffic",
        )
    return out


def parse_scale_patch(fn: Function, body: dict[str, Any], cap: int) -> ScaleOverride:
    """The override a ``PATCH /scale`` body asks for; 400 naming the field otherwise.

    Bounds (those of torpor.yaml, see torpor.spec): min, max and replicas 0..cap (the
    platform's ``--max-replicas``, at most 1000), concurrency 0..10000, target a number
    > 0 and <= 10000. A value above the cap is refused, never capped.
    """
    allowed = {"min", "max", "replicas", "target", "concurrency"}
    unknown = set(body) - allowed
    if unknown:
        key = sorted(unknown)[0]
        raise ApiError(
            400,
            "invalid scale",
            f"{key[:40]}: unknown field; expected one of {', '.join(sorted(allowed))}",
            field=key,
        )
    cap = min(cap, MAX_SCALE)
    vals: dict[str, Any] = {}
    for key in ("min", "max", "replicas", "concurrency"):
        v = body.get(key)
        if v is None:
            continue
        high = MAX_CONCURRENCY if key == "concurrency" else cap
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ApiError(
                400,
                "invalid scale",
                f"{key}: expected an integer from 0 to {high}, got {describe(v)}",
                field=key,
            )
        if key != "concurrency" and v > cap:
            raise ApiError(
                400,
                "invalid scale",
                f"{key}: {describe(v)} is above the platform's cap of {cap} "
                "replicas (torpor up --max-replicas)",
                field=key,
            )
        if v > high:
            raise ApiError(
                400,
                "invalid scale",
                f"{key}: expected an integer from 0 to {high}, got {describe(v)}",
                field=key,
            )
        vals[key] = v
    if body.get("target") is not None:
        t = body["target"]
        words = (
            f"target: expected a number > 0 and <= {MAX_TARGET:g} (in-flight requests per replica)"
        )
        if not isinstance(t, int | float) or isinstance(t, bool):
            raise ApiError(400, "invalid scale", f"{words}, got {describe(t)}", field="target")
        # compared as given (NaN and infinities fail it), before float(): an int too
        # large for a float must not overflow
        if not 0 < t <= MAX_TARGET:
            raise ApiError(400, "invalid scale", f"{words}, got {describe(t)}", field="target")
        vals["target"] = float(t)
    if "replicas" in vals:
        if "min" in vals or "max" in vals:
            raise ApiError(
                400,
                "invalid scale",
                "replicas: cannot be combined with min or max",
                field="replicas",
            )
        vals["min"] = vals["max"] = vals.pop("replicas")
    new = ScaleOverride(**{**asdict(fn.scale), **vals})
    if new.target is not None and not 0 < new.target <= MAX_TARGET:
        new.target = None  # stored before targets were checked (NaN): back to the spec's
    if "max" in vals and "min" not in vals and new.min is not None and new.min > vals["max"]:
        new.min = None if vals["max"] >= 1 else 0
    latest = fn.latest()
    if latest is not None:
        eff = new.apply(latest.spec.scale)
        if eff.min > eff.max:
            raise ApiError(
                400, "invalid scale", f"min: {eff.min} is above max {eff.max}", field="min"
            )
    elif new.min is not None and new.max is not None and new.min > new.max:
        raise ApiError(400, "invalid scale", f"min: {new.min} is above max {new.max}", field="min")
    return new


def _fmt_override(o: ScaleOverride) -> str:
    parts = [f"{k}={v}" for k, v in asdict(o).items() if v is not None]
    return "{" + ", ".join(parts) + "}" if parts else "{spec defaults}"
