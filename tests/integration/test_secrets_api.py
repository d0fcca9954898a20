"""The /v1/secrets routes and the deploy check, on the real API app over each real
store (embedded in a tmp dir, Redis on a real redis-server), called in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from torpor.api.app import ApiConfig, create_app
from torpor.cli.main import pack
from torpor.store.base import Store
from torpor.store.embedded import EmbeddedStore
from torpor.store.redis import RedisStore

VALUE = "hunter2-correct-horse-battery"
OCTET = {"content-type": "application/octet-stream"}
TOKEN = "secrets-api-test-token-0123456789"


@pytest.fixture(params=["embedded", "redis"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = (
        EmbeddedStore(tmp_path / "state")
        if request.param == "embedded"
        else RedisStore(request.getfixturevalue("redis_url"))
    )
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def api(store: Store, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(store, ApiConfig(state_dir=tmp_path / "api", token=TOKEN))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://127.0.0.1",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as c:
        yield c


def folder(
    tmp_path: Path, name: str = "hello", secrets: dict[str, str] | None = None, **top: Any
) -> Path:
    d = tmp_path / f"fn-{name}-{len(list(tmp_path.iterdir()))}"
    d.mkdir()
    lines = [f"name: {name}", "handler: handler:handle"]
    if secrets is not None:
        lines.append("secrets: {" + ", ".join(f"{k}: {v}" for k, v in secrets.items()) + "}")
    lines += [f"{k}: {v}" for k, v in top.items()]
    (d / "torpor.yaml").write_text("\n".join(lines) + "\n")
    (d / "handler.py").write_text("def handle(request):\n    return 'hi'\n")
    return d


async def deploy(api: httpx.AsyncClient, d: Path) -> httpx.Response:
    return await api.post(
        "/v1/functions", content=pack(d), headers={"content-type": "application/gzip"}
    )


async def test_set_replace_get_list(api: httpx.AsyncClient) -> None:
    r = await api.put("/v1/secrets/db-password", content=VALUE.encode(), headers=OCTET)
    assert r.status_code == 201, r.text
    assert (
        r.json()["name"] == "db-password" and r.json()["version"] == 1 and r.json()["used_by"] == []
    )
    r = await api.put("/v1/secrets/db-password", content=b"another-value", headers=OCTET)
    assert r.status_code == 200 and r.json()["version"] == 2
    r = await api.get("/v1/secrets")
    assert [(s["name"], s["version"], s["used_by"]) for s in r.json()["secrets"]] == [
        ("db-password", 2, [])
    ]
    assert set(r.json()["secrets"][0]) == {"name", "version", "updated", "used_by"}
    r = await api.get("/v1/secrets/db-password")
    assert r.status_code == 200 and set(r.json()) == {"name", "version", "updated", "used_by"}
    r = await api.get("/v1/secrets/nope")
    assert r.status_code == 404 and r.json()["error"] == "secret not found"


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "error"),
    [
        (
            "/v1/secrets/db-password",
            VALUE.encode(),
            {"content-type": "text/plain"},
            415,
            "unsupported media type",
        ),
        (
            "/v1/secrets/db-password",
            VALUE.encode(),
            {"content-type": "application/json"},
            415,
            "unsupported media type",
        ),
        ("/v1/secrets/db-password", b"", OCTET, 400, "invalid secret value"),
        ("/v1/secrets/db-password", VALUE.encode() + b"\x00", OCTET, 400, "invalid secret value"),
        ("/v1/secrets/db-password", VALUE.encode() + b"\xff", OCTET, 400, "invalid secret value"),
        ("/v1/secrets/db-password", VALUE.encode() * 3000, OCTET, 413, "secret too large"),
        ("/v1/secrets/DB_Password", VALUE.encode(), OCTET, 400, "invalid secret name"),
        ("/v1/secrets/" + "x" * 64, VALUE.encode(), OCTET, 400, "invalid secret name"),
    ],
)
async def test_bad_puts_are_refused_and_never_quote_the_value(
    api: httpx.AsyncClient,
    store: Store,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    error: str,
) -> None:
    r = await api.put(path, content=body, headers=headers)
    assert r.status_code == status, r.text
    assert r.json()["error"] == error and r.json()["detail"]
    assert "hunter2" not in r.text
    assert await store.list_secrets() == []


async def test_deploy_naming_an_unknown_secret_is_a_400_naming_it(
    api: httpx.AsyncClient, tmp_path: Path, store: Store
) -> None:
    d = folder(tmp_path, secrets={"DB_PASSWORD": "db-password", "API_KEY": "api-key"})
    r = await deploy(api, d)
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["error"] == "unknown secret" and body["field"] == "secrets.API_KEY"
    assert "secrets.API_KEY: no secret named 'api-key'" in body["detail"]
    assert "secrets.DB_PASSWORD: no secret named 'db-password'" in body["detail"]
    assert await store.get_function("hello") is None  # nothing was created
    await api.put("/v1/secrets/api-key", content=b"k-k-k-k", headers=OCTET)
    r = await deploy(api, d)
    assert r.status_code == 400 and r.json()["field"] == "secrets.DB_PASSWORD"
    await api.put("/v1/secrets/db-password", content=VALUE.encode(), headers=OCTET)
    r = await deploy(api, d)
    assert r.status_code == 201, r.text


async def test_users_events_and_a_delete_refused_while_in_use(
    api: httpx.AsyncClient, tmp_path: Path, store: Store
) -> None:
    await api.put("/v1/secrets/db-password", content=VALUE.encode(), headers=OCTET)
    await api.put("/v1/secrets/unused", content=b"u-u-u-u", headers=OCTET)
    assert (
        await deploy(api, folder(tmp_path, "hello", secrets={"DB_PASSWORD": "db-password"}))
    ).status_code == 201
    assert (
        await deploy(api, folder(tmp_path, "web", secrets={"PW": "db-password"}))
    ).status_code == 201
    listed = {s["name"]: s["used_by"] for s in (await api.get("/v1/secrets")).json()["secrets"]}
    assert listed == {"db-password": ["hello", "web"], "unused": []}

    fn = (await api.get("/v1/functions/hello")).json()
    assert fn["revisions"][0]["spec"]["secrets"] == {"DB_PASSWORD": "db-password"}

    r = await api.put("/v1/secrets/db-password", content=b"rotated-value", headers=OCTET)
    assert r.json()["used_by"] == ["hello", "web"]
    events = (await api.get("/v1/functions/hello/events")).json()["events"]
    assert any(
        e["kind"] == "secret" and "secret db-password set (version 2)" in e["message"]
        for e in events
    )

    r = await api.delete("/v1/secrets/db-password")
    assert r.status_code == 409, r.text
    assert r.json()["used_by"] == ["hello", "web"] and "hello, web" in r.json()["detail"]
    assert await store.get_secret("db-password") == b"rotated-value"
    r = await api.delete("/v1/secrets/unused")
    assert r.status_code == 200 and r.json() == {"deleted": "unused", "used_by": []}
    r = await api.delete("/v1/secrets/db-password", params={"force": "true"})
    assert r.status_code == 200 and r.json()["used_by"] == ["hello", "web"]
    assert await store.get_secret("db-password") is None
    events = (await api.get("/v1/functions/web/events")).json()["events"]
    assert any("secret db-password deleted while in use" in e["message"] for e in events)
    r = await api.delete("/v1/secrets/db-password")
    assert r.status_code == 404


async def test_no_route_returns_a_value(api: httpx.AsyncClient, tmp_path: Path) -> None:
    await api.put("/v1/secrets/db-password", content=VALUE.encode(), headers=OCTET)
    await deploy(
        api, folder(tmp_path, "hello", secrets={"DB_PASSWORD": "db-password"}, env="{GREETING: hi}")
    )
    seen = []
    for path in (
        "/v1/secrets",
        "/v1/secrets/db-password",
        "/v1/functions",
        "/v1/functions/hello",
        "/v1/functions/hello/revisions",
        "/v1/functions/hello/revisions/hello-00001",
        "/v1/functions/hello/events",
        "/v1/openapi.json",
    ):
        r = await api.get(path)
        assert r.status_code == 200, (path, r.text)
        seen.append(r.text)
    assert all(VALUE not in text for text in seen)
    fn = (await api.get("/v1/functions/hello")).json()
    assert fn["revisions"][0]["spec"]["env"] == {
        "GREETING": "hi"
    }  # plain env stays visible: it is config
