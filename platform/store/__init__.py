"""Stores: where Torpor keeps desired state, actual state, events and its message bus.

``open_store`` picks the implementation: ``RedisStore`` when a Redis URL is given
(distributed mode), otherwise ``EmbeddedStore`` (``torpor up``; durable in
``state_dir``, memory only when ``state_dir`` is None).

The implementations are imported lazily so that importing ``torpor.store`` (or
``torpor.store.base``) does not import the Redis client.
"""

from __future__ import annotations

import re
from pathlib import Path

from torpor.store.base import CHANGES, POKES, SECRETS, STATS, ConflictError, Mutator, Store

__all__ = [
    "CHANGES",
    "POKES",
    "SECRETS",
    "STATS",
    "ConflictError",
    "Mutator",
    "Store",
    "check_name",
    "open_store",
]

# A function name must be safe as a file name (EmbeddedStore keeps one file per
# function) and as part of a Redis key. The spec validator (DNS label) is stricter;
# this is the store's own last line of defence against path tricks.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")


def check_name(name: str, kind: str = "function") -> str:
    """Return ``name`` if it is usable as a store key (of a function, or of ``kind``),
    else raise ValueError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"invalid {kind} name for the store: {name!r}")
    return name


def open_store(*, redis_url: str | None = None, state_dir: Path | None = None) -> Store:
    """A ``RedisStore`` if ``redis_url`` is given, else an ``EmbeddedStore`` on ``state_dir``.

    With a Redis URL the state dir is not used by the store (other parts of
    ``torpor up`` may still keep build artefacts there).
    """
    if redis_url:
        from torpor.store.redis import RedisStore

        return RedisStore(redis_url)
    from torpor.store.embedded import EmbeddedStore

    return EmbeddedStore(state_dir)
