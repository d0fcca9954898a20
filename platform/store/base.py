"""The Store interface: desired state (functions), actual state (replicas), events,
and a small message bus (change feed, pokes, stats) shared by every component.

Two implementations satisfy it and pass one contract suite (tests/contract/test_store.py):
``EmbeddedStore`` (in-process, durable in a state dir) and ``RedisStore``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from torpor.model import Event, Function, Replica, SecretInfo

# Channels on the bus.
CHANGES = "changes"  # payload: {"kind": "function"|"replica"|"deleted", "function": name}
POKES = "pokes"  # payload: {"function", "revision", "queued": n, "gateway": id}   gateway -> controller: "need replicas now"
STATS = "stats"  # payload: gateway stats report, see torpor.gateway.stats
SECRETS = "secrets"  # payload: {"kind": "set"|"deleted", "name": secret, "version": n}, never a value

Mutator = Callable[[Function | None], Function | None]


class ConflictError(Exception):
    """An optimistic update lost too many races."""


class FencedError(Exception):
    """A controller's write was refused: its fencing token is no longer the lease's
    (a newer leader exists, or the lease ran out)."""


HEARTBEAT_KINDS = ("controller", "gateway")


class Store(Protocol):
    # -- functions (desired state) --------------------------------------------------
    async def get_function(self, name: str) -> Function | None: ...
    async def list_functions(self) -> list[Function]: ...

    async def update_function(self, name: str, mutate: Mutator) -> Function | None:
        """Atomically read-modify-write one function.

        ``mutate`` gets the current record (or None) and returns the new one, or None
        to leave it unchanged. It may be called more than once (optimistic retry), so it
        must be pure. Publishes a ``function`` change when something was written.
        Returns the stored record after the call.
        """
        ...

    async def delete_function(self, name: str) -> bool:
        """Delete a function and its replicas' records; publish a ``deleted`` change."""
        ...

    # -- replicas (actual state, written by the controller only) --------------------
    async def put_replica(self, replica: Replica) -> None: ...
    async def delete_replica(self, function: str, name: str) -> None: ...
    async def list_replicas(self, function: str | None = None) -> list[Replica]: ...

    # -- events ----------------------------------------------------------------------
    async def add_event(self, event: Event) -> None: ...
    async def list_events(self, function: str, limit: int = 50) -> list[Event]:
        """Newest last."""
        ...

    # -- secrets (kept apart from functions; values never in a document or a message) --
    async def put_secret(self, name: str, value: bytes) -> SecretInfo:
        """Create or replace secret ``name`` (version 1, then +1 per set); publish
        ``{"kind": "set", "name", "version"}`` on ``SECRETS``. Returns its metadata."""
        ...

    async def get_secret(self, name: str) -> bytes | None:
        """The value, exactly as put; None if there is no such secret."""
        ...

    async def delete_secret(self, name: str) -> bool:
        """Remove it; publish ``{"kind": "deleted", "name"}`` on ``SECRETS`` if it existed."""
        ...

    async def list_secrets(self) -> list[SecretInfo]:
        """Every secret's metadata, sorted by name; never a value."""
        ...

    # -- installation identity and presence ---------------------------------------------
    async def instance_id(self, default: str | None = None) -> str:
        """The installation's id, created once (``default``, else random) and the same for
        every component of the installation from then on."""
        ...

    async def heartbeat(self, kind: str, member: str, info: dict[str, Any]) -> None:
        """Record that ``member`` (a controller or gateway) is alive, with ``info``."""
        ...

    async def members(self, kind: str, max_age: float) -> list[dict[str, Any]]:
        """Members of ``kind`` whose last heartbeat is at most ``max_age`` s old (older ones
        are forgotten), each its ``info`` plus ``id`` and ``seen`` (epoch seconds)."""
        ...

    # -- bus -------------------------------------------------------------------------
    async def publish(self, channel: str, payload: dict[str, Any]) -> None: ...

    def subscribe(self, channel: str) -> AsyncIterator[dict[str, Any]]:
        """Messages published on ``channel`` after the call, in order, until closed."""
        ...

    async def close(self) -> None: ...
