"""GET /v1/functions/NAME/build-log in process: the log kept in a build's closing event,
left out of event listings, and a running build followed over the store's bus."""

from __future__ import annotations

from pathlib import Path

import httpx

from torpor.api.app import ApiConfig, create_app
from torpor.api.buildlog import _follow
from torpor.controller.buildlog import BUILD_LOG, BuildLog
from torpor.model import Event, Function, Revision, Spec
from torpor.store.embedded import EmbeddedStore

TOKEN = "unit-test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def with_function(store: EmbeddedStore, revisions: int = 2) -> None:
    def mutate(cur: Function | None) -> Function:
        fn = Function(name="fn")
        for n in range(1, revisions + 1):
            fn.revisions.append(
                Revision(name=f"fn-{n:05d}", function="fn", number=n, spec=Spec(name="fn"))
            )
        return fn

    await store.update_function("fn", mutate)


async def test_the_closing_event_holds_the_log_and_listings_leave_it_out(tmp_path: Path) -> None:
    store = EmbeddedStore()
    await with_function(store)
    for rev in ("fn-00001", "fn-00002"):
        log = BuildLog(rev)
        for i in range(3):
            log.add(f"{rev} step {i}")
        await store.add_event(Event("fn", "build", f"{rev}: build started", data={"revision": rev}))
        await store.add_event(
            Event("fn", "build", log.finished_message({"size": 2_000_000}), data=log.data())
        )
    app = create_app(store, ApiConfig(state_dir=tmp_path, token=TOKEN))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8081"
    ) as c:
        newest = await c.get("/v1/functions/fn/build-log", headers=AUTH)
        assert newest.status_code == 200 and newest.headers["content-type"].startswith("text/plain")
        assert newest.text.splitlines() == [
            "fn-00002 step 0",
            "fn-00002 step 1",
            "fn-00002 step 2",
            newest.text.splitlines()[-1],
        ]
        assert newest.text.splitlines()[-1].startswith("fn-00002: built in ")
        first = await c.get(
            "/v1/functions/fn/build-log", params={"revision": "fn-00001"}, headers=AUTH
        )
        assert first.text.startswith("fn-00001 step 0\n")
        for params, detail in (({"revision": "fn-00009"}, "no revision"), ({}, None)):
            r = await c.get(
                "/v1/functions/nope/build-log" if detail is None else "/v1/functions/fn/build-log",
                params=params,
                headers=AUTH,
            )
            assert r.status_code == 404
        listed = (await c.get("/v1/functions/fn/events", headers=AUTH)).json()["events"]
        closing = [e for e in listed if "built in" in e["message"]]
        assert len(closing) == 2 and all(
            "log" not in e["data"] and e["data"]["log_lines"] == 3 for e in closing
        )
        described = (await c.get("/v1/functions/fn", headers=AUTH)).json()["events"]
        assert not any("log" in e["data"] for e in described)


async def test_a_running_build_is_followed_until_it_ends() -> None:
    store = EmbeddedStore()
    await with_function(store, revisions=1)
    gen = _follow(store, "fn", "fn-00001")
    assert (await gen.__anext__()).startswith(b"following the build of fn-00001")  # subscribed now
    await store.publish(
        BUILD_LOG, {"function": "fn", "revision": "fn-00001", "line": "Step 1/3 : FROM base"}
    )
    await store.publish(
        BUILD_LOG, {"function": "other", "revision": "other-00001", "line": "not mine"}
    )
    await store.publish(BUILD_LOG, {"function": "fn", "revision": "fn-00001", "line": "x" * 5000})
    await store.publish(BUILD_LOG, {"function": "fn", "revision": "fn-00001", "done": True})
    got = [chunk async for chunk in gen]
    assert got[0] == b"Step 1/3 : FROM base\n" and len(got[1]) == 1001 and len(got) == 2
