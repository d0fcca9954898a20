"""The Driver interface: where replicas run. Only the controller calls a driver.

Implementations: ``ProcessDriver`` (local processes) and ``DockerDriver`` (Docker
Engine). Both pass one contract suite (tests/contract/test_driver.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from torpor.model import Revision

Progress = Callable[[str], None]


class BuildError(Exception):
    """Preparing a revision failed; the message is shown to the user."""


def contract_env(revision: Revision) -> dict[str, str]:
    """What the Knative runtime contract promises every replica, next to ``PORT``:
    ``K_SERVICE`` and ``K_CONFIGURATION`` (the function) and ``K_REVISION``. Every
    driver sets these, so a container written for Knative or Cloud Run finds them."""
    return {
        "K_SERVICE": revision.function,
        "K_CONFIGURATION": revision.function,
        "K_REVISION": revision.name,
    }


def runtime_env(revision: Revision) -> dict[str, str]:
    """Settings of the Torpor runtime that follow from the spec of a source function."""
    spec = revision.spec
    if spec.image:
        return {}
    env: dict[str, str] = {}
    if spec.handler_style != "torpor":
        env["TORPOR_HANDLER_STYLE"] = spec.handler_style
    if spec.websocket:
        env["TORPOR_WEBSOCKET"] = spec.websocket
    return env


@dataclass
class Running:
    """One replica as the driver sees it (used to adopt after a restart)."""

    replica: str  # replica name (label torpor.replica)
    function: str  # label torpor.function
    revision: str  # label torpor.revision
    driver_id: str  # pid / container id
    endpoint: str  # host:port it serves on (published on 127.0.0.1)
    alive: bool = True
    exit_code: int | None = None
    labels: dict[str, str] = field(default_factory=dict)


class Driver(Protocol):
    name: str

    async def prepare(self, revision: Revision, progress: Progress | None = None) -> Revision:
        """Make the revision runnable (build its image...). Returns the revision with
        ``image`` filled in where the driver uses one. Raises BuildError."""
        ...

    async def start(
        self, revision: Revision, replica: str, secret_env: Mapping[str, str] | None = None
    ) -> Running:
        """Start one replica; returns at once (readiness is the controller's probe).

        ``secret_env`` is the env the revision's ``secrets:`` resolve to (the controller
        reads the values from the store just before): set it in the replica's env like
        ``spec.env``, and never write it to a record, a label, a log or an error."""
        ...

    async def stop(self, running: Running, grace: float = 10.0) -> None:
        """SIGTERM, wait up to ``grace`` s, then kill; remove what was started."""
        ...

    async def list(self) -> list[Running]:
        """Every replica this driver started (in this run or an earlier one)."""
        ...

    def logs(self, running: Running, follow: bool = False, tail: int = 200) -> AsyncIterator[str]:
        """Lines of the replica's output."""
        ...

    async def remove(self, revision: Revision) -> None:
        """Forget what ``prepare`` made (image of a deleted revision)."""
        ...

    async def close(self) -> None: ...


class Pausable(Protocol):
    """Optional: drivers that can freeze a replica (warm-paused replicas)."""

    async def pause(self, running: Running) -> None: ...
    async def unpause(self, running: Running) -> None: ...


class ReportsReadiness(Protocol):
    """Optional: drivers whose platform already probes replicas (a Pod's readiness probe,
    run by the kubelet). The controller then asks the driver instead of connecting to the
    replica itself, so nothing but the gateways needs to reach a replica (on a cluster, a
    NetworkPolicy lets only the gateways in)."""

    async def wait_ready(self, running: Running, timeout: float) -> bool | None:
        """Wait up to ``timeout`` s for ``running`` to be ready: True once it is, False if
        it is not (yet), None if the driver cannot tell (the controller then probes the
        endpoint itself). Updates ``running.endpoint`` when it learns it."""
        ...
