"""Asynchronous call endpoints of the control API (reads only; calls are accepted by the
gateway at ``/async-function/NAME``).

- ``GET /v1/calls/{id}``                 one call: ``{id, function, state, attempts, status,
  created, finished, ...}``; once final also the result's ``headers`` and ``body`` (up to
  64 KiB; ``body_encoding`` utf-8 or base64). 404 for an unknown or expired id.
- ``GET /v1/functions/{name}/calls``     the function's recent calls, newest first
  (``?limit=`` 1..1000, default 50), without result bodies.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from torpor.api.common import ApiError, get_fn, query_int
from torpor.model import LISTED, valid_id
from torpor.store.base import Store
from torpor.store.callq import open_queue

PATHS = ("/v1/calls/{id}", "/v1/functions/{name}/calls")


def call_routes(store: Store) -> list[Route]:
    """Routes for calls, over ``store``'s call queue."""
    queue = open_queue(store)

    async def get_call(request: Request) -> Response:
        cid = request.path_params["id"]
        if not valid_id(cid):
            raise ApiError(
                400, "invalid call id", "a call id is 32 lowercase hex digits", field="id"
            )
        call = await queue.get(cid)
        if call is None:
            raise ApiError(
                404, "call not found", f"no call {cid} (unknown, or older than its retention)"
            )
        return JSONResponse(call.view())

    async def list_calls(request: Request) -> Response:
        name = request.path_params["name"]
        await get_fn(store, name)
        limit = query_int(request, "limit", 50, LISTED)
        out = []
        for call in await queue.recent(name, limit):
            view = call.view()
            view.pop("body", None)
            view.pop("headers", None)
            out.append(view)
        return JSONResponse({"calls": out})

    return [
        Route(PATHS[0], get_call, methods=["GET"]),
        Route(PATHS[1], list_calls, methods=["GET"]),
    ]
