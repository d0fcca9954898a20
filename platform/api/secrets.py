"""Secret endpoints of the control API. No route ever returns a value.

- ``GET    /v1/secrets``                 every secret: name, version, updated, used_by
- ``GET    /v1/secrets/{name}``          one secret's metadata (404 if none)
- ``PUT    /v1/secrets/{name}``          create or replace: the body is the raw value
  (``Content-Type: application/octet-stream``; UTF-8 text without NUL, 1 byte to 64 KiB);
  201 when created, 200 when replaced
- ``DELETE /v1/secrets/{name}``          409 naming the functions that use it, unless
  ``?force=true`` (their new replicas then fail to start until it is set again)

``used_by`` lists the functions whose newest revision, or a revision with traffic or a
tag, maps an env variable to the secret. A new value reaches replicas started after the
change (scale-ups, the next deploy); running replicas keep the env they started with.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from torpor.api.common import ApiError, query_flag, store_of
from torpor.model import Event, SecretInfo
from torpor.secret import MAX_VALUE, SecretValueError, check_value, users
from torpor.spec import SpecError, validate_secret_name
from torpor.store.base import Store

CONTENT_TYPE = "application/octet-stream"


def _view(info: SecretInfo, used_by: list[str]) -> dict[str, Any]:
    return {"name": info.name, "version": info.version, "updated": info.updated, "used_by": used_by}


def check_name(name: str) -> str:
    try:
        return validate_secret_name(name, "name")
    except SpecError as e:
        raise ApiError(400, "invalid secret name", str(e), field="name") from None


async def used(store: Store) -> dict[str, list[str]]:
    """Secret name -> the functions using it (torpor.secret.users)."""
    return users(await store.list_functions())


async def find(store: Store, name: str) -> SecretInfo | None:
    return next((s for s in await store.list_secrets() if s.name == name), None)


async def list_secrets(request: Request) -> Response:
    store = store_of(request)
    by = await used(store)
    return JSONResponse(
        {"secrets": [_view(s, by.get(s.name, [])) for s in await store.list_secrets()]}
    )


async def get_secret(request: Request) -> Response:
    store = store_of(request)
    name = check_name(request.path_params["name"])
    info = await find(store, name)
    if info is None:
        raise ApiError(404, "secret not found", f"no secret named {name!r}")
    return JSONResponse(_view(info, (await used(store)).get(name, [])))


async def put_secret(request: Request) -> Response:
    store = store_of(request)
    name = check_name(request.path_params["name"])
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != CONTENT_TYPE:
        raise ApiError(
            415,
            "unsupported media type",
            f"send the raw value as {CONTENT_TYPE}, got {ctype[:60] or 'no content type'!r}",
        )
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_VALUE:
            raise ApiError(413, "secret too large", f"value: over the {MAX_VALUE // 1024} KiB cap")
    try:
        check_value(bytes(data))
    except SecretValueError as e:
        raise ApiError(400, "invalid secret value", str(e), field="value") from None
    info = await store.put_secret(name, bytes(data))
    by = (await used(store)).get(name, [])
    verb = "created" if info.version == 1 else f"set (version {info.version})"
    for fn in by:
        await store.add_event(
            Event(
                function=fn,
                kind="secret",
                message=(f"secret {name} {verb}; takes effect for replicas started from now on"),
                data={"secret": name, "version": info.version},
            )
        )
    return JSONResponse(_view(info, by), status_code=201 if info.version == 1 else 200)


async def delete_secret(request: Request) -> Response:
    store = store_of(request)
    name = check_name(request.path_params["name"])
    force = query_flag(request, "force")
    if await find(store, name) is None:
        raise ApiError(404, "secret not found", f"no secret named {name!r}")
    by = (await used(store)).get(name, [])
    if by and not force:
        raise ApiError(
            409,
            "secret in use",
            (
                f"secret {name} is used by {', '.join(by)}; their new replicas would fail to start. "
                "Remove it from their specs and deploy, or delete anyway with force=true"
            ),
            used_by=by,
        )
    await store.delete_secret(name)
    for fn in by:
        await store.add_event(
            Event(
                function=fn,
                kind="secret",
                message=(
                    f"secret {name} deleted while in use (forced); new replicas fail to start until it is set again"
                ),
                data={"secret": name},
            )
        )
    return JSONResponse({"deleted": name, "used_by": by})


SECRET_ROUTES = [
    Route("/v1/secrets", list_secrets, methods=["GET"]),
    Route("/v1/secrets/{name}", get_secret, methods=["GET"]),
    Route("/v1/secrets/{name}", put_secret, methods=["PUT"]),
    Route("/v1/secrets/{name}", delete_secret, methods=["DELETE"]),
]
