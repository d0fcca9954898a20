"""Revisions, traffic splits, tags and self-judging canary rollouts, end to end on a real
`torpor up` (process driver): real replicas, the real gateway, the real CLI.

Under load (a background thread sending requests all the time), every failed response
must carry ``X-Torpor-Revision`` of the bad revision and be that revision's own 500:
nothing is lost while traffic moves."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from platform_proc import DOMAIN, Torpor, function_copy, torpor_up

pytestmark = pytest.mark.slow

ROLLOUT = {"steps": [25, 50, 100], "interval": "2s", "min_requests": 20}


@pytest.fixture
def up(tmp_path: Path):
    with torpor_up(tmp_path / "state") as t:
        yield t


def count_revisions(gateway: str, name: str, n: int, threads: int = 8) -> collections.Counter[str]:
    """Send ``n`` GETs over ``threads`` keep-alive clients; count X-Torpor-Revision."""
    per = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]

    def worker(k: int) -> collections.Counter[str]:
        seen: collections.Counter[str] = collections.Counter()
        with httpx.Client(timeout=30, headers={"Host": f"{name}.{DOMAIN}"}) as c:
            for _ in range(k):
                r = c.get(gateway + "/")
                assert r.status_code == 200, r.text
                seen[r.headers["x-torpor-revision"]] += 1
        return seen

    total: collections.Counter[str] = collections.Counter()
    with cf.ThreadPoolExecutor(threads) as pool:
        for part in pool.map(worker, per):
            total.update(part)
    return total


@dataclass
class Result:
    t: float
    status: int  # 0: no HTTP response (connection error)
    revision: str | None
    body: str


@dataclass
class Load:
    """Requests without pause from a few threads, each response recorded."""

    gateway: str
    name: str
    threads: int = 4
    results: list[Result] = field(default_factory=list)
    paused: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self) -> None:
        with httpx.Client(timeout=30, headers={"Host": f"{self.name}.{DOMAIN}"}) as c:
            while not self._stop.is_set():
                if self.paused.is_set():
                    time.sleep(0.05)
                    continue
                try:
                    r = c.get(self.gateway + "/")
                    self.results.append(
                        Result(
                            time.monotonic(),
                            r.status_code,
                            r.headers.get("x-torpor-revision"),
                            r.text[:300],
                        )
                    )
                except httpx.HTTPError as e:
                    self.results.append(Result(time.monotonic(), 0, None, repr(e)))
                    time.sleep(0.05)

    def __enter__(self) -> Load:
        for _ in range(self.threads):
            w = threading.Thread(target=self._run, daemon=True)
            w.start()
            self._workers.append(w)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(35)

    def by_revision(self) -> collections.Counter[str | None]:
        return collections.Counter(r.revision for r in self.results)

    def failures(self) -> list[Result]:
        return [r for r in self.results if r.status != 200]


def rollout_of(t: Torpor, name: str) -> dict[str, Any]:
    return t.api_call("GET", f"/v1/functions/{name}/rollout", timeout=10).json()


def rollout_events(t: Torpor, name: str, since: float = 0.0) -> list[str]:
    ev = t.api_call(
        "GET", f"/v1/functions/{name}/events", params={"limit": 200, "since": since}, timeout=10
    ).json()["events"]
    return [e["message"] for e in ev if e["kind"] == "rollout"]


def traffic(t: Torpor, name: str) -> list[tuple[str, int, str | None]]:
    return [(x["revision"], x["percent"], x["tag"]) for x in t.function(name)["traffic"]]


def deploy_slow(
    t: Torpor,
    tmp: Path,
    *args: str,
    fail: str = "0",
    version: str = "1",
    rollout: dict[str, Any] | None = None,
) -> None:
    spec: dict[str, Any] = {"env": {"SLEEP_MS": "20", "FAIL_RATE": fail, "VERSION": version}}
    if rollout is not None:
        spec["rollout"] = rollout
    t.deploy(function_copy(tmp, "slow", **spec), *args)


# -- splits and tags -----------------------------------------------------------------------------
@pytest.mark.parametrize("split", [(90, 10), (50, 50)], ids=["90-10", "50-50"])
def test_weighted_split_is_exact_over_ten_thousand_requests(
    up: Torpor, tmp_path: Path, split: tuple[int, int]
) -> None:
    up.deploy(function_copy(tmp_path, "hello", env={"GREETING": "one"}))
    up.deploy(function_copy(tmp_path, "hello", env={"GREETING": "two"}), "--no-traffic")
    fn = up.function("hello")
    assert [(r["name"], r["status"]) for r in fn["revisions"]] == [
        ("hello-00001", "ready"),
        ("hello-00002", "ready"),
    ]
    assert traffic(up, "hello") == [("hello-00001", 100, None)]  # --no-traffic: not routed
    assert count_revisions(up.gateway, "hello", 200) == {"hello-00001": 200}

    out = up.cli("traffic", "hello", f"hello-00001={split[0]}", f"hello-00002={split[1]}").stdout
    assert f"hello-00001={split[0]}%" in out
    up.wait_for(lambda: traffic(up, "hello")[0][1] == split[0], 10, "traffic applied")
    # the gateway applies the change feed: wait until it routes to the new revision
    up.wait_for(
        lambda: "hello-00002" in count_revisions(up.gateway, "hello", 20, threads=1),
        10,
        "split in the gateway",
    )
    got = count_revisions(up.gateway, "hello", 10_000)
    assert sum(got.values()) == 10_000
    for rev, pct in zip(("hello-00001", "hello-00002"), split, strict=True):
        share = got[rev] / 10_000 * 100
        assert abs(share - pct) <= 2, f"{rev}: {share:.2f}% for {pct}% ({got})"
    # percents must sum to 100; unknown revisions are refused
    bad = up.cli("traffic", "hello", "hello-00001=60", "hello-00002=30", check=False)
    assert bad.returncode != 0 and "sum to 100" in bad.stderr
    bad = up.cli("traffic", "hello", "hello-00009=100", check=False)
    assert bad.returncode != 0 and "hello-00009" in bad.stderr
    desc = up.cli("describe", "hello").stdout
    assert re.search(
        rf"hello-00002\s+ready\s+{split[1]}%\s+age\s+\S+\s+replicas [1-9]\d*/[1-9]", desc
    ), desc
    assert re.search(
        rf"hello-00001\s+ready\s+{split[0]}%\s+age\s+\S+\s+replicas [1-9]\d*/[1-9]", desc
    ), desc


def test_tags_reach_their_revision_even_at_zero_percent(up: Torpor, tmp_path: Path) -> None:
    up.deploy(function_copy(tmp_path, "hello", env={"GREETING": "stable"}))
    up.deploy(
        function_copy(tmp_path, "hello", env={"GREETING": "canary"}),
        "--no-traffic",
        "--tag",
        "canary",
    )
    assert traffic(up, "hello") == [("hello-00001", 100, None), ("hello-00002", 0, "canary")]
    for _ in range(20):
        r = up.request("hello")
        assert r.status_code == 200 and r.headers["x-torpor-revision"] == "hello-00001"
        assert r.text == "stable, world!\n"
    r = up.request("hello", tag="canary")
    assert (
        r.status_code == 200
        and r.headers["x-torpor-revision"] == "hello-00002"
        and r.text == "canary, world!\n"
    )
    assert up.cli("invoke", "hello", "--tag", "canary").stdout == "canary, world!\n"
    # a tag given by hand, on the revision with all the traffic and on the one without
    up.cli(
        "traffic",
        "hello",
        "hello-00001=100",
        "--tag",
        "hello-00001=prod",
        "--tag",
        "hello-00002=beta",
    )
    up.wait_for(lambda: ("hello-00002", 0, "beta") in traffic(up, "hello"), 10, "tags applied")
    up.wait_for(
        lambda: up.request("hello", tag="beta").headers.get("x-torpor-revision") == "hello-00002",
        10,
        "the gateway routes the new tag",
    )
    assert up.request("hello", tag="beta").headers["x-torpor-revision"] == "hello-00002"
    assert up.request("hello", tag="prod").headers["x-torpor-revision"] == "hello-00001"
    gone = up.request("hello", tag="canary")  # the old tag no longer exists
    assert gone.status_code == 404 and gone.json()["error"] == "function not found"


# -- rollouts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deploy-canary", "rollout-to-cold"])
def test_healthy_canary_promotes_itself_without_a_failed_request(
    up: Torpor, tmp_path: Path, how: str
) -> None:
    deploy_slow(up, tmp_path, version="1")
    if (
        how == "rollout-to-cold"
    ):  # the candidate waits at zero replicas: its cold start must not count against it
        deploy_slow(up, tmp_path, "--no-traffic", version="2")
        up.wait_for(
            lambda: all(r["revision"] == "slow-00001" for r in up.function("slow")["replicas"]),
            20,
            "the candidate at zero",
        )
    with Load(up.gateway, "slow") as load:
        up.wait_for(lambda: len(load.results) > 50, 20, "load flowing")
        if how == "deploy-canary":
            # the revision's torpor.yaml carries the rollout policy; deploy --canary watches it to the end
            r = up.cli(
                "deploy",
                str(
                    function_copy(
                        tmp_path,
                        "slow",
                        env={"SLEEP_MS": "20", "FAIL_RATE": "0", "VERSION": "2"},
                        rollout=ROLLOUT,
                    )
                ),
                "--canary",
                "25",
                timeout=60,
            )
        else:
            r = up.cli(
                "rollout",
                "slow",
                "--to",
                "slow-00002",
                "--steps",
                "25,50,100",
                "--interval",
                "2s",
                "--min-requests",
                "20",
                timeout=60,
            )
        # the gateway applies the promotion from the change feed: the load moves over
        up.wait_for(
            lambda: {x.revision for x in load.results[-20:]} == {"slow-00002"},
            20,
            "the load served by slow-00002 alone",
        )
    out = r.stderr
    assert "step 1/3: slow-00002 at 25%" in out, out
    assert "step 2/3: slow-00002 at 50%" in out, out
    assert "promoted slow-00002" in out, out
    ro = rollout_of(up, "slow")
    assert ro["rollout"]["state"] == "promoted" and ro["rollout"]["to"] == "slow-00002"
    assert ro["traffic"] == [{"revision": "slow-00002", "percent": 100, "tag": None}]
    assert load.failures() == [], load.failures()[:5]
    seen = load.by_revision()
    assert seen["slow-00001"] > 0 and seen["slow-00002"] > 0
    tail = [r.revision for r in load.results[-20:]]
    assert set(tail) == {"slow-00002"}
    events = rollout_events(up, "slow")
    assert any("step 2/3" in m and "healthy" in m for m in events), events
    assert any("promoted slow-00002" in m for m in events), events


def test_failing_canary_rolls_back_at_the_first_step_and_stable_keeps_serving(
    up: Torpor, tmp_path: Path
) -> None:
    deploy_slow(up, tmp_path, version="1")
    deploy_slow(up, tmp_path, "--no-traffic", fail="0.3", version="2")
    with Load(up.gateway, "slow") as load:
        up.wait_for(lambda: len(load.results) > 50, 20, "load flowing")
        start = len(load.results)
        r = up.cli(
            "rollout",
            "slow",
            "--to",
            "slow-00002",
            "--steps",
            "25,50,100",
            "--interval",
            "2s",
            "--min-requests",
            "20",
            check=False,
            timeout=60,
        )
        rolled_back_at = len(load.results)
        up.wait_for(lambda: len(load.results) > rolled_back_at + 100, 20, "load after the rollback")
    assert r.returncode == 4, (r.stdout, r.stderr)  # refused by the rollout judgement
    assert "rolled back" in r.stderr and "5xx ratio" in r.stderr, r.stderr
    ro = rollout_of(up, "slow")["rollout"]
    assert ro["state"] == "rolled_back" and ro["step"] == 0, ro
    assert "5xx ratio" in ro["reason"] and ro["reason"].startswith("step 1")
    assert traffic(up, "slow") == [("slow-00001", 100, None)]
    events = rollout_events(up, "slow")
    assert any("rolled back to slow-00001" in m and "5xx ratio" in m for m in events), events
    # every failure is the bad revision's own 500
    failures = load.failures()
    assert failures, "the bad revision failed no request"
    for f in failures:
        assert f.status == 500 and f.revision == "slow-00002", f
        assert '"failed": true' in f.body, f
    assert load.by_revision()["slow-00002"] > 0 and start < rolled_back_at
    # the stable revision keeps serving, alone
    after = load.results[rolled_back_at + 20 :]
    assert after and all(x.status == 200 and x.revision == "slow-00001" for x in after)


def test_a_rollout_survives_a_controller_restart_and_then_promotes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    slow_rollout = {"steps": [25, 50, 100], "interval": "5s", "min_requests": 20}
    t = Torpor(state).start()
    try:
        deploy_slow(t, tmp_path, version="1")
        deploy_slow(t, tmp_path, "--canary", "25", "--no-watch", version="2", rollout=slow_rollout)
        with Load(t.gateway, "slow") as load:
            t.wait_for(
                lambda: rollout_of(t, "slow")["rollout"]["state"] == "running",
                10,
                "rollout running",
            )
            t.wait_for(lambda: load.by_revision()["slow-00002"] >= 10, 20, "canary serving")
            load.paused.set()
            before = rollout_of(t, "slow")["rollout"]
            assert before["state"] == "running" and before["step"] <= 1
        assert t.stop() == 0
    finally:
        t.stop()
    restarted = time.time()
    t2 = Torpor(state).start()
    try:
        after = rollout_of(t2, "slow")["rollout"]
        assert after["state"] == "running" and after["step"] >= before["step"], (before, after)
        assert after["step_started"] == before["step_started"] or after["step"] > before["step"]
        with Load(t2.gateway, "slow") as load2:
            r = t2.cli("rollout", "slow", "--watch", "--timeout", "45", check=False, timeout=60)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert "promoted slow-00002" in r.stderr
        final = rollout_of(t2, "slow")
        assert final["rollout"]["state"] == "promoted"
        assert final["traffic"] == [{"revision": "slow-00002", "percent": 100, "tag": None}]
        assert load2.failures() == [], load2.failures()[:5]
        events = rollout_events(
            t2, "slow", since=restarted
        )  # the restarted controller picked it up
        assert any(f"measuring step {after['step'] + 1}/3" in m for m in events), events
        assert any("promoted slow-00002" in m for m in events), events
    finally:
        t2.stop()


def test_rollout_controls_pause_resume_promote_abort_and_rollback(
    up: Torpor, tmp_path: Path
) -> None:
    deploy_slow(up, tmp_path, version="1")
    deploy_slow(up, tmp_path, "--no-traffic", version="2")
    deploy_slow(up, tmp_path, "--no-traffic", version="3")
    # nothing to control yet
    bad = up.cli("rollout", "slow", "--pause", check=False)
    assert bad.returncode != 0 and "no running or paused rollout" in bad.stderr
    bad = up.cli(
        "rollout", "slow", "--to", "slow-00002", "--steps", "10,50", "--no-watch", check=False
    )
    assert bad.returncode != 0 and "ending with 100" in bad.stderr
    bad = up.cli("rollout", "slow", "--to", "slow-00001", "--no-watch", check=False)
    assert bad.returncode != 0 and "already serves all traffic" in bad.stderr
    # no traffic flows: the rollout waits at its first step until told otherwise
    up.cli(
        "rollout",
        "slow",
        "--to",
        "slow-00002",
        "--steps",
        "10,100",
        "--interval",
        "1s",
        "--no-watch",
    )
    assert traffic(up, "slow") == [("slow-00002", 10, None), ("slow-00001", 90, None)]
    busy = up.cli("rollout", "slow", "--to", "slow-00003", "--no-watch", check=False)
    assert busy.returncode != 0 and "abort it first" in busy.stderr
    assert "paused" in up.cli("rollout", "slow", "--pause").stdout
    assert rollout_of(up, "slow")["rollout"]["state"] == "paused"
    assert "running" in up.cli("rollout", "slow", "--resume").stdout
    status = up.cli("rollout", "slow").stdout
    assert "step 1/2: slow-00002 at 10%" in status
    up.cli("rollout", "slow", "--abort", check=True)
    assert rollout_of(up, "slow")["rollout"]["state"] == "aborted"
    assert traffic(up, "slow") == [("slow-00001", 100, None)]
    up.cli("rollout", "slow", "--to", "slow-00003", "--steps", "50,100", "--no-watch")
    up.cli("rollout", "slow", "--promote")
    assert traffic(up, "slow") == [("slow-00003", 100, None)]
    assert rollout_of(up, "slow")["rollout"]["state"] == "promoted"
    # rollback without a running rollout: back to the promoted rollout's stable revision
    out = up.cli("rollback", "slow").stdout
    assert "rolled back to slow-00001" in out
    assert traffic(up, "slow") == [("slow-00001", 100, None)]
    r = up.request("slow")
    assert r.status_code == 200 and r.headers["x-torpor-revision"] == "slow-00001"
    # rollback during a rollout ends it as rolled_back
    up.cli("rollout", "slow", "--to", "slow-00002", "--steps", "20,100", "--no-watch")
    assert "rolled back to slow-00001" in up.cli("rollback", "slow").stdout
    ro = rollout_of(up, "slow")["rollout"]
    assert ro["state"] == "rolled_back" and ro["reason"] == "rolled back by hand"
    assert traffic(up, "slow") == [("slow-00001", 100, None)]
    assert up.cli("rollback", "slow", check=False).returncode != 0  # nothing older than slow-00001
    spec = up.api_call("GET", "/v1/openapi.json", timeout=5).json()
    assert (
        "/v1/functions/{name}/rollout" in spec["paths"]
        and "/v1/functions/{name}/rollback" in spec["paths"]
    )


def test_retired_revisions_are_garbage_collected_beyond_the_retention(tmp_path: Path) -> None:
    with torpor_up(
        tmp_path / "state", extra=["--keep-revisions", "1"], env={"TORPOR_ARCHIVE_GRACE": "1"}
    ) as t:
        for v in range(1, 5):
            tag = ["--tag", "pinned"] if v == 1 else []  # the tag stays with hello-00001 at 0%
            t.deploy(
                function_copy(tmp_path, "hello", env={"GREETING": f"v{v}"}, scale={"idle": "1s"}),
                *tag,
            )
        assert traffic(t, "hello") == [("hello-00004", 100, None), ("hello-00001", 0, "pinned")]

        def names() -> list[str]:
            return [r["name"] for r in t.function("hello")["revisions"]]

        # 4 serves, 1 is tagged; of the retired 2 and 3, only the newest (3) is kept
        t.wait_for(
            lambda: names() == ["hello-00001", "hello-00003", "hello-00004"],
            30,
            "hello-00002 collected",
        )
        shas = {r["source_sha256"] for r in t.function("hello")["revisions"]}
        assert len(shas) == 3
        # the collected revision's archive leaves the store and the controller's cache
        t.wait_for(
            lambda: {p.name for p in (tmp_path / "state" / "blobs").iterdir()} == shas,
            30,
            "hello-00002's archive removed",
        )
        t.wait_for(
            lambda: {p.name for p in (tmp_path / "state" / "sources-cache").iterdir()} == shas,
            30,
            "hello-00002's unpacked copy removed",
        )
        events = t.api_call(
            "GET", "/v1/functions/hello/events", params={"limit": 200}, timeout=5
        ).json()["events"]
        assert any(e["kind"] == "gc" and "hello-00002" in e["message"] for e in events)
        assert t.request("hello", tag="pinned").text == "v1, world!\n"
