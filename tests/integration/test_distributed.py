"""Distributed mode: one controller, one API and two gateways as separate processes
sharing a real Redis. Pokes, stats, route changes and replica logs all cross Redis."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import free_port
from platform_proc import DOMAIN, function_copy

pytestmark = pytest.mark.slow


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "torpor.cli.main", *args], stdout=f, stderr=subprocess.STDOUT
        )


def _wait_http(
    url: str, procs: list[subprocess.Popen[bytes]], log: Path, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"a component exited:\n{log.read_text()[-3000:]}"
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise AssertionError(f"{url} did not answer:\n{log.read_text()[-3000:]}")


def test_controller_api_and_two_gateways_share_redis(tmp_path: Path, redis_url: str) -> None:
    state, log = tmp_path / "state", tmp_path / "components.log"
    api_port, gw1, gw2 = free_port(), free_port(), free_port()
    common = ["--redis", redis_url, "--state-dir", str(state)]
    procs = [
        _start(["controller", *common, "--driver", "process"], log),
        _start(["api", *common, "--api-port", str(api_port), "--port", str(gw1)], log),
        _start(["gateway", *common, "--port", str(gw1)], log),
        _start(["gateway", *common, "--port", str(gw2)], log),
    ]
    try:
        api = f"http://127.0.0.1:{api_port}"
        for url in (
            f"{api}/healthz",
            f"http://127.0.0.1:{gw1}/healthz",
            f"http://127.0.0.1:{gw2}/healthz",
        ):
            _wait_http(url, procs, log)
        # the API wrote its token to STATE_DIR/token before answering /healthz
        auth = {"Authorization": f"Bearer {(state / 'token').read_text().strip()}"}
        folder = function_copy(
            tmp_path, "slow", scale={"idle": "2s"}, env={"SLEEP_MS": "1", "FAIL_RATE": "0"}
        )
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "torpor.cli.main",
                "--api",
                api,
                "--state-dir",
                str(state),
                "deploy",
                str(folder),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        headers = {"Host": f"slow.{DOMAIN}"}
        for port in (gw1, gw2):
            r = httpx.get(f"http://127.0.0.1:{port}/", headers=headers, timeout=30)
            assert r.status_code == 200 and r.headers["x-torpor-revision"] == "slow-00001"
        # idle -> zero, then a cold start through the second gateway: its poke crosses Redis
        deadline = time.monotonic() + 30
        while httpx.get(f"{api}/v1/functions/slow", headers=auth, timeout=5).json()["replicas"]:
            assert time.monotonic() < deadline, "no scale to zero"
            time.sleep(0.2)
        r = httpx.get(f"http://127.0.0.1:{gw2}/", headers=headers, timeout=30)
        assert r.status_code == 200 and r.headers["x-torpor-cold-start"] == "true"
        # replica logs: the API process has no driver; it asks the controller over Redis
        r = httpx.get(
            f"{api}/v1/functions/slow/logs", params={"tail": "50"}, headers=auth, timeout=30
        )
        assert r.status_code == 200, r.text
        assert "torpor-runtime: serving handler:handle" in r.text
        assert all(line.startswith("[slow-00001-") for line in r.text.splitlines()), r.text
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "torpor.cli.main",
                "--api",
                api,
                "--state-dir",
                str(state),
                "logs",
                "slow",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0 and "serving handler:handle" in out.stdout, out.stderr
        # one gateway goes away; the other keeps serving
        procs[2].terminate()
        procs[2].wait(30)
        assert httpx.get(f"http://127.0.0.1:{gw2}/", headers=headers, timeout=30).status_code == 200
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        # the controller alone leaves replicas for the next controller to adopt: clean them up here
        for rec in (state / "replicas").glob("*.json"):
            import json
            import os
            import signal

            try:
                os.killpg(json.loads(rec.read_text())["pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError, ValueError, KeyError):
                pass
