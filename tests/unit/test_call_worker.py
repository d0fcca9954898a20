"""The call worker's attempt rule with a fake gateway (a stand-in ASGI app that answers
as a replica or as the gateway itself): refusals that never reached a replica cost no
attempt, 5xx answers do until max_attempts, 4xx is final."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from torpor.gateway import calls as calls_mod
from torpor.gateway.callback import Allow
from torpor.gateway.calls import CallWorker
from torpor.model import AsyncPolicy, Call, Function, Revision, Spec, TrafficTarget, new_id
from torpor.store.callq import EmbeddedCallQueue


class FakeGateway:
    """Answers from ``script``: (status, reached a replica) per try, then 200 from a replica."""

    def __init__(self, script: list[tuple[int, bool]], policy: AsyncPolicy) -> None:
        self.id = "gw-test"
        self.domain = "torpor.localhost"
        self.script = list(script)
        self.seen: list[dict[str, str]] = []
        spec = Spec(name="f", async_calls=policy)
        fn = Function(
            name="f",
            revisions=[Revision(name="f-00001", function="f", number=1, spec=spec)],
            traffic=[TrafficTarget("f-00001", 100)],
        )

        async def get_function(name: str) -> Function | None:
            return fn if name == "f" else None

        self.store = SimpleNamespace(get_function=get_function)
        self.table = SimpleNamespace(
            functions={"f": SimpleNamespace(slots=[SimpleNamespace(held_at_zero=False)])}
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        assert (await receive())["type"] == "http.request"
        status, reached = self.script.pop(0) if self.script else (200, True)
        headers = [(b"x-torpor-revision", b"f-00001")] if reached else []
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok" if status < 400 else b"no"})


async def run(script: list[tuple[int, bool]], max_attempts: int = 3) -> tuple[Call, FakeGateway]:
    gw = FakeGateway(script, AsyncPolicy(concurrency=2, max_attempts=max_attempts))
    q = EmbeddedCallQueue(None)
    worker = CallWorker(gw, q, Allow.parse(None))  # type: ignore[arg-type]
    call = Call(id=new_id(), function="f", body=b"x")
    await q.put(call)
    [held] = await q.claim("f", 1, 2, worker.consumer)
    await worker._run_call(held)
    got = await q.get(call.id)
    assert got is not None
    return got, gw


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calls_mod, "backoff", lambda n: 0.0)


async def test_gateway_refusals_cost_no_attempt() -> None:
    call, gw = await run([(504, False), (503, False), (503, False), (503, False), (500, True)])
    assert (call.state, call.status, call.attempts, call.tries) == ("done", 200, 2, 6)
    # the attempt header counts attempts that reached a replica, the id stays
    assert [h["x-torpor-attempt"] for h in gw.seen] == ["1", "1", "1", "1", "1", "2"]
    assert {h["x-call-id"] for h in gw.seen} == {call.id}


async def test_5xx_from_a_replica_fails_after_max_attempts() -> None:
    call, gw = await run([(500, True), (502, True), (504, True), (200, True)], max_attempts=3)
    assert (call.state, call.status, call.attempts, call.result_body) == ("failed", 504, 3, b"no")
    assert len(gw.seen) == 3


async def test_4xx_is_final_at_once() -> None:
    call, gw = await run([(404, True)])
    assert (call.state, call.status, call.attempts) == ("done", 404, 1)
    assert len(gw.seen) == 1


async def test_a_deleted_function_fails_its_calls() -> None:
    gw = FakeGateway([], AsyncPolicy())
    q = EmbeddedCallQueue(None)
    worker = CallWorker(gw, q, Allow.parse(None))  # type: ignore[arg-type]
    call = Call(id=new_id(), function="gone", body=b"")
    await q.put(call)
    [held] = await q.claim("gone", 1, 1, worker.consumer)
    await worker._run_call(held)
    got = await q.get(call.id)
    assert got is not None and (got.state, got.error) == ("failed", "function deleted")
    assert gw.seen == []
