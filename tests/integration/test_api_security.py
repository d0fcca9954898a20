"""What a web page or another local user can do to a loopback `torpor up` API (issue 12, 3).

Raw HTTP against a real `torpor up`: each test sends what a browser (or a second user on
the machine) could send, and checks that nothing changed.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from helpers import free_port
from platform_proc import Torpor, function_copy, torpor_up

from torpor.cli.main import pack

pytestmark = pytest.mark.security

NOBODY = 65534


@contextmanager
def started(t: Torpor) -> Iterator[Torpor]:
    """``t`` started without any TORPOR_TOKEN of the caller's (the token comes from STATE_DIR/token)."""
    t.env.pop("TORPOR_TOKEN", None)
    t.start()
    try:
        yield t
    finally:
        t.stop()


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Torpor]:
    with started(Torpor(tmp_path_factory.mktemp("api-security") / "state")) as t:
        yield t


@pytest.fixture(scope="module")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return pack(function_copy(tmp_path_factory.mktemp("fn"), "hello", name="planted"))


def no_planted_function(t: Torpor) -> bool:
    return t.api_call("GET", "/v1/functions/planted").status_code == 404


def test_simple_text_plain_deploy_is_refused(up: Torpor, tarball: bytes, attack) -> None:
    """A web page deploys a function with a CORS-simple POST: Content-Type text/plain, no preflight."""
    # even with the token (so it is the body type, not the token, that stops it)
    r = up.api_call(
        "POST",
        "/v1/functions",
        content=tarball,
        headers={"Content-Type": "text/plain;charset=UTF-8"},
    )
    assert r.status_code == 415, r.text
    assert r.json()["error"] == "unsupported media type" and "text/plain" in r.json()["detail"]
    # a Blob body (fetch with mode no-cors) carries no Content-Type at all
    r2 = up.api_call("POST", "/v1/functions", content=tarball)
    assert r2.status_code == 415, r2.text
    # and the forms a page can submit
    for ctype in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        assert (
            up.api_call(
                "POST", "/v1/functions", content=tarball, headers={"Content-Type": ctype}
            ).status_code
            == 415
        )
    assert no_planted_function(up)
    attack.ended(
        f"{r.status_code} {r.json()['error']}; no Content-Type: {r2.status_code}; no function created"
    )


def test_a_page_with_a_foreign_origin_is_refused(up: Torpor, tarball: bytes, attack) -> None:
    """A page on http://evil.example POSTs a deploy with a proper gzip type (its Origin goes along)."""
    r = up.api_call(
        "POST",
        "/v1/functions",
        content=tarball,
        headers={"Content-Type": "application/gzip", "Origin": "http://evil.example"},
    )
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "cross-origin request" and "evil.example" in r.json()["detail"]
    assert "access-control-allow-origin" not in r.headers
    r2 = up.api_call("GET", "/v1/functions", headers={"Origin": "http://evil.example"})
    assert r2.status_code == 403 and "access-control-allow-origin" not in r2.headers
    r3 = up.api_call(
        "POST", "/v1/functions/hello/rollback", headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert r3.status_code == 403
    assert no_planted_function(up)
    attack.ended(
        f"{r.status_code} {r.json()['error']} (reads too: {r2.status_code}; Sec-Fetch-Site: "
        f"{r3.status_code}); no CORS header"
    )


def test_dns_rebinding_host_is_refused(up: Torpor, tarball: bytes, attack) -> None:
    """DNS rebinding: evil.example now resolves to 127.0.0.1, so its page's requests carry Host: evil.example:PORT."""
    host = f"evil.example:{up.api_port}"
    r = up.api_call("GET", "/v1/functions", headers={"Host": host})
    assert r.status_code == 421, r.text
    assert r.json()["error"] == "misdirected request" and "evil.example" in r.json()["detail"]
    r2 = up.api_call(
        "POST",
        "/v1/functions",
        content=tarball,
        headers={"Host": host, "Content-Type": "application/gzip"},
    )
    assert r2.status_code == 421
    assert no_planted_function(up)
    # the names the API is bound to still work
    for ok in (f"127.0.0.1:{up.api_port}", f"localhost:{up.api_port}", "localhost"):
        assert up.api_call("GET", "/v1/functions", headers={"Host": ok}).status_code == 200, ok
    attack.ended(f"{r.status_code} {r.json()['error']}: {r.json()['detail'][:60]}")


def test_no_token_or_a_wrong_one_is_refused_on_loopback(up: Torpor, tarball: bytes, attack) -> None:
    """A local process without the token calls the loopback API (reads and a deploy)."""
    api = up.api
    r = httpx.get(f"{api}/v1/functions", timeout=5)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}):
        r2 = httpx.post(
            f"{api}/v1/functions",
            content=tarball,
            timeout=10,
            headers={**headers, "Content-Type": "application/gzip"},
        )
        assert r2.status_code == 401, r2.text
        for path in (
            "/v1/functions/hello/logs",
            "/v1/functions/hello",
            "/v1/openapi.json",
            "/metrics",
        ):
            assert httpx.get(api + path, headers=headers, timeout=5).status_code == 401, path
    assert httpx.get(f"{api}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{api}/readyz", timeout=5).status_code == 200
    assert no_planted_function(up)
    token = (up.state_dir / "token").read_text().strip()
    assert token not in up.log.read_text()
    attack.ended(
        f"{r.status_code} {r.json()['detail']}; wrong token 401; /healthz and /readyz stay open"
    )


def test_the_token_file_is_private_before_healthz_first_answers(tmp_path: Path, attack) -> None:
    """Race the first start: read STATE_DIR/token while torpor up starts, before and as /healthz first answers."""
    state = tmp_path / "state"
    api_port, port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("TORPOR_TOKEN", "TORPOR_STATE_DIR")}
    log = tmp_path / "up.log"
    path = state / "token"
    seen_modes: set[int] = set()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torpor.cli.main",
                "up",
                "--driver",
                "process",
                "--state-dir",
                str(state),
                "--port",
                str(port),
                "--api-port",
                str(api_port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=0.5) as c:
            while True:
                assert time.monotonic() < deadline, (
                    f"/healthz never answered:\n{log.read_text()[-2000:]}"
                )
                assert proc.poll() is None, log.read_text()[-2000:]
                try:
                    seen_modes.add(stat.S_IMODE(os.lstat(path).st_mode))
                except FileNotFoundError:
                    pass
                try:
                    healthy = c.get(f"http://127.0.0.1:{api_port}/healthz").status_code == 200
                except httpx.TransportError:
                    healthy = False
                if healthy:
                    st = os.lstat(path)  # must already be there
                    break
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
        assert seen_modes <= {0o600}, f"token file seen with modes {sorted(map(oct, seen_modes))}"
        assert stat.S_IMODE(state.stat().st_mode) == 0o700  # created by torpor up
        assert len(path.read_text().strip()) >= 40
        assert "token" in log.read_text() and path.read_text().strip() not in log.read_text()
    finally:
        proc.terminate()
        proc.wait(30)
    attack.ended(
        f"token file mode {stat.S_IMODE(st.st_mode):04o} (state dir 0700) before /healthz first answered"
    )


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A world-traversable directory (pytest's tmp_path is not), so only file modes protect what is inside."""
    d = Path(tempfile.mkdtemp(prefix="torpor-shared-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


NOBODY_SCRIPT = """
import sys, urllib.request, urllib.error
path, api = sys.argv[1], sys.argv[2]
try:
    open(path).read()
    print("read")
except PermissionError:
    print("denied")
req = urllib.request.Request(api + "/v1/functions", method="POST", data=b"x",
                             headers={"Content-Type": "application/gzip"})
try:
    print(urllib.request.urlopen(req, timeout=10).status)
except urllib.error.HTTPError as e:
    print(e.code)
"""


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv"
)
def test_another_local_user_can_neither_read_the_token_nor_call_the_api(
    shared_dir: Path, attack
) -> None:
    """A second local user (uid 65534) reads STATE_DIR/token of a state dir others may enter, then calls the API."""
    state = shared_dir / "state"
    state.mkdir(
        mode=0o755
    )  # an existing, world-readable state directory (as older versions left it)
    state.chmod(0o755)
    with started(Torpor(state)) as t:
        path = state / "token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        r = subprocess.run(
            [
                "setpriv",
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
                NOBODY_SCRIPT,
                str(path),
                t.api,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, r.stderr
        read, status = r.stdout.split()
        assert read == "denied" and status == "401", r.stdout
        assert t.api_call("GET", "/v1/functions").json()["functions"] == []
    attack.ended(f"uid {NOBODY}: open(token) PermissionError (mode 0600), API call {status}")


def test_the_cli_reads_the_token_file_and_says_where_it_looked(
    up: Torpor, tmp_path: Path, attack
) -> None:
    """Drive the CLI without TORPOR_TOKEN: from the right state dir it works, from another it is refused."""
    assert "TORPOR_TOKEN" not in up.env
    up.deploy(function_copy(tmp_path, "hello"))
    assert "hello" in up.cli("ls").stdout
    elsewhere = tmp_path / "other-state"
    env = {**up.env, "TORPOR_STATE_DIR": str(elsewhere)}
    r = subprocess.run(
        [sys.executable, "-m", "torpor.cli.main", "ls"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "401" in lines[0] and str(elsewhere / "token") in lines[0], r.stderr
    # --state-dir before the command says the same
    r = subprocess.run(
        [sys.executable, "-m", "torpor.cli.main", "--state-dir", str(up.state_dir), "ls"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "hello" in r.stdout, r.stderr
    attack.ended(f"CLI from another state dir: {lines[0][:110]}")


def test_torpor_token_overrides_the_token_file(tmp_path: Path, attack) -> None:
    """Start with both TORPOR_TOKEN and --token-file: the environment's token wins, and no file token is made."""
    env_token, file_token = "from-the-environment-0123456789", "from-the-token-file-0123456789"
    tf = tmp_path / "tf"
    tf.write_text(file_token + "\n")
    with torpor_up(
        tmp_path / "state", env={"TORPOR_TOKEN": env_token}, extra=["--token-file", str(tf)]
    ) as t:

        def status(token: str) -> int:
            return httpx.get(
                f"{t.api}/v1/functions", headers={"Authorization": f"Bearer {token}"}, timeout=5
            ).status_code

        assert status(env_token) == 200
        assert status(file_token) == 401
        assert not (t.state_dir / "token").exists()
        assert "hello" in t.deploy(function_copy(tmp_path, "hello"))  # the CLI sends TORPOR_TOKEN
        t.env["TORPOR_TOKEN"] = "wrong-wrong-wrong-wrong"
        r = t.cli("ls", check=False)
        assert r.returncode != 0 and "401" in r.stderr and "TORPOR_TOKEN" in r.stderr
    assert env_token not in t.log.read_text()
    attack.ended("TORPOR_TOKEN 200, --token-file's 401, no STATE_DIR/token written")


def test_torpor_state_dir_is_honoured_by_up_and_the_cli(tmp_path: Path, attack) -> None:
    """Run `torpor up` and the CLI with TORPOR_STATE_DIR only (no --state-dir): token and state land there."""
    state = tmp_path / "via-env"
    with started(Torpor(state, env={"TORPOR_STATE_DIR": str(state)}, state_dir_flag=False)) as t:
        assert (state / "token").is_file() and stat.S_IMODE(
            (state / "token").stat().st_mode
        ) == 0o600
        t.deploy(function_copy(tmp_path, "hello"))
        assert "hello" in t.cli("ls").stdout
        assert any((state / "blobs").iterdir())  # the function's source archive, by its hash
        assert f"{state / 'token'}" in t.log.read_text()  # `up` says where the token is
    attack.ended(
        f"token and source archives under TORPOR_STATE_DIR; `up` printed {state.name}/token"
    )
