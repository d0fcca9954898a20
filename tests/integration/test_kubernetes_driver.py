"""The kubernetes driver against the simulated API server (tests/k8s_sim.py), beyond the
shared driver contract: owner references and garbage collection, 409s and 404s, watch
resumption, another installation's objects, and the controller running a revision on it.
Pods run for real: the sim's kubelet runs the runtime's fetcher as a local process at a
Pod IP of its own in 127.0.0.0/8."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from archive_server import ArchiveServer
from k8s_sim import SimCluster
from lightkube import KubeConfig
from platform_proc import Torpor, function_copy

from torpor.controller.reconcile import Controller, Settings
from torpor.drivers.base import BuildError
from torpor.drivers.kubernetes import KubernetesDriver, KubernetesError, owner_name, pod_name
from torpor.model import Function, Revision, Scale, Spec, TrafficTarget
from torpor.runtime import fetch
from torpor.store import open_store

NS = "torpor-test"
ARCHIVE_KEY = b"k" * 32
IMAGE = "torpor/runtime:test"
HANDLER = "def handle(request):\n    print('served', request.path, flush=True)\n    return 'hello from a pod'\n"


class Env:
    def __init__(self, tmp: Path, **sim_kw: Any) -> None:
        self.tmp = tmp
        self.sim = SimCluster(
            (NS,), images={IMAGE: [sys.executable, "-s", fetch.__file__]}, **sim_kw
        ).start()
        self.archives = ArchiveServer(
            key=ARCHIVE_KEY
        ).start()  # each Pod must bring its archive's own token
        self.config = KubeConfig.from_dict(self.sim.kubeconfig())
        self.drivers: list[KubernetesDriver] = []
        self._n = 0

    def driver(self, instance: str = "inst-a", **kw: Any) -> KubernetesDriver:
        d = KubernetesDriver(
            instance,
            NS,
            self.config,
            runtime_image=IMAGE,
            archive_url_base=self.archives.base,
            trust_env=False,
            **kw,
        )
        d.use_archive_key(ARCHIVE_KEY)  # as the controller does at start
        self.drivers.append(d)
        return d

    def revision(
        self, fn: str = "hello", number: int = 1, handler: str = HANDLER, **spec_kw: Any
    ) -> Revision:
        self._n += 1
        src = self.tmp / f"src{self._n}"
        src.mkdir()
        (src / "handler.py").write_text(handler)
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
            port = int(s.getsockname()[1])
        spec = Spec(name=fn, port=port, **spec_kw)
        return Revision(
            name=f"{fn}-{number:05d}",
            function=fn,
            number=number,
            spec=spec,
            source=str(src),
            source_sha256=self.archives.add_folder(src),
        )

    async def close(self) -> None:
        for d in self.drivers:
            try:
                for r in await d.list():
                    await d.stop(r, grace=0)
            finally:
                await d.close()
        self.sim.stop()
        self.archives.stop()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path)
    try:
        yield e
    finally:
        await e.close()


async def until(cond: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        await asyncio.sleep(0.05)
    pytest.fail(f"{what} not met within {timeout}s")


async def get(endpoint: str, path: str = "/") -> httpx.Response:
    async with httpx.AsyncClient(trust_env=False) as c:
        return await c.get(f"http://{endpoint}{path}", timeout=10)


async def serving(endpoint: str) -> bool:
    try:
        return (await get(endpoint)).status_code == 200
    except httpx.TransportError:
        return False


async def test_removing_a_revision_lets_the_garbage_collector_delete_its_pods(env: Env) -> None:
    d = env.driver()
    rev = await d.prepare(env.revision())
    a = await d.start(rev, f"{rev.name}-aaaaaa")
    b = await d.start(rev, f"{rev.name}-bbbbbb")
    cm = env.sim.get("configmaps", NS, owner_name(rev.name))
    assert cm is not None
    for r in (a, b):
        pod = env.sim.get("pods", NS, pod_name(r.replica))
        assert (
            pod is not None
            and pod["metadata"]["ownerReferences"][0]["uid"] == cm["metadata"]["uid"]
        )
    await until(lambda: serving(a.endpoint), what="replica a serving")
    await d.remove(rev)  # no stop(): the cluster's garbage collector does it
    assert env.sim.get("configmaps", NS, owner_name(rev.name)) is None
    await until(lambda: not env.sim.objects_of("pods", NS), what="pods garbage-collected")
    assert await d.list() == []
    assert not await serving(a.endpoint)
    await d.remove(rev)  # a second time: 404 is fine


async def test_starting_a_replica_that_exists_adopts_it(env: Env) -> None:
    d = env.driver()
    rev = await d.prepare(env.revision())
    first = await d.start(rev, f"{rev.name}-aaaaaa")
    again = await d.start(
        rev, f"{rev.name}-aaaaaa"
    )  # e.g. a create retried after a lost answer: 409
    assert again.driver_id == first.driver_id and again.endpoint == first.endpoint
    assert len(env.sim.objects_of("pods", NS)) == 1


async def test_starting_over_an_exited_leftover_replaces_it(env: Env) -> None:
    d = env.driver()
    rev = await d.prepare(env.revision(handler="raise SystemExit(3)\n"))
    old = await d.start(rev, f"{rev.name}-aaaaaa")

    async def exited() -> bool:
        return any(not r.alive for r in await d.list())

    await until(exited, what="the replica exited")
    new = await d.start(rev, f"{rev.name}-aaaaaa")
    assert new.driver_id != old.driver_id
    assert [p["metadata"]["uid"] for p in env.sim.objects_of("pods", NS)] == [new.driver_id]


async def test_another_installations_pods_are_neither_listed_nor_touched(env: Env) -> None:
    mine, theirs = env.driver("inst-a"), env.driver("inst-b")
    rev_b = await theirs.prepare(env.revision())
    b = await theirs.start(rev_b, f"{rev_b.name}-aaaaaa")
    assert await mine.list() == []
    await mine.stop(b, grace=0)  # not ours: left alone
    assert [r.driver_id for r in await theirs.list()] == [b.driver_id]
    with pytest.raises(BuildError, match="belongs to another Torpor installation"):
        await mine.prepare(env.revision())  # same revision name: the owner ConfigMap is theirs
    rev_a = Revision.from_dict({**rev_b.to_dict(), "name": "hello-00002", "number": 2})
    await mine.prepare(rev_a)
    with pytest.raises(KubernetesError, match="not started by this Torpor"):
        await mine.start(rev_a, f"{rev_b.name}-aaaaaa")  # a Pod of that name exists: theirs
    await mine.remove(rev_b)  # not ours: stays
    assert env.sim.get("configmaps", NS, owner_name(rev_b.name)) is not None


async def test_stopping_a_gone_pod_or_a_namesake_does_nothing(env: Env) -> None:
    d = env.driver()
    rev = await d.prepare(env.revision())
    r = await d.start(rev, f"{rev.name}-aaaaaa")
    await d.stop(r, grace=0)
    await d.stop(r, grace=0)  # 404
    again = await d.start(rev, f"{rev.name}-aaaaaa")  # a new Pod of the same name
    await d.stop(r, grace=0)  # the old uid: must not delete the new one
    assert [x.driver_id for x in await d.list()] == [again.driver_id]


async def test_a_stale_owner_left_by_an_earlier_function_of_the_same_name_is_replaced(
    env: Env,
) -> None:
    d = env.driver()
    old = await d.prepare(env.revision())
    leftover = await d.start(old, f"{old.name}-aaaaaa")
    cm_old = env.sim.get("configmaps", NS, owner_name(old.name))
    fresh = (
        env.revision()
    )  # same name hello-00001, created later: the function was deleted and made again
    fresh.created = old.created + 100
    d2 = env.driver()
    await d2.prepare(fresh)
    cm_new = env.sim.get("configmaps", NS, owner_name(fresh.name))
    assert cm_old is not None and cm_new is not None
    assert cm_new["metadata"]["uid"] != cm_old["metadata"]["uid"]

    async def leftover_gone() -> bool:
        return all(r.driver_id != leftover.driver_id for r in await d2.list())

    await until(leftover_gone, what="the old revision's Pod garbage-collected")


async def test_a_source_revision_without_an_archive_hash_fails_to_prepare(env: Env) -> None:
    d = env.driver()
    rev = env.revision()
    rev.source_sha256 = None
    with pytest.raises(BuildError, match="no archive hash"):
        await d.prepare(rev)
    nobase = KubernetesDriver(
        "inst-a", NS, env.config, runtime_image=IMAGE, archive_url_base="", trust_env=False
    )
    env.drivers.append(nobase)
    with pytest.raises(BuildError, match="TORPOR_ARCHIVE_URL_BASE"):
        await nobase.prepare(env.revision())
    nokey = KubernetesDriver(
        "inst-a",
        NS,
        env.config,
        runtime_image=IMAGE,
        archive_url_base=env.archives.base,
        trust_env=False,
    )
    env.drivers.append(nokey)
    with pytest.raises(BuildError, match="no archive key"):
        await nokey.prepare(env.revision())


async def test_an_image_that_cannot_be_pulled_is_reported(env: Env) -> None:
    d = env.driver()
    rev = Revision(
        name="img-00001",
        function="img",
        number=1,
        spec=Spec(name="img", image="example.invalid/nope:1"),
    )
    rev = await d.prepare(rev)
    assert rev.image == "example.invalid/nope:1"
    r = await d.start(rev, "img-00001-aaaaaa")

    async def dead() -> Any:
        return next((x for x in await d.list() if not x.alive), None)

    found = await until(dead, what="the Pod reported as not alive")
    assert found.exit_code is None
    lines = [line async for line in d.logs(found)]
    assert any("ErrImagePull" in line and "example.invalid/nope:1" in line for line in lines), lines
    await d.stop(r, grace=5)
    assert await d.list() == []


async def test_a_missing_namespace_is_a_clear_error(env: Env) -> None:
    d = KubernetesDriver(
        "inst-a",
        "no-such-ns",
        env.config,
        runtime_image=IMAGE,
        archive_url_base=env.archives.base,
        trust_env=False,
    )
    d.use_archive_key(ARCHIVE_KEY)
    try:
        with pytest.raises(KubernetesError, match="does namespace no-such-ns exist"):
            await d.prepare(env.revision())
        with pytest.raises(KubernetesError, match="listing Pods: HTTP 404"):
            await d.list()
    finally:
        await d.close()


def scheduled(sim: SimCluster, rev: Revision) -> bool:
    """Whether the sim has scheduled the Pod of replica ``REV-aaaaaa`` (its IP follows
    ``ip_delay`` seconds later)."""
    pod = sim.get("pods", NS, pod_name(f"{rev.name}-aaaaaa"))
    return pod is not None and (pod.get("spec") or {}).get("nodeName") == "sim-node"


async def test_waiting_for_the_ip_resumes_a_cut_watch_from_its_version(tmp_path: Path) -> None:
    e = Env(tmp_path, ip_delay=1.5)
    try:
        d = e.driver()
        rev = await d.prepare(e.revision())
        start = asyncio.create_task(d.start(rev, f"{rev.name}-aaaaaa"))
        await until(lambda: e.sim.watch_requests("pods"), what="the driver watching its Pod")
        created_rv = int(e.sim.watch_requests("pods")[0]["resourceVersion"])
        # the Pod is scheduled (a MODIFIED event) but has no IP yet
        await until(lambda: scheduled(e.sim, rev), what="the Pod scheduled")
        e.sim.cut_watches()  # as an API server restart would
        running = await asyncio.wait_for(start, 20)
        assert running.endpoint.startswith("127.") and running.endpoint.endswith(
            f":{rev.spec.port}"
        )
        watches = e.sim.watch_requests("pods")
        assert len(watches) >= 2
        resumed = watches[1].get("resourceVersion")
        assert (
            resumed is not None and int(resumed) >= created_rv
        )  # resumed, not re-listed from scratch
        assert await until(lambda: serving(running.endpoint), what="the Pod serving")
    finally:
        await e.close()


async def test_waiting_for_the_ip_after_410_gone_rereads_the_pod(tmp_path: Path) -> None:
    e = Env(tmp_path, ip_delay=1.5)
    try:
        d = e.driver()
        rev = await d.prepare(e.revision())
        start = asyncio.create_task(d.start(rev, f"{rev.name}-aaaaaa"))
        await until(lambda: e.sim.watch_requests("pods"), what="the driver watching its Pod")
        await until(lambda: scheduled(e.sim, rev), what="the Pod scheduled")
        e.sim.create(
            "configmaps", NS, {"metadata": {"name": "unrelated"}}
        )  # the version moves on unseen
        e.sim.compact()  # and the driver's is now too old to resume from
        e.sim.cut_watches()
        running = await asyncio.wait_for(start, 20)
        assert running.endpoint.startswith("127.")
        name = pod_name(f"{rev.name}-aaaaaa")
        reads = [q for m, p, q in e.sim.requests if m == "GET" and p.endswith(f"/pods/{name}")]
        assert reads, "after 410 Gone the driver reads the Pod again"
    finally:
        await e.close()


async def test_the_controller_runs_adopts_and_deletes_a_revision_on_the_cluster(
    env: Env, tmp_path: Path
) -> None:
    """End to end with the real controller: build (prepare), a replica whose IP comes after
    start() returned (ip_timeout=0), readiness probed at the Pod IP, adoption by a new
    controller, and deletion through the owner."""
    store = open_store(state_dir=tmp_path / "store")
    rev = env.revision(scale=Scale(min=1))
    assert rev.source_sha256 is not None
    # as the API does on deploy: the archive goes into the store; the Pods' archive server
    # takes tokens made with the store's key (which the controller hands the driver)
    await store.put_blob(rev.source_sha256, env.archives.archives[rev.source_sha256])
    rev.source = None  # nothing but the hash travels
    env.archives.key = await store.archive_key()
    fn = Function(
        name="hello",
        revisions=[rev],
        traffic=[TrafficTarget(revision=rev.name, percent=100)],
        next_number=2,
    )
    await store.update_function("hello", lambda _cur: fn)
    settings = Settings(tick=0.1, startup_timeout=30, drain_grace=2)
    ctl = Controller(store, env.driver(ip_timeout=0.0), settings=settings)
    await ctl.start()
    try:

        async def ready() -> Any:
            reps = [r for r in await store.list_replicas("hello") if r.state == "ready"]
            return reps[0] if reps else None

        rep = await until(ready, timeout=30, what="a ready replica")
        assert rep.endpoint.startswith("127.") and rep.endpoint.endswith(f":{rev.spec.port}")
        assert (await get(rep.endpoint, "/x")).text == "hello from a pod"
        cur = await store.get_function("hello")
        assert cur is not None and cur.revisions[0].status == "ready"
        assert cur.revisions[0].image == IMAGE
    finally:
        await ctl.stop(stop_replicas=False)  # a controller restart leaves its replicas running
    ctl2 = Controller(store, env.driver(), settings=settings)
    await ctl2.start()
    try:
        rep2 = await until(ready, timeout=30, what="the replica adopted")
        assert (rep2.name, rep2.endpoint) == (rep.name, rep.endpoint)
        assert len(env.sim.objects_of("pods", NS)) == 1  # adopted, not started again
        await store.delete_function("hello")
        await until(
            lambda: env.sim.get("configmaps", NS, owner_name(rev.name)) is None,
            timeout=30,
            what="the owner ConfigMap deleted",
        )
        await until(lambda: not env.sim.objects_of("pods", NS), what="no Pods left")
    finally:
        await ctl2.stop()
        await store.close()


def test_torpor_up_runs_the_kubernetes_driver_from_a_kubeconfig(tmp_path: Path) -> None:
    """``torpor up --driver kubernetes --namespace NS`` with KUBECONFIG pointing at the sim:
    the controller lists its Pods there by label at start; a source function deploys, its
    Pod fetches the archive from the real API's /v1/archives with its own read-only token,
    and answers through the gateway."""
    sim = SimCluster((NS,), images={IMAGE: [sys.executable, "-s", fetch.__file__]}).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps(sim.kubeconfig()))  # JSON is YAML
    t = Torpor(
        tmp_path / "state",
        driver="kubernetes",
        extra=["--namespace", NS],
        env={"KUBECONFIG": str(kubeconfig), "TORPOR_RUNTIME_IMAGE": IMAGE},
    )
    t.env["TORPOR_ARCHIVE_URL_BASE"] = f"{t.api}/v1/archives"
    try:
        t.start()

        def listed() -> bool:
            return any(
                m == "GET"
                and p == f"/api/v1/namespaces/{NS}/pods"
                and "torpor.managed=true" in q.get("labelSelector", "")
                and "torpor.instance=" in q.get("labelSelector", "")
                for m, p, q in list(sim.requests)
            )

        t.wait_for(listed, 15, "the controller listing its Pods in the namespace")
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
            port = int(
                s.getsockname()[1]
            )  # free on every address: each Pod listens on it at its own IP
        t.cli(
            "deploy",
            str(function_copy(tmp_path, "hello", port=port, env={"GREETING": "from a pod"})),
            "--wait",
            "60",
        )
        r = t.request("hello", "/?name=cluster", timeout=30)
        assert r.status_code == 200 and r.text == "from a pod, cluster!\n", r.text
        sha = t.function("hello")["revisions"][0]["source_sha256"]
        pod = next(iter(env_of_pods(sim)))
        assert pod["TORPOR_ARCHIVE_URL"] == f"{t.api}/v1/archives/{sha}"
        token = pod["TORPOR_ARCHIVE_TOKEN"]
        assert token.startswith("tpa1.") and token != t.api_headers["Authorization"].split()[1]
        # the Pod's token fetches its own archive and nothing else of the API
        got = httpx.get(
            f"{t.api}/v1/archives/{sha}", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        assert got.status_code == 200
        other = httpx.get(
            f"{t.api}/v1/functions", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        assert other.status_code == 401
        assert "driver=kubernetes" in t.log.read_text()
    finally:
        t.stop()
        sim.stop()


def env_of_pods(sim: SimCluster) -> list[dict[str, str]]:
    """Each Pod's container env (plain values) as the sim holds it."""
    out = []
    for pod in sim.objects_of("pods", NS):
        env = pod["spec"]["containers"][0].get("env", [])
        out.append({e["name"]: e.get("value", "") for e in env})
    return out


def test_torpor_up_without_a_cluster_configuration_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env["KUBECONFIG"] = str(tmp_path / "missing-kubeconfig")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torpor.cli.main",
            "up",
            "--driver",
            "kubernetes",
            "--state-dir",
            str(tmp_path / "state"),
            "--port",
            "0",
            "--api-port",
            "0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "--driver kubernetes: no Kubernetes configuration" in r.stderr


async def test_names_too_long_for_labels_still_fit_the_clusters_rules(env: Env) -> None:
    d = env.driver()
    fn = "f" * 63  # the longest function name: its revision and replica names exceed a label value
    rev = await d.prepare(env.revision(fn=fn))
    replica = f"{rev.name}-abcdef"
    r = await d.start(rev, replica)  # the sim answers 422 to a label value over 63 characters
    pod = env.sim.get("pods", NS, pod_name(replica))
    assert pod is not None and all(len(v) <= 63 for v in pod["metadata"]["labels"].values())
    (listed,) = await d.list()
    assert (listed.function, listed.revision, listed.replica) == (fn, rev.name, replica)
    assert await until(lambda: serving(r.endpoint), what="the Pod serving")


async def test_a_replica_whose_owner_was_deleted_behind_the_drivers_back_gets_a_new_owner(
    env: Env,
) -> None:
    d = env.driver()
    rev = await d.prepare(env.revision())
    old = env.sim.get("configmaps", NS, owner_name(rev.name))
    env.sim.delete("configmaps", NS, owner_name(rev.name))  # e.g. kubectl delete configmap
    r = await d.start(rev, f"{rev.name}-aaaaaa")
    new = env.sim.get("configmaps", NS, owner_name(rev.name))
    assert old is not None and new is not None and new["metadata"]["uid"] != old["metadata"]["uid"]
    pod = env.sim.get("pods", NS, pod_name(r.replica))
    assert (
        pod is not None and pod["metadata"]["ownerReferences"][0]["uid"] == new["metadata"]["uid"]
    )
    assert await until(lambda: serving(r.endpoint), what="the replica serving")
    # several garbage-collector sweeps: a Pod with a live owner stays
    await until(env.sim.sweeps_after(3), what="3 garbage-collector sweeps")
    assert [x.driver_id for x in await d.list()] == [r.driver_id]


# -- readiness without controller->Pod traffic ---------------------------------------------
class _NoDirectProbe:
    """Stands in for the controller's own probe: records each call and fails it, as a
    NetworkPolicy that admits only the gateways would."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, endpoint: str, timeout: float = 1.0) -> bool:
        self.calls.append(endpoint)
        return False


async def _one_replica(
    env: Env, tmp_path: Path, driver: KubernetesDriver, rev: Revision, startup_timeout: float = 30.0
) -> tuple[Any, Controller]:
    store = open_store(state_dir=tmp_path / f"store-{rev.name}-{len(env.drivers)}")
    if rev.source_sha256 is not None:  # as the API does on deploy: only the hash travels
        await store.put_blob(rev.source_sha256, env.archives.archives[rev.source_sha256])
        rev.source = None
        env.archives.key = await store.archive_key()
    fn = Function(
        name=rev.function,
        revisions=[rev],
        traffic=[TrafficTarget(revision=rev.name, percent=100)],
        next_number=rev.number + 1,
    )
    await store.update_function(rev.function, lambda _cur: fn)
    ctl = Controller(
        store, driver, settings=Settings(tick=0.1, startup_timeout=startup_timeout, drain_grace=1)
    )
    await ctl.start()
    return store, ctl


async def test_the_controller_takes_readiness_from_the_pods_ready_condition_and_never_connects_to_it(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart's default NetworkPolicy lets only gateways reach function Pods: the
    controller must judge a replica ready from the kubelet's Ready condition, read through
    the API server, without a connection of its own to the Pod."""
    import torpor.controller.replicas as replicas  # where the controller probes

    probe = _NoDirectProbe()
    monkeypatch.setattr(replicas, "probe_once", probe)
    rev = env.revision(scale=Scale(min=1))
    store, ctl = await _one_replica(env, tmp_path, env.driver(), rev)
    try:

        async def ready() -> Any:
            reps = [r for r in await store.list_replicas("hello") if r.state == "ready"]
            return reps[0] if reps else None

        rep = await until(ready, timeout=30, what="a ready replica")
        pod = env.sim.get("pods", NS, pod_name(rep.name))
        assert pod is not None
        assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "True"
        assert rep.endpoint == f"{pod['status']['podIP']}:{rev.spec.port}"
        assert (
            await get(rep.endpoint, "/x")
        ).text == "hello from a pod"  # the "gateway" reaches it
        assert probe.calls == []
        # the driver watched the Pod (from a resourceVersion) rather than polling it
        assert any(
            f"metadata.name={pod_name(rep.name)}" in q.get("fieldSelector", "")
            and q.get("resourceVersion")
            for q in env.sim.watch_requests()
        )
    finally:
        await ctl.stop()
        await store.close()


async def test_a_running_pod_that_never_turns_ready_fails_its_revision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Running is not ready: an image whose port never answers keeps the Pod's Ready
    condition False, and the revision fails on the startup timeout."""
    import torpor.controller.replicas as replicas  # where the controller probes

    monkeypatch.setattr(replicas, "probe_once", _NoDirectProbe())
    e = Env(tmp_path)
    e.sim.images["sleeper:1"] = [sys.executable, "-c", "import time; time.sleep(120)"]
    try:
        spec = Spec(name="sleepy", image="sleeper:1", port=8080, scale=Scale(min=1))
        rev = Revision(name="sleepy-00001", function="sleepy", number=1, spec=spec)
        store, ctl = await _one_replica(e, tmp_path, e.driver(), rev, startup_timeout=3.0)
        try:

            async def failed() -> Any:
                fn = await store.get_function("sleepy")
                return fn is not None and fn.revisions[0].status == "failed" and fn.revisions[0]

            got = await until(failed, timeout=30, what="the revision failed")
            assert "not ready within 3s" in got.reason
            assert not [r for r in await store.list_replicas("sleepy") if r.state == "ready"]
        finally:
            await ctl.stop()
            await store.close()
    finally:
        await e.close()


async def test_direct_readiness_lets_the_controller_probe_pod_ips_itself(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TORPOR_K8S_READINESS=direct (with networkPolicy.functionsFromController): the driver
    leaves readiness to the controller's own probe of the Pod IP."""
    import torpor.controller.replicas as replicas  # where the controller probes

    real = replicas.probe_once
    seen: list[str] = []

    async def recording(endpoint: str, timeout: float = 1.0) -> bool:
        seen.append(endpoint)
        return await real(endpoint, timeout)

    monkeypatch.setattr(replicas, "probe_once", recording)
    monkeypatch.setenv("TORPOR_K8S_READINESS", "direct")
    rev = env.revision(scale=Scale(min=1))
    store, ctl = await _one_replica(env, tmp_path, env.driver(), rev)
    try:

        async def ready() -> Any:
            reps = [r for r in await store.list_replicas("hello") if r.state == "ready"]
            return reps[0] if reps else None

        rep = await until(ready, timeout=30, what="a ready replica")
        assert rep.endpoint in seen
    finally:
        await ctl.stop()
        await store.close()


def test_readiness_and_pull_settings_from_the_env_are_checked(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORPOR_K8S_READINESS", "sometimes")
    with pytest.raises(KubernetesError, match="TORPOR_K8S_READINESS='sometimes'"):
        env.driver()
    monkeypatch.delenv("TORPOR_K8S_READINESS")
    monkeypatch.setenv("TORPOR_RUNTIME_PULL_POLICY", "Maybe")
    with pytest.raises(KubernetesError, match="TORPOR_RUNTIME_PULL_POLICY='Maybe'"):
        env.driver()
    monkeypatch.setenv("TORPOR_RUNTIME_PULL_POLICY", "Always")
    monkeypatch.setenv("TORPOR_IMAGE_PULL_SECRETS", "regcred, Bad_Name")
    with pytest.raises(KubernetesError, match="'Bad_Name' is not a Secret name"):
        env.driver()
    monkeypatch.setenv("TORPOR_IMAGE_PULL_SECRETS", "regcred,mirror.creds")
    d = env.driver()
    assert d.settings.runtime_pull_policy == "Always"
    assert d.settings.image_pull_secrets == ("regcred", "mirror.creds")


# -- RBAC: the chart's Role is exactly what the driver does --------------------------------
_SIM_PATH = re.compile(
    r"^/api/v1/namespaces/[^/]+/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[a-z]+))?)?$"
)


def _verbs_used(requests: list[tuple[str, str, dict[str, str]]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of each request the simulation received, in RBAC terms."""
    used: set[tuple[str, str, str]] = set()
    for method, path, query in requests:
        m = _SIM_PATH.match(path)
        assert m, f"a request outside the namespaced core API: {method} {path}"
        resource = m["plural"] + (f"/{m['sub']}" if m["sub"] else "")
        if method == "GET":
            verb = (
                "watch" if query.get("watch") in ("true", "1") else "get" if m["name"] else "list"
            )
        else:
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
        used.add(("", resource, verb))
    return used


async def test_the_charts_role_grants_exactly_the_verbs_the_driver_uses(env: Env) -> None:
    """Every driver operation runs against the simulation, which records each request; the
    verbs they need, mapped as RBAC maps them, are exactly those the chart's Role grants:
    a driver change that needs a new verb fails here until the Role follows."""
    from chart_tools import one, render

    d = env.driver()
    rev = await d.prepare(env.revision())  # owner: get, create
    r = await d.start(rev, f"{rev.name}-aaaaaa")  # Pod: create, watch
    assert await until(lambda: d.wait_ready(r, 2.0), what="ready")  # get, watch
    await d.start(rev, f"{rev.name}-aaaaaa")  # 409: get the existing Pod
    await d.list()
    _ = [line async for line in d.logs(r, tail=5)]  # pods/log
    await d.stop(r, grace=0)  # get, delete, watch
    stale = env.revision()  # same revision name, another function instance: replace the owner
    stale.created += 1
    await d.prepare(stale)  # configmap: delete, watch
    await d.remove(stale)
    used = _verbs_used(list(env.sim.requests))

    role = one(render(), "Role", "torpor-controller")
    granted = {
        (g, res, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for res in rule["resources"]
        for v in rule["verbs"]
    }
    assert used == granted, (
        f"used but not granted: {sorted(used - granted)}; granted but unused: "
        f"{sorted(granted - used)}"
    )
