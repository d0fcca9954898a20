"""``torpor images build-runtime`` builds the generic runtime image of source functions on a
cluster; run here with the Docker Engine under a Pod's hardening (uid 65534, read-only
root, no capabilities, no new privileges, a tmpfs /tmp), it fetches a function's archive
from a loopback archive server by hash and serves it."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from archive_server import ArchiveServer
from helpers import free_port

pytestmark = pytest.mark.docker

HANDLER = "import os\n\ndef handle(request):\n    return f'uid={os.getuid()} dir={os.environ.get(\"TORPOR_DIR\")}'\n"


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runtime_image() -> Iterator[str]:
    from torpor.drivers.baseimage import BaseImageError, build_base_image

    if docker("info", timeout=30).returncode != 0:
        pytest.fail("Docker Engine unreachable; install and start it: .ci/install-docker.sh")
    try:
        build_base_image(progress=lambda _line: None)  # no-op when present
    except BaseImageError as e:
        pytest.fail(f"base image unavailable: {e}")
    tag = f"torpor/runtime:test-{uuid.uuid4().hex[:8]}"
    r = subprocess.run(
        [sys.executable, "-m", "torpor.cli.main", "images", "build-runtime", "--tag", tag],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == tag
    yield tag
    docker("rmi", "-f", tag)


def test_the_runtime_image_fetches_and_serves_a_function_under_pod_hardening(
    tmp_path: Path, runtime_image: str
) -> None:
    archives = ArchiveServer(token="archive-token-0123456789").start()
    src = tmp_path / "fn"
    src.mkdir()
    (src / "handler.py").write_text(HANDLER)
    sha = archives.add_folder(src)
    port = free_port()
    name = f"torpor-runtime-test-{uuid.uuid4().hex[:8]}"
    run = docker(
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "--read-only",
        "--tmpfs",
        "/tmp:rw,size=64m",
        "--user",
        "65534:65534",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "-e",
        f"TORPOR_ARCHIVE_URL={archives.url(sha)}",
        "-e",
        f"TORPOR_ARCHIVE_SHA256={sha}",
        "-e",
        "TORPOR_ARCHIVE_TOKEN=archive-token-0123456789",
        "-e",
        f"PORT={port}",
        "-e",
        "TORPOR_HOST=127.0.0.1",
        runtime_image,
    )
    try:
        assert run.returncode == 0, run.stderr
        deadline = time.monotonic() + 60
        body = None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/", trust_env=False, timeout=2)
                body = (r.status_code, r.text)
                break
            except httpx.TransportError:
                if docker("inspect", "-f", "{{.State.Running}}", name).stdout.strip() == "false":
                    break
                time.sleep(0.1)
        logs = docker("logs", name)
        assert body == (200, "uid=65534 dir=/tmp/fn"), logs.stdout + logs.stderr
        assert f"torpor-fetch: sha256:{sha[:12]} ok" in logs.stdout
        assert archives.requests[-1] == (f"/v1/archives/{sha}", "Bearer archive-token-0123456789")
    finally:
        docker("rm", "-f", name)
        archives.stop()


def test_a_tampered_archive_stops_the_container(tmp_path: Path, runtime_image: str) -> None:
    archives = ArchiveServer().start()
    src = tmp_path / "fn"
    src.mkdir()
    (src / "handler.py").write_text(HANDLER)
    sha = archives.add_folder(src)
    data = archives.archives[sha]
    archives.archives[sha] = data[:-1] + bytes([data[-1] ^ 1])  # one bit of the served copy flipped
    name = f"torpor-runtime-test-{uuid.uuid4().hex[:8]}"
    try:
        r = docker(
            "run",
            "--rm",
            "--name",
            name,
            "--network",
            "host",
            "--read-only",
            "--tmpfs",
            "/tmp:rw,size=64m",
            "-e",
            f"TORPOR_ARCHIVE_URL={archives.url(sha)}",
            "-e",
            f"TORPOR_ARCHIVE_SHA256={sha}",
            "-e",
            f"PORT={free_port()}",
            runtime_image,
            timeout=60,
        )
    finally:
        docker("rm", "-f", name)
        archives.stop()
    assert r.returncode == 7
    assert "sha256 mismatch" in r.stderr
