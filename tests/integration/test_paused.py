"""Warm-paused replicas (`torpor up --pause-idle S`): scale to zero freezes the replica
instead of removing it; the next request unpauses it; after S seconds it is removed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from platform_proc import function_copy, torpor_up

pytestmark = pytest.mark.slow


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2]


@pytest.mark.parametrize("driver", ["process", pytest.param("docker", marks=pytest.mark.docker)])
def test_idle_replica_is_paused_then_woken_then_removed(tmp_path: Path, driver: str) -> None:
    with torpor_up(tmp_path / "state", driver=driver, extra=["--pause-idle", "6"]) as t:
        t.deploy(
            function_copy(
                tmp_path, "slow", scale={"idle": "1s"}, env={"SLEEP_MS": "1", "FAIL_RATE": "0"}
            )
        )
        first = t.request("slow").json()
        t.wait_for(lambda: not t.function("slow")["replicas"], 20, "scaled to zero (paused)")
        events = [e["message"] for e in t.function("slow")["events"]]
        assert any("paused" in m for m in events), events
        if driver == "process":
            assert _state(first["pid"]) == "T", "the paused replica's process is stopped (SIGSTOP)"
        else:
            import docker

            from torpor.drivers.docker import INSTANCE, instance_id

            client = docker.from_env()
            mine = {"label": ["torpor.function=slow", f"{INSTANCE}={instance_id(t.state_dir)}"]}
            # a Docker warm-pool replica keeps the pool's labels and is named torpor-REPLICA
            pool = {"label": ["torpor.pool", f"{INSTANCE}={instance_id(t.state_dir)}"]}
            [c] = client.containers.list(all=True, filters=mine) + [
                c
                for c in client.containers.list(all=True, filters=pool)
                if c.name == f"torpor-{first['replica']}"
            ]
            assert c.status == "paused"
        r = t.request("slow")
        assert r.status_code == 200 and r.headers["x-torpor-cold-start"] == "true"
        assert r.json()["replica"] == first["replica"], (
            "the paused replica was woken, not a new one"
        )
        # idle again, and past the pause period: removed for good
        t.wait_for(lambda: not t.function("slow")["replicas"], 20, "scaled to zero again")
        t.wait_for(
            lambda: any("paused too long" in e["message"] for e in t.function("slow")["events"]),
            30,
            "paused replica removed after --pause-idle",
        )
        if driver == "process":
            assert not os.path.exists(f"/proc/{first['pid']}") or _state(first["pid"]) == "Z"
