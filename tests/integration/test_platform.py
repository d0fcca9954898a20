"""End to end on the process driver: a real `torpor up`, real replicas, the real CLI."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import signal
from pathlib import Path

import httpx
import pytest
from platform_proc import Torpor, function_copy, torpor_up

pytestmark = pytest.mark.slow


@pytest.fixture
def up(tmp_path: Path):
    with torpor_up(tmp_path / "state") as t:
        yield t


def test_deploy_then_invoke_by_host_and_by_path(up: Torpor, tmp_path: Path) -> None:
    url = up.deploy(function_copy(tmp_path, "hello"))
    assert url == f"http://hello.torpor.localhost:{up.port}/"
    r = up.request("hello", "/?name=ann")
    assert r.status_code == 200
    assert r.text == "hello, ann!\n"
    assert r.headers["x-torpor-revision"] == "hello-00001"
    assert r.headers["x-torpor-cold-start"] in ("true", "false")
    r = httpx.get(f"{up.gateway}/function/hello/?name=bo", timeout=30)
    assert r.status_code == 200 and r.text == "hello, bo!\n"
    r = httpx.get(f"{up.gateway}/function/hello", timeout=30)  # no trailing slash
    assert r.status_code == 200
    out = up.cli("invoke", "hello", "--path", "/?name=cli")
    assert out.stdout == "hello, cli!\n"
    fn = up.function("hello")
    assert [r["name"] for r in fn["revisions"]] == ["hello-00001"]
    assert fn["revisions"][0]["status"] == "ready"
    assert fn["traffic"] == [{"revision": "hello-00001", "percent": 100, "tag": None}]
    for rep in fn["replicas"]:
        assert rep["state"] in ("starting", "ready", "draining", "failed")
    ls = up.cli("ls").stdout
    assert "hello" in ls and "hello-00001" in ls
    assert "hello-00001" in up.cli("describe", "hello").stdout


def test_unknown_function_is_a_json_404(up: Torpor) -> None:
    r = up.request("nope")
    assert r.status_code == 404
    assert r.json()["error"] == "function not found"
    r = httpx.get(f"{up.gateway}/function/nope/x", timeout=5)
    assert r.status_code == 404 and "error" in r.json()
    r = up.api_call("GET", "/v1/functions/nope", timeout=5)
    assert r.status_code == 404 and r.json()["error"] == "function not found"
    bad = up.cli("invoke", "nope", check=False)
    assert bad.returncode != 0 and "404" in bad.stderr


def test_two_mib_post_body_arrives_intact(up: Torpor, tmp_path: Path) -> None:
    up.deploy(function_copy(tmp_path, "echo"))
    body = os.urandom(2 * 1024 * 1024)
    r = up.request("echo", "/upload?x=1", "POST", content=body)
    assert r.status_code == 200
    got = r.json()
    assert got["length"] == len(body)
    assert got["sha256"] == hashlib.sha256(body).hexdigest()
    assert got["method"] == "POST" and got["path"] == "/upload" and got["query"] == {"x": "1"}
    # path routing keeps the percent-encoding of what follows the function name
    r = httpx.post(f"{up.gateway}/function/echo/a%20b/c%2Fd?q=1", content=b"x", timeout=30)
    assert (
        r.status_code == 200 and r.json()["path"] == "/a b/c/d" and r.json()["query"] == {"q": "1"}
    )

    def chunks():
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    r = up.request("echo", "/chunked", "POST", content=chunks())  # no length: chunked upload
    assert r.status_code == 200 and r.json()["sha256"] == hashlib.sha256(body).hexdigest()


def test_bad_spec_is_refused_with_its_field_named(up: Torpor, tmp_path: Path) -> None:
    folder = function_copy(tmp_path, "hello", name="bad-one", scale={"max": -3})
    r = up.cli("deploy", str(folder), check=False)
    assert r.returncode != 0
    assert "scale.max" in r.stderr
    # the API refuses it too (a client that skips the CLI's own check)
    from torpor.cli.main import pack

    resp = up.api_call(
        "POST",
        "/v1/functions",
        content=pack(folder),
        headers={"Content-Type": "application/gzip"},
        timeout=10,
    )
    assert resp.status_code == 400
    assert resp.json()["field"] == "scale.max"
    assert "bad-one" not in up.cli("ls").stdout
    r = up.api_call("GET", "/v1/functions/bad-one", timeout=5)
    assert r.status_code == 404


def test_idle_scales_to_zero_and_the_next_request_cold_starts(up: Torpor, tmp_path: Path) -> None:
    up.deploy(function_copy(tmp_path, "hello", scale={"idle": "2s"}))
    assert up.request("hello").status_code == 200
    up.wait_for(lambda: not up.function("hello")["replicas"], 30, "scale to zero after idle")
    pids = list((up.state_dir / "replicas").glob("*.json"))
    assert pids == [], "replica process records remain after scale to zero"
    r = up.request("hello", "/?name=again")
    assert r.status_code == 200 and r.text == "hello, again!\n"
    assert r.headers["x-torpor-cold-start"] == "true"
    r = up.request("hello")
    assert r.headers["x-torpor-cold-start"] == "false"


def test_forty_concurrent_requests_at_zero_all_succeed(up: Torpor, tmp_path: Path) -> None:
    up.deploy(
        function_copy(
            tmp_path, "slow", scale={"idle": "2s"}, env={"SLEEP_MS": "50", "FAIL_RATE": "0"}
        )
    )
    up.wait_for(lambda: not up.function("slow")["replicas"], 30, "scale to zero")
    with cf.ThreadPoolExecutor(40) as pool:
        results = list(pool.map(lambda i: up.request("slow", f"/?i={i}"), range(40)))
    assert [r.status_code for r in results] == [200] * 40
    assert any(r.headers["x-torpor-cold-start"] == "true" for r in results)


def test_restart_keeps_functions_working(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with torpor_up(state) as t:
        t.deploy(function_copy(tmp_path, "hello"))
        assert t.request("hello").status_code == 200
    with torpor_up(state) as t:
        r = t.request("hello", "/?name=later")
        assert r.status_code == 200 and r.text == "hello, later!\n"
        fn = t.function("hello")
        assert fn["revisions"][0]["status"] == "ready"
        # a second deploy after the restart continues the revision numbers
        t.deploy(function_copy(tmp_path, "hello", env={"GREETING": "hey"}))
        r = t.request("hello", "/?name=x")
        assert r.text == "hey, x!\n" and r.headers["x-torpor-revision"] == "hello-00002"


def test_kill_9_then_restart_adopts_replicas_without_duplicates(tmp_path: Path) -> None:
    state = tmp_path / "state"
    t = Torpor(state).start()
    try:
        t.deploy(function_copy(tmp_path, "hello"))
        assert t.request("hello").status_code == 200
        before = t.ready_replicas("hello")
        assert len(before) == 1
    finally:
        t.stop(signal.SIGKILL)
    with torpor_up(state) as t2:
        t2.wait_for(lambda: t2.ready_replicas("hello"), 20, "adopted replica ready")
        r = t2.request("hello")
        assert r.status_code == 200 and r.headers["x-torpor-cold-start"] == "false"
        after = t2.function("hello")["replicas"]
        assert [r["name"] for r in after] == [before[0]["name"]]
        records = list((state / "replicas").glob("*.json"))
        assert len(records) == 1


def _in_flight(t: Torpor, function: str) -> float:
    """The gateway's own gauge of requests being proxied now for ``function``."""
    text = httpx.get(t.gateway + "/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("torpor_in_flight_requests{") and f'function="{function}"' in line
    )


def test_sigterm_drains_in_flight_requests_before_replicas_stop(tmp_path: Path) -> None:
    t = Torpor(tmp_path / "state").start()
    try:
        t.deploy(function_copy(tmp_path, "slow", env={"SLEEP_MS": "100", "FAIL_RATE": "0"}))
        assert t.request("slow").status_code == 200
        with cf.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(t.request, "slow", "/?ms=1500") for _ in range(4)]
            t.wait_for(
                lambda: _in_flight(t, "slow") == 4, 10, "4 requests in flight on the replica"
            )
            code = t.stop(signal.SIGTERM)
            results = [f.result(timeout=30) for f in futs]
        assert [r.status_code for r in results] == [200] * 4
        assert code == 0
        assert list((t.state_dir / "replicas").glob("*.json")) == [], (
            "replicas left running after shutdown"
        )
    finally:
        t.stop(signal.SIGKILL)


def test_delete_removes_function_and_replicas(up: Torpor, tmp_path: Path) -> None:
    up.deploy(function_copy(tmp_path, "hello"))
    assert up.request("hello").status_code == 200
    up.cli("delete", "hello")
    assert up.request("hello").status_code == 404
    up.wait_for(
        lambda: not list((up.state_dir / "replicas").glob("*.json")), 20, "replicas stopped"
    )
    assert up.api_call("GET", "/v1/functions/hello", timeout=5).status_code == 404


def test_redis_store_end_to_end(tmp_path: Path, redis_url: str) -> None:
    with torpor_up(tmp_path / "state", redis=redis_url) as t:
        t.deploy(function_copy(tmp_path, "hello"))
        assert t.request("hello").text == "hello, world!\n"
    with torpor_up(tmp_path / "state2", redis=redis_url) as t:
        # desired state lives in Redis: a fresh state dir still knows the function
        assert [f["name"] for f in t.api_call("GET", "/v1/functions").json()["functions"]] == [
            "hello"
        ]


def test_logs_show_replica_output_and_follow_streams_new_lines(up: Torpor, tmp_path: Path) -> None:
    folder = function_copy(tmp_path, "echo")
    (folder / "handler.py").write_text(
        "def handle(request):\n    print('handled', request.query.get('n'), flush=True)\n    return 'ok'\n"
    )
    up.deploy(folder)
    assert up.request("echo", "/?n=first").status_code == 200
    out = up.cli("logs", "echo").stdout
    assert "torpor-runtime: serving" in out and "handled first" in out
    lines: list[str] = []
    with httpx.stream(
        "GET",
        f"{up.api}/v1/functions/echo/logs",
        params={"follow": "1", "tail": "0"},
        headers=up.api_headers,
        timeout=10,
    ) as r:
        assert r.status_code == 200
        up.request("echo", "/?n=second")
        for line in r.iter_lines():
            lines.append(line)
            if "handled second" in line:
                break
    assert any("handled second" in ln for ln in lines)
