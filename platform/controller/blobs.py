"""Garbage collection of source archives (content-addressed blobs in the store).

A blob lives as long as a revision names it (``Revision.source_sha256``). Once none does
(its revisions were garbage-collected by retention, or their function was deleted), it
is removed. A blob put less than ``grace`` seconds ago is always kept: the API puts a
deploy's blob a moment before it writes the revision that names it, and a put of a blob
already held (the same folder deployed again) refreshes its time. So an upload that never
became a revision (refused late, or its API died in between) goes ``grace`` seconds later,
and nothing a deploy in flight needs is ever removed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from torpor.model import Function
from torpor.store.base import Store

log = logging.getLogger("torpor.controller")

GRACE = 300.0  # s: a blob this fresh is kept even when no revision names it (yet)


def referenced(functions: Iterable[Function]) -> set[str]:
    """Every archive hash a revision of ``functions`` names."""
    return {rev.source_sha256 for fn in functions for rev in fn.revisions if rev.source_sha256}


@dataclass
class Swept:
    gone: list[str] = field(default_factory=list)  # hashes deleted
    due: float | None = None  # Unix time an unnamed blob kept for its grace may go


async def sweep(store: Store, grace: float = GRACE, now: float | None = None) -> Swept:
    """Delete every blob no revision names that was put more than ``grace`` s ago. Reads
    the functions afresh from the store (never a cached copy)."""
    now = time.time() if now is None else now
    out = Swept()
    blobs = await store.list_blobs()
    if not blobs:
        return out
    keep = referenced(await store.list_functions())
    for sha, put_at in blobs.items():
        if sha in keep:
            continue
        if now - put_at < grace:
            out.due = min(out.due or math.inf, put_at + grace)
            continue
        if await store.delete_blob(sha):
            out.gone.append(sha)
    if out.gone:
        log.info("removed %d source archive(s) no revision names", len(out.gone))
    return out
