"""The controller's health endpoint for Kubernetes probes (``torpor controller --health-port N``).

- ``GET /healthz``: 200 while the controller's loop runs (liveness), else 503.
- ``GET /readyz``: 200 once the store answers and the controller is synced, as the
  leader or as a standby (readiness), else 503.

Both answer JSON with the controller's role; no token (they tell nothing secret), and
nothing else is served.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["health_app"]


def health_app(
    alive: Callable[[], bool], ready: Callable[[], bool], role: Callable[[], str]
) -> Any:
    async def healthz(request: Request) -> Response:
        ok = alive()
        return JSONResponse(
            {"status": "ok" if ok else "stopped", "role": role()}, status_code=200 if ok else 503
        )

    async def readyz(request: Request) -> Response:
        ok = alive() and ready()
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "role": role()},
            status_code=200 if ok else 503,
        )

    return Starlette(routes=[Route("/healthz", healthz), Route("/readyz", readyz)])
