"""The simulated Kubernetes API server (tests/k8s_sim.py) enforces what the driver relies
on: checked here over HTTP, with no driver in between, so that the driver's tests against
it mean something."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from k8s_sim import SimCluster

NS = "torpor-test"


@pytest.fixture
def sim() -> Iterator[SimCluster]:
    s = SimCluster((NS,), kubelet=False, bookmark_interval=0.2).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def api(sim: SimCluster) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=f"{sim.url}/api/v1/namespaces/{NS}",
        trust_env=False,
        timeout=10,
        headers={"Authorization": f"Bearer {sim.token}"},
    ) as c:
        yield c


def cm(
    name: str, labels: dict[str, str] | None = None, owner: dict[str, Any] | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels or {}}
    if owner:
        meta["ownerReferences"] = [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
            }
        ]
    return {"metadata": meta, "data": {"k": "v"}}


def watch_lines(
    api: httpx.Client, params: dict[str, str], n: int, timeout: float = 10
) -> list[dict[str, Any]]:
    """The first ``n`` events of a watch (or fewer if it ends)."""
    out: list[dict[str, Any]] = []
    with api.stream("GET", "/configmaps", params={"watch": "true", **params}, timeout=timeout) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                out.append(json.loads(line))
            if len(out) >= n:
                break
    return out


def test_a_request_without_the_token_is_401(sim: SimCluster) -> None:
    r = httpx.get(f"{sim.url}/api/v1/namespaces/{NS}/pods", trust_env=False)
    assert r.status_code == 401 and r.json()["reason"] == "Unauthorized"


def test_resource_versions_grow_and_stale_updates_conflict(api: httpx.Client) -> None:
    a = api.post("/configmaps", json=cm("a")).json()
    b = api.post("/configmaps", json=cm("b")).json()
    assert int(b["metadata"]["resourceVersion"]) > int(a["metadata"]["resourceVersion"])
    assert (
        api.get("/configmaps").json()["metadata"]["resourceVersion"]
        == b["metadata"]["resourceVersion"]
    )
    a["data"] = {"k": "new"}
    a2 = api.put("/configmaps/a", json=a)
    assert a2.status_code == 200 and a2.json()["data"] == {"k": "new"}
    assert int(a2.json()["metadata"]["resourceVersion"]) > int(b["metadata"]["resourceVersion"])
    stale = api.put("/configmaps/a", json=a)  # still carries the version before the update
    assert stale.status_code == 409 and stale.json()["reason"] == "Conflict"
    assert "the object has been modified" in stale.json()["message"]


def test_duplicates_conflict_and_missing_objects_are_404(
    api: httpx.Client, sim: SimCluster
) -> None:
    assert api.post("/configmaps", json=cm("a")).status_code == 201
    dup = api.post("/configmaps", json=cm("a"))
    assert dup.status_code == 409 and dup.json()["reason"] == "AlreadyExists"
    for r in (
        api.get("/configmaps/nope"),
        api.delete("/configmaps/nope"),
        api.put("/configmaps/nope", json=cm("nope")),
    ):
        assert r.status_code == 404 and r.json()["reason"] == "NotFound"
    other = httpx.get(
        f"{sim.url}/api/v1/namespaces/elsewhere/pods",
        trust_env=False,
        headers={"Authorization": f"Bearer {sim.token}"},
    )
    assert (
        other.status_code == 404 and 'namespaces "elsewhere" not found' in other.json()["message"]
    )
    pre = api.request("DELETE", "/configmaps/a", json={"preconditions": {"uid": "not-its-uid"}})
    assert pre.status_code == 409 and "Precondition failed" in pre.json()["message"]


def test_invalid_names_and_labels_are_422(api: httpx.Client) -> None:
    assert api.post("/configmaps", json=cm("Not_A_Name")).status_code == 422
    r = api.post("/configmaps", json=cm("a", labels={"torpor.revision": "x" * 64}))
    assert r.status_code == 422 and "63 characters" in r.json()["message"]
    r = api.post("/pods", json={"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}})
    assert r.status_code == 422


def test_objects_that_the_schema_refuses_are_422(api: httpx.Client) -> None:
    """As the API server does: an unknown field or a wrong type is refused by the schema."""
    pod: dict[str, Any] = {
        "metadata": {"name": "p"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "c", "image": "i", "securityContext": {"runAsRoot": False}}],
        },
    }
    r = api.post("/pods", json=pod)
    assert r.status_code == 422 and "runAsRoot" in r.json()["message"], r.text
    pod["spec"]["containers"][0]["securityContext"] = {"runAsNonRoot": True}
    pod["spec"]["terminationGracePeriodSeconds"] = "soon"
    r = api.post("/pods", json=pod)
    assert r.status_code == 422 and "terminationGracePeriodSeconds" in r.json()["message"], r.text
    r = api.post("/configmaps", json={"metadata": {"name": "c"}, "data": {"k": 1}})
    assert r.status_code == 422
    assert api.post("/configmaps", json=cm("fine")).status_code == 201


def test_label_selectors(api: httpx.Client) -> None:
    api.post("/configmaps", json=cm("a", {"app": "x", "tier": "web"}))
    api.post("/configmaps", json=cm("b", {"app": "y"}))
    api.post("/configmaps", json=cm("c", {"app": "x", "tier": "db"}))

    def names(sel: str) -> list[str]:
        r = api.get("/configmaps", params={"labelSelector": sel})
        assert r.status_code == 200, r.text
        return [i["metadata"]["name"] for i in r.json()["items"]]

    assert names("app=x") == ["a", "c"]
    assert names("app==x,tier!=db") == ["a"]
    assert names("app in (x,y),!tier") == ["b"]
    assert names("tier notin (web)") == ["b", "c"]
    assert names("tier") == ["a", "c"]
    assert api.get("/configmaps", params={"labelSelector": "app in x"}).status_code == 400
    assert api.get("/configmaps", params={"fieldSelector": "metadata.name=b"}).json()["items"][0][
        "data"
    ] == {"k": "v"}
    assert api.get("/configmaps", params={"fieldSelector": "data.k=v"}).status_code == 400


def test_a_watch_replays_from_its_version_and_lists_without_one(api: httpx.Client) -> None:
    a = api.post("/configmaps", json=cm("a", {"app": "x"})).json()
    api.post("/configmaps", json=cm("b", {"app": "y"}))
    api.delete("/configmaps/a")
    events = watch_lines(
        api, {"resourceVersion": a["metadata"]["resourceVersion"], "labelSelector": "app=x"}, 1
    )
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("DELETED", "a")]
    events = watch_lines(api, {}, 1)  # no version: what exists, as ADDED
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "b")]


def test_a_live_watch_sees_changes_and_ends_on_its_timeout(
    api: httpx.Client, sim: SimCluster
) -> None:
    rv = api.get("/configmaps").json()["metadata"]["resourceVersion"]
    got: list[dict[str, Any]] = []

    def watch() -> None:
        got.extend(watch_lines(api, {"resourceVersion": rv, "timeoutSeconds": "2"}, 10))

    t = threading.Thread(target=watch)
    t.start()
    deadline = time.monotonic() + 10
    while not sim.watch_requests("configmaps"):  # the watch has reached the API
        assert time.monotonic() < deadline, "the watch never reached the API"
        time.sleep(0.01)
    api.post("/configmaps", json=cm("live"))
    t.join(10)
    assert not t.is_alive(), "timeoutSeconds ends the watch"
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in got] == [("ADDED", "live")]


def test_a_watch_from_a_compacted_version_gets_410(api: httpx.Client, sim: SimCluster) -> None:
    a = api.post("/configmaps", json=cm("a")).json()
    api.post("/configmaps", json=cm("b"))
    sim.compact()
    events = watch_lines(api, {"resourceVersion": a["metadata"]["resourceVersion"]}, 1)
    assert events[0]["type"] == "ERROR"
    assert events[0]["object"]["code"] == 410 and events[0]["object"]["reason"] == "Expired"


def test_bookmarks_only_when_asked(api: httpx.Client) -> None:
    rv = api.post("/configmaps", json=cm("a")).json()["metadata"]["resourceVersion"]
    events = watch_lines(api, {"resourceVersion": rv, "allowWatchBookmarks": "true"}, 1)
    assert (
        events[0]["type"] == "BOOKMARK" and events[0]["object"]["metadata"]["resourceVersion"] == rv
    )
    assert watch_lines(api, {"resourceVersion": rv, "timeoutSeconds": "1"}, 1) == []


def test_the_garbage_collector_follows_owner_references(api: httpx.Client, sim: SimCluster) -> None:
    owner = api.post("/configmaps", json=cm("owner")).json()
    api.post("/configmaps", json=cm("dep1", owner=owner))
    api.post("/configmaps", json=cm("dep2", owner=owner))
    api.post(
        "/configmaps",
        json=cm("dangling", owner={"metadata": {"name": "ghost", "uid": "no-such-uid"}}),
    )
    assert api.delete("/configmaps/owner").status_code == 200

    def left() -> list[str]:
        return [i["metadata"]["name"] for i in api.get("/configmaps").json()["items"]]

    deadline = time.monotonic() + 10
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left() == []
    owner = api.post("/configmaps", json=cm("owner")).json()
    api.post("/configmaps", json=cm("kept", owner=owner))
    api.delete("/configmaps/owner", params={"propagationPolicy": "Orphan"})
    swept = sim.sweeps_after(3)  # an orphan must survive several GC sweeps
    deadline = time.monotonic() + 10
    while not swept():
        assert time.monotonic() < deadline, "the garbage collector stopped sweeping"
        time.sleep(0.01)
    kept = api.get("/configmaps/kept").json()
    assert kept["metadata"].get("ownerReferences") == []


def test_the_kubelet_runs_a_pod_at_an_ip_of_its_own_and_deletes_it_gracefully() -> None:
    code = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (print('term', flush=True), sys.exit(0)));"
        "print('up', flush=True); time.sleep(60)"
    )
    s = SimCluster((NS,), images={"sleeper:1": [sys.executable, "-c", code]}).start()
    try:
        with httpx.Client(
            base_url=f"{s.url}/api/v1/namespaces/{NS}",
            trust_env=False,
            timeout=10,
            headers={"Authorization": f"Bearer {s.token}"},
        ) as api:
            body = {
                "metadata": {"name": "p1"},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{"name": "c", "image": "sleeper:1"}],
                },
            }
            assert api.post("/pods", json=body).status_code == 201
            deadline = time.monotonic() + 10
            pod = api.get("/pods/p1").json()
            while pod["status"].get("phase") != "Running" and time.monotonic() < deadline:
                time.sleep(0.05)
                pod = api.get("/pods/p1").json()
            ip = pod["status"]["podIP"]
            assert ip.startswith("127.") and ip != "127.0.0.1"
            while "up" not in api.get("/pods/p1/log").text and time.monotonic() < deadline:
                time.sleep(0.05)
            gone = api.delete("/pods/p1").json()
            assert (
                gone["metadata"]["deletionTimestamp"]
                and gone["metadata"]["deletionGracePeriodSeconds"] == 5
            )
            while api.get("/pods/p1").status_code != 404 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert api.get("/pods/p1").status_code == 404
            assert api.get("/pods/p1/log").status_code == 404
    finally:
        s.stop()
