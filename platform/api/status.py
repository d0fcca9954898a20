"""``GET /v1/status``: who leads, who stands by, which gateways run, and what the store holds.

Built from the controller lease (``torpor.lease``) and the heartbeats controllers and
gateways write into the store (``Store.heartbeat`` / ``members``), so any API process of
the installation answers the same, whichever host it runs on.
"""

from __future__ import annotations

import time
from collections import Counter
from importlib import metadata
from typing import Any

from torpor.lease import Lease
from torpor.store.base import Store

SEEN_FOR = 15.0  # s: a member whose last heartbeat is older is no longer listed


def version() -> str:
    try:
        return metadata.version("torpor")
    except metadata.PackageNotFoundError:
        return "unknown"


async def status(store: Store, lease: Lease | None, store_kind: str) -> dict[str, Any]:
    now = time.time()
    controllers = await store.members("controller", SEEN_FOR)
    gateways = await store.members("gateway", SEEN_FOR)
    current = await lease.current() if lease is not None else None
    leader: dict[str, Any] | None = None
    if current is not None:
        beat: dict[str, Any] = next(
            (
                c
                for c in controllers
                if c.get("id") == current.holder and c.get("token") == current.token
            ),
            {},
        )
        leader = {
            "id": current.holder,
            "host": beat.get("host"),
            "pid": beat.get("pid"),
            "since": beat.get("since"),
            "token": current.token,
            "lease_expires_in": round(current.expires_in, 3),
        }
    functions = await store.list_functions()
    replicas = await store.list_replicas()
    revisions = Counter(rev.status for fn in functions for rev in fn.revisions)

    def member(m: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in m.items() if k != "seen"}
        out["last_heartbeat"] = m.get("seen")
        out["age"] = round(max(0.0, now - float(m.get("seen") or now)), 3)
        return out

    return {
        "version": version(),
        "store": store_kind,
        "instance": await store.instance_id(),
        "leader": leader,
        "controllers": [member(c) for c in controllers],
        "gateways": [member(g) for g in gateways],
        "counts": {
            "functions": len(functions),
            "revisions": dict(sorted(revisions.items())),
            "replicas": dict(sorted(Counter(r.state for r in replicas).items())),
        },
    }
