"""What a web browser could do to the control API, refused before any route runs.

Pure ASGI middleware in front of the bearer-token check (:mod:`torpor.api.auth`). It
refuses, on every path:

- a ``Host`` that is not a name the API answers to (DNS rebinding: a page on
  ``evil.example`` whose name now resolves to 127.0.0.1 sends ``Host: evil.example``):
  421 ``misdirected request``. See :class:`HostPolicy` for the names.
- an ``Origin`` that is not in the allowed list (empty by default, so any page's
  request) and is not the API's own (``Origin`` equal to this ``Host`` with
  ``Sec-Fetch-Site: same-origin``: the dashboard at /ui, torpor.api.ui), and ``Sec-Fetch-Site: cross-site | same-site`` without an allowed
  ``Origin``: 403 ``cross-origin request``. No CORS header is granted, except to an
  origin the operator listed (then preflights are answered and ``Access-Control-Allow-
  Origin`` names it).
- on a state-changing route, a request body whose ``Content-Type`` is not one the route
  declares (see ``REQUEST_BODIES`` in :mod:`torpor.api.app`), or a body with none: 415
  ``unsupported media type``. ``text/plain``, forms and multipart, which a page can send
  without a preflight, are accepted nowhere. A request with no body needs no type.

Errors are JSON ``{"error", "detail", "field"}`` naming what was refused.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from starlette.routing import BaseRoute, Route, compile_path

LOOPBACK_BINDS = frozenset({"127.0.0.1", "localhost", "::1"})
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CROSS_FETCH_SITES = frozenset({b"cross-site", b"same-site"})
MAX_SHOWN = 100  # characters of a refused header value shown back


def split_host(value: str) -> tuple[str, str | None]:
    """``"Name:8081"`` -> ``("name", "8081")``; ``"[::1]"`` -> ``("[::1]", None)``."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return value, None
        rest = value[end + 1 :]
        return value[: end + 1], rest[1:] if rest.startswith(":") else None
    name, sep, port = value.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        return name, port
    return value, None


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name[1:-1] if name.startswith("[") and name.endswith("]") else name)
    except ValueError:
        return False
    return ":" not in name or name.startswith("[")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class HostPolicy:
    """The ``Host`` names the API answers to (any port, unless an entry gives one).

    - bound to loopback (127.0.0.1, localhost, ::1): ``127.0.0.1``, ``localhost``, ``[::1]``;
    - bound to one address or name: that one;
    - bound to every interface (0.0.0.0, ::): the loopback names and any IP address
      literal (a page cannot make a browser send an IP literal for its own name, so
      literals are no DNS-rebinding vector), but no other name unless listed;
    - plus ``extra`` (``--api-allowed-hosts``): ``name`` (any port), ``name:port``, or
      ``*`` for any Host (behind a proxy that checks it).
    """

    def __init__(self, bind: str, extra: Iterable[str] = ()) -> None:
        bind = bind.strip().lower()
        self.any_ip = bind in WILDCARD_BINDS
        names: list[str] = []
        if bind in LOOPBACK_BINDS or self.any_ip:
            names += LOOPBACK_NAMES
        else:
            names.append(_bracket(bind))
        self.any_host = False
        self.names: set[str] = set(names)
        self.with_port: set[tuple[str, str]] = set()
        self.shown = list(names) + (["any IP address"] if self.any_ip else [])
        for raw in extra:
            entry = raw.strip().lower()
            if not entry:
                continue
            if entry == "*":
                self.any_host = True
                self.shown.append("*")
                continue
            name, port = split_host(entry)
            name = _bracket(name)
            if port is None:
                self.names.add(name)
            else:
                self.with_port.add((name, port))
            self.shown.append(entry)

    def allows(self, value: str) -> bool:
        if self.any_host:
            return True
        name, port = split_host(value)
        if not name:
            return False
        if name in self.names or (port is not None and (name, port) in self.with_port):
            return True
        return self.any_ip and _is_ip_literal(name)


def _normalize_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def media_type(value: str) -> tuple[str, list[str]]:
    """``"Application/JSON; charset=utf-8"`` -> ``("application/json", ["charset"])``."""
    kind, *params = value.split(";")
    return kind.strip().lower(), [p.split("=", 1)[0].strip().lower() for p in params if p.strip()]


class BodyRules:
    """Which ``Content-Type`` each (method, path template) accepts; ``()`` = no body."""

    def __init__(self, table: Mapping[tuple[str, str], tuple[str, ...]]) -> None:
        self.rules: list[tuple[str, re.Pattern[str], str, tuple[str, ...]]] = []
        for (method, template), accepted in table.items():
            regex, _, _ = compile_path(template)
            self.rules.append((method.upper(), regex, template, tuple(a.lower() for a in accepted)))

    def lookup(self, method: str, path: str) -> tuple[str, tuple[str, ...]] | None:
        for m, regex, template, accepted in self.rules:
            if m == method and regex.match(path):
                return template, accepted
        return None

    def check_covers(self, routes: Iterable[BaseRoute]) -> None:
        """Raise if a state-changing route has no declared body types (fail closed)."""
        declared = {(m, t) for m, _, t, _ in self.rules}
        missing = [
            f"{m} {r.path}"
            for r in routes
            if isinstance(r, Route)
            for m in sorted((r.methods or set()) - SAFE_METHODS)
            if (m, r.path) not in declared
        ]
        if missing:
            raise ValueError(f"routes without declared request body types: {', '.join(missing)}")


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k == name]


def _show(value: bytes | str) -> str:
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return repr(text[:MAX_SHOWN] + ("..." if len(text) > MAX_SHOWN else ""))


class BrowserGuard:
    """ASGI middleware: Host, Origin / Sec-Fetch-Site and Content-Type checks (see module doc)."""

    def __init__(
        self, app: Any, *, hosts: HostPolicy, bodies: BodyRules, allowed_origins: Iterable[str] = ()
    ) -> None:
        self.app = app
        self.hosts = hosts
        self.bodies = bodies
        self.origins = frozenset(_normalize_origin(o) for o in allowed_origins if o.strip())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        method: str = scope["method"]

        hosts = _header(headers, b"host")
        if len(hosts) != 1 or not self.hosts.allows(hosts[0].decode("latin-1")):
            got = (
                "no Host header"
                if not hosts
                else "several Host headers"
                if len(hosts) > 1
                else f"Host {_show(hosts[0])}"
            )
            await _refuse(
                send,
                421,
                "misdirected request",
                f"{got}: this API answers to {', '.join(self.hosts.shown)} "
                "(add names with --api-allowed-hosts)",
                "host",
            )
            return

        origins = _header(headers, b"origin")
        sites = _header(headers, b"sec-fetch-site")
        allowed_origin: bytes | None = None
        if len(origins) == 1 and _same_origin(origins[0], hosts[0], sites):
            origins = []  # the API's own page (/ui): no CORS header needed
        if origins:
            if (
                len(origins) > 1
                or _normalize_origin(origins[0].decode("latin-1")) not in self.origins
            ):
                await _refuse(
                    send,
                    403,
                    "cross-origin request",
                    f"Origin {_show(origins[0])} is not allowed to call this API "
                    "(allow one with --api-allowed-origins)",
                    "origin",
                )
                return
            allowed_origin = origins[0]
        if allowed_origin is None and any(s.strip().lower() in CROSS_FETCH_SITES for s in sites):
            await _refuse(
                send,
                403,
                "cross-origin request",
                f"Sec-Fetch-Site {_show(sites[0])} without an allowed Origin: a web page "
                "may not call this API",
                "sec-fetch-site",
            )
            return
        if (
            allowed_origin is not None
            and method == "OPTIONS"
            and _header(headers, b"access-control-request-method")
        ):
            await _preflight(send, allowed_origin)
            return

        if method not in SAFE_METHODS:
            problem = self._body_problem(method, scope["path"], headers)
            if problem is not None:
                await _refuse(send, 415, "unsupported media type", problem, "content-type")
                return

        if allowed_origin is None:
            await self.app(scope, receive, send)
            return

        async def send_cors(msg: Any) -> None:
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": [*msg.get("headers", []), *_cors_headers(allowed_origin)]}
            await send(msg)

        await self.app(scope, receive, send_cors)

    def _body_problem(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]]
    ) -> str | None:
        found = self.bodies.lookup(method, path)
        if found is None:
            return None  # no such route: the app answers 404 / 405
        template, accepted = found
        types = _header(headers, b"content-type")
        lengths = _header(headers, b"content-length")
        has_body = bool(_header(headers, b"transfer-encoding")) or any(
            v.strip() not in (b"", b"0") for v in lengths
        )
        where = f"{method} {template}"
        wants = ", ".join(accepted) if accepted else "no request body"
        if not types:
            if not has_body:
                return None
            return f"{where}: a request body needs a Content-Type; this route accepts {wants}"
        if len(types) > 1:
            return f"{where}: several Content-Type headers; this route accepts {wants}"
        kind, params = media_type(types[0].decode("latin-1"))
        if kind not in accepted or any(p != "charset" for p in params):
            return f"{where}: Content-Type {_show(types[0])} is not accepted; this route accepts {wants}"
        return None


def _same_origin(origin: bytes, host: bytes, sites: list[bytes]) -> bool:
    """A request of the API's own page: ``Origin`` is this very ``Host`` (already checked)
    and the browser says ``Sec-Fetch-Site: same-origin``."""
    if len(sites) != 1 or sites[0].strip().lower() != b"same-origin":
        return False
    o = _normalize_origin(origin.decode("latin-1"))
    h = host.decode("latin-1").strip().lower()
    return o in (f"http://{h}", f"https://{h}")


def _cors_headers(origin: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]


async def _preflight(send: Any, origin: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 204,
            "headers": [
                *_cors_headers(origin),
                (b"access-control-allow-methods", b"GET, POST, PUT, PATCH, DELETE"),
                (b"access-control-allow-headers", b"authorization, content-type"),
                (b"access-control-max-age", b"600"),
                (b"content-length", b"0"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b""})


async def _refuse(send: Any, status: int, error: str, detail: str, field: str) -> None:
    body = json.dumps({"error": error, "detail": detail, "field": field}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
