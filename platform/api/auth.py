"""Bearer-token guard for the control API, as pure ASGI middleware.

Every path but /healthz and /readyz needs ``Authorization: Bearer <token>``; the
comparison is constant-time and the token never appears in a response or a log. One
exception: ``/v1/archives/SHA`` (exactly, SHA well-formed) goes on to its route either
way, marked ``scope["torpor.admin"]`` True or False; the route then takes the archive's
own read-only token instead (:mod:`torpor.api.archives`).
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from torpor.api.archives import is_archive_path

OPEN_PATHS = frozenset({"/healthz", "/readyz"})


class BearerAuth:
    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = b""
        for k, v in scope["headers"]:
            if k == b"authorization":
                given = v
                break
        admin = hmac.compare_digest(given, self.expected)
        if admin or is_archive_path(scope["path"]):
            await self.app({**scope, "torpor.admin": admin}, receive, send)
            return
        detail = "missing bearer token" if not given else "wrong token"
        body = json.dumps({"error": "unauthorized", "detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="torpor"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
