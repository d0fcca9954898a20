"""Nothing depends on a shared disk (issue 13, section 1): distributed mode where Redis,
the API, the controller and the gateway run as separate processes and each of the three
components keeps its state dir on a private tmpfs in its own mount namespace
(tests/isolated.py), as on separate hosts. A source function deploys and answers 200
through the gateway because its archive travels through the store by hash; an absolute
path into the API's state dir would name nothing the controller can see.

``/proc/PID/root`` opens a path as that process sees it (through its mount namespace):
the test reads each component's private state dir with it, and shows that the host (and
so every other component) sees the mount points empty.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import isolated
import pytest
import redis
from helpers import free_port
from platform_proc import DOMAIN, function_copy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(isolated.available() is not None, reason=str(isolated.available())),
]

TOKEN = "sources-drill-token-0123456789"


class Spread:
    """Redis + API + controller + gateway, each component isolated over its own state dir."""

    def __init__(self, tmp: Path, redis_url: str, driver: str) -> None:
        self.tmp, self.redis_url, self.driver = tmp, redis_url, driver
        self.api_port, self.gw_port = free_port(), free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.gateway = f"http://127.0.0.1:{self.gw_port}"
        self.log = tmp / "components.log"
        self.states = {c: tmp / f"{c}-state" for c in ("api", "controller", "gateway")}
        # the API's token is given (env), so nobody needs to read it from the API's state dir;
        # a short archive grace lets the drill watch garbage collection
        self.env = {**os.environ, "TORPOR_TOKEN": TOKEN, "TORPOR_ARCHIVE_GRACE": "1"}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> Spread:
        common = ["--redis", self.redis_url, "--log-level", "warning"]
        self.procs["controller"] = isolated.spawn(
            self.states["controller"],
            ["controller", *common, "--driver", self.driver],
            self.log,
            self.env,
        )
        self.procs["api"] = isolated.spawn(
            self.states["api"],
            ["api", *common, "--api-port", str(self.api_port), "--port", str(self.gw_port)],
            self.log,
            self.env,
        )
        self.procs["gateway"] = isolated.spawn(
            self.states["gateway"],
            ["gateway", *common, "--port", str(self.gw_port)],
            self.log,
            self.env,
        )
        for url in (f"{self.api}/healthz", f"{self.gateway}/healthz"):
            self._wait_http(url)
        return self

    def _wait_http(self, url: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                httpx.get(url, timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise AssertionError(f"{url} did not answer:\n{self.log.read_text()[-3000:]}")

    def check_alive(self) -> None:
        for name, p in self.procs.items():
            assert p.poll() is None, (
                f"{name} exited {p.returncode}:\n{self.log.read_text()[-3000:]}"
            )

    def stop(self) -> None:
        for p in self.procs.values():
            isolated.stop(p)

    def seen_by(self, component: str, path: Path) -> Path:
        """``path`` as ``component`` sees it (inside its mount namespace)."""
        return Path(f"/proc/{self.procs[component].pid}/root") / path.relative_to("/")

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "torpor.cli.main", "--api", self.api, *args],
            env={**self.env, "TORPOR_GATEWAY": self.gateway},
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return httpx.request(
            method, self.api + path, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10, **kw
        )

    def wait_for(self, what: str, predicate: object, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():  # type: ignore[operator]
                return
            self.check_alive()
            time.sleep(0.2)
        raise AssertionError(
            f"timed out after {timeout}s waiting for {what}:\n{self.log.read_text()[-3000:]}"
        )


@pytest.fixture
def spread(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str) -> Iterator[Spread]:
    s = Spread(tmp_path, redis_url, request.param).start()
    try:
        yield s
    finally:
        s.stop()


def _drill(s: Spread, tmp: Path) -> None:
    folder = function_copy(
        tmp, "hello", env={"GREETING": f"isolated {s.driver}"}, scale={"idle": "5s"}
    )
    out = s.cli("deploy", str(folder), "--wait", "240")
    assert out.returncode == 0, (
        f"deploy failed: {out.stderr}\n{out.stdout}\n{s.log.read_text()[-3000:]}"
    )
    r = httpx.get(f"{s.gateway}/?name=drill", headers={"Host": f"hello.{DOMAIN}"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.text == f"isolated {s.driver}, drill!\n"

    # what travelled: a hash, not a path
    rev = s.call("GET", "/v1/functions/hello/revisions/hello-00001").json()
    sha = rev["source_sha256"]
    assert re.fullmatch(r"[0-9a-f]{64}", sha), rev
    db = redis.Redis.from_url(s.redis_url)
    try:
        doc = db.get("torpor:fn:hello") or b""
        assert (
            b'"source": null' in doc and sha.encode() in doc
        )  # the stored revision names no folder
        blob = db.get(f"torpor:blob:{sha}")
        assert isinstance(blob, bytes) and hashlib.sha256(blob).hexdigest() == sha
    finally:
        db.close()

    # each component's state is private: the host (every other component) sees empty mount points
    for component, state in s.states.items():
        assert list(state.iterdir()) == [], f"{component}'s state dir leaks onto the shared disk"
    cached = s.seen_by("controller", s.states["controller"] / "sources-cache" / sha)
    assert (cached / "handler.py").read_bytes() == (folder / "handler.py").read_bytes()
    assert list(s.seen_by("api", s.states["controller"]).iterdir()) == []  # the API cannot see it
    assert (
        list(s.seen_by("controller", s.states["api"]).iterdir()) == []
    )  # nor the controller the API's
    api_state = s.seen_by("api", s.states["api"])
    assert not (
        api_state / "sources"
    ).exists()  # the API keeps no folder once the archive is stored
    assert list((api_state / "uploads").iterdir()) == []

    # deleting the function takes its archive out of the store and the controller's cache;
    # an archive that never became a revision (its API died between the put and the
    # revision) goes too, once its grace is over
    orphan = b"an upload that never became a revision"
    orphan_sha = hashlib.sha256(orphan).hexdigest()
    db = redis.Redis.from_url(s.redis_url)
    try:
        db.set(f"torpor:blob:{orphan_sha}", orphan)
        db.hset("torpor:blobs", orphan_sha, repr(time.time()))
        assert s.call("DELETE", "/v1/functions/hello").status_code == 200
        s.wait_for("the archive removed from Redis", lambda: not db.exists(f"torpor:blob:{sha}"))
        s.wait_for(
            "the orphan archive removed", lambda: not db.exists(f"torpor:blob:{orphan_sha}"), 90
        )
        assert db.hkeys("torpor:blobs") == []
    finally:
        db.close()
    s.wait_for("the controller's unpacked copy removed", lambda: not cached.exists())


@pytest.mark.parametrize("spread", ["process"], indirect=True)
def test_a_source_function_runs_with_no_shared_disk_process_driver(
    spread: Spread, tmp_path: Path
) -> None:
    _drill(spread, tmp_path)


@pytest.mark.docker
@pytest.mark.parametrize("spread", ["docker"], indirect=True)
def test_a_source_function_runs_with_no_shared_disk_docker_driver(
    spread: Spread, tmp_path: Path
) -> None:
    _drill(spread, tmp_path)
