"""Who leads, seen from outside: ``GET /v1/status`` and ``torpor status`` on ``torpor up``,
and the controller's probe endpoint (``--health-port``) of two real controllers on a real
Redis, before and during a Redis outage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import free_port
from platform_proc import Torpor

from torpor.up import UpConfig, UpError, check_config

pytestmark = pytest.mark.slow


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except httpx.HTTPError as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def test_status_names_the_leader_of_torpor_up(tmp_path: Path) -> None:
    t = Torpor(tmp_path / "state").start()
    try:
        st = _wait(
            lambda: (lambda s: s if s["leader"] and s["gateways"] else None)(
                t.api_call("GET", "/v1/status").json()
            ),
            10,
            "a leader and a gateway in the status",
        )
        assert st["store"] == "embedded" and st["version"]
        assert st["leader"]["pid"] == t.proc.pid and st["leader"]["token"] >= 1  # type: ignore[union-attr]
        assert [c["role"] for c in st["controllers"]] == ["leader"]
        assert st["gateways"][0]["pid"] == t.proc.pid  # type: ignore[union-attr]
        assert st["counts"] == {"functions": 0, "revisions": {}, "replicas": {}}
        # the installation id an embedded state dir had before is kept
        from torpor.up import legacy_instance

        assert st["instance"] == legacy_instance(t.state_dir)
        out = json.loads(t.cli("status", "-o", "json").stdout)
        assert out["leader"]["id"] == st["leader"]["id"]
        table = t.cli("status").stdout
        assert (
            f"Leader:  {st['leader']['id']}" in table
            and "controller" in table
            and "gateway" in table
        )
        assert f"Controller: {st['leader']['id']} leads" in t.cli("ls").stdout
        assert (
            t.api_call(
                "GET", "/v1/status", headers={"Authorization": "Bearer wrong-token-0123456789"}
            ).status_code
            == 401
        )
    finally:
        t.stop()


def _controller(redis_url: str, state: Path, health: int, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torpor.cli.main",
                "controller",
                "--redis",
                redis_url,
                "--state-dir",
                str(state),
                "--driver",
                "process",
                "--lease-ttl",
                "2",
                "--health-host",
                "127.0.0.1",
            ],
            env={**os.environ, "TORPOR_HEALTH_PORT": str(health)},
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def _probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    r = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2)
    return r.status_code, r.json()


def test_health_endpoint_of_a_leader_and_a_standby(tmp_path: Path) -> None:
    port = free_port()
    rdir = tmp_path / "redis"
    rdir.mkdir()
    redis_proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(rdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    log = tmp_path / "controllers.log"
    h1, h2 = free_port(), free_port()
    procs = []
    try:
        procs.append(_controller(url, tmp_path / "c1", h1, log))
        _wait(
            lambda: _probe(h1, "/readyz") == (200, {"status": "ready", "role": "leader"}),
            30,
            "c1 ready as leader",
        )
        procs.append(_controller(url, tmp_path / "c2", h2, log))
        _wait(
            lambda: _probe(h2, "/readyz") == (200, {"status": "ready", "role": "standby"}),
            30,
            "c2 ready as standby",
        )
        assert _probe(h1, "/healthz")[0] == 200 and _probe(h2, "/healthz")[0] == 200
        assert (
            httpx.get(f"http://127.0.0.1:{h1}/v1/status", timeout=2).status_code == 404
        )  # probes only
        # the store goes away: both stay alive, neither is ready, the leader gives way
        redis_proc.terminate()
        redis_proc.wait(10)
        _wait(
            lambda: _probe(h1, "/readyz")[0] == 503 and _probe(h2, "/readyz")[0] == 503,
            15,
            "not ready without a store",
        )
        assert _probe(h1, "/healthz")[0] == 200 and _probe(h2, "/healthz")[0] == 200
        assert _probe(h1, "/readyz")[1]["role"] == "standby"
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if redis_proc.poll() is None:
            redis_proc.kill()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lease_ttl", 0.1, "--lease-ttl 0.1: expected seconds from 0.5 to 60"),
        ("lease_ttl", float("nan"), "--lease-ttl nan"),
        ("lease_ttl", 600.0, "--lease-ttl 600.0"),
        ("health_port", 0, "--health-port 0: expected a TCP port"),
        ("health_port", 70000, "--health-port 70000"),
    ],
)
def test_bad_lease_and_health_settings_are_refused(
    tmp_path: Path, field: str, value: float, message: str
) -> None:
    cfg = UpConfig(state_dir=tmp_path)
    setattr(cfg, field, value)
    with pytest.raises(UpError, match=message.replace("(", r"\(").replace(".", r"\.")):
        check_config(cfg, frozenset({"controller"}))
