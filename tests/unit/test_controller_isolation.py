"""The controller's pass isolates a failing function: the others keep reconciling, and
the failure is one `error` event (not one per tick). A recording driver stands in for a
real one (its starts fail at once, which is all the pass needs to show it acted)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping

import pytest
from fakes import Clock, NullDriver

from torpor.controller.reconcile import ERROR_EVENT_EVERY, Controller, Settings
from torpor.drivers.base import Running
from torpor.model import Function, Revision, ScaleOverride, Spec, TrafficTarget
from torpor.store.embedded import EmbeddedStore


class RecordingDriver(NullDriver):
    name = "recording"

    def __init__(self) -> None:
        self.started: list[str] = []

    async def start(
        self, revision: Revision, replica: str, secret_env: Mapping[str, str] | None = None
    ) -> Running:
        self.started.append(revision.name)
        raise RuntimeError("no engine here")


def _ready_fn(name: str, scale: ScaleOverride) -> Function:
    rev = Revision(
        name=f"{name}-00001",
        function=name,
        number=1,
        spec=Spec(name=name),
        status="ready",
        image="img",
    )
    return Function(name=name, revisions=[rev], traffic=[TrafficTarget(rev.name, 100)], scale=scale)


async def _events(store: EmbeddedStore, name: str, kind: str) -> list[str]:
    return [e.message for e in await store.list_events(name, 200) if e.kind == kind]


async def test_one_poisoned_function_does_not_stop_the_pass_for_the_others() -> None:
    store = EmbeddedStore(None)
    driver = RecordingDriver()
    clock = Clock()
    ctl = Controller(store, driver, settings=Settings(backoff_base=1000.0), clock=clock)  # type: ignore[arg-type]
    # sorted first, so a pass that stops at it never reaches the others; min 1 makes the
    # pass ask the autoscaler, which refuses a NaN target (as stored before validation)
    ctl.functions = {
        "abad": _ready_fn("abad", ScaleOverride(min=1, target=math.nan)),
        "good": _ready_fn("good", ScaleOverride(min=1)),
    }
    ctl.synced.set()
    for _ in range(5):
        await ctl.reconcile()
        clock.now += 1.0
    await asyncio.sleep(0.05)  # the start tasks and event writes run
    assert "good-00001" in driver.started, (
        "the function after the poisoned one was never reconciled"
    )
    assert "abad-00001" not in driver.started
    errors = await _events(store, "abad", "error")
    assert len(errors) == 1, errors  # five failing passes, one event
    assert "scale.target" in errors[0] and "nan" in errors[0] and "ValueError" in errors[0]
    assert not await _events(store, "good", "error")

    # a new message is reported, but not more often than ERROR_EVENT_EVERY
    ctl.functions["abad"] = _ready_fn("abad", ScaleOverride(min=1, target=math.inf))
    await ctl.reconcile()
    await asyncio.sleep(0.01)
    assert len(await _events(store, "abad", "error")) == 1
    clock.now += ERROR_EVENT_EVERY
    await ctl.reconcile()
    await asyncio.sleep(0.01)
    errors = await _events(store, "abad", "error")
    assert len(errors) == 2 and "inf" in errors[1]

    # fixed: reconciles again, and says so once
    ctl.functions["abad"] = _ready_fn("abad", ScaleOverride(min=1))
    await ctl.reconcile()
    await ctl.reconcile()
    await asyncio.sleep(0.05)
    assert "abad-00001" in driver.started
    assert len(await _events(store, "abad", "controller")) == 1
    await store.close()


async def test_a_poke_for_a_poisoned_function_is_reported_and_stats_for_others_still_count() -> (
    None
):
    store = EmbeddedStore(None)
    ctl = Controller(store, RecordingDriver(), clock=Clock())  # type: ignore[arg-type]
    ctl.functions = {
        "abad": _ready_fn("abad", ScaleOverride(target=math.nan)),
        "good": _ready_fn("good", ScaleOverride()),
    }
    ctl._on_poke({"function": "abad", "revision": "abad-00001", "queued": 1, "gateway": "g"})
    await asyncio.sleep(0.01)
    errors = await _events(store, "abad", "error")
    assert len(errors) == 1 and errors[0].startswith("controller: waking abad failed: ValueError")
    # one gateway report carrying both: the good revision is still recorded
    report = {
        "gateway": "g",
        "revisions": {
            "abad-00001": {"concurrency": 3.0, "requests": 3},
            "good-00001": {"concurrency": 2.0, "requests": 2},
        },
    }
    ctl._on_stats(report)
    assert "good-00001" in ctl.autoscaler.fresh and "abad-00001" not in ctl.autoscaler.fresh
    await store.close()


@pytest.mark.parametrize(
    "bad",
    [
        {"concurrency": "x", "requests": 1},
        {"requests": 1},
        {"concurrency": 1.0, "requests": "many"},
    ],
)
def test_a_malformed_report_entry_is_skipped_alone(bad: dict[str, object]) -> None:
    ctl = Controller(EmbeddedStore(None), RecordingDriver(), clock=Clock())  # type: ignore[arg-type]
    ctl.functions = {
        "good": _ready_fn("good", ScaleOverride()),
        "other": _ready_fn("other", ScaleOverride()),
    }
    ctl.autoscaler.observe(
        {
            "gateway": "g",
            "revisions": {"other-00001": bad, "good-00001": {"concurrency": 1.0, "requests": 1}},
        },
        ctl._scale_of,
    )
    assert ctl.autoscaler.fresh == {"good-00001"}
