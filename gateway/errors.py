"""The gateway's one JSON answer writer: every answer the gateway gives on its own
(not a replica's) is a JSON object with at least ``error`` (what went wrong, a fixed
phrase), usually ``detail`` (for a person) and sometimes ``field``.

- ``send_json`` answers through an ASGI ``send`` (the app, the upstream client, the
  tunnel, the call intake): ``Content-Type: application/json``, ``Content-Length``,
  then ``Retry-After`` when given, ``Connection: close`` when ``close`` (the rest of the
  request body is not read), then any ``headers`` of the caller.
- ``Refused`` carries such an answer out of code that cannot send (reading a body).
- ``raw_response`` is the same answer as bytes on the wire, for the HTTP server's own
  answers written before any app runs (400, 408, 431, 503): it always closes.

The in-replica runtime (``torpor.runtime.server``) is standard library only and keeps
its own writer.
"""

from __future__ import annotations

import http
import json
from collections.abc import Iterable, Mapping
from typing import Any

from torpor.gateway.asgi import Send

__all__ = ["Refused", "json_body", "raw_response", "send_json"]

_JSON = (b"content-type", b"application/json")
_CLOSE = (b"connection", b"close")


class Refused(Exception):
    """A request the gateway will not take (a body too large, a full body buffer, a bad
    length): the caller answers ``status`` with ``body`` through ``send_json``, then
    closes (the rest of the body is not read)."""

    def __init__(self, status: int, body: dict[str, Any], retry_after: int | None = None) -> None:
        super().__init__(status, body.get("error"))
        self.status, self.body, self.retry_after = status, body, retry_after


def json_body(body: Mapping[str, Any]) -> bytes:
    """The encoded body of one JSON answer."""
    return json.dumps(body).encode()


async def send_json(
    send: Send,
    status: int,
    body: Mapping[str, Any],
    retry_after: int | None = None,
    close: bool = False,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> int:
    """Answer ``status`` with ``body`` as JSON through ``send``; returns ``status``."""
    data = json_body(body)
    out = [_JSON, (b"content-length", b"%d" % len(data))]
    if retry_after is not None:
        out.append((b"retry-after", b"%d" % retry_after))
    if close:
        out.append(_CLOSE)
    out.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": data, "more_body": False})
    return status


def raw_response(status: int, error: str, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 response ``{"error": error}`` that closes the connection;
    ``extra`` is more header lines, each ending in CRLF."""
    phrase = http.HTTPStatus(status).phrase.encode()
    body = json_body({"error": error})
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, phrase),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            extra,
            b"connection: close\r\n",
            b"\r\n",
            body,
        ]
    )
