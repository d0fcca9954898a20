"""Fault drills on both drivers: a replica killed under load, a replica that crash-loops.

The brief's bar: a request accepted by the gateway gets the function's response or a clear
503/504 with Retry-After, never a dropped connection or a bare 502, also when a replica
dies; and a crashing replica is restarted with exponential backoff, never in a tight loop.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from platform_proc import DOMAIN, Torpor, function_copy, torpor_up

pytestmark = pytest.mark.slow


DRIVERS = ["process", pytest.param("docker", marks=pytest.mark.docker)]


def kill_replica(t: Torpor, replica: str) -> None:
    """SIGKILL a replica behind the platform's back: the pid the process driver recorded
    (its state file), or the container (named ``torpor-REPLICA``)."""
    if t.driver == "process":
        os.kill(
            int(json.loads((t.state_dir / "replicas" / f"{replica}.json").read_text())["pid"]),
            signal.SIGKILL,
        )
    else:
        subprocess.run(
            ["docker", "kill", f"torpor-{replica}"], check=True, capture_output=True, timeout=30
        )


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_replica_killed_under_load_loses_no_request_and_is_replaced(
    tmp_path: Path, driver: str
) -> None:
    with torpor_up(tmp_path / "state", driver=driver) as t:
        t.deploy(
            function_copy(
                tmp_path,
                "slow",
                env={"SLEEP_MS": "20", "FAIL_RATE": "0"},
                scale={"min": 2, "max": 2},
            )
        )
        before = t.wait_for(
            lambda: len(t.ready_replicas("slow")) == 2 and t.ready_replicas("slow"),
            15,
            "2 ready replicas",
        )
        victim = before[0]["name"]

        outcomes: list[tuple[int, str, str | None]] = []  # (status, replica or error, retry-after)
        errors: list[str] = []
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(
                base_url=t.gateway, headers={"Host": f"slow.{DOMAIN}"}, timeout=30
            ) as c:
                while not stop.is_set():
                    try:
                        r = c.get("/")
                    except httpx.HTTPError as e:  # a dropped connection: the defect we look for
                        errors.append(repr(e))
                        continue
                    who = r.json().get("replica", "") if r.status_code == 200 else r.text
                    outcomes.append((r.status_code, who, r.headers.get("retry-after")))

        def death_noticed() -> bool:
            events = [e["message"] for e in t.function("slow")["events"]]
            return any(victim in m and ("exited" in m or "vanished" in m) for m in events)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for th in threads:
            th.start()

        try:
            t.wait_for(lambda: len(outcomes) > 20, 30, "the load going")
            served_before_kill = len(outcomes)
            kill_replica(t, victim)
            # the load runs on through the whole window in which the victim can still be
            # picked: until the controller has noticed the death and 20 more were served
            t.wait_for(
                lambda: (
                    sum(1 for s, _, _ in outcomes[served_before_kill:] if s == 200) > 20
                    and death_noticed()
                ),
                30,
                "the death noticed while the survivor serves",
            )
        finally:
            stop.set()
            for th in threads:
                th.join(30)

        assert errors == [], f"connections dropped: {errors[:3]}"
        assert served_before_kill > 20, "the load never got going"
        statuses = {status for status, _, _ in outcomes}
        assert statuses <= {200, 503}, f"unexpected statuses {statuses}"
        failed = [o for o in outcomes if o[0] != 200]
        # GETs are safe to repeat: one the victim swallowed (in flight when it died, or sent
        # to it before the controller noticed; Docker's port proxy keeps accepting for a dead
        # container) is repeated on the survivor, and the victim leaves the gateway's rotation
        assert failed == [], f"{len(failed)} of {len(outcomes)} failed: {failed[:3]}"
        after_kill = outcomes[served_before_kill:]
        assert sum(1 for s, _, _ in after_kill if s == 200) > 20, (
            "the survivor did not keep serving"
        )

        # the controller notices the death and replaces the replica
        now = t.wait_for(
            lambda: len(t.ready_replicas("slow")) == 2 and t.ready_replicas("slow"),
            30,
            "a replacement replica",
        )
        assert victim not in {r["name"] for r in now}
        events = [e["message"] for e in t.function("slow")["events"]]
        assert any(victim in m and ("exited" in m or "vanished" in m) for m in events), events
        assert t.request("slow").status_code == 200


CRASHY = """\
import os
import threading

threading.Timer(float(os.environ.get("LIVE_S", "0.3")), os._exit, (3,)).start()


def handle(request):
    return "alive for a moment\\n"
"""


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_crash_looping_replica_is_restarted_with_exponential_backoff(
    tmp_path: Path, driver: str
) -> None:
    with torpor_up(tmp_path / "state", driver=driver) as t:
        # a healthy revision first, so the crash-looping one is not refused at verification
        fn = function_copy(
            tmp_path, "hello", name="crashy", scale={"min": 1, "max": 1}, env={"LIVE_S": "600"}
        )
        (fn / "handler.py").write_text(CRASHY)
        t.deploy(fn)
        t.wait_for(lambda: t.ready_replicas("crashy"), 30, "a ready replica")
        # now every replica lives ~1 s after import, then exits with code 3
        fn2 = function_copy(
            tmp_path, "hello", name="crashy", scale={"min": 1, "max": 1}, env={"LIVE_S": "1.0"}
        )
        (fn2 / "handler.py").write_text(CRASHY)
        t.deploy(fn2)
        started = time.monotonic()

        def delays() -> list[float]:
            msgs = [e["message"] for e in t.function("crashy")["events"] if e["kind"] == "replica"]
            return [
                float(m)
                for msg in msgs
                if "exited (code 3)" in msg
                for m in re.findall(r"next start in ([0-9.]+)s", msg)
            ]

        got = t.wait_for(lambda: len(delays()) >= 4 and delays(), 60, "four crash events")
        elapsed = time.monotonic() - started
        # each restart waits twice as long as the one before: 0.5, 1, 2, 4 ... (capped)
        assert got[:4] == [0.5, 1.0, 2.0, 4.0], (got, t.function("crashy")["events"])
        assert all(b >= a for a, b in zip(got, got[1:], strict=False)), got
        # four crashes of a ~1 s replica with 0.5+1+2 s of backoff between take > 6 s:
        # a tight loop would have crashed dozens of times in that span
        assert elapsed > 6.0
        assert len(got) <= 6, f"too many restarts in {elapsed:.1f}s: {got}"


def test_a_revision_that_dies_at_import_fails_and_the_previous_one_keeps_serving(
    tmp_path: Path,
) -> None:
    """The process driver's side of the Docker test of the same name: the verification
    replica of a revision whose handler raises at import exits, the revision is marked
    failed with the error, and traffic never leaves the previous revision."""
    with torpor_up(tmp_path / "state") as t:
        t.deploy(function_copy(tmp_path, "hello"))
        crash = function_copy(tmp_path, "hello")
        (crash / "handler.py").write_text("raise RuntimeError('boom at import')\n")
        r = t.cli("deploy", str(crash), check=False)
        assert r.returncode != 0 and "failed" in r.stderr
        fn = t.function("hello")
        rev2 = fn["revisions"][1]
        assert rev2["status"] == "failed" and "boom at import" in rev2["reason"], rev2
        assert fn["traffic"] == [{"revision": "hello-00001", "percent": 100, "tag": None}]
        assert "boom at import" in t.cli("describe", "hello").stdout
        r = t.request("hello")
        assert r.status_code == 200 and r.headers["x-torpor-revision"] == "hello-00001"
        # its replica shows as failed for a while, then goes; a failed revision is not retried
        failed = [x for x in t.function("hello")["replicas"] if x["revision"] == "hello-00002"]
        assert all(x["state"] == "failed" for x in failed), failed
        t.wait_for(
            lambda: (
                not [x for x in t.function("hello")["replicas"] if x["revision"] == "hello-00002"]
            ),
            15,
            "the failed replica's record to go",
        )
        time.sleep(1.5)
        assert not [x for x in t.function("hello")["replicas"] if x["revision"] == "hello-00002"]
