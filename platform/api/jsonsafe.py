"""JSON numbers at the API's boundary: strict in, finite out.

In: :func:`loads` parses a request body like :func:`json.loads` but refuses what Python's
``json`` accepts beyond the JSON standard or beyond any field's range, naming the field
where it sits (``target``, ``traffic[0].percent``):

- the literals ``NaN``, ``Infinity`` and ``-Infinity``;
- numbers that overflow a float (``1e999`` parses as infinity);
- integers longer than ``MAX_INT_DIGITS`` digits (no field takes one; converting very long
  digit strings also costs quadratic time, and past 4,300 digits Python refuses them);
- documents nested deeper than the parser can go.

Out: :class:`SafeJSONResponse` renders like Starlette's ``JSONResponse`` (standard JSON,
no NaN), but a record stored before these checks existed, holding a non-finite float,
renders with ``null`` in its place instead of failing the request with a 500.
:func:`non_finite` lists where such values are, for a view that wants to say so.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from starlette.responses import JSONResponse

log = logging.getLogger("torpor.api")

MAX_INT_DIGITS = 100

__all__ = ["MAX_INT_DIGITS", "BadJson", "SafeJSONResponse", "finite", "loads", "non_finite"]


class BadJson(ValueError):
    """A body that is not acceptable JSON. ``field`` names where (None: the document)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class _Refused:
    """Stands in for a number the parser refused, until its path is known."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


def _constant(name: str) -> _Refused:
    return _Refused(name)  # NaN, Infinity, -Infinity


def _float(text: str) -> float | _Refused:
    value = float(text)
    return value if math.isfinite(value) else _Refused(text[:20])


def _int(text: str) -> int | _Refused:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        return _Refused(f"an integer of {digits} digits")
    return int(text)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    shown = key if len(key) <= 40 else key[:37] + "..."
    return f"{path}.{shown}" if path else shown


def loads(raw: bytes | str) -> Any:
    """Parse ``raw`` as strict JSON (see the module docstring); raises :class:`BadJson`."""
    try:
        doc = json.loads(raw, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except RecursionError:
        raise BadJson("body is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadJson(f"body is not valid JSON: {e}") from None
    stack: list[tuple[str, Any]] = [("", doc)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, _Refused):
            where = path or "body"
            raise BadJson(
                f"{where}: expected a finite number in range, got {node.text}", path or None
            )
        if isinstance(node, dict):
            stack.extend((_join(path, k), v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((_join(path, i), v) for i, v in enumerate(node))
    return doc


def non_finite(obj: Any, path: str = "") -> list[str]:
    """Paths of the non-finite floats in ``obj`` (dicts and lists walked), with the value:
    ``["scale_override.target: nan"]``."""
    out: list[str] = []
    stack: list[tuple[str, Any]] = [(path, obj)]
    while stack:
        p, node = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            out.append(f"{p or 'value'}: {node!r}")
        elif isinstance(node, dict):
            stack.extend((_join(p, str(k)), v) for k, v in node.items())
        elif isinstance(node, list | tuple):
            stack.extend((_join(p, i), v) for i, v in enumerate(node))
    return sorted(out)


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (a copy where anything changed)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


class SafeJSONResponse(JSONResponse):
    """Starlette's JSONResponse; a non-finite float renders as null (and is logged)."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except ValueError:  # "Out of range float values are not JSON compliant"
            log.warning(
                "api: a response held non-finite numbers (%s); rendered as null",
                ", ".join(non_finite(content)[:5]),
            )
            return super().render(finite(content))
