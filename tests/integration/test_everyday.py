"""Everyday use end to end on a real `torpor up` (process driver; the Docker driver's
deploy where marked): quiet deploys, build logs and events, `torpor new` then deploy,
-o json and exit codes against a live API."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from platform_proc import FUNCTIONS, Torpor, function_copy, torpor_up

pytestmark = pytest.mark.slow


@pytest.fixture
def up(tmp_path: Path):
    with torpor_up(tmp_path / "state") as t:
        yield t


def new_function(up: Torpor, parent: Path, name: str, *args: str) -> Path:
    r = up.cli("new", name, "--dir", str(parent), *args)
    assert "created" in r.stderr
    return parent / name


def test_new_then_deploy_answers_get_slash_with_200(up: Torpor, tmp_path: Path) -> None:
    folder = new_function(up, tmp_path, "greeter")
    r = up.cli("deploy", str(folder))
    lines = r.stderr.splitlines()
    assert r.stdout.strip() == f"http://greeter.torpor.localhost:{up.port}/"
    assert lines[0].startswith("uploaded greeter (") and "revision greeter-00001" in lines[0]
    assert any(line.startswith("greeter-00001: built in ") for line in lines), lines
    assert any("its first replica" in line for line in lines), lines
    assert lines[-1].startswith("greeter-00001: ready in ") and "greeter-00001=100%" in lines[-1]
    assert len(lines) + 1 <= 10
    resp = up.request("greeter", "/")
    assert resp.status_code == 200 and resp.text == "hello, world!\n"
    js = new_function(up, tmp_path, "api-fn", "--template", "json")
    assert up.cli("deploy", str(js), "--quiet").stderr == ""
    resp = up.request("api-fn", "/x", method="POST", json={"a": 1})
    assert resp.status_code == 200 and resp.json() == {"received": {"a": 1}}


def test_quiet_prints_only_the_url_and_events_keep_one_line_per_build(
    up: Torpor, tmp_path: Path
) -> None:
    folder = function_copy(tmp_path, "hello")
    r = up.cli("deploy", str(folder), "-q")
    assert r.stdout == f"http://hello.torpor.localhost:{up.port}/\n" and r.stderr == ""
    up.cli("deploy", str(folder), "-q")
    events = up.api_call("GET", "/v1/functions/hello/events", params={"limit": 200}).json()[
        "events"
    ]
    builds = [e for e in events if e["kind"] == "build"]
    assert [e["message"].split(":")[0] for e in builds] == ["hello-00001"] * 2 + ["hello-00002"] * 2
    assert [("started" in e["message"], "built in" in e["message"]) for e in builds] == [
        (True, False),
        (False, True),
    ] * 2
    assert all(
        "log" not in e["data"] and "log_lines" in e["data"]
        for e in builds
        if "built in" in e["message"]
    )
    log = up.cli("logs", "hello", "--build").stdout
    assert log.strip().splitlines()[-1].startswith("hello-00002: built in ")
    assert (
        up.cli("logs", "hello", "--build", "hello-00001")
        .stdout.strip()
        .splitlines()[-1]
        .startswith("hello-00001: built in ")
    )
    missing = up.cli("logs", "hello", "--build", "hello-00042", check=False)
    assert missing.returncode == 3 and "no revision" in missing.stderr


def test_a_failed_build_shows_its_failing_lines_without_v(up: Torpor, tmp_path: Path) -> None:
    folder = function_copy(tmp_path, "hello")
    (folder / "requirements.txt").write_text("torpor-surely-no-such-package-4b1d==0.0.1\n")
    r = up.cli("deploy", str(folder), "--wait", "240", check=False, timeout=300)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert "hello-00001: build failed after" in r.stderr
    assert "torpor-surely-no-such-package-4b1d" in r.stderr, (
        r.stderr
    )  # pip's own words, not just "failed"
    assert len(r.stderr.splitlines()) <= 14
    log = up.cli("logs", "hello", "--build").stdout
    assert "build failed" in log
    quiet = up.cli("deploy", str(folder), "-q", "--wait", "240", check=False, timeout=300)
    assert quiet.returncode == 1 and quiet.stdout == ""
    assert quiet.stderr.startswith("torpor: deploy: hello-00002 failed: build failed"), quiet.stderr


def test_verbose_shows_the_whole_build_log(up: Torpor, tmp_path: Path) -> None:
    folder = function_copy(tmp_path, "hello")
    (folder / "requirements.txt").write_text("torpor-surely-no-such-package-4b1d==0.0.1\n")
    quiet = up.cli("deploy", str(folder), "--wait", "240", check=False, timeout=300)
    loud = up.cli("deploy", str(folder), "-v", "--wait", "240", check=False, timeout=300)
    assert quiet.returncode == loud.returncode == 1
    log_lines = [line for line in loud.stderr.splitlines() if line.startswith("  | ")]
    assert "  | installing requirements.txt (wheels only)" in log_lines, loud.stderr
    assert not any(line.startswith("  | ") for line in quiet.stderr.splitlines())


def test_output_formats_and_not_found_against_the_api(up: Torpor, tmp_path: Path) -> None:
    up.cli("deploy", str(function_copy(tmp_path, "hello")), "-q")
    as_json = json.loads(up.cli("ls", "-o", "json").stdout)
    assert [f["name"] for f in as_json] == ["hello"]
    assert json.loads(up.cli("ls", "--json").stdout) == as_json
    as_yaml = yaml.safe_load(up.cli("describe", "hello", "-o", "yaml").stdout)
    assert as_yaml["name"] == "hello" and as_yaml["revisions"][0]["name"] == "hello-00001"
    top = json.loads(up.cli("top", "--once", "-o", "json").stdout)
    assert top[0]["function"] == "hello" and top[0]["traffic"] == 100
    ro = json.loads(up.cli("rollout", "hello", "-o", "json").stdout)
    assert ro["rollout"] is None and ro["traffic"][0]["percent"] == 100
    assert json.loads(up.cli("secret", "ls", "-o", "json").stdout) == []
    for args in (("describe", "nope"), ("delete", "nope"), ("rollout", "nope")):
        r = up.cli(*args, check=False)
        assert r.returncode == 3 and "nope" in r.stderr, (args, r.stderr)


def test_ui_prints_a_one_time_url(up: Torpor) -> None:
    r = up.cli("ui", "--no-open")
    url = r.stdout.strip()
    assert url.startswith(f"{up.api}/ui/login?code=")
    token = (up.state_dir / "token").read_text().strip()
    assert token not in url
    import httpx

    first = httpx.get(url, follow_redirects=False, timeout=10)
    assert first.status_code == 303 and "torpor_ui=" in first.headers["set-cookie"]
    assert httpx.get(url, follow_redirects=False, timeout=10).status_code == 401


@pytest.mark.docker
def test_docker_deploy_of_hello_prints_at_most_ten_lines(tmp_path: Path) -> None:
    from torpor.drivers.docker import engine_reachable

    if not engine_reachable():
        pytest.skip("no Docker Engine")
    with torpor_up(tmp_path / "state", driver="docker") as up:
        r = up.cli("deploy", str(FUNCTIONS / "hello"), timeout=600)
        out = (r.stderr + r.stdout).splitlines()
        assert len(out) <= 10, out
        assert not any("Step " in line or "intermediate container" in line for line in out), out
        built = next(line for line in out if line.startswith("hello-00001: built in "))
        assert "image " in built and " MB" in built and "cached" in built, built
        assert up.request("hello", "/?name=docker").text == "hello, docker!\n"
        verbose = up.cli("deploy", str(FUNCTIONS / "hello"), "-v", timeout=600)
        assert any("Step " in line for line in verbose.stderr.splitlines()), (
            verbose.stderr
        )  # the whole log
        again = next(
            line
            for line in verbose.stderr.splitlines()
            if line.startswith("hello-00002: built in ")
        )
        assert again.endswith(", cached"), again  # same folder: every COPY/RUN layer reused
        log = up.cli("logs", "hello", "--build", "hello-00001").stdout
        assert "Step 1/" in log and log.strip().splitlines()[-1] == built
        describe = up.cli("describe", "hello").stdout
        assert "Step " not in describe
        folder = tmp_path / "fresh"
        folder.mkdir()
        new = subprocess.run(
            [sys.executable, "-m", "torpor.cli.main", "new", "fresh-fn", "--dir", str(folder)],
            capture_output=True,
            text=True,
            timeout=60,
            env=up.env,
        )
        assert new.returncode == 0, new.stderr
        up.cli("deploy", str(folder / "fresh-fn"), "-q", timeout=600)
        assert up.request("fresh-fn", "/").status_code == 200


@pytest.mark.redis
def test_the_dashboard_feed_counts_a_burst_over_redis(tmp_path: Path, redis_url: str) -> None:
    """The feed is built from the gateways' reports on the store's bus: on Redis too."""
    import time

    import httpx

    with torpor_up(tmp_path / "state", redis=redis_url) as up:
        up.cli("deploy", str(function_copy(tmp_path, "hello")), "-q")
        url = up.cli("ui", "--no-open").stdout.strip()
        with httpx.Client(base_url=up.api, timeout=30) as browser:
            login = browser.get(url, follow_redirects=False)
            assert login.status_code == 303
            session = login.headers["set-cookie"].split(";")[0]
            browser.cookies.clear()
            best = 0.0
            with browser.stream("GET", "/v1/ui/stream", headers={"Cookie": session}) as feed:
                assert feed.status_code == 200 and feed.headers["content-type"].startswith(
                    "text/event-stream"
                )
                sent = 0
                deadline = time.monotonic() + 30
                for line in feed.iter_lines():
                    if sent < 100:
                        for _ in range(20):
                            assert up.request("hello", "/").status_code == 200
                        sent += 20
                    if line.startswith("data: "):
                        state = json.loads(line[6:])
                        fn = next(f for f in state["functions"] if f["name"] == "hello")
                        assert fn["url"] == f"http://hello.torpor.localhost:{up.port}/"
                        best = max(best, fn["stats"]["rps"])
                        if best > 0:
                            break
                    assert time.monotonic() < deadline, "no requests counted in the feed"
            assert best > 0
