"""The pool member's entry point (``fetch.pooled_main``) as a real process on loopback,
without Docker: it waits, answers nothing but its own check, takes one specialise
request with the right token, refuses an archive that does not match its hash, and then
serves the function on the same port with exactly the env it was given."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from torpor.drivers import dockerpool
from torpor.drivers.dockerpool import Member
from torpor.runtime import fetch
from torpor.sources import pack

TOKEN = "t" * 40


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Entry:
    def __init__(self, tmp: Path) -> None:
        self.port = _port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PORT": str(self.port),
            "TORPOR_HOST": "127.0.0.1",
            "TORPOR_POOL_TOKEN": TOKEN,
            "TORPOR_FETCH_DIR": str(tmp / "fn"),
            "POOL_ONLY": "yes",  # must not reach the function
        }
        here = os.path.dirname(fetch.__file__)
        code = (
            f"import sys; sys.path.insert(0, {here!r}); import fetch; sys.exit(fetch.pooled_main())"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp)
        self.member = Member("local", f"127.0.0.1:{self.port}", TOKEN)
        deadline = time.monotonic() + 20
        while not dockerpool.is_waiting(self.member.endpoint):
            assert self.proc.poll() is None, "the entry exited"
            assert time.monotonic() < deadline, "the entry never waited"
            time.sleep(0.02)

    def post(self, body: bytes, token: str = TOKEN) -> tuple[int, bytes] | None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(
                "POST",
                dockerpool.SPECIALISE_PATH,
                body=body,
                headers={"Authorization": f"Bearer {token}"},
            )
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (http.client.RemoteDisconnected, ConnectionError):
            return None  # closed without an answer
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, bytes] | None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (http.client.RemoteDisconnected, ConnectionError):
            return None
        finally:
            conn.close()


@pytest.fixture
def entry(tmp_path: Path) -> Iterator[Entry]:
    e = Entry(tmp_path)
    try:
        yield e
    finally:
        e.proc.terminate()
        try:
            e.proc.wait(10)
        except subprocess.TimeoutExpired:
            e.proc.kill()
            e.proc.wait(5)


def _function(tmp: Path, text: str) -> tuple[str, bytes]:
    src = tmp / f"src-{os.urandom(3).hex()}"
    src.mkdir()
    (src / "handler.py").write_text(text)
    packed = pack(src)
    return packed.sha256, packed.data


HANDLER = (
    "import json, os\n"
    "def handle(request):\n"
    "    return json.dumps({k: os.environ.get(k) for k in ('GREETING', 'POOL_ONLY', 'TORPOR_POOL_TOKEN')})\n"
)


def test_it_waits_answering_nothing_but_its_own_check(entry: Entry, tmp_path: Path) -> None:
    assert entry.get("/_torpor/health") is None  # a probe never reads "ready"
    assert entry.get("/") is None
    sha, data = _function(tmp_path, HANDLER)
    body = dockerpool.specialise_body(sha, {"GREETING": "hi"}, data)
    assert entry.post(body, token="wrong") is None
    assert entry.post(body, token="") is None
    assert entry.get(fetch.WAITING_PATH) == (204, b"")  # still waiting for the real one


def test_one_specialise_request_then_the_function_serves(entry: Entry, tmp_path: Path) -> None:
    sha, data = _function(tmp_path, HANDLER)
    env = {"GREETING": "hi", "PORT": str(entry.port), "TORPOR_HOST": "127.0.0.1"}
    dockerpool.send_specialise(entry.member, dockerpool.specialise_body(sha, env, data))
    deadline = time.monotonic() + 20
    while (got := entry.get("/")) is None:
        assert time.monotonic() < deadline and entry.proc.poll() is None
        time.sleep(0.01)
    assert got[0] == 200
    assert json.loads(got[1]) == {"GREETING": "hi", "POOL_ONLY": None, "TORPOR_POOL_TOKEN": None}
    other_sha, other = _function(tmp_path, "def handle(r):\n    return 'hijacked'\n")
    again = entry.post(dockerpool.specialise_body(other_sha, {}, other))
    assert again is not None and again[0] == 404  # the runtime's reserved path now
    assert json.loads(entry.get("/")[1])["GREETING"] == "hi"  # type: ignore[index]
    assert (tmp_path / "fn" / "handler.py").stat().st_mode & 0o222 == 0  # read-only


def test_an_archive_that_does_not_match_its_hash_is_refused(entry: Entry, tmp_path: Path) -> None:
    sha, _ = _function(tmp_path, HANDLER)
    _, evil = _function(tmp_path, "def handle(r):\n    return 'evil'\n")
    with pytest.raises(dockerpool.PoolError, match="sha256 mismatch"):
        dockerpool.send_specialise(entry.member, dockerpool.specialise_body(sha, {}, evil))
    assert entry.proc.wait(10) == fetch.EXIT_MISMATCH
    assert not (tmp_path / "fn").exists()


@pytest.mark.parametrize(
    "tar_member",
    [("../escape.py", b"x"), ("/abs.py", b"x")],
)
def test_a_hostile_archive_is_refused(
    entry: Entry, tmp_path: Path, tar_member: tuple[str, bytes]
) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(tar_member[0])
        info.size = len(tar_member[1])
        tar.addfile(info, io.BytesIO(tar_member[1]))
    data = buf.getvalue()
    import hashlib

    body = dockerpool.specialise_body(hashlib.sha256(data).hexdigest(), {}, data)
    with pytest.raises(dockerpool.PoolError, match="refused"):
        dockerpool.send_specialise(entry.member, body)
    assert entry.proc.wait(10) == fetch.EXIT_REFUSED
    assert not (tmp_path.parent / "escape.py").exists()
