"""The Store interface: desired state (functions), actual state (replicas), events,
content-addressed blobs (function sources), and a small message bus (change feed,
pokes, stats) shared by every component.

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
SECRETS = (
    "secrets"  # payload: {"kind": "set"|"deleted", "name": secret, "version": n}, never a value
)

Mutator = Callable[[Function | None], Function | None]


class ConflictError(Exception):
    """An optimistic update lost too many races."""


class FencedError(Exception):
    """A controller's write was refused: its fencing token is no longer the lease's
    (a newer leader exists, or the lease ran out)."""


HEARTBEAT_KINDS = ("controller", "gateway")


class Subscription(Protocol):
    """Messages of one channel, in order: ``async for msg in sub``."""

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]: ...
    async def __anext__(self) -> dict[str, Any]: ...

    async def ready(self) -> None:
        """Return once messages published from now on (anywhere) will be received."""
        ...

    async def aclose(self) -> None: ...


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

    # -- blobs (content-addressed function sources, see torpor.sources) --------------
    async def put_blob(self, sha: str, data: bytes) -> None:
        """Store ``data`` under its sha256 ``sha`` (64 lowercase hex digits). ValueError if
        ``sha`` is malformed or ``data`` does not hash to it. Idempotent; a put of a blob
        already held refreshes its time (see ``list_blobs``)."""
        ...

    async def get_blob(self, sha: str) -> bytes | None:
        """The bytes put under ``sha``; None if there is none (or ``sha`` is malformed)."""
        ...

    async def delete_blob(self, sha: str) -> bool:
        """Remove the blob; True if it existed."""
        ...

    async def list_blobs(self) -> dict[str, float]:
        """Every blob's sha -> Unix time of its last put (for garbage collection)."""
        ...

    async def archive_key(self) -> bytes:
        """The installation's key for archive tokens (``torpor.sources.archive_token``):
        32 random bytes, created by the first caller and the same for every component of
        the installation afterwards. Never in a message or a function document."""
        ...

    # -- bus -------------------------------------------------------------------------
    async def publish(self, channel: str, payload: dict[str, Any]) -> None: ...

    def subscribe(self, channel: str) -> Subscription:
        """Messages published on ``channel`` after the call, in order, until closed."""
        ...

    async def close(self) -> None: ...
