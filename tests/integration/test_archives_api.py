"""Deploys store content-addressed archives, and ``GET /v1/archives/{sha}`` serves them to
whoever holds the admin token or that archive's own read-only token: the real app
(create_app) on a real EmbeddedStore in a state dir, through Starlette's TestClient."""

from __future__ import annotations

import asyncio
import hashlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from platform_proc import function_copy
from starlette.testclient import TestClient

from torpor.api.app import ApiConfig, create_app
from torpor.cli.main import pack
from torpor.sources import archive_token
from torpor.store.embedded import EmbeddedStore

TOKEN = "archives-api-test-token-0123456789"


class Api:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.store = EmbeddedStore(self.state)
        asyncio.run(
            self.store.archive_key()
        )  # made once per installation (a controller's start does it)
        app = create_app(self.store, ApiConfig(state_dir=self.state, token=TOKEN))
        self.c = TestClient(
            app, raise_server_exceptions=False, base_url="http://127.0.0.1"
        ).__enter__()

    def deploy(self, folder: Path) -> Any:
        r = self.c.post(
            "/v1/functions",
            content=pack(folder),
            headers={"content-type": "application/gzip", "authorization": f"Bearer {TOKEN}"},
        )
        assert r.status_code == 201, r.text
        fn = self.c.get(
            f"/v1/functions/{r.json()['function']}", headers={"authorization": f"Bearer {TOKEN}"}
        )
        return fn.json()["revisions"][-1]

    def key(self) -> bytes:
        return bytes.fromhex((self.state / "archive.key").read_text())

    def get(self, path: str, token: str | None, **headers: str) -> Any:
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        return self.c.get(path, headers=headers)

    def close(self) -> None:
        self.c.__exit__(None, None, None)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    a = Api(tmp_path)
    yield a
    a.close()


def _two(api: Api) -> tuple[str, str]:
    a = api.deploy(function_copy(api.tmp, "hello", env={"GREETING": "a"}))["source_sha256"]
    b = api.deploy(function_copy(api.tmp, "echo"))["source_sha256"]
    return a, b


def test_a_deploy_stores_a_normalised_archive_and_keeps_no_folder(api: Api) -> None:
    folder = function_copy(api.tmp, "hello")
    rev = api.deploy(folder)
    sha = rev["source_sha256"]
    blob = (api.state / "blobs" / sha).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == sha
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        assert sorted(m.name for m in tar.getmembers()) == ["handler.py", "torpor.yaml"]
        assert tar.extractfile("handler.py").read() == (folder / "handler.py").read_bytes()  # type: ignore[union-attr]
    assert not (api.state / "sources").exists()
    assert list((api.state / "uploads").iterdir()) == []
    doc = (api.state / "functions" / "hello.json").read_text()
    assert '"source": null' in doc and str(api.state) not in doc  # the revision names no path
    # the same folder again: the same archive, one blob
    assert api.deploy(folder)["source_sha256"] == sha
    assert [p.name for p in (api.state / "blobs").iterdir()] == [sha]


def test_an_image_function_ships_no_archive(api: Api) -> None:
    folder = function_copy(api.tmp, "hello")
    spec = yaml.safe_load((folder / "torpor.yaml").read_text())
    spec.pop("handler")
    spec["image"] = "registry.example/app:1"
    (folder / "torpor.yaml").write_text(yaml.safe_dump(spec))
    assert api.deploy(folder)["source_sha256"] is None
    assert list((api.state / "blobs").iterdir()) == []


def test_the_admin_token_and_the_archives_own_token_fetch_it(api: Api) -> None:
    a, _ = _two(api)
    for token in (TOKEN, archive_token(api.key(), a)):
        r = api.get(f"/v1/archives/{a}", token)
        assert r.status_code == 200, r.text
        assert hashlib.sha256(r.content).hexdigest() == a
        assert r.headers["content-type"] == "application/gzip"
        assert r.headers["cache-control"] == "private, no-store"


@pytest.mark.security
def test_an_archive_without_a_token_or_with_a_wrong_one(api: Api, attack: Any) -> None:
    """Download a function's source archive with no token, a made-up token or another installation's token"""
    a, _ = _two(api)
    outcomes = []
    for token in (
        None,
        "",
        "tpa1." + "0" * 64,
        archive_token(b"another installation's key.....", a),
        archive_token(api.key(), a)[:-1],
        TOKEN[:-1],
    ):
        r = api.get(f"/v1/archives/{a}", token)
        assert r.status_code == 401, (token, r.text)
        assert r.json()["error"] == "unauthorized"
        assert r.content[:2] != b"\x1f\x8b"
        outcomes.append(r.json()["detail"])
    attack.ended(f"401 unauthorized ({'; '.join(sorted(set(outcomes)))})")


@pytest.mark.security
def test_one_archives_token_for_another_archive(api: Api, attack: Any) -> None:
    """Use the token a Pod got for its own archive to download another function's archive"""
    a, b = _two(api)
    r = api.get(f"/v1/archives/{b}", archive_token(api.key(), a))
    assert r.status_code == 401 and r.json()["detail"] == "wrong token for this archive"
    assert api.get(f"/v1/archives/{b}", archive_token(api.key(), b)).status_code == 200
    attack.ended(f"401 {r.json()['detail']}")


@pytest.mark.security
def test_an_archive_token_on_the_rest_of_the_api(api: Api, attack: Any) -> None:
    """Call the control API (list, deploy, secrets, metrics) with an archive's read-only token"""
    a, _ = _two(api)
    token = archive_token(api.key(), a)
    for method, path in (
        ("GET", "/v1/functions"),
        ("GET", "/v1/functions/hello"),
        ("GET", "/v1/secrets"),
        ("DELETE", "/v1/functions/hello"),
        ("GET", "/metrics"),
        ("GET", "/v1/openapi.json"),
        ("GET", "/v1/archives"),
        ("GET", "/v1/archives/"),
    ):
        r = api.c.request(method, path, headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 401, (method, path, r.status_code)
    assert api.get("/v1/functions/hello", TOKEN).status_code == 200  # still there
    attack.ended("401 wrong token on every route but /v1/archives/SHA itself")


@pytest.mark.security
def test_malformed_archive_names_and_path_tricks(api: Api, attack: Any) -> None:
    """Reach another route or file through /v1/archives/ (.., encoded slashes, NUL, upper case, suffixes)"""
    a, _ = _two(api)
    token = archive_token(api.key(), a)
    tricks = [
        f"/v1/archives/{a.upper()}",
        f"/v1/archives/{a}/",
        f"/v1/archives/{a}%2F..%2F..%2Ffunctions",
        "/v1/archives/%2e%2e%2ffunctions",
        f"/v1/archives/{a[:-1]}",
        f"/v1/archives/{a}0",
        f"/v1/archives/{a}%00",
        f"/v1/archives//{a}",
        f"/v1/archives/{a}.tar.gz",
        "/v1/archives/..%2F..%2Fstate%2Farchive.key",
    ]
    for path in tricks:
        r = api.c.get(path, headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 401, (
            path,
            r.status_code,
            r.text,
        )  # only the admin token gets past auth
        admin = api.c.get(
            path, headers={"authorization": f"Bearer {TOKEN}"}, follow_redirects=False
        )
        assert admin.status_code in (307, 400, 404), (
            path,
            admin.status_code,
        )  # 307: the slash dropped
        assert admin.content[:2] != b"\x1f\x8b"
    r = api.get(f"/v1/archives/{a.upper()}", TOKEN)
    assert r.status_code == 400 and r.json()["field"] == "sha"
    attack.ended(
        "401 for the archive token; 400 bad archive name / 404 for the admin token; nothing served"
    )


@pytest.mark.security
def test_a_valid_token_for_an_archive_that_is_not_there(api: Api, attack: Any) -> None:
    """Probe for archives by hash with tokens minted for them (as a Pod of a deleted function would)"""
    missing = hashlib.sha256(b"never deployed").hexdigest()
    r = api.get(f"/v1/archives/{missing}", archive_token(api.key(), missing))
    assert r.status_code == 404 and r.json()["error"] == "archive not found"
    attack.ended(f"404 {r.json()['detail']}")


@pytest.mark.security
def test_the_archive_route_keeps_the_browser_guard(api: Api, attack: Any) -> None:
    """Fetch an archive from a web page (DNS rebinding Host, cross-site Origin) with a leaked token"""
    a, _ = _two(api)
    token = archive_token(api.key(), a)
    r1 = api.get(f"/v1/archives/{a}", token, host="evil.example")
    r2 = api.get(f"/v1/archives/{a}", token, origin="https://evil.example")
    assert r1.status_code == 421 and r2.status_code == 403
    attack.ended(f"{r1.status_code} {r1.json()['error']}; {r2.status_code} {r2.json()['error']}")
