"""What every route module of the control API shares: the error it raises, the way it
finds the store and a function, and the parsers of JSON bodies and query parameters.

Errors are ``{"error": ..., "detail": ...}`` (plus named extras such as ``field``) with a
4xx/5xx status: a handler raises :class:`ApiError` and the app renders it
(:func:`error_response`). Handlers are plain module-level functions; what they need
comes from ``request.app.state`` (set by ``torpor.api.app.create_app``).
"""

from __future__ import annotations

import math
from typing import Any

from starlette.requests import Request

from torpor.api.jsonsafe import BadJson, loads
from torpor.api.jsonsafe import SafeJSONResponse as JSONResponse  # a stored NaN renders, as null
from torpor.model import Function
from torpor.spec import SpecError, validate_name
from torpor.store.base import Store


class ApiError(Exception):
    """An answer other than success: ``status``, the short ``error``, a ``detail`` for
    people, and extras merged into the body (``field=`` names the offending input)."""

    def __init__(self, status: int, error: str, detail: str = "", **extra: Any) -> None:
        super().__init__(status, error, detail)
        self.status, self.error, self.detail, self.extra = status, error, detail, extra


def error_response(status: int, error: str, detail: str = "", **extra: Any) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail, **extra}, status_code=status)


def store_of(request: Request) -> Store:
    """The store the app was built with."""
    store: Store = request.app.state.store
    return store


async def get_fn(store: Store, name: str) -> Function:
    """The function named ``name``; 404 for a name that is not a valid function name (the
    store is not asked) or that no function has."""
    try:
        validate_name(name)
    except SpecError:
        raise ApiError(404, "function not found", f"no function named {name[:63]!r}") from None
    fn = await store.get_function(name)
    if fn is None:
        raise ApiError(404, "function not found", f"no function named {name[:63]!r}")
    return fn


async def json_body(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """The body as a JSON object (strict JSON, see torpor.api.jsonsafe); 400 otherwise.
    ``optional``: an empty (or blank) body is ``{}`` instead of a 400."""
    raw = await request.body()
    if optional and not raw.strip():
        return {}
    try:
        body = loads(raw)
    except BadJson as e:
        extra = {"field": e.field} if e.field else {}
        raise ApiError(400, "bad request", str(e), **extra) from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad request", "body must be a JSON object")
    return body


def query_flag(request: Request, name: str) -> bool:
    """``?name=1|true|yes`` (any case): True; anything else or absent: False."""
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")


def query_int(request: Request, name: str, default: int, high: int) -> int:
    """``?name=`` as an integer 0..high (ASCII digits only); 400 naming it otherwise."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12 or int(raw) > high:
        raise ApiError(
            400,
            "bad request",
            f"{name}: expected an integer from 0 to {high}, got {raw[:20]!r}",
            field=name,
        )
    return int(raw)


def query_time(request: Request, name: str) -> float:
    """``?name=`` as a Unix time (a finite number >= 0; 0 when absent)."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return 0.0
    try:
        value = float(raw) if len(raw) <= 40 else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ApiError(
            400,
            "bad request",
            f"{name}: expected a Unix time (a number of seconds >= 0), got {raw[:20]!r}",
            field=name,
        )
    return value
