"""Rollout endpoints of the control API. (Stub: filled in by the rollout work.)"""

from __future__ import annotations

from typing import Any

from starlette.routing import Route

from torpor.store.base import Store


def rollout_routes(store: Store, error: Any) -> list[Route]:
    """Routes under /v1/functions/{name}/rollout...; ``error`` is the ApiError class to raise."""
    return []
