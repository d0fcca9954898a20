"""Who judges a replica ready: a driver that reports readiness (the kubernetes driver,
from the Pod's Ready condition) is asked instead of the controller connecting to the
replica; a driver that cannot tell, or has no such method, leaves it to the probe."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
from fakes import NullDriver

import torpor.controller.replicas as replicas
from torpor.controller.reconcile import Controller
from torpor.drivers.base import Running
from torpor.model import Revision
from torpor.store.embedded import EmbeddedStore


class RecordingDriver(NullDriver):
    name = "recording"

    async def start(
        self, revision: Revision, replica: str, secret_env: Mapping[str, str] | None = None
    ) -> Running:
        raise RuntimeError("not used here")


class ReportingDriver(RecordingDriver):
    def __init__(
        self, answers: list[bool | None | Exception], endpoint: str = "10.0.0.7:8080"
    ) -> None:
        super().__init__()
        self.answers = answers
        self.endpoint = endpoint
        self.asked: list[float] = []

    async def wait_ready(self, running: Running, timeout: float) -> bool | None:
        self.asked.append(timeout)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if answer:
            running.endpoint = self.endpoint
        return answer


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []

    async def probe(endpoint: str, timeout: float = 1.0) -> bool:
        seen.append(endpoint)
        return True

    monkeypatch.setattr(replicas, "probe_once", probe)
    return seen


def _running(endpoint: str = "") -> Running:
    return Running(
        replica="hello-00001-abc",
        function="hello",
        revision="hello-00001",
        driver_id="uid",
        endpoint=endpoint,
    )


async def test_a_reporting_driver_is_asked_and_the_replica_is_never_probed(
    tmp_path: Path, probes: list[str]
) -> None:
    driver = ReportingDriver([False, RuntimeError("API server unreachable"), True])
    ctl = Controller(EmbeddedStore(tmp_path), driver)
    running = _running()
    deadline = ctl.clock() + 30
    assert await ctl._probe(running, deadline) is False
    assert await ctl._probe(running, deadline) is False  # an error is "not ready yet", not a crash
    assert await ctl._probe(running, deadline) is True
    assert running.endpoint == "10.0.0.7:8080"  # learnt from the driver
    assert probes == []
    assert all(
        0 < t <= 1.0 for t in driver.asked
    )  # short waits: the caller's deadline stays in charge


async def test_ready_without_an_endpoint_is_not_ready(tmp_path: Path, probes: list[str]) -> None:
    driver = ReportingDriver([True], endpoint="")
    ctl = Controller(EmbeddedStore(tmp_path), driver)
    assert await ctl._probe(_running(), ctl.clock() + 30) is False


async def test_a_driver_that_cannot_tell_leaves_it_to_the_probe(
    tmp_path: Path, probes: list[str]
) -> None:
    ctl = Controller(EmbeddedStore(tmp_path), ReportingDriver([None]))
    assert await ctl._probe(_running("10.0.0.9:8080"), ctl.clock() + 30) is True
    assert probes == ["10.0.0.9:8080"]
    plain = Controller(EmbeddedStore(tmp_path / "b"), RecordingDriver())  # no wait_ready at all
    assert await plain._probe(_running("10.0.0.8:8080"), plain.clock() + 30) is True
    assert (
        await plain._probe(_running(""), plain.clock() + 30) is False
    )  # no endpoint yet: not probed
    assert probes == ["10.0.0.9:8080", "10.0.0.8:8080"]
