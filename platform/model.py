"""The vocabulary of Torpor as plain dataclasses.

Imports nothing of Torpor. Every record round-trips through ``to_dict``/``from_dict``
(JSON-safe) so the stores can persist it and the API can serve it.
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, cast

MiB = 1024 * 1024
DEFAULT_MAX_BODY = 10 * MiB  # Spec.max_body: largest request body the gateway takes
DEFAULT_STREAM_IDLE = (
    60.0  # Spec.stream_idle: silence allowed between chunks of a streamed response
)
DEFAULT_MAX_CONNECTION = 3600.0  # Spec.max_connection: longest a WebSocket may stay open
# Upper bounds (seconds) of the request-latency histogram the gateway keeps and reports.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

RevisionStatus = Literal["building", "ready", "failed", "retired"]
ReplicaState = Literal["starting", "ready", "draining", "failed"]
REPLICA_STATES: tuple[str, ...] = ("starting", "ready", "draining", "failed")


@dataclass
class Scale:
    min: int = 0
    max: int = 20
    target: float = 10.0  # target in-flight requests per replica
    concurrency: int = 0  # hard in-flight limit per replica; 0 = none
    idle: float = 30.0  # seconds without traffic before scaling to zero
    window: float = 60.0  # stable window, seconds
    panic_window: float = 10.0  # panic window, percent of the stable window
    panic_threshold: float = 200.0  # panic when the panic-window need is this percent of ready


@dataclass
class Resources:
    cpu: float = 0.5
    memory: int = 256 * MiB  # bytes


@dataclass
class RolloutPolicy:
    steps: list[int] = field(default_factory=lambda: [10, 25, 50, 100])
    interval: float = 30.0  # seconds per step
    max_error_ratio: float = 0.05  # 5xx / requests of the canary
    max_p95_ratio: float = 2.0  # canary p95 may be at most this x stable p95
    min_requests: int = 20  # canary requests needed per step before judging


@dataclass
class AsyncPolicy:
    """``async:`` in the spec: how the function's asynchronous calls are run."""

    concurrency: int = 10  # calls of this function running at once (all gateways)
    max_attempts: int = 3  # attempts that reached a replica, before the call fails


@dataclass
class Spec:
    name: str
    handler: str | None = "handler:handle"
    image: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    port: int = 8080
    timeout: float = 30.0
    max_body: int = DEFAULT_MAX_BODY  # bytes; a larger request body gets 413 at the gateway
    scale: Scale = field(default_factory=Scale)
    resources: Resources = field(default_factory=Resources)
    rollout: RolloutPolicy = field(default_factory=RolloutPolicy)
    secrets: dict[str, str] = field(default_factory=dict)  # env name -> secret name, never a value
    handler_style: str = "torpor"  # "torpor": handle(request); "openfaas": handle(event, context)
    command: list[str] | None = None  # image functions: replaces the image's ENTRYPOINT
    args: list[str] | None = None  # image functions: replaces the image's CMD
    labels: dict[str, str] = field(default_factory=dict)  # put on containers and Pods
    async_calls: AsyncPolicy = field(default_factory=AsyncPolicy)  # the `async:` key
    stream_idle: float = DEFAULT_STREAM_IDLE  # seconds; a streamed response silent longer is ended
    max_connection: float = DEFAULT_MAX_CONNECTION  # seconds; a WebSocket open longer is closed
    websocket: str | None = None  # module:function serving WebSocket upgrades (source builds)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["async"] = d.pop("async_calls")  # the spec's own key (a Python keyword)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Spec:
        d = dict(d)
        if "async" in d:
            d["async_calls"] = d.pop("async")
        d["scale"] = Scale(**d.get("scale", {}))
        d["resources"] = Resources(**d.get("resources", {}))
        d["rollout"] = RolloutPolicy(**d.get("rollout", {}))
        d["async_calls"] = AsyncPolicy(**(d.get("async_calls") or {}))
        return cls(**d)


OnReadyKind = Literal["promote", "none", "canary"]
ON_READY_KINDS: tuple[str, ...] = ("promote", "none", "canary")


@dataclass(frozen=True)
class OnReady:
    """What a revision's traffic becomes once it is ready, as its deploy asked.

    - ``promote``: 100 % to it (the default);
    - ``none``: no percent, only its tag (``torpor deploy --no-traffic``);
    - ``canary`` with ``percent`` 1..99: a rollout starting at that percent
      (``torpor deploy --canary PCT``).

    Any other combination raises ``ValueError``. In the store (and in events) it is
    written as the text every version of Torpor wrote and reads, ``"promote"``,
    ``"none"`` or ``"canary:PCT"`` (``str()`` / :meth:`parse`), so a record written by one
    version loads in another (the API and the controller may be upgraded one at a time).
    """

    kind: OnReadyKind = "promote"
    percent: int | None = None  # canary only

    def __post_init__(self) -> None:
        if self.kind == "canary":
            p = self.percent
            if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= 99:
                raise ValueError(f"on_ready: a canary needs a percent 1..99, got {p!r}")
        elif self.kind in ("promote", "none"):
            if self.percent is not None:
                raise ValueError(f"on_ready: {self.kind} takes no percent")
        else:
            raise ValueError(f"on_ready: expected one of {', '.join(ON_READY_KINDS)}")

    @classmethod
    def canary(cls, percent: int) -> OnReady:
        return cls("canary", percent)

    def __str__(self) -> str:
        return f"canary:{self.percent}" if self.kind == "canary" else self.kind

    @classmethod
    def parse(cls, text: str) -> OnReady:
        """The text form back (``"canary:10"``); ``ValueError`` for anything else."""
        kind, sep, pct = text.partition(":")
        if kind == "canary" and sep:
            if not (pct.isascii() and pct.isdigit()) or len(pct) > 2:
                raise ValueError(f"on_ready: a canary needs a percent 1..99, got {pct[:10]!r}")
            return cls.canary(int(pct))
        if kind in ("promote", "none") and not sep:
            return cls(cast(OnReadyKind, kind))
        raise ValueError(f"on_ready: expected promote, none or canary:PCT, got {text[:20]!r}")

    @classmethod
    def from_stored(cls, raw: Any) -> OnReady:
        """What a stored record holds, leniently: the text form; a missing or malformed
        value is ``promote`` (what the controller always did with a value it did not know)."""
        if isinstance(raw, OnReady):
            return raw
        if isinstance(raw, str):
            try:
                return cls.parse(raw)
            except ValueError:
                pass
        return cls()


@dataclass
class Revision:
    name: str  # hello-00003
    function: str
    number: int
    spec: Spec
    # a local folder: only on the copy the controller hands a driver (its own cache), and on
    # revisions stored before archives; what the store holds for a new revision is the hash
    source: str | None = None
    image: str | None = None  # built (or given) image, docker driver
    source_sha256: str | None = None  # sha256 of the source archive in the store (torpor.sources)
    status: RevisionStatus = "building"
    reason: str = ""
    created: float = field(default_factory=time.time)
    on_ready: OnReady = field(default_factory=OnReady)  # traffic once ready (see OnReady)
    tag: str | None = None  # tag to give it once ready

    def __post_init__(self) -> None:
        if isinstance(self.on_ready, str):  # the text form, strictly (OnReady.parse)
            self.on_ready = OnReady.parse(self.on_ready)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["spec"] = self.spec.to_dict()
        d["on_ready"] = str(self.on_ready)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Revision:
        d = dict(d)
        d["spec"] = Spec.from_dict(d["spec"])
        d["on_ready"] = OnReady.from_stored(d.get("on_ready"))
        return cls(**d)


@dataclass
class TrafficTarget:
    revision: str
    percent: int
    tag: str | None = None


def format_traffic(
    targets: Iterable[TrafficTarget | Mapping[str, Any]],
    *,
    skip_zero: bool = False,
    tags: bool = True,
) -> str:
    """A traffic table as one line, ``"hello-00002=90% (stable), hello-00003=10%"``.

    ``targets``: :class:`TrafficTarget` objects or the API's JSON objects
    (``{"revision", "percent", "tag"}``, ``tag`` optional). ``skip_zero`` leaves out the
    targets without a percent (tag-only ones); ``tags=False`` leaves out the tags.
    """
    parts = []
    for t in targets:
        if isinstance(t, TrafficTarget):
            rev, pct, tag = t.revision, t.percent, t.tag
        else:
            rev, pct, tag = t["revision"], t["percent"], t.get("tag")
        if skip_zero and not pct:
            continue
        parts.append(f"{rev}={pct}%" + (f" ({tag})" if tags and tag else ""))
    return ", ".join(parts)


@dataclass
class ScaleOverride:
    """Operator-set bounds that apply without a new revision (``torpor scale``)."""

    min: int | None = None
    max: int | None = None
    target: float | None = None
    concurrency: int | None = None

    def apply(self, s: Scale) -> Scale:
        return Scale(
            min=s.min if self.min is None else self.min,
            max=s.max if self.max is None else self.max,
            target=s.target if self.target is None else self.target,
            concurrency=s.concurrency if self.concurrency is None else self.concurrency,
            idle=s.idle,
            window=s.window,
            panic_window=s.panic_window,
            panic_threshold=s.panic_threshold,
        )


@dataclass
class Rollout:
    to: str  # candidate revision
    stable: str  # revision it replaces
    steps: list[int]
    step: int = 0  # index into steps
    state: Literal["running", "paused", "promoted", "rolled_back", "aborted"] = "running"
    step_started: float = field(default_factory=time.time)
    reason: str = ""
    policy: RolloutPolicy = field(default_factory=RolloutPolicy)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rollout:
        d = dict(d)
        d["policy"] = RolloutPolicy(**d.get("policy", {}))
        return cls(**d)


@dataclass
class Function:
    name: str
    revisions: list[Revision] = field(default_factory=list)
    traffic: list[TrafficTarget] = field(default_factory=list)
    scale: ScaleOverride = field(default_factory=ScaleOverride)
    rollout: Rollout | None = None
    next_number: int = 1
    created: float = field(default_factory=time.time)

    def revision(self, name: str) -> Revision | None:
        for r in self.revisions:
            if r.name == name:
                return r
        return None

    def latest(self) -> Revision | None:
        return self.revisions[-1] if self.revisions else None

    def routed(self) -> list[str]:
        """Revisions reachable by clients: any traffic percent or a tag."""
        return [t.revision for t in self.traffic if t.percent > 0 or t.tag]

    def effective_scale(self, rev: Revision) -> Scale:
        return self.scale.apply(rev.spec.scale)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "revisions": [r.to_dict() for r in self.revisions],
            "traffic": [asdict(t) for t in self.traffic],
            "scale": asdict(self.scale),
            "rollout": asdict(self.rollout) if self.rollout else None,
            "next_number": self.next_number,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Function:
        return cls(
            name=d["name"],
            revisions=[Revision.from_dict(r) for r in d.get("revisions", [])],
            traffic=[TrafficTarget(**t) for t in d.get("traffic", [])],
            scale=ScaleOverride(**d.get("scale") or {}),
            rollout=Rollout.from_dict(d["rollout"]) if d.get("rollout") else None,
            next_number=d.get("next_number", 1),
            created=d.get("created", time.time()),
        )


@dataclass
class Replica:
    name: str  # hello-00003-r7f2a
    function: str
    revision: str
    state: ReplicaState = "starting"
    endpoint: str = ""  # host:port, set once the replica answers its health check
    driver_id: str = ""  # pid or container id
    started: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Replica:
        return cls(**d)


@dataclass
class Event:
    function: str
    kind: str  # deploy, scale, replica, rollout, error...
    message: str
    time: float = field(default_factory=time.time)
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        return cls(**d)


@dataclass
class SecretInfo:
    """What may be said about a secret: never its value."""

    name: str
    version: int = 1  # 1 on creation, +1 on every set
    updated: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Change:
    """A notification on the store's change feed."""

    kind: Literal["function", "replica", "deleted"]
    function: str


# -- asynchronous calls (`/async-function/NAME`) -------------------------------------------
# A call is accepted by a gateway (202 + X-Call-Id), stored durably in a call queue
# (torpor.store.callq), run by a gateway's call worker (torpor.gateway.calls) and kept as a
# record for RETENTION seconds after it ended. States: queued (waiting to run, or for its
# next attempt), running (an attempt is in flight), done (a final answer below 500), failed
# (5xx, timeout or lost connection on its last attempt; not delivered within MAX_AGE; or
# its function was deleted).

CallState = Literal["queued", "running", "done", "failed"]
STATES: tuple[str, ...] = ("queued", "running", "done", "failed")

MAX_AGE = 24 * 3600.0  # s: a call not delivered to a replica by then fails
RETENTION = 24 * 3600.0  # s a finished call's record is kept
RESULT_CAP = 64 * 1024  # bytes of a result body kept in the record (and sent to a callback)
MAX_QUEUED = 10_000  # calls waiting per function; beyond: 503 + Retry-After at accept
LISTED = 1000  # recent calls kept per function (older final records are forgotten sooner)
MAX_HEADERS = 100  # request headers stored per call (the gateway's server bounds them too)

_ID_RE = re.compile(r"[0-9a-f]{32}", re.ASCII)


def new_id() -> str:
    return os.urandom(16).hex()


def valid_id(text: str) -> bool:
    return bool(_ID_RE.fullmatch(text))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass
class Call:
    id: str
    function: str
    method: str = "POST"
    path: str = "/"  # raw (percent-encoded) path below /async-function/NAME, from '/'
    query: str = ""  # raw query string, without '?'
    headers: list[tuple[str, str]] = field(default_factory=list)  # what the replica gets (latin-1)
    body: bytes = b""  # the request body; dropped from the record once the call is final
    callback: str | None = None  # X-Callback-Url, checked at accept and again at delivery
    client: str = ""  # the accepting gateway's peer address (for Forwarded on each attempt)
    created: float = field(default_factory=time.time)
    state: CallState = "queued"
    attempts: int = 0  # attempts that reached a replica
    tries: int = 0  # dispatches, including gateway refusals that cost no attempt
    status: int | None = None  # the final (or last) answer's status
    result_headers: list[tuple[str, str]] = field(default_factory=list)
    result_body: bytes = b""
    truncated: bool = False  # the result body was longer than RESULT_CAP
    error: str = ""  # why the last attempt failed, or why the call failed
    finished: float | None = None
    callback_state: str | None = None  # pending | delivered | failed | refused

    @property
    def final(self) -> bool:
        return self.state in ("done", "failed")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "function": self.function,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": [list(h) for h in self.headers],
            "body": _b64(self.body),
            "callback": self.callback,
            "client": self.client,
            "created": self.created,
            "state": self.state,
            "attempts": self.attempts,
            "tries": self.tries,
            "status": self.status,
            "result_headers": [list(h) for h in self.result_headers],
            "result_body": _b64(self.result_body),
            "truncated": self.truncated,
            "error": self.error,
            "finished": self.finished,
            "callback_state": self.callback_state,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Call:
        return cls(
            id=str(d["id"]),
            function=str(d["function"]),
            method=str(d.get("method", "POST")),
            path=str(d.get("path", "/")),
            query=str(d.get("query", "")),
            headers=[(str(k), str(v)) for k, v in d.get("headers", [])],
            body=base64.b64decode(d.get("body", "")),
            callback=d.get("callback"),
            client=str(d.get("client", "")),
            created=float(d.get("created", 0.0)),
            state=d.get("state", "queued"),
            attempts=int(d.get("attempts", 0)),
            tries=int(d.get("tries", 0)),
            status=d.get("status"),
            result_headers=[(str(k), str(v)) for k, v in d.get("result_headers", [])],
            result_body=base64.b64decode(d.get("result_body", "")),
            truncated=bool(d.get("truncated", False)),
            error=str(d.get("error", "")),
            finished=d.get("finished"),
            callback_state=d.get("callback_state"),
        )

    def view(self) -> dict[str, Any]:
        """What ``GET /v1/calls/ID`` answers (never the request body or headers)."""
        out: dict[str, Any] = {
            "id": self.id,
            "function": self.function,
            "state": self.state,
            "attempts": self.attempts,
            "status": self.status,
            "created": self.created,
            "finished": self.finished,
            "method": self.method,
            "path": self.path,
            "error": self.error or None,
            "callback": self.callback_state,
        }
        if self.final:
            out["headers"] = {k: v for k, v in self.result_headers}
            try:
                out["body"] = self.result_body.decode("utf-8")
                out["body_encoding"] = "utf-8"
            except UnicodeDecodeError:
                out["body"] = _b64(self.result_body)
                out["body_encoding"] = "base64"
            out["body_truncated"] = self.truncated
        return out
