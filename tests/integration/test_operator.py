"""Operator controls: imperative scaling (`torpor scale`) and the token-guarded API."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from platform_proc import Torpor, function_copy, torpor_up

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token-for-tests-0123456789"


def test_scale_pins_holds_at_zero_and_releases(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with torpor_up(state, extra=["--max-replicas", "10"]) as t:
        # scale.max within the platform cap (--max-replicas 10): above it a deploy is refused
        t.deploy(function_copy(tmp_path, "hello", scale={"idle": "2s", "max": 10}))
        # pin 3 with no traffic at all
        t.cli("scale", "hello", "--replicas", "3")
        t.wait_for(lambda: len(t.ready_replicas("hello")) == 3, 5, "3 ready replicas")
        fn = t.function("hello")
        assert fn["scale"]["min"] == 3 and fn["scale"]["max"] == 3
        assert any(e["kind"] == "scale" and "by hand" in e["message"] for e in fn["events"])
        # hold at zero: no replica, and requests are refused without a cold start
        t.cli("scale", "hello", "--replicas", "0")
        t.wait_for(lambda: not t.function("hello")["replicas"], 15, "replicas gone")
        r = t.request("hello")
        assert r.status_code == 503
        assert r.json()["error"] == "scaled to zero" and "by hand" in r.json()["detail"]
        assert "retry-after" in r.headers
        assert not t.function("hello")["replicas"], "a request started a replica while held at zero"
    # the bound survives a restart
    with torpor_up(state, extra=["--max-replicas", "10"]) as t:
        assert t.request("hello").status_code == 503
        assert t.function("hello")["scale"]["max"] == 0
        # back to autoscaling: wakes on demand, then sleeps after idle
        t.cli("scale", "hello", "--min", "0", "--max", "5")
        r = t.request("hello")
        assert r.status_code == 200 and r.headers["x-torpor-cold-start"] == "true"
        t.wait_for(lambda: not t.function("hello")["replicas"], 30, "scale to zero after idle")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"min": 4, "max": 2}, "min"),
        ({"min": -1}, "min"),
        ({"max": -2}, "max"),
        ({"replicas": -1}, "replicas"),
        ({"max": 11}, "max"),  # above the platform cap (--max-replicas 10)
        ({"replicas": 50}, "replicas"),
        ({"target": 0}, "target"),
        ({"concurrency": "many"}, "concurrency"),
        ({"minimum": 1}, "minimum"),
        ({"replicas": 2, "min": 1}, "replicas"),
    ],
)
def test_bad_scale_input_is_refused_and_changes_nothing(
    tmp_path: Path, body: dict, field: str, shared_up: Torpor
) -> None:
    t = shared_up
    before = t.function("hello")["scale"]
    r = t.api_call("PATCH", "/v1/functions/hello/scale", json=body, timeout=10)
    assert 400 <= r.status_code < 500
    err = r.json()
    assert err["field"] == field and field in err["detail"]
    assert t.function("hello")["scale"] == before


@pytest.fixture(scope="module")
def shared_up(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("scale-bad")
    with torpor_up(tmp / "state", extra=["--max-replicas", "10"]) as t:
        t.deploy(function_copy(tmp, "hello", scale={"max": 10}))
        yield t


def test_scale_unknown_function_is_404(shared_up: Torpor) -> None:
    r = shared_up.api_call("PATCH", "/v1/functions/ghost/scale", json={"max": 2}, timeout=10)
    assert r.status_code == 404 and r.json()["error"] == "function not found"
    out = shared_up.cli("scale", "ghost", "--max", "2", check=False)
    assert out.returncode != 0 and "ghost" in out.stderr


def test_api_beyond_loopback_requires_a_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with torpor_up(
        tmp_path / "state", api_host="0.0.0.0", extra=["--token-file", str(token_file)]
    ) as t:
        url = f"{t.api}/v1/functions"
        assert httpx.get(f"{t.api}/healthz", timeout=5).status_code == 200
        assert httpx.get(f"{t.api}/readyz", timeout=5).status_code == 200
        r = httpx.get(url, timeout=5)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        r = httpx.get(url, headers={"Authorization": "Bearer wrong-token-wrong-token"}, timeout=5)
        assert r.status_code == 401
        assert TOKEN not in r.text
        r = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
        assert r.status_code == 200
        # the CLI sends TORPOR_TOKEN
        t.env["TORPOR_TOKEN"] = TOKEN
        t.deploy(function_copy(tmp_path, "hello"))
        assert "hello" in t.cli("ls").stdout
        t.env.pop("TORPOR_TOKEN")
        denied = t.cli("ls", check=False)
        assert denied.returncode != 0 and "401" in denied.stderr
        # the gateway's public port is not guarded
        assert t.request("hello").status_code == 200
    assert TOKEN not in t.log.read_text()


def test_api_beyond_loopback_without_token_refuses_to_start(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torpor.cli.main",
            "up",
            "--api-host",
            "0.0.0.0",
            "--state-dir",
            str(tmp_path / "s"),
            "--port",
            "0",
            "--api-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "token" in lines[0]
