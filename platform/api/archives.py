"""``GET /v1/archives/{sha}``: a function's source archive by its content hash.

For the generic runtime on a cluster (``torpor/runtime/fetch.py``), which downloads its
function's archive at start and checks the hash itself. It takes either the API's admin
token or the archive's own read-only token, ``torpor.sources.archive_token(key, sha)``
(the key is the installation's, kept in the store): a Pod that holds one archive's token
can fetch that archive and nothing else, and no other route of the API.

:class:`~torpor.api.auth.BearerAuth` lets a request through to this route without the
admin token only when its path is exactly ``/v1/archives/`` + 64 lowercase hex digits;
it marks whether the admin token came (``scope["torpor.admin"]``), and the route checks
the archive token otherwise.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from torpor.api.common import ApiError
from torpor.sources import SHA256, token_matches
from torpor.store.base import Store

ARCHIVE_PATH = "/v1/archives/{sha}"
ARCHIVE_PREFIX = "/v1/archives/"


def is_archive_path(path: str) -> bool:
    """True for ``/v1/archives/SHA`` with a well-formed SHA, nothing else (no suffix, no dots)."""
    return (
        path.startswith(ARCHIVE_PREFIX)
        and SHA256.fullmatch(path[len(ARCHIVE_PREFIX) :]) is not None
    )


def _bearer(request: Request) -> str:
    value = request.headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def archive_routes(store: Store) -> list[Route]:
    key_cache: list[bytes] = []

    async def key() -> bytes:
        if not key_cache:
            key_cache.append(await store.archive_key())
        return key_cache[0]

    async def get_archive(request: Request) -> Response:
        sha = request.path_params["sha"]
        admin = bool(request.scope.get("torpor.admin"))
        if not SHA256.fullmatch(sha):
            # only the admin token gets this far with a malformed name (BearerAuth)
            raise ApiError(
                400,
                "bad archive name",
                "expected the archive's sha256: 64 lowercase hex digits",
                field="sha",
            )
        if not admin:
            token = _bearer(request)
            if not token or not token_matches(await key(), sha, token):
                raise ApiError(
                    401,
                    "unauthorized",
                    "missing bearer token" if not token else "wrong token for this archive",
                )
        blob = await store.get_blob(sha)
        if blob is None:
            raise ApiError(404, "archive not found", f"no archive {sha[:12]}... in the store")
        headers: dict[str, Any] = {"cache-control": "private, no-store", "x-content-sha256": sha}
        return Response(blob, media_type="application/gzip", headers=headers)

    return [Route(ARCHIVE_PATH, get_archive, methods=["GET"])]
