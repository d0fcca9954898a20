"""The Docker driver's warm pool: generic runtime containers, started before they are needed.

A pool member is a container of the pool image (the generic runtime image of
``runtimeimage.py``, built locally from the base image and tagged by the hash of what is
in it), created and started hardened exactly like a replica (``DockerDriver._hardened``:
same user, capabilities, read-only root, limits, tmpfs) on the pool's own network
(``dockernet``, inter-container traffic off, no connection to the host), with the default
resource class (``Resources()``). It runs ``fetch.pooled_main``: it waits, with no
function in it, for one specialise request carrying the token it was created with.

A cold start takes a member (``Pool.take``) and specialises it: the function's archive
(the normalised archive of its source, ``torpor.sources.pack``; checked against the
revision's ``source_sha256``), its env and secrets go to the member over its published
port; the member checks the hash, extracts with the fetcher's extractor and serves the
handler on the same port. Limits that differ from the class are applied with
``docker update``. A specialised member is a replica for its whole life: never returned
to the pool. Members are labelled ``torpor.pool`` (their Docker labels cannot change once
specialised): which revision a specialised member serves is the controller's replica
record (``Replica.driver_id``), handed back to a restarted driver with ``recall``.

Not pooled (a plain ``docker run`` of the revision's image): ``image:`` functions, and
source functions with a ``requirements.txt`` (their dependencies are installed into the
per-function image, as on a cluster the archive carries none), a port other than the
pool's, ``labels:`` of its own, no CPU or memory limit, or a source that cannot be packed or is over
``MAX_SOURCE`` (the function's files live in the member's tmpfs ``/tmp/fn``).

``TORPOR_DOCKER_POOL`` (default 10) is the number of members kept waiting; 0 turns the
pool off (every start is the plain ``docker run`` of before).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torpor.model import Resources, Revision

log = logging.getLogger("torpor")

POOL_LABEL = "torpor.pool"  # value: the id of the driver (process) that made the member
POOL_FUNCTION = "-pool"  # the pool network's "function": never a valid function name
POOL_PORT = 8080
DEFAULT_SIZE = 10
MAX_SIZE = 100
MAX_PARALLEL = 2  # members created at once by the refill (the engine is shared with starts)
# the largest source (unpacked) a member takes: it is extracted into the member's tmpfs
# /tmp (64 MiB, TMPFS in docker.py), which the function also uses; larger: docker run
MAX_SOURCE = 16 * 1024 * 1024
QUIET = 0.5  # s after the last take before the refill creates members again
SPECIALISE_PATH = "/_torpor/specialise"  # = torpor.runtime.fetch.SPECIALISE_PATH
WAITING_PATH = "/_torpor/pool"  # = torpor.runtime.fetch.WAITING_PATH


class PoolError(Exception):
    """A member could not be specialised; the message says why (never a secret)."""


def pool_size(env: Mapping[str, str] | None = None) -> int:
    """``TORPOR_DOCKER_POOL``: members kept waiting (default 10, 0 = off). Raises ValueError."""
    raw = (os.environ if env is None else env).get("TORPOR_DOCKER_POOL", "").strip()
    if not raw:
        return DEFAULT_SIZE
    if not raw.isascii() or not raw.isdigit() or int(raw) > MAX_SIZE:
        raise ValueError(f"TORPOR_DOCKER_POOL={raw[:40]!r}: expected 0..{MAX_SIZE}")
    return int(raw)


def refill_count(
    size: int,
    idle: int,
    creating: int,
    since_take: float = float("inf"),
    parallel: int = MAX_PARALLEL,
    quiet: float = QUIET,
) -> int:
    """How many members to start creating now: the pool short of ``size`` (counting those
    being created), at most ``parallel`` in flight, and none until ``quiet`` s have passed
    since the last take (a burst's starts do not share the engine and CPUs with the
    refill). Pure."""
    if size <= 0 or since_take < quiet:
        return 0
    missing = size - idle - creating
    return max(0, min(missing, parallel - creating))


def not_pooled(revision: Revision) -> str | None:
    """Why ``revision`` starts with a plain ``docker run`` (None: it can take a member)."""
    spec = revision.spec
    if spec.image:
        return "an image: function"
    if spec.port != POOL_PORT:
        return f"port {spec.port} (the pool's members listen on {POOL_PORT})"
    if not revision.source or not Path(revision.source).is_dir():
        return "no source folder"
    if (Path(revision.source) / "requirements.txt").is_file():
        return "requirements.txt (its dependencies are in the per-function image)"
    if spec.labels:
        return "labels: (a member's Docker labels were fixed when it was made)"
    if spec.resources.cpu <= 0 or spec.resources.memory <= 0:
        return "no CPU or memory limit (a member's limits can be changed, not lifted)"
    return None


def limits_update(resources: Resources) -> dict[str, int]:
    """The ``docker update`` body (Engine API names) taking a member of the default class to
    ``resources`` (empty: the class already fits). Pure."""
    default = Resources()
    out: dict[str, int] = {}
    if resources.cpu != default.cpu:
        out["NanoCpus"] = max(1_000_000, int(resources.cpu * 1e9))
    if resources.memory != default.memory:
        out["Memory"] = int(resources.memory)
        out["MemorySwap"] = int(resources.memory) * 2  # as `docker run --memory` sets it
    return out


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass
class Member:
    """A waiting pool container."""

    container_id: str
    endpoint: str  # host:port published on the loopback
    token: str = field(repr=False)


def is_waiting(endpoint: str, timeout: float = 1.0) -> bool:
    """Whether the member at ``endpoint`` listens and waits (blocking): 204 on
    ``GET /_torpor/pool``. Docker's proxy accepts a connection before the container
    listens, so a started container is not yet a member to hand out."""
    host, _, port = endpoint.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        conn.request("GET", WAITING_PATH)
        return conn.getresponse().status == 204
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def specialise_body(sha256: str, env: Mapping[str, str], archive: bytes) -> bytes:
    """The body of a specialise request: a JSON line, then the archive."""
    meta = json.dumps({"sha256": sha256, "env": dict(env)}, separators=(",", ":"))
    return meta.encode() + b"\n" + archive


def send_specialise(member: Member, body: bytes, timeout: float = 10.0) -> None:
    """POST the specialise request to ``member`` (blocking). Raises PoolError with the
    member's own reason (hash mismatch, archive refused) or the connection's."""
    host, _, port = member.endpoint.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        conn.request(
            "POST",
            SPECIALISE_PATH,
            body=body,
            headers={
                "Authorization": f"Bearer {member.token}",
                "Content-Type": "application/octet-stream",
            },
        )
        resp = conn.getresponse()
        raw = resp.read(4096)
    except (OSError, http.client.HTTPException) as e:
        raise PoolError(f"pool member {member.container_id[:12]} did not answer: {e}") from e
    finally:
        conn.close()
    if resp.status == 200:
        return
    try:
        detail = str(json.loads(raw).get("detail", ""))[:300]
    except (ValueError, AttributeError):
        detail = raw[:300].decode("utf-8", "replace")
    raise PoolError(f"pool member {member.container_id[:12]} refused: HTTP {resp.status}: {detail}")


class Pool:
    """The waiting members of one driver, and their refill in the background.

    ``create`` makes one member (blocking work in a thread is the caller's business);
    ``discard`` removes a container by id. ``take`` never waits: no member idle is a
    plain ``docker run`` for the caller. The refill runs while there is an event loop
    (``start``) and stops with ``close``, which also removes the idle members."""

    def __init__(
        self,
        size: int,
        create: Callable[[], Awaitable[Member]],
        discard: Callable[[str], Awaitable[None]],
    ) -> None:
        self.size = size
        self.idle: list[Member] = []
        self.creating = 0
        self.failures = 0  # consecutive failed creates (backoff)
        self.retry_at = 0.0  # loop time before which no create is tried after a failure
        self._create = create
        self._discard = discard
        self.taken_at = -float("inf")  # loop time of the last take
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._busy: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Begin refilling (idempotent; needs a running loop)."""
        if self.size <= 0 or (self._task is not None and not self._task.done()):
            return
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="docker-pool")

    def take(self) -> Member | None:
        """The oldest idle member (removed from the pool for good), or None."""
        member = self.idle.pop(0) if self.idle else None
        if self._wake is not None:
            self.taken_at = asyncio.get_running_loop().time()
            self._wake.set()
        return member

    def ids(self) -> set[str]:
        return {m.container_id for m in self.idle}

    async def wait_full(self, timeout: float) -> bool:
        """Wait until ``size`` members are idle (tests and benchmarks)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.idle) < self.size:
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            since = loop.time() - self.taken_at
            if since < QUIET:
                await asyncio.sleep(QUIET - since)
                continue
            if self.failures and loop.time() < self.retry_at:  # back off after failures
                await asyncio.sleep(self.retry_at - loop.time())
                continue
            for _ in range(refill_count(self.size, len(self.idle), self.creating, since)):
                self.creating += 1
                task = loop.create_task(self._one())
                self._busy.add(task)
                task.add_done_callback(self._busy.discard)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=5.0)

    async def _one(self) -> None:
        try:
            member = await self._create()
        except Exception as e:
            self.failures += 1
            delay = min(30.0, 0.5 * 2 ** min(self.failures, 6))
            self.retry_at = asyncio.get_running_loop().time() + delay
            log.warning("docker pool: creating a member failed (again in %.0f s): %s", delay, e)
            return
        finally:
            self.creating -= 1
            if self._wake is not None:
                self._wake.set()
        self.failures = 0
        self.idle.append(member)

    async def close(self) -> None:
        """Stop refilling and remove the idle members."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._busy:
            await asyncio.gather(*self._busy, return_exceptions=True)
        idle, self.idle = self.idle, []
        for m in idle:
            try:
                await self._discard(m.container_id)
            except Exception as e:
                log.warning("docker pool: removing member %s failed: %s", m.container_id[:12], e)
