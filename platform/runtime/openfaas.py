"""The OpenFaaS ``python3-http`` handler style for the Torpor runtime.

Standard library only, like ``server.py`` beside it (which loads this file by path when
``TORPOR_HANDLER_STYLE=openfaas``). :func:`adapt` turns an OpenFaaS handler
``handle(event, context)`` into a Torpor handler ``handle(request)``, behaving as the
OpenFaaS template does:

- ``event.body`` is the body as bytes; ``event.headers`` the headers (case-insensitive
  ``get``); ``event.method``; ``event.query`` the query arguments (``.get(name)`` gives
  the first value, ``.getlist(name)`` every value); ``event.path`` the decoded path.
- ``context.hostname`` is ``$HOSTNAME`` (``localhost`` when unset).
- A dict result is ``{"statusCode": 200, "body": ..., "headers": {...}}``, each key
  optional: a dict body is sent as JSON, bytes as they are, anything else as ``str()``
  text (``text/html; charset=utf-8`` unless the headers name a type). A missing status is
  200. ``headers`` is a dict or a list of (name, value) pairs.
- ``None`` is an empty 200; a tuple is ``(body, status)`` or ``(body, status, headers)``;
  any other value is the body, as above.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = ["Context", "Event", "QueryArgs", "adapt", "to_response"]

_HTML = "text/html; charset=utf-8"
_JSON = "application/json"


class QueryArgs(Mapping[str, str]):
    """Query arguments as OpenFaaS hands them over: ``get`` / ``[]`` give the first
    value of a repeated name, ``getlist`` every value."""

    __slots__ = ("_pairs",)

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._pairs = pairs

    def __getitem__(self, key: str) -> str:
        for name, value in self._pairs:
            if name == key:
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        seen: dict[str, None] = {}
        for name, _ in self._pairs:
            seen.setdefault(name, None)
        return iter(seen)

    def __len__(self) -> int:
        return len({name for name, _ in self._pairs})

    def getlist(self, key: str) -> list[str]:
        return [value for name, value in self._pairs if name == key]

    def to_dict(self, flat: bool = True) -> dict[str, Any]:
        if flat:
            return {name: self[name] for name in self}
        return {name: self.getlist(name) for name in self}

    def __repr__(self) -> str:
        return f"QueryArgs({self._pairs!r})"


class Event:
    """The request, as an OpenFaaS python3-http handler sees it."""

    __slots__ = ("body", "headers", "method", "query", "path")

    def __init__(self, request: Any) -> None:
        self.body: bytes = request.body
        self.headers = request.headers
        self.method: str = request.method
        self.query = QueryArgs(list(request.query_list))
        self.path: str = request.path


class Context:
    __slots__ = ("hostname",)

    def __init__(self) -> None:
        self.hostname = os.environ.get("HOSTNAME", "localhost")


class _Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body


def _header_items(raw: Any) -> list[tuple[str, str]]:
    if not raw:
        return []
    items = raw.items() if hasattr(raw, "items") else raw
    return [(str(name), str(value)) for name, value in items]


def _body(raw: Any, headers: list[tuple[str, str]]) -> bytes:
    """The body bytes; sets a content type in ``headers`` when none is named."""
    has_type = any(name.lower() == "content-type" for name, _ in headers)
    if isinstance(raw, (dict, list)):
        import json  # on first use: its import would be paid on every cold start

        ctype, data = _JSON, json.dumps(raw).encode("utf-8")
    elif isinstance(raw, (bytes, bytearray, memoryview)):
        ctype, data = _HTML, bytes(raw)
    elif raw is None:
        ctype, data = _HTML, b""
    else:
        ctype, data = _HTML, str(raw).encode("utf-8")
    if not has_type:
        headers.append(("Content-Type", ctype))
    return data


def to_response(result: Any) -> _Response:
    """An OpenFaaS handler's return value as a status, headers and body."""
    if result is None:
        headers: list[tuple[str, str]] = []
        return _Response(200, headers, _body("", headers))
    if isinstance(result, dict):
        status = result.get("statusCode", 200)
        headers = _header_items(result.get("headers"))
        if status in (204, 304):
            return _Response(status, headers, b"")  # no body, so no type
        return _Response(status, headers, _body(result.get("body", ""), headers))
    if isinstance(result, tuple) and 2 <= len(result) <= 3:
        headers = _header_items(result[2]) if len(result) == 3 else []
        return _Response(result[1], headers, _body(result[0], headers))
    headers = []
    return _Response(200, headers, _body(result, headers))


def adapt(handle: Callable[[Any, Any], Any]) -> Callable[[Any], Any]:
    """A Torpor handler that calls the OpenFaaS ``handle(event, context)``."""
    import inspect

    if inspect.iscoroutinefunction(handle):

        async def call_async(request: Any) -> Any:
            return to_response(await handle(Event(request), Context()))

        return call_async

    def call(request: Any) -> Any:
        return to_response(handle(Event(request), Context()))

    return call
