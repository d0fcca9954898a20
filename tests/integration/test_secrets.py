"""Secrets end to end: a real `torpor up`, the real CLI (values on stdin or from a file),
real replicas that see them as env, and every surface checked for the value."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from platform_proc import Torpor, torpor_up

pytestmark = pytest.mark.slow

HANDLER = """\
import base64
import hashlib
import json
import os


def handle(request):
    value = os.environ.get("DB_PASSWORD")
    digest = hashlib.sha256(value.encode()).hexdigest() if value is not None else None
    return {"sha256": digest, "greeting": os.environ.get("GREETING")}
"""


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def secret_cli(
    t: Torpor, *args: str, stdin: bytes = b"", check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """`torpor ARGS` with ``stdin`` piped in (t.cli has no stdin)."""
    r = subprocess.run(
        [sys.executable, "-m", "torpor.cli.main", *args],
        env=t.env,
        input=stdin,
        capture_output=True,
        timeout=60,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"torpor {' '.join(args)} exited {r.returncode}:\n{r.stderr.decode()}")
    return r


def function_dir(
    tmp: Path, name: str, secrets: str = "{DB_PASSWORD: db-password}", extra: str = ""
) -> Path:
    d = tmp / f"{name}-{os.urandom(3).hex()}"
    d.mkdir()
    (d / "torpor.yaml").write_text(
        f"name: {name}\nhandler: handler:handle\nenv: {{GREETING: hello}}\nsecrets: {secrets}\n{extra}"
    )
    (d / "handler.py").write_text(HANDLER)
    return d


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Torpor]:
    with torpor_up(tmp_path_factory.mktemp("secrets") / "state") as t:
        yield t


def test_replicas_get_the_secret_as_env_and_new_replicas_get_a_new_value(
    up: Torpor, tmp_path: Path
) -> None:
    first, second = "first-Secret-value-1", "second-Secret-value-2"
    out = secret_cli(
        up, "secret", "set", "db-password", stdin=first.encode() + b"\n"
    )  # `echo v | ...`
    assert b"secret db-password created" in out.stderr
    up.deploy(function_dir(tmp_path, "sec"))
    r = up.request("sec")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "sha256": sha(first),
        "greeting": "hello",
    }  # one trailing newline was dropped

    ls = up.cli("secret", "ls").stdout
    assert [line.split()[0::3] for line in ls.splitlines()[1:]] == [["db-password", "sec"]]
    assert "DB_PASSWORD <- db-password" in up.cli("describe", "sec").stdout

    # replaced: the running replica keeps the env it started with
    value_file = tmp_path / "value"
    value_file.write_bytes(second.encode())
    out = secret_cli(up, "secret", "set", "db-password", "--from-file", str(value_file))
    assert b"updated (version 2)" in out.stderr and b"used by sec" in out.stderr
    assert up.request("sec").json()["sha256"] == sha(first)

    # at zero, the secret deleted: refused while in use, then forced
    up.cli("scale", "sec", "--replicas", "0")
    up.wait_for(lambda: not up.function("sec")["replicas"], 60, "sec at zero")
    refused = up.cli("secret", "rm", "db-password", check=False)
    assert (
        refused.returncode != 0 and "used by sec" in refused.stderr and "HTTP 409" in refused.stderr
    )
    up.cli("secret", "rm", "db-password", "--force")
    up.cli("scale", "sec", "--min", "0", "--max", "5")
    try:
        r = up.request("sec", timeout=3)
        assert r.status_code != 200
    except httpx.TimeoutException:
        pass  # held at zero: no replica can start

    def failed_start() -> str | None:
        events = up.api_call("GET", "/v1/functions/sec/events").json()["events"]
        return next(
            (
                e["message"]
                for e in events
                if "secret 'db-password' (for DB_PASSWORD) does not exist" in e["message"]
            ),
            None,
        )

    message = up.wait_for(failed_start, 30, "a start failed for the missing secret")
    assert first not in message and second not in message
    # set again: the held-back revision starts at once with the new value
    secret_cli(up, "secret", "set", "db-password", "--from-file", str(value_file))
    r = up.request("sec", timeout=30)
    assert r.status_code == 200 and r.json()["sha256"] == sha(second)


@pytest.mark.security
def test_a_secret_value_is_never_shown_back(up: Torpor, tmp_path: Path, attack) -> None:
    """Read a secret's value back through the API, the CLI, events, errors and the platform's log"""
    value = "Vx9-never-shown-" + os.urandom(4).hex()
    out = secret_cli(up, "secret", "set", "api-token", stdin=value.encode())
    shown = [out.stdout, out.stderr]
    up.deploy(function_dir(tmp_path, "leak", secrets="{DB_PASSWORD: api-token}"))
    assert up.request("leak").json()["sha256"] == sha(value)
    # bad requests that carry the value: refused without quoting it
    bad = [
        up.api_call(
            "PUT",
            "/v1/secrets/api-token",
            content=value.encode(),
            headers={"content-type": "text/plain"},
        ),
        up.api_call(
            "PUT",
            "/v1/secrets/api-token",
            content=value.encode() + b"\x00",
            headers={"content-type": "application/octet-stream"},
        ),
        up.api_call(
            "PUT",
            "/v1/secrets/API_TOKEN",
            content=value.encode(),
            headers={"content-type": "application/octet-stream"},
        ),
    ]
    assert [r.status_code for r in bad] == [415, 400, 400]
    pasted = function_dir(
        tmp_path, "leak", secrets="{DB_PASSWORD: " + value + "}"
    )  # a value where a name belongs
    r = up.cli("deploy", str(pasted), check=False)
    assert r.returncode != 0 and "secrets.DB_PASSWORD" in r.stderr
    shown += [r.stdout.encode(), r.stderr.encode()] + [b.content for b in bad]
    for path in (
        "/v1/functions",
        "/v1/functions/leak",
        "/v1/functions/leak/revisions",
        "/v1/functions/leak/revisions/leak-00001",
        "/v1/functions/leak/events?limit=200",
        "/v1/secrets",
        "/v1/secrets/api-token",
    ):
        resp = up.api_call("GET", path)
        assert resp.status_code == 200, path
        shown.append(resp.content)
    for args in (
        ("describe", "leak"),
        ("describe", "leak", "--json"),
        ("ls",),
        ("ls", "--json"),
        ("secret", "ls"),
        ("secret", "ls", "--json"),
        ("logs", "leak"),
    ):
        r = up.cli(*args)
        shown += [r.stdout.encode(), r.stderr.encode()]
    assert "DB_PASSWORD <- api-token" in up.cli("describe", "leak").stdout
    shown.append(up.log.read_bytes())
    leaks = [i for i, blob in enumerate(shown) if value.encode() in blob]
    assert leaks == [], f"the value appeared in outputs {leaks}"
    attack.ended(f"not in any of {len(shown)} outputs; bad PUTs got 415/400/400 without it")


@pytest.mark.security
def test_deploying_a_spec_that_names_an_unknown_secret_is_refused(
    up: Torpor, tmp_path: Path, attack
) -> None:
    """Deploy a function whose spec names a secret that does not exist"""
    d = function_dir(tmp_path, "ghost", secrets="{DB_PASSWORD: no-such-secret}")
    r = up.cli("deploy", str(d), check=False)
    assert r.returncode != 0
    assert (
        "secrets.DB_PASSWORD: no secret named 'no-such-secret'" in r.stderr
        and "HTTP 400" in r.stderr
    )
    resp = up.api_call("GET", "/v1/functions/ghost")
    assert resp.status_code == 404  # nothing was created
    attack.ended("400 unknown secret: secrets.DB_PASSWORD: no secret named 'no-such-secret'")


def test_a_crashing_replica_that_prints_its_secret_is_redacted_in_events(
    up: Torpor, tmp_path: Path
) -> None:
    value = "Printed-at-import-" + os.urandom(4).hex()
    secret_cli(up, "secret", "set", "crash-pw", stdin=value.encode())
    d = function_dir(tmp_path, "crash", secrets="{DB_PASSWORD: crash-pw}")
    (d / "handler.py").write_text(
        "import os\nprint('connecting with password=' + os.environ['DB_PASSWORD'], flush=True)\n"
        "raise RuntimeError('db refused password ' + os.environ['DB_PASSWORD'])\n"
    )
    r = up.cli("deploy", str(d), check=False)
    assert r.returncode != 0 and "failed" in r.stderr
    rev = up.function("crash")["revisions"][0]
    assert rev["status"] == "failed"
    assert "RuntimeError: db refused password ***" in rev["reason"]
    shown = (
        r.stderr
        + rev["reason"]
        + up.api_call("GET", "/v1/functions/crash/events?limit=200").text
        + up.cli("describe", "crash").stdout
    )
    assert (
        value not in shown
    )  # (the replica's own log file is the function's output, kept as printed)


def test_on_redis_the_value_is_under_its_own_key_and_replicas_see_it(
    tmp_path: Path, redis_url: str
) -> None:
    import redis

    value = "redis-Secret-value-" + os.urandom(4).hex()
    with torpor_up(tmp_path / "state", redis=redis_url) as t:
        secret_cli(t, "secret", "set", "db-password", stdin=value.encode())
        t.deploy(function_dir(tmp_path, "rsec"))
        r = t.request("rsec")
        assert r.status_code == 200 and r.json()["sha256"] == sha(value)
        assert value.encode() not in t.api_call("GET", "/v1/functions/rsec").content
    client = redis.Redis.from_url(redis_url)
    try:
        doc = json.loads(client.get("torpor:fn:rsec") or b"")
        assert doc["revisions"][0]["spec"]["secrets"] == {"DB_PASSWORD": "db-password"}
        raw = client.get("torpor:fn:rsec")
        assert isinstance(raw, bytes) and value.encode() not in raw
        stored = client.hgetall("torpor:secret:db-password")
        assert base64.b64decode(stored[b"value"]) == value.encode() and stored[b"version"] == b"1"
    finally:
        client.close()


@pytest.mark.docker
def test_docker_replicas_get_the_secret_as_env(tmp_path: Path) -> None:
    import docker

    from torpor.drivers.docker import INSTANCE, instance_id

    engine = docker.from_env(timeout=30)
    engine.ping()  # fails (not skips) without an engine
    state = tmp_path / "state"
    mine = {"label": f"{INSTANCE}={instance_id(state)}"}
    value = "docker-Secret-value-" + os.urandom(4).hex()
    try:
        # the plain docker run's channel (a warm-pool replica gets its env in the specialise
        # request instead: tests/integration/test_docker_pool.py)
        with torpor_up(state, driver="docker", env={"TORPOR_DOCKER_POOL": "0"}) as t:
            secret_cli(t, "secret", "set", "db-password", stdin=value.encode())
            t.deploy(function_dir(tmp_path, "dsec"))
            r = t.request("dsec")
            assert r.status_code == 200 and r.json() == {"sha256": sha(value), "greeting": "hello"}
            [c] = [
                c
                for c in engine.containers.list(filters=mine)
                if c.labels["torpor.function"] == "dsec"
            ]
            # env is the channel, so `docker inspect` shows it (as with Kubernetes env from a Secret) ...
            assert f"DB_PASSWORD={value}" in c.attrs["Config"]["Env"]
            # ... but no label, no image layer and no platform output holds it
            assert value not in repr(c.labels)
            assert value not in repr(engine.images.get(c.attrs["Image"]).attrs)
            assert value.encode() not in t.api_call("GET", "/v1/functions/dsec").content
            assert value.encode() not in t.log.read_bytes()
    finally:
        for c in engine.containers.list(all=True, filters=mine):
            c.remove(force=True)
        for img in engine.api.images(filters=mine):
            try:
                engine.images.remove(img["Id"], force=True)
            except docker.errors.DockerException:
                pass
        engine.close()
